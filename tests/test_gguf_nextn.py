"""GGUF loading of glm4moe (GLM-4.5) and deepseek2 (DeepSeek-V3, GLM-4.7-Flash)
files with their nextn MTP block, written by mlx_mtp.testing.gguf_nextn the
way llama.cpp's converter writes them.

The loaded model must compute what the float source model computes on the
same stored values (logits and head drafts), decode greedily the same with
and without speculation, and leave the caches plain decoding leaves. Files
without the block load with drafting off; bad files give one-line errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_mtp import Stats, decode, load
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.loading import CheckpointError
from mlx_mtp.loading.gguf import load_gguf_target, read_gguf
from mlx_mtp.loading.gguf.deepseek2 import split_kv_b
from mlx_mtp.sampling import SamplingParams
from mlx_mtp.testing.gguf_nextn import CONFIGS, build_nextn_model, write_nextn_gguf

FAMILIES = ["glm4_moe", "deepseek_v3", "glm4_moe_lite"]
ARCH = {"glm4_moe": "glm4moe", "deepseek_v3": "deepseek2", "glm4_moe_lite": "deepseek2"}
PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45], [88, 3, 3, 3, 71, 12, 60]]
PROMPT = mx.array([PROMPTS[0]])
# Largest |difference| allowed between the loaded model's logits and the
# float source holding the same (decoded) values. F32 and F16 values are
# exact and every matmul runs in float32 (the norms are stored F32), so they
# must agree bit for bit; Q8_0 runs MLX's quantized matmul on the repacked
# blocks, which may sum in another order than a float matmul.
TOLERANCE = {"F32": 0.0, "F16": 0.0, "Q8_0": 1e-4}


def source(family, seed=1, **overrides):
    config = CONFIGS[family](**overrides)
    return build_nextn_model(config, seed=seed, noise=1.6), config


def write(tmp_path, family, qtype="F32", name="model.gguf", seed=1, config_overrides=None, **kw):
    """(GGUF path, float source model holding the stored values, config)."""
    model, config = source(family, seed, **(config_overrides or {}))
    path = tmp_path / name
    stored = write_nextn_gguf(model, config, path, qtype=qtype, **kw)
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in stored.items()]))
    return path, model, config


def outputs(m, depth=2):
    """Trunk logits, then the head's logits for `depth` chained steps (step
    j > 1 feeds back the head's own state, as the drafter does)."""
    h = m.hidden(PROMPT)
    out = [np.array(m.logits(h))]
    cache = m.make_mtp_cache()
    g = m.mtp(m.embed(PROMPT), h, cache)
    out.append(np.array(m.mtp_logits(g)))
    for _ in range(depth - 1):
        token = mx.argmax(m.mtp_logits(g[:, -1:]), axis=-1)
        g = m.mtp(m.embed(token), g[:, -1:], cache)
        out.append(np.array(m.mtp_logits(g)))
    return out


def first_drafts(m, k=3):
    """The drafter's first k greedy drafts after reading the prompt."""
    drafter = MTPDrafter(m)
    h = m.hidden(PROMPT)
    drafter.observe(mx.array(PROMPTS[0][1:] + [int(mx.argmax(m.logits(h)[0, -1]))]), h)
    tokens, _ = drafter.draft(k, SamplingParams(), None)
    return [int(t) for t in tokens]


def run(model, prompt, k, max_tokens=40, cache=None, drafter=None):
    stats = Stats()
    if drafter is None and k:
        drafter = MTPDrafter(model)
    tokens = []
    for cycle in decode(model, prompt, drafter=drafter, num_draft=k, max_tokens=max_tokens, stats=stats, cache=cache):
        tokens += cycle.tokens
    return tokens, stats


@pytest.mark.parametrize("qtype", list(TOLERANCE))
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_computes_what_the_source_computes(tmp_path, family, qtype):
    path, ref, config = write(tmp_path, family, qtype)
    model, loaded_config, ckpt = load_gguf_target(path)
    assert ckpt.arch == ARCH[family] and loaded_config["model_type"] == family
    assert model.has_mtp and model.mtp_problem is None
    assert loaded_config["num_nextn_predict_layers"] == 1
    assert loaded_config["num_hidden_layers"] == config["num_hidden_layers"]  # block_count counted the head
    if qtype == "Q8_0":
        quantized = [p for p, m in model.named_modules() if hasattr(m, "scales")]
        assert any(p.startswith("mtp.layers.0.mlp.switch_mlp") for p in quantized)
        if family != "glm4_moe":  # MLA's per-head k_b / v_b stay packed too
            assert "model.layers.1.self_attn.embed_q" in quantized and "mtp.layers.0.self_attn.unembed_out" in quantized
    for a, b in zip(outputs(model), outputs(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE[qtype])
    assert first_drafts(model) == first_drafts(ref)


@pytest.mark.parametrize("family,overrides", [
    ("glm4_moe", {"use_qk_norm": True, "attention_bias": False}),  # GLM-4.5 (355B): q/k norms, no biases
    ("deepseek_v3", {"q_lora_rank": None}),  # no q compression: attn_q instead of attn_q_a / attn_q_b
])
def test_variants(tmp_path, family, overrides):
    path, ref, _ = write(tmp_path, family, config_overrides=overrides)
    model, config, _ = load_gguf_target(path)
    assert {k: config[k] for k in overrides} == overrides
    for a, b in zip(outputs(model), outputs(ref)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_config_from_metadata_matches_the_released_fields(tmp_path, family):
    path, _, config = write(tmp_path, family)
    loaded = read_gguf(path).config
    keys = ["hidden_size", "intermediate_size", "num_attention_heads", "n_routed_experts", "num_experts_per_tok",
            "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace", "routed_scaling_factor",
            "norm_topk_prob", "n_group", "topk_group", "rms_norm_eps", "rope_theta", "vocab_size",
            "max_position_embeddings", "num_nextn_predict_layers"]
    if family == "glm4_moe":
        keys += ["num_key_value_heads", "head_dim", "partial_rotary_factor", "attention_bias", "use_qk_norm"]
    else:
        keys += ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "num_key_value_heads"]
    assert {k: loaded[k] for k in keys} == pytest.approx({k: config[k] for k in keys})
    # every stop id of the tokenizer metadata, the config's EOS among them
    assert config["eos_token_id"] in np.atleast_1d(loaded["eos_token_id"]).tolist()


def test_mlx_lm_parity(tmp_path):
    """The GGUF-loaded trunk equals mlx-lm's own deepseek_v3 model holding
    the same weights, loaded through mlx-lm's sanitize from the HF layout
    (kv_b_proj unsplit): the converter's split of kv_b into k_b / v_b lands
    where mlx-lm's own split puts it."""
    from mlx_lm.models import deepseek_v3 as lm

    path, ref, config = write(tmp_path, "deepseek_v3", kv_b="split")
    model, _, _ = load_gguf_target(path)
    params = dict(tree_flatten(ref.parameters()))
    hf = {}
    for name, value in params.items():
        if name.startswith("mtp.") or name.endswith("unembed_out.weight"):
            continue
        if name.endswith("embed_q.weight"):  # back to HF's kv_b_proj [heads*(nope+v), kv_lora]
            v = params[name.replace("embed_q", "unembed_out")]
            name = name.replace("embed_q", "kv_b_proj")
            value = mx.concatenate([value.swapaxes(-1, -2), v], axis=1).reshape(-1, value.shape[1])
        hf[name] = value
    lm_model = lm.Model(lm.ModelArgs.from_dict(config))
    lm_model.load_weights(list(lm_model.sanitize(hf).items()), strict=True)
    np.testing.assert_array_equal(np.array(lm_model(PROMPT)), np.array(model.logits(model.hidden(PROMPT))))


def test_kv_b_split_matches_the_converter():
    """llama.cpp's DeepseekV2Model.modify_tensors (conversion/deepseek.py):
    kv_b.view(heads, nope + v, kv_lora), split [nope, v] on dim 1, k_b
    transposed (1, 2). Those tensors are mlx-lm's embed_q / unembed_out, and
    an old file's unsplit kv_b splits to the same."""
    import torch

    heads, nope, v, kv_lora = 3, 4, 5, 6
    kv_b = np.random.default_rng(0).standard_normal((heads * (nope + v), kv_lora)).astype(np.float32)
    t = torch.from_numpy(kv_b).view(heads, nope + v, kv_lora)
    k_b, v_b = torch.split(t, [nope, v], dim=1)
    k_b = k_b.transpose(1, 2)
    wk, wv = split_kv_b(kv_b, heads, nope, v)
    np.testing.assert_array_equal(wk, k_b.numpy())
    np.testing.assert_array_equal(wv, v_b.numpy())


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3"])
def test_greedy_speculative_equals_plain(tmp_path, family):
    path, _, _ = write(tmp_path, family, "Q8_0", seed=3)
    model, _, _ = load_gguf_target(path)
    accepted = drafted = 0
    for prompt in PROMPTS:
        plain, _ = run(model, prompt, 0)
        for k in (1, 2, 3):
            spec, stats = run(model, prompt, k)
            assert spec == plain, f"k={k} prompt={prompt}"
            assert stats.host_syncs_per_cycle == 1.0
            accepted += stats.accepted_tokens
            drafted += stats.draft_tokens
    assert 0 < accepted < drafted  # both acceptances and rejections happened


@pytest.mark.parametrize("family", ["glm4_moe_lite"])
def test_rollback_leaves_plain_caches(tmp_path, family):
    path, _, _ = write(tmp_path, family, "F16", seed=3)
    model, _, _ = load_gguf_target(path)
    prompt = PROMPTS[2]
    spec_cache, plain_cache = model.make_cache(), model.make_cache()
    drafter = MTPDrafter(model)
    spec, stats = run(model, prompt, 3, cache=spec_cache, drafter=drafter)
    plain, _ = run(model, prompt, 0, cache=plain_cache)
    assert spec == plain and 0 < stats.accepted_tokens < stats.draft_tokens
    for a, b in zip(spec_cache, plain_cache):
        assert a.offset == b.offset
        for x, y in ((a.keys, b.keys), (a.values, b.values)):
            np.testing.assert_allclose(np.array(x[..., : a.offset, :]), np.array(y[..., : b.offset, :]),
                                       rtol=1e-4, atol=1e-5)
    sequence = prompt + spec
    ref_cache = model.make_mtp_cache()
    model.mtp(model.embed(mx.array(sequence[1:])[None]), model.hidden(mx.array(sequence[:-1])[None]), ref_cache)
    for a, b in zip(drafter.cache, ref_cache):
        assert a.offset == b.offset == len(sequence) - 1
        np.testing.assert_allclose(np.array(a.keys[..., : a.offset, :]), np.array(b.keys[..., : b.offset, :]),
                                   rtol=1e-4, atol=1e-4)


def test_optional_head_tensors_fall_back_as_llama_cpp(tmp_path):
    """Without nextn.shared_head_head / shared_head_norm (GLM-4.6 and later
    leave the former out) the head uses output / output_norm."""
    path, ref, _ = write(tmp_path, "glm4_moe", shared_head=False)
    model, _, _ = load_gguf_target(path)
    assert model.has_mtp
    np.testing.assert_array_equal(np.array(model.mtp.layers[0].shared_head.head.weight), np.array(model.lm_head.weight))
    for a, b in zip(outputs(model), outputs(ref)):
        np.testing.assert_array_equal(a, b)


def test_fused_gate_up_experts(tmp_path):
    path, ref, _ = write(tmp_path, "glm4_moe", "Q8_0", fuse_gate_up=True)
    assert any(t.name == "blk.2.ffn_gate_up_exps.weight" for t in read_gguf(path).reader.tensors)
    model, _, _ = load_gguf_target(path)
    assert model.mtp.layers[0].mlp.switch_mlp.gate_proj.bits == 8  # split without dequantizing
    for a, b in zip(outputs(model), outputs(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOLERANCE["Q8_0"])


# glm4_moe Q8_0: its head's q/k/v have biases, which the GGUF source streams
# apart from the quantized weights (convert once marked such modules float).
@pytest.mark.parametrize("family,qtype", [("deepseek_v3", "Q8_0"), ("glm4_moe", "F32"), ("glm4_moe", "Q8_0")])
def test_convert_to_mlx_keeps_the_head(tmp_path, family, qtype):
    """`mlx-mtp convert` of a GGUF: the MLX checkpoint loads with its head and
    computes what the GGUF does."""
    from mlx_mtp.loading import load_target
    from mlx_mtp.loading.convert import convert

    path, _, _ = write(tmp_path, family, qtype)
    convert(str(path), tmp_path / "mlx", progress=False)
    converted, _ = load_target(tmp_path / "mlx")
    model, _, _ = load_gguf_target(path)
    assert converted.has_mtp
    for a, b in zip(outputs(converted), outputs(model)):
        np.testing.assert_array_equal(a, b)


def test_old_fused_kv_b_file(tmp_path):
    split_path, ref, _ = write(tmp_path, "deepseek_v3", name="split.gguf")
    fused_path, _, _ = write(tmp_path, "deepseek_v3", name="fused.gguf", kv_b="fused")
    assert any(t.name == "blk.0.attn_kv_b.weight" for t in read_gguf(fused_path).reader.tensors)
    split, _, _ = load_gguf_target(split_path)
    fused, _, _ = load_gguf_target(fused_path)
    for a, b in zip(outputs(fused), outputs(split)):
        np.testing.assert_array_equal(a, b)


def test_yarn_rope_scaling_round_trips(tmp_path):
    """DeepSeek-V3's YaRN settings, stored as rope.scaling.* plus
    yarn_log_multiplier = 0.1 * mscale_all_dim, come back as its config's."""
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
    path, ref, _ = write(tmp_path, "deepseek_v3", config_overrides={"rope_scaling": yarn})
    model, config, _ = load_gguf_target(path)
    assert config["rope_scaling"] == pytest.approx(yarn)
    for a, b in zip(outputs(model), outputs(ref)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,layout", [("deepseek_v3", "no-mtp"), ("glm4_moe_lite", "trunk"),
                                           ("glm4_moe", "no-mtp")])
def test_file_without_nextn_block_loads_with_drafting_off(tmp_path, family, layout):
    path, ref, _ = write(tmp_path, family, layout=layout)
    model, config, _ = load_gguf_target(path)
    assert not model.has_mtp and config["num_nextn_predict_layers"] == 0
    reason = model.mtp_problem
    assert reason and "\n" not in reason and "nextn" in reason
    with pytest.raises(ValueError, match="nextn"):
        MTPDrafter(model)
    np.testing.assert_array_equal(np.array(model.logits(model.hidden(PROMPT))),
                                  np.array(ref.logits(ref.hidden(PROMPT))))
    wrapped, _ = load(str(path))
    assert wrapped.drafter is None and reason in wrapped.drafter_note


def _one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as err:
        load_gguf_target(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("case,family,kw,match", [
    ("unknown tensor", "glm4_moe", {"extra_tensors": {"blk.0.attn_mystery.weight": np.ones((4, 64))}},
     r"'blk\.0\.attn_mystery\.weight' is not part of a glm4moe model"),
    ("beyond block_count", "deepseek_v3", {"extra_tensors": {"blk.7.attn_norm.weight": np.ones(64)}},
     r"blk\.7\.\* lies beyond deepseek2\.block_count=3"),
    # metadata say v_head_dim 16, the tensors hold 32: the strict load names the misfit
    ("shape misfit", "deepseek_v3", {"metadata": {"deepseek2.attention.value_length_mla": 16}},
     "do not match the model built from its metadata"),
    ("softmax routing", "deepseek_v3", {"metadata": {"deepseek2.expert_gating_func": 1}}, "softmax"),
    ("nextn count", "glm4_moe", {"metadata": {"glm4moe.nextn_predict_layers": 3}}, "does not fit"),
    ("split head only", "glm4_moe_lite", {"layout": "mtp-only"}, "MTP-only"),
])
def test_bad_files_give_one_line_errors(tmp_path, case, family, kw, match):
    model, config = source(family)
    path = tmp_path / "bad.gguf"
    write_nextn_gguf(model, config, path, **kw)
    _one_line_error(path, match)
