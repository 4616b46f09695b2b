"""DeepSeek-style "nextn" MTP heads (DeepSeek-V3, GLM-4.5/4.6/4.7, GLM-4.7-Flash).

The checkpoint stores the head as one more decoder layer after the trunk,
`model.layers.L.*` with L = `num_hidden_layers`: a full decoder block (MoE
where the trunk has it) plus `enorm`, `hnorm`, `eh_proj`, `shared_head.norm`,
`shared_head.head` and a duplicate `embed_tokens`, which we drop for the
trunk's. mlx-lm's `sanitize` throws all of it away; the family files under
models/ subclass mlx-lm's model with `NextNMixin` to keep it.

One head position i reads (E[t_{i+1}], h_i):
    x = eh_proj([enorm(E[t_{i+1}]), hnorm(h_i)])
    x = decoder block(x)            (its own KV cache)
    g = shared_head.norm(x);  logits = shared_head.head(g)
Draft step j > 1 feeds g back in place of h, the post-`shared_head.norm`
state, as SGLang's DeepSeek/GLM nextn models return it
(python/sglang/srt/models/{deepseek,glm4_moe}_nextn.py) and transformers'
`MtpModel` chains it (modeling_layers.py). vLLM differs: its MTP layers
return the state before that norm, which its proposer feeds back (method
"mtp"), or it reuses the target's last hidden state (older "deepseek_mtp"
path, vllm/v1/spec_decode/eagle.py). The choice changes drafts only, never
the output; we follow SGLang and transformers.
Checkpoints without `shared_head.head` (GLM-4.6 and later store none: it is
the trunk's lm_head, vLLM PR #27597) take their logits from the trunk's
lm_head.

Checkpoints with several nextn layers (`num_nextn_predict_layers` > 1) keep
them all through loading and conversion; drafting uses the first one at every
depth, as vLLM does when it cycles a one-layer head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Type

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from .heads import HeadLayout, layer_index_local_key


def _layout_sanitize(head: Dict[str, mx.array], raw: bool) -> Dict[str, mx.array]:
    """`HeadLayout.sanitize` for nextn heads, without a model instance:
    per-expert tensors stacked into mlx-lm's `switch_mlp` layout and the
    duplicate `embed_tokens` dropped. nextn norms are stored as they are
    applied (no zero-centring), so `raw` changes nothing."""
    from .qwen3_5 import stack_experts

    return {k: v for k, v in stack_experts(head).items() if ".embed_tokens." not in f".{k}"}


class SharedHead(nn.Module):
    def __init__(self, hidden_size: int, vocab_size: int, eps: float):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=eps)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False)


def nextn_layer_class(decoder_layer: Type[nn.Module]) -> Type[nn.Module]:
    """The trunk's decoder layer class plus the nextn projections, so the
    stored keys (`self_attn.*`, `mlp.*`, `enorm.*`, ...) map one to one."""

    class NextNLayer(decoder_layer):
        def __init__(self, args: Any, layer_idx: int):
            super().__init__(args, layer_idx)
            H, eps = args.hidden_size, args.rms_norm_eps
            self.enorm = nn.RMSNorm(H, eps=eps)
            self.hnorm = nn.RMSNorm(H, eps=eps)
            self.eh_proj = nn.Linear(2 * H, H, bias=False)
            self.shared_head = SharedHead(H, args.vocab_size, eps)

        def predict(self, embeddings: mx.array, hidden: mx.array, mask: Any, cache: Any) -> mx.array:
            x = self.eh_proj(mx.concatenate([self.enorm(embeddings), self.hnorm(hidden)], axis=-1))
            return self.shared_head.norm(self(x, mask, cache))

    NextNLayer.__name__ = f"NextN{decoder_layer.__name__}"
    return NextNLayer


class NextNHead(nn.Module):
    """The `mtp` module: `layers[i]` is stored layer `num_hidden_layers + i`."""

    def __init__(self, args: Any, decoder_layer: Type[nn.Module], num_layers: int):
        super().__init__()
        layer_class = nextn_layer_class(decoder_layer)
        first = args.num_hidden_layers
        self.layers = [layer_class(args, first + i) for i in range(num_layers)]

    def __call__(self, embeddings: mx.array, hidden: mx.array, cache: List[Any]) -> mx.array:
        mask = create_attention_mask(embeddings, cache[0])
        return self.layers[0].predict(embeddings, hidden, mask, cache[0])

    def logits(self, state: mx.array, fallback: Optional[Callable[[mx.array], mx.array]] = None) -> mx.array:
        """Logits of a head state: `shared_head.head`, or `fallback` (the
        trunk's LM head) for checkpoints that store none."""
        shared = self.layers[0].shared_head
        if "head" in shared:
            return shared.head(state)
        if fallback is None:
            raise ValueError("this nextn head has no shared_head.head and no fallback LM head was given")
        return fallback(state)

    def make_cache(self) -> List[Any]:
        return [KVCache()]


class NextNMixin:
    """Keeps a nextn head through loading; mixed into mlx-lm's Model class
    before it (`class Model(NextNMixin, lm_glm4_moe.Model)`), with
    `decoder_layer` set to that module's decoder layer class."""

    decoder_layer: Type[nn.Module]

    def _init_mtp(self, args: Any) -> None:
        self.declared_mtp_layers = int(getattr(args, "num_nextn_predict_layers", 0) or 0)
        self.mtp_problem: Optional[str] = None
        if self.declared_mtp_layers > 0:
            self.mtp = NextNHead(args, self.decoder_layer, self.declared_mtp_layers)

    @classmethod
    def head_layout(cls, config: Dict[str, Any]) -> HeadLayout:
        return HeadLayout(
            local_key=layer_index_local_key(int(config["num_hidden_layers"])),
            declared_layers=int(config.get("num_nextn_predict_layers", 0) or 0),
            config_field="num_nextn_predict_layers",
            sanitize=_layout_sanitize,  # the model classes use `_sanitize_head` (mlx-lm's own sanitize)
        )

    @property
    def has_mtp(self) -> bool:
        return "mtp" in self

    def _sanitize_head(self, head: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Head tensors keyed `layers.i.*` -> the `mtp` module's layout. Each
        layer goes through mlx-lm's own `sanitize` posing as trunk layer 0
        (expert stacking, FP8 / int4 decoding keyed by layer prefix), and
        its duplicate `embed_tokens` is dropped for the trunk's."""
        out: Dict[str, mx.array] = {}
        for i in range(self.declared_mtp_layers):
            prefix = f"layers.{i}."
            layer = {f"model.layers.0.{k[len(prefix):]}": v for k, v in head.items() if k.startswith(prefix)}
            for key, value in super().sanitize(layer).items():
                if key.startswith("model.layers.0.") and ".embed_tokens." not in f".{key[15:]}":
                    out[f"{prefix}{key[len('model.layers.0.'):]}"] = value
        return out

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        layout = self.head_layout({"num_hidden_layers": self.args.num_hidden_layers})
        head, trunk = layout.split(weights)
        trunk = super().sanitize(trunk)
        if self.declared_mtp_layers > 0 and not head:
            self.mtp_problem = (
                f"config declares num_nextn_predict_layers={self.declared_mtp_layers} but the checkpoint has "
                f"no model.layers.{self.args.num_hidden_layers}.* weights (they were stripped by a conversion)"
            )
            self.pop("mtp", None)
        elif head and self.declared_mtp_layers == 0:
            self.mtp_problem = (
                f"checkpoint has {len(head)} nextn head tensors but its config declares no MTP head "
                "(num_nextn_predict_layers is missing or 0)"
            )
        elif head:
            sanitized = self._sanitize_head(head)
            for i, layer in enumerate(self.mtp.layers):
                if not any(k.startswith(f"layers.{i}.shared_head.head.") for k in sanitized):
                    # Stored without its own output head (GLM-4.6+): the
                    # trunk's lm_head serves, see `NextNHead.logits`.
                    layer.shared_head.pop("head", None)
            for key, value in sanitized.items():
                trunk[f"mtp.{key}"] = value
        else:
            self.mtp_problem = "this checkpoint has no MTP head (no nextn layer, none declared)"
        return trunk

    def mtp_logits(self, state: mx.array) -> mx.array:
        return self.mtp.logits(state, fallback=self.logits)

    def make_mtp_cache(self) -> List[Any]:
        return self.mtp.make_cache()

    def make_cache(self) -> List[Any]:
        return self.make_target_cache()

    def make_target_cache(self) -> List[Any]:
        return [KVCache() for _ in self.layers]

    # Pieces the engine needs; mlx-lm's inner model returns post-norm states.
    def hidden(self, tokens: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        return self.model(tokens, cache)

    def logits(self, hidden: mx.array) -> mx.array:
        return self.lm_head(hidden)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.model.embed_tokens(tokens)

    @property
    def context_length(self) -> int:
        return int(self.args.max_position_embeddings)

    @property
    def hidden_size(self) -> int:
        return self.args.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size


def family_args(lm_args: Type[Any]) -> Type[Any]:
    """mlx-lm's ModelArgs plus `num_nextn_predict_layers`, which its
    `from_dict` would otherwise drop with every field it does not know."""

    @dataclass
    class ModelArgs(lm_args):
        num_nextn_predict_layers: int = 0

    return ModelArgs


def family_model(lm_model: Type[nn.Module], decoder_layer: Type[nn.Module]) -> Callable[..., nn.Module]:
    """`class Model(NextNMixin, lm_model)` with its head initialised: what
    each family file exports."""

    class Model(NextNMixin, lm_model):
        def __init__(self, args: Any):
            super().__init__(args)
            self._init_mtp(args)

    Model.decoder_layer = decoder_layer
    return Model
