"""model_type -> (model class, its ModelArgs): every architecture we load.

`*_text` are text-only configs (no `text_config` nesting). Loaders ask here;
adding an architecture means one file under models/ and one row below.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple, Type

from . import gemma4, qwen3_5

ARCHITECTURES: Dict[str, Tuple[Type, Type]] = {
    "qwen3_5": (qwen3_5.Model, qwen3_5.ModelArgs),
    "qwen3_5_text": (qwen3_5.Model, qwen3_5.ModelArgs),
    "qwen3_5_moe": (qwen3_5.MoeModel, qwen3_5.ModelArgs),
    "qwen3_5_moe_text": (qwen3_5.MoeModel, qwen3_5.ModelArgs),
    "gemma4": (gemma4.Model, gemma4.ModelArgs),
    "gemma4_text": (gemma4.TextModel, gemma4.TextModelArgs),
}

#: model_type -> model class (what mlx-lm's `load_model` needs from us).
MODEL_CLASSES: Dict[str, Type] = {name: cls for name, (cls, _) in ARCHITECTURES.items()}


class UnsupportedArchitectureError(ValueError):
    pass


def model_classes(config: Dict[str, Any]) -> Tuple[Type, Type]:
    """(Model, ModelArgs) for a config, or a one-line error naming what we support."""
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return ARCHITECTURES[model_type]
