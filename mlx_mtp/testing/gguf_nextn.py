"""Tiny glm4moe / deepseek2 GGUF files with their nextn MTP block, laid out
the way llama.cpp's converter writes them (loading/gguf/nextn.py says where
each fact was checked): block_count counting the nextn block,
`nextn_predict_layers`, `blk.L.nextn.*` with the duplicate `embed_tokens`,
stacked experts, `exp_probs_b.bias`, and for deepseek2 MLA written as MQA
(head_count_kv 1, key/value_length_mla) with kv_b split into `attn_k_b` /
`attn_v_b` (or, `kv_b="fused"`, an old file's `attn_kv_b`).

The configs mirror the released config.json files (GLM-4.5-Air,
DeepSeek-V3, GLM-4.7-Flash) at tiny sizes, and `build_nextn_model` gives a
predictable model whose head is right about half of the time, so greedy
speculative runs see acceptances and rejections.

`write_nextn_gguf` returns the weights as stored (dequantized, in our module
layout, with what the loader substitutes for omitted head tensors), so a
test can load the very same values into the float model and compare.

    python -m mlx_mtp.testing.gguf_nextn DIR   # DIR/{glm4_moe,deepseek_v3,glm4_moe_lite}.gguf
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Optional, Union

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..loading.gguf import deepseek2, glm4moe
from ..loading.gguf.nextn import MOE_NAMES, NEXTN_NAMES, TOP_NAMES, model_classes
from . import VOCAB
from .fixtures import load_params, parse_args, pass_through, predictable_trunk, random_params, small_normal_draw
from .gguf import QType, add_tensor, default_qtype, finish, write_tokenizer_metadata

#: The converter's kinds of file: the whole model; `--no-mtp` (and what
#: DeepSeek-V3 always gets: no nextn block, block_count without it, no
#: nextn_predict_layers); a trunk whose metadata still declare the head;
#: `--mtp` (the head's block plus token_embd / output_norm / output).
LAYOUTS = ("full", "no-mtp", "trunk", "mtp-only")
ARCH_OF = {"glm4_moe": "glm4moe", "deepseek_v3": "deepseek2", "glm4_moe_lite": "deepseek2"}
NAMES = {"glm4_moe": "GLM-4.5-Air tiny", "deepseek_v3": "DeepSeek-V3 tiny", "glm4_moe_lite": "GLM-4.7-Flash tiny"}


# --- configs (released field names, tiny sizes) --------------------------------


def glm4_moe_config(**overrides: Any) -> Dict[str, Any]:
    """GLM-4.5-Air's config.json fields at test size (hidden 64, 2 trunk
    layers: one dense, one MoE, plus the nextn layer)."""
    cfg = {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe",
        "attention_bias": True, "attention_dropout": 0.0, "head_dim": 16, "hidden_act": "silu",
        "hidden_size": 64, "partial_rotary_factor": 0.5, "initializer_range": 0.02,
        "intermediate_size": 96, "max_position_embeddings": 4096, "moe_intermediate_size": 32,
        "norm_topk_prob": True, "num_attention_heads": 4, "n_group": 1, "topk_group": 1,
        "n_routed_experts": 4, "n_shared_experts": 1, "routed_scaling_factor": 1.0,
        "num_experts_per_tok": 2, "first_k_dense_replace": 1, "num_hidden_layers": 2,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_scaling": None, "rope_theta": 1000000.0,
        "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": True, "use_qk_norm": False, "vocab_size": VOCAB, "eos_token_id": 1,
    }
    cfg.update(overrides)
    return cfg


def deepseek_v3_config(**overrides: Any) -> Dict[str, Any]:
    """DeepSeek-V3's config.json fields at test size: MLA with q_lora, grouped
    sigmoid routing (2 groups, 1 used), routed scaling 2.5."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0,
        "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 1, "hidden_act": "silu",
        "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 96, "kv_lora_rank": 32,
        "max_position_embeddings": 4096, "moe_intermediate_size": 32, "moe_layer_freq": 1,
        "n_group": 2, "n_routed_experts": 4, "n_shared_experts": 1, "norm_topk_prob": True,
        "num_attention_heads": 4, "num_experts_per_tok": 2, "num_hidden_layers": 2,
        "num_key_value_heads": 4, "num_nextn_predict_layers": 1, "q_lora_rank": 32,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "rms_norm_eps": 1e-6, "rope_scaling": None,
        "rope_theta": 10000.0, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
        "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
        "use_cache": True, "v_head_dim": 32, "vocab_size": VOCAB,
    }
    cfg.update(overrides)
    return cfg


def glm4_moe_lite_config(**overrides: Any) -> Dict[str, Any]:
    """GLM-4.7-Flash's config.json fields at test size (MLA, one group,
    rms_norm_eps 1e-5, routed scaling 1.8)."""
    cfg = deepseek_v3_config(
        architectures=["Glm4MoeLiteForCausalLM"], model_type="glm4_moe_lite", n_group=1, topk_group=1,
        rms_norm_eps=1e-5, rope_theta=1000000.0, routed_scaling_factor=1.8, partial_rotary_factor=1.0,
    )
    for k in ("aux_loss_alpha", "ep_size", "seq_aux"):
        cfg.pop(k)
    cfg.update(overrides)
    return cfg


CONFIGS = {"glm4_moe": glm4_moe_config, "deepseek_v3": deepseek_v3_config, "glm4_moe_lite": glm4_moe_lite_config}


# --- a predictable float model ------------------------------------------------


def build_nextn_model(config: Dict[str, Any], seed: int = 0, predictable: bool = True, noise: float = 1.6):
    """A float32 model of `config`'s family with its nextn head.

    `predictable`: the next token is mostly a fixed permutation of the
    current one (embedding rows and LM head built from it), the head's
    eh_proj passes the embedding through and its shared head is the LM head,
    so it predicts the token after next; `noise` scales the residual
    branches, making the head right only some of the time."""
    cls, args_cls = model_classes(config["model_type"])
    model = cls(args_cls.from_dict(copy.deepcopy(config)))
    rng = np.random.default_rng(seed)
    params = random_params(model, rng, [("e_score_correction_bias", small_normal_draw)])
    if predictable:
        H = config["hidden_size"]
        predictable_trunk(params, rng, config["vocab_size"], H, noise)
        for name in list(params):
            if name.endswith("shared_head.head.weight"):
                params[name] = params["lm_head.weight"]
            if name.endswith("eh_proj.weight"):
                params[name] = pass_through(rng, H)
    return load_params(model, params)


# --- the writer -----------------------------------------------------------------


def _inverse_names(model_type: str) -> Dict[str, str]:
    layer = glm4moe.LAYER_NAMES if ARCH_OF[model_type] == "glm4moe" else deepseek2.LAYER_NAMES
    out = {v: k for k, v in {**layer, **MOE_NAMES}.items()}
    out.pop("self_attn.kv_b_proj.weight", None)
    return out


def _gguf_name(name: str, num_layers: int, inverse: Dict[str, str]) -> str:
    inv_top = {v: k for k, v in TOP_NAMES.items()}
    if name in inv_top:
        return inv_top[name]
    if name.startswith("model.layers."):
        i, rest = name[len("model.layers."):].split(".", 1)
        return f"blk.{i}.{inverse[rest]}"
    if name.startswith("mtp.layers."):
        j, rest = name[len("mtp.layers."):].split(".", 1)
        nextn = {v: k for k, v in NEXTN_NAMES.items()}
        return f"blk.{num_layers + int(j)}.{nextn.get(rest) or inverse[rest]}"
    raise KeyError(name)


def converter_metadata(config: Dict[str, Any], arch: str, blocks: int, n_mtp: int, name: str) -> Dict[str, Any]:
    """{key: value} as convert_hf_to_gguf.py writes them (TextModel's
    set_gguf_parameters plus Glm4MoeModel's or DeepseekV2Model's own);
    ints are uint32, floats float32."""
    c = config
    meta: Dict[str, Any] = {
        "general.name": name,
        f"{arch}.block_count": blocks,
        f"{arch}.context_length": c["max_position_embeddings"],
        f"{arch}.embedding_length": c["hidden_size"],
        f"{arch}.feed_forward_length": c["intermediate_size"],
        f"{arch}.attention.head_count": c["num_attention_heads"],
        f"{arch}.rope.freq_base": float(c["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(c["rms_norm_eps"]),
        f"{arch}.expert_count": c["n_routed_experts"],
        f"{arch}.expert_used_count": c["num_experts_per_tok"],
        f"{arch}.expert_group_count": c["n_group"],
        f"{arch}.expert_group_used_count": c["topk_group"],
        f"{arch}.expert_gating_func": 2,  # sigmoid
        f"{arch}.expert_feed_forward_length": c["moe_intermediate_size"],
        f"{arch}.expert_shared_count": c["n_shared_experts"] or 0,
        f"{arch}.leading_dense_block_count": c["first_k_dense_replace"],
        f"{arch}.expert_weights_scale": float(c["routed_scaling_factor"]),
    }
    if c["norm_topk_prob"]:  # DeepseekV2Model writes it only when true
        meta[f"{arch}.expert_weights_norm"] = True
    if arch == "glm4moe":
        meta.update({
            f"{arch}.attention.head_count_kv": c["num_key_value_heads"],
            f"{arch}.attention.key_length": c["head_dim"],
            f"{arch}.attention.value_length": c["head_dim"],
            f"{arch}.rope.dimension_count": int(c["head_dim"] * c["partial_rotary_factor"]),
        })
    else:
        kv, rope = c["kv_lora_rank"], c["qk_rope_head_dim"]
        meta.update({
            f"{arch}.attention.head_count_kv": 1,  # MLA written as MQA
            f"{arch}.vocab_size": c["vocab_size"],
            f"{arch}.attention.kv_lora_rank": kv,
            f"{arch}.attention.key_length": kv + rope,
            f"{arch}.attention.value_length": kv,
            f"{arch}.attention.key_length_mla": c["qk_nope_head_dim"] + rope,
            f"{arch}.attention.value_length_mla": c["v_head_dim"],
            f"{arch}.rope.dimension_count": rope,
        })
        if c.get("q_lora_rank"):
            meta[f"{arch}.attention.q_lora_rank"] = c["q_lora_rank"]
        scaling = c.get("rope_scaling")
        if scaling:
            meta.update({
                f"{arch}.rope.scaling.type": scaling["type"],
                f"{arch}.rope.scaling.factor": float(scaling["factor"]),
                f"{arch}.rope.scaling.original_context_length": scaling["original_max_position_embeddings"],
                f"{arch}.rope.scaling.yarn_log_multiplier": 0.1 * scaling["mscale_all_dim"],
            })
    if n_mtp:
        meta[f"{arch}.nextn_predict_layers"] = n_mtp
    return meta


def _add_metadata(w, meta: Dict[str, Any]) -> None:
    for key, value in meta.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)


def write_nextn_gguf(
    model,
    config: Dict[str, Any],
    path: Union[str, Path],
    qtype: QType = "F32",
    layout: str = "full",
    kv_b: str = "split",
    shared_head: bool = True,
    fuse_gate_up: bool = False,
    tokenizer: bool = True,
    seed: int = 0,
    name: Optional[str] = None,
    metadata: Optional[Dict[str, Any]] = None,
    extra_tensors: Optional[Dict[str, np.ndarray]] = None,
) -> Dict[str, np.ndarray]:
    """Write `model` (a float model of `config`'s family) as a llama.cpp-style
    glm4moe / deepseek2 GGUF.

    qtype: a GGUF type name for every matrix, or fn(gguf_name, shape) -> name.
    layout: one of LAYOUTS. kv_b: "split" (attn_k_b / attn_v_b, what the
    converter writes) or "fused" (an old file's attn_kv_b). shared_head=False
    leaves out the optional nextn.shared_head_head / shared_head_norm;
    fuse_gate_up writes the experts' gate and up as one `ffn_gate_up_exps`
    (gate rows first), as `--fuse-gate-up-exps` does.
    metadata: keys to set or replace (None deletes); extra_tensors: more
    float32 tensors to write as they are (bad-file tests use both).
    Returns {module path: stored values in our layout}."""
    import gguf

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {', '.join(LAYOUTS)}")
    if kv_b not in ("split", "fused"):
        raise ValueError(f"kv_b {kv_b!r} is not 'split' or 'fused'")
    model_type = config["model_type"]
    arch = ARCH_OF[model_type]
    pick = default_qtype(qtype) if isinstance(qtype, str) else qtype
    L = config["num_hidden_layers"]
    n_mtp = config.get("num_nextn_predict_layers", 0)
    blocks = L if layout == "no-mtp" else L + n_mtp
    inverse = _inverse_names(model_type)

    w = gguf.GGUFWriter(str(path), arch)
    meta = converter_metadata(config, arch, blocks, 0 if layout == "no-mtp" else n_mtp, name or NAMES[model_type])
    meta.update(metadata or {})
    _add_metadata(w, {k: v for k, v in meta.items() if v is not None})
    if tokenizer:
        write_tokenizer_metadata(w)

    params = dict(tree_flatten(model.parameters()))
    stored: Dict[str, np.ndarray] = {}
    written_head = layout in ("full", "mtp-only")
    for i, (pname, value) in enumerate(params.items()):
        head = pname.startswith("mtp.")
        if head and not written_head:
            continue
        if layout == "mtp-only" and not head and pname not in TOP_NAMES.values():
            continue
        if head and not shared_head and pname.endswith((".shared_head.head.weight", ".shared_head.norm.weight")):
            continue
        x = np.array(value.astype(mx.float32))
        if kv_b == "fused" and pname.endswith("self_attn.embed_q.weight"):
            # kv_b_proj [heads*(nope+v), kv_lora]: per head, k_b transposed back above v_b.
            v_name = pname.replace("embed_q", "unembed_out")
            wv = np.array(params[v_name].astype(mx.float32))
            fused = np.concatenate([x.swapaxes(-1, -2), wv], axis=1).reshape(-1, x.shape[1])
            gname = _gguf_name(pname, L, inverse).replace("attn_k_b", "attn_kv_b")
            back = add_tensor(w, gname, fused, pick, seed + i)
            nope = x.shape[-1]
            back = back.reshape(x.shape[0], nope + wv.shape[1], x.shape[1])
            stored[pname] = np.ascontiguousarray(back[:, :nope].swapaxes(-1, -2))
            stored[v_name] = np.ascontiguousarray(back[:, nope:])
            continue
        if kv_b == "fused" and pname.endswith("self_attn.unembed_out.weight"):
            continue
        if fuse_gate_up and pname.endswith("switch_mlp.gate_proj.weight"):
            up_name = pname.replace("gate_proj", "up_proj")
            fused = np.concatenate([x, np.array(params[up_name].astype(mx.float32))], axis=-2)
            gname = _gguf_name(pname, L, inverse).replace("ffn_gate_exps", "ffn_gate_up_exps")
            back = add_tensor(w, gname, fused, pick, seed + i)
            stored[pname], stored[up_name] = back[..., : x.shape[-2], :], back[..., x.shape[-2]:, :]
            continue
        if fuse_gate_up and pname.endswith("switch_mlp.up_proj.weight"):
            continue
        stored[pname] = add_tensor(w, _gguf_name(pname, L, inverse), x, pick, seed + i)
    if written_head:
        for j in range(n_mtp):
            # The head's duplicate embedding, as the HF checkpoints carry it.
            add_tensor(w, f"blk.{L + j}.nextn.embed_tokens.weight",
                       np.array(params["model.embed_tokens.weight"].astype(mx.float32)), pick, seed)
            if not shared_head:  # what the loader (and llama.cpp) use instead
                stored[f"mtp.layers.{j}.shared_head.head.weight"] = stored["lm_head.weight"]
                stored[f"mtp.layers.{j}.shared_head.norm.weight"] = stored["model.norm.weight"]
    for gname, x in (extra_tensors or {}).items():
        w.add_tensor(gname, np.asarray(x, dtype=np.float32))
    finish(w)
    return stored


def main(argv=None) -> None:
    """python -m mlx_mtp.testing.gguf_nextn DIR [--qtype T]: one tiny GGUF per family."""
    args = parse_args(argv, "python -m mlx_mtp.testing.gguf_nextn",
                      "Write tiny glm4moe / deepseek2 GGUFs with a nextn MTP head.",
                      extra=lambda ap: ap.add_argument("--qtype", default="F32"), seed=False)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for model_type, make in CONFIGS.items():
        config = make()
        write_nextn_gguf(build_nextn_model(config), config, out / f"{model_type}.gguf", qtype=args.qtype)
        print(f"wrote {out / f'{model_type}.gguf'}")


if __name__ == "__main__":
    main()
