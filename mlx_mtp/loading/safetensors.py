"""Load safetensors checkpoints (raw HF or mlx-lm layout) keeping MTP heads.

mlx-lm does the heavy lifting (config parsing, per-layer quantization,
strict weight loading); we only swap in model classes that keep `mtp.*`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_model

from ..models.experts import fit_experts_to_device
from ..models.heads import HeadLayout
from ..models.qwen3_5 import SideHead
from ..models.registry import UnsupportedArchitectureError, head_layout, model_classes

#: Shards mlx-lm's `load_model` reads; anything else in the directory it never sees.
SHARD_GLOB = "model*.safetensors"
#: Where MTP heads shipped beside the trunk live: `mtp.safetensors`, or
#: `mtp-00001-of-00002.safetensors` with its own `mtp.safetensors.index.json`.
HEAD_GLOB = "mtp*.safetensors"
HEAD_INDEXES = ("model.safetensors.index.json", "mtp.safetensors.index.json")


class CheckpointError(ValueError):
    pass


def read_config(path: Path) -> Dict[str, Any]:
    try:
        with open(path / "config.json") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {e}") from e


def checked_model_classes(config: Dict[str, Any]):
    """(Model, ModelArgs) for a config; CheckpointError when unsupported."""
    try:
        return model_classes(config)
    except UnsupportedArchitectureError as e:
        raise CheckpointError(str(e)) from None


def load_strict(model: nn.Module, weights: Dict[str, mx.array], *, lazy: bool, error) -> None:
    """Load `weights` into `model` with every parameter accounted for;
    `error(detail)` builds the exception for a mismatch. Reads them from
    disk now unless `lazy`."""
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise error(str(e)) from e
    if not lazy:
        mx.eval(model.parameters())


def materialize(model: nn.Module, label: str, batch_bytes: int = 256 << 20) -> None:
    """Evaluate (read from disk) every parameter, with a progress bar on
    stderr for models big enough to take a while."""
    from mlx.utils import tree_flatten
    from tqdm.auto import tqdm

    params = [v for _, v in tree_flatten(model.parameters())]
    total = sum(p.nbytes for p in params)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {label}",
              disable=total < (512 << 20), leave=False) as bar:
        batch, size = [], 0
        for p in params:
            batch.append(p)
            size += p.nbytes
            if size >= batch_bytes:
                mx.eval(batch)
                bar.update(size)
                batch, size = [], 0
        mx.eval(batch)
        bar.update(size)


def side_head_files(path: Path, config: Dict[str, Any]) -> List[Path]:
    """Safetensors files beside the trunk that hold an MTP head but that
    mlx-lm's `model*.safetensors` glob misses: `mtp*.safetensors`, a file an
    index maps head tensors to (the family's own names, `HeadLayout`), and
    MTPLX's `mlx_lm_extra_tensors.mtp_file`. None for an architecture
    without a built-in head."""
    layout = head_layout(config)
    if layout is None:
        return []
    names = {p.name for p in path.glob(HEAD_GLOB)}
    for index in HEAD_INDEXES:
        names |= {f for k, f in _weight_map(path / index).items() if layout.is_head(k)}
    extra = config.get("mlx_lm_extra_tensors")
    if isinstance(extra, dict) and extra.get("mtp_file"):
        names.add(str(extra["mtp_file"]))
    shards = {p.name for p in path.glob(SHARD_GLOB)}
    return [path / n for n in sorted(names - shards) if (path / n).is_file()]


def _weight_map(index: Path) -> Dict[str, str]:
    """An index's tensor -> file map; {} when there is no readable one (mlx-lm
    never reads the index, so a broken one costs only the side-file lookup)."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return {}
    return {str(k): str(v) for k, v in weight_map.items()} if isinstance(weight_map, dict) else {}


def read_side_head(path: Path, config: Dict[str, Any]) -> Optional[SideHead]:
    """The `SideHead` in the files `side_head_files` names (None if none),
    keyed by the layout's `local_key` (`fc.weight`, `layers.0.enorm.weight`)."""
    files = side_head_files(path, config)
    if not files:
        return None
    layout = head_layout(config)
    weights: Dict[str, mx.array] = {}
    for f in files:
        head, _ = layout.split(mx.load(str(f)))  # head tensors only: a side file adds nothing else
        weights.update(head)
    return SideHead(weights, tuple(str(f.relative_to(path)) for f in files)) if weights else None


def offer_side_head(model: nn.Module, weights: Dict[str, mx.array], side: Optional[SideHead],
                    layout: Optional[HeadLayout]) -> Dict[str, mx.array]:
    """Hand a side-file head to `model` before its `sanitize` runs; returns
    the weights to sanitize. Classes with a `side_head` slot (Qwen3.5, which
    judge a side head's norms apart from the trunk's) take it there; any
    other family gets it merged in as `mtp.*`, which its layout reads as
    head keys, but only when the shards hold no head: one in the shards
    (graft's model-mtp.safetensors) wins over a stale side file."""
    if side is None or layout is None:
        return weights
    if hasattr(model, "side_head"):
        model.side_head = side
        return weights
    if any(layout.is_head(k) for k in weights):
        return weights
    return {**weights, **{f"mtp.{k}": v for k, v in side.weights.items()}}


def _classes_with_side_head(side: SideHead) -> Callable[[Dict[str, Any]], Tuple[Any, Any]]:
    """`get_model_classes` for mlx-lm's `load_model` that hands the model its
    side-file head before `load_model` calls `sanitize` (the only hook it has:
    the class's `side_head` slot, else the instance's `sanitize` wrapped)."""

    def get_classes(config: Dict[str, Any]):
        model_class, args_class = checked_model_classes(config)
        layout = head_layout(config)

        def build(args):
            model = model_class(args)
            if hasattr(model, "side_head"):
                model.side_head = side
            else:
                sanitize = model.sanitize
                model.sanitize = lambda weights: sanitize(offer_side_head(model, weights, side, layout))
            return model

        return build, args_class

    return get_classes


def load_target(path: Path, lazy: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    config = read_config(path)
    from .mlx_lm_fallback import is_ours, load_mlx_lm_target

    if not is_ours(config):  # any other architecture mlx-lm loads: a target for prompt lookup
        return load_mlx_lm_target(path, config, lazy=lazy)
    checked_model_classes(config)  # fail early with a clear message
    shards = sorted(path.glob(SHARD_GLOB))
    if not shards:
        raise CheckpointError(f"no model*.safetensors files in {path}")
    try:
        # Load lazily, then read the weights in batches under a progress bar.
        from .fp8 import is_fp8, load_fp8_model

        if is_fp8(config):  # mlx-lm reads these as raw bytes: decode them ourselves
            model = load_fp8_model(path, config)
        else:
            side = read_side_head(path, config)
            classes = _classes_with_side_head(side) if side else checked_model_classes
            model, config = load_model(path, lazy=True, get_model_classes=classes)
        fit_experts_to_device(model)
        if not lazy:
            materialize(model, path.name)
    except CheckpointError:
        raise
    except ValueError as e:
        # strict loading: missing / unexpected / mis-shaped parameters
        raise CheckpointError(f"{path}: weights do not match the config: {' '.join(str(e).split())}") from e
    except KeyError as e:
        # a sanitize that gathers tensors by name (mlx-lm stacking experts 0..E-1) found one missing
        raise CheckpointError(f"{path}: weights do not match the config: tensor {e.args[0]!r} is missing "
                              "(a sanitize step needs it)") from e
    except RuntimeError as e:
        # mx.load on a truncated or corrupt file
        raise CheckpointError(f"{path}: cannot read the safetensors files (corrupt or truncated?): {e}") from e
    return model, config
