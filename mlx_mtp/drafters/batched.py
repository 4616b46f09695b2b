"""Drafter state for the rows of a batch (docs/batching.md#drafting).

Each row drafts with its own state: the MTP head's KV cache is one row of
a `RaggedKVCache` and its newest head output one row of `last_state`; the
Gemma 4 assistant's newest (token, hidden state) pair is one row of its
arrays and it reads that row of the target's batch cache; prompt lookup
keeps one n-gram index per row. The model passes (head steps, assistant
steps) run once for all rows; sampling runs per row with the row's own
`SamplingParams`, key and penalty history through `sampling.sample`, as
the single-sequence drafters do, so each row's draft distribution is
exactly what it would be alone.

A joining row pre-fills with a single-sequence drafter (`fresh`), whose
state `add_row` then moves into the batch; `row` turns a row back into a
single-sequence drafter (the prompt cache keeps it).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from ..models.base import FULL, SLIDING
from ..models.batch_cache import RaggedKVCache, add_kv_row, kv_row
from ..models.gemma4_assistant import sliding_keys
from ..models.rollback import trim_cache
from ..sampling import SamplingParams, sample
from .base import Drafter
from .combined import LookupThenModelDrafter
from .gemma4_assistant import Gemma4AssistantDrafter
from .mtp import MTPDrafter
from .ngram import NGramDrafter

#: What `draft` returns: drafts [B, k] and per row its draft distributions
#: [k, V] (None: greedy or deterministic, the accept rule's one-hot).
Drafts = Tuple[mx.array, List[Optional[mx.array]]]


def _rows_index(rows: Sequence[int]) -> mx.array:
    return mx.array(list(rows), mx.int32)


def _take_rows(x: Optional[mx.array], rows: Sequence[int]) -> Optional[mx.array]:
    return None if x is None or not rows else x[_rows_index(rows)]


def _cat(a: Optional[mx.array], b: mx.array) -> mx.array:
    return b if a is None else mx.concatenate([a, b])


def _at_keep(x: mx.array, keep: Sequence[int]) -> mx.array:
    """x [B, L, ...] -> [B, 1, ...]: row b at position keep[b] - 1."""
    if len(set(keep)) == 1:
        return x[:, keep[0] - 1 : keep[0]]
    index = (_rows_index(keep) - 1).reshape((-1, 1) + (1,) * (x.ndim - 2))
    return mx.take_along_axis(x, index, axis=1)


def sample_rows(
    logits: mx.array,
    params: Sequence[SamplingParams],
    keys: Sequence[Optional[mx.array]],
    histories: List[Optional[mx.array]],
) -> Tuple[mx.array, List[Optional[mx.array]]]:
    """One token per row from logits [B, V], each row with its own params,
    key and penalty history (extended in place with the sampled token).
    Returns (tokens [B], per row its probabilities or None)."""
    if all(p.greedy for p in params) and all(h is None for h in histories):
        return mx.argmax(logits, axis=-1).astype(mx.int32), [None] * len(params)
    tokens, probs = [], []
    for b, (p, key) in enumerate(zip(params, keys)):
        token, q = sample(logits[b], p, key, histories[b])
        if histories[b] is not None:
            histories[b] = mx.concatenate([histories[b], token.reshape(1)])
        tokens.append(token)
        probs.append(q)
    return mx.stack(tokens), probs


def _step_keys(keys: Sequence[Optional[mx.array]], k: int) -> List[List[Optional[mx.array]]]:
    """Per row, one key per draft step (as the single drafters split them)."""
    return [list(mx.random.split(key, k)) if key is not None else [None] * k for key in keys]


def _stack_probs(per_step: List[List[Optional[mx.array]]], params: Sequence[SamplingParams]) -> List[Optional[mx.array]]:
    """per_step[j][b] -> per row [k, V] (None for greedy rows)."""
    return [None if p.greedy else mx.stack([step[b] for step in per_step]) for b, p in enumerate(params)]


class BatchDrafter:
    """The batch interface; one instance per `BatchGenerator`."""

    name = "drafter"
    #: drafts come from the host token sequence (`propose`), not the graph
    host_drafts = False

    def __init__(self, single: Drafter):
        self.single = single

    def fresh(self) -> Drafter:
        """A single-sequence drafter for a joining row's prefill."""
        raise NotImplementedError

    def add_row(self, drafter: Drafter) -> None:
        raise NotImplementedError

    def filter(self, rows: Sequence[int]) -> None:
        raise NotImplementedError

    def row(self, b: int) -> Drafter:
        raise NotImplementedError

    def bind(self, cache: List[Any]) -> None:
        """The target's batch cache (the assistant reads it)."""

    def state_arrays(self) -> List[mx.array]:
        """The arrays that hold the rows' state (to evaluate, or count)."""
        return []

    def draft(
        self, k: int, params: Sequence[SamplingParams], keys: Sequence[Optional[mx.array]],
        histories: List[Optional[mx.array]],
    ) -> Drafts:
        raise NotImplementedError

    def observe(self, next_tokens: mx.array, hidden: mx.array, keep: Sequence[int]) -> None:
        """next_tokens [B, L], hidden [B, L, H] of the verify pass; row b
        keeps its first keep[b] pairs."""

    def propose(self, b: int, tokens: Sequence[int], last: int) -> Optional[List[int]]:
        return None


class BatchMTPDrafter(BatchDrafter):
    """The MTP head for B rows: one ragged head cache, one head pass per draft step."""

    name = MTPDrafter.name

    def __init__(self, single: MTPDrafter):
        super().__init__(single)
        self.model = single.model
        self.cache = [RaggedKVCache() for _ in self.model.make_mtp_cache()]
        self.last_state: Optional[mx.array] = None  # [B, 1, H]
        self.speculative_entries = 0  # head-cache entries the last draft appended, every row alike

    def fresh(self) -> MTPDrafter:
        return MTPDrafter(self.model)

    def state_arrays(self) -> List[mx.array]:
        kv = [x for c in self.cache for x in (c.keys, c.values) if x is not None]
        return kv + ([self.last_state] if self.last_state is not None else [])

    def add_row(self, drafter: MTPDrafter) -> None:
        trim_cache(drafter.cache, drafter.speculative_entries)
        for batch, single in zip(self.cache, drafter.cache):
            add_kv_row(batch, single)
        self.last_state = _cat(self.last_state, drafter.last_state)

    def filter(self, rows: Sequence[int]) -> None:
        for c in self.cache:
            c.filter(rows)
        self.last_state = _take_rows(self.last_state, rows)

    def row(self, b: int) -> MTPDrafter:
        drafter = MTPDrafter(self.model)
        drafter.cache = [kv_row(c, b, KVCache()) for c in self.cache]
        drafter.last_state = mx.contiguous(self.last_state[b : b + 1])
        return drafter

    def draft(self, k, params, keys, histories) -> Drafts:
        step_keys = _step_keys(keys, k)
        g = self.last_state
        tokens: List[mx.array] = []
        probs: List[List[Optional[mx.array]]] = []
        for j in range(k):
            if j > 0:
                g = self.model.mtp(self.model.embed(tokens[-1][:, None]), g, self.cache)
                self.speculative_entries += 1
            token, q = sample_rows(self.model.mtp_logits(g)[:, -1], params, [s[j] for s in step_keys], histories)
            tokens.append(token)
            probs.append(q)
        return mx.stack(tokens, axis=1), _stack_probs(probs, params)

    def observe(self, next_tokens, hidden, keep) -> None:
        trim_cache(self.cache, self.speculative_entries)
        self.speculative_entries = 0
        g = self.model.mtp(self.model.embed(next_tokens), hidden, self.cache)
        L = next_tokens.shape[1]
        for c in self.cache:
            c.trim_rows([L - m for m in keep])
        self.last_state = _at_keep(g, keep)


class BatchAssistantDrafter(BatchDrafter):
    """The Gemma 4 assistant for B rows, reading the target's batch cache:
    each row's queries see its own keys (a per-row mask) at its own position."""

    name = Gemma4AssistantDrafter.name

    def __init__(self, single: Gemma4AssistantDrafter):
        super().__init__(single)
        self.assistant, self.target = single.assistant, single.target
        self.cache: Optional[List[Any]] = None
        self.last_token: Optional[mx.array] = None  # [B]
        self.last_hidden: Optional[mx.array] = None  # [B, 1, H]

    def fresh(self) -> Gemma4AssistantDrafter:
        return Gemma4AssistantDrafter(self.assistant, self.target)

    def bind(self, cache: List[Any]) -> None:
        self.cache = cache

    def state_arrays(self) -> List[mx.array]:
        return [x for x in (self.last_token, self.last_hidden) if x is not None]

    def add_row(self, drafter: Gemma4AssistantDrafter) -> None:
        self.last_token = _cat(self.last_token, drafter.last_token.reshape(1))
        self.last_hidden = _cat(self.last_hidden, drafter.last_hidden)

    def filter(self, rows: Sequence[int]) -> None:
        self.last_token = _take_rows(self.last_token, rows)
        self.last_hidden = _take_rows(self.last_hidden, rows)

    def row(self, b: int) -> Gemma4AssistantDrafter:
        drafter = self.fresh()
        drafter.last_token = mx.contiguous(self.last_token[b : b + 1])
        drafter.last_hidden = mx.contiguous(self.last_hidden[b : b + 1])
        return drafter

    def _shared_kv(self):
        """Per layer type the batch's keys and values, and the mask of the
        keys row b sees: all of its keys for the full layer, its newest
        `sliding_keys(W)` for the sliding one (`Gemma4AssistantDrafter._shared_kv`
        per row). Plus each row's round position."""
        kv, masks = {}, {}
        layers = self.target.shared_kv_layers
        for layer_type, i in layers.items():
            c: RaggedKVCache = self.cache[i]
            width = max(c.lengths)
            kv[layer_type] = (c.keys[..., :width, :], c.values[..., :width, :])
            ends = mx.array(c.lengths, mx.int32)[:, None]
            column = mx.arange(width, dtype=mx.int32)[None]
            visible = column < ends
            if layer_type == SLIDING:
                visible = visible & (column >= ends - sliding_keys(self.assistant.sliding_window))
            masks[layer_type] = visible[:, None, None, :]
        return kv, masks, self.cache[layers[FULL]].offset

    def draft(self, k, params, keys, histories) -> Drafts:
        kv, masks, position = self._shared_kv()
        step_keys = _step_keys(keys, k)
        plain_greedy = all(p.greedy for p in params) and all(h is None for h in histories)
        sparse = self.assistant.args.use_ordered_embeddings
        token, state = self.last_token, self.last_hidden
        tokens: List[mx.array] = []
        probs: List[List[Optional[mx.array]]] = []
        for j in range(k):
            y, state = self.assistant.step(self.target.embed(token[:, None]), state, kv, position, masks)
            y = y[:, -1]
            if plain_greedy and not sparse:
                token, q = mx.argmax(self.assistant.dense_logits(y), axis=-1).astype(mx.int32), [None] * len(params)
            elif plain_greedy:  # the sparse head scores a few clusters per row
                token, q = mx.stack([self.assistant.greedy_token(y[b]) for b in range(y.shape[0])]), [None] * len(params)
            else:  # penalties and sampling need the full [V] logits
                logits = mx.stack([self.assistant.logits(y[b]) for b in range(y.shape[0])])
                token, q = sample_rows(logits, params, [s[j] for s in step_keys], histories)
            tokens.append(token)
            probs.append(q)
        return mx.stack(tokens, axis=1), _stack_probs(probs, params)

    def observe(self, next_tokens, hidden, keep) -> None:
        # Only the newest pair matters: the next round starts from it.
        self.last_token = _at_keep(next_tokens, keep)[:, 0]
        self.last_hidden = _at_keep(hidden, keep)


class BatchNGramDrafter(BatchDrafter):
    """Prompt lookup, one index per row; drafts are known on the host."""

    name = NGramDrafter.name
    host_drafts = True

    def __init__(self, single: NGramDrafter):
        super().__init__(single)
        self.rows: List[NGramDrafter] = []

    def fresh(self) -> NGramDrafter:
        s = self.single
        return NGramDrafter(s.n_min, s.n_max, s.max_draft)

    def add_row(self, drafter: NGramDrafter) -> None:
        self.rows.append(drafter)

    def filter(self, rows: Sequence[int]) -> None:
        self.rows = [self.rows[b] for b in rows]

    def row(self, b: int) -> NGramDrafter:
        return self.rows[b]

    def propose(self, b: int, tokens: Sequence[int], last: int) -> Optional[List[int]]:
        return self.rows[b].propose(tokens, last) or None


def batch_drafter(drafter: Optional[Drafter]) -> Optional[BatchDrafter]:
    """The batched form of `drafter` (None: plain decoding). Prompt lookup
    in front of a model drafter batches the model drafter alone."""
    if drafter is None:
        return None
    if isinstance(drafter, LookupThenModelDrafter):
        drafter = drafter.model
    if isinstance(drafter, MTPDrafter):
        return BatchMTPDrafter(drafter)
    if isinstance(drafter, Gemma4AssistantDrafter):
        return BatchAssistantDrafter(drafter)
    if isinstance(drafter, NGramDrafter):
        return BatchNGramDrafter(drafter)
    raise TypeError(f"batched decoding has no form of the {drafter.name!r} drafter")
