"""Repack GGUF quant blocks into MLX's own quantized layout, and requantize
the types MLX cannot express:

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

Also here: turning converted tensors into MLX arrays plus mlx-lm's
`quantization` config, and loading them into a model strictly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..safetensors import CheckpointError, load_strict

GROUP = 32


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
    BF16 comes back as a uint16 array marked by its type (`BF16`): see `to_mx`."""
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    name = t.tensor_type.name
    data = t.data
    if name == "F32" or name == "F16":
        return np.asarray(data)
    if name == "F64":
        return np.asarray(data, dtype=np.float32)
    if name == "BF16":
        return BF16(np.ascontiguousarray(data).view(np.uint16))
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
    return requantize(values.astype(np.float16), requant_bits, name)


def requantize(values: np.ndarray, bits: int, source: str) -> Tensor:
    """float16 values -> affine `bits` group-32 QuantTensor; vectors and rows
    that are not a multiple of 32 stay float16."""
    if values.ndim < 2 or values.shape[-1] % GROUP:
        return values
    wq, s, b = mx.quantize(mx.array(values), group_size=GROUP, bits=bits)
    return QuantTensor(np.array(wq), np.array(s), np.array(b), bits, GROUP, "affine", source)


class BF16(np.ndarray):
    """uint16 bit patterns of bfloat16 values (numpy has no bfloat16)."""

    def __new__(cls, bits: np.ndarray):
        return np.asarray(bits, dtype=np.uint16).view(cls)


def to_mx(value: np.ndarray) -> mx.array:
    if isinstance(value, BF16):
        return mx.array(np.asarray(value).view(np.uint16)).view(mx.bfloat16)
    return mx.array(value)


def take(value: Tensor, index: np.ndarray, axis: int) -> Tensor:
    """np.take for any converted tensor (BF16 stays BF16, QuantTensor rows move whole)."""
    if isinstance(value, QuantTensor):
        return value.take_rows(index, axis=axis)
    out = np.take(value, index, axis=axis)
    return BF16(out) if isinstance(value, BF16) else out


def split_rows(value: Tensor) -> Tuple[Tensor, Tensor]:
    """The two halves of a fused tensor's output rows (gate and up of
    `ffn_gate_up_exps`); a quantized tensor splits without dequantizing."""
    rows = (value.weight if isinstance(value, QuantTensor) else value).shape[-2]
    half = np.arange(rows // 2)
    return take(value, half, -2), take(value, half + rows // 2, -2)


def dequant(value: Tensor) -> np.ndarray:
    """Any converted tensor as float32 values."""
    if isinstance(value, QuantTensor):
        return value.dequantize()
    if isinstance(value, BF16):
        return np.array(to_mx(value).astype(mx.float32))
    return np.asarray(value, dtype=np.float32)


# --- MLX weights and models -------------------------------------------------------


def mlx_weights(ckpt) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """All of a checkpoint's tensors as MLX arrays in mlx-lm layout, plus the
    `quantization` config (one entry per quantized module)."""
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


def load_into(model: nn.Module, weights: Dict[str, mx.array], quantization: Dict[str, Any], lazy: bool = False):
    """Quantize the modules listed in `quantization`, then load `weights` strictly."""
    if quantization:
        def predicate(path: str, module: nn.Module):
            params = quantization.get(path)
            return dict(params) if isinstance(params, dict) and hasattr(module, "to_quantized") else False

        nn.quantize(model, class_predicate=predicate)
    model.eval()
    load_strict(model, weights, lazy=lazy,
                error=lambda e: CheckpointError(f"GGUF tensors do not match the model built from its metadata: {e}"))
    return model
