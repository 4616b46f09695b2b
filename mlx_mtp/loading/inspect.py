"""`mlx-mtp inspect`: what a checkpoint holds and whether it can draft.

Reads headers (safetensors) or tensor infos (GGUF) and only the small norm
tensors, never the whole model.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .safetensors import CheckpointError

_MTP_KEY = re.compile(r"^(?:model\.|language_model\.|language_model\.model\.|model\.language_model\.)?mtp\.(.+)$")
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "U8": 1, "I64": 8, "I32": 4, "F64": 8}


def _component(name: str) -> str:
    if _MTP_KEY.match(name) or ".nextn." in name:
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


def _head_layers(config: Dict[str, Any]) -> int:
    text = config.get("text_config", config)
    return int(text.get("mtp_num_hidden_layers", 0) or 0)


def inspect_path(path: str, drafter: Optional[str] = None) -> Dict[str, Any]:
    """A report dict: kind, architecture, parameters, quantization per
    component, drafter, compatibility, memory_bytes, warnings."""
    from .gguf import is_gguf

    if is_gguf(path):
        report = _inspect_gguf(Path(path))
    else:
        from .hub import resolve_model_path

        report = _inspect_dir(resolve_model_path(path))
    report["compatibility"] = _compatibility(report, drafter)
    return report


def _inspect_dir(path: Path) -> Dict[str, Any]:
    from .graft import safetensors_header
    from .safetensors import read_config

    config = read_config(path)
    q = config.get("quantization") or {}
    tensors: Dict[str, Tuple[str, List[int], str]] = {}
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise CheckpointError(f"no model*.safetensors files in {path}")
    for f in files:
        for k, info in safetensors_header(f).items():
            tensors[k] = (info["dtype"], info["shape"], f.name)
    memory = sum(int(np.prod(s)) * _DTYPE_BYTES.get(d, 2) for d, s, _ in tensors.values())
    params = 0
    quant: Dict[str, set] = defaultdict(set)
    for k, (dt, shape, _) in tensors.items():
        base = k.rsplit(".", 1)[0]
        comp = _component(k)
        if k.endswith((".scales", ".biases")):
            continue
        if f"{base}.scales" in tensors and k.endswith(".weight"):
            p = q.get(base) if isinstance(q.get(base), dict) else q
            bits, gs, mode = p.get("bits", 4), p.get("group_size", 64), p.get("mode", "affine")
            params += int(np.prod(shape[:-1])) * shape[-1] * 32 // bits
            quant[comp].add(f"{bits}-bit {mode} g{gs}")
        else:
            params += int(np.prod(shape))
            if len(shape) >= 2:
                quant[comp].add(dt.lower())
    head_keys = [k for k in tensors if _MTP_KEY.match(k)]
    declared = _head_layers(config)
    raw = any("conv1d.weight" in k and s[-1] != 1 for k, (_, s, _) in tensors.items())
    warnings: List[str] = []
    if declared and not head_keys:
        warnings.append(
            f"config declares mtp_num_hidden_layers={declared} but the weights have no mtp.* tensors "
            f"(stripped by a conversion): run `mlx-mtp graft --from <original HF repo> --into {path}`"
        )
    if head_keys and not declared:
        warnings.append("mtp.* weights are present but the config declares no head: set "
                        "text_config.mtp_num_hidden_layers to the head's layer count")
    warnings += _norm_warnings(path, tensors, raw)
    warnings += _tokenizer_warnings(path, config)
    return {
        "path": str(path),
        "kind": "mlx" if q or not raw else "hf",
        "architecture": config.get("model_type"),
        "layout": "raw HF (norms zero-centred)" if raw else "mlx-lm (sanitized)",
        "parameters": params,
        "quantization": {k: sorted(v) for k, v in sorted(quant.items())},
        "drafter": {"present": bool(head_keys) and bool(declared), "kind": "mtp" if head_keys else None,
                    "declared_layers": declared, "tensors": len(head_keys)},
        "memory_bytes": memory,
        "warnings": warnings,
    }


def _norm_means(path: Path, tensors: Dict[str, Tuple[str, List[int], str]]) -> Dict[str, float]:
    import mlx.core as mx

    keys = [k for k, (_, s, _) in tensors.items()
            if len(s) == 1 and k.endswith(("layernorm.weight", "pre_fc_norm_hidden.weight"))]
    out = {}
    by_file = defaultdict(list)
    for k in keys[:16]:
        by_file[tensors[k][2]].append(k)
    for fname, ks in by_file.items():
        arrays = mx.load(str(path / fname))
        for k in ks:
            out[k] = float(mx.mean(arrays[k].astype(mx.float32)).item())
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
    from .gguf import SUPPORTED_ARCHS, metadata, open_gguf

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
    return {
        "path": str(path),
        "kind": "gguf",
        "architecture": arch,
        "layout": ("llama.cpp GGUF (norms stored unshifted, as in HF)" if str(arch).startswith("gemma4")
                   else "llama.cpp GGUF (norms already offset)"),
        "parameters": params,
        "quantization": {k: sorted(v) for k, v in sorted(quant.items())},
        "drafter": {"present": bool(head), "kind": "mtp" if head else None, "declared_layers": declared,
                    "tensors": len(head)},
        "memory_bytes": memory,
        "warnings": warnings,
    }


def _compatibility(report: Dict[str, Any], drafter: Optional[str]) -> Optional[Dict[str, Any]]:
    if drafter is None:
        return None
    present = report["drafter"]["present"]
    if drafter == "none":
        return {"drafter": drafter, "ok": True, "reason": "plain decoding"}
    if drafter in ("auto", "mtp"):
        if present:
            return {"drafter": drafter, "ok": True, "reason": "drafts with the built-in MTP head"}
        return {"drafter": drafter, "ok": drafter == "auto",
                "reason": "no usable MTP head" + ("; auto falls back to plain decoding" if drafter == "auto" else "")}
    # a separate drafter model (a Gemma 4 assistant)
    try:
        other = inspect_path(drafter)
    except Exception as e:
        return {"drafter": drafter, "ok": False, "reason": f"cannot read the drafter: {e}"}
    arch = str(other.get("architecture") or "")
    if "assistant" not in arch:
        return {"drafter": drafter, "ok": False,
                "reason": f"{drafter} is a {arch or 'unknown'} model, not a drafter (assistant) checkpoint"}
    ok = str(report.get("architecture", "")).startswith("gemma4")
    return {"drafter": drafter, "ok": ok,
            "reason": "a Gemma 4 assistant for a Gemma 4 target" if ok else
            f"a {arch} drafter needs a Gemma 4 target, not {report.get('architecture')}"}


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**29 else f"{n / 2**20:.1f} MiB"


def format_report(report: Dict[str, Any]) -> str:
    lines = [f"{report['path']}", f"  architecture  {report['architecture']} ({report['kind']}, {report['layout']})",
             f"  parameters    {report['parameters'] / 1e6:.2f} M",
             f"  memory        {_size(report['memory_bytes'])} (weights as stored; add the KV cache)"]
    d = report["drafter"]
    lines.append("  drafter       " + (f"{d['kind']} head, {d['declared_layers']} layer(s), {d['tensors']} tensors"
                                      if d["present"] else "none"))
    lines.append("  quantization")
    for comp, kinds in report["quantization"].items():
        lines.append(f"    {comp:<17} {', '.join(kinds)}")
    c = report.get("compatibility")
    if c:
        lines.append(f"  --drafter {c['drafter']}: {'ok' if c['ok'] else 'NOT compatible'} ({c['reason']})")
    for w in report["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)
