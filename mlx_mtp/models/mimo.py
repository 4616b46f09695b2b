"""MiMo (XiaomiMiMo/MiMo-7B-Base, -SFT, -RL, -RL-0530) with its MTP head.

The trunk is mlx-lm's own `mimo` model (Qwen2 blocks, q/k/v biases); its
`sanitize` drops the head, `model.mtp_layers.{k}.*`, which we keep as our
`mtp` module (`mtp.layers.{k}.*`; the loader reads the stored names and
`mtp.*` alike, `HeadLayout`). One head layer
is a full Qwen2 decoder block (`self_attn.*`, `mlp.*`, `input_layernorm`,
`post_attention_layernorm`) plus `token_layernorm`, `hidden_layernorm`,
`input_proj` and `final_layernorm`; its norms are plain RMSNorms (w * x).

Head position i reads (E[t_{i+1}], h_i), h the trunk's post-norm state:
    x = input_proj([hidden_layernorm(h_i), token_layernorm(E[t_{i+1}])])
    g = final_layernorm(decoder block(x))       (its own KV cache)
    logits = the trunk's lm_head(g)
Note the order: hidden first, then the embedding (the published
modeling_mimo.py `MiMoMTPLayers.forward`, vLLM
vllm/model_executor/models/mimo_mtp.py and SGLang
python/sglang/srt/models/mimo_mtp.py all concatenate it so), the reverse of
DeepSeek's nextn and of Qwen's `mtp.fc`. Like vLLM and SGLang, the embedding
at position 0 is zeroed ("not needed by MTP"). The logits come from the
target's `lm_head` (both engines load the head with the trunk's `lm_head`
and `embed_tokens`; the checkpoint has no copy of either).

Depth > 1: the released checkpoints ship one MTP layer
(`num_nextn_predict_layers: 1`). vLLM runs only step 0 of it
(`mimo_mtp only support predict one token now`) and its EAGLE loop, like
SGLang's, feeds the head's own output back for further steps; a
multi-step variant of modeling_mimo.py (`num_speculative_steps`) reuses
`mtp_layers[0]` the same way with the post-`final_layernorm` state. So
every draft step uses layer 0 and step j > 1 reads the previous step's
post-`final_layernorm` state. Checkpoints with more layers keep them all
through loading and conversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import mimo as lm_mimo
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from .heads import HeadLayout, layer_index_local_key
from .nextn import NextNMixin

#: Where the released checkpoints keep the head.
STORED_PREFIX = "model.mtp_layers."
CONFIG_FIELD = "num_nextn_predict_layers"


@dataclass
class ModelArgs(lm_mimo.ModelArgs):
    # mlx-lm defaults to 2; MiMoConfig (configuration_mimo.py) to 0, which is
    # what a config without the field means.
    num_nextn_predict_layers: int = 0


class MiMoMTPLayer(lm_mimo.TransformerBlock):
    """mlx-lm's MiMo block plus the head's projections, so the stored keys
    (`self_attn.*`, `mlp.*`, `token_layernorm.*`, ...) map one to one."""

    def __init__(self, args: lm_mimo.ModelArgs):
        super().__init__(args)
        H, eps = args.hidden_size, args.rms_norm_eps
        self.token_layernorm = nn.RMSNorm(H, eps=eps)
        self.hidden_layernorm = nn.RMSNorm(H, eps=eps)
        self.input_proj = nn.Linear(2 * H, H, bias=False)
        self.final_layernorm = nn.RMSNorm(H, eps=eps)

    def predict(self, embeddings: mx.array, hidden: mx.array, mask: Any, cache: Any) -> mx.array:
        x = self.input_proj(mx.concatenate([self.hidden_layernorm(hidden), self.token_layernorm(embeddings)], axis=-1))
        return self.final_layernorm(self(x, mask, cache))


class MiMoHead(nn.Module):
    """The `mtp` module: `layers[k]` is stored `model.mtp_layers.{k}`."""

    def __init__(self, args: lm_mimo.ModelArgs, num_layers: int):
        super().__init__()
        self.layers = [MiMoMTPLayer(args) for _ in range(num_layers)]

    def __call__(self, embeddings: mx.array, hidden: mx.array, cache: List[Any]) -> mx.array:
        offset = cache[0].offset
        if isinstance(offset, int) and offset == 0:
            # Position 0 of the sequence: vLLM and SGLang zero its embedding.
            # (Batched heads, whose offset is one per row, only ever see rows
            # a single-row head has already started.)
            embeddings = mx.concatenate([mx.zeros_like(embeddings[:, :1]), embeddings[:, 1:]], axis=1)
        mask = create_attention_mask(embeddings, cache[0])
        return self.layers[0].predict(embeddings, hidden, mask, cache[0])

    def make_cache(self) -> List[Any]:
        return [KVCache()]


def _sanitize_head_tensors(head: Dict[str, mx.array], raw: bool) -> Dict[str, mx.array]:
    """Head tensors keyed `layers.k.*` -> the `mtp` module's layout: the same
    names; only precomputed rotary tables (some exports carry them) go."""
    return {k: v for k, v in head.items() if not k.endswith("rotary_emb.inv_freq")}


class Model(NextNMixin, lm_mimo.Model):
    """mlx-lm's MiMo with the head kept. `NextNMixin` supplies the target
    plumbing (hidden / logits / caches); the head and its messages are MiMo's."""

    decoder_layer = lm_mimo.TransformerBlock

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.declared_mtp_layers = int(getattr(args, CONFIG_FIELD, 0) or 0)
        self.mtp_problem: Optional[str] = None
        if self.declared_mtp_layers > 0:
            self.mtp = MiMoHead(args, self.declared_mtp_layers)

    @classmethod
    def head_layout(cls, config: Dict[str, Any]) -> HeadLayout:
        return HeadLayout(
            local_key=layer_index_local_key(0, prefix=STORED_PREFIX),
            declared_layers=int(config.get(CONFIG_FIELD, 0) or 0),
            config_field=CONFIG_FIELD,
            sanitize=_sanitize_head_tensors,
        )

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        head, trunk = self.head_layout({}).split(weights)
        trunk = lm_mimo.Model.sanitize(self, trunk)
        n = self.declared_mtp_layers
        if n > 0 and not head:
            self.mtp_problem = (
                f"config declares {CONFIG_FIELD}={n} but the checkpoint has no {STORED_PREFIX}* "
                "weights (they were stripped by a conversion)"
            )
            self.pop("mtp", None)
        elif head and n == 0:
            self.mtp_problem = (
                f"checkpoint has {len(head)} MTP head tensors ({STORED_PREFIX}*) but its config "
                f"declares no MTP head ({CONFIG_FIELD} is missing or 0)"
            )
        elif head:
            for key, value in _sanitize_head_tensors(head, True).items():
                trunk[f"mtp.{key}"] = value
        else:
            self.mtp_problem = f"this checkpoint has no MTP head (no {STORED_PREFIX}* weights, none declared)"
        return trunk

    def mtp_logits(self, state: mx.array) -> mx.array:
        """The trunk's LM head reads `final_layernorm`'s output."""
        return self.logits(state)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(hidden)
        return self.lm_head(hidden)
