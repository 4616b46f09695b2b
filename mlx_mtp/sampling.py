"""Token sampling and the lossless accept rule for speculative decoding.

Target and draft distributions go through the same transform (mlx-lm's own
top-p / min-p / top-k filters on log-probabilities, then temperature), so the
rejection sampler reproduces exactly what plain sampling from the target does.
The repetition / presence / frequency penalties come first, on the logits, and
are part of the target distribution too: every row is penalised with its own
history (`penalize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from .defaults import ADDITIVE_PENALTY_RANGE, REPETITION_CONTEXT_SIZE


@dataclass(frozen=True)
class SamplingParams:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    #: mlx-lm's sign-aware multiplicative penalty on repeated tokens (1: off)
    repetition_penalty: float = 1.0
    #: OpenAI's additive penalties: once per repeated token, and per repeat (0: off)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: how many of the newest tokens, prompt included, all three look at
    repetition_context_size: int = REPETITION_CONTEXT_SIZE

    def __post_init__(self):
        if self.temp < 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ValueError(f"repetition_penalty must be > 0 (1: off), got {self.repetition_penalty}")
        lo, hi = ADDITIVE_PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            if not lo <= getattr(self, name) <= hi:
                raise ValueError(f"{name} must be in [{lo:g}, {hi:g}], got {getattr(self, name)}")
        if self.repetition_context_size < 1:
            raise ValueError(f"repetition_context_size must be >= 1, got {self.repetition_context_size}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _window_counts(history: mx.array, rows: int, vocab: int, size: int) -> mx.array:
    """[rows, vocab] float32: how often each token occurs in each row's
    window, the newest `size` tokens of history[: len(history) - rows + 1 + r]."""
    length = history.shape[0]
    ends = mx.arange(length - rows + 1, length + 1)[:, None]  # exclusive end of row r's history
    at = mx.arange(length)[None, :]
    inside = ((at < ends) & (at >= ends - size)).astype(mx.float32)
    row_ids = mx.broadcast_to(mx.arange(rows)[:, None], inside.shape)
    token_ids = mx.broadcast_to(history[None, :], inside.shape)
    return mx.zeros((rows, vocab), mx.float32).at[row_ids, token_ids].add(inside)


def penalize(logits: mx.array, history: Optional[mx.array], params: SamplingParams) -> mx.array:
    """Apply the repetition, presence and frequency penalties to logits [R, V]
    (or [V]), each row with its own history, all rows in one graph.

    `history` [L] holds the tokens up to and including row 0's input token,
    then the input tokens of rows 1..R-1 (a verify pass: [..., x, d_1..d_k]).
    Row r looks at the newest `repetition_context_size` tokens up to and
    including its own input: mlx-lm's window (`tokens[-context_size:]` of
    prompt + generated, as `generate_step` hands its logits processors).

    Per token in the window, in make_logits_processors' order (mlx-lm):
      repetition  logit < 0 ? logit * penalty : logit / penalty   (once per token)
      presence    logit - presence_penalty                        (once per token)
      frequency   logit - frequency_penalty * count               (per occurrence)
    The same function serves plain decoding, every draft step and every
    verify row, so the speculative output stays lossless under the penalty."""
    if history is None or not params.penalized:
        return logits
    one_row = logits.ndim == 1
    rows = logits[None] if one_row else logits
    counts = _window_counts(history, rows.shape[0], rows.shape[-1], params.repetition_context_size)
    seen = counts > 0
    if params.repetition_penalty != 1.0:
        p = params.repetition_penalty
        rows = mx.where(seen, mx.where(rows < 0, rows * p, rows / p), rows)
    if params.presence_penalty:
        rows = mx.where(seen, rows - params.presence_penalty, rows)
    if params.frequency_penalty:
        # One subtraction of count * penalty (mlx-lm subtracts once per
        # occurrence): equal up to rounding in the last bit.
        rows = rows - (counts * params.frequency_penalty).astype(rows.dtype)
    return rows[0] if one_row else rows


def recent_tokens(tokens: Sequence[int], params: SamplingParams) -> Optional[mx.array]:
    """The newest tokens the penalties can see, as the `history` that
    `penalize` and `sample` take; None when nothing is penalised."""
    if not params.penalized:
        return None
    return mx.array(list(tokens[-params.repetition_context_size :]), mx.int32)


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


def sample(
    logits: mx.array, params: SamplingParams, key: Optional[mx.array], history: Optional[mx.array] = None
) -> Tuple[mx.array, Optional[mx.array]]:
    """Sample one token per row, after the penalties when `history` is given
    (see `penalize`). Returns (tokens, probabilities or None when greedy)."""
    logits = penalize(logits, history, params)
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


def one_hot(tokens: mx.array, vocab: int) -> mx.array:
    """[k] tokens -> [k, vocab] float32 rows with a 1 at each token: the
    draft distribution of a deterministic drafter."""
    return (mx.arange(vocab)[None, :] == tokens[:, None]).astype(mx.float32)


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
    are then distributed exactly as samples from the target.

    `draft_probs` None: the drafts are deterministic (prompt lookup), q is
    one-hot, so d_j is accepted with probability p_j(d_j) and a rejection
    resamples from p_j with d_j removed and renormalised."""
    p = probabilities(target_logits, params)  # [k+1, V]
    k = drafts.shape[0]
    accept_key, token_key = mx.random.split(key)
    if k == 0:
        return mx.array(0, mx.int32), _categorical(p[0], token_key)
    if draft_probs is None:
        draft_probs = one_hot(drafts, p.shape[-1])
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
