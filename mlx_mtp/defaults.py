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


def lookup_prompt_suite() -> Path:
    """The bench categories where prompt lookup matters (code_edit, doc_qa,
    json_reformat): reported apart, so the nine-category table stays
    comparable with other tools' figures."""
    return assets_dir() / "prompts_lookup.jsonl"


# --- what `generate` and `chat` sample with unless told otherwise ---------------
# Greedy decoding makes a small model loop ("1, 1, 1, ..."); a moderate
# temperature with nucleus sampling and a mild repetition penalty over the
# last few lines reads better. The library (`generate()`, `ChatSession`) and
# `bench` stay greedy and unpenalised: exact, reproducible output.
TEMP = 0.7
TOP_P = 0.9
REPETITION_PENALTY = 1.1
#: How many of the newest tokens (prompt included) the repetition, presence
#: and frequency penalties look at; also the library default.
REPETITION_CONTEXT_SIZE = 64
#: The range presence_penalty and frequency_penalty may take (OpenAI's); kept
#: here, beside the defaults, so the CLI can show it without loading MLX.
ADDITIVE_PENALTY_RANGE = (-2.0, 2.0)
#: Most tokens per `chat` answer: a long answer, well short of a context.
CHAT_MAX_TOKENS = 1024

# --- `mlx-mtp serve` (apps/serve) -------------------------------------------------
#: Loopback only unless told otherwise: the server runs code-generating
#: models for whoever can reach it.
SERVE_HOST = "127.0.0.1"
#: Addresses only this machine reaches: other hosts without --api-key get a warning.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SERVE_PORT = 8080
#: Rows decoded together (each drafts and all verify in one target pass).
SERVE_MAX_BATCH = 8
#: Requests that may wait for a free row; one more gets a 429.
SERVE_MAX_QUEUE = 32
#: Memory the prompt cache across requests may hold (LRU).
SERVE_PROMPT_CACHE_GB = 2.0
