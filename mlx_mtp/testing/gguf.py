"""Tiny qwen35 / qwen35moe GGUF files for tests, laid out the way llama.cpp's
converter writes them (docs/gguf.md#converter-transforms): GGUF names, ssm_a = -exp(A_log),
squeezed conv1d, tiled V heads, norms with the +1 already in, nextn tensors
for the MTP head, and the tokenizer in `tokenizer.ggml.*` metadata.

`write_qwen35_gguf` returns the weights as they are stored (dequantized and
mapped back to our module layout), so a test can save the very same values
as safetensors and compare. Its `layout` writes the converter's three kinds
of file (checked against llama.cpp 0c1e570's convert_hf_to_gguf.py): the
whole model, `--no-mtp` (the trunk: no head tensors, block_count without the
head, no nextn_predict_layers) and `--mtp` (the split head: token_embd,
output_norm, output and blk.N.*, with the whole model's metadata).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Union

import numpy as np
from mlx.utils import tree_flatten

from ..loading.gguf import LAYER_NAMES, NEXTN_NAMES, TOP_NAMES, v_head_order

QType = Union[str, Callable[[str, tuple], str]]
# The converter's runs: plain, --no-mtp, --mtp.
LAYOUTS = ("full", "no-mtp", "mtp-only")
# What the converter writes as full_attention_interval whatever the model's:
# transformers' config.to_dict() has no such key, so its default stays. The
# per-layer attention.recurrent_layers flags carry the real pattern.
CONVERTER_ATTENTION_INTERVAL = 4


# --- block encoders gguf-py lacks (K-quants) -----------------------------------


def quantize_k(x: np.ndarray, bits: int) -> np.ndarray:
    """Float rows (length % 256 == 0) -> Q4_K (bits=4) or Q5_K (bits=5) blocks,
    with valid 6-bit sub-block scales and mins. Returns uint8 [..., bytes]."""
    lead, cols = x.shape[:-1], x.shape[-1]
    nb = x.size // 256
    levels = (1 << bits) - 1
    sub = x.reshape(nb, 8, 32).astype(np.float32)
    lo = np.minimum(sub.min(-1), 0.0)
    scale = (sub.max(-1) - lo) / levels
    minv = -lo
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (minv.max(-1) / 63).astype(np.float16)
    dd, dm = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(dd > 0, np.round(scale / dd), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dm > 0, np.round(minv / dm), 0).clip(0, 63).astype(np.uint8)
        eff_s, eff_m = (dd * sc)[..., None], (dm * m)[..., None]
        q = np.where(eff_s > 0, np.round((sub + eff_m) / eff_s), 0).clip(0, levels).astype(np.uint8)
    scales = np.concatenate(
        [
            (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6),
            (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4),
        ],
        axis=-1,
    ).astype(np.uint8)
    q4 = q.reshape(nb, 4, 2, 32) & 15
    qs = (q4[:, :, 0] | (q4[:, :, 1] << 4)).reshape(nb, 128).astype(np.uint8)
    parts = [d.reshape(nb, 1).view(np.uint8), dmin.reshape(nb, 1).view(np.uint8), scales]
    if bits == 5:
        high = (q >> 4) & 1  # [nb, 8, 32]: sub-block s -> bit s of qh[j]
        qh = np.zeros((nb, 32), dtype=np.uint8)
        for s in range(8):
            qh |= (high[:, s] << s).astype(np.uint8)
        parts.append(qh)
    parts.append(qs)
    out = np.concatenate(parts, axis=-1)
    return out.reshape(*lead, cols // 256 * out.shape[-1])


def random_blocks(shape: tuple, qtype: str, seed: int = 0) -> np.ndarray:
    """Valid random Q6_K / Q3_K / Q2_K blocks with small values (for the
    dequantize-and-requantize path): random codes, fixed small super-scales."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    t = GGMLQuantizationType[qtype]
    block, size = GGML_QUANT_SIZES[t]
    rng = np.random.default_rng(seed)
    nb = int(np.prod(shape)) // block
    raw = rng.integers(0, 256, size=(nb, size), dtype=np.uint8)
    d = np.full((nb, 1), 0.002, dtype=np.float16).view(np.uint8)
    if qtype == "Q6_K":  # ql(128) qh(64) int8 scales(16) d(2)
        raw[:, 192:208] = rng.integers(-4, 5, size=(nb, 16)).astype(np.int8).view(np.uint8)
        raw[:, 208:210] = d
    elif qtype == "Q3_K":  # hmask(32) qs(64) scales(12) d(2)
        raw[:, 108:110] = d
    elif qtype == "Q2_K":  # scales(16) qs(64) d(2) dmin(2)
        raw[:, 80:82] = d
        raw[:, 82:84] = d
    else:
        raise ValueError(qtype)
    return raw.reshape(*shape[:-1], shape[-1] // block * size)


def encode(x: np.ndarray, qtype: str, seed: int = 0) -> np.ndarray:
    """Float array -> GGUF raw data for `qtype` (float types: the array)."""
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    if qtype == "F32":
        return x.astype(np.float32)
    if qtype == "F16":
        return x.astype(np.float16)
    if qtype == "Q4_K":
        return quantize_k(x, 4)
    if qtype == "Q5_K":
        return quantize_k(x, 5)
    if qtype in ("Q6_K", "Q3_K", "Q2_K"):
        return random_blocks(x.shape, qtype, seed)
    return quants.quantize(x.astype(np.float32), GGMLQuantizationType[qtype])


def decode(data: np.ndarray, qtype: str) -> np.ndarray:
    from gguf import quants
    from gguf.constants import GGMLQuantizationType

    if qtype == "BF16":
        return data.astype(np.float32)
    return quants.dequantize(data, GGMLQuantizationType[qtype]).astype(np.float32)


def default_qtype(qtype: str) -> Callable[[str, tuple], str]:
    """`qtype` for every matrix whose rows fit its blocks, F32 otherwise
    (1-D tensors, conv1d and the router stay F32, as llama.cpp keeps them)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    block = 1 if qtype in ("F32", "F16") else GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][0]

    def pick(name: str, shape: tuple) -> str:
        if len(shape) < 2 or "conv1d" in name or name.endswith("ffn_gate_inp.weight") or shape[-1] % block:
            return "F32"
        return qtype

    return pick


# --- the writer -----------------------------------------------------------------


def add_tensor(w, gname: str, x: np.ndarray, pick: Callable[[str, tuple], str], seed: int) -> np.ndarray:
    """Encode `x` as `pick(gname, shape)` into writer `w`; returns the stored
    values (decoded, in x's shape)."""
    import gguf

    t = pick(gname, x.shape)
    data = encode(x, t, seed=seed)
    if t in ("F32", "F16"):
        w.add_tensor(gname, data)
    else:
        w.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[t])
    return decode(data, t).reshape(x.shape)


def finish(w) -> None:
    """Write the header, metadata and tensors, and close the file."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_name(name: str, num_layers: int) -> Optional[str]:
    inv_top = {v: k for k, v in TOP_NAMES.items()}
    if name in inv_top:
        return inv_top[name]
    inv_layer = {v: k for k, v in LAYER_NAMES.items() if k != "ssm_dt"}
    if name.startswith("language_model.model.layers."):
        i, rest = name[len("language_model.model.layers.") :].split(".", 1)
        return f"blk.{i}.{inv_layer[rest]}"
    if name.startswith("mtp.layers."):
        j, rest = name[len("mtp.layers.") :].split(".", 1)
        return f"blk.{num_layers + int(j)}.{inv_layer[rest]}"
    if name.startswith("mtp."):
        inv = {v: k for k, v in NEXTN_NAMES.items()}
        return f"blk.{num_layers}.{inv[name[4:]]}"
    return None


def _v_rows(total: int, offset: int, hv: int, d: int, perm: np.ndarray) -> np.ndarray:
    idx = np.arange(total)
    idx[offset : offset + hv * d] = offset + (perm[:, None] * d + np.arange(d)).reshape(-1)
    return idx


def write_qwen35_gguf(
    model,
    text: dict,
    path: Union[str, Path],
    qtype: QType = "F32",
    tokenizer: bool = True,
    seed: int = 0,
    layout: str = "full",
) -> Dict[str, np.ndarray]:
    """Write `model` (our Qwen3.5 class, float) as a llama.cpp-style GGUF.

    qtype: a GGUF type name for all matrices, or fn(gguf_name, shape) -> name.
    layout: one of LAYOUTS (the whole model, the trunk, the split head).
    Returns {module path: stored values mapped back to our layout}, for the
    tensors written."""
    import gguf

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")

    pick = default_qtype(qtype) if isinstance(qtype, str) else qtype
    moe = "moe" in text["model_type"]
    arch = "qwen35moe" if moe else "qwen35"
    L = text["num_hidden_layers"]
    n_mtp = 0 if layout == "no-mtp" else text.get("mtp_num_hidden_layers", 0)
    hv, hk = text["linear_num_value_heads"], text["linear_num_key_heads"]
    dv, dk = text["linear_value_head_dim"], text["linear_key_head_dim"]
    key_dim = hk * dk
    # slot s of the GGUF holds HF head fwd[s]; our loader gathers with `back`.
    back = v_head_order(hv, hk)
    fwd = np.argsort(back)
    reorder = hv != hk

    w = gguf.GGUFWriter(str(path), arch)
    rope = text["rope_parameters"]
    head_dim = text["head_dim"]
    w.add_uint32(f"{arch}.block_count", L + n_mtp)
    w.add_uint32(f"{arch}.context_length", text["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", text["hidden_size"])
    w.add_uint32(f"{arch}.feed_forward_length", text["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", text["num_attention_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", text["num_key_value_heads"])
    w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_uint32(f"{arch}.attention.value_length", head_dim)
    w.add_float32(f"{arch}.rope.freq_base", float(rope["rope_theta"]))
    w.add_uint32(f"{arch}.rope.dimension_count", int(head_dim * rope["partial_rotary_factor"]))
    w.add_array(f"{arch}.rope.dimension_sections", list(rope.get("mrope_section", [])) + [0])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", text["rms_norm_eps"])
    w.add_uint32(f"{arch}.ssm.conv_kernel", text["linear_conv_kernel_dim"])
    w.add_uint32(f"{arch}.ssm.state_size", dk)
    w.add_uint32(f"{arch}.ssm.group_count", hk)
    w.add_uint32(f"{arch}.ssm.time_step_rank", hv)
    w.add_uint32(f"{arch}.ssm.inner_size", hv * dv)
    interval = text["full_attention_interval"]
    w.add_array(f"{arch}.attention.recurrent_layers", [(i + 1) % interval != 0 for i in range(L)] + [False] * n_mtp)
    w.add_uint32(f"{arch}.full_attention_interval", CONVERTER_ATTENTION_INTERVAL)
    if n_mtp:
        w.add_uint32(f"{arch}.nextn_predict_layers", n_mtp)
    if moe:
        w.add_uint32(f"{arch}.expert_count", text["num_experts"])
        w.add_uint32(f"{arch}.expert_used_count", text["num_experts_per_tok"])
        w.add_uint32(f"{arch}.expert_feed_forward_length", text["moe_intermediate_size"])
        w.add_uint32(f"{arch}.expert_shared_feed_forward_length", text["shared_expert_intermediate_size"])
    if tokenizer:
        write_tokenizer_metadata(w)

    stored: Dict[str, np.ndarray] = {}
    for i, (name, value) in enumerate(tree_flatten(model.parameters())):
        x = np.array(value).astype(np.float32)
        gname = _gguf_name(name, L)
        if gname is None:
            raise KeyError(name)
        head = name.startswith("mtp.")
        if (layout == "no-mtp" and head) or (layout == "mtp-only" and not head and gname not in TOP_NAMES):
            continue
        # Forward transforms (HF -> GGUF); `undo` maps stored values back.
        undo = lambda a: a  # noqa: E731
        if name.endswith("A_log"):
            x = -np.exp(x)
            if reorder:
                x = x[fwd]
            undo = lambda a: np.log(-a[back])  # noqa: E731
        elif reorder and name.endswith("dt_bias"):
            x = x[fwd]
            undo = lambda a: a[back]  # noqa: E731
        elif name.endswith("conv1d.weight"):
            x = x[:, :, 0]
            if reorder:
                x = x[_v_rows(x.shape[0], 2 * key_dim, hv, dv, fwd)]
                idx = _v_rows(x.shape[0], 2 * key_dim, hv, dv, back)
                undo = lambda a, idx=idx: a[idx][:, :, None]  # noqa: E731
            else:
                undo = lambda a: a[:, :, None]  # noqa: E731
        elif reorder and (name.endswith("in_proj_qkv.weight") or name.endswith("in_proj_z.weight")):
            off = 2 * key_dim if "qkv" in name else 0
            x = x[_v_rows(x.shape[0], off, hv, dv, fwd)]
            idx = _v_rows(x.shape[0], off, hv, dv, back)
            undo = lambda a, idx=idx: a[idx]  # noqa: E731
        elif reorder and (name.endswith("in_proj_a.weight") or name.endswith("in_proj_b.weight")):
            x = x[fwd]
            undo = lambda a: a[back]  # noqa: E731
        elif reorder and name.endswith("out_proj.weight"):
            x = x.reshape(x.shape[0], hv, dv)[:, fwd].reshape(x.shape[0], -1)
            undo = lambda a: a.reshape(a.shape[0], hv, dv)[:, back].reshape(a.shape[0], -1)  # noqa: E731
        stored[name] = undo(add_tensor(w, gname, x, pick, seed + i))
    finish(w)
    return stored


def write_tokenizer_metadata(w, tokenizer=None, chat_template: Optional[str] = None, eos_id: Optional[int] = None) -> None:
    """`tokenizer.ggml.*` as llama.cpp writes them for a byte-level BPE
    vocabulary (default: the tiny tokenizer of mlx_mtp.testing)."""
    import json

    from . import CHAT_TEMPLATE, EOS_TOKEN_ID, build_tokenizer

    tok = tokenizer or build_tokenizer()
    spec = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["content"] for a in spec.get("added_tokens", []) if a.get("special")}
    added = {a["content"] for a in spec.get("added_tokens", [])}
    types = [3 if t in special else 4 if t in added else 1 for t in tokens]
    merges = spec["model"].get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_string("tokenizer.ggml.pre", "qwen35")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if merges:
        w.add_token_merges(merges)
    w.add_eos_token_id(EOS_TOKEN_ID if eos_id is None else eos_id)
    w.add_pad_token_id(0)
    w.add_add_bos_token(False)
    w.add_string("tokenizer.chat_template", chat_template or CHAT_TEMPLATE)
