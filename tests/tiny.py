"""Tests build their tiny checkpoints with mlx_mtp.testing."""

from mlx_mtp.testing import *  # noqa: F401,F403
from mlx_mtp.testing import VOCAB, build, hf_config, save_hf_checkpoint, text_config  # noqa: F401
