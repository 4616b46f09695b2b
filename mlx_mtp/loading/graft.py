"""`mlx-mtp graft`: put the `mtp.*` head of an original HF checkpoint back
into an MLX quant that lost it in conversion.

From a hub repo only the index and the shards that hold the head are
downloaded. The head is sanitized exactly as on loading (the +1 on
zero-centred norms, fused experts), quantized to the requested precision,
written as one more shard (`model-mtp.safetensors`, which mlx-lm's
`model*.safetensors` glob picks up) and recorded in config.json
(`mtp_num_hidden_layers` and per-layer quantization overrides).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import mlx.core as mx

from .convert import DTYPES, Plan, _build_lazy, _quantize, quant_params
from .safetensors import CheckpointError, read_config

HEAD_FILE = "model-mtp.safetensors"
_MTP_KEY = re.compile(r"^(?:model\.|language_model\.|language_model\.model\.|model\.language_model\.)?mtp\.(.+)$")


def _text(config: Dict[str, Any]) -> Dict[str, Any]:
    return config.get("text_config", config)


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


def _fetch_source(src: str, revision: Optional[str] = None) -> Tuple[Dict[str, Any], List[Path]]:
    """(config, shard files holding the head) for a local dir or a hub repo."""
    local = Path(src).expanduser()
    if local.is_dir():
        config = read_config(local)
        names = weight_names(local)
        files = sorted({names[k] for k in names if _MTP_KEY.match(k)})
        return config, [local / f for f in files]
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from .hub import ModelNotFoundError

    try:
        config_path = hf_hub_download(src, "config.json", revision=revision)
    except Exception as e:
        raise ModelNotFoundError(f"cannot get config.json of {src!r} (not a local directory or reachable repo): {type(e).__name__}") from e
    with open(config_path) as f:
        config = json.load(f)
    try:
        index_path = hf_hub_download(src, "model.safetensors.index.json", revision=revision)
    except EntryNotFoundError:
        index_path = None
    if index_path is None:
        return config, [Path(hf_hub_download(src, "model.safetensors", revision=revision))]
    with open(index_path) as f:
        names = json.load(f)["weight_map"]
    files = sorted({names[k] for k in names if _MTP_KEY.match(k)})
    return config, [Path(hf_hub_download(src, fn, revision=revision)) for fn in files]


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
    Returns a summary dict (tensors, shards downloaded, precision)."""
    from ..models.qwen3_5 import _sanitize_mtp

    into = Path(into).expanduser()
    if not (into / "config.json").exists():
        raise CheckpointError(f"{into} is not a model directory (no config.json)")
    config = read_config(into)
    existing = weight_names(into)
    if any(_MTP_KEY.match(k) for k in existing) and not force:
        raise CheckpointError(f"{into} already has mtp.* weights (pass force to replace them)")
    src_config, shards = _fetch_source(src, revision)
    n_layers = int(_text(src_config).get("mtp_num_hidden_layers", 0) or 0)
    if not shards or n_layers == 0:
        raise CheckpointError(f"{src} has no MTP head (no mtp.* weights or mtp_num_hidden_layers is 0)")
    from .tensors import read_head_tensors

    head: Dict[str, mx.array] = {}
    for f in shards:
        for k, v in read_head_tensors(f, src_config, _MTP_KEY).items():  # FP8 decoded, dtypes checked
            head[_MTP_KEY.match(k).group(1)] = v
    raw = _looks_raw(head, shards)
    head = {f"mtp.{k}": v for k, v in _sanitize_mtp(head, raw).items()}

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
    _text(config)["mtp_num_hidden_layers"] = n_layers
    model = _build_lazy(config)
    plan = Plan(model, None, target, None, DTYPES[mtp_dtype] if mtp_dtype else None)
    float_dtype = DTYPES[mtp_dtype] if mtp_dtype else _trunk_dtype(into, existing)
    out: Dict[str, mx.array] = {}
    groups: Dict[str, Dict[str, mx.array]] = {}
    for k, v in head.items():
        path, _, leaf = k.rpartition(".")
        groups.setdefault(path, {})[leaf] = v
    overrides: Dict[str, Any] = {}
    for path, leaves in groups.items():
        params = plan.target(path)
        if params is None and path not in dict(model.named_modules()):
            raise CheckpointError(f"{src}: head tensor {path} does not fit the model of {into}")
        if params:
            for leaf, v in _quantize(leaves.pop("weight"), params, float_dtype).items():
                out[f"{path}.{leaf}"] = v
            overrides[path] = params
        elif params is False:
            overrides[path] = False
        for leaf, v in leaves.items():
            out[f"{path}.{leaf}"] = v.astype(float_dtype) if mx.issubdtype(v.dtype, mx.floating) else v
    expected = {k for k, _ in _flat_params(model.mtp)}
    got = {k[len("mtp."):] for k in out}
    if not {_strip_q(k) for k in got} >= {_strip_q(k) for k in expected}:
        missing = sorted({_strip_q(k) for k in expected} - {_strip_q(k) for k in got})
        raise CheckpointError(f"{src}: the head lacks {', '.join(missing[:5])}")
    mx.eval(out)
    mx.save_safetensors(str(into / HEAD_FILE), out, metadata={"format": "mlx"})

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
        data["weight_map"] = {k: v for k, v in data["weight_map"].items() if not _MTP_KEY.match(k)}
        data["weight_map"].update({k: HEAD_FILE for k in out})
        data["weight_map"] = dict(sorted(data["weight_map"].items()))
        with open(index, "w") as f:
            json.dump(data, f, indent=4)
    return {
        "tensors": len(out),
        "shards": [f.name for f in shards],
        "mtp_num_hidden_layers": n_layers,
        "precision": target if isinstance(target, str) else f"{target['bits']}-bit {target['mode']}",
        "raw_source": raw,
    }


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
