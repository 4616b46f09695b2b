"""Loading targets and drafters: hub / local directories and safetensors."""

from .hub import ModelNotFoundError, resolve_model_path
from .safetensors import CheckpointError, load_target

__all__ = ["ModelNotFoundError", "resolve_model_path", "CheckpointError", "load_target"]
