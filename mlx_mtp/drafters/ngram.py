"""Prompt-lookup (n-gram) drafting: copy what followed the last few tokens
the previous time they occurred (docs/ngram.md).

The drafts come from the host token sequence alone (prompt + generated), so
they are known before the cycle's graph is built: the engine asks `propose`
on the host and puts the drafts straight into the verify pass. No hidden
states, no model, no drafter time. The drafter is deterministic; at
temperature > 0 its draft distribution is one-hot, which the rejection rule
handles exactly (accept with probability p(d), else resample from p with d
removed; `sampling.accept_sampled`).

The index holds, per n in N_MIN..N_MAX, every n-gram of the sequence -> the
position right after its newest occurrence. A token appended to the sequence
completes the continuation of the n-grams ending just before it, so those are
(re)inserted then: the index lags the sequence by one token, and the current
suffix can only match an *earlier* occurrence. Each new token costs
N_MAX - N_MIN + 1 dict writes; the context is never rescanned.
"""

from __future__ import annotations

from collections import deque
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..sampling import SamplingParams
from .base import Drafter

#: Longest suffix looked up. Longer matches are rarer but surer; 4 tokens of
#: BPE text are already distinctive, and each n costs a dict per position.
N_MAX = 4
#: Shortest suffix that may draft on its own (`--drafter ngram`): one token
#: alone matches nearly everywhere and predicts little.
N_MIN = 2
#: Most tokens one lookup proposes. A right copy tends to stay right for a
#: while (a quoted line, a re-emitted function), and the adaptive policy cuts
#: the length where the verify pass costs more than the drafts bring.
MAX_DRAFT = 10
#: How many of the newest positions `rewind` can undo without a rebuild.
UNDO_DEPTH = 64

Key = Tuple[int, ...]


class NGramIndex:
    """The newest earlier occurrence of every n-gram (n_min <= n <= n_max)
    of a growing token sequence; `extend` is O(new tokens)."""

    def __init__(self, n_min: int = N_MIN, n_max: int = N_MAX):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={n_min}, n_max={n_max}")
        self.n_min, self.n_max = n_min, n_max
        self.tokens: List[int] = []
        # n -> n-gram -> start of the tokens that followed its newest occurrence
        self.latest: Dict[int, Dict[Key, int]] = {n: {} for n in range(n_min, n_max + 1)}
        # Per position, what its inserts overwrote: (n, key, previous start or None).
        self._undo: Deque[List[Tuple[int, Key, Optional[int]]]] = deque(maxlen=UNDO_DEPTH)

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.tokens.append(int(token))
            follow = len(self.tokens) - 1  # the n-grams ending here now have a continuation
            overwritten = []
            for n in range(self.n_min, min(self.n_max, follow) + 1):
                key = tuple(self.tokens[follow - n : follow])
                table = self.latest[n]
                overwritten.append((n, key, table.get(key)))
                table[key] = follow
            self._undo.append(overwritten)

    def rewind(self, num_tokens: int) -> None:
        """Forget the newest `num_tokens` tokens (and what they indexed)."""
        num_tokens = min(num_tokens, len(self.tokens))
        if num_tokens > len(self._undo):  # older than the undo log: rebuild
            kept = self.tokens[: len(self.tokens) - num_tokens]
            self.__init__(self.n_min, self.n_max)
            self.extend(kept)
            return
        for _ in range(num_tokens):
            for n, key, previous in reversed(self._undo.pop()):
                if previous is None:
                    del self.latest[n][key]
                else:
                    self.latest[n][key] = previous
            self.tokens.pop()

    def longest_match(self) -> Tuple[int, int]:
        """(n, start): the longest suffix of the sequence, n_max down to
        n_min, that occurred earlier, and where the tokens that followed its
        newest earlier occurrence start. (0, -1) when none did."""
        length = len(self.tokens)
        for n in range(min(self.n_max, length), self.n_min - 1, -1):
            start = self.latest[n].get(tuple(self.tokens[length - n :]))
            if start is not None:
                return n, start
        return 0, -1

    def continuation(self, start: int, num_tokens: int) -> List[int]:
        """`num_tokens` tokens copied from `start`. A copy that reaches the
        end of the sequence goes on reading its own output (LZ77's
        overlapping copy): the match then says the sequence repeats with
        period len - start, and the draft continues that period."""
        tokens, length = self.tokens, len(self.tokens)
        out: List[int] = []
        for j in range(num_tokens):
            i = start + j
            out.append(tokens[i] if i < length else out[i - length])
        return out


class NGramDrafter(Drafter):
    """Drafts by prompt lookup over the host token sequence (module doc)."""

    name = "ngram"
    default_num_draft = MAX_DRAFT
    host_drafts = True

    def __init__(self, n_min: int = N_MIN, n_max: int = N_MAX, max_draft: int = MAX_DRAFT):
        if max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {max_draft}")
        self.n_min, self.n_max, self.max_draft = n_min, n_max, max_draft
        self.default_num_draft = max_draft
        self.reset()

    def reset(self) -> None:
        self.index = NGramIndex(self.n_min, self.n_max)

    def observe(self, next_tokens: mx.array, hidden: mx.array) -> None:
        pass  # it reads the host tokens `propose` is given instead

    def rewind(self, num_positions: int) -> None:
        self.index.rewind(num_positions)

    def sync(self, tokens: Sequence[int], last: int) -> None:
        """Index tokens + [last] (the sequence so far), which extends what
        was indexed before: only the new tokens are read. A sequence that
        does not (a new prompt without `reset`) is indexed afresh; a wrong
        index only costs speed, never output."""
        have = len(self.index)
        total = len(tokens) + 1
        newest = (tokens[have - 1] if have <= len(tokens) else last) if have else None
        if have > total or (have and newest != self.index.tokens[-1]):
            self.reset()
            have = 0
        if have < len(tokens):
            self.index.extend(tokens[have:])  # a slice of the new tokens only
        if have < total:
            self.index.extend((last,))

    def match(self, tokens: Sequence[int], last: int) -> Tuple[int, List[int]]:
        """(matched suffix length, up to max_draft tokens that followed it);
        (0, []) without a match of at least n_min tokens."""
        self.sync(tokens, last)
        n, start = self.index.longest_match()
        return (n, self.index.continuation(start, self.max_draft)) if n else (0, [])

    def propose(self, tokens: Sequence[int], last: int) -> Optional[List[int]]:
        return self.match(tokens, last)[1]

    def source_name(self, host: bool) -> str:
        return self.name

    def draft(
        self, k: int, params: SamplingParams, key: Optional[mx.array], history: Optional[mx.array] = None
    ) -> Tuple[mx.array, Optional[mx.array]]:
        """`propose`'s drafts in the in-graph form, for callers that only
        know `draft` (cost measurement): the lookup over the tokens indexed
        so far, or the newest token repeated without a match (a guess like
        any other). Deterministic, so no draft distribution: None means
        one-hot to the accept rule."""
        n, start = self.index.longest_match()
        if n:
            tokens = self.index.continuation(start, k)
        else:
            tokens = [self.index.tokens[-1] if len(self.index) else 0] * k
        return mx.array(tokens, mx.int32), None
