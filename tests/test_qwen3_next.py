"""Qwen3-Next (`qwen3_next`) target with its MTP head.

The fixture is a tiny raw-HF checkpoint laid out like
Qwen/Qwen3-Next-80B-A3B-Instruct (mlx_mtp/testing/qwen3_next.py: bf16
shards + index, per-expert tensors, zero-centred norms, `mtp.*`, no field
counting the head's layers). Checked here:

1. the layout and the head's declared size (vLLM's default of one layer);
2. trunk parity with mlx-lm's own qwen3_next model (same directory) and
   with transformers' `Qwen3NextForCausalLM` (its `from_pretrained` on the
   same directory, float32);
3. the first cycle's drafts (depth 1 and 2) against an independent numpy
   head written from vLLM's qwen3_next_mtp.py / transformers' modeling code;
4. the engine contract: greedy speculative == plain for k=1..4, the sampled
   distribution at temperature 1, and rollback of every cache kind (the
   Gated-DeltaNet conv + recurrent states, attention KV, the head's KV);
5. `mlx_mtp.load` on the raw directory, and on one stripped of its head.

Numerical comparisons run in float32 (the bf16 checkpoint cast up: the
fixture's norm weights are multiples of 1/128, so the bf16 norm shift is
exact and both sides hold the same float32 weights).
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

from mlx_mtp import SamplingParams, Stats, decode
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.loading.safetensors import load_target
from mlx_mtp.models import qwen3_next, registry
from mlx_mtp.models.rollback import RecurrentCache, RollbackQwen3NextGatedDeltaNet, rollback, set_recording
from mlx_mtp.testing import qwen3_next as fx

SEED, NOISE = 1, 1.6  # noise 1.6: the head is right ~60% of the time
PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46, 47], list(range(2, 30))]
VERIFY = [44, 8, 90, 23, 51]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return fx.write_model_dir(tmp_path_factory.mktemp("qwen3-next") / "model", seed=SEED, noise=NOISE)


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


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


# ---------------------------------------------------------------------------
# 1. Layout and declared head
# ---------------------------------------------------------------------------


def test_fixture_has_the_released_layout(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) == 2 and all(f.startswith("model-0000") for f in index.values())
    # No field counts the head (as released), yet it is there, per expert.
    assert not {"num_nextn_predict_layers", "mtp_num_hidden_layers"} & set(cfg)
    for key in ("mtp.fc.weight", "mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight", "mtp.norm.weight",
                "mtp.layers.0.self_attn.q_norm.weight", "mtp.layers.0.mlp.experts.3.down_proj.weight",
                "mtp.layers.0.mlp.shared_expert_gate.weight", "model.layers.0.linear_attn.in_proj_qkvz.weight",
                "model.layers.2.mlp.experts.0.gate_proj.weight"):
        assert key in index, key
    shard = mx.load(str(model_dir / index["model.layers.0.linear_attn.conv1d.weight"]))
    conv = shard["model.layers.0.linear_attn.conv1d.weight"]
    assert conv.dtype == mx.bfloat16 and conv.shape[1] == 1  # HF's [C, 1, K]

    layout = registry.head_layout(cfg)
    assert (layout.declared_layers, layout.config_field) == (1, "num_nextn_predict_layers")
    assert layout.local_key("mtp.layers.0.mlp.gate.weight") == "layers.0.mlp.gate.weight"
    assert layout.local_key("model.layers.0.mlp.gate.weight") is None


def test_declared_layers_follow_the_config_fields():
    assert qwen3_next.declared_mtp_layers({}) == 1  # vLLM's default for Qwen3-Next
    assert qwen3_next.declared_mtp_layers({"num_nextn_predict_layers": 2}) == 2
    assert qwen3_next.declared_mtp_layers({"mtp_num_hidden_layers": 0}) == 0


# ---------------------------------------------------------------------------
# 2. Trunk parity
# ---------------------------------------------------------------------------


def test_trunk_matches_mlx_lm(model_dir):
    """mlx-lm's own class on the same directory: identical trunk weights
    and identical logits (bf16, prefill + 3 cached decode steps)."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen3_next as lm_qwen3_next
    from mlx_lm.utils import load_model

    from mlx_mtp.models.experts import fit_experts_to_device

    ref, _ = load_model(model_dir)
    assert type(ref) is lm_qwen3_next.Model
    fit_experts_to_device(ref)  # the CPU runs bf16 experts in float32, as our loader arranges
    ours, _ = load_target(model_dir)
    theirs = dict(tree_flatten(ref.parameters()))
    mine = {k: v for k, v in tree_flatten(ours.parameters()) if not k.startswith("mtp.")}
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        assert mx.array_equal(mine[k], v).item(), k

    c_ours, c_ref = ours.make_cache(), ref.make_cache()
    x = mx.array([PROMPTS[1]])
    for _ in range(4):
        a, b = ours(x, cache=c_ours), ref(x, cache=c_ref)
        np.testing.assert_array_equal(_np(a), _np(b))
        x = mx.argmax(b[:, -1:], axis=-1)
    np.testing.assert_array_equal(_np(ours.logits(ours.hidden(mx.array([PROMPTS[0]])))),
                                  _np(ref(mx.array([PROMPTS[0]]))))


def test_trunk_matches_transformers(model_dir, target):
    """transformers' Qwen3NextForCausalLM.from_pretrained on the raw
    directory (float32; every parameter found, only `mtp.*` unused): logits
    (magnitude ~25) within atol 2e-4 and post-norm hidden states within
    atol 5e-5 of ours. Measured ~2e-5 / ~4e-6 (its chunked Gated DeltaNet
    vs our recurrence)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref, info = transformers.Qwen3NextForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, output_loading_info=True
    )
    ref.eval()
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith("mtp.") for k in info["unexpected_keys"])
    for prompt in PROMPTS:
        with torch.no_grad():
            logits = ref(torch.tensor([prompt])).logits.numpy()
            hidden = ref.model(torch.tensor([prompt])).last_hidden_state.numpy()
        np.testing.assert_allclose(_np(target(mx.array([prompt]))), logits, atol=2e-4, rtol=0)
        np.testing.assert_allclose(_np(target.hidden(mx.array([prompt]))), hidden, atol=5e-5, rtol=0)


# ---------------------------------------------------------------------------
# 3. The head against an independent numpy implementation
# ---------------------------------------------------------------------------


def _rms(x, w, eps, centred=True):
    # transformers' Qwen3NextRMSNorm: x / rms(x) * (1 + w); vLLM's GemmaRMSNorm.
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return y * ((1.0 + w) if centred else w)


def _rope(x, rot, theta):
    # Rotary embedding on the first `rot` dims of each head (rotate_half form).
    L = x.shape[0]
    inv = 1.0 / theta ** (np.arange(0, rot, 2) / rot)
    f = np.arange(L)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([f, f], -1))[:, None], np.sin(np.concatenate([f, f], -1))[:, None]
    xr, xp = x[..., :rot], x[..., rot:]
    rotated = np.concatenate([-xr[..., rot // 2:], xr[..., : rot // 2]], -1)
    return np.concatenate([xr * cos + rotated * sin, xp], -1)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gated_attention(x, W, p, cfg):
    # Qwen3NextAttention: q_proj gives [q, gate] per head; q/k norms (zero-
    # centred), partial rotary, causal GQA softmax, output * sigmoid(gate).
    L, nh, nkv, hd = x.shape[0], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    qg = (x @ W[p + "q_proj.weight"].T).reshape(L, nh, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(L, nh * hd)
    k = (x @ W[p + "k_proj.weight"].T).reshape(L, nkv, hd)
    v = (x @ W[p + "v_proj.weight"].T).reshape(L, nkv, hd)
    rot = int(hd * cfg["partial_rotary_factor"])
    q = _rope(_rms(q, W[p + "q_norm.weight"], eps), rot, cfg["rope_theta"])
    k = _rope(_rms(k, W[p + "k_norm.weight"], eps), rot, cfg["rope_theta"])
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((L, L), bool))[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("hqk,khd->qhd", probs, v).reshape(L, nh * hd)
    return (out * _sigmoid(gate)) @ W[p + "o_proj.weight"].T


def _swiglu(x, W, p):
    return (_silu(x @ W[p + "gate_proj.weight"].T) * (x @ W[p + "up_proj.weight"].T)) @ W[p + "down_proj.weight"].T


def _sparse_moe(x, W, p, cfg):
    # Qwen3NextSparseMoeBlock: softmax router, top-k renormalized, experts
    # stored one tensor each, plus the sigmoid-gated shared expert.
    probs = np.exp(x @ W[p + "gate.weight"].T)
    probs /= probs.sum(-1, keepdims=True)
    top = np.argsort(-probs, axis=-1)[:, : cfg["num_experts_per_tok"]]
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        w = probs[t, top[t]]
        w = w / w.sum() if cfg["norm_topk_prob"] else w
        for e, we in zip(top[t], w):
            out[t] += we * _swiglu(x[t : t + 1], W, f"{p}experts.{e}.")[0]
    shared = _swiglu(x, W, p + "shared_expert.") * _sigmoid(x @ W[p + "shared_expert_gate.weight"].T)
    return out + shared


def reference_head(tokens, hidden, W, cfg):
    """The MTP head on pairs (E[tokens[i]], hidden[i]) from the raw HF weights
    (vLLM qwen3_next_mtp.py `Qwen3NextMultiTokenPredictor.forward`):
    fc([norm_e(E), norm_h(h)]) -> full-attention MoE layer -> norm."""
    eps = cfg["rms_norm_eps"]
    e = W["model.embed_tokens.weight"][tokens]
    x = np.concatenate([_rms(e, W["mtp.pre_fc_norm_embedding.weight"], eps),
                        _rms(hidden, W["mtp.pre_fc_norm_hidden.weight"], eps)], -1) @ W["mtp.fc.weight"].T
    p = "mtp.layers.0."
    x = x + _gated_attention(_rms(x, W[p + "input_layernorm.weight"], eps), W, p + "self_attn.", cfg)
    x = x + _sparse_moe(_rms(x, W[p + "post_attention_layernorm.weight"], eps), W, p + "mlp.", cfg)
    return _rms(x, W["mtp.norm.weight"], eps)


def _first_cycle(model, prompt):
    """(first target token, the head's depth-1 and depth-2 logits and draft
    tokens) for the engine's first cycle, with the drafter's own calls."""
    hidden = model.hidden(mx.array([prompt]))
    first = int(mx.argmax(model.logits(hidden[:, -1]), axis=-1).item())
    cache = model.make_mtp_cache()
    g = model.mtp(model.embed(mx.array([prompt[1:] + [first]])), hidden, cache)[:, -1:]
    l1 = model.mtp_logits(g)
    d1 = int(mx.argmax(l1[0, -1]).item())
    l2 = model.mtp_logits(model.mtp(model.embed(mx.array([[d1]])), g, cache))
    return first, hidden, _np(l1)[0, -1], _np(l2)[0, -1]


@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_first_drafts_match_numpy_reference(target, raw, model_dir, prompt):
    """Depth 1 and the recursive depth 2 (the head's own post-norm state fed
    back): logits within atol 1e-4 of the reference's, and the drafter's
    greedy drafts are the reference's argmaxes."""
    cfg = json.loads((model_dir / "config.json").read_text())
    first, hidden, l1, l2 = _first_cycle(target, prompt)
    h = _np(hidden)[0].astype(np.float64)
    W = {k: v.astype(np.float64) for k, v in raw.items()}
    tokens = prompt[1:] + [first]
    g = reference_head(tokens, h, W, cfg)
    ref1 = g[-1] @ W["lm_head.weight"].T
    d1 = int(np.argmax(ref1))
    g2 = reference_head(tokens + [d1], np.vstack([h, g[-1:]]), W, cfg)
    ref2 = g2[-1] @ W["lm_head.weight"].T
    np.testing.assert_allclose(l1, ref1, atol=1e-4, rtol=0)
    np.testing.assert_allclose(l2, ref2, atol=1e-4, rtol=0)

    drafter = MTPDrafter(target)
    drafter.observe(mx.array(tokens), hidden)
    drafts, _ = drafter.draft(2, SamplingParams(), None)
    assert drafts.tolist() == [d1, int(np.argmax(ref2))]


# ---------------------------------------------------------------------------
# 4. Engine contract
# ---------------------------------------------------------------------------


def _run(model, prompt, k, max_tokens=32, cache=None, drafter=None):
    stats = Stats()
    if drafter is None and k:
        drafter = MTPDrafter(model)
    tokens = [t for c in decode(model, prompt, drafter=drafter, num_draft=k, max_tokens=max_tokens, stats=stats,
                                cache=cache) for t in c.tokens]
    return tokens, stats


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


def test_layers_record_for_rollback(target):
    kinds = {type(layer.linear_attn) for layer in target.layers if layer.is_linear}
    assert kinds == {RollbackQwen3NextGatedDeltaNet}
    cache = target.make_cache()
    assert {type(c).__name__ for c in cache} == {"RecurrentCache", "KVCache"}


@pytest.mark.parametrize("num_keep", [0, 2, 5])
def test_recorded_pass_rolls_back_to_any_prefix(target, num_keep):
    """A recorded 5-token verify pass gives the plain pass's logits (atol
    1e-5); rolled back to `num_keep` tokens, every cache (conv + recurrent
    states, KV) equals a plain run of only those tokens (atol 1e-5)."""
    prompt = PROMPTS[1]

    def prefilled(extra=()):
        cache = target.make_cache()
        mx.eval(target(mx.array([prompt + list(extra)]), cache=cache))
        return cache

    plain_cache = prefilled()
    plain = target(mx.array([VERIFY]), cache=plain_cache)
    cache = prefilled()
    set_recording(cache, True)
    recorded = target(mx.array([VERIFY]), cache=cache)
    set_recording(cache, False)
    np.testing.assert_allclose(_np(recorded), _np(plain), atol=1e-5, rtol=1e-5)
    assert all(len(c.states) == len(VERIFY) for c in cache if isinstance(c, RecurrentCache))
    rollback(cache, len(VERIFY), num_keep)
    _assert_caches_close(cache, prefilled(VERIFY[:num_keep]), atol=1e-5)


def _cache_arrays(c):
    if isinstance(c, RecurrentCache):
        return [_np(x) for x in c.cache]
    return [_np(c.keys[..., : c.offset, :]), _np(c.values[..., : c.offset, :])]


def test_rollback_after_speculative_run_leaves_plain_caches(target):
    """After a k=3 run with rejections, the target's caches equal plain
    decoding's, and the head's KV equals a fresh head pass over the same
    (next token, target hidden) pairs (atol 1e-4)."""
    prompt = PROMPTS[2]
    spec_cache, plain_cache, drafter = target.make_cache(), target.make_cache(), MTPDrafter(target)
    spec, stats = _run(target, prompt, 3, max_tokens=40, cache=spec_cache, drafter=drafter)
    plain, _ = _run(target, prompt, 0, max_tokens=40, cache=plain_cache)
    assert spec == plain and 0 < stats.accepted_tokens < stats.draft_tokens
    assert_caches_equal(spec_cache, plain_cache, _cache_arrays, same_offset=False)
    assert_head_cache_matches_fresh_pass(target, drafter, prompt + spec, _cache_arrays)


# ---------------------------------------------------------------------------
# 5. Loading
# ---------------------------------------------------------------------------


def test_load_raw_directory(model_dir):
    assert_loads_with_head(model_dir, _run, PROMPTS[0], fx.EOS_TOKEN_ID)


def test_stripped_checkpoint_loads_without_drafting(tmp_path):
    path = fx.write_model_dir(tmp_path / "stripped", seed=SEED, noise=NOISE, drop_mtp=True)
    note = assert_stripped_loads_plain(path, _run, PROMPTS[0], "no mtp")
    assert "mtp.*" in note and "num_nextn_predict_layers" in note and "stripped" in note