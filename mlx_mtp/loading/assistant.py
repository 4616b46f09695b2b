"""Loading drafter models: the Gemma 4 assistant (safetensors directory,
repo id or GGUF file) and the `assistant/` folder a model may ship with.

Everything that reads a drafter checkpoint lives here; `drafters/` only
wraps a loaded model, and `models/` only defines it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn

from ..drafters.gemma4_assistant import Gemma4AssistantDrafter
from ..models.gemma4_assistant import AssistantArgs, AssistantError, Gemma4Assistant, sanitize
from .hub import resolve_model_path
from .safetensors import load_strict

#: A model directory holding this subfolder drafts with it by default (demo-gemma).
BUNDLED_ASSISTANT_DIR = "assistant"
#: config.json's model_type of a Gemma 4 assistant checkpoint.
ASSISTANT_MODEL_TYPE = "gemma4_assistant"
#: What a drafter argument may be besides a drafter model's path or repo id.
DRAFTER_MODES = ("auto", "none", "mtp", "ngram")
#: `<model drafter>+ngram`: prompt lookup in front of that drafter (drafters/combined.py);
#: `assistant+ngram` names the model's bundled assistant.
LOOKUP_SUFFIX = "+ngram"
ASSISTANT_MODE = "assistant"


def drafter_problem(value: str) -> Optional[str]:
    """Why `value` cannot name a drafter (one line), or None: auto / none /
    mtp, an existing path, or an owner/name repo id. Every front end checks
    a drafter argument with this, so they accept and refuse the same values."""
    from ..defaults import DEMO_MODELS
    from .hub import _REPO_ID

    if value in DRAFTER_MODES or Path(value).expanduser().exists():
        return None
    if value.endswith(LOOKUP_SUFFIX) and value != LOOKUP_SUFFIX:  # mtp+ngram, assistant+ngram, PATH+ngram
        model = value[: -len(LOOKUP_SUFFIX)]
        if model in ("mtp", ASSISTANT_MODE) or (model not in DRAFTER_MODES and drafter_problem(model) is None):
            return None
        return f"{value!r}: only mtp, assistant or a drafter model's path or repo id go before {LOOKUP_SUFFIX}"
    if value in DEMO_MODELS:
        return (f"{value!r} is a bundled demo model, not a drafter (demo-gemma drafts with its own "
                "assistant/ under --drafter auto)")
    if _REPO_ID.match(value) and not value.startswith((".", "/", "~")):
        return None
    return f"{value!r} is not auto, none, mtp, ngram, mtp+ngram, assistant+ngram, a drafter directory or a repo id"


def load_assistant(path: Path, lazy: bool = False) -> Gemma4Assistant:
    """Load an assistant checkpoint directory (safetensors, HF or MLX layout,
    optionally quantized the mlx-lm way)."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AssistantError(f"{path}: cannot read config.json: {e}") from e
    args = AssistantArgs.from_config(config)
    shards = sorted(path.glob("model*.safetensors"))
    if not shards:
        raise AssistantError(f"no model*.safetensors files in {path}")
    weights: Dict[str, mx.array] = {}
    try:
        for shard in shards:
            weights.update(mx.load(str(shard)))
    except RuntimeError as e:
        raise AssistantError(f"{path}: cannot read the safetensors files: {e}") from e
    weights = sanitize(weights, args.tie_word_embeddings)
    note = None
    if args.use_ordered_embeddings and not {
        "masked_embedding.token_ordering", "masked_embedding.centroids.weight"
    } <= set(weights):
        # E2B/E4B assistants converted by tools that drop the ordered-embedding
        # tensors: the dense tied head gives the exact logits the sparse head
        # approximates, at the cost of a full-vocabulary matmul per draft step.
        note = (
            f"{path.name}: config says use_ordered_embeddings but the sparse-head tensors are missing "
            "(dropped by a conversion?); drafting with the dense tied head instead (exact, but slower "
            "per draft step)"
        )
        args.use_ordered_embeddings = False
        weights = {k: v for k, v in weights.items() if not k.startswith("masked_embedding.")}
    model = Gemma4Assistant(args)
    model.load_note = note
    quantization = config.get("quantization")
    if quantization:
        overrides = {k: v for k, v in quantization.items() if isinstance(v, (dict, bool))}

        def predicate(p: str, m: nn.Module):
            if p in overrides:
                return overrides[p]
            return hasattr(m, "to_quantized") and f"{p}.scales" in weights

        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=predicate,
        )
    load_strict(model, weights, lazy=lazy, error=lambda e: AssistantError(f"{path}: weights do not match the config: {e}"))
    model.eval()
    gen = path / "generation_config.json"
    if gen.exists():
        try:
            n = json.loads(gen.read_text()).get("num_assistant_tokens")
            model.num_assistant_tokens = int(n) if n else None
        except (json.JSONDecodeError, TypeError, ValueError):
            pass
    return model


def bundled_assistant(model_dir: Path) -> Optional[Path]:
    """The assistant shipped inside a model directory, if there is one."""
    path = Path(model_dir) / BUNDLED_ASSISTANT_DIR
    return path if (path / "config.json").exists() else None


def load_assistant_drafter(
    path: Union[str, Path], target: Any, revision: Optional[str] = None
) -> Any:
    """A drafter from an assistant directory, repo id or `gemma4-assistant`
    GGUF file (a Gemma4AssistantDrafter), or a split MTP head GGUF (an
    MTPDrafter), checked against `target`."""
    from .gguf import is_gguf

    if is_gguf(path):  # a gemma4-assistant, or llama.cpp's split MTP head (mtp-*.gguf)
        from .gguf import load_gguf_drafter

        return load_gguf_drafter(path, target)
    assistant = load_assistant(resolve_model_path(str(path), revision=revision))
    return Gemma4AssistantDrafter(assistant, target)
