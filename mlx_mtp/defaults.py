"""The bundled demo models and where they live: change defaults here.

`assets/` sits beside the package in a source checkout (and editable
installs); wheels carry it inside the package as `mlx_mtp/_assets`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

_HERE = Path(__file__).resolve().parent


def assets_dir() -> Path:
    for candidate in (_HERE / "_assets", _HERE.parent / "assets"):
        if candidate.is_dir():
            return candidate
    return _HERE.parent / "assets"


# Names accepted wherever a model path is (`-m demo-qwen`) -> folder in assets/.
DEMO_MODELS = {
    "tiny-qwen35": "tiny-qwen35",  # random weights: nonsense text, real drafting
    "demo-qwen": "demo-qwen",
    "demo-gemma": "demo-gemma",
}
# What `generate`, `chat` and `bench` use without -m: the first one present.
DEFAULT_MODEL_ORDER = ("demo-qwen", "tiny-qwen35")


def demo_model_path(name: str) -> Optional[Path]:
    if name in DEMO_MODELS:
        path = assets_dir() / DEMO_MODELS[name]
        if (path / "config.json").exists():
            return path
    return None


def default_model() -> str:
    """The name of the default bundled model."""
    for name in DEFAULT_MODEL_ORDER:
        if demo_model_path(name) is not None:
            return name
    return DEFAULT_MODEL_ORDER[-1]


def default_chat_model() -> str:
    """The directory `mlx-mtp chat` opens without -m."""
    path = demo_model_path(default_model())
    return str(path) if path is not None else default_model()


def prompt_suite() -> Path:
    """The bench prompt suite (JSON lines)."""
    return assets_dir() / "prompts.jsonl"
