"""`mlx-mtp graft`: put the MTP head of an original HF checkpoint back
into an MLX quant that lost it in conversion.

Every family names its head in its own way on disk (models/heads.py):
`mtp.*` (Qwen3.5, Qwen3-Next), `model.layers.L.*` (DeepSeek-V3, GLM nextn),
`model.mtp_layers.K.*` (MiMo); the config's `HeadLayout` says which. From a
hub repo only the index and the shards that hold the head are downloaded.
The head is sanitized exactly as on loading (the +1 on zero-centred norms,
stacked experts, the nextn layer's duplicate embed_tokens dropped),
quantized to the requested precision, written as one more shard
(`model-mtp.safetensors`, which mlx-lm's `model*.safetensors` glob picks
up) under the family's own names (`mtp.*`, `model.layers.L.*`: mlx-lm's
`sanitize` drops them, so `mlx_lm.load` still loads the trunk; where it
would not, into `mtp.safetensors`, which it never reads), and recorded in config.json (the
family's layer count field, e.g. `mtp_num_hidden_layers` or
`num_nextn_predict_layers`, and per-layer quantization overrides).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from ..models.heads import HeadLayout, text_config
from ..models.registry import head_layout
from .convert import (
    DTYPES,
    HEAD_SIDE_FILE,
    Plan,
    _build_lazy,
    _quantize,
    head_namer,
    mlx_lm_drops_head,
    quant_params,
)
from .safetensors import CheckpointError, read_config

#: graft's shard, which mlx-lm's `model*.safetensors` glob reads (and its
#: sanitize drops); a head mlx-lm would keep goes to convert's HEAD_SIDE_FILE.
HEAD_FILE = "model-mtp.safetensors"


def _layout(config: Dict[str, Any], where: Union[str, Path]) -> HeadLayout:
    """The head layout of a checkpoint graft writes into; a one-line error
    for architectures without a built-in head."""
    layout = head_layout(config)
    if layout is None:
        raise CheckpointError(f"{where}: model type {config.get('model_type')!r} has no built-in MTP head to graft "
                              "(Gemma 4 drafts with an assistant model)")
    return layout


def weight_names(path: Path) -> Dict[str, str]:
    """{tensor name: shard file} of a local checkpoint (index or headers)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            return dict(json.load(f)["weight_map"])
    names = {}
    for f in sorted(path.glob("model*.safetensors")):
        for k in safetensors_header(f):
            names[k] = f.name
    return names


def safetensors_header(path: Path) -> Dict[str, Any]:
    """Tensor name -> {dtype, shape, data_offsets} without reading the data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file")
        n = int.from_bytes(raw, "little")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header") from e
    header.pop("__metadata__", None)
    return header


def _fetch_source(src: str, revision: Optional[str] = None) -> Tuple[Dict[str, Any], Optional[HeadLayout], List[Path]]:
    """(config, its head layout, shard files holding the head) for a local
    dir or a hub repo."""
    local = Path(src).expanduser()
    if local.is_dir():
        config = read_config(local)
        layout = head_layout(config)
        names = weight_names(local)
        files = sorted({names[k] for k in names if layout is not None and layout.is_head(k)})
        return config, layout, [local / f for f in files]
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from .hub import ModelNotFoundError

    try:
        config_path = hf_hub_download(src, "config.json", revision=revision)
    except Exception as e:
        raise ModelNotFoundError(f"cannot get config.json of {src!r} (not a local directory or reachable repo): {type(e).__name__}") from e
    with open(config_path) as f:
        config = json.load(f)
    layout = head_layout(config)
    if layout is None:  # nothing to download
        return config, None, []
    try:
        index_path = hf_hub_download(src, "model.safetensors.index.json", revision=revision)
    except EntryNotFoundError:
        index_path = None
    if index_path is None:
        return config, layout, [Path(hf_hub_download(src, "model.safetensors", revision=revision))]
    with open(index_path) as f:
        names = json.load(f)["weight_map"]
    files = sorted({names[k] for k in names if layout.is_head(k)})
    return config, layout, [Path(hf_hub_download(src, fn, revision=revision)) for fn in files]


def _looks_raw(head: Dict[str, mx.array], shards: List[Path]) -> bool:
    """Raw HF layout (zero-centred norms)? The conv1d layout decides as in
    mlx-lm when a shard holds one; else the norm weights: near 0 -> raw."""
    for f in shards:
        for k, info in safetensors_header(f).items():
            if "conv1d.weight" in k:
                return info["shape"][-1] != 1
    from ..models.qwen3_5 import zero_centred_norms

    return zero_centred_norms(head)


def graft(
    src: str,
    into: Union[str, Path],
    *,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    mtp_dtype: Optional[str] = None,
    revision: Optional[str] = None,
    force: bool = False,
) -> Dict[str, Any]:
    """Copy the MTP head from `src` into the MLX checkpoint `into`.
    Returns a summary dict (tensors, shards downloaded, precision, the
    head's layer count and the config field that records it)."""
    into = Path(into).expanduser()
    if not (into / "config.json").exists():
        raise CheckpointError(f"{into} is not a model directory (no config.json)")
    config = read_config(into)
    layout = _layout(config, into)
    existing = {**weight_names(into), **_side_names(into, config)}
    present = [k for k in existing if layout.is_head(k)]
    if present and not force:
        stored = "mtp.*" if all(k.startswith("mtp.") for k in present) else layout.stored_name
        raise CheckpointError(f"{into} already has {stored} weights (pass force to replace them)")
    src_config, src_layout, shards = _fetch_source(src, revision)
    n_layers = src_layout.declared_layers if src_layout is not None else 0
    if src_layout is None:
        raise CheckpointError(f"{src} has no MTP head (model type {src_config.get('model_type')!r} has none built in)")
    if not shards or n_layers == 0:
        raise CheckpointError(f"{src} has no MTP head (no {src_layout.stored_name} weights or "
                              f"{src_layout.config_field} is 0)")
    from .tensors import read_head_tensors

    head: Dict[str, mx.array] = {}
    # read_head_tensors filters by `key.match(name)`: the layout's test stands in for a pattern.
    is_head = SimpleNamespace(match=src_layout.is_head)
    for f in shards:
        for k, v in read_head_tensors(f, src_config, is_head).items():  # FP8 decoded, dtypes checked
            head[src_layout.local_key(k)] = v
    raw = _looks_raw(head, shards)

    # The config declares the head before the model is built, so the model
    # has its `mtp` module to plan and check against.
    text = text_config(config)
    recorded = int(text.get(layout.config_field, 0) or 0) != n_layers
    text[layout.config_field] = n_layers
    model = _build_lazy(config)
    head = {f"mtp.{k}": v for k, v in sanitize_head(model, layout, head, raw).items()}

    # Precision: explicit bits, float, or 8 bits inside a quantized model.
    trunk_q = config.get("quantization")
    if mtp_dtype is not None:
        if mtp_dtype not in DTYPES:
            raise ValueError(f"unknown dtype {mtp_dtype!r} (use {', '.join(DTYPES)})")
        target: Union[Dict[str, Any], str] = "float"
    elif bits is not None:
        target = quant_params("affine", bits, group_size or 64)
    elif trunk_q:
        target = quant_params("affine", 8, group_size or 64)
    else:
        target = "float"
    plan = Plan(model, None, target, None, DTYPES[mtp_dtype] if mtp_dtype else None)
    float_dtype = DTYPES[mtp_dtype] if mtp_dtype else _trunk_dtype(into, existing)
    out: Dict[str, mx.array] = {}
    groups: Dict[str, Dict[str, mx.array]] = {}
    for k, v in head.items():
        path, _, leaf = k.rpartition(".")
        groups.setdefault(path, {})[leaf] = v
    overrides: Dict[str, Any] = {}
    modules = dict(model.named_modules())
    for path, leaves in groups.items():
        params = plan.target(path)
        if params is None and path not in modules:
            raise CheckpointError(f"{src}: head tensor {path} does not fit the model of {into}")
        if params:
            for leaf, v in _quantize(leaves.pop("weight"), params, float_dtype).items():
                out[f"{path}.{leaf}"] = v
            overrides[path] = params
        elif params is False:
            overrides[path] = False
        for leaf, v in leaves.items():
            # The model's cast predicate keeps what mlx-lm keeps in float32
            # (GLM / DeepSeek routers' e_score_correction_bias), as convert does.
            cast = mx.issubdtype(v.dtype, mx.floating) and plan.cast_predicate(f"{path}.{leaf}")
            out[f"{path}.{leaf}"] = v.astype(float_dtype) if cast else v
    expected = {k for k, _ in _flat_params(model.mtp)}
    got = {k[len("mtp."):] for k in out}
    if not {_strip_q(k) for k in got} >= {_strip_q(k) for k in expected}:
        missing = sorted({_strip_q(k) for k in expected} - {_strip_q(k) for k in got})
        raise CheckpointError(f"{src}: the head lacks {', '.join(missing[:5])}")
    stored_as = head_namer(config)
    out = {stored_as(k): v for k, v in out.items()}
    head_file = HEAD_FILE if mlx_lm_drops_head(config, {k: tuple(v.shape) for k, v in out.items()}) else HEAD_SIDE_FILE
    mx.eval(out)
    if present:  # force: the new head is ready, so the old one may go
        _drop_head_tensors(into, existing, layout)
    mx.save_safetensors(str(into / head_file), out, metadata={"format": "mlx"})

    if trunk_q or any(overrides.values()):
        q = dict(trunk_q or {"group_size": 64, "bits": 8, "mode": "affine"})
        q.update(overrides)
        config["quantization"] = q
        config["quantization_config"] = q
    with open(into / "config.json", "w") as f:
        json.dump(config, f, indent=4)
    index = into / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            data = json.load(f)
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not layout.is_head(k)}
        data["weight_map"].update({k: head_file for k in out})
        data["weight_map"] = dict(sorted(data["weight_map"].items()))
        with open(index, "w") as f:
            json.dump(data, f, indent=4)
    return {
        "tensors": len(out),
        "file": head_file,
        "shards": [f.name for f in shards],
        "head_layers": n_layers,
        "config_field": layout.config_field,
        "config_field_written": recorded,
        "mtp_num_hidden_layers": n_layers,  # the older name of head_layers
        "precision": target if isinstance(target, str) else f"{target['bits']}-bit {target['mode']}",
        "raw_source": raw,
    }


def sanitize_head(model: nn.Module, layout: HeadLayout, head: Dict[str, mx.array], raw: bool) -> Dict[str, mx.array]:
    """Head tensors keyed by `layout.local_key` -> the `mtp` module's layout,
    as loading sanitizes them.

    Classes with a `side_head` slot (Qwen3.5, Qwen3-Next) shift zero-centred
    norms, which only the trunk's layout can vouch for: the layout's
    stateless `sanitize` gets graft's `raw` verdict on the source. Every
    other family's head is judged on its own, so the model's own `sanitize`
    runs on it exactly as loading will: it stacks each nextn layer's experts
    through mlx-lm's code, drops the duplicate `embed_tokens`, and drops
    modules the head was stored without (GLM-4.6's `shared_head.head`), so
    the completeness check below sees what loading will expect."""
    if hasattr(model, "side_head"):
        return layout.sanitize(head, raw)
    out = model.sanitize({f"mtp.{k}": v for k, v in head.items()})
    return {k[len("mtp."):]: v for k, v in out.items() if k.startswith("mtp.")}


def _drop_head_tensors(into: Path, names: Dict[str, str], layout: HeadLayout) -> None:
    """Rewrite each file that holds head tensors without them (delete it
    when nothing else is left). mlx-lm reads every `model*.safetensors`, never the index, so an old
    head left in a shard would load beside the new one (stale scales, or
    per-expert tensors that sanitize would stack over the new experts)."""
    for fname in sorted({f for k, f in names.items() if layout.is_head(k)}):
        shard = into / fname
        weights, metadata = mx.load(str(shard), return_metadata=True)
        kept = {k: v for k, v in weights.items() if not layout.is_head(k)}
        if not kept:  # a shard of the head alone (hub repos have them)
            del weights
            shard.unlink()
            continue
        tmp = shard.with_name(f".tmp-{fname}")  # ends in .safetensors, which mx.save_safetensors insists on
        mx.save_safetensors(str(tmp), kept, metadata=metadata or {"format": "mlx"})
        del weights, kept  # the lazy arrays read the old file: done with it before it is replaced
        tmp.replace(shard)


def _side_names(path: Path, config: Dict[str, Any]) -> Dict[str, str]:
    """{tensor name: file} of the head files beside the shards that an
    index may not list (mtp.safetensors)."""
    from .safetensors import side_head_files

    return {k: str(f.relative_to(path)) for f in side_head_files(path, config) for k in safetensors_header(f)}


def _strip_q(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.endswith((".scales", ".biases")) else name


def _flat_params(module) -> List[Tuple[str, Any]]:
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


def _trunk_dtype(path: Path, names: Dict[str, str]) -> mx.Dtype:
    """The float dtype of the trunk's norms (what the head's floats should match)."""
    for k, fname in names.items():
        if k.endswith("norm.weight"):
            info = safetensors_header(path / fname).get(k)
            if info:
                return {"BF16": mx.bfloat16, "F16": mx.float16}.get(info["dtype"], mx.float32)
    return mx.float32
