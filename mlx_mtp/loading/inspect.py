"""`mlx-mtp inspect`: what a checkpoint holds and whether it can draft.

Reads headers (safetensors) or tensor infos (GGUF) and only the small norm
tensors, never the whole model, unless asked to `verify` every tensor.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..models.heads import HeadLayout
from ..models.registry import head_layout
from .assistant import ASSISTANT_MODEL_TYPE
from .safetensors import CheckpointError

#: `loader` of a checkpoint our own model classes (models/registry.py) load.
OUR_LOADER = "mlx-mtp"
#: One tensor per expert, as raw HF MoE checkpoints store them (mlx-lm stacks them).
_PER_EXPERT = re.compile(r"\.experts\.\d+\.")
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "U8": 1, "I64": 8, "I32": 4, "F64": 8, "F8_E4M3": 1}


def _component(name: str, layout: Optional[HeadLayout] = None) -> str:
    """The part of the model a stored tensor belongs to. `layout` says which
    names are the head's (`model.layers.46.*` is GLM's head, not a layer);
    GGUF names its nextn tensors `.nextn.`."""
    if (layout is not None and layout.is_head(name)) or name.startswith("mtp.") or ".nextn." in name:
        return "mtp head"
    if "embed_tokens" in name or name.startswith("token_embd"):
        return "embeddings"
    if "lm_head" in name or name.startswith("output."):
        return "lm head"
    if "visual" in name or "vision" in name:
        return "vision"
    if re.search(r"(linear_attn|ssm_|attn_qkv|attn_gate)", name):
        return "linear attention"
    if re.search(r"(self_attn|attn_)", name):
        return "attention"
    if re.search(r"(mlp|ffn_)", name):
        return "mlp"
    return "other"


def inspect_path(path: str, drafter: Optional[str] = None, verify: bool = False) -> Dict[str, Any]:
    """A report dict: kind, architecture, context_length, parameters,
    quantization per component, drafter, compatibility, memory_bytes,
    warnings. `verify` also reads every tensor (convert's NaN / Inf check)
    and adds `verified`, the number of tensors checked; CheckpointError
    names the bad ones."""
    from .gguf import is_gguf

    if is_gguf(path):
        if verify:
            raise CheckpointError("--verify reads safetensors checkpoints; a GGUF file is checked when it is loaded")
        report = _inspect_gguf(Path(path))
    else:
        from .hub import resolve_model_path

        resolved = resolve_model_path(path)
        report = _inspect_dir(resolved)
        if verify:
            report["verified"] = _verify_dir(resolved)
    report["compatibility"] = _compatibility(report, drafter)
    return report


def _verify_dir(path: Path) -> int:
    """Read every tensor of the model and of its bundled assistant once."""
    from .assistant import bundled_assistant
    from .safetensors import read_config
    from .tensors import verify

    count = verify(path, read_config(path))
    assistant = bundled_assistant(path)
    if assistant is not None:
        count += verify(assistant, read_config(assistant))
    return count


def _inspect_dir(path: Path) -> Dict[str, Any]:
    from .fp8 import is_fp8
    from .safetensors import read_config, side_head_files
    from .tensors import read_header as safetensors_header  # refuses truncated files in one line

    config = read_config(path)
    loader = _loader(config)
    q = config.get("quantization") or {}
    fp8_label = _fp8_label(config) if is_fp8(config) else None
    tensors: Dict[str, Tuple[str, List[int], str]] = {}
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"no model*.safetensors files in {path}")
    layout = head_layout(config)  # None: no built-in head (Gemma 4, mlx-lm's architectures)
    side = side_head_files(path, config)  # a head beside the trunk (mtp.safetensors): head tensors only
    for f in files + side:
        for k, info in safetensors_header(f).items():
            if f not in side or layout.is_head(k):
                tensors[k] = (info["dtype"], info["shape"], str(f.relative_to(path)))
    memory = sum(int(np.prod(s)) * _DTYPE_BYTES.get(d, 2) for d, s, _ in tensors.values())
    params = 0
    quant: Dict[str, set] = defaultdict(set)
    for k, (dt, shape, _) in tensors.items():
        base = k.rsplit(".", 1)[0]
        comp = _component(k, layout)
        if k.endswith((".scales", ".biases", "_scale_inv", "activation_scale")):
            continue
        if dt == "F8_E4M3" and fp8_label:
            params += int(np.prod(shape))
            quant[comp].add(fp8_label)
        elif f"{base}.scales" in tensors and k.endswith(".weight"):
            module = _module_path(base, layout)
            p = q.get(module) if isinstance(q.get(module), dict) else q
            bits, gs, mode = p.get("bits", 4), p.get("group_size", 64), p.get("mode", "affine")
            params += int(np.prod(shape[:-1])) * shape[-1] * 32 // bits
            quant[comp].add(f"{bits}-bit {mode} g{gs}")
        else:
            params += int(np.prod(shape))
            if len(shape) >= 2:
                quant[comp].add(dt.lower())
    head_keys = [k for k in tensors if layout is not None and layout.is_head(k)]
    declared = layout.declared_layers if layout is not None else 0
    # Qwen3.5's raw HF trunk stores conv1d as [C, 1, K] and its norms
    # zero-centred; other families (GLM, DeepSeek) shift no norms, and show
    # a raw HF checkpoint by its per-expert tensors (mlx-lm stacks them).
    raw = any("conv1d.weight" in k and s[-1] != 1 for k, (_, s, _) in tensors.items())
    hf = raw or (not q and any(_PER_EXPERT.search(k) for k in tensors))
    warnings: List[str] = []
    if layout is not None:
        warnings += _head_warnings(layout, config, head_keys, path)
    missing = _missing_tensors(config, tensors) if loader == OUR_LOADER else []
    warnings += _missing_warnings(missing, head_keys, path, layout)
    warnings += _norm_warnings(path, tensors, raw)
    warnings += _tokenizer_warnings(path, config)
    bundled = None if head_keys else _bundled_drafter(path, config)  # what --drafter auto picks then
    if bundled and bundled["problem"]:
        warnings.append(f"the bundled assistant/ cannot draft for this model: {bundled['problem']}")
    return {
        "path": str(path),
        "kind": "mlx" if q or not hf else "hf",
        "architecture": config.get("model_type"),
        "context_length": _context_length(config),
        "loader": loader,
        "missing_tensors": missing,
        "layout": "raw HF (norms zero-centred)" if raw else "raw HF" if hf else "mlx-lm (sanitized)",
        "parameters": params,
        "quantization": {k: sorted(v) for k, v in sorted(quant.items())},
        "drafter": bundled or {
            "present": bool(head_keys) and bool(declared) and not any(k.startswith("mtp.") for k in missing),
            "kind": "mtp" if head_keys else None, "declared_layers": declared, "tensors": len(head_keys),
            "files": sorted({tensors[k][2] for k in head_keys})},
        "memory_bytes": memory,
        "warnings": warnings,
    }


def _module_path(base: str, layout: Optional[HeadLayout]) -> str:
    """A stored module's path in our model, which per-layer quantization
    overrides are keyed by: a head stored under its family's names
    (`model.layers.46.eh_proj`) is `mtp.layers.0.eh_proj` there."""
    local = layout.local_key(f"{base}.weight") if layout is not None else None
    return f"mtp.{local[: -len('.weight')]}" if local is not None else base


def _loader(config: Dict[str, Any]) -> str:
    """Which classes load this checkpoint: ours, an assistant's, or mlx-lm's
    own (loading/mlx_lm_fallback.py). A model_type neither knows ends
    inspect with the error generate gives."""
    from ..models.registry import ARCHITECTURES
    from .mlx_lm_fallback import is_ours, mlx_lm_module

    if config.get("model_type") == ASSISTANT_MODEL_TYPE:
        return ASSISTANT_MODEL_TYPE
    if is_ours(config):
        return OUR_LOADER
    module = mlx_lm_module(config)
    if module is None:  # generate's words (load_mlx_lm_target)
        raise CheckpointError(f"model type {config.get('model_type')!r} is supported neither by mlx-mtp (supported: "
                              f"{', '.join(sorted(ARCHITECTURES))}) nor by this mlx-lm")
    return f"mlx-lm ({module})"


def _context_length(config: Dict[str, Any]) -> Optional[int]:
    n = config.get("text_config", config).get("max_position_embeddings")
    return int(n) if n else None


def _fp8_label(config: Dict[str, Any]) -> str:
    from .fp8 import fp8_block

    block = fp8_block(config)
    return f"fp8 e4m3 {block[0]}x{block[1]} blocks" if block else "fp8 e4m3 per tensor"


def _missing_tensors(config: Dict[str, Any], tensors: Dict[str, Tuple[str, List[int], str]]) -> List[str]:
    """Parameters loading will find missing, worked out without reading any
    data: the model's own `sanitize` renames placeholder arrays of the
    stored shapes (lazy zeros, never computed) into its layout."""
    import copy

    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .safetensors import checked_model_classes

    model_class, args_class = checked_model_classes(config)
    try:
        model = model_class(args_class.from_dict(copy.deepcopy(config)))
        stored = model.sanitize({k: mx.zeros(shape, mx.float16) for k, (_, shape, _) in tensors.items()})
    except (ValueError, KeyError, TypeError, IndexError):
        return []  # a config or layout only the real data can settle: loading will say
    return sorted(name for name, _ in tree_flatten(model.parameters()) if name not in stored)


def _head_warnings(layout: HeadLayout, config: Dict[str, Any], head_keys: List[str], path: Path) -> List[str]:
    """A declared head with no tensors (stripped), or tensors with none
    declared: each named in the family's own field and tensor names."""
    declared, field = layout.declared_layers, layout.config_field
    if declared and not head_keys:
        return [f"config declares {field}={declared} but the weights have no {layout.stored_name} tensors "
                f"(stripped by a conversion): run `mlx-mtp graft --from <original HF repo> --into {path}`"]
    if head_keys and not declared:
        stored = "mtp.*" if all(k.startswith("mtp.") for k in head_keys) else layout.stored_name
        return [f"{stored} weights are present but the config declares no head: set "
                f"{layout.field_path(config)} to the head's layer count"]
    return []


def _missing_warnings(missing: List[str], head_keys: List[str], path: Path,
                      layout: Optional[HeadLayout] = None) -> List[str]:
    """`missing` are the model's parameter names: the head's are `mtp.*`
    whatever the family stores; the warning also names them as stored."""
    from .tensors import name_list

    head = [k for k in missing if k.startswith("mtp.")]
    trunk = [k for k in missing if not k.startswith("mtp.")]
    warnings = []
    if head:
        stored = "mtp.*" if layout is None or all(k.startswith("mtp.") for k in head_keys) else layout.stored_name
        as_stored = [layout.stored_key(k) for k in head] if stored != "mtp.*" else head
        names = name_list(head) + (f"; stored as {name_list(as_stored)}" if as_stored != head else "")
        warnings.append(
            f"the MTP head is incomplete: {len(head_keys)} {stored} tensors are stored but {len(head)} are missing "
            f"({names}), so loading fails with every --drafter (the weights do not match the config). "
            f"Fix: convert the original checkpoint again, or `mlx-mtp graft --from <original HF repo> --into {path} "
            "--force`"
        )
    if trunk:
        warnings.append(f"{len(trunk)} tensors the config needs are missing ({name_list(trunk)}): loading fails")
    return warnings


def _bundled_drafter(path: Path, config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The `assistant/` a model ships with, which `--drafter auto` drafts with."""
    from .assistant import BUNDLED_ASSISTANT_DIR, bundled_assistant
    from .safetensors import read_config
    from .tensors import read_header

    assistant = bundled_assistant(path)
    if assistant is None:
        return None
    files = sorted(assistant.glob("model*.safetensors"))
    assistant_config = read_config(assistant)
    return {"present": True, "kind": "gemma4-assistant", "bundled": True,
            "declared_layers": _layers(assistant_config), "tensors": sum(len(read_header(f)) for f in files),
            "files": [f"{BUNDLED_ASSISTANT_DIR}/{f.name}" for f in files],
            "problem": _assistant_problem(assistant_config, config)}


def _layers(config: Dict[str, Any]) -> int:
    return int((config.get("text_config") or config).get("num_hidden_layers", 0) or 0)


def _assistant_problem(assistant: Dict[str, Any], target: Dict[str, Any]) -> Optional[str]:
    """What the configs alone show against pairing (the full check runs at load)."""
    text = target.get("text_config", target)
    want, have = assistant.get("backbone_hidden_size"), text.get("hidden_size")
    if want and have and int(want) != int(have):
        return f"the assistant was trained for hidden size {want} but the target's is {have}"
    a_vocab, t_vocab = (assistant.get("text_config") or {}).get("vocab_size"), text.get("vocab_size")
    if a_vocab and t_vocab and int(a_vocab) != int(t_vocab):
        return f"vocabularies differ: assistant {a_vocab}, target {t_vocab}"
    return None


def _norm_means(path: Path, tensors: Dict[str, Tuple[str, List[int], str]]) -> Dict[str, float]:
    import mlx.core as mx

    keys = [k for k, (_, s, _) in tensors.items()
            if len(s) == 1 and k.endswith(("layernorm.weight", "pre_fc_norm_hidden.weight"))]
    out = {}
    by_file = defaultdict(list)
    for k in keys[:16]:
        by_file[tensors[k][2]].append(k)
    for fname, ks in by_file.items():
        try:
            arrays = mx.load(str(path / fname))
            for k in ks:
                out[k] = float(mx.mean(arrays[k].astype(mx.float32)).item())
        except RuntimeError as e:  # damage the header check cannot see
            raise CheckpointError(f"{path / fname}: cannot read (corrupt or truncated?): {e}") from e
    return out


def _norm_warnings(path: Path, tensors, raw: bool) -> List[str]:
    means = _norm_means(path, tensors)
    if not means:
        return []
    centred_at_one = [k for k, m in means.items() if m > 0.5]
    centred_at_zero = [k for k, m in means.items() if abs(m) < 0.25]
    if raw and len(centred_at_one) > len(means) // 2:
        return [
            "the checkpoint is in raw HF layout (unsanitized conv1d), so loaders add +1 to every norm, but its "
            f"norm weights are already centred near 1 (e.g. {centred_at_one[0]}): they would be shifted twice. "
            "Fix: re-export it in mlx-lm layout (conv1d as [C, K, 1]) or subtract 1 from the norms"
        ]
    if not raw and len(centred_at_zero) > len(means) // 2:
        return [
            "the checkpoint is in mlx-lm layout (norms used as stored) but its norm weights are centred near 0 "
            f"(e.g. {centred_at_zero[0]}): the +1 offset was never applied. Fix: convert the original HF "
            "checkpoint with `mlx-mtp convert`"
        ]
    return []


def _tokenizer_warnings(path: Path, config: Dict[str, Any]) -> List[str]:
    vocab = config.get("text_config", config).get("vocab_size")
    tok = path / "tokenizer.json"
    if not tok.exists():
        return [] if any(path.glob("tokenizer.model")) else [
            "no tokenizer files: copy tokenizer.json / tokenizer_config.json from the original repo"]
    try:
        spec = json.loads(tok.read_text())
    except json.JSONDecodeError:
        return ["tokenizer.json is not valid JSON"]
    ids = list((spec.get("model", {}).get("vocab") or {}).values()) + [a["id"] for a in spec.get("added_tokens", [])]
    if vocab and ids and max(ids) >= vocab:
        return [f"the tokenizer has ids up to {max(ids)} but the model's vocab_size is {vocab}: tokens past "
                "the embedding would crash or read garbage. Fix: use the tokenizer from the model's own repo"]
    return []


def _inspect_gguf(path: Path) -> Dict[str, Any]:
    from .gguf import SUPPORTED_ARCHS, metadata, mtp_only_layout, open_gguf
    from .gguf.mtp_split import USE_AS_DRAFTER

    reader = open_gguf(path)
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    params, memory = 0, 0
    quant: Dict[str, set] = defaultdict(set)
    head = []
    for t in reader.tensors:
        params += int(t.n_elements)
        memory += int(t.n_bytes)
        comp = _component(t.name)
        n_mtp = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
        m = re.match(r"^blk\.(\d+)\.", t.name)
        if m and n_mtp and int(m.group(1)) >= int(meta.get(f"{arch}.block_count", 0)) - n_mtp:
            comp = "mtp head"
            head.append(t.name)
        if len(t.shape) >= 2:
            quant[comp].add(t.tensor_type.name)
    declared = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    warnings = []
    if arch not in SUPPORTED_ARCHS:
        warnings.append(f"GGUF architecture {arch!r} cannot be loaded by mlx-mtp (supported: {', '.join(SUPPORTED_ARCHS)})")
    if declared and not head:
        warnings.append(f"{arch}.nextn_predict_layers={declared} but no MTP tensors are in the file: "
                        "convert the original HF checkpoint with its head, or graft it after `mlx-mtp convert`")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is not None and tokens and len(tokens) > int(emb.shape[1]):
        warnings.append(f"the tokenizer has {len(tokens)} tokens but the embedding has {int(emb.shape[1])} rows")
    split = mtp_only_layout(meta, [t.name for t in reader.tensors])  # llama.cpp's mtp-*.gguf
    if split:
        warnings.append(f"this is a {split}, not a model: {USE_AS_DRAFTER}")
    return {
        "path": str(path),
        "kind": "gguf",
        "architecture": arch,
        "context_length": int(meta.get(f"{arch}.context_length", 0) or 0) or None,
        "layout": split or _gguf_layout(str(arch)),
        "drafter_only": bool(split),
        "parameters": params,
        "quantization": {k: sorted(v) for k, v in sorted(quant.items())},
        "drafter": {"present": bool(head), "kind": "mtp" if head else None, "declared_layers": declared,
                    "tensors": len(head)},
        "memory_bytes": memory,
        "warnings": warnings,
    }


def _gguf_layout(arch: str) -> str:
    """How a GGUF stores its norms, which is what differs between archs:
    qwen35's converter adds the +1 of its zero-centred norms, gemma4's keeps
    HF's values, and glm4moe / deepseek2 use plain RMSNorm (nothing to shift)."""
    if arch.startswith("qwen35"):
        return "llama.cpp GGUF (norms already offset)"
    if arch.startswith("gemma4"):
        return "llama.cpp GGUF (norms stored unshifted, as in HF)"
    return "llama.cpp GGUF"


def _compatibility(report: Dict[str, Any], drafter: Optional[str]) -> Optional[Dict[str, Any]]:
    if drafter is None:
        return None
    if report.get("drafter_only"):
        from .gguf.mtp_split import USE_AS_DRAFTER

        return {"drafter": drafter, "ok": False, "reason": f"an MTP-only drafter file is not a model: {USE_AS_DRAFTER}"}
    if report.get("missing_tensors"):  # strict loading refuses the checkpoint whatever the drafter
        return {"drafter": drafter, "ok": False,
                "reason": f"the checkpoint does not load: {len(report['missing_tensors'])} tensors are missing"}
    present = report["drafter"]["present"]
    if drafter == "none":
        return {"drafter": drafter, "ok": True, "reason": "plain decoding"}
    bundled = report["drafter"].get("bundled")
    if drafter == "auto" and bundled:
        problem = report["drafter"]["problem"]
        return {"drafter": drafter, "ok": not problem, "reason": problem or "drafts with the bundled assistant/"}
    if drafter in ("auto", "mtp"):
        if present and not bundled:
            return {"drafter": drafter, "ok": True, "reason": "drafts with the built-in MTP head"}
        return {"drafter": drafter, "ok": drafter == "auto",
                "reason": "no usable MTP head" + ("; auto falls back to plain decoding" if drafter == "auto" else "")}
    from .assistant import ASSISTANT_MODE, LOOKUP_SUFFIX, drafter_problem  # refuses what generate refuses

    problem = drafter_problem(drafter)
    if not problem and (drafter == "ngram" or drafter.endswith(LOOKUP_SUFFIX)):
        return _lookup_compatibility(report, drafter, ASSISTANT_MODE, LOOKUP_SUFFIX)
    if problem:
        return {"drafter": drafter, "ok": False, "reason": problem}
    # a separate drafter model (a Gemma 4 assistant)
    try:
        other = inspect_path(drafter)
    except Exception as e:
        return {"drafter": drafter, "ok": False, "reason": f"cannot read the drafter: {e}"}
    arch = str(other.get("architecture") or "")
    if other.get("drafter_only"):  # a split MTP head (mtp-*.gguf)
        from .gguf.mtp_split import fits_target

        ok = fits_target(arch, str(report.get("architecture", "")))
        return {"drafter": drafter, "ok": ok,
                "reason": f"a {arch} MTP head for a {report.get('architecture')} target" if ok else
                f"a {arch} MTP head needs a {arch} target, not {report.get('architecture')}"}
    if "assistant" not in arch:
        return {"drafter": drafter, "ok": False,
                "reason": f"{drafter} is a {arch or 'unknown'} model, not a drafter (assistant) checkpoint"}
    ok = str(report.get("architecture", "")).startswith("gemma4")
    return {"drafter": drafter, "ok": ok,
            "reason": "a Gemma 4 assistant for a Gemma 4 target" if ok else
            f"a {arch} drafter needs a Gemma 4 target, not {report.get('architecture')}"}


def _lookup_compatibility(report: Dict[str, Any], drafter: str, assistant: str, suffix: str) -> Dict[str, Any]:
    """Prompt lookup (`ngram`, `X+ngram`): needs caches that roll back, and X as for X alone."""
    from .mlx_lm_fallback import rollback_problem_for
    from .safetensors import read_config

    try:
        problem = None if report["kind"] == "gguf" else rollback_problem_for(read_config(Path(report["path"])))
    except Exception as e:  # the model class would not even build from its config
        problem = f"cannot build the model to look at its cache: {e}"
    if problem:
        return {"drafter": drafter, "ok": False, "reason": f"cannot draft with this model: {problem}"}
    if drafter == "ngram":
        return {"drafter": drafter, "ok": True, "reason": "drafts by prompt lookup (no drafter model)"}
    model = drafter[: -len(suffix)]
    if model == assistant and not report["drafter"].get("bundled"):
        return {"drafter": drafter, "ok": False, "reason": f"no bundled {assistant}/ folder to draft with"}
    inner = _compatibility(report, "auto" if model == assistant else model)
    return {"drafter": drafter, "ok": inner["ok"],
            "reason": f"prompt lookup where the text repeats, else: {inner['reason']}"}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**29 else f"{n / 2**20:.1f} MiB"


def _context(n: Optional[int]) -> str:
    return f"{n:,} tokens (max_position_embeddings)" if n else "unknown (the config gives none)"


def format_report(report: Dict[str, Any]) -> str:
    lines = [f"{report['path']}", f"  architecture  {report['architecture']} ({report['kind']}, {report['layout']})",
             *([f"  loader        {report['loader']}"] if report.get("loader", OUR_LOADER) != OUR_LOADER else []),
             f"  context       {_context(report.get('context_length'))}",
             f"  parameters    {report['parameters'] / 1e6:.2f} M",
             f"  memory        {_size(report['memory_bytes'])} (weights as stored; add the KV cache)"]
    d = report["drafter"]
    where = f" from {', '.join(d['files'])}" if d.get("files") else ""
    kind = f"bundled {d['kind']}" if d.get("bundled") else f"{d['kind']} head"
    lines.append("  drafter       " + (f"{kind}, {d['declared_layers']} layer(s), {d['tensors']} tensors{where}"
                                      if d["present"] else "none"))
    if "verified" in report:
        lines.append(f"  verified      {report['verified']} tensors read, no NaN or Inf")
    lines.append("  quantization")
    for comp, kinds in report["quantization"].items():
        lines.append(f"    {comp:<17} {', '.join(kinds)}")
    c = report.get("compatibility")
    if c:
        lines.append(f"  --drafter {c['drafter']}: {'ok' if c['ok'] else 'NOT compatible'} ({c['reason']})")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
