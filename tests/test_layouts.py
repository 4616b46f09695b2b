"""Checkpoint layouts as real repos ship them (docs/mtp-head.md#checkpoint-layouts).

- The MTP head in its own file beside the trunk (`mtp.safetensors`), listed
  in the index or not, next to a raw HF or an mlx-lm trunk.
- Per-expert MoE tensors (`mlp.experts.{e}.{gate,up,down}_proj.weight`, as
  FP8 / GPTQ exports write them) in the trunk and the head.
- bf16 MoE experts on MLX's CPU backend (float32 GatherMM only).
- Gemma 4 26B-A4B-style experts under `model.language_model.layers.N.experts`.
- The released config fields and storage (shards + index, bf16 with float32
  A_log / linear_attn.norm, vision tensors, EOS only in generation_config.json).

Every layout loads with its drafter and greedy speculative decoding equals
plain decoding, with drafts accepted.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.switch_layers import SwitchLinear

import mlx_mtp
import tiny
from mlx_mtp import Stats, decode
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.loading import load_target
from mlx_mtp.loading.convert import convert
from mlx_mtp.loading.graft import safetensors_header
from mlx_mtp.loading.inspect import format_report, inspect_path
from mlx_mtp.models.experts import Float32SwitchLinear
from mlx_mtp.testing import FLOAT32_TENSORS, GENERATION_CONFIG, INDEX_NAME, write_shards
from mlx_mtp.testing.gemma import hf_config as gemma_hf_config
from mlx_mtp.testing.gemma import write_pair

PROMPT = [5, 17, 33]
HEAD_FILE = "mtp.safetensors"


def _run(target, drafter=None, k=0, max_tokens=32):
    stats = Stats()
    out = [t for c in decode(target, PROMPT, drafter=drafter if k else None, num_draft=k,
                             max_tokens=max_tokens, stats=stats) for t in c.tokens]
    return out, stats


def _assert_lossless(target, drafter, k=3):
    """Greedy speculative == plain, with drafts really accepted."""
    spec, stats = _run(target, drafter, k)
    plain, _ = _run(target)
    assert spec == plain
    assert stats.accepted_tokens > 0


def _outputs(model):
    """(trunk logits, head logits) on a fixed prompt: equal to the in-memory
    model's only if every norm was shifted exactly once."""
    tokens = mx.array([[5, 17, 33, 2, 9, 11]])
    hidden = model.hidden(tokens)
    head = model.mtp(model.embed(tokens), hidden, model.make_mtp_cache())
    return np.array(model.logits(hidden)), np.array(model.logits(head))


def _assert_same_outputs(a, b, atol=1e-5):
    for x, y in zip(_outputs(a), _outputs(b)):
        np.testing.assert_allclose(x, y, rtol=atol, atol=atol)


def _raw_weights(model, config, tmp_path):
    """The raw HF tensors (`model.language_model.*`, `mtp.*`) of `model`."""
    tiny.save_hf_checkpoint(model, tmp_path / "raw", config, raw=True)
    return mx.load(str(tmp_path / "raw" / "model.safetensors"))


def _write_config(path, config):
    (path / "config.json").write_text(json.dumps(config, indent=1))
    tiny.write_tokenizer(path)


# --- 3a: the head in its own file ----------------------------------------------


@pytest.mark.parametrize("layout", ["raw-indexed", "mlx-unlisted", "mlx-config"])
def test_head_in_its_own_file(tmp_path, layout):
    """raw-indexed: a raw HF repo whose index maps `mtp.*` to mtp.safetensors.
    mlx-unlisted: an mlx-lm conversion (head dropped, norms shifted) with the
    raw HF head copied beside it, in no index (mlx-lm's --preserve-mtp).
    mlx-config: the same, the file named by config.json's
    `mlx_lm_extra_tensors.mtp_file` (MTPLX packs)."""
    config = tiny.hf_config()
    model = tiny.build(config["text_config"], seed=1, predictable=True, noise=1.6)
    raw = _raw_weights(model, config, tmp_path)
    head = {k: v for k, v in raw.items() if k.startswith("mtp.")}
    out = tmp_path / "model"
    out.mkdir()
    head_file = HEAD_FILE
    if layout == "raw-indexed":
        weight_map = write_shards(out, {k: v for k, v in raw.items() if k not in head}, 2)
        weight_map.update({k: HEAD_FILE for k in head})
        index = json.loads((out / INDEX_NAME).read_text())
        (out / INDEX_NAME).write_text(json.dumps({**index, "weight_map": weight_map}))
    else:
        tiny.save_hf_checkpoint(model, out, config, raw=False, drop_mtp=True)
        if layout == "mlx-config":
            head_file = "mtp/weights.safetensors"
            config = {**config, "mlx_lm_extra_tensors": {"mtp_file": head_file}}
    (out / head_file).parent.mkdir(exist_ok=True)
    mx.save_safetensors(str(out / head_file), head)
    _write_config(out, config)

    loaded, _ = load_target(out)
    assert loaded.has_mtp and loaded.mtp_problem is None
    _assert_same_outputs(model, loaded)  # head norms shifted once, whatever the trunk's layout
    _assert_lossless(loaded, MTPDrafter(loaded))

    report = inspect_path(str(out), drafter="mtp")
    assert report["drafter"]["present"] and report["drafter"]["files"] == [head_file]
    assert report["drafter"]["tensors"] == len(head) == 15
    assert f"15 tensors from {head_file}" in format_report(report)
    assert report["compatibility"]["ok"]
    assert not any("stripped" in w for w in report["warnings"])

    # convert carries the side-file head into the new checkpoint (8-bit).
    converted = tmp_path / "converted"
    convert(out, converted, bits=8)
    again, _ = load_target(converted)
    assert again.has_mtp and again.mtp_problem is None
    _assert_lossless(again, MTPDrafter(again))


def test_side_file_with_a_head_in_the_shards_too(tmp_path):
    """A head in the shards (graft's model-mtp.safetensors) wins over a stale
    side file: the side file is only read when the shards have none."""
    config = tiny.hf_config()
    model = tiny.build(config["text_config"], seed=1, predictable=True, noise=1.6)
    tiny.save_hf_checkpoint(model, tmp_path / "m", config, raw=True)
    other = tiny.build(config["text_config"], seed=9)
    stale = {k: v for k, v in _raw_weights(other, config, tmp_path).items() if k.startswith("mtp.")}
    mx.save_safetensors(str(tmp_path / "m" / HEAD_FILE), stale)
    loaded, _ = load_target(tmp_path / "m")
    _assert_same_outputs(model, loaded)


# --- 5: per-expert MoE tensors -----------------------------------------------------


def _per_expert(weights):
    """Fused Qwen3.5-MoE experts -> one tensor per expert and projection, as
    the FP8 / GPTQ exports and Qwen3-Next store them."""
    out = {}
    for key, value in weights.items():
        base, _, leaf = key.rpartition(".")
        if not base.endswith(".mlp.experts"):
            out[key] = value
        elif leaf == "gate_up_proj":
            mid = value.shape[-2] // 2
            for e in range(value.shape[0]):
                out[f"{base}.{e}.gate_proj.weight"] = value[e, :mid]
                out[f"{base}.{e}.up_proj.weight"] = value[e, mid:]
        else:
            for e in range(value.shape[0]):
                out[f"{base}.{e}.down_proj.weight"] = value[e]
    return out


def test_per_expert_moe_tensors(tmp_path):
    config = tiny.hf_config(moe=True)
    model = tiny.build(config["text_config"], seed=2, predictable=True, noise=1.6)
    weights = _per_expert(_raw_weights(model, config, tmp_path))
    assert "model.language_model.layers.0.mlp.experts.3.down_proj.weight" in weights
    assert "mtp.layers.0.mlp.experts.0.gate_proj.weight" in weights
    assert not any(k.endswith("gate_up_proj") for k in weights)
    out = tmp_path / "model"
    out.mkdir()
    write_shards(out, weights, 2)
    _write_config(out, config)

    loaded, _ = load_target(out)
    assert loaded.has_mtp and loaded.mtp_problem is None
    _assert_same_outputs(model, loaded)
    _assert_lossless(loaded, MTPDrafter(loaded))
    report = inspect_path(str(out), drafter="mtp")
    assert report["compatibility"]["ok"] and not report["warnings"]


# --- 8: bf16 MoE on the CPU backend --------------------------------------------------


def test_bf16_moe_experts_fit_the_backend(tmp_path):
    path = tiny.write_model_dir(tmp_path / "model", config=tiny.hf_config(moe=True), real_layout=True)
    loaded, _ = load_target(path)
    experts = [m for _, m in loaded.named_modules() if isinstance(m, SwitchLinear)]
    assert len(experts) == 3 * (loaded.language_model.args.num_hidden_layers + 1)  # trunk + head
    if mx.default_device().type == mx.DeviceType.cpu:
        # GatherMM on the CPU takes float32 only: the experts are kept in it.
        assert all(isinstance(m, Float32SwitchLinear) and m.weight.dtype == mx.float32 for m in experts)
    else:  # Metal / CUDA: bf16 as stored
        assert all(type(m) is SwitchLinear and m.weight.dtype == mx.bfloat16 for m in experts)
    assert loaded.language_model.model.embed_tokens.weight.dtype == mx.bfloat16
    hidden = loaded.hidden(mx.array([PROMPT]))
    assert hidden.dtype == mx.bfloat16  # the layers around the experts stay in bf16
    _assert_lossless(loaded, MTPDrafter(loaded))


def test_float32_switch_linear_matches_and_keeps_the_dtype():
    mx.random.seed(0)
    linear = SwitchLinear(16, 8, 4, bias=True)
    linear.update({"weight": linear.weight.astype(mx.bfloat16), "bias": mx.ones((4, 8), dtype=mx.bfloat16)})
    wide = Float32SwitchLinear(linear)
    x = mx.random.normal((3, 1, 1, 16)).astype(mx.bfloat16)
    idx = mx.array([[0, 2], [1, 3], [3, 3]])
    y = wide(x, idx)
    assert y.dtype == mx.bfloat16 and wide.weight.dtype == mx.float32
    ref = x.astype(mx.float32) @ linear.weight.astype(mx.float32)[idx].swapaxes(-1, -2) + 1.0
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), np.array(ref), rtol=2e-2, atol=2e-2)


# --- 10: Gemma 4 MoE experts in the multimodal layout ---------------------------------


def test_gemma_moe_experts_under_language_model(tmp_path):
    target_dir, assistant_dir = write_pair(tmp_path / "pair", kind="moe", layout="gemma4")
    keys = set(mx.load(str(target_dir / "model.safetensors")))
    for n in range(json.loads((target_dir / "config.json").read_text())["text_config"]["num_hidden_layers"]):
        assert {f"model.language_model.layers.{n}.experts.gate_up_proj",
                f"model.language_model.layers.{n}.experts.down_proj",
                f"model.language_model.layers.{n}.router.proj.weight"} <= keys
    assert not any(k.startswith("model.layers.") for k in keys)
    model, _ = mlx_mtp.load(target_dir, drafter=str(assistant_dir))
    _assert_lossless(model.target, model.drafter, k=4)


# --- 11: the fields and storage of released configs ---------------------------------


def test_released_qwen_layout(tmp_path):
    path = tiny.write_model_dir(tmp_path / "model", real_layout=True)
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    assert text["layer_types"] == ["linear_attention", "full_attention"] * 2
    assert text["attn_output_gate"] and text["output_gate_type"] == "swish"
    assert text["mamba_ssm_dtype"] == "float32" and text["partial_rotary_factor"] == 0.25
    assert text["rope_parameters"]["mrope_interleaved"] is True
    assert "eos_token_id" not in config and "eos_token_id" not in text
    assert json.loads((path / "generation_config.json").read_text()) == GENERATION_CONFIG
    assert "vision_config" in config

    weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == [f"model.safetensors-0000{i}-of-00002.safetensors" for i in (1, 2)]
    dtypes = {}
    for fname in set(weight_map.values()):
        dtypes.update({k: info["dtype"] for k, info in safetensors_header(path / fname).items()})
    assert dtypes.keys() == weight_map.keys()
    assert {k for k, d in dtypes.items() if d == "F32"} == {k for k in dtypes if k.endswith(FLOAT32_TENSORS)}
    assert any(k.startswith("model.visual.blocks.0.") for k in dtypes)
    assert not (path / "model.safetensors").exists()

    model, tokenizer = mlx_mtp.load(path)
    target = model.target
    assert target.has_mtp and target.mtp_problem is None
    assert tokenizer.eos_token_ids == {tiny.EOS_TOKEN_ID}  # from generation_config.json
    assert not any("visual" in name for name, _ in target.named_modules())
    assert target.language_model.model.layers[0].linear_attn.A_log.dtype == mx.float32
    _assert_lossless(target, model.drafter)


def test_config_without_layer_types_still_loads(tmp_path):
    # Older repacks drop the list; mlx-lm derives the pattern from the interval.
    path = tiny.write_model_dir(tmp_path / "model")
    config = json.loads((path / "config.json").read_text())
    del config["text_config"]["layer_types"]
    (path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_target(path)
    assert loaded.has_mtp


@pytest.mark.parametrize("kind", ["e2b", "dense"])
def test_released_gemma_layout(tmp_path, kind):
    config = gemma_hf_config(kind)
    text = config["text_config"]
    assert "vocab_size" not in config  # only in text_config, as released
    assert {"num_global_key_value_heads", "attention_k_eq_v", "num_experts", "top_k_experts",
            "moe_intermediate_size"} <= set(text)
    assert text["num_experts"] is None and text["top_k_experts"] is None and text["moe_intermediate_size"] is None
    assert (text["num_global_key_value_heads"] is None) == (kind == "e2b")
    target_dir, assistant_dir = write_pair(tmp_path / "pair", kind=kind, layout="gemma4")
    saved = json.loads((target_dir / "config.json").read_text())
    assert "vocab_size" not in saved
    model, _ = mlx_mtp.load(target_dir, drafter=str(assistant_dir))
    assert model.target.vocab_size == text["vocab_size"]
    _assert_lossless(model.target, model.drafter, k=4)
