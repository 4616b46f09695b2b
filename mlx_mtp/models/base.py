"""What the engine needs from a target model, written down once.

Every target class (Qwen3.5/3.6, Gemma 4, ...) implements `Target`; the
engine, the drafters and the front ends rely on nothing else. The model
classes subclass mlx-lm's own and add these few members.
"""

from __future__ import annotations

from typing import Any, List, Optional, Protocol, runtime_checkable

import mlx.core as mx

#: Gemma-style layer types (config `layer_types`), shared by targets and drafters.
SLIDING, FULL = "sliding_attention", "full_attention"


@runtime_checkable
class Target(Protocol):
    """A model the engine can decode with and verify drafts on.

    - `hidden(tokens, cache)`: [1, L] tokens -> [1, L, H] hidden states after
      the final norm (what MTP heads and assistants read).
    - `logits(hidden)`: the LM head on those states (softcapping included).
    - `embed(tokens)`: the input embedding as the first layer sees it.
    - `make_cache()`: a fresh per-layer cache whose every entry can roll back
      to any prefix of a verify pass (see `models/rollback.py`).
    - `mtp_problem`: why the checkpoint cannot draft with a built-in head
      (None when it can, or when it has none by design and says so).

    Targets with a built-in head also have `has_mtp`, `mtp(...)` and
    `make_mtp_cache()`; targets whose drafter reads their KV (Gemma 4) have
    `shared_kv(cache)`, `shared_kv_layers` and `kv_head_dims`.
    """

    mtp_problem: Optional[str]

    def hidden(self, tokens: mx.array, cache: Optional[List[Any]] = None) -> mx.array: ...

    def logits(self, hidden: mx.array) -> mx.array: ...

    def embed(self, tokens: mx.array) -> mx.array: ...

    def make_cache(self) -> List[Any]: ...

    @property
    def context_length(self) -> int: ...

    @property
    def hidden_size(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...


def architecture(model: Any) -> str:
    """The model's architecture as users know it: config.json's model_type
    (mlx-lm's model classes keep it), not our Python class name."""
    return str(getattr(model, "model_type", None) or type(model).__name__)


def has_builtin_head(target: Any) -> bool:
    """True when the checkpoint carries a loaded MTP head."""
    return bool(getattr(target, "has_mtp", False))
