"""deepseek2 GGUF files (DeepSeek-V3, GLM-4.7-Flash) as our deepseek_v3 /
glm4_moe_lite models, nextn MTP head included when the file has it.

Multi-head latent attention as the converter stores it (ggml-org/llama.cpp
conversion/deepseek.py DeepseekV2Model, read back by
src/models/deepseek2.cpp):

| GGUF tensor (numpy shape)                 | mlx-lm deepseek_v3 parameter           |
|-------------------------------------------|----------------------------------------|
| attn_q_a [q_lora, H], attn_q_a_norm       | self_attn.q_a_proj, q_a_layernorm      |
| attn_q_b [heads*(nope+rope), q_lora]      | self_attn.q_b_proj                     |
| attn_q [heads*(nope+rope), H] (no q_lora) | self_attn.q_proj                       |
| attn_kv_a_mqa [kv_lora+rope, H]           | self_attn.kv_a_proj_with_mqa           |
| attn_kv_a_norm [kv_lora]                  | self_attn.kv_a_layernorm               |
| attn_k_b [heads, kv_lora, nope]           | self_attn.embed_q (MultiLinear)        |
| attn_v_b [heads, v, kv_lora]              | self_attn.unembed_out (MultiLinear)    |
| attn_kv_b [heads*(nope+v), kv_lora] (old) | split as mlx-lm's sanitize splits kv_b_proj |
| attn_output, attn_norm, ffn_norm          | o_proj, input_layernorm, post_attention_layernorm |

The converter splits kv_b_proj per head into k_b (transposed) and v_b,
which is exactly mlx-lm's embed_q / unembed_out layout (its `sanitize` does
the same split), so a split file maps without any transform. Only files
from before that split carry `attn_kv_b`. The metadata describe MLA as MQA
(head_count_kv = 1, key_length = kv_lora + rope, value_length = kv_lora)
with the real head sizes in `key_length_mla` / `value_length_mla`. Q/K are
not permuted: llama.cpp rotates deepseek2 in the "normal" (interleaved
pairs) order that HF's DeepSeek code and mlx-lm (traditional=True) use.

DeepSeek-V3 files from llama.cpp have no nextn block (DeepseekV2Model
sets skip_mtp); GLM-4.7-Flash files keep it since Glm4MoeLiteModel turned
skip_mtp off. Either way `nextn.py` handles the head.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np

from ..safetensors import CheckpointError
from .nextn import NextNCheckpoint, NextNLayout, layer_count, load_target, moe_fields, read_nextn
from .quants import BF16, QuantTensor, Tensor, dequant, requantize
from .reader import meta_value
from .tokenizer import config_eos

ARCHS = ("deepseek2",)
ARCH = "deepseek2"

LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_k_b.weight": "self_attn.embed_q.weight",
    "attn_v_b.weight": "self_attn.unembed_out.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
}
# GLM-4.7-Flash's GGUFs say so in their name or pre-tokenizer; mlx-lm's
# glm4_moe_lite differs from deepseek_v3 in using rms_norm_eps for the q_a /
# kv_a norms (deepseek_v3 fixes 1e-6), which is what llama.cpp does for both.
GLM_PRE_TOKENIZERS = ("glm4", "chatglm-bpe")

__all__ = ["ARCHS", "LAYER_NAMES", "deepseek2_config", "load_target", "read_deepseek2", "split_kv_b"]


def _is_glm(meta: Dict[str, Any]) -> bool:
    names = " ".join(str(meta.get(k, "")) for k in ("general.name", "general.basename")).lower()
    return "glm" in names or meta.get("tokenizer.ggml.pre") in GLM_PRE_TOKENIZERS


def _head_dims(meta: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]], kv_lora: int, rope: int) -> Tuple[int, int]:
    """(qk_nope_head_dim, v_head_dim). Current files give them as
    key_length_mla / value_length_mla; older ones as key_length /
    value_length of a plain MHA view (with attn_kv_b)."""
    arch = ARCH
    k_mla = meta.get(f"{arch}.attention.key_length_mla")
    v_mla = meta.get(f"{arch}.attention.value_length_mla")
    if k_mla is not None and v_mla is not None:
        return int(k_mla) - rope, int(v_mla)
    if "blk.0.attn_k_b.weight" in shapes and "blk.0.attn_v_b.weight" in shapes:
        return int(shapes["blk.0.attn_k_b.weight"][-1]), int(shapes["blk.0.attn_v_b.weight"][-2])
    k, v = int(meta_value(meta, arch, "attention.key_length")), int(meta_value(meta, arch, "attention.value_length"))
    if k == kv_lora + rope:
        raise CheckpointError(f"GGUF metadata lacks {arch}.attention.key_length_mla / value_length_mla and "
                              "the MLA head sizes cannot be read off the tensors")
    return k - rope, v


def _rope_scaling(meta: Dict[str, Any], arch: str) -> Optional[Dict[str, Any]]:
    """HF's rope_scaling for a YaRN file. The converter stores mscale_all_dim
    times 0.1 as yarn_log_multiplier (llama.cpp divides it back out:
    [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]); DeepSeek-V3's config has mscale equal
    to mscale_all_dim, which the file does not store separately."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = float(meta.get(f"{arch}.rope.scaling.factor", 1.0) or 1.0)
    if kind in (None, "none") or factor == 1.0:
        return None
    if kind != "yarn":
        raise CheckpointError(f"GGUF metadata {arch}.rope.scaling.type={kind!r} is not supported (only yarn)")
    mscale = float(meta.get(f"{arch}.rope.scaling.yarn_log_multiplier", 0.0) or 0.0) / 0.1
    return {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": int(meta_value(meta, arch, "rope.scaling.original_context_length")),
        "beta_fast": float(meta.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
        "beta_slow": float(meta.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
        "mscale": mscale,
        "mscale_all_dim": mscale,
    }


def deepseek2_config(meta: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]], layout: NextNLayout) -> Dict[str, Any]:
    """An HF-style deepseek_v3 / glm4_moe_lite config.json from GGUF metadata
    and tensor shapes."""
    arch = ARCH
    glm = _is_glm(meta)
    heads = int(layer_count(meta, arch, "attention.head_count"))
    kv_lora = int(meta_value(meta, arch, "attention.kv_lora_rank"))
    q_lora = int(meta.get(f"{arch}.attention.q_lora_rank", 0) or 0)
    rope = int(meta_value(meta, arch, "rope.dimension_count"))
    nope, v_head = _head_dims(meta, shapes, kv_lora, rope)
    config: Dict[str, Any] = {
        "model_type": "glm4_moe_lite" if glm else "deepseek_v3",
        "architectures": ["Glm4MoeLiteForCausalLM" if glm else "DeepseekV3ForCausalLM"],
        "vocab_size": int(shapes["token_embd.weight"][0]),
        "hidden_size": int(meta_value(meta, arch, "embedding_length")),
        "intermediate_size": int(layer_count(meta, arch, "feed_forward_length")),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 163840)),
        "num_hidden_layers": layout.trunk_layers,
        "num_attention_heads": heads,
        # head_count_kv is 1 in the file (MLA written as MQA); HF configs say heads.
        "num_key_value_heads": heads,
        "q_lora_rank": q_lora or None,
        "kv_lora_rank": kv_lora,
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": nope,
        "v_head_dim": v_head,
        "rms_norm_eps": float(meta_value(meta, arch, "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta, arch),
        "attention_bias": False,
        "moe_layer_freq": 1,
        "tie_word_embeddings": "output.weight" not in shapes,
        "num_nextn_predict_layers": layout.present,
        **moe_fields(meta, arch),
    }
    if q_lora and "blk.0.attn_q_a.weight" not in shapes:
        raise CheckpointError(f"GGUF metadata sets {arch}.attention.q_lora_rank={q_lora} but blk.0.attn_q_a.weight "
                              "is missing")
    eos = config_eos(meta)
    if eos is not None:
        config["eos_token_id"] = eos
    return config


def split_kv_b(value: Tensor, heads: int, nope: int, v_head: int) -> Tuple[Tensor, Tensor]:
    """An old file's kv_b_proj [heads*(nope+v), kv_lora] -> (embed_q
    [heads, kv_lora, nope], unembed_out [heads, v, kv_lora]), as mlx-lm's
    deepseek_v3 `sanitize` splits it. The k half is transposed, which packed
    blocks cannot follow: quantized sources are requantized to 8 bits."""
    w = dequant(value)
    w = w.reshape(heads, nope + v_head, w.shape[-1])
    wk = np.ascontiguousarray(w[:, :nope, :].swapaxes(-1, -2))
    wv = np.ascontiguousarray(w[:, nope:, :])
    if isinstance(value, QuantTensor):
        return requantize(wk.astype(np.float16), 8, value.source), requantize(wv.astype(np.float16), 8, value.source)
    if isinstance(value, BF16) or np.asarray(value).dtype == np.float32:
        return wk, wv  # float32 holds bfloat16 values exactly
    return wk.astype(value.dtype), wv.astype(value.dtype)


class Deepseek2Checkpoint(NextNCheckpoint):
    """deepseek2 tensors, with an old file's fused kv_b split."""

    def convert(self, name: str, value: Tensor) -> Iterator[Tuple[str, Tensor]]:
        if not name.endswith("self_attn.kv_b_proj.weight"):
            yield name, value
            return
        c = self.config
        wk, wv = split_kv_b(value, c["num_attention_heads"], c["qk_nope_head_dim"], c["v_head_dim"])
        stem = name[: -len("kv_b_proj.weight")]
        yield stem + "embed_q.weight", wk
        yield stem + "unembed_out.weight", wv


def read_deepseek2(path: Path, reader, meta: Dict[str, Any], requant_bits: int = 8) -> NextNCheckpoint:
    """A checkpoint for an opened deepseek2 GGUF."""
    return read_nextn(path, reader, meta, requant_bits, deepseek2_config, LAYER_NAMES, Deepseek2Checkpoint)
