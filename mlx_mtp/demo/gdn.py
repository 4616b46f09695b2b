"""A chunked (parallel) form of the Gated-DeltaNet recurrence, for training.

mlx-lm's CPU path runs the recurrence one position at a time; through a
backward pass over 256 positions that is slow. The chunked form (the "WY"
algorithm of the DeltaNet / Gated DeltaNet papers, as in transformers'
`torch_chunk_gated_delta_rule`) computes the same outputs with matmuls: inside
a chunk of C positions the products of (I - beta k k^T) become one triangular
inverse, here (I - N)^-1 = prod_j (I + N^(2^j)) for the nilpotent strictly
lower-triangular N, so everything stays differentiable; between chunks a short
loop carries the state.

Only training uses this. Inference, drafting and verification run mlx-lm's own
recurrence (and our rollback subclass), so the saved weights are simply a
Qwen3.5 checkpoint; `check()` shows both forms agree.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_5 as lm_qwen3_5


def chunked_gated_delta(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    log_g: mx.array,
    beta: mx.array,
    state: Optional[mx.array] = None,
    chunk: int = 16,
) -> Tuple[mx.array, mx.array]:
    """q, k: [B, T, Hk, Dk] (already normalised and scaled as mlx-lm does),
    v: [B, T, Hv, Dv], log_g, beta: [B, T, Hv], state: [B, Hv, Dv, Dk].
    Returns y [B, T, Hv, Dv] and the final state, like gated_delta_ops."""
    B, T, Hk, Dk = q.shape
    Hv, Dv = v.shape[-2:]
    if Hv // Hk > 1:
        q = mx.repeat(q, Hv // Hk, -2)
        k = mx.repeat(k, Hv // Hk, -2)
    C = min(chunk, T)
    pad = (-T) % C
    if pad:
        z = lambda x: mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        q, k, v, log_g, beta = map(z, (q, k, v, log_g, beta))
    n = (T + pad) // C
    dtype = q.dtype
    # [B, H, n, C, D]
    q, k, v = [x.astype(mx.float32).transpose(0, 2, 1, 3).reshape(B, Hv, n, C, -1) for x in (q, k, v)]
    log_g = log_g.astype(mx.float32).transpose(0, 2, 1).reshape(B, Hv, n, C)
    beta = beta.astype(mx.float32).transpose(0, 2, 1).reshape(B, Hv, n, C)

    gc = mx.cumsum(log_g, axis=-1)  # [B, H, n, C]
    idx = mx.arange(C)
    lower_eq = idx[:, None] >= idx[None, :]
    strictly_lower = idx[:, None] > idx[None, :]
    diff = gc[..., :, None] - gc[..., None, :]
    decay = mx.exp(mx.where(lower_eq, diff, -mx.inf))  # exp(gc_i - gc_j), i >= j

    kb = k * beta[..., None]
    vb = v * beta[..., None]
    N = mx.where(strictly_lower, -(kb @ k.swapaxes(-1, -2)) * decay, 0.0)
    # (I - N)^-1 for nilpotent N.
    inv = mx.eye(C) + N
    power = N
    for _ in range(1, math.ceil(math.log2(C))):
        power = power @ power
        inv = inv + inv @ power
    u = inv @ vb  # [B, H, n, C, Dv]
    w = inv @ (kb * mx.exp(gc)[..., None])  # [B, H, n, C, Dk]
    qk = mx.where(lower_eq, (q @ k.swapaxes(-1, -2)) * decay, 0.0)

    S = (
        mx.zeros((B, Hv, Dk, Dv), dtype=mx.float32)
        if state is None
        else state.astype(mx.float32).swapaxes(-1, -2)
    )
    outs = []
    for i in range(n):
        g_i = gc[:, :, i]
        v_new = u[:, :, i] - w[:, :, i] @ S
        outs.append((q[:, :, i] * mx.exp(g_i)[..., None]) @ S + qk[:, :, i] @ v_new)
        g_last = g_i[..., -1:]
        S = S * mx.exp(g_last)[..., None] + (k[:, :, i] * mx.exp(g_last - g_i)[..., None]).swapaxes(-1, -2) @ v_new
    y = mx.stack(outs, axis=2).reshape(B, Hv, n * C, Dv).transpose(0, 2, 1, 3)[:, :T]
    return y.astype(dtype), S.swapaxes(-1, -2)


def _chunked_update(q, k, v, a, b, A_log, dt_bias, state=None, mask=None, *, use_kernel=True, **kw):
    """Drop-in for mlx-lm's gated_delta_update (training only: no mask)."""
    if mask is not None or kw.get("lower_bound") is not None or kw.get("allow_neg_eigval"):
        raise NotImplementedError("chunked Gated-DeltaNet: masks/lower_bound are not used in training")
    beta = mx.sigmoid(b)
    log_g = -mx.exp(A_log.astype(mx.float32)) * nn.softplus(a + dt_bias)
    return chunked_gated_delta(q, k, v, log_g, beta, state)


class ShiftSumConv1d(nn.Conv1d):
    """Depthwise causal conv as a sum of K shifted slices: the same numbers as
    the grouped nn.Conv1d, several times faster on MLX's CPU backend."""

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight  # [C, K, 1]
        K = w.shape[1]
        L = x.shape[1] - K + 1
        y = x[:, 0:L, :] * w[:, 0, 0]
        for j in range(1, K):
            y = y + x[:, j : j + L, :] * w[:, j, 0]
        return y


@contextlib.contextmanager
def chunked_training(model=None):
    """Make mlx-lm's Qwen3.5 Gated-DeltaNet use the chunked form (and, for
    `model`'s layers, the shift-sum conv) inside the block."""
    original = lm_qwen3_5.gated_delta_update
    lm_qwen3_5.gated_delta_update = _chunked_update
    convs = []
    if model is not None:
        for _, m in model.named_modules():
            if isinstance(m, nn.Conv1d) and m.weight.shape[-1] == 1 and type(m) is nn.Conv1d:
                convs.append(m)
                m.__class__ = ShiftSumConv1d
    try:
        yield
    finally:
        lm_qwen3_5.gated_delta_update = original
        for m in convs:
            m.__class__ = nn.Conv1d


def check(seed: int = 0, T: int = 150) -> float:
    """Max abs difference between the chunked form and mlx-lm's recurrence."""
    from mlx_lm.models.gated_delta import gated_delta_ops, normalize_qk

    mx.random.seed(seed)
    B, Hk, Hv, Dk, Dv = 2, 2, 4, 16, 8
    q, k = normalize_qk(mx.random.normal((B, T, Hk, Dk)), mx.random.normal((B, T, Hk, Dk)), inv_scale=Dk**-0.5, eps=1e-6)
    v = mx.random.normal((B, T, Hv, Dv))
    a, b = mx.random.normal((B, T, Hv)), mx.random.normal((B, T, Hv))
    A_log, dt_bias = mx.log(mx.random.uniform(0.5, 16, (Hv,))), mx.ones(Hv)
    s0 = 0.1 * mx.random.normal((B, Hv, Dv, Dk))
    g = mx.exp(-mx.exp(A_log) * nn.softplus(a + dt_bias))
    y_ref, s_ref = gated_delta_ops(q, k, v, g, mx.sigmoid(b), s0)
    y, s = _chunked_update(q, k, v, a, b, A_log, dt_bias, s0)
    return max(mx.abs(y - y_ref).max().item(), mx.abs(s - s_ref).max().item())


if __name__ == "__main__":
    print(check())
