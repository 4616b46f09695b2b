"""Batched speculative decoding for a server (docs/batching.md).

Continuous batching of up to `max_batch` rows. One `step()`:
  1. admits queued requests while a slot is free (a request whose prompt
     extends a finished row's tokens starts from that row's saved cache);
  2. runs one prefill chunk (up to `prefill_chunk` tokens, spread over the
     joining requests, short rests of prompts first within half of it, then
     oldest first; chunks of about the same length share one padded target
     pass), queued without a sync of its own, so the running rows get a
     cycle between any two chunks of a long prompt;
  3. runs ONE draft/verify cycle over all decoding rows: every row drafts
     with its own drafter state, the target verifies all rows in one
     batched forward pass, each row accepts its own prefix, and one host
     sync reads the result;
  4. rolls every row back to its own prefix (models/batch_cache.py), moves
     a row whose prefill ended into the batch and finished rows out.
Each row's output is what `engine.decode` gives for that request alone:
token for token under greedy decoding, in distribution when sampling.

Not thread-safe: call `add`, `cancel` and `step` from one thread.
"""

from __future__ import annotations

import random
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from . import engine
from .drafters.base import Drafter
from .drafters.batched import BatchDrafter, batch_drafter
from .engine import (
    SEED_MODULUS,
    ContextLengthError,  # noqa: F401  (raised by add, re-exported for callers)
    CorruptWeightsError,
    Stats,
    _cache_arrays,
    _FixedDraftLength,
    _validate,
    auto_policy,
    cut_at_stop,
)
from .models.batch_cache import BatchCache, batch_problem, mask_padding, rollback_rows, unmask_padding
from .models.rollback import set_recording
from .options import AUTO, NumDraft
from .sampling import SamplingParams, accept_greedy, accept_sampled, penalize, recent_tokens, sample

if TYPE_CHECKING:
    from .api import SpeculativeModel

#: Padding for the drafts of rows that draft fewer tokens than the cycle's
#: longest: verified like any token, then rolled back (never accepted).
#: Also pads the shorter prompt chunks of a shared prefill pass.
PAD_TOKEN = 0
#: The most prompt tokens one step runs through the target (all joining
#: rows' chunks together, padding aside): the running rows wait at most one
#: such chunk for their next cycle, and a longer prompt takes several steps.
PREFILL_CHUNK = 512
#: Joining rows share one prefill pass when their chunks differ by at most
#: this many tokens (the shorter ones padded to the longest). A pass of a
#: few dozen tokens costs about one read of the weights on a GPU, like a
#: pass of one token, so padding up to this much is cheaper than a pass of
#: its own; chunks further apart run apart (their padding would cost more).
PREFILL_PAD = 32


@dataclass
class RowEvent:
    row_id: int
    tokens: List[int]  # newly committed tokens of this row this step (may be empty)
    finish_reason: Optional[str]  # None while running; "stop" | "length" | "context" | "cancelled"
    stats: Stats  # the row's Stats, updated in place as it runs


@dataclass(eq=False)
class _Row:
    row_id: int
    prompt: List[int]
    params: SamplingParams
    max_tokens: int
    eos: frozenset
    key: mx.array
    stats: Stats
    num_draft: Optional[int] = None  # its own fixed draft length; None: the batch's
    # While it pre-fills: its single-sequence cache and drafter.
    cache: Optional[List[Any]] = None
    drafter: Optional[Drafter] = None
    begin: int = 0  # prompt tokens in the cache
    drafter_from: int = 0  # the first prompt position the drafter reads
    prev_hidden: Optional[mx.array] = None  # a reused cache's newest hidden state
    head: Optional[mx.array] = None  # [first token, finite] after the last chunk
    prefill_key: Optional[mx.array] = None
    # While it decodes.
    tokens: List[int] = field(default_factory=list)  # what the target cache holds
    last: int = -1  # the newest sampled token, not yet in any cache
    last_hidden: Optional[mx.array] = None  # hidden state of tokens[-1]
    generated: int = 0
    started: float = 0.0
    decode_start: float = 0.0

    @property
    def position(self) -> int:
        """Where `last` goes."""
        return len(self.prompt) + self.generated - 1


@dataclass
class _Saved:
    """A finished row's state, for a later prompt that extends its tokens."""

    tokens: List[int]
    cache: List[Any]
    last_hidden: mx.array
    drafter: Optional[Drafter]

    @property
    def nbytes(self) -> int:
        arrays = _cache_arrays(self.cache) + [self.last_hidden]
        if self.drafter is not None:
            arrays += [x for x in self.drafter.lazy_state() if x is not None]
        return sum(x.nbytes for x in arrays)


class PromptCacheLRU:
    """Saved rows by their tokens, least recently used first out, bounded
    in bytes. An entry is taken (removed) when a prompt extends its tokens:
    the caches are then extended in place."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: "OrderedDict[Tuple[int, ...], Tuple[_Saved, int]]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return sum(size for _, size in self._entries.values())

    def put(self, saved: _Saved) -> None:
        size = saved.nbytes
        key = tuple(saved.tokens)
        self._entries.pop(key, None)
        if size > self.max_bytes:
            return
        while self._entries and self.nbytes + size > self.max_bytes:
            self._entries.popitem(last=False)
        self._entries[key] = (saved, size)

    def take(self, prompt: Sequence[int]) -> Optional[_Saved]:
        """The entry with the longest tokens that are a proper prefix of
        `prompt` (recurrent state cannot be cut back, so only an exact
        prefix will do), removed; None when there is none."""
        best = None
        for key in self._entries:
            n = len(key)
            if 0 < n < len(prompt) and (best is None or n > len(best)) and tuple(prompt[:n]) == key:
                best = key
        return None if best is None else self._entries.pop(best)[0]


def _bucket(batch_size: int) -> int:
    """The draft-length policy of a batch of this size: one per power of
    two, since a verify pass costs about the same for B and 2B - 1 rows."""
    return 1 << max(0, batch_size - 1).bit_length()


class BatchGenerator:
    """Continuous batching with speculative decoding in every row (module doc)."""

    def __init__(
        self,
        model: "SpeculativeModel",
        max_batch: int = 8,
        num_draft: NumDraft = "auto",
        prefill_chunk: int = PREFILL_CHUNK,
        prompt_cache_bytes: int = 2 << 30,
        max_context: Optional[int] = None,
    ):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
        if num_draft is None:
            num_draft = model.default_num_draft
        if num_draft != AUTO and (not isinstance(num_draft, int) or num_draft < 0):
            raise ValueError(f"num_draft must be an integer >= 0 or {AUTO!r}, got {num_draft!r}")
        problem = batch_problem(model.target.make_cache())
        if problem:
            raise ValueError(f"cannot batch this model: {problem}")
        self.model = model
        self.target = model.target
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.ctx = int(max_context or engine.context_length(self.target))
        drafting = model.drafter is not None and num_draft != 0
        self.num_draft: NumDraft = num_draft if drafting else 0
        self.drafter: Optional[BatchDrafter] = batch_drafter(model.drafter) if drafting else None
        self._policies: Dict[int, Any] = {}
        self.k_max = self._policy(1).k_max
        self.cache: Optional[BatchCache] = None
        self.prompt_cache = PromptCacheLRU(prompt_cache_bytes)
        self._rows: List[_Row] = []  # decoding, in batch order
        self._joining: Deque[_Row] = deque()  # pre-filling, oldest first
        self._queue: Deque[_Row] = deque()
        self._pending: List[RowEvent] = []  # cancellations not yet reported
        self._next_id = 0
        self._turn = 0  # which row's acceptance the policy hears next
        # Plain cycles' (tokens, hidden) not yet handed to the drafter.
        self._unobserved: List[Tuple[mx.array, mx.array]] = []
        self._reshaped = False  # rows joined or left since the last cycle

    # -- the interface -----------------------------------------------------------

    def add(
        self,
        prompt: List[int],
        params: SamplingParams,
        max_tokens: int,
        eos_token_ids: Sequence[int],
        seed: Optional[int] = None,
        num_draft: NumDraft = None,
    ) -> int:
        """Queue a request; returns its row id. `num_draft`: None or "auto"
        follows the generator's setting, an int N drafts N in this row (0:
        none) whatever the others draft. Raises ContextLengthError when the
        prompt does not fit the context, EmptyPromptError for an empty one,
        ValueError for max_tokens < 1 or a bad num_draft."""
        prompt = [int(t) for t in prompt]
        _validate(prompt, AUTO if num_draft is None else num_draft, max_tokens, self.ctx)
        own = None if num_draft in (None, AUTO) or self.drafter is None else int(num_draft)
        stats = Stats(drafter=self.drafter.name if self.drafter and own != 0 else "none",
                      num_draft=self.num_draft if own is None else own, prompt_tokens=len(prompt))
        depth = max(self.k_max, own or 0)
        stats.accepted_per_position = [0] * depth
        stats.drafted_per_position = [0] * depth
        key = mx.random.key(int(seed) % SEED_MODULUS if seed is not None else random.getrandbits(32))
        row = _Row(self._next_id, prompt, params, int(max_tokens), frozenset(int(t) for t in eos_token_ids),
                   key, stats, own)
        self._next_id += 1
        self._queue.append(row)
        return row.row_id

    def cancel(self, row_id: int) -> None:
        """Stop a row wherever it is and free its cache now; its next event
        says "cancelled". Unknown or finished rows are ignored."""
        for rows in (self._queue, self._joining):
            for row in rows:
                if row.row_id == row_id:
                    rows.remove(row)
                    row.cache = row.drafter = row.head = row.prev_hidden = None
                    self._report_cancelled(row)
                    return
        for b, row in enumerate(self._rows):
            if row.row_id == row_id:
                self._remove([b])
                # Evaluate the smaller batch now, so the freed row's arrays
                # are released before this returns (not at the next cycle).
                mx.eval(self._state_arrays())
                self._report_cancelled(row)
                return

    def step(self) -> List[RowEvent]:
        """One scheduler step (module doc); returns what happened to each row."""
        events, self._pending = self._pending, []
        self._admit()
        prefilling = self._prefill_chunks()
        if prefilling:
            arrays = [x for _, chunk in prefilling for x in chunk]
            # Queued ahead of the cycle; the cycle's one sync covers it.
            (mx.async_eval if self._rows else mx.eval)(arrays)
        if self._rows:
            events += self._cycle(timed=not prefilling)
        error = None
        ended = [row for row, _ in prefilling if row.head is not None]
        # Evaluated with the chunks: one read for every row whose prefill ended.
        heads = mx.stack([row.head for row in ended]).tolist() if ended else []
        for row, (first, finite) in zip(ended, heads):
            self._joining.remove(row)
            try:
                events += self._start(row, first, finite)
            except CorruptWeightsError as e:
                error = e
        if error is not None:
            raise error
        return events

    @property
    def active(self) -> int:
        """Rows decoding or pre-filling."""
        return len(self._rows) + len(self._joining)

    @property
    def queued(self) -> int:
        """Requests waiting for a free slot."""
        return len(self._queue)

    def has_work(self) -> bool:
        return bool(self._rows or self._joining or self._queue or self._pending)

    @property
    def cache_nbytes(self) -> int:
        """Bytes held by the batch's caches (target and drafter)."""
        return sum(x.nbytes for x in self._state_arrays())

    # -- scheduling ---------------------------------------------------------------

    def _policy(self, batch_size: int):
        """The draft-length policy for a batch of this size: fixed N for
        every row, or with "auto" one adaptive policy per size bucket
        (bucket 1 is the model's own, shared with single-sequence calls)."""
        bucket = _bucket(batch_size)
        policy = self._policies.get(bucket)
        if policy is None:
            if self.drafter is None:
                policy = _FixedDraftLength(0)
            elif self.num_draft != AUTO:
                policy = _FixedDraftLength(int(self.num_draft))
            elif bucket == 1 and self.model.drafter is self.drafter.single:
                policy = self.model.policy_for(AUTO)
            else:
                policy = auto_policy(self.drafter.single)
            self._policies[bucket] = policy
        return policy

    def _admit(self) -> None:
        while self._queue and self.active < self.max_batch:
            row = self._queue.popleft()
            self._begin_prefill(row)
            self._joining.append(row)

    def _begin_prefill(self, row: _Row) -> None:
        """Its cache: a finished row's that its prompt extends, else fresh."""
        row.started = time.perf_counter()
        saved = self.prompt_cache.take(row.prompt)
        if saved is not None and (saved.drafter is None) == (self.drafter is None):
            row.cache, row.begin, row.prev_hidden, row.drafter = saved.cache, len(saved.tokens), saved.last_hidden, saved.drafter
            if row.drafter is not None:
                # Its newest pair is h(tokens[-1]) with a token the new prompt
                # may not have: read again with the prompt's own.
                row.drafter.rewind(1)
        else:
            row.cache, row.begin, row.prev_hidden = self.target.make_cache(), 0, None
            row.drafter = self.drafter.fresh() if self.drafter is not None else None
        if row.drafter is not None:
            row.drafter.bind(self.target, row.cache)
        # The drafter reads only the newest prompt positions (engine.DRAFTER_PREFILL_WINDOW).
        row.drafter_from = max(row.begin, len(row.prompt) - engine.DRAFTER_PREFILL_WINDOW)
        if row.drafter is not None and row.drafter_from > row.begin:
            row.drafter.reset()  # a gap in what it has seen would skew its positions
            row.prev_hidden = None
        row.stats.prefilled_tokens = len(row.prompt) - row.begin
        row.key, row.prefill_key = mx.random.split(row.key)

    def _prefill_chunks(self) -> List[Tuple[_Row, List[mx.array]]]:
        """This step's prefill: up to `prefill_chunk` prompt tokens, spread
        over the joining rows (`_prefill_order`), so many short prompts start
        together and a long one takes several steps (the running rows get a
        cycle after each). Chunks of about the same length run as one pass
        (`_share_passes`). Returns per row the arrays to evaluate."""
        budget, chunks = self.prefill_chunk, []
        for row in self._prefill_order():
            if budget <= 0:
                break
            size = min(budget, len(row.prompt) - row.begin)
            chunks.append((row, size))
            budget -= size
        out: List[Tuple[_Row, List[mx.array]]] = []
        for group in _share_passes(chunks):
            out += self._prefill_pass(group)
        return out

    def _prefill_order(self) -> List[_Row]:
        """The joining rows in the order the step's budget serves them.
        Rows whose rest of the prompt is short (at most a quarter of the
        budget) go first, as long as they take at most half of it: a short
        prompt then starts at once instead of waiting for the chunks of a
        long one that came before it (its time to first token), while the
        long one still gets at least half of every step. The rest, and the
        short rows beyond that half, go oldest first."""
        short_limit, share = self.prefill_chunk // 4, self.prefill_chunk // 2
        first: List[_Row] = []
        for row in self._joining:
            rest = len(row.prompt) - row.begin
            if rest <= short_limit and rest <= share:
                first.append(row)
                share -= rest
        return first + [row for row in self._joining if row not in first]

    def _prefill_pass(self, group: List[Tuple[_Row, int]]) -> List[Tuple[_Row, List[mx.array]]]:
        """One target pass over the next `size` prompt tokens of each row in
        `group`. One row runs on its own single-sequence cache, as
        `engine._prefill` runs a chunk. Several rows run as the rows of a
        batch cache built from theirs (docs/batching.md#prefill): the shorter
        chunks are padded at the end, recurrent layers skip the padding
        (mlx-lm's ArraysCache `lengths` mask, as its BatchGenerator pads
        prompts) and the KV rows drop it after the pass; each row then gets
        its own single-sequence cache back."""
        sizes = [size for _, size in group]
        if len(group) == 1:
            row, size = group[0]
            hidden = self.target.hidden(mx.array(row.prompt[row.begin : row.begin + size], mx.int32)[None], row.cache)
        else:
            width = max(sizes)
            batch = BatchCache(self.target.make_cache())
            for row, _ in group:
                batch.add_row(row.cache)
            tokens = mx.array([row.prompt[row.begin : row.begin + size] + [PAD_TOKEN] * (width - size)
                               for row, size in group], mx.int32)
            padded = min(sizes) < width
            if padded:
                mask_padding(batch, sizes)
            hidden = self.target.hidden(tokens, batch)
            if padded:
                unmask_padding(batch, width, sizes)
            for b, (row, _) in enumerate(group):
                row.cache = batch.row(b)
                if row.drafter is not None:
                    row.drafter.bind(self.target, row.cache)
        # The rows whose prompt ends here: their first logits in one head pass.
        ending = [b for b, (row, size) in enumerate(group) if row.begin + size == len(row.prompt)]
        logits = None
        if ending:
            last = mx.concatenate([hidden[b : b + 1, sizes[b] - 1, :] for b in ending])
            logits = self.target.logits(last)
        out = []
        for b, (row, size) in enumerate(group):
            row_logits = logits[ending.index(b)] if b in ending else None
            out.append((row, self._after_chunk(row, size, hidden[b : b + 1, :size, :], row_logits)))
        return out

    def _after_chunk(self, row: _Row, size: int, hidden: mx.array, logits: Optional[mx.array]) -> List[mx.array]:
        """The chunk's hidden states [1, size, H] of `row`: its drafter reads
        the newest positions; after the last chunk (`logits`: its first
        logits) the first token is sampled. Returns the arrays to evaluate."""
        prompt = mx.array(row.prompt, mx.int32)
        start, end = row.begin, row.begin + size
        out = []
        if logits is not None:
            first, _ = sample(logits, row.params, row.prefill_key, recent_tokens(row.prompt, row.params))
            row.head = mx.stack([first.astype(mx.int32), mx.isfinite(logits).all().astype(mx.int32)])
            next_tokens = mx.concatenate([prompt[start + 1 : end], first[None]])
            out.append(row.head)
        else:
            next_tokens = prompt[start + 1 : end + 1]
        if row.drafter is not None and end > row.drafter_from:
            if row.prev_hidden is not None:
                row.drafter.observe(prompt[start : start + 1], row.prev_hidden)
                row.prev_hidden = None
            skip = max(0, row.drafter_from - start)
            row.drafter.observe(next_tokens[skip:], hidden[:, skip:, :])
            out += row.drafter.lazy_state()
        row.begin = end
        row.last_hidden = hidden[:, -1:, :]
        return _cache_arrays(row.cache) + [x for x in out if x is not None]

    def _start(self, row: _Row, first: int, finite: int) -> List[RowEvent]:
        """The prefill has ended with its first token `first` (`finite`: its
        logits were): emit it; the row joins the batch unless it is done."""
        row.head = None
        if not finite:
            row.cache = row.drafter = None
            raise CorruptWeightsError(
                "the model's first logits are NaN or infinite: its weights are most likely corrupt "
                "(a damaged download or conversion); download or convert it again"
            )
        stats = row.stats
        stats.prefill_s = time.perf_counter() - row.started
        row.tokens, row.last, row.generated = list(row.prompt), first, 1
        row.decode_start = time.perf_counter()
        if first in row.eos or row.max_tokens == 1:
            tokens = [] if first in row.eos else [first]
            row.generated = stats.generated_tokens = len(tokens)
            stats.finish_reason = "stop" if first in row.eos else "length"
            self._save(row.tokens, row.cache, row.last_hidden, row.drafter)
            row.cache = row.drafter = None
            return [RowEvent(row.row_id, tokens, stats.finish_reason, stats)]
        stats.generated_tokens = 1
        self._join(row)
        return [RowEvent(row.row_id, [first], None, stats)]

    def _join(self, row: _Row) -> None:
        self._catch_up()
        self._reshaped = True
        if self.cache is None:
            # An empty template, so the first row's own arrays are not kept.
            self.cache = BatchCache(self.target.make_cache())
            if self.drafter is not None:
                self.drafter.bind(self.cache)
        self.cache.add_row(row.cache)
        if self.drafter is not None:
            self.drafter.add_row(row.drafter)
        row.cache = row.drafter = None
        self._rows.append(row)

    def _remove(self, rows: Sequence[int]) -> None:
        """Drop batch rows `rows` (indices) from every cache."""
        self._catch_up()
        self._reshaped = True
        gone = set(rows)
        keep = [b for b in range(len(self._rows)) if b not in gone]
        self._rows = [self._rows[b] for b in keep]
        self.cache.filter(keep)
        if self.drafter is not None:
            self.drafter.filter(keep)
        if not self._rows:
            self.cache = None  # the next row to join starts a fresh batch

    def _save(self, tokens: List[int], cache: List[Any], last_hidden: mx.array, drafter: Optional[Drafter]) -> None:
        if self.prompt_cache.max_bytes > 0:
            self.prompt_cache.put(_Saved(list(tokens), cache, last_hidden, drafter))

    def _report_cancelled(self, row: _Row) -> None:
        row.stats.finish_reason = "cancelled"
        self._pending.append(RowEvent(row.row_id, [], "cancelled", row.stats))

    def _state_arrays(self) -> List[mx.array]:
        arrays = _cache_arrays(self.cache) if self.cache is not None else []
        return arrays + (self.drafter.state_arrays() if self.drafter is not None else [])

    # -- one draft / verify cycle -----------------------------------------------------

    def _draft_lengths(self, k: int) -> Tuple[List[int], List[List[int]]]:
        """Per row its draft length, never past max_tokens or the context
        (as engine.decode), and its host drafts (prompt lookup; else [])."""
        lengths, proposals = [], []
        for b, row in enumerate(self._rows):
            kb = k if row.num_draft is None else row.num_draft
            kb = max(0, min(kb, row.max_tokens - row.generated - 1, self.ctx - row.position - 1))
            proposal: List[int] = []
            if kb and self.drafter.host_drafts:
                proposal = (self.drafter.propose(b, row.tokens, row.last) or [])[:kb]
                kb = len(proposal)
            lengths.append(kb)
            proposals.append(proposal)
        return lengths, proposals

    def _cycle(self, timed: bool) -> List[RowEvent]:
        events = self._finish_at_context()
        if not self._rows:
            return events
        start = time.perf_counter()
        rows = self._rows
        policy = self._policy(len(rows))
        ks, proposals = self._draft_lengths(policy.choose())
        K = max(ks)
        packed, hidden = self._build(ks, K, proposals)
        out = packed.tolist()  # the one host sync of the cycle
        now = time.perf_counter()
        # A cycle that also ran prefill work, or the gather / concatenation
        # of a changed batch, would mislead the policy's cost model.
        seconds = now - start if timed and not self._reshaped else None
        self._reshaped = False

        keep: List[int] = []
        emitted_rows: List[List[int]] = []
        results = []
        for b, row in enumerate(rows):
            n, drafted, bonus = out[b][0], out[b][1 : 1 + ks[b]], out[b][K + 1]
            row.stats.record_cycle(ks[b], n, self.drafter.name if ks[b] else None)
            emitted = drafted[:n] + [bonus]
            kept, reason, cut = cut_at_stop(emitted, n, row.eos, row.generated, row.max_tokens)
            keep.append(cut + 1)
            emitted_rows.append(emitted[: cut + 1])
            results.append((kept, reason, cut, bonus))
        self._update_policy(policy, ks, K, out, seconds)

        # Roll every row back to its own prefix and seed the drafter.
        if K:
            rollback_rows(self.cache, K + 1, keep)
        if self.drafter is not None:
            padded = [e + [PAD_TOKEN] * (K + 1 - len(e)) for e in emitted_rows]
            ending = any(reason is not None for _, reason, _, _ in results)
            self._observe(mx.array(padded, mx.int32), hidden, keep, plain=K == 0 and not ending)

        finished = []
        for b, (row, (kept, reason, cut, bonus)) in enumerate(zip(rows, results)):
            row.tokens.extend([row.last] + emitted_rows[b][:cut])
            row.generated += len(kept)
            row.last = bonus
            stats = row.stats
            stats.generated_tokens = row.generated
            stats.finish_reason = reason
            stats.parked_reason = policy.reason()
            stats.decode_s = time.perf_counter() - row.decode_start
            events.append(RowEvent(row.row_id, kept, reason, stats))
            if reason is not None:
                finished.append(b)
                self._save_row(b, hidden[b : b + 1, cut : cut + 1, :])
        if finished:
            self._remove(finished)
        return events

    def _observe(self, tokens: mx.array, hidden: mx.array, keep: List[int], plain: bool) -> None:
        """Hand the verified pairs to the drafter. Those of plain cycles
        (every row keeps its one position) wait and go in batches of
        engine.CATCH_UP_BATCH, as `engine._DrafterFeed` does: a parked
        drafter costs one batched pass per batch, not a pass per cycle."""
        if plain:
            self._unobserved.append((tokens, hidden))
            if len(self._unobserved) < engine.CATCH_UP_BATCH:
                return
        self._catch_up()
        if not plain:
            self.drafter.observe(tokens, hidden, keep)

    def _catch_up(self) -> None:
        """The drafter reads the plain cycles it has not seen yet (before it
        drafts, and before rows join or leave)."""
        if not self._unobserved:
            return
        tokens = mx.concatenate([t for t, _ in self._unobserved], axis=1)
        hidden = mx.concatenate([h for _, h in self._unobserved], axis=1)
        self._unobserved = []
        self.drafter.observe(tokens, hidden, [tokens.shape[1]] * tokens.shape[0])

    def _build(self, ks: List[int], K: int, proposals: List[List[int]]) -> Tuple[mx.array, mx.array]:
        """Draft, verify, accept for every row as one lazy graph. Returns
        the packed [B, K + 2] result (per row: n, its K drafts, bonus) and
        the verify hidden states [B, K + 1, H]. Row b's drafts past ks[b]
        are padding that its accept rule never reaches."""
        rows = self._rows
        B = len(rows)
        greedy = all(r.params.greedy and not r.params.penalized for r in rows)
        draft_keys: List[Optional[mx.array]] = [None] * B
        verify_keys: List[Optional[mx.array]] = [None] * B
        for b, row in enumerate(rows):
            if not row.params.greedy:
                row.key, draft_keys[b], verify_keys[b] = mx.random.split(row.key, 3)
        # Per row the penalties' history up to `last`; drafting extends it.
        histories = [recent_tokens(r.tokens[-r.params.repetition_context_size :] + [r.last], r.params)
                     if r.params.penalized else None for r in rows]
        last = mx.array([r.last for r in rows], mx.int32)
        draft_probs: List[Optional[mx.array]] = [None] * B
        if K and self.drafter.host_drafts:
            drafts = mx.array([p + [PAD_TOKEN] * (K - len(p)) for p in proposals], mx.int32)
        elif K:
            self._catch_up()
            drafts, draft_probs = self.drafter.draft(K, [r.params for r in rows], draft_keys, list(histories))
        else:
            drafts = mx.zeros((B, 0), mx.int32)
        verify_input = mx.concatenate([last[:, None], drafts], axis=1)
        set_recording(self.cache, K > 0)  # only a draft can need a rollback
        hidden = self.target.hidden(verify_input, self.cache)
        set_recording(self.cache, False)
        logits = self.target.logits(hidden)  # [B, K + 1, V]
        if greedy:
            n, bonus = _accept_greedy_rows(logits, drafts, ks)
            return mx.concatenate([n[:, None], drafts, bonus[:, None]], axis=1), hidden
        packed_rows = []
        for b, row in enumerate(rows):
            kb = ks[b]
            row_logits, row_drafts = logits[b, : kb + 1], drafts[b, :kb]
            if histories[b] is not None:
                row_logits = penalize(row_logits, mx.concatenate([histories[b], row_drafts]), row.params)
            if row.params.greedy:
                n, bonus = accept_greedy(row_logits, row_drafts)
            else:
                q = draft_probs[b][:kb] if draft_probs[b] is not None else None
                n, bonus = accept_sampled(row_logits, row_drafts, q, row.params, verify_keys[b])
            packed_rows.append(mx.concatenate([n.reshape(1), drafts[b], bonus.reshape(1)]))
        return mx.stack(packed_rows), hidden

    def _update_policy(self, policy, ks: List[int], K: int, out: List[List[int]], seconds: Optional[float]) -> None:
        """One update per cycle, as for a single sequence: the cycle's time
        and the acceptance of one row that drafted what the policy asked for
        (rows take turns), so the policy's cost model and probe bound keep
        their meaning. Rows with their own num_draft do not count, and a
        cycle they made longer is not timed."""
        following = [b for b, row in enumerate(self._rows) if row.num_draft is None]
        if not following:
            return
        k = max(ks[b] for b in following)
        candidates = [b for b in following if ks[b] == k]
        b = candidates[self._turn % len(candidates)]
        self._turn += 1
        policy.update(k, out[b][0], seconds if k == K else None)

    def _finish_at_context(self) -> List[RowEvent]:
        ended = [b for b, row in enumerate(self._rows) if row.position >= self.ctx]
        events = []
        for b in ended:
            row = self._rows[b]
            row.stats.finish_reason = "context"
            events.append(RowEvent(row.row_id, [], "context", row.stats))
        if ended:
            self._remove(ended)
        return events

    def _save_row(self, b: int, last_hidden: mx.array) -> None:
        """Keep finished row b's state (as copies) in the prompt cache."""
        if self.prompt_cache.max_bytes <= 0:
            return
        row = self._rows[b]
        cache = self.cache.row(b)
        drafter = self.drafter.row(b) if self.drafter is not None else None
        last_hidden = mx.contiguous(last_hidden)
        saved = _Saved(list(row.tokens), cache, last_hidden, drafter)
        # Copied on the device without a sync, so the saved row does not
        # keep the whole batch buffer alive.
        mx.async_eval(_cache_arrays(cache) + [last_hidden] + (drafter.lazy_state() if drafter else []))
        self.prompt_cache.put(saved)


def _share_passes(chunks: List[Tuple[_Row, int]]) -> List[List[Tuple[_Row, int]]]:
    """The step's prefill chunks (row, size) in groups that each run as one
    target pass: longest first, a chunk joins the group in front while it
    is at most PREFILL_PAD tokens shorter than that group's longest."""
    groups: List[List[Tuple[_Row, int]]] = []
    for chunk in sorted(chunks, key=lambda c: -c[1]):
        if groups and groups[-1][0][1] - chunk[1] <= PREFILL_PAD:
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    return groups


def _accept_greedy_rows(logits: mx.array, drafts: mx.array, ks: Sequence[int]) -> Tuple[mx.array, mx.array]:
    """`accept_greedy` for all rows at once: logits [B, K+1, V], drafts
    [B, K]; row b's drafts past ks[b] are padding and never accepted."""
    best = mx.argmax(logits, axis=-1).astype(mx.int32)  # [B, K + 1]
    K = drafts.shape[1]
    if K == 0:
        return mx.zeros((best.shape[0],), mx.int32), best[:, 0]
    real = mx.arange(K)[None] < mx.array(list(ks), mx.int32)[:, None]
    matches = ((drafts == best[:, :K]) & real).astype(mx.int32)
    n = mx.cumprod(matches, axis=1).sum(axis=1)
    return n, mx.take_along_axis(best, n[:, None], axis=1)[:, 0]
