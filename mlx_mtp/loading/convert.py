"""`mlx-mtp convert`: HF checkpoints and GGUF files -> MLX checkpoints in
mlx-lm's layout that keep the MTP head.

The output loads in mlx-mtp with its drafter, and plain `mlx_lm.load` loads
the trunk: the head is written under the family's own stored names
(`HeadLayout.stored_key`: `mtp.*` for Qwen, `model.layers.L.*` for the
nextn families, `model.mtp_layers.K.*` for MiMo), which our loaders read
back into `mtp` and mlx-lm's `sanitize` drops; where mlx-lm would keep them
(`mlx_lm_drops_head`), the head goes to `mtp.safetensors` beside the shards,
which mlx-lm's `model*.safetensors` glob never reads. Heads can stay at a higher
precision than the trunk: they are recorded as per-layer overrides in
`config.json`'s "quantization" (a dict for a quantized layer, `false` for
one kept in float).

Memory: safetensors are opened lazily (`mx.load` reads a tensor only when it
is evaluated) and GGUF tensors are converted one at a time from the memory
map; converted tensors are written out shard by shard, so the peak is about
one output shard, not the model plus its copy.
"""

from __future__ import annotations

import copy
import functools
import glob
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .safetensors import CheckpointError, read_config

MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
TOKENIZER_GLOBS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "*.tiktoken", "*.jinja", "generation_config.json",
                   "chat_template.json")
SHARD_BYTES = 5 << 30
#: Where convert and graft put a head that plain mlx-lm would not drop: our
#: loaders read `mtp*.safetensors` beside the shards, mlx-lm's glob misses it.
HEAD_SIDE_FILE = "mtp.safetensors"


def quant_params(mode: str, bits: Optional[int], group_size: Optional[int]) -> Dict[str, Any]:
    """Validated (group_size, bits, mode) with mlx-lm's per-mode defaults."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r} (use one of {', '.join(MODES)})")
    g, b = MODE_DEFAULTS[mode]
    group_size, bits = group_size or g, bits or b
    if mode == "affine":
        if bits not in (2, 3, 4, 5, 6, 8):
            raise ValueError(f"affine quantization takes 2-6 or 8 bits, not {bits}")
        if group_size not in (32, 64, 128):
            raise ValueError(f"affine quantization takes group sizes 32, 64 or 128, not {group_size}")
    elif (group_size, bits) != (g, b):
        raise ValueError(f"{mode} is fixed at {b} bits with groups of {g}")
    return {"group_size": group_size, "bits": bits, "mode": mode}


class ShardWriter:
    """Writes tensors into {prefix}-XXXXX-of-YYYYY.safetensors files as they
    come, then the index; keeps at most one shard in memory. `rename` maps
    a module-path name to its name on disk; `head_apart` sends the head's
    tensors to shards of their own, `mtp.safetensors` or
    `mtp-XXXXX-of-YYYYY.safetensors` (which our loaders read, mlx-lm's glob
    does not), listed in the same index."""

    def __init__(self, path: Path, max_bytes: int = SHARD_BYTES, rename: Optional[Callable[[str], str]] = None,
                 head_apart: bool = False, prefix: str = "model"):
        self.path, self.max_bytes, self.prefix = Path(path), max_bytes, prefix
        self.rename = rename or (lambda name: name)
        self.head = ShardWriter(path, max_bytes, prefix=HEAD_SIDE_FILE.split(".")[0]) if head_apart else None
        self.path.mkdir(parents=True, exist_ok=True)
        self.pending: Dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.files: list = []
        self.weight_map: Dict[str, int] = {}
        self.total = 0

    def add(self, name: str, value: mx.array) -> None:
        if self.head is not None and is_head(name):
            self.head.add(self.rename(name), value)
            return
        name = self.rename(name)
        mx.eval(value)
        if self.pending and self.pending_bytes + value.nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = value
        self.pending_bytes += value.nbytes
        self.total += value.nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        i = len(self.files)
        tmp = self.path / f"{self.prefix}-shard-{i:05d}.safetensors"
        mx.save_safetensors(str(tmp), self.pending, metadata={"format": "mlx"})
        self.files.append(tmp)
        for k in self.pending:
            self.weight_map[k] = i
        self.pending, self.pending_bytes = {}, 0

    def _finish(self) -> Dict[str, str]:
        """Write what is pending, give the shards their final names; returns
        the weight map."""
        self.flush()
        n, p = len(self.files), self.prefix
        names = [f"{p}.safetensors"] if n == 1 else [f"{p}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for tmp, name in zip(self.files, names):
            tmp.rename(self.path / name)
        return {k: names[i] for k, i in self.weight_map.items()}

    def close(self) -> None:
        weight_map, total = self._finish(), self.total
        if self.head is not None:
            weight_map.update(self.head._finish())
            total += self.head.total
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        with open(self.path / "model.safetensors.index.json", "w") as f:
            json.dump(index, f, indent=4)


def _build_lazy(config: Dict[str, Any]) -> nn.Module:
    from .safetensors import checked_model_classes

    model_class, args_class = checked_model_classes(config)
    return model_class(args_class.from_dict(copy.deepcopy(config)))


def mlx_lm_drops_head(config: Dict[str, Any], head: Dict[str, Tuple[int, ...]]) -> bool:
    """Whether plain mlx-lm's own `sanitize` for this config throws away the
    head tensors `head` (stored name -> shape), so they may sit in the
    shards `mlx_lm.load` reads. Asked of mlx-lm itself, on placeholders
    never computed, since its families differ: Qwen3.5 drops `mtp.*` always,
    GLM drops layer `num_hidden_layers`, DeepSeek-V3 only `model.layers.61`
    (its real depth), Qwen3-Next only while it stacks raw per-expert tensors."""
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
        kept = model_class(args_class.from_dict(copy.deepcopy(config))).sanitize(
            {name: mx.zeros(shape, mx.float16) for name, shape in head.items()})
    except Exception:  # mlx-lm lacks the family or chokes on a head alone: keep the head out of its sight
        return False
    return not any(name in kept for name in head)


def keeps_head_apart(config: Dict[str, Any], model: nn.Module) -> bool:
    """Whether the head must go to files of its own beside the shards
    (mlx-lm would keep it in the shards and refuse them), so `mlx_lm.load`
    keeps loading the trunk."""
    from mlx.utils import tree_flatten

    if "mtp" not in model:
        return False
    rename = head_namer(config)
    head = {rename(f"mtp.{k}"): tuple(v.shape) for k, v in tree_flatten(model.mtp.parameters())}
    return not mlx_lm_drops_head(config, head)


def head_namer(config: Dict[str, Any]) -> Callable[[str], str]:
    """Module-path tensor name -> the name mlx-mtp stores it under: the
    head's tensors as the family stores its head (`mtp.layers.0.enorm.weight`
    -> `model.layers.46.enorm.weight` for GLM), everything else as it is.
    mlx-lm's own `sanitize` drops exactly those names (the nextn layer,
    `model.mtp_layers.*`, `mtp.*`), so plain `mlx_lm.load` still loads the
    trunk of what convert and graft write."""
    from ..models.registry import head_layout

    layout = head_layout(config)
    if layout is None:
        return lambda name: name
    return lambda name: layout.stored_key(name) if is_head(name) else name


def is_head(path: str) -> bool:
    """Whether a module path is the MTP head's. Every family's sanitize puts
    its head (`mtp.*`, `model.layers.L.*`, `model.mtp_layers.K.*` on disk)
    under our module `mtp`, so the plan needs no per-family names."""
    return path.startswith("mtp.")


class Plan:
    """Decides, per module, how a weight is stored in the output."""

    def __init__(self, model: nn.Module, trunk: Optional[Dict[str, Any]], head: Union[Dict[str, Any], str, None],
                 dtype: Optional[mx.Dtype], head_dtype: Optional[mx.Dtype]):
        self.modules = dict(model.named_modules())
        self.trunk, self.head = trunk, head
        self.dtype, self.head_dtype = dtype, head_dtype
        self.model_predicate = getattr(model, "quant_predicate", None)
        self.cast_predicate = getattr(model, "cast_predicate", None) or (lambda p: True)
        self.quantization: Dict[str, Any] = {}

    def target(self, path: str) -> Union[Dict[str, Any], bool, None]:
        """Quantization params for module `path`, False (float), None (not a matrix we touch)."""
        module = self.modules.get(path)
        if module is None or not hasattr(module, "to_quantized"):
            return None
        if is_head(path) and self.head is not None:
            params = self.head
        else:
            params = self.trunk
            if params and self.model_predicate is not None:
                p = self.model_predicate(path, module)
                # mlx-lm's predicates leave the mode out (Qwen3.5-MoE routers:
                # 8 bits, group 64); to_quantized then means affine.
                params = {"mode": "affine", **p} if isinstance(p, dict) else params if p else False
        if not params or params == "float":
            return False
        if module.weight.shape[-1] % params["group_size"]:
            return False
        return dict(params)

    def float_dtype(self, name: str) -> Optional[mx.Dtype]:
        if not self.cast_predicate(name):
            return None
        if is_head(name) and self.head_dtype is not None:
            return self.head_dtype
        return self.dtype


def _cast_checked(name: str, value: mx.array, dtype: mx.Dtype) -> mx.array:
    """`value` as `dtype`; a finite tensor that a narrower type turns into
    Inf (float16 tops out at 65504; bfloat16 weights may not) is refused in
    one line rather than written as silent garbage."""
    cast = value.astype(dtype)
    if dtype == mx.float16 and value.dtype != mx.float16 and bool(mx.any(mx.isinf(cast)).item()):
        peak = float(mx.max(mx.abs(value.astype(mx.float32))).item())
        raise CheckpointError(f"{name} does not fit float16 (largest magnitude {peak:.4g} > 65504): "
                              "convert with --dtype bfloat16 or float32")
    return cast


def _quantize(w: mx.array, params: Dict[str, Any], dtype: Optional[mx.Dtype]) -> Dict[str, mx.array]:
    if dtype is not None and params["mode"] == "affine":
        w = w.astype(dtype)
    elif not mx.issubdtype(w.dtype, mx.floating):
        w = w.astype(mx.float32)
    out = mx.quantize(w, group_size=params["group_size"], bits=params["bits"], mode=params["mode"])
    result = {"weight": out[0], "scales": out[1]}
    if len(out) > 2 and out[2] is not None:
        result["biases"] = out[2]
    return result


def _module_groups(weights: Dict[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Group `x.weight`, `x.scales`, `x.biases`, `x.bias` under module path x.
    Takes the arrays out of `weights` and hands each group over once: an
    array read from disk (or dequantized) stays in memory only while
    something refers to it, so after its shard is written it is gone."""
    groups: Dict[str, Dict[str, Any]] = {}
    for name in list(weights):
        path, _, leaf = name.rpartition(".")
        groups.setdefault(path, {})[leaf] = weights.pop(name)
    for path in list(groups):
        yield path, groups.pop(path)


def write_weights(out: Path, tensors: Iterator[Tuple[str, Dict[str, Any]]], plan: Plan, total: int,
                  progress: bool = True, max_shard_bytes: int = SHARD_BYTES, source: str = "the source",
                  rename: Optional[Callable[[str], str]] = None, head_apart: bool = False) -> int:
    """Stream (module path, {leaf: array | QuantTensor-like}) through `plan` into shards,
    each tensor stored as `rename(name)` (default: its module path), the
    head's in shards of their own with `head_apart` (`ShardWriter`).
    Every source array is checked for NaN / Inf first; after a bad one the
    rest is only scanned (to name them all), and CheckpointError follows."""
    from tqdm.auto import tqdm

    from .tensors import NonFinite

    writer = ShardWriter(out, max_shard_bytes, rename, head_apart)
    scan = NonFinite()
    count = 0
    for path, leaves in tqdm(tensors, total=total, desc="converting", unit="tensor", disable=not progress):
        finite = [scan.check(f"{path}.{leaf}" if path else leaf, v)
                  for leaf, v in leaves.items() if isinstance(v, mx.array)]
        if not all(finite) or scan.bad:
            continue
        target = plan.target(path)
        already = "scales" in leaves
        to_float = target is False and is_head(path) and plan.head == "float"
        if already and (target is None or (target is False and not to_float) or target == leaves.get("_params")):
            # keep the stored quantization (GGUF repacks, MLX quants)
            params = leaves.pop("_params")
            leaves.pop("_deq", None)
            for leaf, v in leaves.items():
                if leaf in ("scales", "biases") and v.dtype != mx.uint8 and plan.float_dtype(f"{path}.{leaf}") is not None:
                    dt = plan.float_dtype(f"{path}.{leaf}")
                    v = v.astype(dt)
                writer.add(f"{path}.{leaf}", v)
            plan.quantization[path] = params
            count += 1
            continue
        leaves.pop("_params", None)
        if already:  # requantize from the dequantized values
            p = leaves.pop("_deq")
            leaves = {k: v for k, v in leaves.items() if k not in ("scales", "biases")}
            leaves["weight"] = p()
        else:
            leaves.pop("_deq", None)
        if target:
            dt = plan.head_dtype if is_head(path) and plan.head_dtype is not None else plan.dtype
            for leaf, v in _quantize(leaves.pop("weight"), target, dt).items():
                writer.add(f"{path}.{leaf}", v)
            plan.quantization[path] = target
        elif target is False and is_head(path) and "weight" in leaves:
            # Only a group with the module's weight decides how it is stored: a
            # source may stream a module's bias apart from its (quantized)
            # weight, and that must not mark the module float.
            plan.quantization[path] = False
        for leaf, v in leaves.items():
            name = f"{path}.{leaf}" if path else leaf
            dt = plan.float_dtype(name)
            if dt is not None and mx.issubdtype(v.dtype, mx.floating):
                v = _cast_checked(name, v, dt)
            writer.add(name, v)
        count += 1
    error = scan.error(source)
    if error:
        raise error
    writer.close()
    return count


def _source_tensors_hf(path: Path, model: nn.Module, config: Dict[str, Any]) -> Dict[str, Any]:
    """All weights of an HF / MLX / FP8 safetensors checkpoint, lazily,
    sanitized into our module layout (norm shift, conv1d, experts as mlx-lm
    does) and checked to fit the model."""
    from ..models.registry import head_layout
    from .safetensors import offer_side_head, read_side_head
    from .tensors import read_weights

    # A head in its own file beside the trunk (mtp.safetensors), whatever the
    # family: sanitize turns it, like one in the shards, into `mtp.*`.
    weights = offer_side_head(model, read_weights(path, config), read_side_head(path, config), head_layout(config))
    weights = model.sanitize(weights)
    _check_fits(model, weights, path)
    return weights


def _check_fits(model: nn.Module, weights: Dict[str, Any], path: Path) -> None:
    """Refuse tensors the model has no place for, and missing or mis-shaped
    ones: the output would not load (a layout we do not know, a damaged
    checkpoint)."""
    from mlx.utils import tree_flatten

    from ..models.base import architecture
    from .tensors import name_list

    expected = {name: tuple(v.shape) for name, v in tree_flatten(model.parameters())}
    quantized = {n.rpartition(".")[0] for n in weights if n.endswith(".scales")}

    def known(name: str) -> bool:
        base, _, leaf = name.rpartition(".")
        return name in expected or (base in quantized and leaf in ("scales", "biases"))

    problems = [
        ("tensors the model has no place for", sorted(n for n in weights if not known(n))),
        ("tensors the config needs are missing", sorted(n for n in expected if n not in weights)),
        ("tensors have the wrong shape", sorted(n for n, v in weights.items() if n in expected
                                                 and n.rpartition(".")[0] not in quantized
                                                 and tuple(v.shape) != expected[n])),
    ]
    for what, names in problems:
        if names:
            raise CheckpointError(f"{path}: {len(names)} {what} ({architecture(model)}): {name_list(names)}")


def _removes_partial_output(convert_fn: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    """A failed or interrupted conversion leaves nothing behind: what it
    wrote into a new (or empty) output directory is removed again. A
    directory that held anything is refused before writing, never touched."""

    @functools.wraps(convert_fn)
    def wrapper(src: Union[str, Path], out: Union[str, Path], **kwargs: Any) -> Dict[str, Any]:
        out = Path(out)
        existed = out.exists()
        fresh = not existed or (out.is_dir() and not any(out.iterdir()))
        try:
            return convert_fn(src, out, **kwargs)
        except BaseException:
            if fresh and out.is_dir():
                if not existed:
                    shutil.rmtree(out, ignore_errors=True)
                else:  # it was empty: everything in it is ours
                    for child in out.iterdir():
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            raise

    return wrapper


@_removes_partial_output
def convert(
    src: Union[str, Path],
    out: Union[str, Path],
    *,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    mode: Optional[str] = None,
    mtp_bits: Optional[int] = None,
    mtp_dtype: Optional[str] = None,
    dtype: Optional[str] = None,
    progress: bool = True,
    max_shard_bytes: int = SHARD_BYTES,
) -> Dict[str, Any]:
    """Convert `src` (HF repo / directory, MLX directory or GGUF file) into an
    MLX checkpoint at `out`. Returns the written config.

    bits / group_size / mode quantize the trunk (nothing given: keep floats
    and any stored quantization, GGUF repacks included). The head follows
    mtp_bits (quantized, affine) or mtp_dtype (kept in float); by default a
    head inside a trunk quantized below 8 bits stays at 8 bits."""
    from .assistant import BUNDLED_ASSISTANT_DIR
    from .gguf import QuantTensor, is_gguf, read_gguf, to_mx
    from .hub import resolve_model_path

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"{out} exists and is not empty")
    trunk = quant_params(mode or "affine", bits, group_size) if (bits or mode or group_size) else None
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use {', '.join(DTYPES)})")
    if mtp_dtype is not None and mtp_dtype not in DTYPES:
        raise ValueError(f"unknown mtp dtype {mtp_dtype!r} (use {', '.join(DTYPES)})")
    if mtp_bits is not None and mtp_dtype is not None:
        raise ValueError("give either mtp_bits or mtp_dtype, not both")
    head: Union[Dict[str, Any], str, None] = None
    if mtp_bits is not None:
        head = quant_params("affine", mtp_bits, group_size if trunk and trunk["mode"] == "affine" else 64)
    elif mtp_dtype is not None:
        head = "float"
    elif trunk is not None and trunk["bits"] < 8:
        head = quant_params("affine", 8, 64)

    src_str = str(src)
    tokenizer_source: Optional[Path] = None
    if is_gguf(src_str):
        ckpt = read_gguf(src_str)
        config = copy.deepcopy(ckpt.config)
        model = _build_lazy(config)
        groups = _gguf_groups(ckpt, QuantTensor, to_mx)
        total = len(ckpt.tensor_names())
    else:
        path = resolve_model_path(src_str)
        if out.resolve().is_relative_to(path.resolve()):
            # A checkpoint written inside its source would be read as part of it next time.
            raise CheckpointError(f"{out} is inside the source {path}: write the conversion elsewhere")
        tokenizer_source = path
        config = read_config(path)
        model = _build_lazy(config)
        assistant = _checked_assistant(path)
        weights = _source_tensors_hf(path, model, config)
        stored_q = config.get("quantization") or {}
        groups = _hf_groups(weights, stored_q, model)
        total = len({k.rpartition(".")[0] for k in weights})
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        (config.get("text_config") or {}).pop("quantization_config", None)  # FP8 repos may nest it
    plan = Plan(model, trunk, head, DTYPES.get(dtype) if dtype else None, DTYPES.get(mtp_dtype) if mtp_dtype else None)
    write_weights(out, groups, plan, total, progress=progress, max_shard_bytes=max_shard_bytes, source=src_str,
                  rename=head_namer(config), head_apart=keeps_head_apart(config, model))

    if plan.quantization:
        defaults = trunk or _most_common(plan.quantization)
        q = dict(defaults)
        q.update({k: v for k, v in sorted(plan.quantization.items())})
        config["quantization"] = q
    if dtype:
        config["torch_dtype"] = dtype
    from mlx_lm.utils import save_config

    save_config(config, out / "config.json")
    if tokenizer_source is not None:
        for pattern in TOKENIZER_GLOBS:
            for f in glob.glob(str(tokenizer_source / pattern)):
                shutil.copy(f, out)
        if assistant is not None:
            shutil.copytree(assistant, out / BUNDLED_ASSISTANT_DIR)
    else:
        from .gguf import build_tokenizer

        hf, _ = build_tokenizer(ckpt.meta)
        hf.save_pretrained(str(out))
    with open(out / "config.json") as f:
        return json.load(f)


def _checked_assistant(model_dir: Path) -> Optional[Path]:
    """The `assistant/` drafter shipped inside `model_dir`, checked like the
    target's tensors (complete files, known dtypes, no NaN / Inf); None if
    there is none. It is copied as it is: see docs/quantization.md."""
    from .assistant import bundled_assistant
    from .tensors import verify

    path = bundled_assistant(model_dir)
    if path is not None:
        verify(path, read_config(path))
    return path


def _most_common(layers: Dict[str, Any]) -> Dict[str, Any]:
    from .gguf import quantization_config

    dicts = {k: v for k, v in layers.items() if isinstance(v, dict)}
    if not dicts:
        return {"group_size": 64, "bits": 8, "mode": "affine"}
    q = quantization_config(dicts)
    return {k: q[k] for k in ("group_size", "bits", "mode")}


def _gguf_groups(ckpt, QuantTensor, to_mx) -> Iterator[Tuple[str, Dict[str, Any]]]:
    for name, value, _ in ckpt.tensors():
        path, _, leaf = name.rpartition(".")
        if isinstance(value, QuantTensor):
            arrays = value.arrays(path)
            leaves: Dict[str, Any] = {k.rpartition(".")[2]: v for k, v in arrays.items()}
            leaves["_params"] = value.params
            leaves["_deq"] = lambda v=value: mx.array(v.dequantize())
            yield path, leaves
        else:
            yield path, {leaf: to_mx(value)}


def _hf_groups(weights: Dict[str, mx.array], stored_q: Dict[str, Any], model: nn.Module):
    from mlx_lm.utils import infer_quant_config

    modules = dict(model.named_modules())
    for path, leaves in _module_groups(weights):
        if "scales" in leaves:
            params = stored_q.get(path)
            if not isinstance(params, dict):
                params = infer_quant_config(path, modules[path], {f"{path}.{k}": v for k, v in leaves.items()})
            params = {"group_size": params["group_size"], "bits": params["bits"], "mode": params.get("mode", "affine")}
            leaves["_params"] = params
            leaves["_deq"] = lambda lv=dict(leaves), p=params: mx.dequantize(
                lv["weight"], lv["scales"], lv.get("biases"), group_size=p["group_size"], bits=p["bits"], mode=p["mode"])
        yield path, leaves
