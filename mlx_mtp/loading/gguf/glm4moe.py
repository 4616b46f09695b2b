"""glm4moe GGUF files (GLM-4.5, GLM-4.5-Air, GLM-4.6/4.7) with their nextn
MTP head, as our glm4_moe model (mlx-lm's plus the head).

What the converter writes (ggml-org/llama.cpp conversion/glm.py
Glm4MoeModel, read back by src/models/glm4-moe.cpp): block_count =
num_hidden_layers + num_nextn_predict_layers, the tensors under the HF
names mapped one to one (attention with q/k/v biases, `post_attention_norm`
for post_attention_layernorm, optional q/k norms), experts stacked, and no
value transform at all: GLM-4.5 already rotates in NeoX order, so Q/K are
not permuted. The shared parts (nextn block, MoE, model building) are in
`nextn.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from ..safetensors import CheckpointError
from .nextn import NextNCheckpoint, NextNLayout, layer_count, load_target, moe_fields, read_nextn
from .reader import COMMON_LAYER_NAMES, meta_value
from .tokenizer import config_eos

ARCHS = ("glm4moe",)
ARCH = "glm4moe"

LAYER_NAMES = {
    **COMMON_LAYER_NAMES,  # norms, attention, q/k norms, dense MLP
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}

__all__ = ["ARCHS", "LAYER_NAMES", "glm4moe_config", "load_target", "read_glm4moe"]


def glm4moe_config(meta: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]], layout: NextNLayout) -> Dict[str, Any]:
    """An HF-style glm4_moe config.json from GGUF metadata and tensor shapes."""
    arch = ARCH
    H = int(meta_value(meta, arch, "embedding_length"))
    heads = int(layer_count(meta, arch, "attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", H // heads))
    rot = int(meta.get(f"{arch}.rope.dimension_count", head_dim // 2))
    scaling = meta.get(f"{arch}.rope.scaling.type")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if scaling not in (None, "none") and factor != 1.0:
        # mlx-lm's glm4_moe rotates with a plain RoPE: a scaled file would load but compute otherwise.
        raise CheckpointError(f"GGUF metadata {arch}.rope.scaling.type={scaling!r} (factor {factor}) is not "
                              "supported by the glm4_moe model")
    config: Dict[str, Any] = {
        "model_type": "glm4_moe",
        "architectures": ["Glm4MoeForCausalLM"],
        "vocab_size": int(shapes["token_embd.weight"][0]),
        "hidden_size": H,
        "intermediate_size": int(layer_count(meta, arch, "feed_forward_length")),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 131072)),
        "num_hidden_layers": layout.trunk_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(layer_count(meta, arch, "attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "partial_rotary_factor": rot / head_dim,
        "rms_norm_eps": float(meta_value(meta, arch, "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        # Presence of these tensors is what the HF flags decide.
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "use_qk_norm": "blk.0.attn_q_norm.weight" in shapes,
        "tie_word_embeddings": "output.weight" not in shapes,
        "num_nextn_predict_layers": layout.present,
        **moe_fields(meta, arch),
    }
    eos = config_eos(meta)
    if eos is not None:
        config["eos_token_id"] = eos
    return config


def read_glm4moe(path: Path, reader, meta: Dict[str, Any], requant_bits: int = 8) -> NextNCheckpoint:
    """A checkpoint for an opened glm4moe GGUF."""
    return read_nextn(path, reader, meta, requant_bits, glm4moe_config, LAYER_NAMES)
