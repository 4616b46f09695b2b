"""The small interface every drafter kind implements.

The engine drives a drafter with these calls per sequence:

- `observe(next_tokens, hidden)`: the target has produced post-norm hidden
  states `hidden` [1, L, H]; `next_tokens` [L] are the tokens that follow each
  of those positions (the prompt shifted by one plus the first sampled token
  after prefill; the accepted drafts plus the bonus token after a verify pass).
  May be lazy arrays.
- `draft(k, params, key)`: propose k tokens. Returns lazy `tokens` [k] and,
  when sampling, their draft distributions [k, V] for rejection sampling.
- `reset()`: forget the sequence; `rewind(n)`: forget its newest n positions.
- `bind(target, cache)`: the target and the cache this sequence uses.

After `draft`, the engine always calls `observe` with the verified outcome
before drafting again, so a drafter can discard its speculative state there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Tuple

import mlx.core as mx

from ..sampling import SamplingParams


class Drafter(ABC):
    #: short name shown in stats ("mtp", "gemma4-assistant", ...)
    name: str = "drafter"
    #: draft length to use when the user does not choose one
    default_num_draft: int = 3
    #: something the user should know about this drafter (a fallback taken
    #: while loading it, say); front ends show it once
    note: Optional[str] = None

    @abstractmethod
    def reset(self) -> None: ...

    @abstractmethod
    def observe(self, next_tokens: mx.array, hidden: mx.array) -> None: ...

    def bind(self, target, cache: List) -> None:
        """Called by `decode` once its target cache exists (fresh or reused).
        Drafters that read the target's KV (the Gemma 4 assistant) keep it;
        the default ignores it."""

    def rewind(self, num_positions: int) -> None:
        """Forget the newest `num_positions` observed positions (prompt-cache
        reuse re-reads the last one). Drafters without state ignore it."""

    def lazy_state(self) -> List[mx.array]:
        """Arrays to evaluate with the target's cache during prefill, so that
        long prompts do not build one huge graph."""
        return []

    @abstractmethod
    def draft(
        self, k: int, params: SamplingParams, key: Optional[mx.array]
    ) -> Tuple[mx.array, Optional[mx.array]]: ...
