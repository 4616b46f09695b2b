"""model_type -> (model class, its ModelArgs): every architecture we load.

`*_text` are text-only configs (no `text_config` nesting). Loaders ask here;
adding an architecture means one file under models/ and one row below.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Type

from . import deepseek_v3, gemma4, glm4_moe, glm4_moe_lite, qwen3_5
from . import mimo, qwen3_next
from .heads import HeadLayout

ARCHITECTURES: Dict[str, Tuple[Type, Type]] = {
    "qwen3_5": (qwen3_5.Model, qwen3_5.ModelArgs),
    "qwen3_5_text": (qwen3_5.Model, qwen3_5.ModelArgs),
    "qwen3_5_moe": (qwen3_5.MoeModel, qwen3_5.ModelArgs),
    "qwen3_5_moe_text": (qwen3_5.MoeModel, qwen3_5.ModelArgs),
    "gemma4": (gemma4.Model, gemma4.ModelArgs),
    "gemma4_text": (gemma4.TextModel, gemma4.TextModelArgs),
    "glm4_moe": (glm4_moe.Model, glm4_moe.ModelArgs),
    "deepseek_v3": (deepseek_v3.Model, deepseek_v3.ModelArgs),
    "glm4_moe_lite": (glm4_moe_lite.Model, glm4_moe_lite.ModelArgs),
    "qwen3_next": (qwen3_next.Model, qwen3_next.ModelArgs),
    "mimo": (mimo.Model, mimo.ModelArgs),
}

#: model_type -> model class (what mlx-lm's `load_model` needs from us).
MODEL_CLASSES: Dict[str, Type] = {name: cls for name, (cls, _) in ARCHITECTURES.items()}


def head_layout(config: Dict[str, Any]) -> Optional[HeadLayout]:
    """How this config's architecture stores its MTP head (models/heads.py),
    or None for architectures without one (Gemma 4 drafts with an assistant)."""
    model_class = ARCHITECTURES.get(config.get("model_type"), (None, None))[0]
    layout = getattr(model_class, "head_layout", None)
    return layout(config) if layout is not None else None


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
