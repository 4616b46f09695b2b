"""Gemma 4 targets (E2B/E4B with per-layer inputs and KV sharing, 26B-A4B MoE,
31B dense), text-only (`gemma4_text`) and multimodal-layout (`gemma4`)
checkpoints, through mlx-lm's own `gemma4` / `gemma4_text` models.

We add:
- `SlidingWindowCache`: mlx-lm uses a RotatingKVCache for sliding layers, and
  once that has overwritten an entry it cannot be trimmed back. This cache
  keeps its rows in temporal order, drops old rows only in batches and always
  keeps `window + 1 + slack` rows besides the newest pass, so trimming the
  newest pass back (a rejected draft) is exact at every context length, for
  the target and for the assistant that reads the cache.
- `hidden` / `logits` / `embed` for the engine, and `shared_kv(cache)`: views
  of the KV the assistant drafter attends to (docs/gemma4-assistant.md#the-kv-it-reads), read
  from the cache objects themselves, nothing copied.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.models import gemma4 as lm_gemma4
from mlx_lm.models import gemma4_text as lm_gemma4_text
from mlx_lm.models.cache import KVCache, _BaseCache

from .base import FULL
from .gemma4_assistant import sliding_keys as assistant_sliding_keys


class SlidingWindowCache(_BaseCache):
    """KV cache for a sliding-window layer that can be rolled back.

    Rows are kept in temporal order; `start` is the absolute position of row 0
    and `offset` the number of tokens seen. When the buffer is full, rows older
    than the newest `history + slack` are dropped in one go (amortised), so a
    trim of up to the newest pass plus `slack` tokens never loses a key that a
    later query can see."""

    step = 256

    def __init__(self, window: int, slack: int = 16):
        self.window, self.slack = int(window), int(slack)
        # Keys before the next position that a later reader needs: the
        # target's next query sees W - 1 of them (and itself), an assistant
        # round at that position W + 1 (docs/gemma4-assistant.md#the-kv-it-reads).
        self.history = max(self.window - 1, assistant_sliding_keys(self.window))
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.offset = 0
        self.start = 0

    @property
    def rows(self) -> int:
        return self.offset - self.start

    def _plan(self, num_new: int) -> Tuple[int, bool]:
        """(rows to drop, whether to reallocate) before appending `num_new`."""
        if self.keys is not None and self.rows + num_new <= self.keys.shape[2]:
            return 0, False
        retain = min(self.rows, self.history + self.slack)
        return self.rows - retain, True

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        L = keys.shape[2]
        drop, realloc = self._plan(L)
        if realloc:
            keep = self.rows - drop
            B, H, _, Dk = keys.shape
            capacity = keep + L + self.step
            new_k = mx.zeros((B, H, capacity, Dk), keys.dtype)
            new_v = mx.zeros((B, H, capacity, values.shape[3]), values.dtype)
            if self.keys is not None and keep:
                new_k[..., :keep, :] = self.keys[..., drop : self.rows, :]
                new_v[..., :keep, :] = self.values[..., drop : self.rows, :]
            self.keys, self.values = new_k, new_v
            self.start += drop
        prev = self.rows
        self.keys[..., prev : prev + L, :] = keys
        self.values[..., prev : prev + L, :] = values
        self.offset += L
        return self.keys[..., : self.rows, :], self.values[..., : self.rows, :]

    def make_mask(self, N: int, window_size: Optional[int] = None, return_array: bool = False):
        # Called before the update: lay out the keys as they will be after it.
        drop, _ = self._plan(N)
        start = self.start + drop
        end = self.offset + N  # one past the newest key
        if start > end - 1 - self.window and not return_array:
            # The window hides nothing: plain causal attention.
            return None if N == 1 else "causal"
        q = mx.arange(self.offset, end)[:, None]
        k = mx.arange(start, end)[None]
        return (k <= q) & (k > q - self.window)

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.rows, n)
        self.offset -= n
        if self.start > max(0, self.offset - self.history):
            raise RuntimeError(
                f"sliding-window cache trimmed past its slack ({self.slack}): rollback would be inexact"
            )
        return n

    def size(self) -> int:
        return self.rows

    def empty(self) -> bool:
        return self.keys is None

    @property
    def state(self):
        if self.keys is None:
            return []
        return self.keys[..., : self.rows, :], self.values[..., : self.rows, :]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class _Gemma4Target:
    """The engine's target interface on top of an mlx-lm Gemma 4 model."""

    #: extra sliding rows kept beyond the window (multiple rollbacks in a row)
    cache_slack: int = 16
    #: why `--drafter auto` finds nothing: Gemma 4 drafts with a separate model
    mtp_problem = (
        "Gemma 4 has no built-in MTP head: pass its assistant drafter with --drafter PATH_OR_REPO "
        "(e.g. google/gemma-4-E2B-it-assistant)"
    )

    @property
    def text_model(self) -> lm_gemma4_text.Model:
        return self.language_model if hasattr(self, "language_model") else self

    @property
    def text_args(self) -> lm_gemma4_text.ModelArgs:
        return self.text_model.args

    def make_cache(self) -> List[Any]:
        a = self.text_args
        first_shared = a.num_hidden_layers - a.num_kv_shared_layers
        return [
            KVCache() if a.layer_types[i] == FULL else SlidingWindowCache(a.sliding_window, self.cache_slack)
            for i in range(first_shared)
        ]

    def hidden(self, tokens: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        """[1, L] tokens -> [1, L, H] hidden states after the final norm."""
        return self.text_model.model(tokens, cache)

    def logits(self, hidden: mx.array) -> mx.array:
        lm = self.text_model
        out = lm.model.embed_tokens.as_linear(hidden) if lm.tie_word_embeddings else lm.lm_head(hidden)
        if lm.final_logit_softcapping is not None:
            out = lm_gemma4_text.logit_softcap(lm.final_logit_softcapping, out)
        return out

    def embed(self, tokens: mx.array) -> mx.array:
        """The scaled input embedding, as the trunk's first layer sees it."""
        m = self.text_model.model
        return m.embed_tokens(tokens) * m.embed_scale

    @property
    def shared_kv_layers(self) -> Dict[str, int]:
        """Layer type -> index of the last non-shared layer of that type
        (mlx-lm's KV-sharing bookkeeping: the layers the drafter reads)."""
        a = self.text_args
        first_shared = a.num_hidden_layers - a.num_kv_shared_layers
        return {a.layer_types[i]: i for i in range(first_shared)}

    def shared_kv(self, cache: List[Any]) -> Dict[str, Tuple[mx.array, mx.array, int]]:
        """Layer type -> (keys, values, position of row 0) as held by the
        target cache now: views into the cache buffers, post-k_norm/RoPE."""
        out = {}
        for layer_type, i in self.shared_kv_layers.items():
            c = cache[i]
            if c.keys is None:
                raise RuntimeError("the target cache is empty: run the prompt first")
            rows = c.offset - getattr(c, "start", 0)
            out[layer_type] = (c.keys[..., :rows, :], c.values[..., :rows, :], getattr(c, "start", 0))
        return out

    @property
    def kv_head_dims(self) -> Dict[str, Tuple[int, int]]:
        """Layer type -> (KV heads, head dim) of the shared layers."""
        out = {}
        for layer_type, i in self.shared_kv_layers.items():
            attn = self.text_model.model.layers[i].self_attn
            out[layer_type] = (attn.n_kv_heads, attn.head_dim)
        return out

    @property
    def context_length(self) -> int:
        return int(self.text_args.max_position_embeddings)

    @property
    def hidden_size(self) -> int:
        return self.text_args.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.text_args.vocab_size


class Model(_Gemma4Target, lm_gemma4.Model):
    """Multimodal-layout checkpoints (`gemma4`): the text path only."""

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        # An untied head sits at the top level in HF's layout.
        if "lm_head.weight" in weights:
            weights = dict(weights)
            head = weights.pop("lm_head.weight")
            if not self.language_model.tie_word_embeddings:
                weights["language_model.lm_head.weight"] = head
        return super().sanitize(weights)


class TextModel(_Gemma4Target, lm_gemma4_text.Model):
    """Text-only checkpoints (`gemma4_text`)."""

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        # Raw HF text checkpoints say `model.language_model.*` in some repacks.
        weights = {k.replace("model.language_model.", "model."): v for k, v in weights.items()}
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return super().sanitize(weights)


class ModelArgs(lm_gemma4.ModelArgs):
    """mlx-lm's multimodal args, reading the vocabulary where released
    configs keep it. Their config.json has `vocab_size` only in text_config;
    mlx-lm's args default the top-level one to 262144 and copy it down over
    the text config's, which is wrong for any other vocabulary."""

    @classmethod
    def from_dict(cls, params: Dict[str, Any]) -> "ModelArgs":
        text_vocab = (params.get("text_config") or {}).get("vocab_size")
        if "vocab_size" not in params and text_vocab is not None:
            params = {**params, "vocab_size": text_vocab}
        return super().from_dict(params)


TextModelArgs = lm_gemma4_text.ModelArgs
