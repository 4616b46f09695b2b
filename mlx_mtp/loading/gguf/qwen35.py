"""Load llama.cpp GGUF files (qwen35 / qwen35moe, MTP head included) into
our Qwen3.5 model, without going through `mx.load`.

`mx.load` is not safe for GGUF: it corrupts Q4_K, drops MXFP4 and turns BF16
into F16 (drafters.md section 4). We read raw blocks with gguf-py's
`GGUFReader` and repack them into MLX's own quantized layout:

| GGUF type              | MLX result                                           |
|------------------------|------------------------------------------------------|
| F32, F16, BF16         | float array of the same dtype (F64 -> F32)           |
| Q8_0                   | affine bits=8 group 32, q+128, bias=-128*d (exact)   |
| Q4_0                   | affine bits=4 group 32, bias=-8*d (exact)            |
| Q4_1                   | affine bits=4 group 32, bias=m (exact)               |
| Q5_0 / Q5_1            | affine bits=5 group 32, bias=-16*d / m (exact)       |
| Q4_K                   | affine bits=4 group 32, scale=d*sc, bias=-dmin*m (exact, float32 scales) |
| Q5_K                   | affine bits=5 group 32, as Q4_K (exact, float32 scales) |
| MXFP4                  | mode "mxfp4": codes and e8m0 scale bytes copied (exact) |
| Q6_K, Q3_K, Q2_K, IQ*, TQ*, NVFP4, Q8_K... | dequantized with gguf.quants, requantized to affine `requant_bits` (default 8) group 32 with float16 scales; tensors whose rows are not a multiple of 32 stay float16 |

Q6_K/Q3_K/Q2_K use 16-value sub-blocks, which MLX's affine groups (32/64/128)
cannot express, so they cannot be repacked. 8 bits keeps the requantization
error far below the source format's own error; pass `requant_bits=4` to
trade that for memory.

Scales and biases of the affine repacks are float32: the K-quant scales d*sc
need up to 17 mantissa bits, and float16 scales would make quantized
embeddings return (rounded) float16 activations, while llama.cpp computes in
float32. So a GGUF model computes exactly what its stored values say; pass
`dtype` (or `mlx-mtp convert --dtype`) to trade that for memory.

Everything the llama.cpp converter changed is undone (drafters.md 4b):
names, ssm_a = -exp(A_log), the squeezed conv1d, the V-head reorder. The
norms in qwen35 GGUFs already carry the +1, so the weights are produced in
mlx-lm's (sanitized) layout, where nothing is shifted again.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .safetensors import CheckpointError

GGUF_MAGIC = b"GGUF"
GROUP = 32
SUPPORTED_ARCHS = ("qwen35", "qwen35moe", "gemma4", "gemma4-assistant")  # gemma4*: gguf_gemma4.py


def is_gguf(path: Union[str, Path]) -> bool:
    """True for an existing *.gguf file or one that starts with the GGUF magic."""
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    if p.suffix.lower() == ".gguf":  # a damaged one still gets GGUF's errors
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


# --- reading ----------------------------------------------------------------


def _type_name(raw: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(raw).name
    except ValueError:
        return f"unknown type id {raw}"


def open_gguf(path: Union[str, Path]):
    """A `GGUFReader` over `path`; truncated or corrupt files raise
    CheckpointError naming the tensor (and its type) that does not fit."""
    from gguf import GGUFReader
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    path = Path(path)

    class _Reader(GGUFReader):
        # Validate every tensor before gguf-py slices the memory map: its own
        # errors ("cannot reshape array...") do not say which tensor is bad.
        def _build_tensors(self, start_offs, fields):  # type: ignore[override]
            size = len(self.data)
            for field in fields:
                _nl, name_data, _nd, dims, raw_dtype, offset = field.parts
                name = bytes(name_data).decode("utf-8", "replace")
                raw = int(raw_dtype[0])
                try:
                    qtype = GGMLQuantizationType(raw)
                except ValueError:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} has an unsupported GGUF type ({_type_name(raw)})"
                    ) from None
                block, type_size = GGML_QUANT_SIZES[qtype]
                n = int(np.prod(dims.astype(np.int64)))
                if int(dims[0]) % block:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} ({qtype.name}) has rows of {int(dims[0])} values, "
                        f"not a multiple of the {block}-value block"
                    )
                end = int(start_offs + offset[0]) + n * type_size // block
                if end > size:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} ({qtype.name}) ends at byte {end} but the file has "
                        f"{size} bytes (truncated?)"
                    )
            return super()._build_tensors(start_offs, fields)

    try:
        return _Reader(str(path), "r")
    except CheckpointError:
        raise
    except Exception as e:  # header garbage: gguf-py raises many kinds
        raise CheckpointError(f"{path}: not a readable GGUF file (corrupt or truncated?): {e}") from e


def metadata(reader) -> Dict[str, Any]:
    """GGUF key/values as Python values (strings, numbers, lists)."""
    out: Dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except Exception:  # pragma: no cover - odd value types
            continue
        if isinstance(value, np.generic):
            value = value.item()
        out[name] = value
    return out


# --- quantized tensors --------------------------------------------------------


@dataclass
class QuantTensor:
    """An MLX-quantized weight: packed codes, scales and (affine) biases."""

    weight: np.ndarray  # uint32 [..., cols * bits / 32]
    scales: np.ndarray  # [..., cols / group]
    biases: Optional[np.ndarray]
    bits: int
    group_size: int = GROUP
    mode: str = "affine"
    source: str = ""  # GGUF type it came from

    @property
    def params(self) -> Dict[str, Any]:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    @property
    def cols(self) -> int:
        return self.weight.shape[-1] * 32 // self.bits

    def take_rows(self, index: np.ndarray, axis: int = -2) -> "QuantTensor":
        """Reorder output rows (rows are independent in the packed layout)."""
        pick = lambda a: None if a is None else np.take(a, index, axis=axis)  # noqa: E731
        return QuantTensor(pick(self.weight), pick(self.scales), pick(self.biases), self.bits,
                           self.group_size, self.mode, self.source)

    def take_col_blocks(self, index: np.ndarray, block: int) -> Optional["QuantTensor"]:
        """Reorder input columns in blocks of `block` values; None when a
        block does not fall on group/word boundaries."""
        if block % self.group_size or (block * self.bits) % 32:
            return None

        def pick(a, per_block):
            if a is None:
                return None
            lead = a.shape[:-1]
            a = a.reshape(*lead, -1, per_block)
            return np.take(a, index, axis=-2).reshape(*lead, -1)

        return QuantTensor(pick(self.weight, block * self.bits // 32),
                           pick(self.scales, block // self.group_size),
                           pick(self.biases, block // self.group_size),
                           self.bits, self.group_size, self.mode, self.source)

    def dequantize(self) -> np.ndarray:
        w = mx.dequantize(mx.array(self.weight), mx.array(self.scales),
                          None if self.biases is None else mx.array(self.biases),
                          group_size=self.group_size, bits=self.bits, mode=self.mode)
        return np.array(w.astype(mx.float32))

    def arrays(self, prefix: str) -> Dict[str, mx.array]:
        out = {f"{prefix}.weight": mx.array(self.weight), f"{prefix}.scales": mx.array(self.scales)}
        if self.biases is not None:
            out[f"{prefix}.biases"] = mx.array(self.biases)
        return out


Tensor = Union[np.ndarray, QuantTensor]


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """MLX's packing: codes as one little-endian bit stream, read as uint32."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    lead, cols = codes.shape[:-1], codes.shape[-1]
    if bits == 8:
        return codes.view(np.uint32)
    if bits == 4:
        return (codes[..., 0::2] | (codes[..., 1::2] << 4)).view(np.uint32)
    flat = codes.reshape(-1, cols)
    out = np.empty((flat.shape[0], cols * bits // 32), dtype=np.uint32)
    shifts = np.arange(bits, dtype=np.uint8)
    step = max(1, (1 << 22) // max(cols, 1))  # bound the bit-expanded temporary
    for i in range(0, flat.shape[0], step):
        chunk = (flat[i : i + step, :, None] >> shifts) & 1
        out[i : i + step] = np.packbits(chunk.reshape(chunk.shape[0], -1), axis=-1, bitorder="little").view(np.uint32)
    return out.reshape(*lead, -1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[nb, 16] bytes -> [nb, 32] codes: element j low nibble of qs[j], j+16 high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _half(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)


def _k_scale_min(scales: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The 12-byte 6-bit scale/min packing of Q4_K and Q5_K -> [nb, 8] each."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_codes_low(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K low nibbles: per 64-value chunk, low nibbles of 32 bytes are
    elements 0-31 and high nibbles elements 32-63. -> [nb, 256]."""
    nb = qs.shape[0]
    qs = qs.reshape(nb, 4, 1, 32)
    return np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 256)


def _repack_blocks(qtype_name: str, blocks: np.ndarray):
    """Raw blocks [nb, type_size] -> (codes [nb, block], scales, biases, bits, mode);
    scales/biases are [nb, block/32]."""
    nb = blocks.shape[0]
    if qtype_name == "Q8_0":
        d = _half(blocks[:, 0:2])
        codes = (blocks[:, 2:34].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return codes, d, (d.astype(np.float32) * -128).astype(np.float16), 8, "affine"
    if qtype_name == "Q4_0":
        d = _half(blocks[:, 0:2])
        return _nibbles(blocks[:, 2:18]), d, (d.astype(np.float32) * -8).astype(np.float16), 4, "affine"
    if qtype_name == "Q4_1":
        return _nibbles(blocks[:, 4:20]), _half(blocks[:, 0:2]), _half(blocks[:, 2:4]).copy(), 4, "affine"
    if qtype_name in ("Q5_0", "Q5_1"):
        off = 2 if qtype_name == "Q5_0" else 4
        d = _half(blocks[:, 0:2])
        qh = np.ascontiguousarray(blocks[:, off : off + 4]).view(np.uint32)
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        codes = _nibbles(blocks[:, off + 4 : off + 20]) | (high << 4)
        bias = (d.astype(np.float32) * -16).astype(np.float16) if off == 2 else _half(blocks[:, 2:4]).copy()
        return codes, d, bias, 5, "affine"
    if qtype_name == "MXFP4":
        # The e2m1 code order and the e8m0 exponent byte are MLX's own.
        return _nibbles(blocks[:, 1:17]), blocks[:, 0:1].copy(), None, 4, "mxfp4"
    if qtype_name in ("Q4_K", "Q5_K"):
        d = _half(blocks[:, 0:2]).astype(np.float32)
        dmin = _half(blocks[:, 2:4]).astype(np.float32)
        sc, mn = _k_scale_min(blocks[:, 4:16])
        # Products of an fp16 and a 6-bit integer: exact in float32.
        scales = d * sc.astype(np.float32)
        biases = -(dmin * mn.astype(np.float32))
        if qtype_name == "Q4_K":
            return _k_codes_low(blocks[:, 16:144]), scales, biases, 4, "affine"
        qh = blocks[:, 16:48].reshape(nb, 1, 32)
        high = ((qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(nb, 256)
        return _k_codes_low(blocks[:, 48:176]) | (high << 4), scales, biases, 5, "affine"
    raise KeyError(qtype_name)


REPACKED = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "MXFP4")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def convert_tensor(t, requant_bits: int = 8) -> Tensor:
    """One GGUF tensor -> a float numpy array or a QuantTensor (MLX layout).
    BF16 comes back as a uint16 array marked by `dtype=('bf16')`: see `to_mx`."""
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    name = t.tensor_type.name
    data = t.data
    if name == "F32" or name == "F16":
        return np.asarray(data)
    if name == "F64":
        return np.asarray(data, dtype=np.float32)
    if name == "BF16":
        return _BF16(np.ascontiguousarray(data).view(np.uint16))
    if name.startswith("I"):
        if name in ("I8", "I16", "I32", "I64"):
            return np.asarray(data)
    block, type_size = GGML_QUANT_SIZES[t.tensor_type]
    lead = tuple(data.shape[:-1])
    cols = data.shape[-1] // type_size * block
    if name in REPACKED:
        blocks = np.ascontiguousarray(data).reshape(-1, type_size)
        codes, scales, biases, bits, mode = _repack_blocks(name, blocks)
        groups = cols // GROUP
        if mode == "affine":
            # float32 for every affine repack: d*sc of the K-quants needs 17
            # mantissa bits, and float16 scales would also make mlx-lm run
            # (and round) activations in float16. llama.cpp computes in float32.
            scales, biases = scales.astype(np.float32), biases.astype(np.float32)
        return QuantTensor(
            pack_codes(codes.reshape(*lead, cols), bits),
            np.ascontiguousarray(scales).reshape(*lead, groups),
            None if biases is None else np.ascontiguousarray(biases).reshape(*lead, groups),
            bits, GROUP, mode, name,
        )
    try:
        values = quants.dequantize(np.asarray(data), t.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"tensor {t.name!r} has GGUF type {name}, which gguf-py cannot decode: {e}") from e
    values = values.astype(np.float16)
    if values.ndim < 2 or cols % GROUP:
        return values
    wq, s, b = mx.quantize(mx.array(values), group_size=GROUP, bits=requant_bits)
    return QuantTensor(np.array(wq), np.array(s), np.array(b), requant_bits, GROUP, "affine", name)


class _BF16(np.ndarray):
    """uint16 bit patterns of bfloat16 values (numpy has no bfloat16)."""

    def __new__(cls, bits: np.ndarray):
        return np.asarray(bits, dtype=np.uint16).view(cls)


def to_mx(value: np.ndarray) -> mx.array:
    if isinstance(value, _BF16):
        return mx.array(np.asarray(value).view(np.uint16)).view(mx.bfloat16)
    return mx.array(value)


def _take(value: Tensor, index: np.ndarray, axis: int) -> Tensor:
    if isinstance(value, QuantTensor):
        return value.take_rows(index, axis=axis)
    out = np.take(value, index, axis=axis)
    return _BF16(out) if isinstance(value, _BF16) else out


def _dequant(value: Tensor) -> np.ndarray:
    if isinstance(value, QuantTensor):
        return value.dequantize()
    if isinstance(value, _BF16):
        return np.array(to_mx(value).astype(mx.float32))
    return np.asarray(value, dtype=np.float32)


# --- qwen35 / qwen35moe -------------------------------------------------------


def _get(meta: Dict[str, Any], arch: str, key: str, default: Any = None) -> Any:
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
        raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
    return value


def qwen35_config(meta: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]]) -> Dict[str, Any]:
    """An HF-style Qwen3.5 config (`text_config` nested) from GGUF metadata and
    the tensor shapes (numpy order)."""
    arch = meta["general.architecture"]
    moe = arch == "qwen35moe"
    n_mtp = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    layers = int(_get(meta, arch, "block_count")) - n_mtp
    H = int(_get(meta, arch, "embedding_length"))
    heads = int(_get(meta, arch, "attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", H // heads))
    rot = int(meta.get(f"{arch}.rope.dimension_count", head_dim // 4))
    sections = list(meta.get(f"{arch}.rope.dimension_sections", []) or [])[:3]
    hk = int(_get(meta, arch, "ssm.group_count"))
    hv = int(_get(meta, arch, "ssm.time_step_rank"))
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
        "num_key_value_heads": int(_get(meta, arch, "attention.head_count_kv")),
        "head_dim": head_dim,
        "linear_num_value_heads": hv,
        "linear_num_key_heads": hk,
        "linear_key_head_dim": int(_get(meta, arch, "ssm.state_size")),
        "linear_value_head_dim": int(_get(meta, arch, "ssm.inner_size")) // hv,
        "linear_conv_kernel_dim": int(_get(meta, arch, "ssm.conv_kernel")),
        "full_attention_interval": int(meta.get(f"{arch}.full_attention_interval", 4)),
        "vocab_size": vocab,
        "rms_norm_eps": float(_get(meta, arch, "attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in shapes,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 262144)),
        "rope_parameters": rope,
        "mtp_num_hidden_layers": n_mtp,
        "mtp_use_dedicated_embeddings": False,
    }
    if moe:
        text.update(
            intermediate_size=int(meta.get(f"{arch}.feed_forward_length", 0) or 0),
            num_experts=int(_get(meta, arch, "expert_count")),
            num_experts_per_tok=int(_get(meta, arch, "expert_used_count")),
            moe_intermediate_size=int(_get(meta, arch, "expert_feed_forward_length")),
            shared_expert_intermediate_size=int(meta.get(f"{arch}.expert_shared_feed_forward_length", 0) or 0),
            decoder_sparse_step=1,
            norm_topk_prob=bool(meta.get(f"{arch}.expert_weights_norm", True)),
        )
    else:
        text["intermediate_size"] = int(_get(meta, arch, "feed_forward_length"))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    if eos is not None:
        text["eos_token_id"] = int(eos)
    config = {
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "text_config": text,
    }
    if eos is not None:
        config["eos_token_id"] = int(eos)
    return config


_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
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
    # gated attention
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    # dense MLP
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
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
_NEXTN_NAMES = {
    "nextn.eh_proj.weight": "fc.weight",
    "nextn.enorm.weight": "pre_fc_norm_embedding.weight",
    "nextn.hnorm.weight": "pre_fc_norm_hidden.weight",
    "nextn.shared_head_norm.weight": "norm.weight",
}
# Copies of token_embd / output the converter may write: the target's are used.
_NEXTN_SKIP = ("nextn.embed_tokens.weight", "nextn.shared_head_head.weight")
_TOP_NAMES = {
    "token_embd.weight": "language_model.model.embed_tokens.weight",
    "output_norm.weight": "language_model.model.norm.weight",
    "output.weight": "language_model.lm_head.weight",
}


def qwen35_name(gguf_name: str, num_layers: int) -> Optional[str]:
    """GGUF tensor name -> our module path (None: not used)."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_name)
    if not m:
        return None
    i, rest = int(m.group(1)), m.group(2)
    if i < num_layers:
        mapped = _LAYER_NAMES.get(rest)
        return None if mapped is None else f"language_model.model.layers.{i}.{mapped}"
    if rest in _NEXTN_SKIP:
        return None
    if rest in _NEXTN_NAMES:
        return f"mtp.{_NEXTN_NAMES[rest]}"
    mapped = _LAYER_NAMES.get(rest)
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
        a = _dequant(value).astype(np.float32)
        if reorder:
            a = a[order]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.log(-a)
    if name.endswith("linear_attn.dt_bias"):
        return _take(value, order, axis=-1) if reorder else value
    if name.endswith("linear_attn.conv1d.weight"):
        w = value if not isinstance(value, QuantTensor) else value.dequantize()
        if w.ndim == 3:  # [C, 1, K] as in torch
            w = w.reshape(w.shape[0], w.shape[-1])
        if reorder:
            w = _take(w, _rows_index(order, dv, 2 * key_dim, w.shape[0]), axis=0)
        out = np.asarray(w)[:, :, None]  # [C, K] -> mlx Conv1d [C, K, 1]
        return _BF16(out) if isinstance(w, _BF16) else out
    if not reorder:
        return value
    if name.endswith("linear_attn.in_proj_qkv.weight"):
        return _take(value, _rows_index(order, dv, 2 * key_dim, 2 * key_dim + hv * dv), axis=-2)
    if name.endswith("linear_attn.in_proj_z.weight"):
        return _take(value, _rows_index(order, dv, 0, hv * dv), axis=-2)
    if name.endswith(("linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight")):
        return _take(value, order, axis=-2)
    if name.endswith("linear_attn.out_proj.weight"):
        if isinstance(value, QuantTensor):
            moved = value.take_col_blocks(order, dv)
            if moved is not None:
                return moved
            # Head blocks straddle quantization groups: go through float and
            # requantize at 8 bits (affine groups of 32 cannot be split).
            w = value.dequantize()
            w = w.reshape(w.shape[0], hv, dv)[:, order].reshape(w.shape[0], -1).astype(np.float16)
            if w.shape[-1] % GROUP:
                return w
            wq, s, b = mx.quantize(mx.array(w), group_size=GROUP, bits=8)
            return QuantTensor(np.array(wq), np.array(s), np.array(b), 8, GROUP, "affine", value.source)
        lead = value.shape[:-1]
        out = np.asarray(value).reshape(*lead, hv, dv)[..., order, :].reshape(*lead, hv * dv)
        return _BF16(out) if isinstance(value, _BF16) else out
    return value


@dataclass
class GGUFCheckpoint:
    """A GGUF file read as an MLX checkpoint: config plus converted tensors."""

    path: Path
    reader: Any
    meta: Dict[str, Any]
    config: Dict[str, Any]
    requant_bits: int = 8

    @property
    def arch(self) -> str:
        return self.meta["general.architecture"]

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
            if name is None:
                continue
            if t.name.endswith("ffn_gate_up_exps.weight"):  # fused variant: split rows
                continue
            try:
                value = convert_tensor(t, self.requant_bits)
                value = qwen35_transform(name, value, text)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(
                    f"{self.path}: cannot convert tensor {t.name!r} ({t.tensor_type.name}): {e}"
                ) from e
            yield name, value, t.tensor_type.name
        # Fused gate_up experts (some converters keep them): split on rows.
        for t in self.reader.tensors:
            m = re.match(r"^blk\.(\d+)\.ffn_gate_up_exps\.weight$", t.name)
            if not m:
                continue
            i = int(m.group(1))
            prefix = (f"language_model.model.layers.{i}" if i < layers else f"mtp.layers.{i - layers}")
            value = convert_tensor(t, self.requant_bits)
            rows = (value.weight if isinstance(value, QuantTensor) else value).shape[-2]
            half = np.arange(rows // 2)
            yield f"{prefix}.mlp.switch_mlp.gate_proj.weight", _take(value, half, -2), t.tensor_type.name
            yield f"{prefix}.mlp.switch_mlp.up_proj.weight", _take(value, half + rows // 2, -2), t.tensor_type.name


def read_gguf(path: Union[str, Path], requant_bits: int = 8) -> GGUFCheckpoint:
    """Open a GGUF file and derive our config from its metadata."""
    path = Path(path).expanduser()
    reader = open_gguf(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    if arch in ("gemma4", "gemma4-assistant"):
        from .gguf_gemma4 import read_gemma4

        return read_gemma4(path, reader, meta, requant_bits)
    shapes = {t.name: tuple(int(x) for x in t.shape[::-1]) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight")
    config = qwen35_config(meta, shapes)
    return GGUFCheckpoint(path, reader, meta, config, requant_bits)


def mlx_weights(ckpt: GGUFCheckpoint) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """All tensors as MLX arrays in mlx-lm layout, plus the `quantization`
    config (one entry per quantized module)."""
    weights: Dict[str, mx.array] = {}
    layers: Dict[str, Dict[str, Any]] = {}
    for name, value, _ in ckpt.tensors():
        if isinstance(value, QuantTensor):
            prefix = name[: -len(".weight")]
            weights.update(value.arrays(prefix))
            layers[prefix] = value.params
        else:
            weights[name] = to_mx(value)
    return weights, quantization_config(layers)


def quantization_config(layers: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """mlx-lm's `quantization` dict: the most common setting as the default,
    every quantized module listed explicitly (so nothing is inferred)."""
    if not layers:
        return {}
    common = Counter(tuple(sorted(p.items())) for p in layers.values()).most_common(1)[0][0]
    out: Dict[str, Any] = dict(common)
    out.update({k: dict(v) for k, v in sorted(layers.items())})
    return out


def build_model(config: Dict[str, Any], weights: Dict[str, mx.array], quantization: Dict[str, Any], lazy: bool = False):
    """Instantiate our model class for `config`, quantize the modules listed
    in `quantization` and load `weights` strictly."""
    from ..models import qwen3_5
    from .safetensors import MODEL_CLASSES

    cls = MODEL_CLASSES[config["model_type"]]
    model = cls(qwen3_5.ModelArgs.from_dict(copy.deepcopy(config)))
    # Weights are in the sanitized layout (conv1d [C, K, 1]): sanitize only
    # sorts out the head and shifts nothing.
    return load_into(model, model.sanitize(weights), quantization, lazy)


def load_into(model: nn.Module, weights: Dict[str, mx.array], quantization: Dict[str, Any], lazy: bool = False):
    """Quantize the modules listed in `quantization`, then load `weights` strictly."""
    if quantization:
        def predicate(path: str, module: nn.Module):
            params = quantization.get(path)
            return dict(params) if isinstance(params, dict) and hasattr(module, "to_quantized") else False

        nn.quantize(model, class_predicate=predicate)
    model.eval()
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise CheckpointError(f"GGUF tensors do not match the model built from its metadata: {e}") from e
    if not lazy:
        mx.eval(model.parameters())
    return model


def load_gguf_target(path: Union[str, Path], lazy: bool = False, requant_bits: int = 8):
    """(model, config, checkpoint) for a qwen35 / qwen35moe / gemma4 GGUF file."""
    ckpt = read_gguf(path, requant_bits)
    if ckpt.arch == "gemma4-assistant":
        raise CheckpointError(
            f"{path} is a Gemma 4 assistant (a drafter), not a target: pass it with --drafter "
            "(drafter=...) next to its Gemma 4 target"
        )
    if ckpt.arch == "gemma4":
        from . import gguf_gemma4

        model, config = gguf_gemma4.load_target(ckpt, lazy=lazy)
        return model, config, ckpt
    weights, quantization = mlx_weights(ckpt)
    config = dict(ckpt.config)
    if quantization:
        config["quantization"] = quantization
    model = build_model(ckpt.config, weights, quantization, lazy=lazy)
    return model, config, ckpt


# --- tokenizer ----------------------------------------------------------------

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (llama.cpp's names).
_QWEN_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"""
    r""" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_LLAMA3_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PRE_TOKENIZER_REGEX = {
    "qwen35": _QWEN_REGEX,
    "qwen2": _QWEN2_REGEX,
    "llama-bpe": _LLAMA3_REGEX,
    "llama3": _LLAMA3_REGEX,
}
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def build_tokenizer(meta: Dict[str, Any]):
    """A HF fast tokenizer (PreTrainedTokenizerFast) from `tokenizer.ggml.*`
    metadata, plus the EOS ids. Byte-level BPE ("gpt2") vocabularies only."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    from .gguf_gemma4 import SPM_KINDS, build_spm_tokenizer

    if kind in SPM_KINDS:  # SentencePiece-style pieces (gemma4)
        return build_spm_tokenizer(meta)
    if not tokens:
        raise CheckpointError("GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported "
                              f"(byte-level BPE 'gpt2', SentencePiece-style {', '.join(SPM_KINDS)})")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in (meta.get("tokenizer.ggml.merges") or [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok.normalizer = normalizers.NFC()
    regex = PRE_TOKENIZER_REGEX.get(pre)
    if regex is None and pre.startswith("qwen"):
        regex = _QWEN_REGEX
    if regex is None:  # GPT-2's own split
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(t, special=(ty == TOKEN_CONTROL), normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]
    tok.add_tokens(added)

    def token(key: str) -> Optional[str]:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos = token("bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    kwargs = {k: v for k, v in (("eos_token", token("eos")), ("pad_token", token("padding")),
                                ("bos_token", bos), ("unk_token", token("unknown"))) if v is not None}
    template = meta.get("tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = template
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)
    eos_ids = [int(meta["tokenizer.ggml.eos_token_id"])] if "tokenizer.ggml.eos_token_id" in meta else []
    return hf, eos_ids


def load_gguf_tokenizer(meta: Dict[str, Any]):
    """The GGUF tokenizer wrapped like mlx-lm's own (streaming BPE detokenizer)."""
    from functools import partial

    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, TokenizerWrapper

    from .gguf_gemma4 import SPM_KINDS

    hf, eos_ids = build_tokenizer(meta)
    if meta.get("tokenizer.ggml.model") in SPM_KINDS:
        spaced = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
        detok = partial(SPMStreamingDetokenizer, trim_space=spaced)
    else:
        detok = BPEStreamingDetokenizer
    return TokenizerWrapper(hf, detokenizer_class=detok, eos_token_ids=eos_ids)


def load_gguf(path: Union[str, Path], lazy: bool = False, requant_bits: int = 8):
    """(model, config, tokenizer) from one GGUF file: no HF files needed."""
    model, config, ckpt = load_gguf_target(path, lazy=lazy, requant_bits=requant_bits)
    return model, config, load_gguf_tokenizer(ckpt.meta)
