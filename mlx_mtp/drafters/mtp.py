"""Drafter for MTP heads that live inside the target checkpoint (Qwen3.5/3.6).

Head position i reads (E[t_{i+1}], h_i) and predicts t_{i+2}. Step j > 1 of a
draft feeds back the head's own post-`mtp.norm` output in place of h. Those
speculative entries of the head's KV cache are trimmed once the target has
verified, and the accepted tokens are re-read with the target's real hidden
states (docs/mtp-head.md#bookkeeping).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import mlx.core as mx

from ..models.rollback import trim_cache
from ..sampling import SamplingParams, sample
from .base import Drafter


class MTPDrafter(Drafter):
    name = "mtp"
    default_num_draft = 3

    def __init__(self, model):
        if not getattr(model, "has_mtp", False):
            raise ValueError(getattr(model, "mtp_problem", None) or "model has no MTP head")
        self.model = model
        self.reset()

    def reset(self) -> None:
        self.cache = self.model.make_mtp_cache()
        self.last_state: Optional[mx.array] = None  # [1, 1, H] head output at the newest pair
        self.speculative_entries = 0  # head-cache entries appended by the last draft

    def observe(self, next_tokens: mx.array, hidden: mx.array) -> None:
        trim_cache(self.cache, self.speculative_entries)
        self.speculative_entries = 0
        g = self.model.mtp(self.model.embed(next_tokens.reshape(1, -1)), hidden, self.cache)
        self.last_state = g[:, -1:, :]

    def rewind(self, num_positions: int) -> None:
        trim_cache(self.cache, self.speculative_entries + num_positions)
        self.speculative_entries = 0

    def lazy_state(self) -> List[mx.array]:
        return [self.last_state] + [x for c in self.cache for x in (c.keys, c.values) if x is not None]

    def draft(
        self, k: int, params: SamplingParams, key: Optional[mx.array], history: Optional[mx.array] = None
    ) -> Tuple[mx.array, Optional[mx.array]]:
        if self.last_state is None:
            raise RuntimeError("draft() before observe(): the head has not seen the prompt")
        keys = mx.random.split(key, k) if key is not None else [None] * k
        g = self.last_state
        tokens: List[mx.array] = []
        probs: List[mx.array] = []
        for j in range(k):
            if j > 0:
                g = self.model.mtp(self.model.embed(tokens[-1].reshape(1, 1)), g, self.cache)
                self.speculative_entries += 1
            token, q = sample(self.model.mtp_logits(g)[0, -1], params, keys[j], history)
            if history is not None:
                history = mx.concatenate([history, token.reshape(1)])
            tokens.append(token)
            probs.append(q)
        return mx.stack(tokens), (None if params.greedy else mx.stack(probs))
