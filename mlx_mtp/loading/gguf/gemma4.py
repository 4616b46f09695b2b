"""Gemma 4 GGUF files: `gemma4` targets and `gemma4-assistant` drafters.

The tensors are read and repacked exactly as for qwen35 (`reader.py`,
`quants.py`: the same quant-type table applies). What llama.cpp's converter
does to Gemma 4 (docs/gguf.md#gemma4-and-gemma4-assistant), and how it is undone here:

- Names: `attn_norm` -> input_layernorm, `post_attention_norm`,
  `ffn_norm` -> pre_feedforward_layernorm, `post_ffw_norm`,
  `pre_ffw_norm_2` / `post_ffw_norm_1` / `post_ffw_norm_2` (MoE layers),
  `layer_output_scale.weight` -> layer_scalar, per-layer inputs
  (`per_layer_token_embd`, `per_layer_model_proj`, `per_layer_proj_norm`,
  `blk.i.inp_gate` / `proj` / `post_norm`), the router
  (`ffn_gate_inp.weight` / `.scale`, `ffn_down_exps.scale` -> per_expert_scale).
- Norms are stored unshifted, as in HF and mlx-lm: used as they are.
- `ffn_gate_up_exps` keeps the experts' gate and up rows fused: split on rows
  (a quantized tensor splits without dequantizing).
- `attn_v` is absent where the checkpoint shares K and V (`attention_k_eq_v`,
  the full layers of 26B-A4B / 31B): the model is built without v_proj there,
  and any other layer that lacks it gets K's weights (the same values).
- `rope_freqs` is synthesized by the converter for the full layers (1.0 for
  rotated pairs, 1e30 for the rest): only read to recover the full layers'
  partial rotary factor (the metadata says rope.dimension_count = head dim).
- No `output.weight`: the head is tied to `token_embd`.
- KV-shared layers have no K/V of their own; any stray attn_k/v there is ignored.

The assistant (`gemma4-assistant`) uses the same layer names plus
`nextn.pre_projection` / `nextn.post_projection`; `embedding_length_out` is
the target's hidden size. The E2B/E4B sparse head is `masked_embd_centroids.weight`
[C, h] and `masked_embd_ordering` [V] (gguf-py's names; no `.weight` on the
ordering, stored as F32 by the converter's generic path, I32 by some others):
loaded when both are there. llama.cpp 0c1e570's converter drops them; such
an assistant drafts with its dense tied head (the argmax over the exact
logits, just a full-vocabulary matmul per step), and its `load_note` says so
(a drafter's `note`).

The tokenizer (`tokenizer.ggml.model = "gemma4"`) is built in tokenizer.py.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...models.base import FULL, SLIDING
from ..configs import gemma4_assistant_config
from ..safetensors import CheckpointError
from .quants import BF16, convert_tensor, dequant, load_into, mlx_weights, split_rows
from .reader import COMMON_LAYER_NAMES, GGUFFile, converting, meta_value, metadata, open_gguf, tensor_shapes
from .tokenizer import config_eos

TARGET_ARCH = "gemma4"
ASSISTANT_ARCH = "gemma4-assistant"
ARCHS = (TARGET_ARCH, ASSISTANT_ARCH)
# Backbone hidden sizes of the assistants that ship a sparse (ordered-embedding) head.
SPARSE_HEAD_BACKBONES = {1536: "E2B", 2560: "E4B"}

TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "per_layer_token_embd.weight": "model.embed_tokens_per_layer.weight",
    "per_layer_model_proj.weight": "model.per_layer_model_projection.weight",
    "per_layer_proj_norm.weight": "model.per_layer_projection_norm.weight",
}
LAYER = {
    **COMMON_LAYER_NAMES,  # input/post-attention norms, attention, dense MLP
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "pre_ffw_norm_2.weight": "pre_feedforward_layernorm_2.weight",
    "post_ffw_norm_1.weight": "post_feedforward_layernorm_1.weight",
    "post_ffw_norm_2.weight": "post_feedforward_layernorm_2.weight",
    "layer_output_scale.weight": "layer_scalar",
    "ffn_gate_inp.weight": "router.proj.weight",
    "ffn_gate_inp.scale": "router.scale",
    "ffn_down_exps.scale": "router.per_expert_scale",
    "ffn_gate_exps.weight": "experts.switch_glu.gate_proj.weight",
    "ffn_up_exps.weight": "experts.switch_glu.up_proj.weight",
    "ffn_down_exps.weight": "experts.switch_glu.down_proj.weight",
    "inp_gate.weight": "per_layer_input_gate.weight",
    "proj.weight": "per_layer_projection.weight",
    "post_norm.weight": "post_per_layer_input_norm.weight",
}
FUSED_EXPERTS = "ffn_gate_up_exps.weight"
ASSISTANT_TOP = {
    "nextn.pre_projection.weight": "pre_projection.weight",
    "nextn.post_projection.weight": "post_projection.weight",
    "mtp.pre_projection.weight": "pre_projection.weight",
    "mtp.post_projection.weight": "post_projection.weight",
    "pre_projection.weight": "pre_projection.weight",
    "post_projection.weight": "post_projection.weight",
}
# The E2B/E4B sparse (ordered-embedding) head, as gguf-py names it.
CENTROIDS = "masked_embd_centroids.weight"
ORDERING = "masked_embd_ordering"
SPARSE_HEAD = {CENTROIDS: "masked_embedding.centroids.weight", ORDERING: "masked_embedding.token_ordering"}
# Where a converter that keeps the sparse head may record its top-k (under the
# arch); gguf-py has no key for it. Absent: the HF default (32, as E2B/E4B use).
SPARSE_TOP_K_KEYS = ("masked_embedding.top_k", "centroid_intermediate_top_k")
_IGNORED = ("rope_freqs.weight",)


# --- metadata -> config --------------------------------------------------------


def _per_layer(value: Any, n: int, key: str) -> List[int]:
    """A scalar or per-layer array metadata value -> one int per layer."""
    if isinstance(value, (list, tuple)):
        if len(value) < n:
            raise CheckpointError(f"GGUF metadata {key} has {len(value)} entries for {n} layers")
        return [int(v) for v in value[:n]]
    return [int(value)] * n


def _layer_types(meta: Dict[str, Any], arch: str, n: int) -> List[str]:
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, (list, tuple)):
        if len(pattern) < n:
            raise CheckpointError(f"GGUF metadata {arch}.attention.sliding_window_pattern has {len(pattern)} "
                                  f"entries for {n} layers")
        return [SLIDING if bool(p) else FULL for p in pattern[:n]]
    period = int(pattern or 5)  # older files: every period-th layer is full
    return [FULL if (i + 1) % period == 0 else SLIDING for i in range(n)]


def _rotary_factor(rope_freqs: Optional[np.ndarray], head_dim: int, default: float = 0.25) -> float:
    """The full layers' partial rotary factor from the synthesized rope_freqs
    (one entry per rotation pair: 1.0 rotated, a huge value not)."""
    if rope_freqs is None or rope_freqs.size == 0:
        return default
    rotated = int(np.sum(np.asarray(rope_freqs, dtype=np.float64) < 1e10))
    return 2.0 * rotated / head_dim


def _rope_parameters(meta: Dict[str, Any], arch: str, head_full: int, head_swa: int,
                     rope_freqs: Optional[np.ndarray]) -> Dict[str, Any]:
    sliding = {"rope_type": "default", "rope_theta": float(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))}
    rot_swa = meta.get(f"{arch}.rope.dimension_count_swa")
    if rot_swa is not None and int(rot_swa) != head_swa:
        sliding["partial_rotary_factor"] = int(rot_swa) / head_swa
    full = {
        "rope_type": "proportional",
        "partial_rotary_factor": _rotary_factor(rope_freqs, head_full),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 1000000.0)),
    }
    return {FULL: full, SLIDING: sliding}


def _layer_tensors(shapes: Dict[str, Tuple[int, ...]], i: int) -> Set[str]:
    prefix = f"blk.{i}."
    return {k[len(prefix):] for k in shapes if k.startswith(prefix)}


def gemma4_text_config(meta: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]],
                       rope_freqs: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """A `gemma4_text` config (HF key names) from a gemma4 GGUF's metadata and
    tensor shapes (numpy order)."""
    arch = TARGET_ARCH
    n = int(meta_value(meta, arch, "block_count"))
    H = int(meta_value(meta, arch, "embedding_length"))
    types = _layer_types(meta, arch, n)
    head_full = int(meta_value(meta, arch, "attention.key_length"))
    head_swa = int(meta.get(f"{arch}.attention.key_length_swa", head_full))
    shared = int(meta.get(f"{arch}.attention.shared_kv_layers", 0) or 0)
    first_shared = n - shared
    if shared and not (0 < first_shared):
        raise CheckpointError(f"GGUF metadata: {shared} KV-shared layers out of {n}")
    ff = _per_layer(meta_value(meta, arch, "feed_forward_length"), n, f"{arch}.feed_forward_length")
    kv = _per_layer(meta_value(meta, arch, "attention.head_count_kv"), n, f"{arch}.attention.head_count_kv")
    heads = _per_layer(meta_value(meta, arch, "attention.head_count"), n, f"{arch}.attention.head_count")
    if len(set(heads)) != 1:
        raise CheckpointError(f"per-layer query head counts {sorted(set(heads))} are not supported")
    vocab = int(shapes["token_embd.weight"][0])

    # Feed-forward widths: uniform, or doubled on the KV-shared layers.
    double = bool(shared) and ff[first_shared:] == [2 * ff[0]] * shared and ff[:first_shared] == [ff[0]] * first_shared
    if not double and len(set(ff)) != 1:
        raise CheckpointError(f"per-layer feed-forward widths {ff} are not a Gemma 4 layout")

    # KV heads per layer type, and whether K doubles as V (attn_v absent).
    kv_swa = sorted({kv[i] for i in range(n) if types[i] == SLIDING})
    kv_full = sorted({kv[i] for i in range(n) if types[i] == FULL})
    if len(kv_swa) > 1 or len(kv_full) > 1:
        raise CheckpointError(f"per-layer KV head counts {kv} vary within a layer type")
    full_owners = [i for i in range(first_shared) if types[i] == FULL]
    k_eq_v = bool(full_owners) and all(
        "attn_k.weight" in (lt := _layer_tensors(shapes, i)) and "attn_v.weight" not in lt for i in full_owners
    )
    text: Dict[str, Any] = {
        "model_type": "gemma4_text",
        "hidden_size": H,
        "intermediate_size": ff[0],
        "num_hidden_layers": n,
        "layer_types": types,
        "num_attention_heads": heads[0],
        "num_key_value_heads": (kv_swa or kv_full)[0],
        "head_dim": head_swa,
        "global_head_dim": head_full,
        "rms_norm_eps": float(meta_value(meta, arch, "attention.layer_norm_rms_epsilon")),
        "vocab_size": vocab,
        "sliding_window": int(meta_value(meta, arch, "attention.sliding_window")),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 131072)),
        "final_logit_softcapping": (float(meta[f"{arch}.final_logit_softcapping"])
                                    if meta.get(f"{arch}.final_logit_softcapping") else None),
        "rope_parameters": _rope_parameters(meta, arch, head_full, head_swa, rope_freqs),
        "tie_word_embeddings": "output.weight" not in shapes,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_k_eq_v": k_eq_v,
        "num_kv_shared_layers": shared,
        "use_double_wide_mlp": double,
        "hidden_size_per_layer_input": int(meta.get(f"{arch}.embedding_length_per_layer_input", 0) or 0),
        "vocab_size_per_layer_input": int(shapes.get("per_layer_token_embd.weight", (vocab,))[0]),
        "enable_moe_block": "blk.0.ffn_gate_inp.weight" in shapes,
    }
    if kv_full and kv_swa and kv_full != kv_swa:
        if not k_eq_v:
            raise CheckpointError(
                f"full layers have {kv_full[0]} KV heads and sliding layers {kv_swa[0]}, without shared K/V: "
                "not a Gemma 4 layout mlx-lm can run")
        text["num_global_key_value_heads"] = kv_full[0]
    elif k_eq_v and kv_full:
        text["num_global_key_value_heads"] = kv_full[0]
    if text["enable_moe_block"]:
        text.update(
            num_experts=int(meta_value(meta, arch, "expert_count")),
            top_k_experts=int(meta_value(meta, arch, "expert_used_count")),
            moe_intermediate_size=int(meta_value(meta, arch, "expert_feed_forward_length")),
        )
    for key, meta_key in (("bos_token_id", "bos"), ("pad_token_id", "padding")):
        value = meta.get(f"tokenizer.ggml.{meta_key}_token_id")
        if value is not None:
            text[key] = int(value)
    eos = config_eos(meta)
    if eos is not None:
        text["eos_token_id"] = eos
    return text


def assistant_config(meta: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]],
                     rope_freqs: Optional[np.ndarray] = None) -> Dict[str, Any]:
    """A `gemma4_assistant` config from a gemma4-assistant GGUF."""
    arch = ASSISTANT_ARCH
    n = int(meta.get(f"{arch}.nextn_predict_layers") or meta_value(meta, arch, "block_count"))
    H = int(meta_value(meta, arch, "embedding_length"))
    head_full = int(meta_value(meta, arch, "attention.key_length"))
    head_swa = int(meta.get(f"{arch}.attention.key_length_swa", head_full))
    pre = next((shapes[k] for k in ASSISTANT_TOP if k in shapes and "pre_" in k), None)
    backbone = meta.get(f"{arch}.embedding_length_out")
    if backbone is None and pre is not None:
        backbone = pre[1] // 2
    if backbone is None:
        raise CheckpointError(f"GGUF metadata lacks {arch}.embedding_length_out (the target's hidden size)")
    heads = _per_layer(meta_value(meta, arch, "attention.head_count"), n, f"{arch}.attention.head_count")
    kv = _per_layer(meta.get(f"{arch}.attention.head_count_kv", 1), n, f"{arch}.attention.head_count_kv")
    return gemma4_assistant_config(
        hidden_size=H,
        intermediate_size=_per_layer(meta_value(meta, arch, "feed_forward_length"), n, "feed_forward_length")[0],
        layer_types=_layer_types(meta, arch, n),
        num_attention_heads=heads[0],
        num_key_value_heads=kv[0],
        head_dim=head_swa,
        global_head_dim=head_full,
        rms_norm_eps=float(meta_value(meta, arch, "attention.layer_norm_rms_epsilon")),
        vocab_size=int(shapes["token_embd.weight"][0]),
        sliding_window=int(meta_value(meta, arch, "attention.sliding_window")),
        max_position_embeddings=int(meta.get(f"{arch}.context_length", 131072)),
        rope_parameters=_rope_parameters(meta, arch, head_full, head_swa, rope_freqs),
        backbone_hidden_size=int(backbone),
        **sparse_head_config(meta, shapes, H),
    )


def sparse_head_config(meta: Dict[str, Any], shapes: Dict[str, Tuple[int, ...]], hidden: int) -> Dict[str, Any]:
    """The assistant config's sparse-head keys: on when the file has both
    tensors, sized by the centroids' shape."""
    present = [k for k in SPARSE_HEAD if k in shapes]
    if not present:
        return {"use_ordered_embeddings": False}
    if len(present) == 1:
        missing = next(k for k in SPARSE_HEAD if k not in shapes)
        raise CheckpointError(f"GGUF file has {present[0]} but not {missing}: the sparse head needs both")
    centroids, vocab = shapes[CENTROIDS][0], shapes["token_embd.weight"][0]
    if shapes[CENTROIDS][1] != hidden or shapes[ORDERING] != (vocab,) or vocab % centroids:
        raise CheckpointError(f"GGUF sparse head does not fit: {CENTROIDS} is {list(shapes[CENTROIDS])} and "
                              f"{ORDERING} {list(shapes[ORDERING])} for hidden size {hidden} and vocab {vocab}")
    out: Dict[str, Any] = {"use_ordered_embeddings": True, "num_centroids": int(centroids)}
    top_k = next((meta[f"{ASSISTANT_ARCH}.{k}"] for k in SPARSE_TOP_K_KEYS if f"{ASSISTANT_ARCH}.{k}" in meta), None)
    if top_k is not None:
        if not 0 < int(top_k) <= centroids:
            raise CheckpointError(f"GGUF sparse head top-k {int(top_k)} is not within its {centroids} centroids")
        out["centroid_intermediate_top_k"] = int(top_k)
    return out


def token_ordering(value: Any, vocab: int) -> np.ndarray:
    """`masked_embd_ordering` as int32 token ids. Stored as floats (F32: the
    converter's generic path casts every integer tensor) or integers; either
    way it must be a permutation of the vocabulary."""
    raw = np.asarray(value)
    integer = np.issubdtype(raw.dtype, np.integer) and not isinstance(value, BF16)
    ids = (raw if integer else dequant(value)).reshape(-1)
    as_int = ids.astype(np.int64)
    if not np.array_equal(as_int, ids) or not np.array_equal(np.sort(as_int), np.arange(vocab)):
        raise ValueError(f"it is not a permutation of the {vocab} token ids")
    return as_int.astype(np.int32)


def declares_sparse_head(meta: Dict[str, Any], backbone: int) -> bool:
    """Whether the source assistant had an ordered-embedding (sparse) head:
    said by metadata where a converter kept the flag, else known by size."""
    for key, value in meta.items():
        if key.startswith(ASSISTANT_ARCH + ".") and key.endswith("use_ordered_embeddings"):
            return bool(value)
    return backbone in SPARSE_HEAD_BACKBONES


# --- names ---------------------------------------------------------------------


def _layer_name(gguf_name: str) -> Optional[str]:
    """`blk.i.*` -> `model.layers.i.*` (both models use the same layer names)."""
    m = re.match(r"^blk\.(\d+)\.(.+)$", gguf_name)
    if m and m.group(2) in LAYER:
        return f"model.layers.{m.group(1)}.{LAYER[m.group(2)]}"
    return None


def target_name(gguf_name: str) -> Optional[str]:
    """GGUF tensor name -> gemma4_text module path (None: not a model tensor)."""
    if gguf_name in TOP:
        return TOP[gguf_name]
    return _layer_name(gguf_name)


def assistant_name(gguf_name: str) -> Optional[str]:
    """GGUF tensor name -> Gemma4Assistant module path."""
    if gguf_name in ASSISTANT_TOP:
        return ASSISTANT_TOP[gguf_name]
    if gguf_name in SPARSE_HEAD:
        return SPARSE_HEAD[gguf_name]
    if gguf_name in ("token_embd.weight", "output_norm.weight"):
        return TOP[gguf_name]
    return _layer_name(gguf_name)


# --- the checkpoint ----------------------------------------------------------------


def _rope_freqs(reader) -> Optional[np.ndarray]:
    t = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    return None if t is None else np.asarray(t.data, dtype=np.float64).reshape(-1)


class Gemma4Checkpoint(GGUFFile):
    """A gemma4 or gemma4-assistant GGUF read as an MLX checkpoint. Same
    interface as qwen35.GGUFCheckpoint (config, meta, tensors())."""

    @property
    def is_assistant(self) -> bool:
        return self.arch == ASSISTANT_ARCH

    @property
    def text(self) -> Dict[str, Any]:
        return self.config.get("text_config", self.config)

    def _expected(self) -> Set[str]:
        """Module paths of the model built from the config (lazy: no memory)."""
        from mlx.utils import tree_flatten

        return {k for k, _ in tree_flatten(build_empty(self.config).parameters())}

    def _plan(self) -> Tuple[List[Tuple[Any, str]], List[Tuple[Any, str]], List[str]]:
        """(tensor, module path) pairs to convert, attn_k tensors whose values
        also serve as v_proj, and the GGUF names nothing uses."""
        expected = self._expected()
        name_of = assistant_name if self.is_assistant else target_name
        plain, fused, unused = [], [], []
        by_name = {t.name: t for t in self.reader.tensors}
        for t in self.reader.tensors:
            if t.name in _IGNORED:
                continue
            if not self.is_assistant and t.name.endswith(FUSED_EXPERTS):
                i = t.name.split(".")[1]
                fused.append((t, f"model.layers.{i}.experts.switch_glu"))
                continue
            name = name_of(t.name)
            if name is None or name not in expected:
                # K/V of KV-shared layers (and of the assistant) are not used.
                if not re.search(r"\.attn_(k|v|k_norm)\.weight$", t.name):
                    unused.append(t.name)
                continue
            plain.append((t, name))
            if name.endswith("self_attn.k_proj.weight"):
                v_name = name.replace("k_proj", "v_proj")
                if v_name in expected and t.name.replace("attn_k", "attn_v") not in by_name:
                    plain.append((t, v_name))  # K and V shared: V's weights are K's
        return plain, fused, unused

    def tensor_names(self) -> List[Tuple[str, str]]:
        plain, fused, _ = self._plan()
        out = [(t.name, name) for t, name in plain]
        for t, prefix in fused:
            out += [(t.name, f"{prefix}.gate_proj.weight"), (t.name, f"{prefix}.up_proj.weight")]
        return out

    def tensors(self) -> Iterator[Tuple[str, Any, str]]:
        """(module path, converted tensor, GGUF type name), one at a time."""
        plain, fused, unused = self._plan()
        if unused:
            warnings.warn(f"{self.path.name}: ignoring {len(unused)} GGUF tensor(s) a Gemma 4 "
                          f"{'assistant' if self.is_assistant else 'text model'} does not use: "
                          f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}", stacklevel=3)
        cache: Dict[str, Any] = {}
        for t, name in plain:
            with converting(self.path, t):
                value = cache.pop(t.name, None)
                if value is None:
                    value = convert_tensor(t, self.requant_bits)
                    if name.endswith("k_proj.weight") and any(o is t and n != name for o, n in plain):
                        cache[t.name] = value
                if t.name == ORDERING:
                    value = token_ordering(value, self.text["vocab_size"])
            yield name, value, t.tensor_type.name
        for t, prefix in fused:
            gate, up = split_rows(convert_tensor(t, self.requant_bits))
            yield f"{prefix}.gate_proj.weight", gate, t.tensor_type.name
            yield f"{prefix}.up_proj.weight", up, t.tensor_type.name


def read_gemma4(path: Path, reader, meta: Dict[str, Any], requant_bits: int = 8) -> Gemma4Checkpoint:
    """A Gemma4Checkpoint for an opened gemma4 / gemma4-assistant GGUF."""
    shapes = tensor_shapes(reader, path)
    freqs = _rope_freqs(reader)
    if meta.get("general.architecture") == ASSISTANT_ARCH:
        config = assistant_config(meta, shapes, freqs)
    else:
        config = gemma4_text_config(meta, shapes, freqs)
    return Gemma4Checkpoint(Path(path), reader, meta, config, requant_bits)


# --- models --------------------------------------------------------------------


def build_empty(config: Dict[str, Any]) -> nn.Module:
    """The (unloaded) model for a config made here."""
    if config.get("model_type") == "gemma4_assistant":
        from ...models.gemma4_assistant import AssistantArgs, Gemma4Assistant

        return Gemma4Assistant(AssistantArgs.from_config(copy.deepcopy(config)))
    from ...models import gemma4

    return gemma4.TextModel(gemma4.TextModelArgs.from_dict(copy.deepcopy(config)))


def build(config: Dict[str, Any], weights: Dict[str, mx.array], quantization: Dict[str, Any], lazy: bool = False):
    """The model with the listed modules quantized and `weights` loaded strictly."""
    return load_into(build_empty(config), weights, quantization, lazy)


def load_target(ckpt: Gemma4Checkpoint, lazy: bool = False):
    """(model, config) for a gemma4 checkpoint."""
    weights, quantization = mlx_weights(ckpt)
    config = copy.deepcopy(ckpt.config)
    if quantization:
        config["quantization"] = quantization
    return build(ckpt.config, weights, quantization, lazy=lazy), config


def load_gguf_assistant(path: Union[str, Path], lazy: bool = False, requant_bits: int = 8):
    """A Gemma4Assistant from a gemma4-assistant GGUF, with its sparse head
    when the file has one. Its `load_note` says when an E2B/E4B assistant's
    file lacks it (so it drafts with the dense tied head)."""
    from ...models.gemma4_assistant import AssistantError

    path = Path(path).expanduser()
    try:
        reader = open_gguf(path)
    except CheckpointError as e:
        raise AssistantError(str(e)) from e
    meta = metadata(reader)
    arch = meta.get("general.architecture")
    if arch != ASSISTANT_ARCH:
        raise AssistantError(f"{path}: not a Gemma 4 assistant GGUF (architecture {arch!r}, expected {ASSISTANT_ARCH!r})")
    try:
        ckpt = read_gemma4(path, reader, meta, requant_bits)
        weights, quantization = mlx_weights(ckpt)
        model = build(ckpt.config, weights, quantization, lazy=lazy)
    except CheckpointError as e:
        raise AssistantError(str(e)) from e
    backbone = ckpt.config["backbone_hidden_size"]
    model.load_note = None
    if declares_sparse_head(meta, backbone) and not ckpt.config["use_ordered_embeddings"]:
        kind = SPARSE_HEAD_BACKBONES.get(backbone, "E2B/E4B-style")
        model.load_note = (
            f"{path.name}: this {kind} assistant's sparse (ordered-embedding) head was dropped by the GGUF "
            f"conversion (no {CENTROIDS} / {ORDERING}); drafting with its dense tied head instead (exact, but "
            "slower per draft step)"
        )
    n = meta.get(f"{ASSISTANT_ARCH}.num_assistant_tokens")
    model.num_assistant_tokens = int(n) if n else None
    return model
