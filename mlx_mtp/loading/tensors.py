"""Reading a safetensors checkpoint's tensors safely: every command that
reads them (convert, inspect --verify, loading FP8) goes through here.

- A file whose header promises more data than it holds is refused (an
  interrupted download), before anything is read.
- Only dtypes we know how to use are accepted. mx.load would otherwise hand
  back, say, FP8 data as plain uint8 numbers and a conversion would
  "succeed" with garbage.
- The only foreign quantization we decode is FP8 (fp8.py); any other
  `quant_method` is refused by `check_quantization`.
- `NonFinite` collects tensors holding NaN or Inf, so a corrupt checkpoint
  is named, not converted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

import mlx.core as mx

from . import fp8
from .safetensors import CheckpointError

#: Header dtypes every checkpoint may hold: floats, MLX's packed codes (U32),
#: uint8 scales of the float quantization modes, integer buffers.
PLAIN_DTYPES = ("F32", "F16", "BF16", "U32", "U8", "I32", "I64")
#: How many bad tensor names an error message lists before "and N more".
NAMES_SHOWN = 5


def read_header(path: Path) -> Dict[str, Any]:
    """Tensor name -> {dtype, shape, data_offsets}, checked against the
    file's size; reads only the header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        n = int.from_bytes(raw, "little")
        if 8 + n > size:
            raise CheckpointError(f"{path}: truncated safetensors file (the header is cut off)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    header.pop("__metadata__", None)
    end = max((int(info.get("data_offsets", [0, 0])[1]) for info in header.values()), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file: its header needs {8 + n + end} bytes, "
                              f"the file has {size} (an interrupted download? fetch it again)")
    return header


def name_list(names: List[str]) -> str:
    """The first few names, then how many more: error messages stay one readable line."""
    shown = ", ".join(names[:NAMES_SHOWN])
    return shown + (f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else "")


def check_dtypes(path: Path, header: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, str]:
    """Name -> dtype of one file; CheckpointError naming the tensors whose
    dtype we cannot read (FP8 only in an FP8 checkpoint)."""
    dtypes = {name: str(info.get("dtype")) for name, info in header.items()}
    allowed = PLAIN_DTYPES + ((fp8.FP8_DTYPE,) if fp8.is_fp8(config) else ())
    bad = sorted(name for name, dt in dtypes.items() if dt not in allowed)
    if bad:
        kinds = sorted({dtypes[name] for name in bad})
        hint = (" (FP8 data, but config.json has no quantization_config with quant_method fp8)"
                if kinds == [fp8.FP8_DTYPE] else "")
        raise CheckpointError(f"{path.name}: {len(bad)} tensor(s) in dtype {', '.join(kinds)}, which mlx-mtp "
                              f"cannot read{hint}: {name_list(bad)}")
    return dtypes


def check_quantization(config: Dict[str, Any]) -> None:
    """Refuse a foreign quantization we would only copy byte for byte: MLX
    quants (a "quantization" entry) and FP8 are what we understand."""
    if "quantization" in config:
        return
    qc = fp8.quantization_config(config)
    if not qc:
        return
    method = qc.get("quant_method")
    if method == fp8.FP8_METHOD:
        fp8.fp8_block(config)  # refuses the FP8 variants we cannot decode
        return
    raise CheckpointError(
        f"config.json: quantization_config.quant_method {method!r} is not supported (mlx-mtp reads float, "
        "MLX-quantized and FP8 e4m3 checkpoints): convert the original float checkpoint instead"
    )


def shard_files(path: Path) -> List[Path]:
    files = sorted(Path(path).glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"no model*.safetensors files in {path}")
    return files


def read_weights(path: Path, config: Dict[str, Any]) -> Dict[str, mx.array]:
    """Every tensor of a checkpoint directory, lazily, FP8 decoded; after
    checking each file is complete and holds only dtypes we read."""
    check_quantization(config)
    weights: Dict[str, mx.array] = {}
    dtypes: Dict[str, str] = {}
    for f in shard_files(path):
        dtypes.update(check_dtypes(f, read_header(f), config))
        try:
            weights.update(mx.load(str(f)))
        except RuntimeError as e:
            raise CheckpointError(f"{f}: cannot read (corrupt or truncated?): {e}") from e
    if fp8.is_fp8(config):
        weights = fp8.dequantize_weights(weights, dtypes, fp8.fp8_block(config))
    return weights


def read_head_tensors(file: Path, config: Dict[str, Any], key: re.Pattern) -> Dict[str, mx.array]:
    """The tensors of one shard whose names match `key` (graft's MTP head),
    checked and FP8 decoded like `read_weights` (a weight and its scale
    share a module, so they share a shard)."""
    check_quantization(config)
    dtypes = check_dtypes(file, read_header(file), config)
    try:
        tensors = {k: v for k, v in mx.load(str(file)).items() if key.match(k)}
    except RuntimeError as e:
        raise CheckpointError(f"{file}: cannot read (corrupt or truncated?): {e}") from e
    if fp8.is_fp8(config):
        tensors = fp8.dequantize_weights(tensors, dtypes, fp8.fp8_block(config))
    return tensors


class NonFinite:
    """Collects the names of float tensors holding NaN or Inf."""

    def __init__(self) -> None:
        self.bad: List[str] = []

    def check(self, name: str, value: mx.array) -> bool:
        """True when `value` is finite (or not a float tensor)."""
        if not mx.issubdtype(value.dtype, mx.floating):
            return True
        has_nan, has_inf = mx.any(mx.isnan(value)), mx.any(mx.isinf(value))
        mx.eval(has_nan, has_inf)
        kinds = [k for k, flag in (("NaN", has_nan), ("Inf", has_inf)) if flag.item()]
        if kinds:
            self.bad.append(f"{name} ({'/'.join(kinds)})")
        return not kinds

    def error(self, where: str) -> Optional[CheckpointError]:
        if not self.bad:
            return None
        return CheckpointError(f"{where}: {len(self.bad)} tensor(s) hold NaN or Inf values, so the checkpoint is "
                               f"corrupt (fetch or export it again): {name_list(sorted(self.bad))}")


def verify(path: Path, config: Dict[str, Any]) -> int:
    """Read every tensor once and refuse NaN / Inf; returns how many were
    checked. One tensor is in memory at a time."""
    weights = read_weights(path, config)
    scan, count = NonFinite(), len(weights)
    while weights:  # popped so each tensor is freed once checked
        name, value = weights.popitem()
        scan.check(name, value)
        del value
    error = scan.error(str(path))
    if error:
        raise error
    return count
