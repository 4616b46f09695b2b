"""GGUF loading: tiny qwen35 / qwen35moe files laid out like llama.cpp's
converter writes them, in float and quantized types. Repacks must be exact,
greedy output must equal the same weights loaded from safetensors, and the
tokenizer built from GGUF metadata must encode like the HF one."""

from __future__ import annotations

import json
import struct

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_unflatten

import tiny
from mlx_mtp import decode, load
from mlx_mtp.cli import main
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.loading import CheckpointError, load_target
from mlx_mtp.loading.gguf import load_gguf_target, load_gguf_tokenizer, metadata, open_gguf, v_head_order
from mlx_mtp.testing.gguf import write_qwen35_gguf, write_tokenizer_metadata

PROMPT = [5, 17, 33, 2, 9]
# K-quants need rows that are multiples of 256 values.
K_DIMS = dict(hidden_size=256, intermediate_size=512, head_dim=64,
              linear_key_head_dim=64, linear_value_head_dim=64,
              moe_intermediate_size=256, shared_expert_intermediate_size=256)
# 32-blocks: head dims of 32 so the V-head reorder of ssm_out columns falls on groups.
SMALL_DIMS = dict(linear_key_head_dim=32, linear_value_head_dim=32)
EXACT = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "MXFP4", "Q4_K", "Q5_K"]


def dims(qtype, moe=False):
    d = dict(K_DIMS if qtype.endswith("_K") else SMALL_DIMS)
    if not moe:
        d.pop("moe_intermediate_size", None)
        d.pop("shared_expert_intermediate_size", None)
    return d


def make_pair(tmp_path, qtype, moe=False, seed=1):
    """A GGUF file and a safetensors (mlx layout) checkpoint of the same weights."""
    config = tiny.hf_config(moe=moe, **dims(qtype, moe))
    model = tiny.build(config["text_config"], seed=seed, predictable=True, noise=1.6)
    stored = write_qwen35_gguf(model, config["text_config"], tmp_path / "model.gguf", qtype=qtype)
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in stored.items()]))
    tiny.save_hf_checkpoint(model, tmp_path / "ref", config, raw=False)
    return tmp_path / "model.gguf", tmp_path / "ref", stored


def greedy(model, k, n=32):
    drafter = MTPDrafter(model) if k else None
    return [t for c in decode(model, PROMPT, drafter=drafter, num_draft=k, max_tokens=n) for t in c.tokens]


def dequantized(module):
    f32 = lambda a: None if a is None else (a if a.dtype == mx.uint8 else a.astype(mx.float32))  # noqa: E731
    return np.array(mx.dequantize(module.weight, f32(module.scales), f32(module.get("biases")),
                                  group_size=module.group_size, bits=module.bits, mode=module.mode).astype(mx.float32))


@pytest.mark.parametrize("moe", [False, True])
def test_f32_gguf_equals_safetensors(tmp_path, moe):
    path, ref, _ = make_pair(tmp_path, "F32", moe=moe)
    model, config, _ = load_gguf_target(path)
    assert model.has_mtp and model.mtp_problem is None
    assert config["text_config"]["mtp_num_hidden_layers"] == 1
    reference, _ = load_target(ref)
    P = mx.array([PROMPT])
    for m in (model, reference):
        h = m.hidden(P)
        m._out = np.array(m.logits(h)), np.array(m.logits(m.mtp(m.embed(P), h, m.make_mtp_cache())))
    for a, b in zip(model._out, reference._out):
        np.testing.assert_array_equal(a, b)  # every transform undone exactly
    assert greedy(model, 3) == greedy(reference, 0)


@pytest.mark.parametrize("qtype", EXACT)
def test_repacks_are_exact_and_greedy_lossless(tmp_path, qtype):
    path, ref, stored = make_pair(tmp_path, qtype)
    model, config, _ = load_gguf_target(path)
    quantized = [(p, m) for p, m in model.named_modules() if hasattr(m, "scales")]
    assert len(quantized) >= 10
    expected_bits = {"Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q5_K": 5}.get(qtype, 4)
    for p, m in quantized:
        assert m.bits == expected_bits and m.group_size == 32
        assert m.mode == ("mxfp4" if qtype == "MXFP4" else "affine")
        # stored = gguf.quants' numpy dequantization of the very blocks written
        np.testing.assert_array_equal(dequantized(m), stored[p + ".weight"], err_msg=p)
        assert config["quantization"][p]["bits"] == expected_bits
    assert any(p.startswith("mtp.") for p, _ in quantized)  # the head is quantized too
    reference, _ = load_target(ref)
    plain = greedy(reference, 0)
    assert greedy(model, 0) == plain
    assert greedy(model, 3) == plain


@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0"])
def test_moe_gguf(tmp_path, qtype):
    path, ref, stored = make_pair(tmp_path, qtype, moe=True)
    model, _, _ = load_gguf_target(path)
    experts = model.language_model.model.layers[0].mlp.switch_mlp.gate_proj
    assert experts.weight.ndim == 3 and experts.bits in (4, 8)
    np.testing.assert_array_equal(
        dequantized(experts), stored["language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight"])
    reference, _ = load_target(ref)
    assert greedy(model, 3) == greedy(reference, 0)


@pytest.mark.parametrize("qtype", ["Q6_K", "Q3_K", "Q2_K"])
def test_other_k_quants_are_requantized_to_8_bits(tmp_path, qtype):
    path, _, stored = make_pair(tmp_path, qtype)
    model, _, _ = load_gguf_target(path)
    m = model.language_model.model.layers[1].self_attn.q_proj
    assert m.bits == 8 and m.mode == "affine"
    ref = stored["language_model.model.layers.1.self_attn.q_proj.weight"]
    step = (np.ptp(ref.reshape(ref.shape[0], -1, 32), axis=-1) / 255).max()
    np.testing.assert_allclose(dequantized(m), ref, atol=step + 2e-3)


def test_v_head_order():
    # Hk=2, Hv=4: the GGUF slot order is HF heads [0, 2, 1, 3] (docs/gguf.md#converter-transforms).
    assert v_head_order(4, 2).tolist() == [0, 2, 1, 3]
    assert v_head_order(6, 2).tolist() == [0, 2, 4, 1, 3, 5]
    assert v_head_order(4, 4).tolist() == [0, 1, 2, 3]


def test_tokenizer_matches_hf(tmp_path):
    path, _, _ = make_pair(tmp_path, "F32")
    tok = load_gguf_tokenizer(metadata(open_gguf(path)))
    hf = tiny.build_tokenizer()
    texts = ["hello world", "def f(x):\n    return x + 1\n", "<|im_start|>user\nhi<|im_end|>", "  spaces\t\ttabs"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False).ids
        ids = hf.encode(text).ids
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    # eos_token_id, and <|endoftext|> by its text, as llama.cpp (tests/test_gguf_layouts.py)
    assert tok.eos_token_ids == {tiny.EOS_TOKEN_ID, hf.token_to_id(tiny.ENDOFTEXT)}
    msgs = [{"role": "user", "content": "hi"}]
    assert "<|im_start|>assistant\n<think>\n" in tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_tokenizer_with_merges_matches_hf(tmp_path):
    import gguf
    from tokenizers import trainers

    hf = tiny.build_tokenizer()
    hf.model = __import__("tokenizers").models.BPE(fuse_unk=False, byte_fallback=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=tiny.SPECIAL_TOKENS,
                                  initial_alphabet=tiny.CHARS, show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog"] * 20 + ["def hello_world():\n    return 42"] * 20
    hf.train_from_iterator(corpus, trainer)
    assert json.loads(hf.to_str())["model"]["merges"]
    w = gguf.GGUFWriter(str(tmp_path / "tok.gguf"), "qwen35")
    write_tokenizer_metadata(w, hf)
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    tok = load_gguf_tokenizer(metadata(open_gguf(tmp_path / "tok.gguf")))
    for text in corpus[:1] + corpus[-1:] + ["the lazy fox's hello_world() <|im_end|> 42"]:
        assert tok.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False).ids


def test_api_and_cli_generate_from_gguf(tmp_path):
    path, _, _ = make_pair(tmp_path, "Q4_0")
    model, tokenizer = load(str(path))
    assert model.drafter is not None and model.drafter.name == "mtp"
    runner = CliRunner()
    outs = []
    for k in ("3", "0"):
        r = runner.invoke(main, ["generate", "-m", str(path), "hello", "-n", "24", "-k", k, "--json", "--temp", "0"])
        assert r.exit_code == 0, r.output
        outs.append(json.loads(r.stdout))
    assert outs[0]["tokens"] == outs[1]["tokens"]
    assert outs[0]["stats"]["drafter"] == "mtp" and outs[0]["stats"]["draft_tokens"] > 0


def _patch_type(data: bytearray, name: str, type_id: int) -> bytearray:
    """Set the GGML type of tensor `name` in the header (len, name, n_dims, dims, type, offset)."""
    key = struct.pack("<Q", len(name)) + name.encode()
    i = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, i)[0]
    struct.pack_into("<I", data, i + 4 + 8 * n_dims, type_id)
    return data


def test_bad_gguf_files_give_clear_errors(tmp_path):
    path, _, _ = make_pair(tmp_path, "Q8_0")
    data = path.read_bytes()

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 5000])
    with pytest.raises(CheckpointError, match=r"tensor '.+' \(\w+\) ends at byte .*truncated"):
        load_gguf_target(truncated)

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_gguf_target(garbage)

    unknown = tmp_path / "unknown-type.gguf"
    unknown.write_bytes(bytes(_patch_type(bytearray(data), "blk.0.attn_qkv.weight", 77)))
    with pytest.raises(CheckpointError, match=r"'blk.0.attn_qkv.weight' has an unsupported GGUF type \(unknown type id 77\)"):
        load_gguf_target(unknown)

    runner = CliRunner()
    for bad in (truncated, garbage, unknown):
        r = runner.invoke(main, ["generate", "-m", str(bad), "hi"])
        assert r.exit_code == 1, r.output
        assert "Traceback" not in r.output
        errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
        assert len(errors) == 1 and r.stdout == ""


def test_unsupported_architecture(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    with pytest.raises(CheckpointError, match="architecture 'llama' is not supported"):
        load_gguf_target(tmp_path / "llama.gguf")


def test_half_precision_moe_gguf_decodes(tmp_path):
    """Float experts from a lossless F16 GGUF: on MLX's CPU backend
    gather_mm takes float32 only, so they must run in float32 there
    (models/experts.py), as they do for safetensors checkpoints."""
    path, _, _ = make_pair(tmp_path, "F16", moe=True)
    model, _, _ = load_gguf_target(path)
    assert model.language_model.model.layers[0].mlp.switch_mlp.gate_proj.weight.dtype != mx.float16
    assert greedy(model, 3) == greedy(model, 0)
