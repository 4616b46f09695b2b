"""DeepSeek-V3 targets with their nextn MTP head (multi-head latent attention).

The family-independent checks are written against the `family` fixture;
tests/test_glm4_moe_lite.py imports them and runs them on GLM-4.7-Flash.

- parity: the trunk equals mlx-lm's own model on the same weights, and
  transformers' model read from the same raw directory;
- the head's first-cycle drafts and logits equal a numpy forward of the
  nextn layer written from the published modeling code (MLA as
  deepseek-ai/DeepSeek-V3 inference/model.py's "naive" path, yarn rope as
  its precompute_freqs_cis, noaux_tc routing as its Gate, the nextn glue as
  SGLang's deepseek_nextn.py);
- lossless decoding: greedy speculative == plain for k = 1..4, sampling at
  temperature 1 follows the target (chi-square), caches roll back exactly;
- loading: the raw sharded bf16 directory through `mlx_mtp.load`; a
  checkpoint stripped of its head loads with a one-line problem.
"""

from __future__ import annotations

import math
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_mtp
from mlx_mtp import SamplingParams, Stats, decode
from mlx_mtp.api import DrafterUnavailableError
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.models import registry
from mlx_mtp.sampling import probabilities
from mlx_mtp.testing import deepseek as ds
from family_checks import assert_caches_equal, assert_head_cache_matches_fresh_pass
from test_sampling import chi_square_p_value

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46, 47], [88, 3, 3, 3, 71, 12]]
#: Residual-branch scale of the predictable models: the head is right about
#: half of the time, so every accepted length shows up.
NOISE = 1.6
SEED = 3


@pytest.fixture(scope="module")
def family() -> str:
    return "deepseek_v3"


@pytest.fixture(scope="module")
def cfg(family) -> dict:
    return ds.config(family)


@pytest.fixture(scope="module")
def model(cfg):
    return ds.build(cfg, seed=SEED, predictable=True, noise=NOISE)


@pytest.fixture(scope="module")
def hf(model):
    """The model's weights as the raw checkpoint names them (float32)."""
    return ds.hf_weights(model)


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory, family):
    return ds.write_model_dir(tmp_path_factory.mktemp(family) / "model", family, seed=SEED, noise=NOISE)


def run(model, prompt, k, max_tokens=40, cache=None, drafter=None, **kw):
    stats = Stats()
    if drafter is None and k:
        drafter = MTPDrafter(model)
    tokens, accepted = [], []
    for cycle in decode(model, prompt, drafter=drafter, num_draft=k, max_tokens=max_tokens, stats=stats,
                        cache=cache, **kw):
        tokens += cycle.tokens
        if cycle.drafted:
            accepted.append(cycle.accepted)
    return tokens, accepted, stats


def trunk_only(weights, cfg):
    """The trunk's tensors (layers below num_hidden_layers and the rest)."""
    L = cfg["num_hidden_layers"]
    return {k: v for k, v in weights.items() if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= L)}


# --- parity with mlx-lm and transformers ---------------------------------------


def test_trunk_matches_mlx_lm(family, cfg, model, hf):
    import importlib

    from mlx_lm.generate import generate_step

    lm = importlib.import_module(f"mlx_lm.models.{family}")
    ref = lm.Model(lm.ModelArgs.from_dict(dict(cfg)))
    # mlx-lm's DeepSeek-V3 sanitize drops the head by its released index
    # (model.layers.61), not num_hidden_layers: give it the trunk only.
    ref.load_weights(list(ref.sanitize(trunk_only(hf, cfg)).items()), strict=True)
    ref.eval()
    tokens = mx.array(PROMPTS[1])[None]
    ours = np.array(model.logits(model.hidden(tokens)))
    np.testing.assert_allclose(ours, np.array(ref(tokens)), rtol=1e-6, atol=1e-6)
    for prompt in PROMPTS[:2]:
        ours, _, _ = run(model, prompt, k=0, max_tokens=16)
        assert ours == [int(t) for t, _ in generate_step(mx.array(prompt), ref, max_tokens=16)]


def transformers_model(family, raw_dir):
    import torch
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(raw_dir, dtype=torch.float32)
    hf_model.eval()
    assert type(hf_model).__name__ == {"deepseek_v3": "DeepseekV3ForCausalLM",
                                        "glm4_moe_lite": "Glm4MoeLiteForCausalLM"}[family]
    return hf_model


def assert_transformers_parity(target, hf_model, atol: float) -> None:
    """Logits and final hidden states of our float32 target against
    transformers' on the same weights."""
    import torch

    ids = PROMPTS[1] + PROMPTS[0]
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_hidden_states=True)
    hidden = target.hidden(mx.array(ids)[None])
    np.testing.assert_allclose(np.array(hidden), out.hidden_states[-1].numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(np.array(target.logits(hidden)), out.logits.numpy(), atol=atol * 10, rtol=0)


def loaded_float32(raw_dir):
    """Our target loaded from the raw bf16 directory, computing in float32
    (bf16 -> float32 is exact, so it holds the very weights transformers reads)."""
    loaded, _ = mlx_mtp.load(raw_dir, drafter="none")
    target = loaded.target
    target.update(tree_map(lambda x: x.astype(mx.float32), target.parameters()))
    return target


def test_trunk_matches_transformers(raw_dir):
    # transformers' DeepseekV3ForCausalLM reads the same directory (its own
    # per-expert -> fused conversion; the nextn layer is ignored as
    # model.layers.61 is for the release). Tolerance: 2e-5 on hidden states
    # of size ~3, 2e-4 on logits of size ~15 (float32 on both sides; the MLA
    # is absorbed in mlx-lm for single tokens and expanded in transformers).
    # Routing agrees: both pick the top-2 groups by their top-2 biased
    # sigmoid scores and the top-k experts within them; the fixture keeps
    # every biased score positive because mlx-lm drops losing groups by
    # zeroing their scores where transformers masks them with -inf.
    assert_transformers_parity(loaded_float32(raw_dir), transformers_model("deepseek_v3", raw_dir), atol=2e-5)


# --- the head against a numpy reference -----------------------------------------


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _lin(x, w):
    return x @ w.T


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _inv_freq(cfg) -> np.ndarray:
    """RoPE inverse frequencies, yarn-corrected as DeepSeek's
    precompute_freqs_cis does when rope_scaling is yarn."""
    d, base = cfg["qk_rope_head_dim"], float(cfg["rope_theta"])
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    rs = cfg.get("rope_scaling")
    if not rs:
        return inv
    assert rs.get("type", rs.get("rope_type")) == "yarn"
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]

    def correction_dim(rotations):
        return d * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(rs["beta_slow"])), d - 1)
    ramp = np.clip((np.arange(d // 2) - low) / ((high + 0.001 if high == low else high) - low), 0, 1)
    smooth = 1 - ramp
    return inv / factor * (1 - smooth) + inv * smooth


def _softmax_scale(cfg) -> float:
    scale = (cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]) ** -0.5
    rs = cfg.get("rope_scaling") or {}
    if rs.get("mscale_all_dim") and rs["factor"] > 1:
        # yarn's cos/sin factor mscale / mscale_all_dim is 1 in the released configs
        assert rs["mscale"] == rs["mscale_all_dim"]
        m = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
        scale *= m * m
    return scale


def _rope(x, positions, inv):
    """Rotate adjacent pairs (x[2i], x[2i+1]): DeepSeek's apply_rotary_emb
    (view_as_complex over the last axis)."""
    angle = positions[:, None] * inv[None, :]
    c, s = np.cos(angle), np.sin(angle)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def _mla(x, w, p, cfg):
    S, nh = x.shape[0], cfg["num_attention_heads"]
    nope, rope, vd, r = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    # The latent norms use rms_norm_eps, as vLLM's DeepseekV2 MLA (which
    # serves both families) builds them; for DeepSeek-V3 it is 1e-6, the
    # default of DeepSeek's own RMSNorm.
    eps = cfg["rms_norm_eps"]
    positions = np.arange(S, dtype=np.float64)
    inv = _inv_freq(cfg)
    q = _lin(_rms(_lin(x, w[p + "q_a_proj.weight"]), w[p + "q_a_layernorm.weight"], eps), w[p + "q_b_proj.weight"])
    q = q.reshape(S, nh, nope + rope)
    q_nope, q_pe = q[..., :nope], _rope(q[..., nope:].transpose(1, 0, 2), positions, inv).transpose(1, 0, 2)
    kv = _lin(x, w[p + "kv_a_proj_with_mqa.weight"])
    latent, k_pe = kv[:, :r], _rope(kv[:, r:], positions, inv)
    kv = _lin(_rms(latent, w[p + "kv_a_layernorm.weight"], eps), w[p + "kv_b_proj.weight"]).reshape(S, nh, nope + vd)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    scores = (np.einsum("shd,thd->hst", q_nope, k_nope) + np.einsum("shr,tr->hst", q_pe, k_pe)) * _softmax_scale(cfg)
    scores = np.where(np.tril(np.ones((S, S), bool)), scores, -np.inf)
    attn = np.exp(scores - scores.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    return _lin(np.einsum("hst,thd->shd", attn, v).reshape(S, nh * vd), w[p + "o_proj.weight"])


def _mlp(x, w, p):
    return _lin(_silu(_lin(x, w[p + "gate_proj.weight"])) * _lin(x, w[p + "up_proj.weight"]), w[p + "down_proj.weight"])


def _moe(x, w, p, cfg):
    """noaux_tc routing as DeepSeek's Gate: sigmoid scores, biased for the
    choice only, groups ranked by their top-2 biased scores."""
    scores = 1.0 / (1.0 + np.exp(-_lin(x, w[p + "gate.weight"])))
    biased = scores + w[p + "gate.e_score_correction_bias"]
    groups = cfg["n_group"]
    if groups > 1:
        grouped = biased.reshape(x.shape[0], groups, -1)
        group_scores = np.sort(grouped, axis=-1)[..., -2:].sum(-1)
        keep = np.argsort(-group_scores, axis=-1)[:, : cfg["topk_group"]]
        mask = np.ones_like(group_scores, bool)
        np.put_along_axis(mask, keep, False, axis=-1)
        biased = np.where(mask[..., None], -np.inf, grouped).reshape(x.shape[0], -1)
    top = np.argsort(-biased, axis=-1)[:, : cfg["num_experts_per_tok"]]
    weights = np.take_along_axis(scores, top, axis=-1)
    if cfg["norm_topk_prob"]:
        weights = weights / weights.sum(-1, keepdims=True)
    weights = weights * cfg["routed_scaling_factor"]
    y = np.zeros_like(x)
    for s in range(x.shape[0]):
        for e, wt in zip(top[s], weights[s]):
            y[s] += wt * _mlp(x[s : s + 1], w, f"{p}experts.{e}.")[0]
    return y + _mlp(x, w, p + "shared_experts.")


def reference_head(w, cfg, next_tokens, hidden):
    """(post-shared_head.norm states, logits) of the nextn layer over every
    position, recomputed from scratch (no cache)."""
    p = f"model.layers.{cfg['num_hidden_layers']}."
    eps = cfg["rms_norm_eps"]
    e = w[p + "embed_tokens.weight"][np.asarray(next_tokens)]  # the layer's own copy, equal to the trunk's
    x = _lin(np.concatenate([_rms(e, w[p + "enorm.weight"], eps), _rms(hidden, w[p + "hnorm.weight"], eps)], -1),
             w[p + "eh_proj.weight"])
    h = x + _mla(_rms(x, w[p + "input_layernorm.weight"], eps), w, p + "self_attn.", cfg)
    h = h + _moe(_rms(h, w[p + "post_attention_layernorm.weight"], eps), w, p + "mlp.", cfg)
    g = _rms(h, w[p + "shared_head.norm.weight"], eps)
    return g, _lin(g, w[p + "shared_head.head.weight"])


class RecordingHead:
    """The model as MTPDrafter sees it, recording every head logits row."""

    def __init__(self, model):
        self._model = model
        self.logits = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def mtp_logits(self, state):
        out = self._model.mtp_logits(state)
        self.logits.append(np.array(out[0, -1]).astype(np.float64))
        return out


@pytest.fixture(scope="module")
def random_model(cfg):
    """Random weights throughout, head norms included: with the predictable
    model's all-ones head norms, feeding back the state before or after
    shared_head.norm would give the same drafts (hnorm rescales either)."""
    return ds.build(cfg, seed=SEED + 1)


@pytest.mark.parametrize("k", [1, 4])
def test_first_cycle_drafts_match_numpy_reference(cfg, random_model, k):
    model = random_model
    w = {name: np.array(v).astype(np.float64) for name, v in ds.hf_weights(model).items()}
    for prompt in PROMPTS[:2]:
        recorder = RecordingHead(model)
        spec, _, _ = run(model, prompt, k, max_tokens=k + 2, drafter=MTPDrafter(recorder))
        drafted = [int(np.argmax(row)) for row in recorder.logits[:k]]
        # Reference: the pairs (E[t_{i+1}], h_i) of the prompt and the first
        # sampled token, then each draft fed back with the head's own state.
        hidden = np.array(model.hidden(mx.array(prompt)[None])[0]).astype(np.float64)
        tokens, states = prompt[1:] + [spec[0]], list(hidden)
        for j in range(k):
            g, logits = reference_head(w, cfg, tokens, np.stack(states))
            scale = np.abs(logits[-1]).max()
            np.testing.assert_allclose(recorder.logits[j], logits[-1], atol=1e-5 * scale, rtol=0)
            assert drafted[j] == int(np.argmax(logits[-1]))
            tokens.append(drafted[j])
            states.append(g[-1])


# --- lossless decoding -----------------------------------------------------------


def test_greedy_speculative_equals_plain(model):
    plain = {tuple(p): run(model, p, k=0)[0] for p in PROMPTS}
    for k in (1, 2, 3, 4):
        accepted = drafted = 0
        seen = set()
        for prompt in PROMPTS:
            spec, lengths, stats = run(model, prompt, k=k)
            assert spec == plain[tuple(prompt)], f"k={k} prompt={prompt}"
            assert stats.host_syncs_per_cycle == 1.0
            accepted += stats.accepted_tokens
            drafted += stats.draft_tokens
            seen |= set(lengths)
        # Acceptances and rejections both, or the comparison means little.
        assert 0 < accepted < drafted, k
        if k <= 3:
            assert seen == set(range(k + 1)), (k, seen)


def test_sampling_at_temperature_1_follows_the_target(model):
    """Each emitted token, given what came before, must follow the target's
    temperature-1 distribution. Randomized probability integral transform:
    u = P(token < t) + U * P(t), U ~ Uniform(0, 1) independent, is uniform
    and independent across positions exactly when every token follows the
    target (whatever the drafts were). Bound: Pearson chi-square over 10
    equal bins of 480 values, p-value > 1e-3 (test_sampling's helper);
    fixed seeds, so deterministic."""
    params = SamplingParams(temp=1.0)
    rng = np.random.default_rng(0)
    u, accepted, drafted = [], 0, 0
    for seed, prompt in enumerate(PROMPTS):
        out, _, stats = run(model, prompt, k=3, max_tokens=160, params=params, seed=seed)
        accepted += stats.accepted_tokens
        drafted += stats.draft_tokens
        sequence = prompt + out
        hidden = model.hidden(mx.array(sequence[:-1])[None])[:, len(prompt) - 1 :, :]
        p = np.array(probabilities(model.logits(hidden)[0], params)).astype(np.float64)
        for token, row in zip(out, p):
            u.append(row[:token].sum() + rng.uniform() * row[token])
    assert 0 < accepted < drafted  # the residual distribution is exercised
    bins = Counter(min(int(x * 10), 9) for x in u)
    assert chi_square_p_value(bins, {b: 0.1 for b in range(10)}, len(u)) > 1e-3


def _cache_arrays(c):
    return [np.array(c.keys[..., : c.offset, :]), np.array(c.values[..., : c.offset, :])]


def test_rollback_leaves_plain_caches(cfg, model):
    """MLA caches the compressed latents (keys [1, 1, T, kv_lora_rank], values
    the rotated k_pe [1, 1, T, qk_rope_head_dim]); trimming them rolls the
    target and the head back exactly."""
    prompt = PROMPTS[2]
    spec_cache, plain_cache = model.make_cache(), model.make_cache()
    drafter = MTPDrafter(model)
    spec, _, stats = run(model, prompt, k=3, cache=spec_cache, drafter=drafter)
    plain, _, _ = run(model, prompt, k=0, cache=plain_cache)
    assert spec == plain and 0 < stats.accepted_tokens < stats.draft_tokens
    for a in spec_cache:
        assert a.offset == len(prompt) + len(spec) - 1
        assert a.keys.shape[-1] == cfg["kv_lora_rank"] and a.values.shape[-1] == cfg["qk_rope_head_dim"]
    assert_caches_equal(spec_cache, plain_cache, _cache_arrays)
    # The head's cache equals a fresh head run over the same pairs.
    assert_head_cache_matches_fresh_pass(model, drafter, prompt + spec, _cache_arrays)


# --- loading ------------------------------------------------------------------------


def test_raw_directory_loads_with_its_head(cfg, model, raw_dir):
    import json

    index = json.loads((raw_dir / "model.safetensors.index.json").read_text())["weight_map"]
    L = cfg["num_hidden_layers"]
    assert f"model.layers.{L}.embed_tokens.weight" in index and f"model.layers.{L}.shared_head.head.weight" in index
    assert f"model.layers.{L}.mlp.experts.0.gate_proj.weight" in index
    assert f"model.layers.{L}.self_attn.kv_b_proj.weight" in index
    assert len(set(index.values())) == 3 and all((raw_dir / f).is_file() for f in index.values())

    loaded, _ = mlx_mtp.load(raw_dir)
    target = loaded.target
    assert isinstance(loaded.drafter, MTPDrafter) and loaded.drafter_note is None and target.mtp_problem is None
    # Every parameter, head included, is the built one as stored (bf16,
    # routers' correction bias float32): stacking, the kv_b_proj split and
    # dropping the head's embed_tokens copy lose nothing. (On the CPU backend
    # the experts hold those bf16 values in float32: models/experts.py.)
    ours, built = dict(tree_flatten(target.parameters())), dict(tree_flatten(model.parameters()))
    assert ours.keys() == built.keys()
    for name, value in ours.items():
        stored = mx.float32 if name.endswith(ds.FLOAT32_TENSORS) else mx.bfloat16
        assert value.dtype == stored or (".switch_mlp." in name and value.dtype == mx.float32), name
        assert mx.array_equal(value, built[name].astype(stored)), name
    plain, _, _ = run(target, PROMPTS[0], k=0, max_tokens=16)
    spec, _, _ = run(target, PROMPTS[0], k=3, max_tokens=16, drafter=loaded.drafter)
    assert spec == plain


def test_stripped_checkpoint_loads_with_one_line_problem(tmp_path, cfg, family):
    path = ds.write_model_dir(tmp_path / "stripped", family, seed=SEED, noise=NOISE, drop_mtp=True)
    loaded, _ = mlx_mtp.load(path)
    L = cfg["num_hidden_layers"]
    problem = loaded.target.mtp_problem
    assert problem == (f"config declares num_nextn_predict_layers=1 but the checkpoint has no model.layers.{L}.* "
                       "weights (they were stripped by a conversion)")
    assert loaded.drafter is None and loaded.drafter_note == f"{problem}; plain decoding"
    assert not loaded.target.has_mtp
    with pytest.raises(DrafterUnavailableError) as err:
        mlx_mtp.load(path, drafter="mtp")
    assert "\n" not in str(err.value) and problem in str(err.value)
    assert len(run(loaded.target, PROMPTS[0], k=0, max_tokens=8)[0]) == 8


def test_head_without_config_field_is_a_one_line_problem(cfg, hf):
    """A config that leaves num_nextn_predict_layers out declares no head
    (GLM's mlx-lm args would default it to 1; ours say 0), so a checkpoint
    that has one loads its trunk and names the mismatch."""
    bare = {k: v for k, v in cfg.items() if k != "num_nextn_predict_layers"}
    model_class, args_class = ds.model_classes(bare)
    target = model_class(args_class.from_dict(bare))
    target.load_weights(list(target.sanitize(dict(hf)).items()), strict=True)
    head_tensors = len(hf) - len(trunk_only(hf, cfg))
    assert target.mtp_problem == (f"checkpoint has {head_tensors} nextn head tensors but its config declares "
                                  "no MTP head (num_nextn_predict_layers is missing or 0)")
    assert not target.has_mtp
    layout = registry.head_layout(cfg)
    L = cfg["num_hidden_layers"]
    assert layout.declared_layers == 1 and layout.config_field == "num_nextn_predict_layers"
    assert layout.local_key(f"model.layers.{L}.eh_proj.weight") == "layers.0.eh_proj.weight"
    assert layout.local_key(f"model.layers.{L - 1}.mlp.gate.weight") is None


# --- DeepSeek-V3 only: the head gets the trunk's FP8 / int4 treatment ------------------


def test_head_experts_are_stacked_although_layer_0_is_dense(model, hf, cfg):
    """nextn.py sanitizes the head posing as layer 0, which is dense here
    (first_k_dense_replace=1; 3 in the release): mlx-lm stacks experts by
    which keys exist, so the MoE head still gets them stacked."""
    from mlx_lm.models import deepseek_v3 as lm

    assert isinstance(model.model.layers[0].mlp, lm.DeepseekV3MLP)
    assert isinstance(model.mtp.layers[0].mlp, lm.DeepseekV3MoE)
    out = model.sanitize(dict(hf))
    L = cfg["num_hidden_layers"]
    stacked = out["mtp.layers.0.mlp.switch_mlp.gate_proj.weight"]
    assert stacked.shape[0] == cfg["n_routed_experts"]
    for e in range(cfg["n_routed_experts"]):
        assert mx.array_equal(stacked[e], hf[f"model.layers.{L}.mlp.experts.{e}.gate_proj.weight"])
    assert not any(".experts." in k or "kv_b_proj" in k or "embed_tokens" in k[4:] for k in out if k.startswith("mtp."))


def test_fp8_and_int4_head_tensors_are_decoded_like_the_trunk(tmp_path, cfg, hf):
    import json

    from mlx_mtp.loading.fp8 import FP8_DTYPE, dequantize
    from mlx_mtp.testing import write_tokenizer
    from mlx_mtp.testing.fp8 import encode, retag

    # FP8 as the released repo stores it: 128x128 blocks, float32
    # weight_scale_inv; embeddings, heads, norms and routers stay bf16.
    keep = ("embed_tokens", "lm_head", "shared_head.head", "norm", "mlp.gate.")
    block = (128, 128)
    fp8, reference = {}, {}
    for name, value in hf.items():
        if name.endswith(".weight") and value.ndim == 2 and not any(part in name for part in keep):
            codes, scale = encode(value, block)
            scale = scale.astype(mx.float32)
            fp8[name], fp8[name + "_scale_inv"] = codes, scale
            reference[name] = dequantize(codes, scale, block, name)
        else:
            fp8[name] = reference[name] = value
    model_class, args_class = ds.model_classes(cfg)
    decoded = model_class(args_class.from_dict(dict(cfg))).sanitize(fp8)
    expected = model_class(args_class.from_dict(dict(cfg))).sanitize(reference)
    assert decoded.keys() == expected.keys() and not any("scale_inv" in k for k in decoded)
    fp8_head = ("mtp.layers.0.eh_proj.weight", "mtp.layers.0.self_attn.q_a_proj.weight",
                "mtp.layers.0.self_attn.embed_q.weight", "mtp.layers.0.mlp.switch_mlp.down_proj.weight")
    for name in fp8_head:  # mlx-lm's own FP8 decoding, as mlx-lm's loader would run it
        assert decoded[name].dtype == mx.bfloat16
        assert mx.array_equal(decoded[name], expected[name]), name

    # mlx-mtp's loader decodes FP8 repos itself (loading/fp8.py: mx.load
    # hands F8_E4M3 back as raw bytes) before sanitize: the head too.
    path = tmp_path / "fp8"
    path.mkdir()
    codes = [k for k in fp8 if k + "_scale_inv" in fp8]
    stored = {k: v if k in codes or k.endswith("_scale_inv") else ds.released_dtypes({k: v})[k] for k, v in fp8.items()}
    mx.save_safetensors(str(path / "model.safetensors"), stored, metadata={"format": "pt"})
    retag(path / "model.safetensors", {k: FP8_DTYPE for k in codes})
    quantization = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": list(block)}  # as README_WEIGHTS.md shows it
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": quantization}))
    write_tokenizer(path)
    loaded, _ = mlx_mtp.load(path)
    assert loaded.target.has_mtp and isinstance(loaded.drafter, MTPDrafter)
    params = dict(tree_flatten(loaded.target.parameters()))
    for name in fp8_head:
        assert mx.array_equal(params[name], expected[name]), name

    # int4 (compressed-tensors packing, as Kimi-K2 ships it): the head's
    # tensors get mlx-lm's remap to weight / scales / biases too.
    L = cfg["num_hidden_layers"]
    base = f"model.layers.{L}.eh_proj."
    out_dim, in_dim = hf[base + "weight"].shape
    int4 = {k: v for k, v in hf.items() if not k.startswith(base)}
    int4[base + "weight_packed"] = mx.zeros((out_dim, in_dim // 8), mx.int32)
    int4[base + "weight_scale"] = mx.ones((out_dim, in_dim // 32), mx.bfloat16)
    int4[base + "weight_shape"] = mx.array([out_dim, in_dim], mx.int32)
    out = model_class(args_class.from_dict(dict(cfg))).sanitize(int4)
    assert out["mtp.layers.0.eh_proj.weight"].dtype == mx.uint32
    assert mx.array_equal(out["mtp.layers.0.eh_proj.biases"], -8 * out["mtp.layers.0.eh_proj.scales"])
