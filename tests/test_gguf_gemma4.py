"""GGUF loading for Gemma 4: tiny `gemma4` targets (E2B-style, MoE, dense) and
`gemma4-assistant` drafters written the way llama.cpp's converter lays them
out. Loaded weights must equal the stored ones, greedy output with drafting on
must equal the same weights from safetensors and plain decoding, and the
SentencePiece-style tokenizer from GGUF metadata must encode like the HF one."""

from __future__ import annotations

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import mlx_mtp
from mlx_mtp import decode
from mlx_mtp.api import DrafterUnavailableError
from mlx_mtp.cli import main
from mlx_mtp.drafters.gemma4_assistant import Gemma4AssistantDrafter
from mlx_mtp.loading.assistant import load_assistant_drafter
from mlx_mtp.loading import CheckpointError, load_target
from mlx_mtp.loading.gguf import load_gguf_assistant, load_gguf_target, load_gguf_tokenizer, metadata, open_gguf
from mlx_mtp.loading.assistant import load_assistant
from mlx_mtp.models.gemma4_assistant import AssistantError
from mlx_mtp.testing.gguf_gemma4 import hf_tokenizer, write_gemma_tokenizer_metadata, write_pair

PROMPT = [2, 5, 17, 33, 9, 40, 41]
# K-quants need rows of 256 values.
K_DIMS = dict(hidden_size=256, intermediate_size=256, assistant_hidden=256)
SPARSE_WARNING = "sparse .*head was dropped.*dense tied head"


def greedy(model, drafter, k, n=32, stats=None):
    return [t for c in decode(model, PROMPT, drafter=drafter, num_draft=k, max_tokens=n, stats=stats) for t in c.tokens]


def params(module):
    return {k: np.array(v.astype(mx.float32) if v.dtype != mx.uint32 else v) for k, v in tree_flatten(module.parameters())}


def dequantized(module):
    f32 = lambda a: None if a is None else (a if a.dtype == mx.uint8 else a.astype(mx.float32))  # noqa: E731
    return np.array(mx.dequantize(module.weight, f32(module.scales), f32(module.get("biases")),
                                  group_size=module.group_size, bits=module.bits, mode=module.mode).astype(mx.float32))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma4-gguf")
    return {kind: write_pair(root / kind, kind=kind, qtype="F32") for kind in ("e2b", "moe", "dense")}


def load_drafter(path, target, sparse: bool):
    drafter = load_assistant_drafter(str(path), target)
    # The sparse-head fallback is a note on the drafter (None without one), not a warning.
    note = drafter.note
    assert (note is not None and "sparse" in note and "dense tied head" in note) == sparse, note
    return drafter


@pytest.mark.parametrize("kind", ["e2b", "moe", "dense"])
def test_f32_pair_equals_safetensors(pairs, kind):
    target_gguf, assistant_gguf, target_dir, assistant_dir = pairs[kind]
    model, config, _ = load_gguf_target(target_gguf)
    text = config
    assert text["model_type"] == "gemma4_text" and "quantization" not in config
    if kind == "e2b":
        assert text["num_kv_shared_layers"] == 2 and text["hidden_size_per_layer_input"] == 16
        assert text["use_double_wide_mlp"] and not text["attention_k_eq_v"]
    else:
        assert text["attention_k_eq_v"] and text["num_global_key_value_heads"] == 1
        assert text["enable_moe_block"] == (kind == "moe")
    assert text["rope_parameters"]["full_attention"]["partial_rotary_factor"] == 0.25  # from rope_freqs

    reference, _ = load_target(target_dir)
    got, want = params(model), params(reference)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    drafter = load_drafter(assistant_gguf, model, sparse=(kind == "e2b"))
    assert isinstance(drafter, Gemma4AssistantDrafter) and not drafter.assistant.args.use_ordered_embeddings
    ref_assistant = load_assistant(assistant_dir)
    got, want = params(drafter.assistant), params(ref_assistant)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)

    stats = mlx_mtp.Stats()
    plain = greedy(reference, None, 0)
    assert greedy(model, drafter, 4, stats=stats) == plain
    assert greedy(reference, load_assistant_drafter(str(assistant_dir), reference), 3) == plain
    assert stats.accepted_tokens > 0


@pytest.mark.parametrize("kind, qtype", [("e2b", "Q8_0"), ("moe", "Q4_K")])
def test_quantized_pair_is_exact_and_lossless(tmp_path, kind, qtype):
    target_gguf, assistant_gguf, target_dir, _ = write_pair(
        tmp_path, kind=kind, qtype=qtype, **(K_DIMS if qtype.endswith("_K") else {}))
    model, config, _ = load_gguf_target(target_gguf)
    reference, _ = load_target(target_dir)
    want = params(reference)
    bits = 8 if qtype == "Q8_0" else 4
    quantized = [(p, m) for p, m in model.named_modules() if hasattr(m, "scales")]
    assert len(quantized) >= 10
    for p, m in quantized:
        assert m.bits == bits and m.group_size == 32 and config["quantization"][p]["bits"] == bits
        np.testing.assert_array_equal(dequantized(m), want[p + ".weight"], err_msg=p)
    if kind == "moe":  # the fused gate_up experts split on rows without dequantizing
        experts = model.model.layers[0].experts.switch_glu
        assert experts.gate_proj.bits == bits and experts.up_proj.weight.ndim == 3
    drafter = load_drafter(assistant_gguf, model, sparse=(kind == "e2b"))
    assert any(hasattr(m, "scales") for _, m in drafter.assistant.named_modules())
    stats = mlx_mtp.Stats()
    plain = greedy(reference, None, 0)
    assert greedy(model, None, 0) == plain
    assert greedy(model, drafter, 4, stats=stats) == plain
    assert stats.accepted_tokens > 0


def _tokenizer_gguf(path, with_merges=True):
    w = gguf.GGUFWriter(str(path), "gemma4")
    write_gemma_tokenizer_metadata(w, with_merges=with_merges)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    return metadata(open_gguf(path))


TEXTS = ["the quick brown fox", " leading space", "double  space\nnew line\n\n", "héllo wörld 日本語 🙂",
         "<start_of_turn>user\nhi<end_of_turn>", "speculative decoding drafts tokens", "", "numbers 12345!?"]


@pytest.mark.parametrize("with_merges", [True, False], ids=["gemma4-merges", "scores-only"])
def test_tokenizer_matches_hf(tmp_path, with_merges):
    ref = hf_tokenizer()
    tok = load_gguf_tokenizer(_tokenizer_gguf(tmp_path / "tok.gguf", with_merges))
    assert len(tok._tokenizer) == len(ref)
    for text in TEXTS:
        ids = ref.encode(text)
        assert tok.encode(text) == ids, text  # BOS added, byte fallback, control tokens kept whole
        assert tok.decode(ids) == ref.decode(ids)
    assert tok.encode("é")[1:] == [ref.convert_tokens_to_ids("<0xC3>"), ref.convert_tokens_to_ids("<0xA9>")]
    assert set(tok.eos_token_ids) == {1, ref.convert_tokens_to_ids("<end_of_turn>")}
    messages = [{"role": "user", "content": "hi there"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
        ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    detok = tok.detokenizer  # the SentencePiece streaming detokenizer
    detok.reset()
    for i in ref.encode(TEXTS[3] + " the fox", add_special_tokens=False):
        detok.add_token(i)
    detok.finalize()
    assert detok.text == TEXTS[3] + " the fox"


def test_api_and_cli_generate_from_gguf_pair(pairs):
    target_gguf, assistant_gguf, _, _ = pairs["moe"]
    model, tokenizer = mlx_mtp.load(str(target_gguf), drafter=str(assistant_gguf))
    assert model.drafter is not None and model.drafter.name == "gemma4-assistant"
    assert tokenizer.encode("the fox")[0] == 2  # BOS
    text = mlx_mtp.generate(model, tokenizer, "the quick brown fox", max_tokens=8)
    assert isinstance(text, str)
    runner = CliRunner()
    outs = []
    for drafter in (str(assistant_gguf), "none"):
        r = runner.invoke(main, ["generate", "-m", str(target_gguf), "--drafter", drafter, "the fox",
                                 "-n", "24", "--json", "--temp", "0"])
        assert r.exit_code == 0, r.output
        outs.append(json.loads(r.stdout))
    assert outs[0]["tokens"] == outs[1]["tokens"]
    assert outs[0]["stats"]["drafter"] == "gemma4-assistant" and outs[0]["stats"]["draft_tokens"] > 0


def test_bad_gemma4_files_give_clear_errors(pairs, tmp_path):
    target_gguf, assistant_gguf, _, _ = pairs["dense"]
    e2b_target = pairs["e2b"][0]
    data = target_gguf.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) - 3000])
    with pytest.raises(CheckpointError, match=r"tensor '.+' \(\w+\) ends at byte .*truncated"):
        load_gguf_target(truncated)
    # An assistant is not a target, a target is not an assistant.
    with pytest.raises(CheckpointError, match="assistant .*--drafter"):
        load_gguf_target(assistant_gguf)
    model, _, _ = load_gguf_target(target_gguf)
    with pytest.raises(AssistantError, match="not a Gemma 4 assistant GGUF"):
        load_gguf_assistant(target_gguf)
    with pytest.raises(DrafterUnavailableError, match="not a Gemma 4 assistant"):
        mlx_mtp.load(str(target_gguf), drafter=str(target_gguf))
    # An assistant trained for another target (hidden size 128).
    _, wide_assistant, _, _ = write_pair(tmp_path / "wide", kind="dense", hidden_size=128)
    with pytest.raises(DrafterUnavailableError, match="cannot pair.*hidden size 128"):
        mlx_mtp.load(str(target_gguf), drafter=str(wide_assistant))
    # Missing metadata and missing tensors.
    reader = open_gguf(e2b_target)
    meta = metadata(reader)
    for drop_key, drop_tensor, match in [
        ("gemma4.attention.sliding_window", None, "lacks gemma4.attention.sliding_window"),
        (None, "blk.1.attn_q.weight", "do not match the model"),
    ]:
        w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "gemma4")
        for key, value in meta.items():
            if key in (drop_key, "general.architecture") or key.startswith("tokenizer."):
                continue
            field = reader.fields[key]
            vtype = field.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_key_value(key, list(value), vtype, sub_type=field.types[-1])
            else:
                w.add_key_value(key, value, vtype)
        for t in reader.tensors:
            if t.name != drop_tensor:
                w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
        w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
        with pytest.raises(CheckpointError, match=match):
            load_gguf_target(tmp_path / "bad.gguf")
    r = CliRunner().invoke(main, ["generate", "-m", str(target_gguf), "--drafter", str(truncated), "hi"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert len([l for l in r.stderr.splitlines() if l.startswith("error: ")]) == 1


def test_convert_gemma4_gguf_keeps_drafting(pairs, tmp_path):
    from mlx_mtp.loading.convert import convert

    target_gguf, assistant_gguf, target_dir, _ = pairs["dense"]
    config = convert(target_gguf, tmp_path / "out", progress=False)
    assert config["model_type"] == "gemma4_text" and (tmp_path / "out" / "tokenizer.json").exists()
    model, tokenizer = mlx_mtp.load(str(tmp_path / "out"), drafter=str(assistant_gguf))
    assert tokenizer.encode("the fox") == hf_tokenizer().encode("the fox")
    reference, _ = load_target(target_dir)
    assert greedy(model.target, model.drafter, 3) == greedy(reference, None, 0)
