"""Caches for a batch of sequences that each roll back to their own prefix.

After a batched verify pass over L positions, row b keeps its own `keep[b]`
of them (docs/batching.md#ragged-rollback). Per cache kind:

- Attention KV (full layers, the Gemma sliding layers, the MTP head's own
  cache): `RaggedKVCache` keeps every row's keys at columns 0.. of its own
  length, with no padding in front, so rolling a row back only lowers its
  length on the host. Each query sees its own row's keys through a per-row
  mask; RoPE gets per-row positions.
- Gated-DeltaNet (`RecurrentCache` with B rows): the verify pass records
  the state after every position for all rows at once, and `keep_rows`
  picks row b's state at its own index.

`BatchCache` holds one entry per target layer and moves rows in (a joining
request's single-sequence cache after its prefill), out (finished or
cancelled) and back to single-sequence form (the prompt cache).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.models.cache import KVCache, _BaseCache

from .gemma4 import SlidingWindowCache
from .rollback import RecurrentCache


class RaggedKVCache(_BaseCache):
    """Attention KV for B rows of different lengths.

    Row b's keys sit at columns 0 .. lengths[b]-1 of `keys[b]`; column c is
    absolute position starts[b] + c. Columns past a row's length hold stale
    data that no query of that row can see (the mask is causal per row), so
    a rollback is `lengths[b] -= n` and nothing else.

    `window`: a sliding-window layer (Gemma). Its queries see the newest
    `window` keys, and when the buffer is full each row keeps only its
    newest `history + slack` rows, as `SlidingWindowCache` does for one
    sequence (docs/rollback.md#gemma-sliding-window-cache), so a rollback of
    up to the newest pass plus `slack` stays exact at every length."""

    step = 256

    def __init__(self, window: Optional[int] = None, history: int = 0, slack: int = 16):
        self.window = window
        self.history = history
        self.slack = slack
        self.keys: Optional[mx.array] = None  # [B, heads, capacity, head_dim]
        self.values: Optional[mx.array] = None
        self.lengths: List[int] = []  # columns in use, per row
        self.starts: List[int] = []  # absolute position of column 0, per row
        self._offset: Optional[mx.array] = None

    # -- what the attention layers read -------------------------------------

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def positions(self) -> List[int]:
        """Per row, the absolute position of the next token."""
        return [s + n for s, n in zip(self.starts, self.lengths)]

    @property
    def offset(self) -> mx.array:
        """[B] positions of the next token: RoPE takes one offset per row."""
        if self._offset is None:
            self._offset = mx.array(self.positions, mx.int32)
        return self._offset

    def _plan(self, num_new: int) -> Optional[List[int]]:
        """Per-row columns to drop before appending `num_new`, or None when
        the buffer has room (nothing moves)."""
        if self.keys is not None and max(self.lengths) + num_new <= self.keys.shape[2]:
            return None
        if self.window is None:
            return [0] * self.batch_size
        retain = self.history + self.slack
        return [max(0, n - retain) for n in self.lengths]

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None, **kwargs):
        """[B, 1, N, columns] for the layout after the update: query j of
        row b (column lengths[b] + j) sees its row's columns up to itself,
        and within the window for a sliding layer. Called before the update
        (mlx-lm builds one mask per layer type), so it plans the same drop
        `update_and_fetch` will make."""
        drops = self._plan(N) or [0] * self.batch_size
        cols = [n - d for n, d in zip(self.lengths, drops)]
        if len(set(cols)) == 1 and not return_array:
            hides_nothing = self.window is None or cols[0] + N <= self.window
            if hides_nothing:  # every row alike: what one sequence would use
                return None if N == 1 else "causal"
        query = mx.array(cols, mx.int32)[:, None] + mx.arange(N, dtype=mx.int32)[None]  # [B, N]
        key = mx.arange(max(cols) + N, dtype=mx.int32)[None, None]
        mask = key <= query[..., None]
        if self.window is not None:
            mask = mask & (key > query[..., None] - self.window)
        return mask[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        B, _, L, _ = keys.shape
        drops = self._plan(L)
        if drops is not None:
            self._reallocate(drops, L, keys, values)
        if len(set(self.lengths)) == 1:
            at = self.lengths[0]
            self.keys[..., at : at + L, :] = keys
            self.values[..., at : at + L, :] = values
        else:
            # Each row appends at its own length: one scatter along the columns.
            cols = mx.array(self.lengths, mx.int32)[:, None] + mx.arange(L, dtype=mx.int32)[None]
            cols = cols[:, None, :, None]
            self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(cols, keys.shape), keys, axis=2)
            self.values = mx.put_along_axis(self.values, mx.broadcast_to(cols, values.shape), values, axis=2)
        self.lengths = [n + L for n in self.lengths]
        self._offset = None
        width = max(self.lengths)
        return self.keys[..., :width, :], self.values[..., :width, :]

    def _reallocate(self, drops: List[int], num_new: int, keys: mx.array, values: mx.array) -> None:
        """A fresh buffer with room for `num_new` + `step` more columns;
        row b loses its oldest drops[b] columns (sliding layers only)."""
        kept = [n - d for n, d in zip(self.lengths, drops)]
        capacity = max(kept) + num_new + self.step
        B, H, _, Dk = keys.shape
        new_k = mx.zeros((B, H, capacity, Dk), keys.dtype)
        new_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
        width = max(kept)
        if self.keys is not None and width:
            if any(drops):
                # Per-row shift left by its drop: a gather, once per `step` columns.
                src = mx.array(drops, mx.int32)[:, None] + mx.arange(width, dtype=mx.int32)[None]
                src = mx.minimum(src, self.keys.shape[2] - 1)[:, None, :, None]
                old_k = mx.take_along_axis(self.keys, src, axis=2)
                old_v = mx.take_along_axis(self.values, src, axis=2)
            else:
                old_k, old_v = self.keys[..., :width, :], self.values[..., :width, :]
            new_k[..., :width, :] = old_k
            new_v[..., :width, :] = old_v
        self.keys, self.values = new_k, new_v
        self.lengths = kept
        self.starts = [s + d for s, d in zip(self.starts, drops)]
        self._offset = None

    # -- rollback ---------------------------------------------------------------

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the newest `n` positions of every row."""
        self.trim_rows([n] * self.batch_size)
        return n

    def trim_rows(self, drops: Sequence[int]) -> None:
        """Drop the newest drops[b] positions of row b: host bookkeeping only."""
        lengths = [n - min(n, d) for n, d in zip(self.lengths, drops)]
        for b, (start, n) in enumerate(zip(self.starts, lengths)):
            if self.window is not None and start > max(0, start + n - self.history):
                raise RuntimeError(
                    f"sliding-window row {b} trimmed past its slack ({self.slack}): rollback would be inexact"
                )
        self.lengths = lengths
        self._offset = None

    # -- rows in and out ----------------------------------------------------------

    def add_row(self, keys: Optional[mx.array], values: Optional[mx.array], start: int) -> None:
        """Append one row holding keys/values [1, heads, n, head_dim] (None:
        empty) whose column 0 is position `start`."""
        n = 0 if keys is None else keys.shape[2]
        if keys is not None:
            if self.keys is None:
                capacity = max(self.lengths + [n]) + self.step
                shape = lambda x: (self.batch_size, x.shape[1], capacity, x.shape[3])  # noqa: E731
                self.keys, self.values = mx.zeros(shape(keys), keys.dtype), mx.zeros(shape(values), values.dtype)
            capacity = self.keys.shape[2]
            if n > capacity:  # the new row is longer than the buffer: widen it
                grow = n - capacity + self.step
                pad = [(0, 0), (0, 0), (0, grow), (0, 0)]
                self.keys, self.values = mx.pad(self.keys, pad), mx.pad(self.values, pad)
                capacity += grow
            pad = [(0, 0), (0, 0), (0, capacity - n), (0, 0)]
            self.keys = mx.concatenate([self.keys, mx.pad(keys, pad)])
            self.values = mx.concatenate([self.values, mx.pad(values, pad)])
        elif self.keys is not None:
            shape = lambda x: (1,) + x.shape[1:]  # noqa: E731
            self.keys = mx.concatenate([self.keys, mx.zeros(shape(self.keys), self.keys.dtype)])
            self.values = mx.concatenate([self.values, mx.zeros(shape(self.values), self.values.dtype)])
        self.lengths.append(n)
        self.starts.append(start)
        self._offset = None

    def filter(self, rows: Sequence[int]) -> None:
        """Keep only `rows` (in that order); the others' arrays are dropped."""
        rows = list(rows)
        if self.keys is not None:
            if rows:
                index = mx.array(rows, mx.int32)
                width = max(self.lengths[b] for b in rows)
                # Keep the capacity's room for growth but drop unused columns
                # a long finished row needed.
                capacity = min(self.keys.shape[2], width + self.step)
                self.keys = self.keys[index, :, :capacity]
                self.values = self.values[index, :, :capacity]
            else:
                self.keys = self.values = None
        self.lengths = [self.lengths[b] for b in rows]
        self.starts = [self.starts[b] for b in rows]
        self._offset = None

    def row(self, b: int) -> Tuple[Optional[mx.array], Optional[mx.array], int]:
        """Row b's keys and values [1, heads, n, head_dim] (copies) and its start."""
        n = self.lengths[b]
        if self.keys is None or n == 0:
            return None, None, self.starts[b]
        return mx.contiguous(self.keys[b : b + 1, :, :n]), mx.contiguous(self.values[b : b + 1, :, :n]), self.starts[b]

    # -- bookkeeping ----------------------------------------------------------------

    def size(self) -> int:
        return max(self.lengths, default=0)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self):
        return [] if self.keys is None else [self.keys, self.values]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def ragged_from(cache: Any) -> RaggedKVCache:
    """An empty batch cache of the kind that holds rows of `cache`."""
    if isinstance(cache, SlidingWindowCache):
        return RaggedKVCache(window=cache.window, history=cache.history, slack=cache.slack)
    if isinstance(cache, KVCache):
        return RaggedKVCache()
    raise TypeError(f"no batched form of {type(cache).__name__}")


def add_kv_row(batch: RaggedKVCache, cache: Any) -> None:
    """Append the sequence in a KVCache or SlidingWindowCache as a new row."""
    start = getattr(cache, "start", 0)
    n = cache.offset - start
    if cache.keys is None or n == 0:
        batch.add_row(None, None, start)
    else:
        batch.add_row(cache.keys[..., :n, :], cache.values[..., :n, :], start)


def kv_row(batch: RaggedKVCache, b: int, like: Any) -> Any:
    """Row b as a single-sequence cache of the same kind as `like`."""
    keys, values, start = batch.row(b)
    if isinstance(like, SlidingWindowCache):
        cache = SlidingWindowCache(like.window, like.slack)
        cache.start = start
    else:
        cache = KVCache()
    if keys is not None:
        cache.keys, cache.values = keys, values
        cache.offset = start + keys.shape[2]
    else:
        cache.offset = start
    return cache


# -- Gated-DeltaNet ---------------------------------------------------------------


def keep_rows(cache: RecurrentCache, keep: Sequence[int]) -> None:
    """After a recorded pass, row b keeps its first keep[b] positions: its
    conv window and state at its own index. Slices of arrays the verify
    pass already holds, one per row, joined: no state is copied but the B
    selected ones."""
    if not cache.states:
        raise RuntimeError("no recorded verify pass to roll back")
    T = len(cache.states)
    if any(not 0 <= m <= T for m in keep):
        raise ValueError(f"cannot keep {list(keep)} of {T} recorded positions")
    if len(set(keep)) == 1:
        cache.keep(keep[0])  # every row alike: the single-sequence path
        return
    width = cache.conv_input.shape[1] - T  # K - 1
    conv = [cache.conv_input[b : b + 1, m : m + width] for b, m in enumerate(keep)]
    state = [(cache.states[m - 1] if m else cache.initial_state)[b : b + 1] for b, m in enumerate(keep)]
    cache[0] = mx.concatenate(conv)
    cache[1] = mx.concatenate(state)
    cache.forget()


def _recurrent_rows(cache: RecurrentCache, rows: Sequence[int]) -> None:
    if not rows:  # a lazy empty selection would still hold the old arrays
        cache.cache = [None] * len(cache.cache)
        return
    index = mx.array(list(rows), mx.int32)
    cache.cache = [None if c is None else c[index] for c in cache.cache]


def _recurrent_add(batch: RecurrentCache, cache: RecurrentCache, size: int) -> None:
    def cat(a: Optional[mx.array], b: Optional[mx.array]) -> Optional[mx.array]:
        if a is None and b is None:
            return None
        if a is None:
            a = mx.zeros((size,) + b.shape[1:], b.dtype)
        if b is None:
            b = mx.zeros((1,) + a.shape[1:], a.dtype)
        return mx.concatenate([a, b])

    batch.cache = [cat(a, b) for a, b in zip(batch.cache, cache.cache)]


def _recurrent_row(batch: RecurrentCache, b: int) -> RecurrentCache:
    out = RecurrentCache()
    out.cache = [None if c is None else mx.contiguous(c[b : b + 1]) for c in batch.cache]
    return out


# -- a whole target cache -----------------------------------------------------------


class BatchCache(list):
    """One batch cache per target layer (a list, so the model takes it as
    its cache). Built from the first row's single-sequence cache."""

    def __init__(self, like: List[Any]):
        super().__init__(RecurrentCache() if isinstance(c, RecurrentCache) else ragged_from(c) for c in like)
        self.like = like  # the kinds single rows come back as
        self.size = 0

    def add_row(self, cache: List[Any]) -> None:
        for batch, single in zip(self, cache):
            if isinstance(batch, RecurrentCache):
                _recurrent_add(batch, single, self.size)
            else:
                add_kv_row(batch, single)
        self.size += 1

    def filter(self, rows: Sequence[int]) -> None:
        for batch in self:
            if isinstance(batch, RecurrentCache):
                _recurrent_rows(batch, rows)
            else:
                batch.filter(rows)
        self.size = len(rows)

    def row(self, b: int) -> List[Any]:
        """Row b as a fresh single-sequence cache (copies; lazy)."""
        return [
            _recurrent_row(batch, b) if isinstance(batch, RecurrentCache) else kv_row(batch, b, like)
            for batch, like in zip(self, self.like)
        ]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self)


def batch_problem(cache: List[Any]) -> Optional[str]:
    """Why a batch cannot be built from rows of this (fresh) cache, or None."""
    for c in cache:
        if not isinstance(c, (KVCache, SlidingWindowCache, RecurrentCache)):
            return f"its {type(c).__name__} layers have no batched form that rolls back per row"
    return None


def mask_padding(cache: List[Any], lengths: Sequence[int]) -> None:
    """The next pass gives row b real tokens only at its first lengths[b]
    positions; the rest is padding at the end. Recurrent layers must not
    step over it: mlx-lm's Gated-DeltaNet (mlx_lm/models/qwen3_5.py and
    qwen3_next.py) reads `ArraysCache.lengths` (set by `prepare`, as
    mlx-lm's own BatchGenerator pads prompts in mlx_lm/generate.py), masks
    those positions out of the state update and takes each row's conv
    window at its own end. Attention rows need nothing
    before the pass: a real query never sees a later (padded) key."""
    for c in cache:
        if isinstance(c, RecurrentCache):
            c.prepare(lengths=list(lengths))


def unmask_padding(cache: List[Any], num_tokens: int, lengths: Sequence[int]) -> None:
    """After a padded pass over `num_tokens` positions: recurrent layers
    forget the lengths, and each attention row drops its padded keys (a
    host-side trim, as after a rejected draft)."""
    for c in cache:
        if isinstance(c, RecurrentCache):
            c.finalize()
        elif isinstance(c, RaggedKVCache):
            c.trim_rows([num_tokens - n for n in lengths])
        else:
            raise TypeError(f"cache {type(c).__name__} cannot drop padding per row")


def rollback_rows(cache: List[Any], num_verified: int, keep: Sequence[int]) -> None:
    """After a recorded pass over `num_verified` positions, row b keeps only
    its first keep[b] of them, in every layer."""
    drops = [num_verified - m for m in keep]
    if any(d < 0 for d in drops):
        raise ValueError(f"cannot keep {list(keep)} of {num_verified} verified tokens")
    for c in cache:
        if isinstance(c, RecurrentCache):
            if any(drops):
                keep_rows(c, keep)
            else:
                c.forget()
        elif isinstance(c, RaggedKVCache):
            c.trim_rows(drops)
        else:
            raise TypeError(f"cache {type(c).__name__} cannot roll back rows")
