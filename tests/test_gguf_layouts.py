"""GGUF layouts beyond one plain model file, as llama.cpp's converter writes
them (names and metadata checked against llama.cpp 0c1e570, the tree that
llama-cpp-python 0.3.36 vendors; the fixtures come from our own writers in
mlx_mtp.testing, so no converter runs here):

- the split MTP head (`--mtp`, mtp-*.gguf) drafting for the `--no-mtp` trunk
  or for an MLX trunk of the same model;
- the gemma4-assistant sparse head (`masked_embd_centroids.weight`,
  `masked_embd_ordering`);
- every end-of-sequence id a GGUF declares, as the safetensors load has them.
"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten, tree_unflatten

import tiny
from mlx_mtp import decode, load
from mlx_mtp.api import DrafterUnavailableError, stream_generate
from mlx_mtp.cli import main
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.loading import CheckpointError
from mlx_mtp.loading.assistant import load_assistant, load_assistant_drafter
from mlx_mtp.loading.convert import convert
from mlx_mtp.loading.gguf import load_gguf_assistant, load_gguf_target, metadata, open_gguf
from mlx_mtp.loading.inspect import inspect_path
from mlx_mtp.models.gemma4_assistant import AssistantError
from mlx_mtp.testing.gguf import write_qwen35_gguf
from mlx_mtp.testing.gguf_gemma4 import write_assistant_gguf, write_pair

PROMPT = [5, 17, 33, 2, 9]
GEMMA_PROMPT = [2, 5, 17, 33, 9, 40, 41]
ENDOFTEXT_ID = 0  # tiny vocabulary: <|endoftext|> 0, <|im_end|> 1 (the tokenizer's eos_token)


def run(model, drafter, k, prompt=PROMPT, n=32):
    """(tokens, drafts per cycle) of a greedy decode."""
    cycles = list(decode(model, prompt, drafter=drafter, num_draft=k, max_tokens=n))
    return [t for c in cycles for t in c.tokens], [c.drafted for c in cycles]


def params(module):
    return {k: np.array(v.astype(mx.float32) if v.dtype != mx.uint32 else v) for k, v in tree_flatten(module.parameters())}


def one_line(e: BaseException) -> str:
    assert "\n" not in str(e), str(e)
    return str(e)


# --- the split MTP head (llama.cpp --mtp / --no-mtp) ---------------------------------


def _write_qwen(root, seed, **overrides):
    """One tiny model as the converter's three files and as an MLX trunk
    (mlx-lm layout, head stripped as mlx-lm's conversion does)."""
    root.mkdir(parents=True, exist_ok=True)
    config = tiny.hf_config(**overrides)
    model = tiny.build(config["text_config"], seed=seed, predictable=True, noise=1.6)
    files = {layout: root / name for layout, name in
             (("full", "model.gguf"), ("no-mtp", "trunk.gguf"), ("mtp-only", "mtp-model.gguf"))}
    stored = {}
    for layout, path in files.items():
        stored.update(write_qwen35_gguf(model, config["text_config"], path, layout=layout))
    model.update(tree_unflatten([(k, mx.array(v)) for k, v in stored.items()]))
    tiny.save_hf_checkpoint(model, root / "mlx-trunk", config, raw=False, drop_mtp=True)
    tiny.write_tokenizer(root / "mlx-trunk")
    return files, root / "mlx-trunk"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    files, trunk_dir = _write_qwen(tmp_path_factory.mktemp("qwen-split"), seed=3)
    return files, trunk_dir


def test_split_files_are_laid_out_like_the_converter(qwen):
    files, _ = qwen
    split = open_gguf(files["mtp-only"])
    names = {t.name for t in split.tensors}
    assert names >= {"token_embd.weight", "output_norm.weight", "output.weight", "blk.4.nextn.eh_proj.weight",
                     "blk.4.attn_q.weight"} and not any(n.startswith(("blk.0.", "blk.3.")) for n in names)
    meta = metadata(split)
    assert meta["qwen35.block_count"] == 5 and meta["qwen35.nextn_predict_layers"] == 1
    trunk = metadata(open_gguf(files["no-mtp"]))
    assert trunk["qwen35.block_count"] == 4 and "qwen35.nextn_predict_layers" not in trunk
    # The converter writes its default interval; the per-layer flags carry the model's (2).
    assert trunk["qwen35.full_attention_interval"] == 4
    _, config, _ = load_gguf_target(files["no-mtp"])
    assert config["text_config"]["full_attention_interval"] == 2


def test_split_head_drafts_for_the_gguf_trunk(qwen):
    files, _ = qwen
    full, _, _ = load_gguf_target(files["full"])
    trunk, _, _ = load_gguf_target(files["no-mtp"])
    assert not trunk.has_mtp
    model, _ = load(str(files["no-mtp"]), drafter=str(files["mtp-only"]))
    assert isinstance(model.drafter, MTPDrafter) and not model.target.has_mtp  # the target is left alone
    plain, _ = run(full, None, 0)
    tokens, drafts = run(model.target, model.drafter, 3)
    assert tokens == plain
    # The same head as the whole file's: the same drafts, cycle by cycle.
    assert drafts == run(full, MTPDrafter(full), 3)[1] and any(drafts)


def test_split_head_drafts_for_an_mlx_trunk(qwen):
    files, trunk_dir = qwen
    model, tokenizer = load(str(trunk_dir), drafter=str(files["mtp-only"]))
    assert isinstance(model.drafter, MTPDrafter)
    plain, _ = run(model.target, None, 0)
    tokens, drafts = run(model.target, model.drafter, 3)
    assert tokens == plain and any(drafts)


def test_split_head_mismatches_are_one_line_errors(qwen, tmp_path):
    files, _ = qwen
    other, _ = _write_qwen(tmp_path / "other", seed=4)  # same sizes, other weights
    with pytest.raises(DrafterUnavailableError) as e:
        load(str(files["no-mtp"]), drafter=str(other["mtp-only"]))
    assert "output_norm differs" in one_line(e.value)
    fewer, _ = _write_qwen(tmp_path / "fewer", seed=3, num_hidden_layers=2)
    with pytest.raises(DrafterUnavailableError) as e:
        load(str(files["no-mtp"]), drafter=str(fewer["mtp-only"]))
    assert "num_hidden_layers is 2, the target's 4" in one_line(e.value)
    with pytest.raises(DrafterUnavailableError) as e:
        load(str(files["no-mtp"]), drafter=str(files["full"]))
    assert "not an MTP-only drafter file" in one_line(e.value)
    with pytest.raises(CheckpointError) as e:
        load(str(files["mtp-only"]))
    assert "MTP-only drafter file" in one_line(e.value) and "--drafter" in str(e.value)
    with pytest.raises(CheckpointError, match="MTP-only drafter file"):  # nor a checkpoint without its trunk
        convert(str(files["mtp-only"]), tmp_path / "converted")


def test_inspect_says_the_split_file_is_a_drafter(qwen):
    files, trunk_dir = qwen
    report = inspect_path(str(files["mtp-only"]), drafter="auto")
    assert report["drafter_only"] and "MTP-only drafter file" in report["layout"]
    assert any("not a model" in w for w in report["warnings"]) and not report["compatibility"]["ok"]
    assert not inspect_path(str(files["full"]))["drafter_only"]
    for target in (files["no-mtp"], trunk_dir):
        assert inspect_path(str(target), drafter=str(files["mtp-only"]))["compatibility"]["ok"], target
    r = CliRunner().invoke(main, ["inspect", str(files["mtp-only"])])
    assert r.exit_code == 0 and "MTP-only drafter file" in r.output


# --- the gemma4-assistant sparse head ------------------------------------------------


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    # E2B-style, its assistant GGUF keeping the sparse head; the target's
    # config stops on <eos> and <end_of_turn>, as Gemma's list both.
    root = tmp_path_factory.mktemp("gemma-sparse")
    return write_pair(root, kind="e2b", sparse_head=True, eos_token_id=[1, 5])


def test_sparse_head_loads_and_drafts_as_from_safetensors(gemma):
    target_gguf, assistant_gguf, _, assistant_dir = gemma
    model, _, _ = load_gguf_target(target_gguf)
    drafter = load_assistant_drafter(str(assistant_gguf), model)
    args = drafter.assistant.args
    assert args.use_ordered_embeddings and args.num_centroids == 8 and args.centroid_intermediate_top_k == 3
    assert drafter.note is None  # nothing dropped, nothing to say
    reference = load_assistant_drafter(str(assistant_dir), model)
    assert reference.assistant.args.use_ordered_embeddings
    got, want = params(drafter.assistant), params(reference.assistant)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    plain, _ = run(model, None, 0, prompt=GEMMA_PROMPT)
    tokens, drafts = run(model, drafter, 4, prompt=GEMMA_PROMPT)
    assert tokens == plain and any(drafts)
    assert drafts == run(model, reference, 4, prompt=GEMMA_PROMPT)[1]


def test_sparse_head_ordering_types_and_bad_ordering(gemma, tmp_path):
    _, _, _, assistant_dir = gemma
    assistant = load_assistant(assistant_dir)
    config = json.loads((assistant_dir / "config.json").read_text())
    want = np.array(assistant.masked_embedding.token_ordering)
    # I32 (other converters) loads as F32 (the converter's generic path) does.
    write_assistant_gguf(assistant, config, tmp_path / "i32.gguf", sparse_head=True, ordering_type="I32")
    loaded = load_gguf_assistant(tmp_path / "i32.gguf")
    np.testing.assert_array_equal(np.array(loaded.masked_embedding.token_ordering), want)
    assert loaded.masked_embedding.token_ordering.dtype == mx.int32
    assistant.masked_embedding.token_ordering = mx.zeros_like(assistant.masked_embedding.token_ordering)
    write_assistant_gguf(assistant, config, tmp_path / "bad.gguf", sparse_head=True)
    with pytest.raises(AssistantError) as e:
        load_gguf_assistant(tmp_path / "bad.gguf")
    assert "masked_embd_ordering" in one_line(e.value) and "permutation" in str(e.value)


# --- end-of-sequence ids ---------------------------------------------------------------


def _stopping_prompt(model, stop: int, others: set):
    """A one-token prompt whose greedy continuation reaches `stop` after at
    least one other token and before any other stop id: (prompt, tokens before it)."""
    for x in range(2, tiny.VOCAB):
        tokens, _ = run(model, None, 0, prompt=[x], n=12)
        for i, t in enumerate(tokens):
            if t == stop and i > 0:
                return [x], tokens[:i]
            if t == stop or t in others:
                break
    raise AssertionError(f"no prompt reaches token {stop}")


def test_qwen_gguf_stops_on_every_eos_the_safetensors_load_does(tmp_path):
    # As Qwen3.5 ships: config.json's eos is <|endoftext|>, tokenizer_config's
    # eos_token <|im_end|>. The converter keeps only the latter (eos_token_id 1,
    # <|endoftext|> as padding): <|endoftext|> stops by its text, as in llama.cpp.
    config = tiny.hf_config(eos_token_id=ENDOFTEXT_ID)
    config["eos_token_id"] = ENDOFTEXT_ID
    model = tiny.build(config["text_config"], seed=5, predictable=True, noise=0.3)
    write_qwen35_gguf(model, config["text_config"], tmp_path / "model.gguf")
    tiny.save_hf_checkpoint(model, tmp_path / "ref", config, raw=False)
    tiny.write_tokenizer(tmp_path / "ref")
    meta = metadata(open_gguf(tmp_path / "model.gguf"))
    assert meta["tokenizer.ggml.eos_token_id"] == tiny.EOS_TOKEN_ID
    loaded = [load(str(p), drafter="none") for p in (tmp_path / "model.gguf", tmp_path / "ref")]
    ids = [set(tok.eos_token_ids) for _, tok in loaded]
    assert ids[0] == ids[1] == {ENDOFTEXT_ID, tiny.EOS_TOKEN_ID}
    for stop in sorted(ids[0]):
        prompt, before = _stopping_prompt(loaded[1][0].target, stop, ids[0] - {stop})
        for m, tok in loaded:
            responses = list(stream_generate(m, tok, prompt, max_tokens=12, num_draft=0))
            assert [t for r in responses for t in r.tokens] == before
            assert responses[-1].finish_reason == "stop"


def test_gemma_gguf_stop_ids_equal_the_safetensors_load(gemma):
    target_gguf, _, target_dir, _ = gemma
    ids = [set(load(str(p), drafter="none")[1].eos_token_ids) for p in (target_gguf, target_dir)]
    assert ids[0] == ids[1] == {1, 5}  # <eos>, <end_of_turn>
