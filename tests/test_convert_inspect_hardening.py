"""convert / inspect on inputs they used to get wrong: FP8 repos, the
Qwen3.5-MoE router override, corrupt (NaN / Inf, truncated) weights, a
bundled assistant, partly stripped heads, unknown architectures, drafter
arguments. Tiny checkpoints only; nothing is downloaded."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

import tiny
from mlx_mtp import decode, load
from mlx_mtp.api import DrafterUnavailableError
from mlx_mtp.cli import main
from mlx_mtp.defaults import demo_model_path
from mlx_mtp.loading import CheckpointError, load_target
from mlx_mtp.loading.convert import convert
from mlx_mtp.loading.fp8 import FP8_DTYPE, dequantize
from mlx_mtp.loading.inspect import inspect_path
from mlx_mtp.testing import write_model_dir
from mlx_mtp.testing.fp8 import REAL_BLOCK, decode_e4m3, read_raw, retag, write_fp8_model_dir

PROMPT = [5, 17, 33, 2]
# Not a divisor of any tiny dimension (64, 96, 128): every matrix has
# partial edge blocks in both directions.
EDGE_BLOCK = (48, 40)


def greedy(sm, k=3, n=24):
    drafter = sm.drafter if k else None
    return [t for c in decode(sm.target, PROMPT, drafter=drafter, num_draft=k, max_tokens=n) for t in c.tokens]


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        if f.is_file():
            digest.update(str(f).encode() + f.read_bytes())
    return digest.hexdigest()


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], env={"HF_HUB_OFFLINE": "1"})


def assert_error(result, code, fragment=""):
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.stderr


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def src(root):
    return write_model_dir(root / "src")


@pytest.fixture(scope="module")
def fp8_dirs(root):
    return {block: write_fp8_model_dir(root / f"fp8-{block[0]}x{block[1]}", block=block)
            for block in (REAL_BLOCK, EDGE_BLOCK)}


def corrupt_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of `src` whose model.safetensors went through `edit(weights)`."""
    shutil.copytree(src, dst)
    weights = dict(mx.load(str(dst / "model.safetensors")))
    edit(weights)
    mx.save_safetensors(str(dst / "model.safetensors"), weights)
    return dst


# --- FP8 ----------------------------------------------------------------------------


def test_from_fp8_matches_an_independent_e4m3_decoder():
    codes = np.arange(256, dtype=np.uint8)
    ours, reference = np.array(mx.from_fp8(mx.array(codes), dtype=mx.float32)), decode_e4m3(codes)
    assert np.array_equal(np.isnan(ours), np.isnan(reference)) and np.isnan(reference).sum() == 2
    finite = ~np.isnan(reference)
    assert np.array_equal(ours[finite], reference[finite])
    assert np.nanmax(reference) == 448.0


def reference_weights(fp8_dir: Path, block) -> dict:
    """The FP8 file decoded with numpy alone: codes x scale repeated over
    each block (edge blocks cut), then rounded once to bf16."""
    raw = {name: (dtype, value) for name, dtype, value in read_raw(fp8_dir / "model.safetensors")}
    out = {}
    for name, (dtype, value) in raw.items():
        if name.endswith("_scale_inv"):
            continue
        if dtype == FP8_DTYPE:
            scale = raw[name + "_scale_inv"][1]
            rows, cols = value.shape[-2:]
            full = np.repeat(np.repeat(scale, block[0], axis=-2), block[1], axis=-1)[..., :rows, :cols]
            out[name] = mx.array(decode_e4m3(value) * full).astype(mx.bfloat16)
        else:
            out[name] = mx.array(value).astype(mx.bfloat16)
    return out


@pytest.mark.parametrize("block", [REAL_BLOCK, EDGE_BLOCK], ids=["128x128", "edge-blocks"])
def test_fp8_load_equals_dequantized_reference(fp8_dirs, root, block):
    fp8_dir = fp8_dirs[block]
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == list(block)
    # the bf16 checkpoint an exact dequantization gives, written without FP8
    ref_dir = root / f"reference-{block[0]}x{block[1]}"
    ref_dir.mkdir()
    mx.save_safetensors(str(ref_dir / "model.safetensors"), reference_weights(fp8_dir, block))
    config.pop("quantization_config")
    (ref_dir / "config.json").write_text(json.dumps(config))

    fp8_model, _ = load_target(fp8_dir)
    ref_model, _ = load_target(ref_dir)
    ours, theirs = dict(tree_flatten(fp8_model.parameters())), dict(tree_flatten(ref_model.parameters()))
    assert ours.keys() == theirs.keys() and any(k.startswith("mtp.") for k in ours)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        assert mx.array_equal(ours[name], theirs[name]).item(), name

    model, _ = load(str(fp8_dir))
    assert model.drafter is not None
    assert greedy(model, 3) == greedy(model, 0)


def test_dequantize_checks_the_scale_grid():
    codes = mx.to_fp8(mx.ones((70, 50)))
    with pytest.raises(CheckpointError, match=r"needs \[2, 2\]"):
        dequantize(codes, mx.ones((1, 1)), (64, 32), "w")
    w = dequantize(codes, mx.array([[1.0, 2.0], [4.0, 8.0]]), (64, 32), "w")
    assert w.dtype == mx.bfloat16 and w.shape == (70, 50)
    assert (w[0, 0].item(), w[0, 49].item(), w[69, 0].item(), w[69, 49].item()) == (1.0, 2.0, 4.0, 8.0)


@pytest.mark.parametrize("options", [{"bits": 4, "group_size": 32}, {"mode": "mxfp4"}], ids=["4-bit", "mxfp4"])
def test_fp8_converts_keeping_the_head(fp8_dirs, tmp_path, options):
    out = tmp_path / "out"
    config = convert(fp8_dirs[REAL_BLOCK], out, progress=False, **options)
    assert "quant_method" not in config.get("quantization_config", {})
    q = config["quantization"]
    assert q["mtp.fc"] == {"group_size": 64, "bits": 8, "mode": "affine"}
    model, _ = load(str(out), drafter="mtp")
    assert model.target.mtp.fc.bits == 8
    assert greedy(model, 3) == greedy(model, 0)


def test_fp8_variants_and_foreign_quantization_are_refused(fp8_dirs, src, tmp_path):
    fp8_dir = fp8_dirs[REAL_BLOCK]

    def with_config(name, base, change):
        path = tmp_path / name
        shutil.copytree(base, path)
        config = json.loads((path / "config.json").read_text())
        change(config)
        (path / "config.json").write_text(json.dumps(config))
        return path

    cases = {
        "e5m2": (with_config("e5m2", fp8_dir, lambda c: c["quantization_config"].update(fmt="e5m2")), "e5m2"),
        "unlabelled": (with_config("unlabelled", fp8_dir, lambda c: c.pop("quantization_config")),
                       "no quantization_config with quant_method fp8"),
        "awq": (with_config("awq", src, lambda c: c.update(quantization_config={"quant_method": "awq", "bits": 4})),
                "'awq' is not supported"),
    }
    scale = "model.language_model.layers.0.mlp.down_proj.weight_scale_inv"
    cases["no-scale"] = (corrupt_copy(fp8_dir, tmp_path / "no-scale", lambda w: w.pop(scale)), "has no .*_scale_inv")
    for name, (path, message) in cases.items():
        if name == "no-scale":  # saved again by MLX: put the FP8 tag back
            retag(path / "model.safetensors", {n: FP8_DTYPE for n, d, _ in read_raw(fp8_dir / "model.safetensors")
                                                if d == FP8_DTYPE})
        before = tree_hash(path)
        with pytest.raises(CheckpointError, match=message):
            convert(path, tmp_path / f"{name}-out", bits=4, progress=False)
        assert not (tmp_path / f"{name}-out").exists(), name
        assert tree_hash(path) == before


def test_graft_from_an_fp8_repo_decodes_the_head(fp8_dirs, tmp_path):
    from mlx_mtp.loading.graft import graft

    q4 = tmp_path / "q4"
    convert(write_model_dir(tmp_path / "stripped", drop_mtp=True), q4, bits=4, group_size=32, progress=False)
    graft(str(fp8_dirs[REAL_BLOCK]), q4)
    grafted, _ = load(str(q4), drafter="mtp")
    reference, _ = load_target(fp8_dirs[REAL_BLOCK])
    fc = grafted.target.mtp.fc
    w = mx.dequantize(fc.weight, fc.scales, fc.biases, group_size=fc.group_size, bits=fc.bits)
    ref = reference.mtp.fc.weight.astype(mx.float32)
    assert mx.max(mx.abs(w - ref)).item() < 0.02 * mx.max(mx.abs(ref)).item()  # 8-bit error, not raw codes
    assert greedy(grafted, 3) == greedy(grafted, 0)


def test_fp8_moe_fused_experts_load(tmp_path):
    # fused 3-D experts: `experts.gate_up_proj` with `experts.gate_up_proj_scale_inv` [E, rows, cols]
    model, _ = load(str(write_fp8_model_dir(tmp_path / "moe", block=EDGE_BLOCK, moe=True)))
    assert model.drafter is not None and model.target.language_model.model.layers[0].mlp.gate.weight.dtype == mx.bfloat16
    assert greedy(model, 3) == greedy(model, 0)


def test_convert_holds_about_one_shard_in_memory(tmp_path):
    """Source arrays are dropped once written: before, every tensor read
    stayed referenced, and the peak was the whole model (a 27B FP8 repo
    dequantized to bf16: 54 GB)."""
    from mlx_mtp.testing import bandwidth_config

    src = write_model_dir(tmp_path / "src", config=bandwidth_config(hidden=256, layers=8, vocab=1024), noise=0.3)
    size = (src / "model.safetensors").stat().st_size
    # Arrays other tests keep alive (module fixtures) count in the peak too.
    gc.collect()
    held = mx.get_active_memory()
    mx.reset_peak_memory()
    convert(src, tmp_path / "out", max_shard_bytes=1 << 20, progress=False)
    peak = mx.get_peak_memory() - held
    assert peak < size / 4, (peak, size)


# --- Qwen3.5-MoE routers --------------------------------------------------------------


def test_moe_convert_4bit_quantizes_routers_at_8_bits(tmp_path):
    config = tiny.hf_config(moe=True)
    model = tiny.build(config["text_config"], seed=1, predictable=True, noise=1.6)
    tiny.save_hf_checkpoint(model, tmp_path / "moe", config)
    tiny.write_tokenizer(tmp_path / "moe")
    q = convert(tmp_path / "moe", tmp_path / "q4", bits=4, group_size=32, progress=False)["quantization"]
    router = q["language_model.model.layers.0.mlp.gate"]
    assert router == {"mode": "affine", "group_size": 64, "bits": 8}
    loaded, _ = load(str(tmp_path / "q4"), drafter="mtp")
    assert loaded.target.language_model.model.layers[0].mlp.gate.bits == 8
    assert greedy(loaded, 3) == greedy(loaded, 0)


# --- corrupt weights ------------------------------------------------------------------

NAN_TENSOR = "model.language_model.layers.1.mlp.down_proj.weight"
INF_TENSOR = "mtp.fc.weight"


@pytest.fixture(scope="module")
def nan_dir(src, root):
    def poison(w):
        a = np.array(w[NAN_TENSOR])
        a[3, 5] = np.nan
        w[NAN_TENSOR] = mx.array(a)
        b = np.array(w[INF_TENSOR])
        b[0, 0] = np.inf
        w[INF_TENSOR] = mx.array(b)

    return corrupt_copy(src, root / "nan", poison)


def test_convert_refuses_nan_and_inf_and_leaves_nothing(nan_dir, tmp_path):
    before = tree_hash(nan_dir)
    out = tmp_path / "out"
    # small shards: some are on disk before the bad tensors come up
    with pytest.raises(CheckpointError) as e:
        convert(nan_dir, out, max_shard_bytes=16 << 10, progress=False)
    message = str(e.value)
    assert "\n" not in message and "NaN or Inf" in message
    assert "layers.1.mlp.down_proj.weight (NaN)" in message and "mtp.fc.weight (Inf)" in message
    assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError):
        convert(nan_dir, empty, bits=4, max_shard_bytes=16 << 10, progress=False)
    assert empty.is_dir() and not any(empty.iterdir())
    assert tree_hash(nan_dir) == before


def test_convert_to_float16_refuses_values_that_overflow(src, tmp_path):
    # bfloat16 / float32 weights can hold magnitudes float16 turns into Inf:
    # the cast must not write silent garbage (the NaN / Inf scan reads the
    # source, which is finite).
    def scale(w):
        w[NAN_TENSOR] = w[NAN_TENSOR] * 0 + 1.0e6

    big = corrupt_copy(src, tmp_path / "big", scale)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError) as e:
        convert(big, out, dtype="float16", max_shard_bytes=16 << 10, progress=False)
    assert "\n" not in str(e.value) and "does not fit float16" in str(e.value) and "--dtype bfloat16" in str(e.value)
    assert not out.exists()
    convert(big, tmp_path / "bf16", dtype="bfloat16", progress=False)  # bfloat16 holds it


def test_inspect_verify(nan_dir, src):
    with pytest.raises(CheckpointError, match=r"2 tensor\(s\) hold NaN or Inf"):
        inspect_path(str(nan_dir), verify=True)
    assert "verified" not in inspect_path(str(nan_dir))  # without --verify only headers are read
    report = inspect_path(str(src), verify=True)
    assert report["verified"] == len(mx.load(str(src / "model.safetensors")))
    r = run("inspect", src, "--verify")
    assert r.exit_code == 0 and "no NaN or Inf" in r.stdout
    assert_error(run("inspect", nan_dir, "--verify"), 1, "mtp.fc.weight (Inf)")


def test_truncated_safetensors_is_one_line(src, tmp_path):
    bad = tmp_path / "truncated"
    shutil.copytree(src, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    before = tree_hash(bad)
    assert_error(run("inspect", bad), 1, "truncated safetensors file")
    assert_error(run("convert", bad, "-o", tmp_path / "out", "--quiet"), 1, "truncated")
    assert not (tmp_path / "out").exists() and tree_hash(bad) == before


# --- layouts convert cannot place -----------------------------------------------------


def test_convert_refuses_tensors_that_do_not_fit(src, tmp_path):
    extra = corrupt_copy(src, tmp_path / "extra", lambda w: w.update({"model.language_model.foo.weight": mx.ones((4,))}))
    with pytest.raises(CheckpointError, match="no place for.*foo.weight"):
        convert(extra, tmp_path / "o1", progress=False)
    partial = corrupt_copy(src, tmp_path / "partial", lambda w: w.pop("mtp.fc.weight"))
    with pytest.raises(CheckpointError, match="missing.*mtp.fc.weight"):
        convert(partial, tmp_path / "o2", progress=False)
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# --- inspect reports --------------------------------------------------------------------


def test_inspect_partly_stripped_head(src, tmp_path):
    head = sorted(k for k in mx.load(str(src / "model.safetensors")) if k.startswith("mtp."))
    gone = head[:3]
    partial = corrupt_copy(src, tmp_path / "partial", lambda w: [w.pop(k) for k in gone])
    report = inspect_path(str(partial), drafter="auto")
    assert report["missing_tensors"] == sorted(gone)
    assert not report["drafter"]["present"] and not report["compatibility"]["ok"]
    warning = next(w for w in report["warnings"] if "incomplete" in w)
    assert f"{len(head) - 3} mtp.* tensors are stored but 3 are missing" in warning
    assert all(k in warning for k in gone) and "loading fails with every --drafter" in warning
    with pytest.raises(CheckpointError, match="do not match the config"):  # what the warning promises
        load(str(partial), drafter="none")
    assert inspect_path(str(src))["missing_tensors"] == []


def test_inspect_context_length_and_unknown_architecture(src, tmp_path):
    assert inspect_path(str(src))["context_length"] == 2048
    assert "context       2,048 tokens" in run("inspect", src).stdout
    unknown = tmp_path / "unknown"
    shutil.copytree(src, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    refusal = "model type 'frobnicator' is supported neither by mlx-mtp"
    assert_error(run("inspect", unknown), 1, refusal)
    assert_error(run("generate", "-m", unknown, "hi"), 1, refusal)


def test_inspect_an_architecture_only_mlx_lm_loads(tmp_path):
    from mlx_mtp.testing.mlx_lm_models import write_model_dir as write_mlx_lm_model

    report = inspect_path(str(write_mlx_lm_model(tmp_path / "llama")))
    assert report["loader"] == "mlx-lm (mlx_lm.models.llama)" and report["missing_tensors"] == []
    assert not report["drafter"]["present"]


DEMO_GEMMA = demo_model_path("demo-gemma")
needs_demo_gemma = pytest.mark.skipif(DEMO_GEMMA is None or not (DEMO_GEMMA / "assistant").is_dir(),
                                      reason="assets/demo-gemma is not built")


@needs_demo_gemma
def test_inspect_reports_the_bundled_assistant():
    report = inspect_path("demo-gemma", drafter="auto")
    d = report["drafter"]
    assert d["present"] and d["bundled"] and d["kind"] == "gemma4-assistant" and d["problem"] is None
    assert report["compatibility"]["ok"] and "bundled assistant" in report["compatibility"]["reason"]
    assert not inspect_path("demo-gemma", drafter="mtp")["compatibility"]["ok"]
    assert "bundled gemma4-assistant" in run("inspect", "demo-gemma").stdout


@needs_demo_gemma
@pytest.mark.parametrize("options", [(), ("--bits", "4")], ids=["float", "4-bit"])
def test_convert_carries_the_bundled_assistant(tmp_path, options):
    out = tmp_path / "out"
    r = run("convert", "demo-gemma", "-o", out, "--quiet", *options)
    assert r.exit_code == 0, r.output
    assert "assistant/ drafter copied as it is" in r.stderr
    for f in (DEMO_GEMMA / "assistant").iterdir():
        assert (out / "assistant" / f.name).read_bytes() == f.read_bytes()
    model, _ = load(str(out))
    assert model.drafter is not None and model.drafter.name == "gemma4-assistant"


# --- drafter arguments: one check everywhere --------------------------------------------


def test_drafter_arguments_are_checked_the_same_way(src):
    refusal = "'demo-qwen' is a bundled demo model, not a drafter"
    assert_error(run("generate", "-m", src, "--drafter", "demo-qwen", "hi"), 2, refusal)
    assert_error(run("inspect", src, "--drafter", "demo-qwen"), 2, refusal)
    with pytest.raises(DrafterUnavailableError, match=refusal):
        load(str(src), drafter="demo-qwen")
    c = inspect_path(str(src), drafter="demo-qwen")["compatibility"]
    assert not c["ok"] and refusal in c["reason"]
    assert_error(run("inspect", src, "--drafter", "eagle"), 2, "'eagle' is not auto, none, mtp")


@needs_demo_gemma
def test_mismatch_names_the_architecture(src):
    with pytest.raises(DrafterUnavailableError) as e:
        load(str(src), drafter=str(DEMO_GEMMA / "assistant"))
    assert "not qwen3_5" in str(e.value) and "Model" not in str(e.value)
