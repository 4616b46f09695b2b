"""GLM-4.5 (`glm4_moe`) targets with their nextn MTP head, on tiny random
checkpoints (mlx_mtp.testing.glm4_moe; nothing downloaded).

References: mlx-lm's own glm4_moe model (trunk, same weights: exact);
transformers' Glm4MoeForCausalLM and its MtpModel, loaded from the same
raw-HF directory (float32 on both sides: max |diff| <= 1e-4 on logits and
hidden states); and a numpy forward of the head written from
vllm/model_executor/models/glm4_moe_mtp.py and
python/sglang/srt/models/glm4_moe_nextn.py (float64: <= 1e-4 against our
float32). Distribution test bound: chi-square p > 1e-3 (tests/test_sampling.py).
"""

from __future__ import annotations

import json
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from family_checks import assert_caches_equal, assert_head_cache_matches_fresh_pass

from mlx_mtp import SamplingParams, Stats, decode, load
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.models import glm4_moe
from mlx_mtp.models.registry import head_layout
from mlx_mtp.sampling import probabilities
from mlx_mtp.testing import glm4_moe as fixture

PROMPTS = [[5], [5, 17, 33, 2, 9], list(range(2, 22)), [88, 3, 3, 3, 71]]
#: Residual-branch scale of the predictable fixture: the head is right
#: about half the time, so every accepted length shows up.
NOISE = 1.2


@pytest.fixture(scope="module")
def model():
    return fixture.build(fixture.config(), seed=1, predictable=True, noise=NOISE)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return fixture.write_model_dir(tmp_path_factory.mktemp("glm") / "glm-4.5-tiny", seed=1, noise=NOISE)


def run(model, prompt, k, max_tokens=32, cache=None, drafter=None, **kw):
    stats = Stats()
    if drafter is None and k:
        drafter = MTPDrafter(model)
    tokens, from_draft = [], []
    for cycle in decode(model, prompt, drafter=drafter, num_draft=k, max_tokens=max_tokens, stats=stats,
                        cache=cache, **kw):
        tokens += cycle.tokens
        from_draft += cycle.from_draft
    return tokens, from_draft, stats


def f32(x: mx.array) -> np.ndarray:
    return np.array(x.astype(mx.float32))


def as_float32(model):
    """The loaded (bf16) model computing in float32 on the same values."""
    model.update(tree_map(lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x,
                          model.parameters()))
    return model


# --- the trunk against mlx-lm and transformers --------------------------------


def test_trunk_matches_mlx_lm(model):
    from mlx_lm.generate import generate_step
    from mlx_lm.models import glm4_moe as lm_glm4_moe

    cfg = fixture.config()
    ref = lm_glm4_moe.Model(lm_glm4_moe.ModelArgs.from_dict(cfg))
    ref.load_weights([(k, v) for k, v in tree_flatten(model.parameters()) if not k.startswith("mtp.")], strict=True)
    tokens = mx.array([PROMPTS[2]])
    np.testing.assert_array_equal(np.array(ref(tokens)), np.array(model.logits(model.hidden(tokens))))
    ours, _, _ = run(model, PROMPTS[1], k=0, max_tokens=16)
    assert ours == [int(t) for t, _ in generate_step(mx.array(PROMPTS[1]), ref, max_tokens=16)]


@pytest.fixture(scope="module")
def transformers_pair(hf_dir):
    torch = pytest.importorskip("torch")
    from transformers import Glm4MoeForCausalLM

    hf = Glm4MoeForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ours, _ = load(str(hf_dir))
    return hf, as_float32(ours.target)


def test_logits_and_hidden_match_transformers(transformers_pair):
    import torch

    hf, ours = transformers_pair
    tokens = PROMPTS[2]
    with torch.no_grad():
        out = hf.model(torch.tensor([tokens]))
        hf_hidden = out.last_hidden_state.numpy()
        hf_logits = hf.lm_head(out.last_hidden_state).numpy()
    hidden = ours.hidden(mx.array([tokens]))
    np.testing.assert_allclose(np.array(hidden), hf_hidden, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(ours.logits(hidden)), hf_logits, atol=1e-4, rtol=0)


def test_head_matches_transformers_mtp_model(transformers_pair):
    """transformers' MtpModel reads model.layers.3.* from the same files and
    chains its post-norm output, as we do; it puts head entry i at RoPE
    position i + 1 where we use i (same attention: RoPE is relative)."""
    import torch
    from transformers.modeling_layers import MtpModel

    hf, ours = transformers_pair
    # transformers finds the head by the released layer indices (46 for
    # GLM-4.5-Air, 92 for GLM-4.5/4.6/4.7); the tiny model's is 3.
    hf._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{hf.config.num_hidden_layers}.*"]
    mtp = MtpModel.from_pretrained(hf).eval()
    tokens = PROMPTS[2]
    L = len(tokens)
    with torch.no_grad():
        h = hf.model(torch.tensor([tokens])).last_hidden_state
        nxt = int(hf.lm_head(h[:, -1]).argmax())
        ids = torch.tensor([tokens[1:] + [nxt]])
        g_ref = mtp.forward_layer(0, h, torch.arange(1, L + 1)[None], None, input_ids=ids)
        draft1 = int(mtp._project_to_logits(g_ref[:, -1]).argmax())
        ids2 = torch.cat([ids, torch.tensor([[draft1]])], 1)
        g2_ref = mtp.forward_layer(0, torch.cat([h, g_ref[:, -1:]], 1), torch.arange(1, L + 2)[None], None,
                                   input_ids=ids2)
        logits2_ref = mtp._project_to_logits(g2_ref[:, -1]).numpy()

    hidden = ours.hidden(mx.array([tokens]))
    cache = ours.make_mtp_cache()
    g = ours.mtp(ours.embed(mx.array([tokens[1:] + [nxt]])), hidden, cache)
    np.testing.assert_allclose(np.array(g), g_ref.numpy(), atol=1e-4, rtol=0)
    assert int(mx.argmax(ours.mtp_logits(g[:, -1]))) == draft1
    g2 = ours.mtp(ours.embed(mx.array([[draft1]])), g[:, -1:], cache)
    np.testing.assert_allclose(np.array(ours.mtp_logits(g2[:, -1])), logits2_ref, atol=1e-4, rtol=0)


# --- the head against a numpy forward from the published modeling code ---------


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


class NumpyGlm:
    """GLM-4.5 forward in float64 from the raw-HF tensors, as vLLM's
    glm4_moe.py / glm4_moe_mtp.py compute it: q/k/v with bias, per-head
    q/k RMSNorm, neox RoPE on the first head_dim * partial_rotary_factor
    features, sigmoid router with the correction bias used for choosing only,
    normalised top-k weights times routed_scaling_factor, shared expert;
    nextn: eh_proj([enorm(e), hnorm(h)]), one decoder layer,
    shared_head.norm, shared_head.head."""

    def __init__(self, weights, cfg):
        self.w = {k: np.array(v.astype(mx.float32)).astype(np.float64) for k, v in weights.items()}
        self.cfg = cfg

    def _attention(self, p, x, pos):
        c, w = self.cfg, self.w
        nh, nkv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        L = x.shape[0]
        q, k, v = (x @ w[f"{p}{n}_proj.weight"].T + w[f"{p}{n}_proj.bias"] for n in "qkv")
        q, k, v = q.reshape(L, nh, hd), k.reshape(L, nkv, hd), v.reshape(L, nkv, hd)
        if c["use_qk_norm"]:
            eps = c["rms_norm_eps"]
            q, k = _rms(q, w[p + "q_norm.weight"], eps), _rms(k, w[p + "k_norm.weight"], eps)
        rd = int(hd * c["partial_rotary_factor"])
        ang = pos[:, None] * c["rope_theta"] ** (-np.arange(0, rd, 2) / rd)[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]

        def rope(t):
            a, b = t[..., : rd // 2], t[..., rd // 2 : rd]
            return np.concatenate([a * cos - b * sin, b * cos + a * sin, t[..., rd:]], -1)

        q, k = rope(q), rope(k)
        rep = nh // nkv
        out = np.zeros((L, nh, hd))
        causal = np.tril(np.ones((L, L), bool))
        for head in range(nh):
            s = q[:, head] @ k[:, head // rep].T * hd**-0.5
            s = np.where(causal, s, -np.inf)
            a = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (a / a.sum(-1, keepdims=True)) @ v[:, head // rep]
        return out.reshape(L, nh * hd) @ w[p + "o_proj.weight"].T

    def _mlp(self, p, x):
        w = self.w
        g, u = x @ w[p + "gate_proj.weight"].T, x @ w[p + "up_proj.weight"].T
        return (g / (1 + np.exp(-g)) * u) @ w[p + "down_proj.weight"].T

    def _moe(self, p, x):
        c, w = self.cfg, self.w
        scores = 1 / (1 + np.exp(-(x @ w[p + "gate.weight"].T)))
        choice = scores + w[p + "gate.e_score_correction_bias"]
        out = self._mlp(p + "shared_experts.", x)
        for t in range(x.shape[0]):
            top = np.argsort(-choice[t])[: c["num_experts_per_tok"]]
            weights = scores[t, top]
            if c["norm_topk_prob"]:
                weights = weights / weights.sum()
            for e, we in zip(top, weights * c["routed_scaling_factor"]):
                out[t] += we * self._mlp(f"{p}experts.{e}.", x[t : t + 1])[0]
        return out

    def layer(self, index, x, pos):
        c = self.cfg
        p = f"model.layers.{index}."
        h = x + self._attention(p + "self_attn.", _rms(x, self.w[p + "input_layernorm.weight"], c["rms_norm_eps"]), pos)
        y = _rms(h, self.w[p + "post_attention_layernorm.weight"], c["rms_norm_eps"])
        return h + (self._moe(p + "mlp.", y) if index >= c["first_k_dense_replace"] else self._mlp(p + "mlp.", y))

    def hidden(self, tokens):
        x = self.w["model.embed_tokens.weight"][tokens]
        pos = np.arange(len(tokens), dtype=np.float64)
        for i in range(self.cfg["num_hidden_layers"]):
            x = self.layer(i, x, pos)
        return _rms(x, self.w["model.norm.weight"], self.cfg["rms_norm_eps"])

    def head(self, next_tokens, hidden):
        """Post-shared_head.norm states and logits for pairs (E[t_{i+1}], h_i) at positions 0..L-1."""
        c, w, n = self.cfg, self.w, self.cfg["num_hidden_layers"]
        p = f"model.layers.{n}."
        e = _rms(w[p + "embed_tokens.weight"][next_tokens], w[p + "enorm.weight"], c["rms_norm_eps"])
        h = _rms(hidden, w[p + "hnorm.weight"], c["rms_norm_eps"])
        x = np.concatenate([e, h], -1) @ w[p + "eh_proj.weight"].T
        x = self.layer(n, x, np.arange(len(next_tokens), dtype=np.float64))
        g = _rms(x, w[p + "shared_head.norm.weight"], c["rms_norm_eps"])
        return g, g @ w[p + "shared_head.head.weight"].T


class RecordingDrafter(MTPDrafter):
    """MTPDrafter that keeps what each draft() proposed."""

    def reset(self):
        super().reset()
        self.proposed = []

    def draft(self, k, params, key, history=None):
        tokens, probs = super().draft(k, params, key, history)
        self.proposed.append([int(t) for t in tokens.tolist()])
        return tokens, probs


def test_first_cycle_drafts_match_numpy_reference():
    # A random head (not the predictable one) and its own shared_head.head,
    # distinct from lm_head: the reference must use the head's own output layer.
    cfg = fixture.config()
    model = fixture.build(cfg, seed=4)
    weights = fixture.hf_weights(model)
    own_head = weights["model.layers.3.shared_head.head.weight"]
    assert not np.array_equal(np.array(weights["lm_head.weight"]), np.array(own_head))
    ref = NumpyGlm(weights, cfg)
    prompt = PROMPTS[1]

    h_ref = ref.hidden(np.array(prompt))
    np.testing.assert_allclose(np.array(model.hidden(mx.array([prompt])))[0], h_ref, atol=1e-4, rtol=0)
    first = int(np.argmax(h_ref[-1] @ ref.w["lm_head.weight"].T))
    pairs = prompt[1:] + [first]
    g_ref, logits_ref = ref.head(np.array(pairs), h_ref)
    draft1 = int(np.argmax(logits_ref[-1]))
    # depth 2: the post-norm state g comes back in place of h at position L
    g2_ref, logits2_ref = ref.head(np.array(pairs + [draft1]), np.concatenate([h_ref, g_ref[-1:]]))
    draft2 = int(np.argmax(logits2_ref[-1]))
    np.testing.assert_allclose(g2_ref[:-1], g_ref, atol=1e-12)  # causal: the first L entries are unchanged

    cache = model.make_mtp_cache()
    g = model.mtp(model.embed(mx.array([pairs])), model.hidden(mx.array([prompt])), cache)
    np.testing.assert_allclose(np.array(g)[0], g_ref, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(model.mtp_logits(g))[0], logits_ref, atol=1e-4, rtol=0)
    g2 = model.mtp(model.embed(mx.array([[draft1]])), g[:, -1:], cache)
    np.testing.assert_allclose(np.array(model.mtp_logits(g2))[0, -1], logits2_ref[-1], atol=1e-4, rtol=0)

    # The engine's own first cycle proposes the same two tokens.
    drafter = RecordingDrafter(model)
    run(model, prompt, k=2, max_tokens=8, drafter=drafter)
    assert drafter.proposed[0] == [draft1, draft2]


# --- lossless decoding ---------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_speculative_equals_plain(model, k):
    accepted = drafted = 0
    for prompt in PROMPTS:
        plain, _, _ = run(model, prompt, k=0)
        drafter = MTPDrafter(model)
        spec, from_draft, stats = run(model, prompt, k=k, drafter=drafter)
        assert spec == plain, f"k={k} prompt={prompt}"
        assert stats.host_syncs_per_cycle == 1.0
        assert sum(from_draft) == stats.accepted_tokens
        accepted += stats.accepted_tokens
        drafted += stats.draft_tokens
    # Both acceptances and rejections, or the run proves nothing.
    assert 0 < accepted < drafted, (accepted, drafted)


def test_accepted_lengths_cover_every_depth(model):
    k, seen = 4, set()
    for prompt in PROMPTS:
        for cycle in decode(model, prompt, drafter=MTPDrafter(model), num_draft=k, max_tokens=48):
            if cycle.drafted:
                seen.add(cycle.accepted)
    assert seen == set(range(k + 1)), seen


def _cache_arrays(c):
    return [np.array(c.keys[..., : c.offset, :]), np.array(c.values[..., : c.offset, :])]


@pytest.mark.parametrize("k", [2, 4])
def test_rollback_leaves_plain_caches(model, k):
    prompt = PROMPTS[2]
    spec_cache, plain_cache = model.make_cache(), model.make_cache()
    drafter = MTPDrafter(model)
    spec, _, stats = run(model, prompt, k=k, max_tokens=30, cache=spec_cache, drafter=drafter)
    plain, _, _ = run(model, prompt, k=0, max_tokens=30, cache=plain_cache)
    assert spec == plain and 0 < stats.accepted_tokens < stats.draft_tokens
    assert_caches_equal(spec_cache, plain_cache, _cache_arrays)
    # The head's cache equals a fresh head run over every (next token, target hidden) pair.
    assert_head_cache_matches_fresh_pass(model, drafter, prompt + spec, _cache_arrays)


def test_sampling_matches_target_distribution():
    from test_sampling import chi_square_p_value

    model = fixture.build(fixture.config(), seed=5, predictable=True, noise=NOISE)
    params = SamplingParams(temp=1.0, top_k=3)
    # 4 tokens: the first cycle drafts 3 (depths 1..3), later ones fewer.
    prompt, length, n_samples = [5, 17, 33], 4, 400
    joint = {(): 1.0}
    for _ in range(length):  # exact probability of every continuation (top-k keeps it small)
        nxt = {}
        for prefix, pr in joint.items():
            hidden = model.hidden(mx.array([prompt + list(prefix)]))
            probs = np.array(probabilities(model.logits(hidden[:, -1, :])[0], params))
            for t in np.nonzero(probs)[0]:
                nxt[prefix + (int(t),)] = pr * float(probs[t])
        joint = nxt
    drafter, observed, total = MTPDrafter(model), Counter(), Stats()
    for seed in range(n_samples):
        out, _, stats = run(model, prompt, k=3, max_tokens=length, drafter=drafter, params=params, seed=seed)
        observed[tuple(out)] += 1
        total.draft_tokens += stats.draft_tokens
        total.accepted_tokens += stats.accepted_tokens
    assert 0 < total.accepted_tokens < total.draft_tokens, (total.accepted_tokens, total.draft_tokens)
    p_value = chi_square_p_value(observed, joint, n_samples)
    assert p_value > 1e-3, (p_value, total.accepted_tokens / total.draft_tokens)


# --- checkpoints: the raw-HF directory, stripped / undeclared heads, GLM-4.6 ----


def test_fixture_mirrors_the_released_layout(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 2 and all((hf_dir / f).exists() for f in set(index.values()))
    n = cfg["num_hidden_layers"]
    assert f"model.layers.{n}.embed_tokens.weight" in index and f"model.layers.{n}.shared_head.head.weight" in index
    assert f"model.layers.{n}.mlp.experts.3.down_proj.weight" in index  # per-expert, head included
    assert "model.layers.0.mlp.gate_proj.weight" in index  # layer 0 dense
    tensors = {}
    for f in set(index.values()):
        tensors.update(mx.load(str(hf_dir / f)))
    assert tensors["model.layers.1.mlp.experts.0.gate_proj.weight"].dtype == mx.bfloat16
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    layout = head_layout(cfg)
    assert layout.declared_layers == 1 and layout.config_field == "num_nextn_predict_layers"
    assert layout.local_key(f"model.layers.{n}.enorm.weight") == "layers.0.enorm.weight"
    assert layout.local_key(f"model.layers.{n - 1}.input_layernorm.weight") is None
    assert layout.local_key("mtp.layers.0.eh_proj.weight") == "layers.0.eh_proj.weight"
    # the layout's own sanitize (no model instance: inspect / graft) gives the `mtp` module's layout
    head, _ = layout.split(tensors)
    model = fixture.build(cfg)
    assert set(layout.sanitize(head, True)) == {k for k, _ in tree_flatten(model.mtp.parameters())}


def test_transformers5_config_reads_the_same():
    """Configs re-saved by transformers 5 keep rope settings in `rope_parameters` only."""
    legacy = fixture.config()
    v5 = {k: v for k, v in legacy.items() if k not in ("rope_theta", "rope_scaling", "partial_rotary_factor")}
    v5["rope_parameters"] = {"rope_type": "default", "rope_theta": legacy["rope_theta"], "partial_rotary_factor": 0.5}
    assert glm4_moe.ModelArgs.from_dict(v5) == glm4_moe.ModelArgs.from_dict(legacy)
    assert glm4_moe.ModelArgs.from_dict(legacy).num_nextn_predict_layers == 1


def test_load_raw_hf_dir_drafts_with_its_head(hf_dir, model):
    sm, tok = load(str(hf_dir))
    target = sm.target
    assert isinstance(target, glm4_moe.Model) and isinstance(sm.drafter, MTPDrafter)
    assert target.mtp_problem is None and target.has_mtp
    # the stored per-expert head tensors, stacked, in bf16; the duplicate embed_tokens is gone
    stacked = target.mtp.layers[0].mlp.switch_mlp.down_proj.weight
    expected = model.mtp.layers[0].mlp.switch_mlp.down_proj.weight.astype(mx.bfloat16)
    np.testing.assert_array_equal(f32(stacked), f32(expected))
    assert "embed_tokens" not in target.mtp.layers[0]
    assert tok.encode("hello") and tok.eos_token_ids == {1}
    prompt = tok.encode("hello world")
    plain, _, _ = run(target, prompt, k=0, max_tokens=24)
    spec, _, stats = run(target, prompt, k=3, max_tokens=24, drafter=sm.drafter)
    assert spec == plain and stats.accepted_tokens > 0


def test_cli_generate_on_raw_hf_dir(hf_dir):
    from click.testing import CliRunner

    from mlx_mtp.cli import main

    result = CliRunner().invoke(main, ["generate", "-m", str(hf_dir), "hi", "-n", "8", "-k", "2", "--json",
                                       "--temp", "0"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["stats"]["drafter"] == "mtp" and out["stats"]["generated_tokens"] == len(out["tokens"]) > 0


def test_stripped_head_loads_with_one_line_problem(tmp_path, model, hf_dir):
    path = fixture.write_model_dir(tmp_path / "stripped", model=model, drop_mtp=True)
    sm, _ = load(str(path))
    problem = sm.target.mtp_problem
    assert sm.drafter is None and not sm.target.has_mtp
    assert problem == ("config declares num_nextn_predict_layers=1 but the checkpoint has no model.layers.3.* "
                       "weights (they were stripped by a conversion)")
    assert problem in sm.drafter_note and "\n" not in sm.drafter_note
    with pytest.raises(ValueError, match="stripped by a conversion"):
        load(str(path), drafter="mtp")
    # the trunk is intact: the same logits as the full checkpoint's
    full, _ = load(str(hf_dir), drafter="none")
    tokens = mx.array([PROMPTS[2]])
    np.testing.assert_array_equal(f32(sm.target(tokens)), f32(full.target(tokens)))


def test_undeclared_head_loads_trunk_with_one_line_problem(tmp_path, model):
    path = fixture.write_model_dir(tmp_path / "undeclared", model=model, declare_mtp=False)
    sm, _ = load(str(path))
    problem = sm.target.mtp_problem
    assert sm.drafter is None and not sm.target.has_mtp and "\n" not in problem
    assert problem.startswith("checkpoint has ") and problem.endswith(
        "nextn head tensors but its config declares no MTP head (num_nextn_predict_layers is missing or 0)")


def test_glm46_layout_uses_trunk_lm_head(tmp_path, model):
    """GLM-4.6+ store neither shared_head.head nor the duplicate embed_tokens."""
    path = fixture.write_model_dir(tmp_path / "glm46", model=model, shared_head_head=False)
    keys = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith("model.layers.3.") and ("shared_head.head" in k or "embed_tokens" in k) for k in keys)
    sm, _ = load(str(path))
    target = sm.target
    assert isinstance(sm.drafter, MTPDrafter) and "head" not in target.mtp.layers[0].shared_head
    g = target.mtp(target.embed(mx.array([PROMPTS[1][1:]])), target.hidden(mx.array([PROMPTS[1][:-1]])),
                   target.make_mtp_cache())
    np.testing.assert_array_equal(f32(target.mtp_logits(g)), f32(target.logits(g)))
    plain, _, _ = run(target, PROMPTS[1], k=0, max_tokens=16)
    assert run(target, PROMPTS[1], k=3, max_tokens=16, drafter=sm.drafter)[0] == plain


# --- MLX quantized round trip through convert -----------------------------------


def test_convert_4bit_keeps_head_and_reloads(hf_dir, tmp_path):
    import mlx_lm
    from safetensors import safe_open

    from mlx_mtp.loading.convert import convert

    out = tmp_path / "q4"
    cfg = convert(hf_dir, out, bits=4, group_size=32, progress=False)
    q = cfg["quantization"]
    # the head stays at 8 bits inside a 4-bit trunk (per-layer overrides name our `mtp` modules)
    assert q["mtp.layers.0.eh_proj"]["bits"] == 8 and q["mtp.layers.0.self_attn.q_proj"]["bits"] == 8
    assert q["model.layers.1.self_attn.q_proj"]["bits"] == 4
    keys = set()
    for f in out.glob("model*.safetensors"):
        with safe_open(str(f), "numpy") as fh:
            keys |= set(fh.keys())
    layout = head_layout(cfg)
    head = {layout.local_key(k) for k in keys if layout.is_head(k)}
    assert "layers.0.mlp.switch_mlp.gate_proj.scales" in head and "layers.0.shared_head.head.scales" in head
    assert "layers.0.enorm.weight" in head and not any(".embed_tokens." in k for k in head)
    sm, _ = load(str(out))
    assert isinstance(sm.drafter, MTPDrafter)
    assert sm.target.mtp.layers[0].eh_proj.bits == 8 and sm.target.model.layers[1].self_attn.q_proj.bits == 4
    plain, _, _ = run(sm.target, PROMPTS[1], k=0, max_tokens=24)
    spec, _, stats = run(sm.target, PROMPTS[1], k=3, max_tokens=24, drafter=sm.drafter)
    assert spec == plain and stats.accepted_tokens > 0
    # plain mlx-lm still loads the trunk of what convert wrote
    lm_model, _ = mlx_lm.load(str(out))
    assert "mtp" not in lm_model
    tokens = mx.array([PROMPTS[2]])
    np.testing.assert_array_equal(f32(lm_model(tokens)), f32(sm.target(tokens)))
