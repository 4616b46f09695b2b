"""Caches that can be rolled back to any prefix of a verify pass.

Attention KV caches roll back by trimming. Gated-DeltaNet layers carry a conv
state and a recurrent state that cannot be "trimmed": instead, while the target
verifies k+1 positions, each such layer records the state after every position,
and rollback selects the one for the accepted length. No target re-run.
"""

from __future__ import annotations

from typing import Any, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, CacheList, ChunkedKVCache, KVCache, RotatingKVCache
from mlx_lm.models.gated_delta import gated_delta_update, normalize_qk
from mlx_lm.models.qwen3_5 import GatedDeltaNet
from mlx_lm.models.qwen3_next import Qwen3NextGatedDeltaNet


class RecurrentCache(ArraysCache):
    """mlx-lm's two-slot ArraysCache ([conv_state, recurrent_state]) plus
    per-position history captured while `recording` is on."""

    def __init__(self):
        super().__init__(size=2)
        self.recording = False
        self.conv_input: Optional[mx.array] = None  # [B, K-1+T, C]
        self.initial_state: Optional[mx.array] = None  # state before the T positions
        self.states: List[mx.array] = []  # state after each of the T positions

    def record(self, conv_input: mx.array, initial: Optional[mx.array], states: List[mx.array], kernel: int):
        self.conv_input = conv_input
        self.initial_state = initial
        self.states = states
        self[0] = conv_input[:, -(kernel - 1) :, :]
        self[1] = states[-1]

    def keep(self, num_tokens: int) -> None:
        """Keep the first `num_tokens` of the recorded positions."""
        if not self.states:
            raise RuntimeError("no recorded verify pass to roll back")
        if not 0 <= num_tokens <= len(self.states):
            raise ValueError(f"cannot keep {num_tokens} of {len(self.states)} recorded positions")
        kernel_minus_1 = self.conv_input.shape[1] - len(self.states)
        self[0] = self.conv_input[:, num_tokens : num_tokens + kernel_minus_1, :]
        self[1] = self.states[num_tokens - 1] if num_tokens else self.initial_state
        self.forget()

    def forget(self) -> None:
        self.conv_input = None
        self.initial_state = None
        self.states = []


def _recorded_forward(gdn: nn.Module, inputs: mx.array, qkv: mx.array, z: mx.array, b: mx.array,
                      a: mx.array, cache: "RecurrentCache") -> mx.array:
    """A Gated-DeltaNet forward after its input projections (`qkv` [B, S,
    2*key_dim + value_dim], `z` [B, S, Hv, Dv], `b` / `a` [B, S, Hv]) that
    records the state after every position in `cache`. Qwen3.5's and
    Qwen3-Next's layers differ only in how they project; from here on they
    are the same module (mlx-lm's two `__call__`s), so both share this."""
    B, S, _ = inputs.shape
    conv_state = cache[0]
    if conv_state is None:
        conv_state = mx.zeros((B, gdn.conv_kernel_size - 1, gdn.conv_dim), inputs.dtype)
    conv_input = mx.concatenate([conv_state, qkv], axis=1)
    conv_out = nn.silu(gdn.conv1d(conv_input))
    q, k, v = [
        t.reshape(B, S, h, d)
        for t, h, d in zip(
            mx.split(conv_out, [gdn.key_dim, 2 * gdn.key_dim], -1),
            [gdn.num_k_heads, gdn.num_k_heads, gdn.num_v_heads],
            [gdn.head_k_dim, gdn.head_k_dim, gdn.head_v_dim],
        )
    ]
    q, k = normalize_qk(q, k, inv_scale=gdn.head_k_dim**-0.5, eps=1e-6)
    # One recurrence step per position, exactly as plain decoding runs it,
    # so every intermediate state exists and matches step-by-step decoding.
    initial = state = cache[1]
    outs, states = [], []
    for t in range(S):
        sl = slice(t, t + 1)
        y, state = gated_delta_update(
            q[:, sl], k[:, sl], v[:, sl], a[:, sl], b[:, sl],
            gdn.A_log, gdn.dt_bias, state, None, use_kernel=not gdn.training,
        )
        outs.append(y)
        states.append(state)
    cache.record(conv_input, initial, states, gdn.conv_kernel_size)
    out = gdn.norm(mx.concatenate(outs, axis=1), z)
    return gdn.out_proj(out.reshape(B, S, -1))


class RollbackGatedDeltaNet(GatedDeltaNet):
    """mlx-lm's Qwen3.5 Gated-DeltaNet; when its cache is recording it keeps
    the state after every position of the input (the verify pass)."""

    def __call__(self, inputs: mx.array, mask=None, cache: Any = None) -> mx.array:
        if not (isinstance(cache, RecurrentCache) and cache.recording):
            return super().__call__(inputs, mask, cache)
        B, S, _ = inputs.shape
        z = self.in_proj_z(inputs).reshape(B, S, self.num_v_heads, self.head_v_dim)
        return _recorded_forward(self, inputs, self.in_proj_qkv(inputs), z, self.in_proj_b(inputs),
                                 self.in_proj_a(inputs), cache)


class RollbackQwen3NextGatedDeltaNet(Qwen3NextGatedDeltaNet):
    """mlx-lm's Qwen3-Next Gated-DeltaNet (fused `in_proj_qkvz` / `in_proj_ba`,
    head-grouped), recording like `RollbackGatedDeltaNet`."""

    def __call__(self, inputs: mx.array, mask=None, cache: Any = None) -> mx.array:
        if not (isinstance(cache, RecurrentCache) and cache.recording):
            return super().__call__(inputs, mask, cache)
        B, S, _ = inputs.shape
        q, k, v, z, b, a = self.fix_query_key_value_ordering(self.in_proj_qkvz(inputs), self.in_proj_ba(inputs))
        qkv = mx.concatenate([q.reshape(B, S, -1), k.reshape(B, S, -1), v.reshape(B, S, -1)], axis=-1)
        return _recorded_forward(self, inputs, qkv, z, b, a, cache)


#: mlx-lm Gated-DeltaNet class -> its recording subclass.
_RECORDING_CLASSES = ((GatedDeltaNet, RollbackGatedDeltaNet), (Qwen3NextGatedDeltaNet, RollbackQwen3NextGatedDeltaNet))


def enable_recurrent_rollback(model: nn.Module) -> None:
    """Swap the Gated-DeltaNet modules of an mlx-lm Qwen3.5 or Qwen3-Next
    model for their recording subclass. Same parameters, same plain forward."""
    for layer in model.layers:
        if not getattr(layer, "is_linear", False):
            continue
        for base, recording in _RECORDING_CLASSES:
            if isinstance(layer.linear_attn, base):
                layer.linear_attn.__class__ = recording


def set_recording(cache: List[Any], on: bool) -> None:
    for c in cache:
        if isinstance(c, RecurrentCache):
            c.recording = on


def rollback(cache: List[Any], num_verified: int, num_keep: int) -> None:
    """After a recorded pass over `num_verified` tokens, keep only the first
    `num_keep` of them in every cache."""
    if not 0 <= num_keep <= num_verified:
        raise ValueError(f"cannot keep {num_keep} of {num_verified} verified tokens")
    drop = num_verified - num_keep
    for c in cache:
        if isinstance(c, RecurrentCache):
            if drop > 0:
                c.keep(num_keep)
            else:
                c.forget()
        elif drop > 0:
            if not c.is_trimmable():
                raise TypeError(f"cache {type(c).__name__} cannot be rolled back")
            c.trim(drop)


#: mlx-lm caches that trim while they are young but not at every length:
#: a RotatingKVCache overwrites its oldest entries once its window is full,
#: a ChunkedKVCache drops its front at chunk boundaries.
_TRIMMABLE_FOR_A_WHILE = (RotatingKVCache, ChunkedKVCache)


def rollback_problem(cache: List[Any]) -> Optional[str]:
    """Why `rollback` cannot restore every entry of this fresh cache to any
    verified prefix at every length (None when it can): every entry must
    record (RecurrentCache) or trim exactly (KVCache and the like)."""
    for c in cache:
        inner = c.caches if isinstance(c, CacheList) else [c]
        for entry in inner:
            name = type(entry).__name__
            if isinstance(entry, _TRIMMABLE_FOR_A_WHILE):
                return f"its {name} layers cannot roll back a draft once their window is full"
            if not isinstance(entry, RecurrentCache) and not entry.is_trimmable():
                return f"its {name} layers cannot roll back a draft (they cannot be trimmed)"
    return None


def trim_cache(cache: List[Any], num_tokens: int) -> None:
    """Trim attention caches by `num_tokens` (a head's own KV cache)."""
    if num_tokens > 0:
        for c in cache:
            c.trim(num_tokens)


def make_target_cache(model: nn.Module) -> List[Any]:
    return [RecurrentCache() if layer.is_linear else KVCache() for layer in model.layers]
