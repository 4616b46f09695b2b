"""inspect / convert / graft / side-file loading for MTP heads that a family
stores under its own names (models/heads.py), on tiny GLM-4.5 (`glm4_moe`)
checkpoints laid out as the released repos are (mlx_mtp.testing.glm4_moe:
bf16 shards + index, per-expert tensors, the nextn head as decoder layer
`num_hidden_layers` with its duplicate `embed_tokens`), and Qwen3.5's
`mtp.*` head unchanged.

Stored names followed: vLLM's deepseek_mtp.py / glm4_moe_mtp.py
(`get_spec_layer_idx_from_weight_name`: head layers are the indices from
`num_hidden_layers` on; `_rewrite_spec_layer_name`: `enorm`, `hnorm`,
`eh_proj`, `shared_head`, `embed_tokens` plus a full decoder block), and
mlx-lm's glm4_moe.py `sanitize`, which drops `model.layers.{num_hidden_layers}.*`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_mtp import Stats, decode, load
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.loading import CheckpointError, load_target
from mlx_mtp.loading.convert import convert
from mlx_mtp.loading.graft import HEAD_FILE, graft
from mlx_mtp.loading.inspect import _component, format_report, inspect_path
from mlx_mtp.models import registry
from mlx_mtp.testing import INDEX_NAME
from mlx_mtp.testing import glm4_moe as glm

PROMPT = [5, 17, 33, 2]
#: Residual noise of the predictable fixture: the head is right about a
#: third of the time, so drafts are both accepted and rejected.
NOISE = 1.6
LAYERS = glm.config()["num_hidden_layers"]
#: GLM's nextn head is decoder layer `num_hidden_layers` on disk.
HEAD = f"model.layers.{LAYERS}."
#: Quantized checkpoints below keep their other tensors in float32: in bf16
#: a one-row and a several-row pass of the quantized kernels may round a
#: near-tie differently (seen on the MLA family), and greedy equality
#: would then test the kernels, not the loading.
QUANT_DTYPE = "float32"


def _run(target, drafter=None, k=0):
    stats = Stats()
    out = [t for c in decode(target, PROMPT, drafter=drafter if k else None, num_draft=k, max_tokens=32,
                             stats=stats) for t in c.tokens]
    return out, stats


def _assert_lossless(target, ks=(1, 2, 3)):
    """Greedy speculative == plain at every k, with drafts both accepted and rejected."""
    plain, _ = _run(target)
    drafted = accepted = 0
    for k in ks:
        spec, stats = _run(target, MTPDrafter(target), k)
        assert spec == plain, k
        drafted, accepted = drafted + stats.draft_tokens, accepted + stats.accepted_tokens
    assert 0 < accepted < drafted


def _head_logits(target):
    """(trunk logits, head logits) on the prompt."""
    tokens = mx.array([PROMPT])
    hidden = target.hidden(tokens)
    state = target.mtp(target.embed(tokens), hidden, target.make_mtp_cache())
    return np.array(target.logits(hidden)), np.array(target.mtp_logits(state))


def _weight_map(path: Path) -> dict:
    return json.loads((path / INDEX_NAME).read_text())["weight_map"]


def _copy_without(src: Path, dst: Path, drop) -> Path:
    """A copy of a sharded checkpoint without the tensors `drop(name)` picks
    (shards and index rewritten): a partly stripped head."""
    shutil.copytree(src, dst)
    weight_map = _weight_map(dst)
    for shard in sorted(set(weight_map.values())):
        kept = {k: v for k, v in mx.load(str(src / shard)).items() if not drop(k)}
        mx.save_safetensors(str(dst / shard), kept, metadata={"format": "pt"})
    index = json.loads((dst / INDEX_NAME).read_text())
    index["weight_map"] = {k: v for k, v in weight_map.items() if not drop(k)}
    (dst / INDEX_NAME).write_text(json.dumps(index))
    return dst


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """A raw HF GLM-4.5 checkpoint with its nextn head."""
    return glm.write_model_dir(tmp_path_factory.mktemp("glm") / "raw", noise=NOISE)


@pytest.fixture(scope="module")
def stripped_raw(tmp_path_factory) -> Path:
    """The same checkpoint without the head's tensors (config still declares it)."""
    return glm.write_model_dir(tmp_path_factory.mktemp("glm") / "stripped", noise=NOISE, drop_mtp=True)


@pytest.fixture(scope="module")
def lm_q4(raw, tmp_path_factory) -> Path:
    """mlx-lm's own 4-bit conversion of `raw`: its sanitize drops the nextn
    layer, so this is the stripped quant users graft into."""
    import mlx_lm

    out = tmp_path_factory.mktemp("glm") / "lm-q4"
    mlx_lm.convert(hf_path=str(raw), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32, dtype=QUANT_DTYPE)
    return out


@pytest.fixture(scope="module")
def f32(raw, tmp_path_factory) -> Path:
    """`raw` converted by mlx-mtp to float32, head kept."""
    out = tmp_path_factory.mktemp("glm") / "f32"
    convert(raw, out, dtype="float32", progress=False)
    return out


# --- the layouts themselves ----------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(registry.ARCHITECTURES))
def test_every_family_has_a_consistent_layout(model_type):
    config = {"model_type": model_type, "num_hidden_layers": LAYERS, "num_nextn_predict_layers": 1,
              "mtp_num_hidden_layers": 1}
    layout = registry.head_layout(config)
    if layout is None:  # drafts with an assistant model, no built-in head
        assert model_type.startswith("gemma4")
        return
    assert layout.declared_layers == 1 and layout.config_field in config
    for local in ("layers.0.enorm.weight", "layers.0.self_attn.q_proj.weight"):
        stored = layout.stored_key(local)
        assert layout.local_key(stored) == local and stored.startswith(layout.stored_name.rstrip("*"))
        assert layout.local_key(f"mtp.{local}") == local  # older mlx-mtp output and repacks: `mtp.*` everywhere
    for trunk in ("model.embed_tokens.weight", "lm_head.weight", f"model.layers.{LAYERS - 1}.mlp.gate.weight",
                  f"model.language_model.layers.{LAYERS - 1}.self_attn.q_proj.weight"):
        assert not layout.is_head(trunk), trunk
    if model_type == "glm4_moe":
        assert layout.stored_name == f"{HEAD}*" and layout.is_head(f"{HEAD}enorm.weight")


# --- inspect ------------------------------------------------------------------------


def test_inspect_raw_nextn_head(raw):
    weight_map = _weight_map(raw)
    head = sorted(k for k in weight_map if k.startswith(HEAD))
    assert f"{HEAD}embed_tokens.weight" in head and f"{HEAD}mlp.experts.3.down_proj.weight" in head
    report = inspect_path(str(raw), drafter="mtp")
    assert report["drafter"] == {"present": True, "kind": "mtp", "declared_layers": 1, "tensors": len(head),
                                 "files": sorted({weight_map[k] for k in head})}
    assert report["kind"] == "hf" and report["context_length"] == glm.config()["max_position_embeddings"]
    assert report["missing_tensors"] == [] and report["warnings"] == [] and report["compatibility"]["ok"]
    assert report["quantization"]["mtp head"] == ["bf16"]
    assert f"mtp head, 1 layer(s), {len(head)} tensors from" in format_report(report)

    layout = registry.head_layout(glm.config())
    assert _component(f"{HEAD}self_attn.q_proj.weight", layout) == "mtp head"
    assert _component(f"{HEAD}embed_tokens.weight", layout) == "mtp head"
    assert _component(f"model.layers.{LAYERS - 1}.self_attn.q_proj.weight", layout) == "attention"
    assert _component("model.embed_tokens.weight", layout) == "embeddings"


def test_inspect_stripped_partial_and_undeclared_nextn_heads(raw, stripped_raw, tmp_path):
    report = inspect_path(str(stripped_raw), drafter="mtp")
    assert report["warnings"] == [
        f"config declares num_nextn_predict_layers=1 but the weights have no {HEAD}* tensors (stripped by a "
        f"conversion): run `mlx-mtp graft --from <original HF repo> --into {stripped_raw}`"]
    assert not report["drafter"]["present"] and not report["compatibility"]["ok"]
    model, _ = load(str(stripped_raw))  # loads, plain decoding, and says why
    assert model.drafter is None and "num_nextn_predict_layers=1" in model.target.mtp_problem

    gone = (f"{HEAD}eh_proj.weight", f"{HEAD}hnorm.weight")
    partial = _copy_without(raw, tmp_path / "partial", lambda k: k in gone)
    report = inspect_path(str(partial), drafter="auto")
    assert report["missing_tensors"] == ["mtp.layers.0.eh_proj.weight", "mtp.layers.0.hnorm.weight"]
    assert not report["drafter"]["present"] and not report["compatibility"]["ok"]
    stored = sum(k.startswith(HEAD) for k in _weight_map(raw)) - len(gone)
    (warning,) = [w for w in report["warnings"] if "incomplete" in w]
    assert f"{stored} {HEAD}* tensors are stored but 2 are missing" in warning
    assert f"stored as {', '.join(gone)}" in warning and "graft" in warning
    with pytest.raises(CheckpointError, match="do not match the config"):  # what the warning promises
        load(str(partial), drafter="none")
    graft(str(raw), partial, force=True, bits=8)  # the fix it names
    assert not any(k.startswith(HEAD) and f != HEAD_FILE for k, f in _weight_map(partial).items())
    for shard in sorted(partial.glob("model-0*.safetensors")):  # the old head is gone from the shards too
        assert not any(k.startswith(HEAD) for k in mx.load(str(shard)))
    model, _ = load(str(partial), drafter="mtp")
    assert model.target.mtp.layers[0].eh_proj.bits == 8
    _assert_lossless(model.target, ks=(2,))

    undeclared = glm.write_model_dir(tmp_path / "undeclared", noise=NOISE, declare_mtp=False)
    report = inspect_path(str(undeclared), drafter="mtp")
    assert report["warnings"] == [f"{HEAD}* weights are present but the config declares no head: set "
                                  "num_nextn_predict_layers to the head's layer count"]
    assert report["drafter"]["declared_layers"] == 0 and not report["drafter"]["present"]
    target, _ = load_target(undeclared)
    assert not target.has_mtp and "declares no MTP head" in target.mtp_problem

    for path in (stripped_raw, partial, undeclared):
        assert all("\n" not in w and "mtp_num_hidden_layers" not in w for w in inspect_path(str(path))["warnings"])


# --- convert -------------------------------------------------------------------------


def test_convert_keeps_the_nextn_head(raw, f32, tmp_path):
    import mlx_lm

    # float: the head survives bit for bit, drafts decode to the float model's greedy output
    reference, _ = load_target(raw)
    reference.update(tree_map(lambda p: p.astype(mx.float32), reference.parameters()))  # bf16 values, f32 maths
    model, _ = load(str(f32))
    assert json.loads((f32 / "config.json").read_text())["num_nextn_predict_layers"] == 1
    for a, b in zip(_head_logits(reference), _head_logits(model.target)):
        np.testing.assert_array_equal(a, b)
    assert _run(model.target, model.drafter, 2)[0] == _run(reference)[0]

    # 4-bit trunk: the head's modules (attention, experts, eh_proj,
    # shared_head.head) stay at 8 bits through per-layer overrides; the
    # down projections read 32 features, too few for the head's groups of
    # 64, so they stay float (recorded as `false`)
    q4 = tmp_path / "q4"
    q = convert(raw, q4, bits=4, group_size=32, dtype=QUANT_DTYPE, progress=False)["quantization"]
    head_modules = ["mtp.layers.0.eh_proj", "mtp.layers.0.self_attn.q_proj", "mtp.layers.0.mlp.switch_mlp.gate_proj",
                    "mtp.layers.0.mlp.shared_experts.up_proj", "mtp.layers.0.shared_head.head"]
    assert all(q[m] == {"group_size": 64, "bits": 8, "mode": "affine"} for m in head_modules)
    assert q["mtp.layers.0.mlp.switch_mlp.down_proj"] is False
    assert (q["bits"], q["group_size"]) == (4, 32) and q["model.layers.1.self_attn.q_proj"]["bits"] == 4
    # stored under GLM's own names, which mlx-lm drops: plain mlx_lm.load loads the trunk
    stored = _weight_map(q4)
    assert not any(k.startswith("mtp.") for k in stored) and f"{HEAD}eh_proj.scales" in stored
    lm_model, _ = mlx_lm.load(str(q4))
    assert "mtp" not in lm_model
    model, _ = load(str(q4))
    mtp = model.target.mtp.layers[0]
    assert mtp.eh_proj.bits == mtp.mlp.switch_mlp.gate_proj.bits == mtp.shared_head.head.bits == 8
    assert model.target.model.layers[1].self_attn.q_proj.bits == 4
    _assert_lossless(model.target)
    report = inspect_path(str(q4), drafter="mtp")
    assert report["kind"] == "mlx" and report["compatibility"]["ok"] and not report["warnings"]
    assert report["quantization"]["mtp head"][0] == "8-bit affine g64"
    assert report["quantization"]["attention"] == ["4-bit affine g32"]


# --- graft ------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["glm-4.5", "glm-4.6"])
def test_graft_restores_a_stripped_nextn_head(raw, lm_q4, tmp_path, style):
    """Into mlx-lm's own 4-bit conversion (head dropped, and here its config
    field removed too). GLM-4.6 stores no `shared_head.head` or duplicate
    `embed_tokens`: the trunk's lm_head serves, and graft must not ask for them."""
    import mlx_lm

    src = raw if style == "glm-4.5" else glm.write_model_dir(tmp_path / "src", noise=NOISE, shared_head_head=False)
    q4 = tmp_path / "q4"
    shutil.copytree(lm_q4, q4)
    config = json.loads((q4 / "config.json").read_text())
    del config["num_nextn_predict_layers"]
    (q4 / "config.json").write_text(json.dumps(config))
    assert inspect_path(str(q4))["drafter"]["present"] is False

    summary = graft(str(src), q4)
    assert summary["precision"] == "8-bit affine" and summary["head_layers"] == 1
    assert summary["config_field"] == "num_nextn_predict_layers" and summary["config_field_written"]
    config = json.loads((q4 / "config.json").read_text())
    assert config["num_nextn_predict_layers"] == 1 and config["quantization"]["mtp.layers.0.eh_proj"]["bits"] == 8
    stored = {k for k, f in _weight_map(q4).items() if f == HEAD_FILE}
    assert stored and all(k.startswith(HEAD) for k in stored) and f"{HEAD}embed_tokens.weight" not in stored
    assert (f"{HEAD}shared_head.head.scales" in stored) == (style == "glm-4.5")

    model, _ = load(str(q4), drafter="mtp")
    mtp = model.target.mtp.layers[0]
    assert mtp.eh_proj.bits == mtp.mlp.switch_mlp.up_proj.bits == 8
    assert ("head" in mtp.shared_head) == (style == "glm-4.5")
    _assert_lossless(model.target)
    mlx_lm.load(str(q4))  # still loads the trunk
    report = inspect_path(str(q4), drafter="mtp")
    assert report["drafter"]["files"] == [HEAD_FILE] and report["compatibility"]["ok"] and not report["warnings"]

    with pytest.raises(CheckpointError, match=rf"already has {HEAD}\* weights"):
        graft(str(src), q4)


def test_graft_float_head_is_exact_and_refusals(raw, stripped_raw, f32, tmp_path):
    into = tmp_path / "f32-stripped"
    convert(stripped_raw, into, dtype="float32", progress=False)
    summary = graft(str(raw), into, mtp_dtype="float32")
    assert summary["precision"] == "float" and not summary["config_field_written"]
    grafted, _ = load_target(into)
    converted, _ = load_target(f32)
    for a, b in zip(_head_logits(converted), _head_logits(grafted)):
        np.testing.assert_array_equal(a, b)
    assert {k: v.dtype for k, v in tree_flatten(grafted.mtp.parameters())} == \
        {k: v.dtype for k, v in tree_flatten(converted.mtp.parameters())}  # router bias stays float32 in both

    with pytest.raises(CheckpointError, match=rf"has no MTP head \(no {HEAD}\* weights or num_nextn_predict_layers"):
        graft(str(stripped_raw), tmp_path / "f32-stripped", force=True)


# --- a head in its own file -----------------------------------------------------------------


def test_nextn_head_in_a_side_file(raw, lm_q4, tmp_path):
    """mlx-lm's 4-bit trunk with the raw head copied beside it as
    mtp.safetensors (in no index): loaded, inspected and converted with it."""
    side = tmp_path / "side"
    shutil.copytree(lm_q4, side)
    weight_map = _weight_map(raw)
    head = {}
    for shard in sorted({weight_map[k] for k in weight_map if k.startswith(HEAD)}):
        head.update({k: v for k, v in mx.load(str(raw / shard)).items() if k.startswith(HEAD)})
    mx.save_safetensors(str(side / "mtp.safetensors"), head)

    target, _ = load_target(side)
    assert target.has_mtp and target.mtp_problem is None
    _assert_lossless(target)
    report = inspect_path(str(side), drafter="mtp")
    assert report["drafter"]["files"] == ["mtp.safetensors"] and report["drafter"]["tensors"] == len(head)
    assert report["compatibility"]["ok"] and not report["warnings"]

    converted = tmp_path / "converted"
    convert(side, converted, progress=False)  # keeps the trunk's 4 bits, the head as stored (bf16)
    again, _ = load_target(converted)
    assert again.has_mtp and again.mtp_problem is None
    _assert_lossless(again)


# --- Qwen3.5 unchanged -----------------------------------------------------------------------


def test_qwen_messages_and_names_unchanged(tiny_model_dir, tiny_model_dir_no_mtp, tmp_path):
    assert inspect_path(str(tiny_model_dir_no_mtp))["warnings"] == [
        "config declares mtp_num_hidden_layers=1 but the weights have no mtp.* tensors (stripped by a "
        f"conversion): run `mlx-mtp graft --from <original HF repo> --into {tiny_model_dir_no_mtp}`"]
    undeclared = tmp_path / "undeclared"
    shutil.copytree(tiny_model_dir, undeclared)
    config = json.loads((undeclared / "config.json").read_text())
    config["text_config"]["mtp_num_hidden_layers"] = 0
    (undeclared / "config.json").write_text(json.dumps(config))
    assert "mtp.* weights are present but the config declares no head: set text_config.mtp_num_hidden_layers " \
           "to the head's layer count" in inspect_path(str(undeclared))["warnings"]
    layout = registry.head_layout(config)
    assert layout.stored_name == "mtp.*" and layout.stored_key("mtp.fc.weight") == "mtp.fc.weight"
    assert _component("mtp.fc.weight", layout) == "mtp head"
    assert _component("model.language_model.layers.0.linear_attn.in_proj_qkvz.weight", layout) == "linear attention"


# --- the other families ------------------------------------------------------------------------


def _family_writer(family: str):
    """The fixture writer of a family (raw HF layout, bf16 shards + index)."""
    from mlx_mtp.testing import deepseek, mimo, qwen3_next

    return {
        "qwen3_next": lambda path, **kw: qwen3_next.write_model_dir(path, noise=NOISE, **kw),
        "mimo": lambda path, **kw: mimo.write_model_dir(path, noise=NOISE, **kw),
        "glm4_moe_lite": lambda path, **kw: deepseek.write_model_dir(path, "glm4_moe_lite", **kw),
    }[family]


@pytest.mark.parametrize("family", ["qwen3_next", "mimo", "glm4_moe_lite"])
def test_convert_and_graft_every_family(family, tmp_path):
    """Qwen3-Next (`mtp.*`), MiMo (`model.mtp_layers.K.*`), GLM-4.7-Flash
    (`model.layers.L.*`, MLA): convert keeps the head and graft restores it
    into mlx-lm's own (stripping) conversion; both still load in plain
    mlx-lm. Qwen3-Next's mlx-lm sanitize keeps `mtp.*` in an already
    converted checkpoint, so its head goes to mtp.safetensors, out of
    mlx-lm's sight."""
    import mlx_lm

    raw = _family_writer(family)(tmp_path / "raw")
    config = json.loads((raw / "config.json").read_text())
    layout = registry.head_layout(config)
    beside = family == "qwen3_next"

    q4 = tmp_path / "q4"
    # small shards: the head, where it goes apart, streams into several files of its own too
    convert(raw, q4, bits=4, group_size=32, dtype=QUANT_DTYPE, progress=False, max_shard_bytes=16 << 10)
    head = {k: f for k, f in _weight_map(q4).items() if layout.is_head(k)}
    head_files = set(head.values())
    n = len(head_files)
    assert n > 1 and all((f.startswith("mtp-") and f.endswith(f"-of-{n:05d}.safetensors")) if beside
                         else f.startswith("model-") for f in head_files)
    assert not any(f.startswith("mtp") for f in set(_weight_map(q4).values()) - head_files)
    assert all(k.startswith(layout.stored_name.rstrip("*")) for k in head)
    mlx_lm.load(str(q4))
    model, _ = load(str(q4), drafter="mtp")
    assert inspect_path(str(q4), drafter="mtp")["compatibility"]["ok"]
    _assert_lossless(model.target, ks=(2,))

    stripped = tmp_path / "lm-q4"
    mlx_lm.convert(hf_path=str(raw), mlx_path=str(stripped), quantize=True, q_bits=4, q_group_size=32,
                   dtype=QUANT_DTYPE)
    (warning,) = inspect_path(str(stripped))["warnings"]
    assert f"{layout.config_field}=1" in warning and f"no {layout.stored_name} tensors" in warning
    summary = graft(str(raw), stripped)
    assert summary["file"] == ("mtp.safetensors" if beside else HEAD_FILE)
    mlx_lm.load(str(stripped))
    model, _ = load(str(stripped), drafter="mtp")
    assert not inspect_path(str(stripped), drafter="mtp")["warnings"]
    _assert_lossless(model.target, ks=(2,))
