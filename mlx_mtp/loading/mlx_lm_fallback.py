"""Checkpoints of architectures we have no class for (models/registry.py):
mlx-lm's own model classes load them, exactly as `mlx_lm.load` would, and
`MlxLmTarget` makes them targets for prompt lookup (docs/ngram.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from mlx_lm.utils import _get_classes, load_model

from ..models.mlx_lm_target import MlxLmTarget
from ..models.registry import ARCHITECTURES
from .safetensors import CheckpointError, materialize


def is_ours(config: Dict[str, Any]) -> bool:
    """True when one of our model classes loads this config."""
    return config.get("model_type") in ARCHITECTURES


def mlx_lm_module(config: Dict[str, Any]) -> Optional[str]:
    """The mlx-lm module whose classes load this config (mlx_lm.models.llama),
    or None when mlx-lm has none."""
    try:
        model_class, _ = _get_classes(config)
    except (ValueError, KeyError):
        return None
    return model_class.__module__


def load_mlx_lm_target(path: Path, config: Dict[str, Any], lazy: bool = False) -> Tuple[MlxLmTarget, Dict[str, Any]]:
    model_type = config.get("model_type")
    if mlx_lm_module(config) is None:
        raise CheckpointError(
            f"model type {model_type!r} is supported neither by mlx-mtp (supported: "
            f"{', '.join(sorted(ARCHITECTURES))}) nor by this mlx-lm"
        )
    try:
        model, config = load_model(path, lazy=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"no model*.safetensors files in {path}") from e
    except ValueError as e:  # strict loading: missing / unexpected / mis-shaped parameters
        raise CheckpointError(f"{path}: weights do not match the config: {' '.join(str(e).split())}") from e
    if not lazy:
        materialize(model, path.name)
    try:
        target = MlxLmTarget(model, config)
    except ValueError as e:  # no trunk module to split off
        raise CheckpointError(str(e)) from e
    if not lazy:  # the check runs the model once, which would read lazy weights
        problem = target.split_problem()
        if problem:
            raise CheckpointError(problem)
    return target, config


def rollback_problem_for(config: Dict[str, Any]) -> Optional[str]:
    """Why drafts could not be rolled back on this checkpoint (None: they
    can), from its config alone: the model is built without weights (MLX
    arrays are lazy, so nothing is allocated) just to look at its cache."""
    if is_ours(config):
        return None  # ours roll back at every length (models/rollback.py)
    from mlx_lm.models.cache import make_prompt_cache

    from ..models.rollback import rollback_problem

    model_class, args_class = _get_classes(config)
    return rollback_problem(make_prompt_cache(model_class(args_class.from_dict(config))))
