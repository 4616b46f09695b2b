"""MiMo (`mimo`) target with its MTP head.

The fixture is a tiny raw-HF checkpoint laid out like XiaomiMiMo/MiMo-7B-RL
(mlx_mtp/testing/mimo.py: bf16 shards + index, the head as
`model.mtp_layers.0.*`). Checked here:

1. the layout and the head's keys (`HeadLayout`);
2. trunk parity with mlx-lm's own mimo model (same directory) and with
   transformers' Qwen2ForCausalLM, which MiMo's published modeling_mimo.py
   subclasses (same raw weights, float32);
3. the first cycle's drafts (depth 1 and 2) against an independent numpy
   head written from modeling_mimo.py's `MiMoMTPLayers` (plus vLLM's and
   SGLang's zeroed position-0 embedding): this pins the concat order
   (hidden first), which a swapped reference visibly misses;
4. the engine contract: greedy speculative == plain for k=1..4, the sampled
   distribution at temperature 1, rollback of the trunk's and the head's KV;
5. `mlx_mtp.load` on the raw directory, and on one stripped of its head.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from family_checks import (
    assert_caches_equal,
    assert_greedy_equals_plain,
    assert_head_cache_matches_fresh_pass,
    assert_loads_with_head,
    assert_sampling_matches_target,
    assert_stripped_loads_plain,
    raw_tensors,
)
from test_parity import _assert_caches_close
from test_qwen3_next import _cache_arrays, _first_cycle, _np, _rope, _run, _swiglu

from mlx_mtp import SamplingParams
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.loading.safetensors import load_target
from mlx_mtp.models import registry
from mlx_mtp.models.rollback import rollback, set_recording
from mlx_mtp.testing import mimo as fx

SEED, NOISE = 1, 1.6  # noise 1.6: the head is right ~60% of the time
PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46, 47], list(range(2, 30))]
VERIFY = [44, 8, 90, 23, 51]
#: The head's tensors in MiMo-7B's checkpoints, per layer.
HEAD_TENSORS = {
    "token_layernorm.weight", "hidden_layernorm.weight", "input_proj.weight", "final_layernorm.weight",
    "input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.down_proj.weight", "self_attn.o_proj.weight",
} | {f"self_attn.{p}_proj.{leaf}" for p in "qkv" for leaf in ("weight", "bias")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return fx.write_model_dir(tmp_path_factory.mktemp("mimo") / "model", seed=SEED, noise=NOISE)


@pytest.fixture(scope="module")
def target(model_dir):
    """Our model loaded from the raw bf16 directory, computing in float32."""
    model, _ = load_target(model_dir)
    model.set_dtype(mx.float32)
    return model


@pytest.fixture(scope="module")
def raw(model_dir) -> dict:
    """The checkpoint's tensors by their stored names, as float32 numpy."""
    return raw_tensors(model_dir)


@pytest.fixture(scope="module")
def cfg(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


# ---------------------------------------------------------------------------
# 1. Layout
# ---------------------------------------------------------------------------


def test_fixture_has_the_released_layout(model_dir, raw, cfg):
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == set(raw) and len(set(index.values())) == 2
    head = {k[len("model.mtp_layers.0."):] for k in raw if k.startswith("model.mtp_layers.")}
    assert head == HEAD_TENSORS  # no duplicate embed_tokens / lm_head
    assert all(v.dtype == mx.bfloat16 for v in mx.load(str(model_dir / sorted(set(index.values()))[0])).values())

    layout = registry.head_layout(cfg)
    assert (layout.declared_layers, layout.config_field) == (1, "num_nextn_predict_layers")
    assert layout.local_key("model.mtp_layers.0.input_proj.weight") == "layers.0.input_proj.weight"
    assert layout.local_key("mtp.layers.0.input_proj.weight") == "layers.0.input_proj.weight"  # our own output
    assert layout.local_key("model.layers.0.mlp.up_proj.weight") is None
    assert registry.head_layout({**cfg, "num_nextn_predict_layers": None}).declared_layers == 0


# ---------------------------------------------------------------------------
# 2. Trunk parity
# ---------------------------------------------------------------------------


def test_trunk_matches_mlx_lm(model_dir):
    """mlx-lm's own class on the same directory: identical trunk weights
    and identical logits (bf16, prefill + 3 cached decode steps)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import mimo as lm_mimo
    from mlx_lm.utils import load_model

    ref, _ = load_model(model_dir)
    assert type(ref) is lm_mimo.Model
    ours, _ = load_target(model_dir)
    theirs = dict(tree_flatten(ref.parameters()))
    mine = {k: v for k, v in tree_flatten(ours.parameters()) if not k.startswith("mtp.")}
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        assert mx.array_equal(mine[k], v).item(), k

    from mlx_lm.models.cache import make_prompt_cache

    c_ours, c_ref = ours.make_cache(), make_prompt_cache(ref)
    x = mx.array([PROMPTS[1]])
    for _ in range(4):
        a, b = ours(x, cache=c_ours), ref(x, cache=c_ref)
        np.testing.assert_array_equal(_np(a), _np(b))
        x = mx.argmax(b[:, -1:], axis=-1)
    np.testing.assert_array_equal(_np(ours.logits(ours.hidden(mx.array([PROMPTS[0]])))),
                                  _np(ref(mx.array([PROMPTS[0]]))))


def test_trunk_matches_transformers_qwen2(target, raw, cfg):
    """MiMoForCausalLM is Qwen2ForCausalLM plus `mtp_layers`
    (modeling_mimo.py): transformers' Qwen2 on the raw trunk weights (strict
    load, float32) gives our logits within atol 1e-4 (magnitude ~25) and
    post-norm hidden states within atol 2e-5."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    fields = {k: v for k, v in cfg.items() if k not in ("auto_map", "architectures", "model_type", "torch_dtype")}
    ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**fields)).to(torch.float32).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in raw.items() if not k.startswith("model.mtp_layers.")},
                        strict=True)
    for prompt in PROMPTS:
        with torch.no_grad():
            logits = ref(torch.tensor([prompt])).logits.numpy()
            hidden = ref.model(torch.tensor([prompt])).last_hidden_state.numpy()
        np.testing.assert_allclose(_np(target(mx.array([prompt]))), logits, atol=1e-4, rtol=0)
        np.testing.assert_allclose(_np(target.hidden(mx.array([prompt]))), hidden, atol=2e-5, rtol=0)


# ---------------------------------------------------------------------------
# 3. The head against an independent numpy implementation
# ---------------------------------------------------------------------------


def _rms(x, w, eps):
    # Qwen2RMSNorm: w * x / rms(x) (not zero-centred).
    return w * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


def _qwen2_attention(x, W, p, cfg):
    L, nh, nkv = x.shape[0], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // nh
    q = (x @ W[p + "q_proj.weight"].T + W[p + "q_proj.bias"]).reshape(L, nh, hd)
    k = (x @ W[p + "k_proj.weight"].T + W[p + "k_proj.bias"]).reshape(L, nkv, hd)
    v = (x @ W[p + "v_proj.weight"].T + W[p + "v_proj.bias"]).reshape(L, nkv, hd)
    q, k = _rope(q, hd, cfg["rope_theta"]), _rope(k, hd, cfg["rope_theta"])
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((L, L), bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", probs, v).reshape(L, nh * hd) @ W[p + "o_proj.weight"].T


def reference_head(tokens, hidden, W, cfg, hidden_first=True, zero_position_0=True):
    """modeling_mimo.py `MiMoMTPLayers.forward` on pairs (E[tokens[i]],
    hidden[i]): input_proj([hidden_layernorm(h), token_layernorm(e)]), a
    Qwen2 decoder block, final_layernorm. Position 0's embedding zeroed as
    vLLM's and SGLang's mimo_mtp.py do. `hidden_first=False` swaps the
    concat (the DeepSeek / Qwen order) to show the test would notice."""
    eps, p = cfg["rms_norm_eps"], "model.mtp_layers.0."
    e = W["model.embed_tokens.weight"][tokens].copy()
    if zero_position_0:
        e[0] = 0.0
    parts = [_rms(hidden, W[p + "hidden_layernorm.weight"], eps), _rms(e, W[p + "token_layernorm.weight"], eps)]
    x = np.concatenate(parts if hidden_first else parts[::-1], -1) @ W[p + "input_proj.weight"].T
    x = x + _qwen2_attention(_rms(x, W[p + "input_layernorm.weight"], eps), W, p + "self_attn.", cfg)
    x = x + _swiglu(_rms(x, W[p + "post_attention_layernorm.weight"], eps), W, p + "mlp.")
    return _rms(x, W[p + "final_layernorm.weight"], eps)


def _reference_logits(tokens, h, W, cfg, **kw):
    g = reference_head(tokens, h, W, cfg, **kw)
    l1 = g[-1] @ W["lm_head.weight"].T
    g2 = reference_head(tokens + [int(np.argmax(l1))], np.vstack([h, g[-1:]]), W, cfg, **kw)
    return l1, g2[-1] @ W["lm_head.weight"].T


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_first_drafts_match_numpy_reference(target, raw, cfg, prompt):
    """Depth 1 and the recursive depth 2 (the head's own post-
    `final_layernorm` state fed back, layer 0 again): logits within atol
    1e-4 of the reference's, drafts equal its argmaxes. The reference with
    the concat swapped, or without the position-0 zeroing, is off by far
    more than that tolerance."""
    first, hidden, l1, l2 = _first_cycle(target, prompt)
    h = _np(hidden)[0].astype(np.float64)
    W = {k: v.astype(np.float64) for k, v in raw.items()}
    tokens = prompt[1:] + [first]
    ref1, ref2 = _reference_logits(tokens, h, W, cfg)
    np.testing.assert_allclose(l1, ref1, atol=1e-4, rtol=0)
    np.testing.assert_allclose(l2, ref2, atol=1e-4, rtol=0)

    drafter = MTPDrafter(target)
    drafter.observe(mx.array(tokens), hidden)
    drafts, _ = drafter.draft(2, SamplingParams(), None)
    assert drafts.tolist() == [int(np.argmax(ref1)), int(np.argmax(ref2))]

    swapped, _ = _reference_logits(tokens, h, W, cfg, hidden_first=False)
    assert np.abs(swapped - l1).max() > 0.1
    unmasked, _ = _reference_logits(tokens, h, W, cfg, zero_position_0=False)
    assert np.abs(unmasked - l1).max() > 1e-3


# ---------------------------------------------------------------------------
# 4. Engine contract
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain_runs(target):
    return {tuple(p): _run(target, p, 0)[0] for p in PROMPTS}


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_speculative_equals_plain(target, plain_runs, k):
    assert_greedy_equals_plain(target, plain_runs, PROMPTS, k, _run)


def test_sampling_matches_target_distribution(target):
    """Temperature 1, top-k 3: continuations follow the target's exact joint
    distribution (family_checks.assert_sampling_matches_target)."""
    assert_sampling_matches_target(target)


@pytest.mark.parametrize("num_keep", [0, 3])
def test_recorded_pass_rolls_back_to_any_prefix(target, num_keep):
    """Rolled back after a 5-token verify pass, the KV caches equal a plain
    run of only the kept tokens (atol 1e-5)."""
    prompt = PROMPTS[1]

    def prefilled(extra=()):
        cache = target.make_cache()
        mx.eval(target(mx.array([prompt + list(extra)]), cache=cache))
        return cache

    cache = prefilled()
    set_recording(cache, True)
    mx.eval(target(mx.array([VERIFY]), cache=cache))
    set_recording(cache, False)
    rollback(cache, len(VERIFY), num_keep)
    _assert_caches_close(cache, prefilled(VERIFY[:num_keep]), atol=1e-5)


def test_rollback_after_speculative_run_leaves_plain_caches(target):
    """After a k=3 run with rejections, the trunk's KV equals plain
    decoding's, and the head's KV equals a fresh head pass over the same
    (next token, target hidden) pairs (atol 1e-4)."""
    prompt = PROMPTS[2]
    spec_cache, plain_cache, drafter = target.make_cache(), target.make_cache(), MTPDrafter(target)
    spec, stats = _run(target, prompt, 3, max_tokens=40, cache=spec_cache, drafter=drafter)
    plain, _ = _run(target, prompt, 0, max_tokens=40, cache=plain_cache)
    assert spec == plain and 0 < stats.accepted_tokens < stats.draft_tokens
    assert_caches_equal(spec_cache, plain_cache, _cache_arrays, same_offset=True)
    assert_head_cache_matches_fresh_pass(target, drafter, prompt + spec, _cache_arrays)


# ---------------------------------------------------------------------------
# 5. Loading
# ---------------------------------------------------------------------------


def test_load_raw_directory(model_dir):
    model = assert_loads_with_head(model_dir, _run, PROMPTS[0], fx.EOS_TOKEN_ID)
    assert len(model.target.mtp.layers) == 1


def test_stripped_checkpoint_loads_without_drafting(tmp_path):
    path = fx.write_model_dir(tmp_path / "stripped", seed=SEED, noise=NOISE, drop_mtp=True)
    note = assert_stripped_loads_plain(path, _run, PROMPTS[0], "stripped")
    assert "model.mtp_layers.*" in note and "num_nextn_predict_layers=1" in note


def test_head_without_declaration_is_reported(tmp_path):
    """Head tensors present but `num_nextn_predict_layers: 0`: it loads,
    plain, and says so in one line."""
    path = fx.write_model_dir(tmp_path / "undeclared", seed=SEED, noise=NOISE)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    target, _ = load_target(path)
    assert not target.has_mtp
    assert "\n" not in target.mtp_problem and "num_nextn_predict_layers is missing or 0" in target.mtp_problem
