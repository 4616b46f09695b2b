"""Open GGUF files with gguf-py's `GGUFReader`, read their metadata, and the
parts every architecture's checkpoint shares.

`mx.load` is not safe for GGUF: it corrupts Q4_K, drops MXFP4 and turns BF16
into F16 (docs/gguf.md#do-not-use-mxload). So nothing here goes through it: tensors
are read as raw blocks and repacked by `quants.py`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple, Union

import numpy as np

from ..safetensors import CheckpointError

GGUF_MAGIC = b"GGUF"
# Layer tensors (`blk.i.<name>`) llama.cpp names alike in every architecture
# -> their module path inside the layer (HF / mlx-lm names).
COMMON_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    # attention
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
}


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


def meta_value(meta: Dict[str, Any], arch: str, key: str, default: Any = None) -> Any:
    """`meta["{arch}.{key}"]`; CheckpointError when absent and no default."""
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
        raise CheckpointError(f"GGUF metadata lacks {arch}.{key}")
    return value


def tensor_shapes(reader, path: Union[str, Path]) -> Dict[str, Tuple[int, ...]]:
    """Every tensor's shape in numpy order; a model file must have token_embd."""
    shapes = {t.name: tuple(int(x) for x in t.shape[::-1]) for t in reader.tensors}
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path}: GGUF file has no token_embd.weight")
    return shapes


@contextmanager
def converting(path: Path, tensor) -> Iterator[None]:
    """Any failure while converting `tensor` becomes a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot convert tensor {tensor.name!r} ({tensor.tensor_type.name}): {e}"
        ) from e


@dataclass
class GGUFFile:
    """A GGUF file read as an MLX checkpoint: config plus the tensors the
    architecture's subclass converts (`tensor_names()`, `tensors()`)."""

    path: Path
    reader: Any
    meta: Dict[str, Any]
    config: Dict[str, Any]
    requant_bits: int = 8

    @property
    def arch(self) -> str:
        return self.meta["general.architecture"]
