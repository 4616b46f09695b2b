"""Qwen3-Next (Qwen3-Next-80B-A3B-Instruct / -Thinking, Qwen3-Coder-Next) with its MTP head.

The trunk is mlx-lm's own `qwen3_next` model; mlx-lm's `sanitize` drops the
`mtp.*` head, which we keep. The head is stored exactly like Qwen3.5's
(`mtp.fc`, `mtp.pre_fc_norm_embedding`, `mtp.pre_fc_norm_hidden`,
`mtp.layers.0.*`, `mtp.norm`), so Qwen3.5's `MTPHead` and `_MTPMixin` do the
work; this file supplies what differs:

- the head's decoder layer is Qwen3-Next's full-attention layer (gated
  attention + the MoE block with its shared expert), MoE or dense by the
  rule vLLM applies to the head as layer index 0
  (vllm/model_executor/models/qwen3_next.py `Qwen3NextDecoderLayer`,
  built by qwen3_next_mtp.py with prefix `mtp.layers.{i}`);
- the layer count: the released config.json names none, and vLLM's
  `Qwen3NextMultiTokenPredictor` reads `num_nextn_predict_layers` with a
  default of 1 (vllm/model_executor/models/qwen3_next_mtp.py); we do the
  same, and also honour `mtp_num_hidden_layers` (Qwen3.5's field, which
  some Qwen3-Next MTP ports write into their configs);
- raw HF norms are zero-centred (`Qwen3NextRMSNorm`: x * (1 + w), transformers'
  modeling_qwen3_next.py); mlx-lm shifts the trunk's once, the mixin shifts
  the head's (the gated `linear_attn.norm` is plain and only in the trunk);
- mlx-lm's `sanitize` detects a raw checkpoint by its per-expert keys, so
  the trunk goes to it unstacked (Qwen3.5 pre-stacks).

Like vLLM, the head reads the trunk's post-final-norm hidden states and
draft step j > 1 feeds back its own post-`mtp.norm` output (drafters/mtp.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_next as lm_qwen3_next

from .heads import HeadLayout, mtp_local_key
from .qwen3_5 import _MTPMixin, _sanitize_mtp

#: Fields that may count the head's layers, in the order we read them.
LAYER_FIELDS = ("num_nextn_predict_layers", "mtp_num_hidden_layers")
#: Head layers when the config names none: the released checkpoints ship one.
DEFAULT_MTP_LAYERS = 1


@dataclass
class ModelArgs(lm_qwen3_next.ModelArgs):
    """mlx-lm's args plus the head-count fields its `from_dict` would drop."""

    num_nextn_predict_layers: Optional[int] = None
    mtp_num_hidden_layers: Optional[int] = None


def declared_mtp_layers(config: Dict[str, Any]) -> int:
    """Head layers a Qwen3-Next config declares (DEFAULT_MTP_LAYERS when it names none)."""
    for field in LAYER_FIELDS:
        if config.get(field) is not None:
            return int(config[field])
    return DEFAULT_MTP_LAYERS


def mtp_decoder_layer(args: lm_qwen3_next.ModelArgs) -> nn.Module:
    """One head layer: full attention always; MoE unless layer index 0 would
    be dense (vLLM's `is_moe_layer` with the index parsed from `mtp.layers.0`)."""
    layer = lm_qwen3_next.Qwen3NextDecoderLayer(args, args.full_attention_interval - 1)
    moe = 0 not in args.mlp_only_layers and args.num_experts > 0 and 1 % args.decoder_sparse_step == 0
    if moe:
        layer.mlp = lm_qwen3_next.Qwen3NextSparseMoeBlock(args)
    else:
        layer.mlp = lm_qwen3_next.Qwen3NextMLP(args.hidden_size, args.intermediate_size)
    return layer


class Model(_MTPMixin, lm_qwen3_next.Model):
    mtp_config_field = LAYER_FIELDS[0]

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self._init_mtp(args, declared_mtp_layers(vars(args)), mtp_decoder_layer)

    # The mixin reads the text model as `language_model` (Qwen3.5 nests it);
    # Qwen3-Next is text-only, so that is the model itself. A property, not
    # an attribute, so the module tree has no cycle.
    @property
    def language_model(self) -> "Model":
        return self

    @classmethod
    def head_layout(cls, config: Dict[str, Any]) -> HeadLayout:
        return HeadLayout(
            local_key=mtp_local_key,
            declared_layers=declared_mtp_layers(config),
            config_field=LAYER_FIELDS[0],
            sanitize=_sanitize_mtp,
        )

    def _sanitize_trunk(self, trunk: Dict[str, mx.array]) -> Dict[str, mx.array]:
        # mlx-lm stacks the per-expert tensors, moves the conv axis and shifts
        # the zero-centred norms itself, but only when it sees per-expert keys
        # (its test for a raw checkpoint): so no pre-stacking here.
        return lm_qwen3_next.Model.sanitize(self, trunk)

    def _mtp_declaration(self) -> str:
        named = [f for f in LAYER_FIELDS if getattr(self.args, f, None) is not None]
        if named:
            return f"config declares {named[0]}={self.declared_mtp_layers}"
        return (
            f"Qwen3-Next checkpoints ship {self.declared_mtp_layers} MTP layer (config.json names no "
            f"{LAYER_FIELDS[0]}; vLLM assumes {DEFAULT_MTP_LAYERS})"
        )
