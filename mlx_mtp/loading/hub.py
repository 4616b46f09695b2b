"""Resolve a local directory or a Hugging Face repo id to a local directory.

Downloads go through huggingface_hub (with its progress bars) and are skipped
when the files are already cached; with no network a cached snapshot is used.
"""

from __future__ import annotations

import re
from pathlib import Path

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt", "*.tiktoken"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_path(path_or_repo: str, revision: str | None = None) -> Path:
    from ..defaults import demo_model_path

    demo = demo_model_path(str(path_or_repo))
    if demo is not None:  # a bundled demo model by name
        return demo
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{path} is a file: pass the model directory")
        if path.is_dir() and not (path / "config.json").exists():
            raise ModelNotFoundError(f"{path} has no config.json: not a model directory")
        return path
    if not _REPO_ID.match(str(path_or_repo)) or str(path_or_repo).startswith((".", "/", "~")):
        raise ModelNotFoundError(f"no such file or directory: {path_or_repo}")
    return _snapshot(str(path_or_repo), revision)


def _snapshot(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:  # cached already: no network needed at all
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=WEIGHT_PATTERNS))
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise ModelNotFoundError(f"Hugging Face repo {repo_id!r} not found or not accessible") from e
    except Exception as e:  # network errors come in many types
        raise ModelNotFoundError(
            f"{repo_id!r} is not a local path and could not be downloaded "
            f"(offline or no such repo?): {type(e).__name__}"
        ) from e
