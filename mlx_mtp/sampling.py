"""Token sampling and the lossless accept rule for speculative decoding.

Target and draft distributions go through the same transform (mlx-lm's own
top-p / min-p / top-k filters on log-probabilities, then temperature), so the
rejection sampler reproduces exactly what plain sampling from the target does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        if self.temp < 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0


def probabilities(logits: mx.array, params: SamplingParams) -> mx.array:
    """[..., V] logits -> [..., V] float32 probabilities after the filters and
    temperature (mlx-lm's order: filters on log-probs, then temperature)."""
    logits = logits.astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p > 0.0:
        logprobs = apply_min_p(logprobs, params.min_p)
    if 0 < params.top_k < logprobs.shape[-1]:
        logprobs = apply_top_k(logprobs, params.top_k)
    return mx.softmax(logprobs / params.temp, axis=-1)


def sample(logits: mx.array, params: SamplingParams, key: Optional[mx.array]) -> Tuple[mx.array, Optional[mx.array]]:
    """Sample one token per row. Returns (tokens, probabilities or None when greedy)."""
    if params.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32), None
    probs = probabilities(logits, params)
    return _categorical(probs, key), probs


def _categorical(probs: mx.array, key: Optional[mx.array]) -> mx.array:
    return mx.random.categorical(mx.log(probs), axis=-1, key=key).astype(mx.int32)


def accept_greedy(target_logits: mx.array, drafts: mx.array) -> Tuple[mx.array, mx.array]:
    """target_logits [k+1, V], drafts [k] -> (number accepted, bonus token).

    A draft is accepted while it equals the target's argmax; the bonus token is
    the target's argmax right after the accepted prefix."""
    best = mx.argmax(target_logits, axis=-1).astype(mx.int32)
    k = drafts.shape[0]
    if k == 0:
        return mx.array(0, mx.int32), best[0]
    matches = (drafts == best[:k]).astype(mx.int32)
    n = mx.cumprod(matches).sum()
    return n, mx.take(best, n)


def accept_sampled(
    target_logits: mx.array,
    drafts: mx.array,
    draft_probs: Optional[mx.array],
    params: SamplingParams,
    key: mx.array,
) -> Tuple[mx.array, mx.array]:
    """Rejection sampling (Leviathan et al. / Chen et al.).

    Draft j is accepted with probability min(1, p_j(d_j) / q_j(d_j)). At the
    first rejection the correction token comes from normalize(max(p - q, 0));
    after k acceptances the bonus token comes from p_{k+1}. The emitted tokens
    are then distributed exactly as samples from the target."""
    p = probabilities(target_logits, params)  # [k+1, V]
    k = drafts.shape[0]
    accept_key, token_key = mx.random.split(key)
    if k == 0:
        return mx.array(0, mx.int32), _categorical(p[0], token_key)
    idx = drafts[:, None]
    p_d = mx.take_along_axis(p[:k], idx, axis=-1)[:, 0]
    q_d = mx.take_along_axis(draft_probs, idx, axis=-1)[:, 0]
    u = mx.random.uniform(shape=(k,), key=accept_key)
    accepted = (u * q_d < p_d).astype(mx.int32)
    n = mx.cumprod(accepted).sum()
    # Row k of q is zero, so the residual there is p_{k+1} itself.
    q = mx.concatenate([draft_probs, mx.zeros((1, p.shape[-1]), p.dtype)], axis=0)
    p_n, q_n = mx.take(p, n, axis=0), mx.take(q, n, axis=0)
    residual = mx.maximum(p_n - q_n, 0.0)
    mass = residual.sum()
    # mass == 0 only when p == q, where rejection has probability 0; fall back to p.
    residual = mx.where(mass > 0, residual / mx.maximum(mass, 1e-30), p_n)
    return n, _categorical(residual, token_key)
