"""Load safetensors checkpoints (raw HF or mlx-lm layout) keeping MTP heads.

mlx-lm does the heavy lifting (config parsing, per-layer quantization,
strict weight loading); we only swap in model classes that keep `mtp.*`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import load_model

from ..models.registry import UnsupportedArchitectureError, model_classes

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


def load_target(path: Path, lazy: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    config = read_config(path)
    checked_model_classes(config)  # fail early with a clear message
    shards = sorted(path.glob("model*.safetensors"))
    if not shards:
        raise CheckpointError(f"no model*.safetensors files in {path}")
    try:
        # Load lazily, then read the weights in batches under a progress bar.
        model, config = load_model(path, lazy=True, get_model_classes=checked_model_classes)
        if not lazy:
            materialize(model, path.name)
    except CheckpointError:
        raise
    except ValueError as e:
        # strict loading: missing / unexpected / mis-shaped parameters
        raise CheckpointError(f"{path}: weights do not match the config: {e}") from e
    except RuntimeError as e:
        # mx.load on a truncated or corrupt file
        raise CheckpointError(f"{path}: cannot read the safetensors files (corrupt or truncated?): {e}") from e
    return model, config
