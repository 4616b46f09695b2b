"""Shared fixtures: complete tiny model directories (weights + tokenizer).

Nothing is downloaded: mlx_mtp.testing builds the checkpoint and a
tokenizer in-process with the `tokenizers` library.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from mlx_mtp.testing import (  # noqa: E402,F401
    CHAT_TEMPLATE,
    EOS_TOKEN,
    EOS_TOKEN_ID,
    SPECIAL_TOKENS,
    build_tokenizer,
    write_model_dir,
    write_tokenizer,
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3.5 model directory with its MTP head."""
    return write_model_dir(tmp_path_factory.mktemp("tiny-mtp") / "model")


@pytest.fixture(scope="session")
def tiny_model_dir_no_mtp(tmp_path_factory) -> Path:
    """The same model saved without the `mtp.*` weights."""
    return write_model_dir(tmp_path_factory.mktemp("tiny-no-mtp") / "model", drop_mtp=True)
