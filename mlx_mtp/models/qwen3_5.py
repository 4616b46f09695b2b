"""Qwen3.5 / Qwen3.6 (dense and MoE) targets with their MTP head.

The trunk is mlx-lm's own `qwen3_5` / `qwen3_5_moe` model. We add:
- the `mtp.*` head that mlx-lm's `sanitize` throws away (docs/mtp-head.md#config-and-detection),
- Gated-DeltaNet layers that can roll back to any verified prefix,
- `hidden` / `logits` so the engine gets post-norm hidden states.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models import qwen3_5 as lm_qwen3_5
from mlx_lm.models import qwen3_5_moe as lm_qwen3_5_moe
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

from .heads import MTP_KEY as _MTP_KEY
from .heads import HeadLayout, mtp_local_key, text_config
from .rollback import enable_recurrent_rollback, make_target_cache

ModelArgs = lm_qwen3_5.ModelArgs


class MTPHead(nn.Module):
    """x = fc([norm_e(E[t+1]), norm_h(h_t)]); x = decoder layer(s) with an own
    KV cache; g = norm(x). Logits come from the target's lm_head.

    `make_layer(args)` builds one head decoder layer; by default Qwen3.5's
    full-attention layer (Qwen3-Next passes its own, models/qwen3_next.py)."""

    def __init__(self, args: lm_qwen3_5.TextModelArgs, num_layers: int,
                 make_layer: Optional[Callable[[Any], nn.Module]] = None):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.pre_fc_norm_embedding = nn.RMSNorm(H, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(H, eps=eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        # A layer index whose type is full attention gives the gated-attention
        # layer (dense MLP or MoE block as the trunk has).
        if make_layer is None:
            full_idx = args.full_attention_interval - 1
            make_layer = lambda a: lm_qwen3_5.DecoderLayer(a, full_idx)  # noqa: E731
        self.layers = [make_layer(args) for _ in range(num_layers)]
        self.norm = nn.RMSNorm(H, eps=eps)

    def __call__(self, embeddings: mx.array, hidden: mx.array, cache: List[Any]) -> mx.array:
        x = mx.concatenate(
            [self.pre_fc_norm_embedding(embeddings), self.pre_fc_norm_hidden(hidden)], axis=-1
        )
        x = self.fc(x)
        mask = create_attention_mask(x, cache[0])
        for layer, c in zip(self.layers, cache):
            x = layer(x, mask, c)
        return self.norm(x)

    def make_cache(self) -> List[Any]:
        return [KVCache() for _ in self.layers]


# One tensor per expert (Qwen3-Next, and the FP8 / GPTQ exports of Qwen3.5-MoE):
# `<prefix>.mlp.experts.<e>.<proj>.<leaf>` for any prefix, head or trunk.
_PER_EXPERT_KEY = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.(\w+)$")


def stack_experts(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """Per-expert tensors -> mlx-lm's stacked `<prefix>.mlp.switch_mlp.<proj>.<leaf>`
    (`[E, ...]`, experts in index order); every other key passes through."""
    out: Dict[str, mx.array] = {}
    experts: Dict[str, Dict[int, mx.array]] = {}
    for key, value in weights.items():
        m = _PER_EXPERT_KEY.match(key)
        if m:
            experts.setdefault(f"{m.group(1)}.switch_mlp.{m.group(3)}.{m.group(4)}", {})[int(m.group(2))] = value
        else:
            out[key] = value
    for key, per_expert in experts.items():
        out[key] = mx.stack([per_expert[e] for e in sorted(per_expert)])
    return out


def zero_centred_norms(head: Dict[str, mx.array]) -> bool:
    """Whether a head's norm weights look zero-centred (raw HF), judged from
    their mean magnitude: used when no trunk conv1d can tell (docs/mtp-head.md#norm-shift)."""
    norms = [mx.abs(v.astype(mx.float32)).mean() for k, v in head.items() if "norm" in k and v.ndim == 1]
    return bool(norms) and float(mx.mean(mx.stack(norms)).item()) < 0.5


def _sanitize_mtp(weights: Dict[str, mx.array], raw_checkpoint: bool) -> Dict[str, mx.array]:
    """Head weights without the `mtp.` prefix -> module layout."""
    out: Dict[str, mx.array] = {}
    for key, value in stack_experts(weights).items():
        # Raw HF norms are zero-centred; shift exactly once, like the trunk.
        # (pre_fc_norm_embedding / pre_fc_norm_hidden / norm / q_norm / k_norm /
        # input_layernorm / post_attention_layernorm: every 1-D "*norm*" weight.)
        module = key.rsplit(".", 2)[-2] if key.count(".") else ""
        if raw_checkpoint and "norm" in module and key.endswith(".weight") and value.ndim == 1:
            value = value + 1.0
        m = re.match(r"^(layers\.\d+\.mlp)\.experts\.(gate_up_proj|down_proj)$", key)
        if m:  # Qwen3.5-MoE fused experts: gate_up [E, 2I, H] splits on axis -2.
            prefix = f"{m.group(1)}.switch_mlp"
            if m.group(2) == "gate_up_proj":
                mid = value.shape[-2] // 2
                out[f"{prefix}.gate_proj.weight"] = value[..., :mid, :]
                out[f"{prefix}.up_proj.weight"] = value[..., mid:, :]
            else:
                out[f"{prefix}.down_proj.weight"] = value
            continue
        out[key] = value
    return out


def split_head(weights: Dict[str, mx.array]) -> Tuple[Dict[str, mx.array], Dict[str, mx.array]]:
    """(head tensors keyed without their `mtp.` prefix, everything else)."""
    head, rest = {}, {}
    for key, value in weights.items():
        m = _MTP_KEY.match(key)
        if m:
            head[m.group(1)] = value
        else:
            rest[key] = value
    return head, rest


@dataclass(frozen=True)
class SideHead:
    """MTP head tensors read from files beside the trunk (`mtp.safetensors`),
    keyed without their `mtp.` prefix; `files` names where they came from."""

    weights: Dict[str, mx.array]
    files: Tuple[str, ...]


class _MTPMixin:
    """Keeps the MTP head through loading. Used with mlx-lm's Model classes.

    Families that store the head the same way (Qwen3-Next) pass their own
    layer count and head layer to `_init_mtp`, set `mtp_config_field`, and
    may override `_sanitize_trunk` / `_mtp_declaration`."""

    #: The config field that counts head layers (named in messages).
    mtp_config_field = "mtp_num_hidden_layers"

    def _init_mtp(self, args: ModelArgs, declared_layers: Optional[int] = None,
                  make_layer: Optional[Callable[[Any], nn.Module]] = None) -> None:
        text_args = self.language_model.args
        if declared_layers is None:
            declared_layers = int(args.text_config.get("mtp_num_hidden_layers", 0) or 0)
        self.declared_mtp_layers = declared_layers
        # Why the head is unusable, if it is (None when the head loaded).
        self.mtp_problem: Optional[str] = None
        # A head shipped in its own file beside the trunk; the loader sets it
        # before mlx-lm calls `sanitize` (loading/safetensors.py).
        self.side_head: Optional[SideHead] = None
        if self.declared_mtp_layers > 0:
            self.mtp = MTPHead(text_args, self.declared_mtp_layers, make_layer)
        enable_recurrent_rollback(self)

    @property
    def has_mtp(self) -> bool:
        return "mtp" in self

    @classmethod
    def head_layout(cls, config: Dict[str, Any]) -> HeadLayout:
        return HeadLayout(
            local_key=mtp_local_key,
            declared_layers=int(text_config(config).get("mtp_num_hidden_layers", 0) or 0),
            config_field="mtp_num_hidden_layers",
            sanitize=_sanitize_mtp,
        )

    def mtp_logits(self, state: mx.array) -> mx.array:
        """Logits of a head state: the trunk's LM head reads `mtp.norm`'s output."""
        return self.logits(state)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        head, trunk = split_head(weights)
        raw = any("conv1d.weight" in k and v.shape[-1] != 1 for k, v in trunk.items())
        head_raw = raw
        if not head and self.side_head is not None:
            head = self.side_head.weights
            # Side files are often the raw HF head copied next to a converted
            # (already shifted) trunk, so the trunk cannot vouch for them.
            head_raw = raw or zero_centred_norms(head)
        self.side_head = None  # consumed; kept, it would hold the unsanitized tensors in memory
        trunk = self._sanitize_trunk(trunk)
        if self.declared_mtp_layers > 0 and not head:
            self.mtp_problem = (
                f"{self._mtp_declaration()} but the "
                "checkpoint has no mtp.* weights (they were stripped by a conversion)"
            )
            self.pop("mtp", None)
        elif head and self.declared_mtp_layers == 0:
            self.mtp_problem = (
                f"checkpoint has {len(head)} mtp.* tensors but its config declares no MTP "
                f"head ({self.mtp_config_field} is missing or 0)"
            )
        elif head:
            for key, value in _sanitize_mtp(head, head_raw).items():
                trunk[f"mtp.{key}"] = value
        elif self.declared_mtp_layers == 0:
            self.mtp_problem = "this checkpoint has no MTP head (no mtp.* weights, none declared)"
        return trunk

    def _sanitize_trunk(self, trunk: Dict[str, mx.array]) -> Dict[str, mx.array]:
        # mlx-lm stacks only the fused Qwen3.5-MoE experts; per-expert exports
        # are stacked here into the same layout.
        return super().sanitize(stack_experts(trunk))

    def _mtp_declaration(self) -> str:
        """How the config declares the head, for messages."""
        return f"config declares {self.mtp_config_field}={self.declared_mtp_layers}"

    def make_cache(self) -> List[Any]:
        return make_target_cache(self)

    def make_mtp_cache(self) -> List[Any]:
        return self.mtp.make_cache()

    # Pieces the engine needs; the trunk itself returns post-norm hidden states.
    def hidden(self, tokens: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        return self.language_model.model(tokens, cache)

    def logits(self, hidden: mx.array) -> mx.array:
        lm = self.language_model
        if lm.args.tie_word_embeddings:
            return lm.model.embed_tokens.as_linear(hidden)
        return lm.lm_head(hidden)

    def embed(self, tokens: mx.array) -> mx.array:
        return self.language_model.model.embed_tokens(tokens)

    @property
    def context_length(self) -> int:
        return int(self.language_model.args.max_position_embeddings)

    @property
    def hidden_size(self) -> int:
        return self.language_model.args.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.language_model.args.vocab_size


class Model(_MTPMixin, lm_qwen3_5.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self._init_mtp(args)


class MoeModel(_MTPMixin, lm_qwen3_5_moe.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self._init_mtp(args)
