"""Numerical parity of our Qwen3.5 target and MTP head with references.

1. Trunk vs mlx-lm's own qwen3_5 / qwen3_5_moe models (same weights).
2. Recording (verify) path of RollbackGatedDeltaNet vs the plain path, and
   `rollback` vs re-running only the kept tokens.
3. Trunk vs transformers' Qwen3_5ForCausalLM / Qwen3_5MoeForCausalLM fed our
   weights in raw HF layout (skipped without torch), and `load_target` on
   that raw checkpoint vs the in-memory model (always runs).
4. The dense MTP head vs an independent numpy implementation of
   docs/mtp-head.md#forward.

All models are tiny (hidden 64, 4 layers) and float32; tolerances are stated
at each assertion.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import qwen3_5 as lm_qwen3_5
from mlx_lm.models import qwen3_5_moe as lm_qwen3_5_moe
from mlx_lm.models.cache import KVCache

import tiny
from mlx_mtp.models.rollback import RecurrentCache, rollback, set_recording

PROMPT = [5, 17, 33, 2, 9, 61, 40, 12, 77, 3]
VERIFY = [44, 8, 90, 23, 51]  # a 5-token "verify pass" after PROMPT
VARIANTS = ["dense", "moe"]


def _config(moe: bool) -> dict:
    # mlx-lm's TextModelArgs mutates the nested rope_parameters dict in place
    # ("rope_type" -> "type"), so every consumer gets its own fresh copy.
    return copy.deepcopy(tiny.text_config(moe=moe))


def _np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


@pytest.fixture(scope="module", params=VARIANTS)
def variant(request):
    """(moe, our tiny random model) — built once per module and variant."""
    moe = request.param == "moe"
    return moe, tiny.build(_config(moe), seed=11)


# ---------------------------------------------------------------------------
# 1. Trunk parity with mlx-lm's own model
# ---------------------------------------------------------------------------


def _mlx_lm_twin(ours, moe: bool):
    """mlx-lm's model with exactly our trunk weights (strict load)."""
    mod = lm_qwen3_5_moe if moe else lm_qwen3_5
    ref = mod.Model(mod.ModelArgs.from_dict(_config(moe)))
    weights = [(k, v) for k, v in tree_flatten(ours.parameters()) if not k.startswith("mtp.")]
    ref.load_weights(weights, strict=True)
    mx.eval(ref.parameters())
    ref.eval()
    return ref


def test_trunk_matches_mlx_lm(variant):
    """Prefill + 4 single-token decode steps: our logits == mlx-lm's logits
    (atol=rtol=1e-5); also `logits(hidden(x))` == `model(x)` for ours."""
    moe, ours = variant
    ref = _mlx_lm_twin(ours, moe)
    c_ours, c_ref = ours.make_cache(), ref.make_cache()
    assert len(c_ours) == len(c_ref) == 4

    tokens = mx.array([PROMPT])
    out_ours, out_ref = ours(tokens, cache=c_ours), ref(tokens, cache=c_ref)
    assert out_ours.shape == (1, len(PROMPT), tiny.VOCAB)
    np.testing.assert_allclose(_np(out_ours), _np(out_ref), atol=1e-5, rtol=1e-5)

    for _ in range(4):
        nxt = mx.argmax(out_ref[:, -1:, :], axis=-1)
        out_ours, out_ref = ours(nxt, cache=c_ours), ref(nxt, cache=c_ref)
        np.testing.assert_allclose(_np(out_ours), _np(out_ref), atol=1e-5, rtol=1e-5)

    # The engine's split entry points compose to the plain forward.
    via_hidden = ours.logits(ours.hidden(tokens, ours.make_cache()))
    np.testing.assert_allclose(_np(via_hidden), _np(ours(tokens, cache=ours.make_cache())), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------
# 2. Recording (verify) path and rollback
# ---------------------------------------------------------------------------


def _prefilled(model, extra=()):
    cache = model.make_cache()
    out = model(mx.array([PROMPT + list(extra)]), cache=cache)
    mx.eval(out)
    return cache


def _assert_caches_close(got, want, atol):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert type(g) is type(w), i
        if isinstance(g, RecurrentCache):
            for slot in (0, 1):  # conv state [B, K-1, C], recurrent state
                assert g[slot].shape == w[slot].shape, (i, slot)
                np.testing.assert_allclose(_np(g[slot]), _np(w[slot]), atol=atol, rtol=atol, err_msg=f"layer {i} slot {slot}")
            assert not g.states and g.conv_input is None  # history dropped
        else:
            assert isinstance(g, KVCache)
            assert g.offset == w.offset, i
            gk, gv = g.keys[..., : g.offset, :], g.values[..., : g.offset, :]
            wk, wv = w.keys[..., : w.offset, :], w.values[..., : w.offset, :]
            np.testing.assert_allclose(_np(gk), _np(wk), atol=atol, rtol=atol, err_msg=f"layer {i} keys")
            np.testing.assert_allclose(_np(gv), _np(wv), atol=atol, rtol=atol, err_msg=f"layer {i} values")


def test_recording_pass_matches_plain(variant):
    """After a prefill, a recorded 5-token pass gives the plain pass's logits
    and final cache states (atol=rtol=1e-5) and one recorded state per token."""
    _, model = variant
    verify = mx.array([VERIFY])

    plain_cache = _prefilled(model)
    plain = model(verify, cache=plain_cache)

    rec_cache = _prefilled(model)
    set_recording(rec_cache, True)
    rec = model(verify, cache=rec_cache)
    set_recording(rec_cache, False)
    mx.eval(plain, rec)

    np.testing.assert_allclose(_np(rec), _np(plain), atol=1e-5, rtol=1e-5)
    recurrent = [c for c in rec_cache if isinstance(c, RecurrentCache)]
    assert len(recurrent) == 2
    for c in recurrent:
        assert len(c.states) == len(VERIFY)
        assert c.conv_input.shape[1] == len(VERIFY) + 3  # K-1 = 3 old inputs
    for g, w in zip(rec_cache, plain_cache):
        if isinstance(g, RecurrentCache):
            np.testing.assert_allclose(_np(g[0]), _np(w[0]), atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(_np(g[1]), _np(w[1]), atol=1e-5, rtol=1e-5)
        else:
            assert g.offset == w.offset == len(PROMPT) + len(VERIFY)


@pytest.mark.parametrize("num_keep", [1, 2, 3, 4, 5])
def test_rollback_equals_running_kept_prefix(variant, num_keep):
    """rollback(cache, 5, num_keep) after a recorded pass == caches from a
    plain run of only the first num_keep verify tokens (atol=rtol=1e-5), and
    the next decode step's logits agree too."""
    _, model = variant
    cache = _prefilled(model)
    set_recording(cache, True)
    mx.eval(model(mx.array([VERIFY]), cache=cache))
    set_recording(cache, False)
    rollback(cache, len(VERIFY), num_keep)

    want = _prefilled(model, VERIFY[:num_keep])
    _assert_caches_close(cache, want, atol=1e-5)

    nxt = mx.array([[30]])
    np.testing.assert_allclose(_np(model(nxt, cache=cache)), _np(model(nxt, cache=want)), atol=1e-5, rtol=1e-5)


def test_rollback_keep_zero_restores_pre_pass_state(variant):
    _, model = variant
    cache = _prefilled(model)
    set_recording(cache, True)
    mx.eval(model(mx.array([VERIFY]), cache=cache))
    set_recording(cache, False)
    rollback(cache, len(VERIFY), 0)
    _assert_caches_close(cache, _prefilled(model), atol=1e-5)


# ---------------------------------------------------------------------------
# 3. transformers reference (raw HF checkpoint) and the loader
# ---------------------------------------------------------------------------


def _hf_model(moe: bool, path):
    """transformers' Qwen3.5 text model with eager attention and eager
    (per-expert loop) MoE, holding the weights of the raw HF checkpoint at
    `path` (strict load), run in float64.

    Why float64: transformers' pure-torch chunked Gated-DeltaNet in float32 is
    itself up to ~8e-5 off its own float64 result on these random tiny models,
    which would leave the 1e-4 comparison with almost no margin. Our float32
    model is within ~2e-5 (prefill) / ~6e-5 (decode) of the float64
    reference. The weights are our float32 values exactly, widened."""
    torch = pytest.importorskip("torch")
    if moe:
        mod = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
        cfg_mod = pytest.importorskip("transformers.models.qwen3_5_moe.configuration_qwen3_5_moe")
        model_cls, cfg_cls = mod.Qwen3_5MoeForCausalLM, cfg_mod.Qwen3_5MoeTextConfig
    else:
        mod = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")
        cfg_mod = pytest.importorskip("transformers.models.qwen3_5.configuration_qwen3_5")
        model_cls, cfg_cls = mod.Qwen3_5ForCausalLM, cfg_mod.Qwen3_5TextConfig
    # The tiny text config is accepted unchanged (full_attention_interval
    # becomes layer_types; the mtp_* keys are ignored by the CausalLM).
    cfg = cfg_cls(**_config(moe), attn_implementation="eager", experts_implementation="eager")
    assert cfg.layer_types == ["linear_attention", "full_attention"] * 2

    raw = mx.load(str(path / "model.safetensors"))
    state = {}
    for key, value in raw.items():
        if key.startswith("mtp."):
            continue  # transformers has no MTP head
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model.") :]
        state[key] = torch.from_numpy(np.array(value.astype(mx.float32))).double()
    hf = model_cls(cfg).double().eval()
    hf.load_state_dict(state, strict=True)
    return torch, hf


def test_load_target_raw_checkpoint_equals_in_memory(variant, tmp_path):
    """`load_target` of our raw HF checkpoint (zero-centred norms, torch
    conv1d [C,1,K], fused MoE experts, `mtp.*` kept) reproduces the
    in-memory model: every parameter (atol=1e-6) and the logits (atol=1e-5)."""
    from mlx_mtp.loading import load_target

    moe, ours = variant
    path = tiny.save_hf_checkpoint(ours, tmp_path / "ckpt", tiny.hf_config(moe=moe), raw=True)
    loaded, _ = load_target(path)
    assert type(loaded) is type(ours)
    assert loaded.has_mtp and loaded.mtp_problem is None
    want = dict(tree_flatten(ours.parameters()))
    got = dict(tree_flatten(loaded.parameters()))
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        np.testing.assert_allclose(_np(got[key]), _np(want[key]), atol=1e-6, rtol=0, err_msg=key)
    tokens = mx.array([PROMPT])
    np.testing.assert_allclose(_np(loaded(tokens)), _np(ours(tokens)), atol=1e-5, rtol=1e-5)


def test_trunk_matches_transformers(variant, tmp_path):
    """Our raw-HF checkpoint in transformers (float64) vs our float32 model:
    post-norm hidden states and logits (atol=rtol=1e-4) for a 10-token prompt,
    then logits for 2 cached single-token decode steps (transformers'
    recurrent Gated-DeltaNet step, conv-state update and KV cache)."""
    pytest.importorskip("torch")
    moe, ours = variant
    path = tiny.save_hf_checkpoint(ours, tmp_path / "ckpt", tiny.hf_config(moe=moe), raw=True)
    torch, hf = _hf_model(moe, path)
    tokens = mx.array([PROMPT])
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        hf_hidden = hf.model(input_ids=ids, use_cache=False).last_hidden_state
        hf_logits = hf(input_ids=ids, use_cache=False).logits
    our_hidden = ours.hidden(tokens, ours.make_cache())
    np.testing.assert_allclose(_np(our_hidden), hf_hidden.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_np(ours.logits(our_hidden)), hf_logits.numpy(), atol=1e-4, rtol=1e-4)

    # Cached decoding: transformers' recurrent (single-token) Gated-DeltaNet
    # step and its KV cache vs ours.
    cache = ours.make_cache()
    mx.eval(ours(tokens, cache=cache))
    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=True)
    hf_cache = out.cache
    for _ in range(2):
        nxt = int(np.argmax(out.logits[0, -1].numpy()))
        our_out = ours(mx.array([[nxt]]), cache=cache)
        with torch.no_grad():
            out = hf(input_ids=torch.tensor([[nxt]]), cache=hf_cache, use_cache=True)
        hf_cache = out.cache
        np.testing.assert_allclose(_np(our_out), out.logits.numpy(), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# 4. MTP head vs an independent numpy implementation (docs/mtp-head.md#forward)
# ---------------------------------------------------------------------------


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, positions, rot_dims, base):
    """Non-traditional ("rotate half") RoPE on the first rot_dims features.
    x: [heads, L, head_dim]."""
    half = rot_dims // 2
    inv_freq = base ** (-np.arange(0, rot_dims, 2, dtype=np.float64) / rot_dims)
    ang = positions[:, None] * inv_freq[None, :]  # [L, half]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2, rest = x[..., :half], x[..., half:rot_dims], x[..., rot_dims:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_mtp(p, cfg, emb, hid):
    """g = mtp.norm(layer(fc([norm_e(emb), norm_h(hid)]))), positions 0..L-1.
    p: numpy float64 params keyed by their `mtp.` names; emb/hid: [L, H]."""
    eps = cfg["rms_norm_eps"]
    nh, nkv, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    rope = cfg["rope_parameters"]
    rot = int(hd * rope["partial_rotary_factor"])
    L = emb.shape[0]

    x = np.concatenate(
        [_rms(emb, p["mtp.pre_fc_norm_embedding.weight"], eps), _rms(hid, p["mtp.pre_fc_norm_hidden.weight"], eps)],
        axis=-1,
    )  # embedding half first
    x = x @ p["mtp.fc.weight"].T

    a = "mtp.layers.0.self_attn."
    h = _rms(x, p["mtp.layers.0.input_layernorm.weight"], eps)
    qg = (h @ p[a + "q_proj.weight"].T).reshape(L, nh, 2 * hd)
    q, gate = qg[..., :hd], qg[..., hd:].reshape(L, nh * hd)  # per head: (query, gate)
    k = (h @ p[a + "k_proj.weight"].T).reshape(L, nkv, hd)
    v = (h @ p[a + "v_proj.weight"].T).reshape(L, nkv, hd)
    q = _rms(q, p[a + "q_norm.weight"], eps).transpose(1, 0, 2)  # [nh, L, hd]
    k = _rms(k, p[a + "k_norm.weight"], eps).transpose(1, 0, 2)
    v = v.transpose(1, 0, 2)
    pos = np.arange(L, dtype=np.float64)
    q, k = _rope(q, pos, rot, rope["rope_theta"]), _rope(k, pos, rot, rope["rope_theta"])
    rep = nh // nkv  # GQA: query head i reads kv head i // rep
    k, v = np.repeat(k, rep, axis=0), np.repeat(v, rep, axis=0)
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((L, L), bool)), scores, -np.inf)
    w = np.exp(scores - scores.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    attn = (w @ v).transpose(1, 0, 2).reshape(L, nh * hd)
    x = x + (attn * _sigmoid(gate)) @ p[a + "o_proj.weight"].T

    m = "mtp.layers.0.mlp."
    h = _rms(x, p["mtp.layers.0.post_attention_layernorm.weight"], eps)
    x = x + (_silu(h @ p[m + "gate_proj.weight"].T) * (h @ p[m + "up_proj.weight"].T)) @ p[m + "down_proj.weight"].T
    return _rms(x, p["mtp.norm.weight"], eps)


def test_mtp_head_matches_numpy_reference():
    """Dense MTP head on 6 positions (fresh head cache) and then 3 more
    positions through the same cache: post-mtp.norm states and lm_head
    logits vs numpy float64 (atol=rtol=1e-4)."""
    cfg = _config(moe=False)
    model = tiny.build(_config(moe=False), seed=5)
    p = {k: np.array(v, dtype=np.float64) for k, v in tree_flatten(model.parameters())}
    lm_head = p["language_model.lm_head.weight"]

    seq = [7, 19, 3, 55, 81, 20, 64, 9, 33, 70]  # t_0 .. t_9
    h_all = model.hidden(mx.array([seq[:-1]]), model.make_cache())[0]  # post-norm h_0..h_8
    next_tokens = mx.array([seq[1:]])  # t_{i+1} pairs with h_i
    emb_all = model.embed(next_tokens)[0]

    want = _numpy_mtp(p, cfg, _np(emb_all).astype(np.float64), _np(h_all).astype(np.float64))
    want_logits = want @ lm_head.T

    cache = model.make_mtp_cache()
    g1 = model.mtp(emb_all[None, :6], h_all[None, :6], cache)
    np.testing.assert_allclose(_np(g1[0]), want[:6], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_np(model.logits(g1)[0]), want_logits[:6], atol=1e-4, rtol=1e-4)
    assert cache[0].offset == 6

    # Continuing through the head's own KV cache: RoPE offset 6..8.
    g2 = model.mtp(emb_all[None, 6:], h_all[None, 6:], cache)
    np.testing.assert_allclose(_np(g2[0]), want[6:], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(_np(model.logits(g2)[0]), want_logits[6:], atol=1e-4, rtol=1e-4)
    assert cache[0].offset == 9
