"""convert / graft / inspect on tiny checkpoints (nothing downloaded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import tiny
from mlx_mtp import decode, load
from mlx_mtp.cli import main
from mlx_mtp.loading import CheckpointError
from mlx_mtp.loading.convert import convert
from mlx_mtp.loading.graft import graft
from mlx_mtp.loading.inspect import inspect_path
from mlx_mtp.testing import write_model_dir

PROMPT = [5, 17, 33, 2]


def greedy(sm, k=3, n=32):
    drafter = sm.drafter if k else None
    return [t for c in decode(sm.target, PROMPT, drafter=drafter, num_draft=k, max_tokens=n) for t in c.tokens]


def head_logits(target):
    P = mx.array([PROMPT])
    h = target.hidden(P)
    return np.array(target.logits(h)), np.array(target.logits(target.mtp(target.embed(P), h, target.make_mtp_cache())))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("convert") / "src")


@pytest.fixture(scope="module")
def stripped(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("convert") / "stripped", drop_mtp=True)


def test_convert_float_is_greedy_identical_and_loads_in_mlx_lm(src, tmp_path):
    import mlx_lm

    reference, _ = load(str(src))
    expected = greedy(reference, 0)
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        convert(src, out, dtype=dtype, progress=False)
        model, tok = load(str(out))
        assert model.drafter is not None
        assert greedy(model, 3) == greedy(model, 0)
        if dtype == "float32":
            for a, b in zip(head_logits(reference.target), head_logits(model.target)):
                np.testing.assert_array_equal(a, b)
            assert greedy(model, 3) == expected
        lm_model, _ = mlx_lm.load(str(out))  # plain mlx-lm loads the trunk
        assert "mtp" not in lm_model
        assert model.target.language_model.model.embed_tokens.weight.dtype == getattr(mx, dtype)


def test_convert_4bit_keeps_head_overrides(src, tmp_path):
    import mlx_lm

    out = tmp_path / "q4"
    config = convert(src, out, bits=4, group_size=32, progress=False)
    q = config["quantization"]
    assert (q["bits"], q["group_size"], q["mode"]) == (4, 32, "affine")
    assert q["mtp.fc"]["bits"] == 8 and q["mtp.layers.0.self_attn.q_proj"]["bits"] == 8
    assert q["language_model.model.layers.1.self_attn.q_proj"]["bits"] == 4
    model, _ = load(str(out))
    assert model.target.mtp.fc.bits == 8 and model.target.language_model.model.layers[1].self_attn.q_proj.bits == 4
    assert greedy(model, 3) == greedy(model, 0)
    mlx_lm.load(str(out))

    out16 = tmp_path / "q4-bf16-head"
    q = convert(src, out16, bits=4, group_size=32, mtp_dtype="bfloat16", progress=False)["quantization"]
    assert q["mtp.fc"] is False
    model, _ = load(str(out16))
    assert not hasattr(model.target.mtp.fc, "scales") and model.target.mtp.fc.weight.dtype == mx.bfloat16
    assert greedy(model, 3) == greedy(model, 0)

    outfp = tmp_path / "mxfp4"
    q = convert(src, outfp, mode="mxfp4", mtp_bits=6, progress=False)["quantization"]
    assert q["mode"] == "mxfp4" and q["mtp.fc"] == {"group_size": 64, "bits": 6, "mode": "affine"}
    model, _ = load(str(outfp))
    assert model.target.language_model.model.layers[1].self_attn.q_proj.mode == "mxfp4"
    assert greedy(model, 3) == greedy(model, 0)


def test_convert_streams_shards(src, tmp_path):
    out = tmp_path / "sharded"
    convert(src, out, max_shard_bytes=64 << 10, progress=False)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[0].endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    model, _ = load(str(out))
    assert greedy(model, 3) == greedy(load(str(src))[0], 0)


def test_convert_gguf(tmp_path):
    from mlx.utils import tree_unflatten

    from mlx_mtp.testing.gguf import write_qwen35_gguf

    config = tiny.hf_config(hidden_size=256, intermediate_size=512, head_dim=64,
                            linear_key_head_dim=64, linear_value_head_dim=64)
    model = tiny.build(config["text_config"], seed=1, predictable=True, noise=1.6)
    write_qwen35_gguf(model, config["text_config"], tmp_path / "m.gguf", qtype="Q4_K")
    out = tmp_path / "out"
    cfg = convert(str(tmp_path / "m.gguf"), out, progress=False)
    assert cfg["quantization"]["bits"] == 4 and cfg["quantization"]["group_size"] == 32
    assert (out / "tokenizer.json").exists()
    a, _ = load(str(tmp_path / "m.gguf"))
    b, tok = load(str(out))
    assert greedy(a, 3) == greedy(b, 3) == greedy(b, 0)
    assert tok.encode("hello world") == load(str(tmp_path / "m.gguf"))[1].encode("hello world")


def test_graft_into_stripped_quant(src, stripped, tmp_path):
    q4 = tmp_path / "q4"
    convert(stripped, q4, bits=4, group_size=32, progress=False)
    report = inspect_path(str(q4))
    assert not report["drafter"]["present"]
    assert any("graft" in w for w in report["warnings"])
    summary = graft(str(src), q4)
    assert summary["raw_source"] and summary["precision"] == "8-bit affine"
    model, _ = load(str(q4), drafter="mtp")
    assert model.target.mtp.fc.bits == 8
    assert greedy(model, 3) == greedy(model, 0)
    config = json.loads((q4 / "config.json").read_text())
    assert config["quantization"]["mtp.fc"]["bits"] == 8
    with pytest.raises(CheckpointError, match="already has mtp"):
        graft(str(src), q4)

    # float: the grafted head equals the original exactly
    f32 = tmp_path / "f32"
    convert(stripped, f32, dtype="float32", progress=False)
    graft(str(src), f32, mtp_dtype="float32")
    reference, _ = load(str(src))
    grafted, _ = load(str(f32))
    for a, b in zip(head_logits(reference.target), head_logits(grafted.target)):
        np.testing.assert_array_equal(a, b)


def test_graft_from_hub_downloads_only_head_shards(src, stripped, tmp_path, monkeypatch):
    import huggingface_hub

    # a sharded "hub repo": the head in a shard of its own
    repo = tmp_path / "repo"
    repo.mkdir()
    weights = mx.load(str(src / "model.safetensors"))
    head = {k: v for k, v in weights.items() if k.startswith("mtp.")}
    trunk = {k: v for k, v in weights.items() if k not in head}
    mx.save_safetensors(str(repo / "model-00001-of-00002.safetensors"), trunk)
    mx.save_safetensors(str(repo / "model-00002-of-00002.safetensors"), head)
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in trunk},
                            **{k: "model-00002-of-00002.safetensors" for k in head}}}
    (repo / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(src / "config.json", repo / "config.json")
    fetched = []

    def fake_download(repo_id, filename, revision=None, **kw):
        assert repo_id == "org/model"
        fetched.append(filename)
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    q4 = tmp_path / "q4"
    convert(stripped, q4, bits=4, group_size=32, progress=False)
    graft("org/model", q4)
    assert sorted(fetched) == ["config.json", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    model, _ = load(str(q4), drafter="mtp")
    assert greedy(model, 3) == greedy(model, 0)


def test_inspect_reports_and_warnings(src, tmp_path):
    report = inspect_path(str(src), drafter="mtp")
    assert report["architecture"] == "qwen3_5" and report["drafter"]["present"]
    assert report["compatibility"]["ok"] and report["parameters"] > 100_000 and not report["warnings"]

    # raw layout whose norms are already centred on 1: double-shift hazard
    bad = tmp_path / "double-shift"
    shutil.copytree(src, bad)
    w = mx.load(str(bad / "model.safetensors"))
    w = {k: (v + 1.0 if k.endswith("layernorm.weight") else v) for k, v in w.items()}
    mx.save_safetensors(str(bad / "model.safetensors"), w)
    assert any("shifted twice" in x for x in inspect_path(str(bad))["warnings"])

    # tokenizer with more ids than the embedding
    vocab = tmp_path / "vocab"
    shutil.copytree(src, vocab)
    config = json.loads((vocab / "config.json").read_text())
    config["text_config"]["vocab_size"] = 64
    (vocab / "config.json").write_text(json.dumps(config))
    assert any("vocab_size is 64" in x for x in inspect_path(str(vocab))["warnings"])

    c = inspect_path(str(src), drafter=str(src))["compatibility"]
    assert not c["ok"] and "not a drafter" in c["reason"]


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_error(result, code, fragment=""):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


def test_cli_convert_graft_inspect(src, stripped, tmp_path):
    r = run("convert", src, "-o", tmp_path / "q4", "--bits", "4", "--group-size", "32", "--quiet")
    assert r.exit_code == 0, r.output
    r = run("inspect", tmp_path / "q4", "--json", "--drafter", "mtp")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["drafter"]["present"] and report["quantization"]["mtp head"][0].startswith("8-bit")

    assert run("convert", stripped, "-o", tmp_path / "s4", "--bits", "4", "--group-size", "32", "--quiet").exit_code == 0
    r = run("inspect", tmp_path / "s4")
    assert r.exit_code == 0 and "mlx-mtp graft" in r.stdout
    r = run("graft", "--from", src, "--into", tmp_path / "s4")
    assert r.exit_code == 0, r.output
    assert "grafted" in r.stderr

    assert_error(run("convert", src, "-o", tmp_path / "q4"), 1, "not empty")
    assert_error(run("convert", src, "-o", tmp_path / "x", "--mode", "mxfp4", "--bits", "8"), 1, "mxfp4")
    assert_error(run("convert", src, "-o", tmp_path / "y", "--mtp-bits", "8", "--mtp-dtype", "bfloat16"), 2)
    assert_error(run("graft", "--from", src, "--into", tmp_path / "nowhere"), 1, "not a model directory")
    assert_error(run("inspect", tmp_path / "nowhere"), 1)
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 40)
    assert_error(run("inspect", corrupt), 1, "GGUF")
