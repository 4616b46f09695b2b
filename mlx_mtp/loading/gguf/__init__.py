"""Load llama.cpp GGUF files into our models, without going through `mx.load`
(it corrupts Q4_K, drops MXFP4 and turns BF16 into F16).

- `reader.py`: opening files (with errors that name the bad tensor), metadata;
- `quants.py`: GGUF quant blocks repacked into MLX quantized weights (the
  type table is there), requantization of the rest, strict loading;
- `qwen35.py`: qwen35 / qwen35moe (MTP head included);
- `gemma4.py`: gemma4 targets and gemma4-assistant drafters;
- `glm4moe.py`, `deepseek2.py` (shared parts in `nextn.py`): GLM-4.5/4.7,
  DeepSeek-V3 and GLM-4.7-Flash with their nextn MTP head;
- `mtp_split.py`: llama.cpp's split MTP-only files (`--mtp`) as drafters;
- `tokenizer.py`: tokenizers from `tokenizer.ggml.*` metadata.

This module only dispatches on `general.architecture` (and on whether a
qwen35 file is a split MTP head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ...models.experts import fit_experts_to_device
from ..safetensors import CheckpointError
from . import deepseek2, gemma4, glm4moe, mtp_split, nextn, qwen35
from .gemma4 import Gemma4Checkpoint, load_gguf_assistant
from .mtp_split import is_mtp_only, load_mtp_drafter, mtp_only_layout
from .quants import (
    FLOAT_TYPES,
    GROUP,
    REPACKED,
    BF16,
    QuantTensor,
    Tensor,
    convert_tensor,
    load_into,
    mlx_weights,
    pack_codes,
    quantization_config,
    requantize,
    take,
    to_mx,
)
from .qwen35 import (
    LAYER_NAMES,
    NEXTN_NAMES,
    TOP_NAMES,
    GGUFCheckpoint,
    build_model,
    qwen35_config,
    qwen35_name,
    qwen35_transform,
    v_head_order,
)
from .reader import GGUF_MAGIC, GGUFFile, metadata, open_gguf
from .tokenizer import PRE_TOKENIZER_REGEX, build_spm_tokenizer, build_tokenizer, load_gguf_tokenizer

SUPPORTED_ARCHS = qwen35.ARCHS + gemma4.ARCHS + glm4moe.ARCHS + deepseek2.ARCHS
# Architectures whose head is a nextn block (loading/gguf/nextn.py), by reader.
NEXTN_READERS = {**{a: glm4moe.read_glm4moe for a in glm4moe.ARCHS},
                 **{a: deepseek2.read_deepseek2 for a in deepseek2.ARCHS}}

__all__ = [
    "BF16", "FLOAT_TYPES", "GGUF_MAGIC", "GROUP", "LAYER_NAMES", "NEXTN_NAMES", "PRE_TOKENIZER_REGEX", "REPACKED",
    "SUPPORTED_ARCHS", "TOP_NAMES", "GGUFCheckpoint", "GGUFFile", "Gemma4Checkpoint", "QuantTensor", "Tensor",
    "build_model", "build_spm_tokenizer", "build_tokenizer", "convert_tensor", "is_gguf", "is_mtp_only",
    "load_gguf", "load_gguf_assistant", "load_gguf_drafter", "load_gguf_target", "load_gguf_tokenizer",
    "load_into", "load_mtp_drafter", "metadata", "mlx_weights", "mtp_only_layout", "open_gguf", "pack_codes",
    "quantization_config", "qwen35_config", "qwen35_name", "qwen35_transform", "read_gguf", "requantize", "take",
    "to_mx", "v_head_order",
]


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


def read_gguf(path: Union[str, Path], requant_bits: int = 8) -> GGUFFile:
    """Open a GGUF file and derive our config from its metadata."""
    path = Path(path).expanduser()
    reader = open_gguf(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise CheckpointError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    if mtp_split.is_mtp_only(meta, (t.name for t in reader.tensors)):  # nothing to load or convert but a head
        raise CheckpointError(f"{path} is an MTP-only drafter file (llama.cpp --mtp), not a model: "
                              f"{mtp_split.USE_AS_DRAFTER}")
    if arch in NEXTN_READERS:
        return NEXTN_READERS[arch](path, reader, meta, requant_bits)
    read = gemma4.read_gemma4 if arch in gemma4.ARCHS else qwen35.read_qwen35
    return read(path, reader, meta, requant_bits)


def load_gguf_target(path: Union[str, Path], lazy: bool = False, requant_bits: int = 8):
    """(model, config, checkpoint) for a qwen35 / qwen35moe / gemma4 /
    glm4moe / deepseek2 GGUF file."""
    ckpt = read_gguf(path, requant_bits)
    if ckpt.arch == gemma4.ASSISTANT_ARCH:
        raise CheckpointError(
            f"{path} is a Gemma 4 assistant (a drafter), not a target: pass it with --drafter "
            "(drafter=...) next to its Gemma 4 target"
        )
    arch_module = gemma4 if ckpt.arch == gemma4.TARGET_ARCH else nextn if ckpt.arch in NEXTN_READERS else qwen35
    model, config = arch_module.load_target(ckpt, lazy=lazy)
    fit_experts_to_device(model)  # float (F16/BF16) experts: float32 on the CPU backend
    return model, config, ckpt


def load_gguf_drafter(path: Union[str, Path], target, lazy: bool = False, requant_bits: int = 8):
    """A drafter for `target` from a GGUF file: a gemma4-assistant, or a
    split MTP head (`mtp-*.gguf`). Raises AssistantError (one line)."""
    from ...drafters.gemma4_assistant import Gemma4AssistantDrafter
    from ...models.gemma4_assistant import AssistantError

    try:
        arch = metadata(open_gguf(Path(path).expanduser())).get("general.architecture")
    except CheckpointError as e:
        raise AssistantError(str(e)) from e
    if arch in qwen35.ARCHS:
        return load_mtp_drafter(path, target, lazy=lazy, requant_bits=requant_bits)
    return Gemma4AssistantDrafter(load_gguf_assistant(path, lazy=lazy, requant_bits=requant_bits), target)


def load_gguf(path: Union[str, Path], lazy: bool = False, requant_bits: int = 8):
    """(model, config, tokenizer) from one GGUF file: no HF files needed."""
    model, config, ckpt = load_gguf_target(path, lazy=lazy, requant_bits=requant_bits)
    return model, config, load_gguf_tokenizer(ckpt.meta)
