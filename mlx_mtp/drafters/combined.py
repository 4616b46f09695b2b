"""A model drafter (MTP head, Gemma 4 assistant) with prompt lookup in front
of it (`--drafter mtp+ngram`, `assistant+ngram`; docs/ngram.md#combined).

Per cycle: when the lookup finds an earlier occurrence of the newest
MIN_MATCH tokens or more, the cycle drafts the tokens that followed it
(any length up to the lookup's own maximum, which can be longer than the
model drafter's k); otherwise the model drafter drafts in the graph as it
would alone. The model drafter observes the verified outcome of every cycle,
whichever source drafted, so it stays in step with the sequence. Stats and
the adaptive policy count each source apart (`source_name`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..sampling import SamplingParams
from .base import Drafter
from .ngram import NGramDrafter

#: Shortest match that drafts instead of the model drafter. Shorter
#: suffixes recur by chance (", the", "self."), and what followed them then
#: is a worse guess than the model's; three tokens that recur are usually
#: part of the same quoted or re-emitted text.
MIN_MATCH = 3


class LookupThenModelDrafter(Drafter):
    """Prompt lookup when the match is long enough, else `model`."""

    host_drafts = True

    def __init__(self, model: Drafter, lookup: Optional[NGramDrafter] = None, min_match: int = MIN_MATCH):
        self.model = model
        self.lookup = lookup if lookup is not None else NGramDrafter()
        if not self.lookup.n_min <= min_match <= self.lookup.n_max:
            raise ValueError(
                f"min_match must be within the lookup's n-gram sizes "
                f"{self.lookup.n_min}..{self.lookup.n_max}, got {min_match}"
            )
        self.min_match = min_match
        self.name = f"{model.name}+{self.lookup.name}"
        self.default_num_draft = model.default_num_draft
        self.note = model.note

    def reset(self) -> None:
        self.model.reset()
        self.lookup.reset()

    def observe(self, next_tokens: mx.array, hidden: mx.array) -> None:
        self.model.observe(next_tokens, hidden)

    def bind(self, target: Any, cache: List[Any]) -> None:
        self.model.bind(target, cache)

    def rewind(self, num_positions: int) -> None:
        self.model.rewind(num_positions)
        self.lookup.rewind(num_positions)

    def lazy_state(self) -> List[mx.array]:
        return self.model.lazy_state()

    def propose(self, tokens: Sequence[int], last: int) -> Optional[List[int]]:
        n, drafts = self.lookup.match(tokens, last)
        return drafts if n >= self.min_match else None

    def source_name(self, host: bool) -> str:
        return self.lookup.name if host else self.model.name

    def draft(
        self, k: int, params: SamplingParams, key: Optional[mx.array], history: Optional[mx.array] = None
    ) -> Tuple[mx.array, Optional[mx.array]]:
        return self.model.draft(k, params, key, history)
