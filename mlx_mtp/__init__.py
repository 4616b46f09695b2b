"""mlx-mtp: lossless multi-token-prediction speculative decoding on MLX.

The public names import their module on first use. Importing the package
itself loads nothing heavy, so the `mlx-mtp` command (mlx_mtp.cli) is
running its own Ctrl-C handling before MLX, mlx-lm and transformers load:
a Ctrl-C during start-up exits 130 quietly instead of in an import traceback.
"""

from __future__ import annotations

import importlib
from typing import Any, List

__version__ = "0.1.0"

# public name -> the submodule that defines it
_EXPORTS = {
    "load": "api",
    "generate": "api",
    "stream_generate": "api",
    "decode": "engine",
    "make_drafter": "api",
    "SpeculativeModel": "api",
    "GenerationResponse": "api",
    "SamplingParams": "sampling",
    "Stats": "engine",
    "PromptCache": "engine",
    "Cycle": "engine",
    "ContextLengthError": "engine",
    "EmptyPromptError": "engine",
    "CorruptWeightsError": "engine",
    "DrafterUnavailableError": "api",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        # `import mlx_mtp; mlx_mtp.engine` kept working while the package
        # imported its submodules eagerly: keep it working.
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_EXPORTS))
