"""mlx-mtp: lossless multi-token-prediction speculative decoding on MLX."""

from .engine import ContextLengthError, Cycle, PromptCache, Stats, decode
from .api import (
    DrafterUnavailableError,
    GenerationResponse,
    SpeculativeModel,
    generate,
    load,
    make_drafter,
    stream_generate,
)
from .sampling import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "load",
    "generate",
    "stream_generate",
    "decode",
    "make_drafter",
    "SpeculativeModel",
    "GenerationResponse",
    "SamplingParams",
    "Stats",
    "PromptCache",
    "Cycle",
    "ContextLengthError",
    "DrafterUnavailableError",
]
