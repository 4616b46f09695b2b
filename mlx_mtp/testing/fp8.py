"""A tiny replica of a Qwen3.5 / Qwen3.6 FP8 repo (`Qwen/Qwen3.6-27B-FP8`
layout) for tests: the same names and dtypes, random weights.

- `p.weight` matrices in safetensors dtype F8_E4M3, each with a bf16
  `p.weight_scale_inv` holding one scale per block (fused 3-D expert tensors:
  `p` and `p_scale_inv`, with the expert axis in front);
- kept in bf16, as the released repos keep them: embeddings, lm_head, every
  norm, the MoE routers, and the linear-attention conv1d / A_log / dt_bias /
  in_proj_a / in_proj_b;
- config.json's `quantization_config` as the releases write it.

MLX writes uint8 where safetensors wants F8_E4M3, so the file is saved with
uint8 codes and its header is retagged afterwards (same bytes, one byte per
value either way).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..loading.fp8 import FP8_DTYPE, SCALE_SUFFIX
from ..loading.writers import save_hf_checkpoint
from . import build, hf_config, write_tokenizer

#: Largest finite e4m3 value: a block's absolute maximum maps onto it.
E4M3_MAX = 448.0
#: Name fragments of the tensors the released FP8 repos keep in bf16.
KEEP_BF16 = ("embed_tokens", "lm_head", "norm", "conv1d", "A_log", "dt_bias", "in_proj_a", "in_proj_b",
             "mlp.gate.weight", "shared_expert_gate")
REAL_BLOCK = (128, 128)


def quantized_in_fp8(name: str, value: mx.array) -> bool:
    """Whether the released repos store this tensor in FP8."""
    return value.ndim >= 2 and not any(part in name for part in KEEP_BF16)


def encode(w: mx.array, block: Tuple[int, int]) -> Tuple[mx.array, mx.array]:
    """float [..., rows, cols] -> (e4m3 codes as uint8, bf16 scale per block),
    the way transformers' Fp8Quantize does it: scale = block amax / 448."""
    *lead, rows, cols = w.shape
    br, bc = block
    grid = (-(-rows // br), -(-cols // bc))
    padded = mx.pad(w.astype(mx.float32), [(0, 0)] * len(lead) + [(0, grid[0] * br - rows), (0, grid[1] * bc - cols)])
    blocks = padded.reshape(*lead, grid[0], br, grid[1], bc)
    amax = mx.max(mx.abs(blocks), axis=(-3, -1), keepdims=True)
    scale = (mx.maximum(amax, 1e-12) / E4M3_MAX).astype(mx.bfloat16)
    scaled = mx.clip(blocks / scale.astype(mx.float32), -E4M3_MAX, E4M3_MAX)
    codes = mx.to_fp8(scaled.reshape(padded.shape)[..., :rows, :cols])
    return codes, scale.reshape(*lead, *grid)


def retag(path: Path, dtypes: Dict[str, str]) -> None:
    """Rewrite a safetensors header so `name` is recorded as `dtypes[name]`
    (same element size); the data bytes stay where they are."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    for name, dtype in dtypes.items():
        header[name]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def fp8_config(config: dict, block: Optional[Tuple[int, int]]) -> dict:
    keep = sorted({"lm_head", "model.language_model.embed_tokens"})
    return {**config, "torch_dtype": "bfloat16",
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": list(block) if block else None,
                                    "modules_to_not_convert": keep}}


def to_fp8_checkpoint(weights: Dict[str, mx.array], block: Tuple[int, int]) -> Tuple[Dict[str, mx.array], list]:
    """Raw HF weights -> (FP8 repo weights, names stored as F8_E4M3)."""
    out: Dict[str, mx.array] = {}
    fp8_names = []
    for name, value in weights.items():
        if quantized_in_fp8(name, value):
            codes, scale = encode(value, block)
            out[name], out[name + SCALE_SUFFIX] = codes, scale
            fp8_names.append(name)
        else:
            out[name] = value.astype(mx.bfloat16)
    return out, fp8_names


def write_fp8_model_dir(path: Path, block: Tuple[int, int] = REAL_BLOCK, moe: bool = False, seed: int = 0,
                        noise: float = 1.6, **text_overrides) -> Path:
    """A complete FP8 model directory (raw HF layout + tokenizer)."""
    path = Path(path)
    config = hf_config(moe=moe, **text_overrides)
    model = build(config["text_config"], seed=seed, predictable=True, noise=noise)
    save_hf_checkpoint(model, path, config, raw=True)
    file = path / "model.safetensors"
    weights, fp8_names = to_fp8_checkpoint(mx.load(str(file)), block)
    mx.save_safetensors(str(file), weights)
    retag(file, {name: FP8_DTYPE for name in fp8_names})
    (path / "config.json").write_text(json.dumps(fp8_config(config, block), indent=1))
    write_tokenizer(path)
    return path


def decode_e4m3(codes: np.ndarray) -> np.ndarray:
    """An independent e4m3 (fn) decoder for checking mx.from_fp8: 1 sign, 4
    exponent (bias 7), 3 mantissa bits; no infinities, S.1111.111 is NaN."""
    c = codes.astype(np.int32)
    sign = np.where(c & 0x80, -1.0, 1.0)
    exp, man = (c >> 3) & 0xF, c & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = np.where((exp == 0xF) & (man == 0x7), np.nan, value)
    return (sign * value).astype(np.float32)


def read_raw(path: Path) -> Iterable[Tuple[str, str, np.ndarray]]:
    """(name, header dtype, raw bytes as uint8 / float32 values) straight from
    the file, without MLX: the tests' reference reader."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    for name, info in header.items():
        start, end = info["data_offsets"]
        data = raw[8 + n + start : 8 + n + end]
        if info["dtype"] == "BF16":  # bf16 is the top half of a float32
            value = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif info["dtype"] == "F32":
            value = np.frombuffer(data, np.float32)
        else:
            value = np.frombuffer(data, np.uint8)
        yield name, info["dtype"], value.reshape(info["shape"])
