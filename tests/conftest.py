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


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Every test (and every CLI subprocess it starts) reads and writes the
    calibration cache in a fresh directory: a `mlx-mtp tune` run on this
    machine would otherwise warm-start the adaptive policy differently from
    a clean CI machine, and no test may write into the user's cache."""
    import os

    saved = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if saved is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = saved


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3.5 model directory with its MTP head."""
    return write_model_dir(tmp_path_factory.mktemp("tiny-mtp") / "model")


@pytest.fixture(scope="session")
def tiny_model_dir_no_mtp(tmp_path_factory) -> Path:
    """The same model saved without the `mtp.*` weights."""
    return write_model_dir(tmp_path_factory.mktemp("tiny-no-mtp") / "model", drop_mtp=True)
