"""The small interface every drafter kind implements.

The engine drives a drafter with these calls per sequence:

- `observe(next_tokens, hidden)`: the target has produced post-norm hidden
  states `hidden` [1, L, H]; `next_tokens` [L] are the tokens that follow each
  of those positions (the prompt shifted by one plus the first sampled token
  after prefill; the accepted drafts plus the bonus token after a verify pass).
  May be lazy arrays.
- `draft(k, params, key, history)`: propose k tokens. Returns lazy `tokens`
  [k] and, when sampling, their draft distributions [k, V] for rejection
  sampling. `history` (None unless `params` penalise repeats) holds the newest
  tokens up to the one drafting starts from; draft step j samples with
  `sample(logits, params, key, history + d_1..d_j)`, as the target's verify
  row j is penalised, so drafts follow the penalised target.
- `reset()`: forget the sequence; `rewind(n)`: forget its newest n positions.
- `bind(target, cache)`: the target and the cache this sequence uses.
- `propose(tokens, last)`: drafts known on the host before the cycle's graph
  is built (prompt lookup), from the token sequence alone, or None (the
  default): draft in the graph with `draft`. Called every cycle with the
  verified sequence so far, `tokens` + [`last`] (`last`: the token drafting
  starts from), before the draft length is chosen; the list may be shorter
  or longer than any k, and the engine verifies as many as the cycle's draft
  length allows. Host drafts are deterministic: their draft distribution is
  one-hot, and `draft` returns None for it as greedy drafters do.
- `source_name(host)`: the name under which stats and the adaptive policy
  count a cycle (host: it drafted from `propose`).

After `draft`, the engine always calls `observe` with the verified outcome
before drafting again, so a drafter can discard its speculative state there.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import List, Optional, Sequence, Tuple

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
    #: True when `propose` can return drafts (prompt lookup): the engine then
    #: looks up every cycle and never plans a cycle before its input is known
    host_drafts: bool = False

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

    def propose(self, tokens: Sequence[int], last: int) -> Optional[List[int]]:
        """Host-side drafts for the sequence `tokens` + [`last`], or None to
        draft in the graph this cycle (module doc). Drafters that need the
        target's hidden states never know drafts early: None."""
        return None

    def source_name(self, host: bool) -> str:
        """Who drafted a cycle, for stats and per-source policies."""
        return self.name

    @abstractmethod
    def draft(
        self, k: int, params: SamplingParams, key: Optional[mx.array], history: Optional[mx.array] = None
    ) -> Tuple[mx.array, Optional[mx.array]]: ...
