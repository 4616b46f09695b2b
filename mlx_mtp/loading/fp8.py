"""FP8 checkpoints (`Qwen/Qwen3.6-27B-FP8` style), dequantized as they are read.

What such a repo holds (transformers' FineGrainedFP8 names):

- config.json: `quantization_config = {quant_method: "fp8", fmt: "e4m3",
  weight_block_size: [128, 128], activation_scheme: "dynamic", ...}`, at the
  top level or under `text_config`.
- a quantized matrix `p.weight` in safetensors dtype `F8_E4M3`, next to
  `p.weight_scale_inv` (bf16) of shape `[ceil(rows / 128), ceil(cols / 128)]`:
  one multiplier per block, the last block row / column partial when a
  dimension is not a multiple of the block. Fused 3-D expert tensors `p` use
  `p_scale_inv` with the same leading expert axis. Either way the scale is
  the tensor's name plus `_scale_inv`.
- everything else (embeddings, lm_head, norms, routers, the small
  linear-attention tensors) in bf16.

The value is `weight * weight_scale_inv`, every element of a block times its
block's scale. mx.load hands F8_E4M3 data back as raw uint8 bytes, which only
the safetensors header tells apart from a real uint8 tensor; `mx.from_fp8`
decodes them (the tests check it against an independent decoder on all 256
codes). We dequantize to bfloat16: the model's own dtype, and the same memory
as the bf16 original, not float32's double.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .safetensors import CheckpointError

FP8_METHOD = "fp8"
#: The safetensors dtype of e4m3 weights, the only FP8 format we decode.
FP8_DTYPE = "F8_E4M3"
SUPPORTED_FMT = "e4m3"
SCALE_SUFFIX = "_scale_inv"
#: Static activation scales (activation_scheme "static"): we compute in bf16,
#: so they have nothing to do and are dropped.
ACTIVATION_SUFFIX = "activation_scale"
DEQUANTIZED_DTYPE = mx.bfloat16

Block = Optional[Tuple[int, int]]


def quantization_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """The HF `quantization_config`, where mlx-lm looks for it (top level,
    then text_config); {} when there is none."""
    qc = config.get("quantization_config")
    if qc is None:
        qc = (config.get("text_config") or {}).get("quantization_config")
    return qc if isinstance(qc, dict) else {}


def is_fp8(config: Dict[str, Any]) -> bool:
    """An FP8 checkpoint; an MLX "quantization" entry wins over a stale
    quantization_config (what is stored is MLX's then)."""
    return "quantization" not in config and quantization_config(config).get("quant_method") == FP8_METHOD


def fp8_block(config: Dict[str, Any]) -> Block:
    """The (rows, cols) scale block of an FP8 checkpoint; None for one scale
    per tensor. CheckpointError for FP8 variants we cannot decode."""
    qc = quantization_config(config)
    fmt = qc.get("fmt", SUPPORTED_FMT)
    if fmt != SUPPORTED_FMT:
        raise CheckpointError(f"FP8 format {fmt!r} is not supported (only {SUPPORTED_FMT})")
    scale_fmt = qc.get("scale_fmt") or "float"
    if scale_fmt != "float":
        raise CheckpointError(f"FP8 scale format {scale_fmt!r} is not supported (only float scales)")
    block = qc.get("weight_block_size")
    if block is None:
        return None
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise CheckpointError(f"quantization_config.weight_block_size {block!r} is not two positive integers")
    return int(block[0]), int(block[1])


def dequantize(codes: mx.array, scale_inv: mx.array, block: Block, name: str) -> mx.array:
    """e4m3 codes [..., rows, cols] (uint8) times their block scales, as bfloat16."""
    *lead, rows, cols = codes.shape
    br, bc = block or (rows, cols)
    grid = (-(-rows // br), -(-cols // bc))
    expected = (*lead, *grid)
    # One scale per tensor may come as a scalar; a block grid must match exactly.
    fits = tuple(scale_inv.shape) == expected or (block is None and scale_inv.size == math.prod(expected))
    if not fits:
        raise CheckpointError(
            f"{name}{SCALE_SUFFIX} has shape {list(scale_inv.shape)}, but a {rows}x{cols} weight in "
            f"{br}x{bc} blocks needs {list(expected)}"
        )
    w = mx.from_fp8(codes, dtype=mx.float32)
    pad_r, pad_c = grid[0] * br - rows, grid[1] * bc - cols
    if pad_r or pad_c:  # edge blocks: pad to whole blocks, cut back after scaling
        w = mx.pad(w, [(0, 0)] * len(lead) + [(0, pad_r), (0, pad_c)])
    scale = scale_inv.astype(mx.float32).reshape(*lead, grid[0], 1, grid[1], 1)
    w = (w.reshape(*lead, grid[0], br, grid[1], bc) * scale).reshape(*lead, grid[0] * br, grid[1] * bc)
    return w[..., :rows, :cols].astype(DEQUANTIZED_DTYPE)


def dequantize_weights(weights: Dict[str, mx.array], dtypes: Dict[str, str], block: Block) -> Dict[str, mx.array]:
    """Every F8_E4M3 tensor and its scale -> one bfloat16 tensor under the
    weight's name (lazily); other tensors pass through. `dtypes` are the
    safetensors header dtypes, the only record of which uint8 data is FP8."""
    out: Dict[str, mx.array] = {}
    for name, value in weights.items():
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in weights:
                raise CheckpointError(f"{name} has no weight {name[: -len(SCALE_SUFFIX)]} to scale")
            continue
        if name.endswith(ACTIVATION_SUFFIX):
            continue
        scale = weights.get(name + SCALE_SUFFIX)
        if dtypes.get(name) == FP8_DTYPE:
            if scale is None:
                raise CheckpointError(f"{name} is {FP8_DTYPE} but the checkpoint has no {name}{SCALE_SUFFIX}")
            value = dequantize(value, scale, block, name)
        elif scale is not None:
            raise CheckpointError(f"{name} has a {name}{SCALE_SUFFIX} but is stored as {dtypes.get(name)}, "
                                  f"not {FP8_DTYPE}")
        out[name] = value
    return out


def load_fp8_model(path: Path, config: Dict[str, Any]) -> nn.Module:
    """The model of an FP8 checkpoint directory, weights dequantized, not
    yet read from disk. mlx-lm has no FP8 reader for these architectures, so
    this replaces its `load_model` for them."""
    from .safetensors import checked_model_classes, load_strict
    from .tensors import read_weights

    model_class, args_class = checked_model_classes(config)
    model = model_class(args_class.from_dict(copy.deepcopy(config)))
    weights = model.sanitize(read_weights(path, config))
    load_strict(model, weights, lazy=True,
                error=lambda e: CheckpointError(f"{path}: weights do not match the config: {e}"))
    model.eval()
    return model
