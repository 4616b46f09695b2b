"""What glm4moe and deepseek2 GGUF files share: the nextn MTP block, the
MoE tensors, the layer bookkeeping and building our model from them.

llama.cpp's converter writes the checkpoint's extra decoder layer
`model.layers.L.*` (L = num_hidden_layers) as block `blk.L.*`:
`{arch}.block_count` counts it and `{arch}.nextn_predict_layers` says how
many such blocks close the file. Besides the block's ordinary attention and
MoE tensors it holds `blk.L.nextn.{eh_proj, enorm, hnorm, shared_head_head,
shared_head_norm, embed_tokens}` (checked against ggml-org/llama.cpp
conversion/glm.py Glm4MoeModel / Glm4MoeLiteModel, conversion/deepseek.py
DeepseekV2Model and gguf-py/gguf/constants.py `NEXTN_*`). llama.cpp's loaders
(src/models/glm4-moe.cpp, src/models/deepseek2.cpp) treat the last three as
optional and fall back on `output`, `output_norm` and `token_embd`; so do
we. The duplicate `embed_tokens` is dropped for the trunk's, as mlx-lm and
our safetensors loader do.

Files without the block load with drafting off and a one-line reason:
DeepseekV2Model (DeepSeek-V3) sets `skip_mtp` and drops it, older
converters did the same for GLM-4.7-Flash, and `--no-mtp` drops it anywhere.

The experts come stacked (`ffn_{gate,up,down}_exps`, [E, out, in] in numpy
order: mlx-lm's `switch_mlp` layout) and `e_score_correction_bias` is
`exp_probs_b.bias`. Neither arch has its Q/K permuted: only LlamaModel-style
converters do that, and glm.py notes GLM-4.5 already uses NeoX order.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from ..safetensors import CheckpointError
from .quants import Tensor, convert_tensor, load_into, mlx_weights, split_rows
from .reader import GGUFFile, converting, meta_value

TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Routed experts, their router and the shared experts (DeepSeek / GLM names).
MOE_NAMES = {
    "ffn_gate_inp.weight": "mlp.gate.weight",
    "exp_probs_b.bias": "mlp.gate.e_score_correction_bias",
    "ffn_gate_exps.weight": "mlp.switch_mlp.gate_proj.weight",
    "ffn_up_exps.weight": "mlp.switch_mlp.up_proj.weight",
    "ffn_down_exps.weight": "mlp.switch_mlp.down_proj.weight",
    "ffn_gate_shexp.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn_up_shexp.weight": "mlp.shared_experts.up_proj.weight",
    "ffn_down_shexp.weight": "mlp.shared_experts.down_proj.weight",
    # dense layers (the first `leading_dense_block_count`)
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# The converter's fused-experts option (--fuse-gate-up-exps): split on rows.
FUSED_GATE_UP = "ffn_gate_up_exps.weight"
FUSED_GATE_UP_PATH = "mlp.switch_mlp.gate_up_proj.weight"
# nextn tensors -> their path inside our head layer (models/nextn.py NextNLayer).
NEXTN_NAMES = {
    "nextn.eh_proj.weight": "eh_proj.weight",
    "nextn.enorm.weight": "enorm.weight",
    "nextn.hnorm.weight": "hnorm.weight",
    "nextn.shared_head_head.weight": "shared_head.head.weight",
    "nextn.shared_head_norm.weight": "shared_head.norm.weight",
}
# The head's own copy of the embedding: the trunk's is used.
NEXTN_SKIP = ("nextn.embed_tokens.weight",)
# Optional head tensors -> the top-level tensors llama.cpp uses in their place.
HEAD_FALLBACKS = {
    "shared_head.head.weight": ("output.weight", "token_embd.weight"),
    "shared_head.norm.weight": ("output_norm.weight",),
}
# Why a file of each arch comes without its head (conversion/deepseek.py, conversion/glm.py).
NO_HEAD_WHY = {
    "deepseek2": ("llama.cpp's converter drops DeepSeek-V3's MTP layer (DeepseekV2Model.skip_mtp), and "
                  "GLM-4.7-Flash's too before Glm4MoeLiteModel kept it, or it was converted with --no-mtp"),
    None: "it was converted with --no-mtp",
}
MTP_ONLY = ("an MTP-only file (llama.cpp --mtp) cannot be loaded as a target; load the whole-model GGUF")
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class NextNLayout:
    """Where the trunk ends and what the file says about its nextn blocks."""

    trunk_layers: int  # num_hidden_layers
    declared: int  # {arch}.nextn_predict_layers
    present: int  # nextn blocks with tensors (declared or 0)
    problem: Optional[str]  # why the file cannot draft with its head


def nextn_layout(meta: Dict[str, Any], names: List[str], path: Path) -> NextNLayout:
    """Split `block_count` into trunk and head from the metadata, and check
    the blocks the tensors name against it (one-line errors)."""
    arch = meta["general.architecture"]
    blocks = int(meta_value(meta, arch, "block_count"))
    declared = int(meta.get(f"{arch}.nextn_predict_layers", 0) or 0)
    if declared < 0 or declared >= blocks:
        raise CheckpointError(f"{path}: {arch}.nextn_predict_layers={declared} does not fit "
                              f"{arch}.block_count={blocks}")
    trunk = blocks - declared
    found = sorted({int(m.group(1)) for n in names if (m := _BLOCK.match(n))})
    beyond = [i for i in found if i >= blocks]
    if beyond:
        raise CheckpointError(f"{path}: tensor blk.{beyond[0]}.* lies beyond {arch}.block_count={blocks}")
    if declared and found and found[0] >= trunk:
        raise CheckpointError(f"{path} is {MTP_ONLY}")
    head = [i for i in found if i >= trunk]
    if head and head != list(range(trunk, blocks)):
        raise CheckpointError(f"{path}: nextn blocks {head} are incomplete (expected blk.{trunk}..blk.{blocks - 1})")
    if not declared:
        problem = (f"this GGUF has no nextn MTP block ({arch}.nextn_predict_layers is absent): "
                   f"{NO_HEAD_WHY.get(arch, NO_HEAD_WHY[None])}")
    elif not head:
        problem = (f"this GGUF declares {arch}.nextn_predict_layers={declared} but has no blk.{trunk}.* tensors "
                   "(a trunk-only file)")
    else:
        problem = None
    return NextNLayout(trunk, declared, len(head), problem)


def layer_count(meta: Dict[str, Any], arch: str, key: str, default: Any = None) -> Any:
    """A per-model value llama.cpp also accepts as a per-layer array
    (`head_count`, `head_count_kv`, `feed_forward_length`): arrays must be
    uniform, as our model classes have one value."""
    value = meta_value(meta, arch, key, default)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"GGUF metadata {arch}.{key} varies per layer ({list(value)[:8]}...), "
                                  "which this model class does not support")
        value = value[0]
    return value


def moe_fields(meta: Dict[str, Any], arch: str) -> Dict[str, Any]:
    """HF config fields of the DeepSeek-style router (noaux_tc, sigmoid)
    from `{arch}.expert_*`. Defaults are llama.cpp's when a key is absent."""
    gating = meta.get(f"{arch}.expert_gating_func")
    if gating is not None and int(gating) != 2:  # 1: softmax (DeepSeek-V2/V2.5)
        raise CheckpointError(f"GGUF metadata {arch}.expert_gating_func={gating} (softmax routing) is not supported: "
                              "only sigmoid routing with e_score_correction_bias (DeepSeek-V3, GLM-4.5/4.7)")
    shared = int(meta.get(f"{arch}.expert_shared_count", 0) or 0)
    return {
        "n_routed_experts": int(meta_value(meta, arch, "expert_count")),
        "num_experts_per_tok": int(meta_value(meta, arch, "expert_used_count")),
        "moe_intermediate_size": int(meta_value(meta, arch, "expert_feed_forward_length")),
        "n_shared_experts": shared or None,
        "first_k_dense_replace": int(meta.get(f"{arch}.leading_dense_block_count", 0) or 0),
        "routed_scaling_factor": float(meta.get(f"{arch}.expert_weights_scale", 1.0) or 1.0),
        "norm_topk_prob": bool(meta.get(f"{arch}.expert_weights_norm", False)),
        "n_group": int(meta.get(f"{arch}.expert_group_count", 1) or 1),
        "topk_group": int(meta.get(f"{arch}.expert_group_used_count", 1) or 1),
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    }


def module_name(gguf_name: str, layout: NextNLayout, layer_names: Dict[str, str], arch: str) -> Optional[str]:
    """GGUF tensor name -> our module path; None for tensors deliberately not
    used (the head's duplicate embedding), CheckpointError for unknown ones."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    m = _BLOCK.match(gguf_name)
    if m:
        i, rest = int(m.group(1)), m.group(2)
        if i < layout.trunk_layers:
            prefix = f"model.layers.{i}."
        else:
            prefix = f"mtp.layers.{i - layout.trunk_layers}."
            if rest in NEXTN_SKIP:
                return None
            if rest in NEXTN_NAMES:
                return prefix + NEXTN_NAMES[rest]
        if rest == FUSED_GATE_UP:
            return prefix + FUSED_GATE_UP_PATH
        mapped = layer_names.get(rest) or MOE_NAMES.get(rest)
        if mapped is not None:
            return prefix + mapped
    raise CheckpointError(f"GGUF tensor {gguf_name!r} is not part of a {arch} model as this loader knows it")


def _type_name(value: Tensor, fallback: str) -> str:
    return getattr(value, "source", "") or fallback


@dataclass
class NextNCheckpoint(GGUFFile):
    """A glm4moe / deepseek2 GGUF file read as an MLX checkpoint. Subclasses
    set `layer_names` and may override `convert` for their transforms."""

    layout: Optional[NextNLayout] = None
    layer_names: Dict[str, str] = None  # type: ignore[assignment]

    def module_name(self, gguf_name: str) -> Optional[str]:
        return module_name(gguf_name, self.layout, self.layer_names, self.arch)

    def convert(self, name: str, value: Tensor) -> Iterator[Tuple[str, Tensor]]:
        """Converted tensor at module path `name` -> (module path, tensor) in
        mlx-lm's layout; the default keeps it as it is."""
        yield name, value

    def tensor_names(self) -> List[Tuple[str, str]]:
        """(gguf name, module path) of every tensor the model uses."""
        return [(t.name, n) for t in self.reader.tensors if (n := self.module_name(t.name)) is not None]

    def tensors(self) -> Iterator[Tuple[str, Tensor, str]]:
        """(module path, converted tensor, GGUF type name), one tensor at a time."""
        seen = set()
        top = {}
        for t in self.reader.tensors:
            name = self.module_name(t.name)
            if t.name in TOP_NAMES:
                top[t.name] = t
            if name is None:
                continue
            with converting(self.path, t):
                value = convert_tensor(t, self.requant_bits)
                if name.endswith(FUSED_GATE_UP_PATH):
                    stem = name[: -len(FUSED_GATE_UP_PATH)]
                    gate, up = split_rows(value)
                    pieces = [(stem + "mlp.switch_mlp.gate_proj.weight", gate),
                              (stem + "mlp.switch_mlp.up_proj.weight", up)]
                else:
                    pieces = list(self.convert(name, value))
            for n, v in pieces:
                seen.add(n)
                yield n, v, _type_name(v, t.tensor_type.name)
        # A tied file has no `output`; mlx-lm's glm4_moe / deepseek_v3 always
        # have an lm_head, so it gets the embedding, as llama.cpp's output does.
        if "lm_head.weight" not in seen and "token_embd.weight" in top:
            with converting(self.path, top["token_embd.weight"]):
                value = convert_tensor(top["token_embd.weight"], self.requant_bits)
            yield "lm_head.weight", value, top["token_embd.weight"].tensor_type.name
        # Optional head tensors the file leaves out: what llama.cpp uses instead.
        for j in range(self.layout.present):
            for local, sources in HEAD_FALLBACKS.items():
                name = f"mtp.layers.{j}.{local}"
                source = next((top[s] for s in sources if s in top), None)
                if name in seen or source is None:
                    continue
                with converting(self.path, source):
                    value = convert_tensor(source, self.requant_bits)
                yield name, value, source.tensor_type.name


# --- our model from a checkpoint ---------------------------------------------

def model_classes(model_type: str) -> Tuple[type, type]:
    """(Model, ModelArgs) of a nextn family, from models/registry.py."""
    from ...models import registry

    return registry.model_classes({"model_type": model_type})


def build_model(config: Dict[str, Any], weights, quantization: Dict[str, Any], lazy: bool = False,
                problem: Optional[str] = None):
    """Instantiate our model for `config`, quantize the modules listed in
    `quantization` and load `weights` strictly. `problem`: why drafting is
    off, in the GGUF's terms (replaces the generic message)."""
    cls, args_cls = model_classes(config["model_type"])
    model = cls(args_cls.from_dict(copy.deepcopy(config)))
    # The weights are already in mlx-lm's sanitized layout; sanitize only
    # sorts the head out (and finds it missing when it is).
    model = load_into(model, model.sanitize(weights), quantization, lazy)
    if problem is not None:
        model.mtp_problem = problem
    return model


def load_target(ckpt: NextNCheckpoint, lazy: bool = False):
    """(model, config) for a glm4moe / deepseek2 checkpoint."""
    weights, quantization = mlx_weights(ckpt)
    config = dict(ckpt.config)
    if quantization:
        config["quantization"] = quantization
    return build_model(ckpt.config, weights, quantization, lazy=lazy, problem=ckpt.layout.problem), config


def read_nextn(path: Path, reader, meta: Dict[str, Any], requant_bits: int,
               make_config: Callable[[Dict[str, Any], Dict[str, Tuple[int, ...]], NextNLayout], Dict[str, Any]],
               layer_names: Dict[str, str], checkpoint: type = NextNCheckpoint) -> NextNCheckpoint:
    """A checkpoint for an opened file: layout, config, name check up front
    (an unknown tensor is an error before anything is converted)."""
    from .reader import tensor_shapes

    shapes = tensor_shapes(reader, path)
    layout = nextn_layout(meta, list(shapes), path)
    config = make_config(meta, shapes, layout)
    ckpt = checkpoint(path, reader, meta, config, requant_bits, layout=layout, layer_names=layer_names)
    try:
        ckpt.tensor_names()
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return ckpt
