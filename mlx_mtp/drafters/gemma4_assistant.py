"""Drafter for Gemma 4 targets with their separate `*-it-assistant` model.

The assistant has no cache of its own: each round it reads the target's KV
(the last non-shared sliding and full layers, straight from the target cache
the engine binds) and drafts from one pair, the bonus token and the target
hidden state that produced it, at the bonus token's position p, which stays
fixed for the whole round (docs/gemma4-assistant.md#a-round). Nothing to roll back.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import mlx.core as mx

from ..models.gemma4_assistant import (
    FULL,
    SLIDING,
    AssistantError,
    Gemma4Assistant,
    compatibility_problem,
    sliding_keys,
)
from ..sampling import SamplingParams, sample
from .base import Drafter

DEFAULT_NUM_DRAFT = 4


class Gemma4AssistantDrafter(Drafter):
    name = "gemma4-assistant"

    def __init__(self, assistant: Gemma4Assistant, target: Any):
        problem = compatibility_problem(target, assistant)
        if problem:
            raise AssistantError(f"cannot pair this assistant with the target: {problem}")
        self.assistant = assistant
        self.target = target
        self.cache: Optional[List[Any]] = None
        self.default_num_draft = assistant.num_assistant_tokens or DEFAULT_NUM_DRAFT
        self.note = getattr(assistant, "load_note", None)
        self.reset()

    def bind(self, target: Any, cache: List[Any]) -> None:
        if target is not self.target:
            problem = compatibility_problem(target, self.assistant)
            if problem:
                raise AssistantError(f"cannot pair this assistant with the target: {problem}")
            self.target = target
        self.cache = cache

    def reset(self) -> None:
        self.last_token: Optional[mx.array] = None  # [1] the newest sampled token
        self.last_hidden: Optional[mx.array] = None  # [1, 1, B] the state that produced it

    def observe(self, next_tokens: mx.array, hidden: mx.array) -> None:
        # Only the newest pair matters: the round starts from it.
        self.last_token = next_tokens.reshape(-1)[-1:]
        self.last_hidden = hidden[:, -1:, :]

    def lazy_state(self) -> List[mx.array]:
        return [x for x in (self.last_token, self.last_hidden) if x is not None]

    def _shared_kv(self) -> Tuple[dict, int]:
        """The KV the queries see and the round's position p: every key
        before p for the full layer, the last W + 1 for sliding (transformers'
        |q - k| <= W, see `sliding_keys`). The target's SlidingWindowCache
        keeps that many rows before p after any rollback."""
        kv = self.target.shared_kv(self.cache)
        position = self.cache[self.target.shared_kv_layers[FULL]].offset
        out = {}
        for layer_type, (keys, values, start) in kv.items():
            rows = position - start
            if layer_type == SLIDING:
                first = max(0, rows - sliding_keys(self.assistant.sliding_window))
                keys, values = keys[..., first:rows, :], values[..., first:rows, :]
            out[layer_type] = (keys, values)
        return out, position

    def draft(
        self, k: int, params: SamplingParams, key: Optional[mx.array], history: Optional[mx.array] = None
    ) -> Tuple[mx.array, Optional[mx.array]]:
        if self.last_token is None or self.cache is None:
            raise RuntimeError("draft() before bind()/observe(): the drafter has not seen the prompt")
        kv, position = self._shared_kv()
        keys = mx.random.split(key, k) if key is not None else [None] * k
        token, state = self.last_token, self.last_hidden
        tokens: List[mx.array] = []
        probs: List[mx.array] = []
        for j in range(k):
            y, state = self.assistant.step(self.target.embed(token.reshape(1, 1)), state, kv, position)
            if params.greedy and history is None:
                token = self.assistant.greedy_token(y[0, -1]).reshape(1)
            else:  # penalties need the full [V] logits
                t, q = sample(self.assistant.logits(y[0, -1]), params, keys[j], history)
                token = t.reshape(1)
                if q is not None:
                    probs.append(q)
                if history is not None:
                    history = mx.concatenate([history, token])
            tokens.append(token)
        drafts = mx.concatenate(tokens)
        return drafts, (None if params.greedy else mx.stack(probs))
