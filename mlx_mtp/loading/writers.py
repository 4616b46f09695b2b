"""Write checkpoints the loaders read: Qwen3.5 targets in the raw HF layout
(or mlx-lm's), Gemma 4 targets and Gemma 4 assistants, as safetensors plus
config.json. The demo trainers and the test fixtures save through these.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten

PathLike = Union[str, Path]


def is_norm(name: str) -> bool:
    """Whether a parameter path is a norm's weight (`...norm.weight`)."""
    parts = name.split(".")
    return len(parts) >= 2 and "norm" in parts[-2] and parts[-1] == "weight"


def write_checkpoint(path: PathLike, weights: Dict[str, mx.array], config: Dict[str, Any]) -> Path:
    """`model.safetensors` and `config.json` in `path` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


# --- Qwen3.5 ------------------------------------------------------------------


def save_hf_checkpoint(model, path: PathLike, config: dict, raw: bool = True, drop_mtp: bool = False) -> Path:
    """Write `model`'s weights as a raw HF checkpoint (zero-centred norms,
    `model.language_model.*` keys, torch conv1d layout) or in mlx-lm layout."""
    weights: Dict[str, mx.array] = {}
    pending: Dict[str, Dict[str, mx.array]] = {}
    for name, value in tree_flatten(model.parameters()):
        if drop_mtp and name.startswith("mtp."):
            continue
        if raw:
            is_plain_norm = is_norm(name) and value.ndim == 1
            is_gated_norm = ".linear_attn.norm." in name
            if is_plain_norm and not is_gated_norm:
                value = value - 1.0
            if "conv1d.weight" in name:
                value = value.moveaxis(2, 1)  # [C, K, 1] -> [C, 1, K]
            if name.startswith("language_model.model."):
                name = "model.language_model." + name[len("language_model.model.") :]
            elif name.startswith("language_model."):
                name = name[len("language_model.") :]
            if ".switch_mlp." in name:
                name, value = _fuse_experts(name, value, pending)
                if name is None:
                    continue
        weights[name] = value
    return write_checkpoint(path, weights, config)


def _fuse_experts(name: str, value: mx.array, pending: Dict[str, Dict[str, mx.array]]):
    """mlx-lm's split switch_mlp -> Qwen3.5-MoE's fused `experts.gate_up_proj`
    (None until both halves of a layer have been seen)."""
    prefix, rest = name.split(".switch_mlp.")
    if rest.startswith("down_proj"):
        return f"{prefix}.experts.down_proj", value
    parts = pending.setdefault(prefix, {})
    parts[rest.split(".")[0]] = value
    if len(parts) < 2:
        return None, None
    del pending[prefix]
    return f"{prefix}.experts.gate_up_proj", mx.concatenate([parts["gate_proj"], parts["up_proj"]], axis=-2)


# --- Gemma 4 ------------------------------------------------------------------


def hf_target_weights(model, layout: str) -> Dict[str, mx.array]:
    """mlx-lm names -> HF names (fused expert tensors; text or multimodal)."""
    flat = dict(tree_flatten(model.parameters()))
    out: Dict[str, mx.array] = {}
    for key, value in flat.items():
        name = key.removeprefix("language_model.")
        # Multimodal repos (26B-A4B included) nest every text tensor, experts
        # too, under `model.language_model.`.
        if layout == "gemma4" and name.startswith("model."):
            name = "model.language_model." + name[len("model.") :]
        if ".experts.switch_glu." in name:
            base, rest = name.split(".switch_glu.")
            if rest.startswith("down_proj"):
                out[f"{base}.down_proj"] = value
            elif rest.startswith("gate_proj"):
                up = flat[key.replace(".switch_glu.gate_proj.", ".switch_glu.up_proj.")]
                out[f"{base}.gate_up_proj"] = mx.concatenate([value, up], axis=-2)
            continue
        out[name] = value
    return out


def save_target(model, path: PathLike, config: dict, raw: bool = True) -> Path:
    """Write a Gemma 4 target checkpoint: HF names (raw=True, in the config's
    layout) or mlx-lm's own names."""
    if raw:
        weights = hf_target_weights(model, config["model_type"])
    else:
        weights = dict(tree_flatten(model.parameters()))
    return write_checkpoint(path, weights, config)


def save_assistant(model, path: PathLike, config: dict, num_assistant_tokens: Optional[int] = None,
                   quantization: Optional[dict] = None) -> Path:
    """Write a Gemma 4 assistant checkpoint (and its generation_config.json
    when `num_assistant_tokens` is given)."""
    config = dict(config)
    if quantization:
        config["quantization"] = quantization
    path = write_checkpoint(path, dict(tree_flatten(model.parameters())), config)
    if num_assistant_tokens:
        gen = {"num_assistant_tokens": num_assistant_tokens, "num_assistant_tokens_schedule": "constant"}
        (path / "generation_config.json").write_text(json.dumps(gen))
    return path
