"""Tiny DeepSeek-V3 and GLM-4.7-Flash checkpoints with their nextn MTP head,
for tests and smoke runs (random weights, nothing downloaded).

The configs carry the released config.json fields (deepseek-ai/DeepSeek-V3,
zai-org/GLM-4.7-Flash) at toy sizes. `write_model_dir` stores the weights
the way those repos do: raw HF names, bfloat16 with the routers'
`e_score_correction_bias` in float32, one tensor per expert, the MLA
`kv_b_proj` unsplit, the nextn layer as decoder layer `num_hidden_layers`
with its own copies of `embed_tokens` and the output head
(`shared_head.head`), sharded under the repos' file names with
model.safetensors.index.json.

`predictable=True` builds a target whose greedy next token is mostly a fixed
permutation of the current one, and a head that knows the permutation
(as `mlx_mtp.testing._make_predictable` does for Qwen3.5): `noise` scales
the residual branches, so drafts are right only part of the time.

    python -m mlx_mtp.testing.deepseek DIR [--family glm4_moe_lite]
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ..models import deepseek_v3, glm4_moe_lite
from . import EOS_TOKEN_ID, VOCAB, write_hf_dir
from .fixtures import init_model, parse_args, pass_through, per_expert, predictable_trunk

FAMILIES = ("deepseek_v3", "glm4_moe_lite")
#: Shard names of the released repos: DeepSeek-V3 has model-00001-of-000163
#: (six digits after "of"), GLM-4.7-Flash model-00001-of-00048.
SHARD_NAMES = {
    "deepseek_v3": "model-{:05d}-of-{:06d}.safetensors",
    "glm4_moe_lite": "model-{:05d}-of-{:05d}.safetensors",
}
#: What the released checkpoints keep in float32 (everything else is bf16).
FLOAT32_TENSORS = ("e_score_correction_bias",)

_MODULES = {"deepseek_v3": deepseek_v3, "glm4_moe_lite": glm4_moe_lite}


def deepseek_v3_config(**overrides) -> dict:
    """DeepSeek-V3's config.json (the bf16 layout: no quantization_config)
    at toy size. Sizes differ from the release; every field name, the yarn
    rope_scaling, the routing (noaux_tc, sigmoid, grouped top-k) and the
    dense-then-MoE layout are as published. Published values in comments."""
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": EOS_TOKEN_ID,  # 1, as published
        "ep_size": 1,
        "first_k_dense_replace": 1,  # 3
        "hidden_act": "silu",
        "hidden_size": 64,  # 7168
        "initializer_range": 0.02,
        "intermediate_size": 96,  # 18432
        "kv_lora_rank": 32,  # 512
        "max_position_embeddings": 163840,
        "moe_intermediate_size": 32,  # 2048
        "moe_layer_freq": 1,
        "n_group": 4,  # 8
        "n_routed_experts": 8,  # 256
        "n_shared_experts": 1,
        "norm_topk_prob": True,
        "num_attention_heads": 4,  # 128
        "num_experts_per_tok": 2,  # 8
        "num_hidden_layers": 2,  # 61
        "num_key_value_heads": 4,  # 128
        "num_nextn_predict_layers": 1,
        "pretraining_tp": 1,
        "q_lora_rank": 48,  # 1536
        "qk_nope_head_dim": 16,  # 128
        "qk_rope_head_dim": 8,  # 64
        "rms_norm_eps": 1e-06,
        "rope_scaling": {
            "beta_fast": 32,
            "beta_slow": 1,
            "factor": 40,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096,
            "type": "yarn",
        },
        "rope_theta": 10000,
        "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": 2,  # 4
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "v_head_dim": 16,  # 128
        "vocab_size": VOCAB,  # 129280
    }
    cfg.update(overrides)
    return cfg


def glm4_moe_lite_config(**overrides) -> dict:
    """GLM-4.7-Flash's config.json at toy size (field for field as released;
    published values in comments)."""
    cfg = {
        "architectures": ["Glm4MoeLiteForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "pad_token_id": 0,  # 154820
        "eos_token_id": [EOS_TOKEN_ID],  # [154820, 154827, 154829]
        "hidden_act": "silu",
        "hidden_size": 64,  # 2048
        "intermediate_size": 96,  # 10240
        "max_position_embeddings": 202752,
        "model_type": "glm4_moe_lite",
        "moe_intermediate_size": 32,  # 1536
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "num_attention_heads": 4,  # 20
        "n_group": 1,
        "topk_group": 1,
        "n_routed_experts": 8,  # 64
        "n_shared_experts": 1,
        "routed_scaling_factor": 1.8,
        "num_experts_per_tok": 2,  # 4
        "first_k_dense_replace": 1,
        "num_hidden_layers": 2,  # 47
        "num_key_value_heads": 4,  # 20
        "num_nextn_predict_layers": 1,
        "partial_rotary_factor": 1.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "transformers_version": "5.0.0rc0",
        "q_lora_rank": 48,  # 768
        "kv_lora_rank": 32,  # 512
        "qk_nope_head_dim": 24,  # 192
        "qk_rope_head_dim": 8,  # 64
        "v_head_dim": 32,  # 256
        "vocab_size": VOCAB,  # 154880
    }
    cfg.update(overrides)
    return cfg


def config(family: str, **overrides) -> dict:
    """The tiny config of `family` ("deepseek_v3" or "glm4_moe_lite")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    return (deepseek_v3_config if family == "deepseek_v3" else glm4_moe_lite_config)(**overrides)


def model_classes(cfg: dict) -> Tuple[type, type]:
    """(Model, ModelArgs) of a config's family."""
    module = _MODULES[cfg["model_type"]]
    return module.Model, module.ModelArgs


def build(cfg: dict, seed: int = 0, predictable: bool = False, noise: float = 0.3) -> nn.Module:
    """A randomly initialised model with its nextn head (float32)."""
    mx.random.seed(seed)
    model_class, args_class = model_classes(cfg)
    model = model_class(args_class.from_dict(copy.deepcopy(cfg)))
    # Correction biases non-negative, so every biased score stays positive:
    # mlx-lm drops the losing groups by zeroing their scores where
    # DeepSeek's and transformers' routers mask them with -inf, and the two
    # agree only while a zero cannot beat a kept expert's score.
    return init_model(model, seed, predictable, noise, _make_predictable,
                      [("e_score_correction_bias", lambda rng, shape: rng.uniform(0.0, 0.2, shape))])


def _make_predictable(model: nn.Module, params: Dict[str, np.ndarray], rng, noise: float) -> None:
    H = model.hidden_size
    predictable_trunk(params, rng, model.vocab_size, H, noise)
    for i in range(getattr(model, "declared_mtp_layers", 0)):
        # eh_proj reads mostly the embedding half: the head then predicts
        # perm[t_{i+1}] = t_{i+2}, the token after the one it is given.
        params[f"mtp.layers.{i}.eh_proj.weight"] = pass_through(rng, H)
        # The released heads' shared_head.head holds the output head's values.
        params[f"mtp.layers.{i}.shared_head.head.weight"] = params["lm_head.weight"].copy()




def hf_weights(model: nn.Module, drop_mtp: bool = False) -> Dict[str, mx.array]:
    """`model`'s weights named and laid out as the released raw checkpoints:
    per-expert `mlp.experts.E.*`, `self_attn.kv_b_proj` rebuilt from mlx-lm's
    split `embed_q` / `unembed_out`, and the head as decoder layer
    `num_hidden_layers + i` with its own `embed_tokens` copy."""
    args = model.args
    L = args.num_hidden_layers
    flat = dict(tree_flatten(model.parameters()))
    out: Dict[str, mx.array] = {}
    for source, value in flat.items():
        name = source
        if source.startswith("mtp."):
            if drop_mtp:
                continue
            m = re.match(r"^mtp\.layers\.(\d+)\.(.+)$", source)
            name = f"model.layers.{L + int(m.group(1))}.{m.group(2)}"
        if name.endswith(".self_attn.unembed_out.weight"):
            continue  # written with embed_q as kv_b_proj
        if name.endswith(".self_attn.embed_q.weight"):
            wk = value  # [heads, kv_lora_rank, nope]
            wv = flat[source.replace("embed_q", "unembed_out")]  # [heads, v_head_dim, kv_lora_rank]
            kv_b = mx.concatenate([wk.swapaxes(-1, -2), wv], axis=1)  # [heads, nope + v, kv_lora_rank]
            out[name.replace("embed_q.weight", "kv_b_proj.weight")] = kv_b.reshape(-1, kv_b.shape[-1])
            continue
        experts = per_expert(name, value)
        if experts is not None:
            out.update(experts)
            continue
        out[name] = value
    if not drop_mtp and model.has_mtp:
        for i in range(len(model.mtp.layers)):
            out[f"model.layers.{L + i}.embed_tokens.weight"] = flat["model.embed_tokens.weight"]
    return out


def released_dtypes(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """bf16, with `FLOAT32_TENSORS` in float32, as the released repos store them."""
    return {k: v.astype(mx.float32 if k.endswith(FLOAT32_TENSORS) else mx.bfloat16) for k, v in weights.items()}


def write_model_dir(path: Path, family: str = "deepseek_v3", cfg: Optional[dict] = None, seed: int = 0,
                    noise: float = 1.6, drop_mtp: bool = False, shards: int = 3) -> Path:
    """A complete model directory: sharded bf16 raw-HF safetensors with the
    index, config.json, generation_config.json and a tokenizer. `drop_mtp`
    leaves out the nextn layer but keeps `num_nextn_predict_layers` in the
    config, as conversions that strip the head do. The default `noise`
    makes the head right about half of the time."""
    cfg = config(family) if cfg is None else cfg
    model = build(cfg, seed=seed, predictable=True, noise=noise)
    weights = released_dtypes(hf_weights(model, drop_mtp=drop_mtp))
    generation = {"bos_token_id": 0, "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    return write_hf_dir(path, weights, cfg, shards, SHARD_NAMES[cfg["model_type"]], generation)


def main(argv: Optional[list] = None) -> None:
    args = parse_args(argv, "python -m mlx_mtp.testing.deepseek",
                      "Write a tiny predictable DeepSeek-V3 / GLM-4.7-Flash checkpoint with its nextn head.",
                      noise=1.6, extra=lambda ap: ap.add_argument("--family", choices=FAMILIES, default="deepseek_v3"))
    path = write_model_dir(Path(args.output_dir), args.family, seed=args.seed, noise=args.noise)
    print(f"wrote a tiny {args.family} checkpoint with its nextn head (random weights) to {path}")


if __name__ == "__main__":
    main()
