"""qwen35 / qwen35moe GGUF files (MTP head included) as our Qwen3.5 model.

The tensors are read by `reader.py` and repacked by `quants.py` (its table
lists what each GGUF type becomes). Everything the llama.cpp converter
changed is undone (docs/gguf.md#converter-transforms): names, ssm_a = -exp(A_log), the squeezed
conv1d, the V-head reorder. The norms in qwen35 GGUFs already carry the +1,
so the weights are produced in mlx-lm's (sanitized) layout, where nothing is
shifted again.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from ..safetensors import CheckpointError
from .quants import (
    BF16, QuantTensor, Tensor, convert_tensor, dequant, load_into, mlx_weights, requantize, split_rows, take,
)
from .reader import COMMON_LAYER_NAMES, GGUFFile, converting, meta_value, tensor_shapes
from .tokenizer import config_eos

ARCHS = ("qwen35", "qwen35moe")


def full_attention_interval(meta: Dict[str, Any], arch: str, layers: int) -> int:
    """Every how many trunk layers one is full attention. The per-layer
    `attention.recurrent_layers` flags win over `full_attention_interval`:
    the converter writes its default 4 there whatever the model uses (checked
    against llama.cpp 0c1e570), while the flags come from `layer_types`."""
    recurrent = meta.get(f"{arch}.attention.recurrent_layers")
    if not isinstance(recurrent, (list, tuple)) or len(recurrent) < layers:
        return int(meta.get(f"{arch}.full_attention_interval", 4))
    full = [i for i in range(layers) if not recurrent[i]]
    interval = full[0] + 1 if full else layers + 1
    if [not recurrent[i] for i in range(layers)] != [(i + 1) % interval == 0 for i in range(layers)]:
        raise CheckpointError(f"GGUF metadata {arch}.attention.recurrent_layers is not a repeating pattern "
                              "of recurrent layers closed by a full-attention one (the Qwen3.5 layout)")
    return interval


def qwen35_config(meta: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Any]:
    """An HF-style Qwen3.5 config (`text_config` nested) from GGUF metadata and
    the tensor shapes (numpy order)."""
    arch = meta["general.architecture"]
    moe = arch == "qwen35moe"
    n_mtp = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    layers = int(meta_value(meta, arch, "block_count")) - n_mtp
    H = int(meta_value(meta, arch, "embedding_length"))
    heads = int(meta_value(meta, arch, "attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", H // heads))
    rot = int(meta.get(f"{arch}.rope.dimension_count", head_dim // 4))
    sections = list(meta.get(f"{arch}.rope.dimension_sections", []) or [])[:3]
    hk = int(meta_value(meta, arch, "ssm.group_count"))
    hv = int(meta_value(meta, arch, "ssm.time_step_rank"))
    vocab = int(shapes["token_embd.weight"][0])
    rope = {
        "rope_type": "default",
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "partial_rotary_factor": rot / head_dim,
    }
    if sections:
        rope["mrope_section"] = [int(s) for s in sections]
    text = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "hidden_size": H,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta_value(meta, arch, "attention.head_count_kv")),
        "head_dim": head_dim,
        "linear_num_value_heads": hv,
        "linear_num_key_heads": hk,
        "linear_key_head_dim": int(meta_value(meta, arch, "ssm.state_size")),
        "linear_value_head_dim": int(meta_value(meta, arch, "ssm.inner_size")) // hv,
        "linear_conv_kernel_dim": int(meta_value(meta, arch, "ssm.conv_kernel")),
        "full_attention_interval": full_attention_interval(meta, arch, layers),
        "vocab_size": vocab,
        "rms_norm_eps": float(meta_value(meta, arch, "attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in shapes,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 262144)),
        "rope_parameters": rope,
        "mtp_num_hidden_layers": n_mtp,
        "mtp_use_dedicated_embeddings": False,
    }
    if moe:
        text.update(
            intermediate_size=int(meta.get(f"{arch}.feed_forward_length", 0) or 0),
            num_experts=int(meta_value(meta, arch, "expert_count")),
            num_experts_per_tok=int(meta_value(meta, arch, "expert_used_count")),
            moe_intermediate_size=int(meta_value(meta, arch, "expert_feed_forward_length")),
            shared_expert_intermediate_size=int(meta.get(f"{arch}.expert_shared_feed_forward_length", 0) or 0),
            decoder_sparse_step=1,
            norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", True)),
        )
    else:
        text["intermediate_size"] = int(meta_value(meta, arch, "feed_forward_length"))
    eos = config_eos(meta)
    if eos is not None:
        text["eos_token_id"] = eos
    config = {
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "text_config": text,
    }
    if eos is not None:
        config["eos_token_id"] = eos
    return config


LAYER_NAMES = {
    **COMMON_LAYER_NAMES,  # norms, (gated) attention, dense MLP
    # Gated DeltaNet
    "attn_qkv.weight": "linear_attn.in_proj_qkv.weight",
    "attn_gate.weight": "linear_attn.in_proj_z.weight",
    "ssm_alpha.weight": "linear_attn.in_proj_a.weight",
    "ssm_beta.weight": "linear_attn.in_proj_b.weight",
    "ssm_out.weight": "linear_attn.out_proj.weight",
    "ssm_a": "linear_attn.A_log",
    "ssm_dt.bias": "linear_attn.dt_bias",
    "ssm_dt": "linear_attn.dt_bias",
    "ssm_conv1d.weight": "linear_attn.conv1d.weight",
    "ssm_norm.weight": "linear_attn.norm.weight",
    # MoE
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "ffn_gate_inp_shexp.weight": "mlp.shared_expert_gate.weight",
    "ffn_gate_shexp.weight": "mlp.shared_expert.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_expert.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_expert.down_proj.weight",
    "ffn_gate_exps.weight": "mlp.switch_mlp.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.switch_mlp.up_proj.weight",
    "ffn_down_exps.weight": "mlp.switch_mlp.down_proj.weight",
}
NEXTN_NAMES = {
    "nextn.eh_proj.weight": "fc.weight",
    "nextn.enorm.weight": "pre_fc_norm_embedding.weight",
    "nextn.hnorm.weight": "pre_fc_norm_hidden.weight",
    "nextn.shared_head_norm.weight": "norm.weight",
}
# Copies of token_embd / output the converter may write: the target's are used.
NEXTN_SKIP = ("nextn.embed_tokens.weight", "nextn.shared_head_head.weight")
TOP_NAMES = {
    "token_embd.weight": "language_model.model.embed_tokens.weight",
    "output_norm.weight": "language_model.model.norm.weight",
    "output.weight": "language_model.lm_head.weight",
}


def qwen35_name(gguf_name: str, num_layers: int) -> Optional[str]:
    """GGUF tensor name -> our module path (None: not used)."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_name)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i < num_layers:
        mapped = LAYER_NAMES.get(rest)
        return None if mapped is None else f"language_model.model.layers.{i}.{mapped}"
    if rest in NEXTN_SKIP:
        return None
    if rest in NEXTN_NAMES:
        return f"mtp.{NEXTN_NAMES[rest]}"
    mapped = LAYER_NAMES.get(rest)
    return None if mapped is None else f"mtp.layers.{i - num_layers}.{mapped}"


def v_head_order(hv: int, hk: int) -> np.ndarray:
    """Index i of the result is the GGUF slot holding HF V head i. The converter
    tiles heads (slot j*Hk+g holds HF head g*r+j); mlx-lm groups them."""
    r = hv // hk
    return np.arange(hv).reshape(r, hk).T.reshape(-1)


def _rows_index(order: np.ndarray, d: int, offset: int, total: int) -> np.ndarray:
    """Row index that reorders heads of size d found at [offset, offset+len*d)."""
    idx = np.arange(total)
    heads = (order[:, None] * d + np.arange(d)[None, :]).reshape(-1)
    idx[offset : offset + heads.size] = offset + heads
    return idx


def qwen35_transform(name: str, value: Tensor, text: Dict[str, Any]) -> Tensor:
    """Undo the converter's value transforms for the tensor at module path `name`."""
    hv, hk = text["linear_num_value_heads"], text["linear_num_key_heads"]
    dv, dk = text["linear_value_head_dim"], text["linear_key_head_dim"]
    reorder = hv != hk
    order = v_head_order(hv, hk)
    key_dim = hk * dk
    if name.endswith("linear_attn.A_log"):
        a = dequant(value).astype(np.float32)
        if reorder:
            a = a[order]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.log(-a)
    if name.endswith("linear_attn.dt_bias"):
        return take(value, order, axis=-1) if reorder else value
    if name.endswith("linear_attn.conv1d.weight"):
        w = value if not isinstance(value, QuantTensor) else value.dequantize()
        if w.ndim == 3:  # [C, 1, K] as in torch
            w = w.reshape(w.shape[0], w.shape[-1])
        if reorder:
            w = take(w, _rows_index(order, dv, 2 * key_dim, w.shape[0]), axis=0)
        out = np.asarray(w)[:, :, None]  # [C, K] -> mlx Conv1d [C, K, 1]
        return BF16(out) if isinstance(w, BF16) else out
    if not reorder:
        return value
    if name.endswith("linear_attn.in_proj_qkv.weight"):
        return take(value, _rows_index(order, dv, 2 * key_dim, 2 * key_dim + hv * dv), axis=-2)
    if name.endswith("linear_attn.in_proj_z.weight"):
        return take(value, _rows_index(order, dv, 0, hv * dv), axis=-2)
    if name.endswith(("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight")):
        return take(value, order, axis=-2)
    if name.endswith("linear_attn.out_proj.weight"):
        if isinstance(value, QuantTensor):
            moved = value.take_col_blocks(order, dv)
            if moved is not None:
                return moved
            # Head blocks straddle quantization groups: go through float and
            # requantize at 8 bits (affine groups of 32 cannot be split).
            w = value.dequantize()
            w = w.reshape(w.shape[0], hv, dv)[:, order].reshape(w.shape[0], -1).astype(np.float16)
            return requantize(w, 8, value.source)
        lead = value.shape[:-1]
        out = np.asarray(value).reshape(*lead, hv, dv)[..., order, :].reshape(*lead, hv * dv)
        return BF16(out) if isinstance(value, BF16) else out
    return value


class GGUFCheckpoint(GGUFFile):
    """A qwen35 / qwen35moe GGUF file read as an MLX checkpoint."""

    def keeps(self, name: str) -> bool:
        """Whether `tensors()` converts the tensor at module path `name`
        (all of them here; the split-head reader keeps only the head's)."""
        return True

    def tensor_names(self) -> List[Tuple[str, str]]:
        """(gguf name, module path) of every tensor the model uses."""
        layers = self.config["text_config"]["num_hidden_layers"]
        out = []
        for t in self.reader.tensors:
            name = qwen35_name(t.name, layers)
            if name is not None:
                out.append((t.name, name))
        return out

    def tensors(self) -> Iterator[Tuple[str, Tensor, str]]:
        """(module path, converted tensor, GGUF type name), one tensor at a time."""
        text = self.config["text_config"]
        layers = text["num_hidden_layers"]
        for t in self.reader.tensors:
            name = qwen35_name(t.name, layers)
            if name is None or not self.keeps(name):
                continue
            if t.name.endswith("ffn_gate_up_exps.weight"):  # fused variant: split rows
                continue
            with converting(self.path, t):
                value = qwen35_transform(name, convert_tensor(t, self.requant_bits), text)
            yield name, value, t.tensor_type.name
        # Fused gate_up experts (some converters keep them): split on rows.
        for t in self.reader.tensors:
            m = re.match(r"^blk\.(\d+)\.ffn_gate_up_exps\.weight$", t.name)
            if not m:
                continue
            i = int(m.group(1))
            prefix = (f"language_model.model.layers.{i}" if i < layers else f"mtp.layers.{i - layers}")
            if not self.keeps(prefix):
                continue
            gate, up = split_rows(convert_tensor(t, self.requant_bits))
            yield f"{prefix}.mlp.switch_mlp.gate_proj.weight", gate, t.tensor_type.name
            yield f"{prefix}.mlp.switch_mlp.up_proj.weight", up, t.tensor_type.name


def read_qwen35(path: Path, reader, meta: Dict[str, Any], requant_bits: int = 8) -> GGUFCheckpoint:
    """A GGUFCheckpoint for an opened qwen35 / qwen35moe GGUF."""
    config = qwen35_config(meta, tensor_shapes(reader, path))
    return GGUFCheckpoint(path, reader, meta, config, requant_bits)


def build_model(config: Dict[str, Any], weights, quantization: Dict[str, Any], lazy: bool = False):
    """Instantiate our model class for `config`, quantize the modules listed
    in `quantization` and load `weights` strictly."""
    from ...models import qwen3_5
    from ...models.registry import MODEL_CLASSES

    cls = MODEL_CLASSES[config["model_type"]]
    model = cls(qwen3_5.ModelArgs.from_dict(copy.deepcopy(config)))
    # Weights are in the sanitized layout (conv1d [C, K, 1]): sanitize only
    # sorts out the head and shifts nothing.
    return load_into(model, model.sanitize(weights), quantization, lazy)


def load_target(ckpt: GGUFCheckpoint, lazy: bool = False):
    """(model, config) for a qwen35 / qwen35moe checkpoint."""
    weights, quantization = mlx_weights(ckpt)
    config = dict(ckpt.config)
    if quantization:
        config["quantization"] = quantization
    return build_model(ckpt.config, weights, quantization, lazy=lazy), config
