"""Tiny GLM-4.5 (`glm4_moe`) checkpoints with their nextn MTP head, for tests
and smoke runs (random weights, nothing downloaded).

`config()` has the field names of zai-org/GLM-4.5-Air's config.json at toy
sizes; `build()` makes a float32 model (predictable: the head is right often,
not always); `write_model_dir()` stores it the way the released repos do:
bf16 shards with `model.safetensors.index.json`, one tensor per expert
(`model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight`), the router's
`e_score_correction_bias` in float32, and the head as decoder layer
`num_hidden_layers` with its own copy of `embed_tokens` and, GLM-4.5 style,
`shared_head.head` (GLM-4.6 style leaves both out: `shared_head_head=False`).

    python -m mlx_mtp.testing.glm4_moe DIR
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..models import glm4_moe
from . import EOS_TOKEN_ID, VOCAB, write_hf_dir
from .fixtures import init_model, parse_args, pass_through, per_expert, predictable_trunk, small_normal_draw

#: What GLM's bf16 checkpoints keep in float32 (the router's bias, as in DeepSeek-V3's).
FLOAT32_TENSORS = ("mlp.gate.e_score_correction_bias",)
SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"


def config(num_hidden_layers: int = 3, mtp_layers: int = 1, **overrides) -> dict:
    """GLM-4.5-Air's config.json fields at toy sizes: layer 0 dense
    (`first_k_dense_replace: 1`), the rest MoE with 4 routed experts and one
    shared expert, half-width rotary, q/k/v biases, one nextn layer."""
    cfg = {
        "architectures": ["Glm4MoeForCausalLM"],
        "model_type": "glm4_moe",
        "attention_bias": True,
        "attention_dropout": 0.0,
        "pad_token_id": 0,
        "eos_token_id": [EOS_TOKEN_ID],
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "partial_rotary_factor": 0.5,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "max_position_embeddings": 2048,
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "n_group": 1,
        "topk_group": 1,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        # GLM-4.5/4.6/4.7 use 2.5 (Air 1.0): anything but 1 shows a missed factor.
        "routed_scaling_factor": 2.5,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "num_nextn_predict_layers": mtp_layers,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0",
        "use_cache": True,
        # GLM-4.5 has q/k norms (Air does not): on here, so they are covered.
        "use_qk_norm": True,
        "vocab_size": VOCAB,
    }
    cfg.update(overrides)
    return cfg


def build(cfg: Optional[dict] = None, seed: int = 0, predictable: bool = False, noise: float = 0.3) -> glm4_moe.Model:
    """A float32 `glm4_moe.Model` with random weights and its head;
    `predictable` and `noise` as `fixtures.init_model` takes them."""
    cfg = copy.deepcopy(cfg or config())
    mx.random.seed(seed)
    model = glm4_moe.Model(glm4_moe.ModelArgs.from_dict(cfg))
    return init_model(model, seed, predictable, noise, _make_predictable, [("bias", small_normal_draw)])


def _make_predictable(model: glm4_moe.Model, params: Dict[str, np.ndarray], rng, noise: float) -> None:
    # Same scheme as mlx_mtp.testing._make_predictable, in GLM's names.
    H = model.hidden_size
    predictable_trunk(params, rng, model.vocab_size, H, noise)
    for i in range(len(model.mtp.layers) if "mtp" in model else 0):
        head = f"mtp.layers.{i}."
        params[head + "eh_proj.weight"] = pass_through(rng, H)
        # "shared" head: the trunk's output head (GLM-4.6+ store only that one).
        params[head + "shared_head.head.weight"] = params["lm_head.weight"]


def hf_weights(model: glm4_moe.Model, drop_mtp: bool = False, shared_head_head: bool = True) -> Dict[str, mx.array]:
    """`model`'s weights under the released checkpoints' names: per-expert
    tensors, the head as `model.layers.{num_hidden_layers + i}.*` with its
    duplicate `embed_tokens`; `shared_head_head=False` leaves that and the
    head's `shared_head.head` out, as GLM-4.6 does."""
    first = model.args.num_hidden_layers
    flat = dict(tree_flatten(model.parameters()))
    out: Dict[str, mx.array] = {}
    for name, value in flat.items():
        if name.startswith("mtp."):
            if drop_mtp:
                continue
            _, _, i, rest = name.split(".", 3)
            if rest.startswith("shared_head.head.") and not shared_head_head:
                continue
            name = f"model.layers.{first + int(i)}.{rest}"
        experts = per_expert(name, value)
        if experts is not None:
            out.update(experts)
            continue
        out[name] = value
    if not drop_mtp and shared_head_head and "mtp" in model:
        for i in range(len(model.mtp.layers)):
            out[f"model.layers.{first + i}.embed_tokens.weight"] = flat["model.embed_tokens.weight"]
    return out


def write_model_dir(
    path: Path,
    cfg: Optional[dict] = None,
    *,
    seed: int = 0,
    noise: float = 1.2,
    drop_mtp: bool = False,
    declare_mtp: bool = True,
    shared_head_head: bool = True,
    shards: int = 2,
    model: Optional[glm4_moe.Model] = None,
) -> Path:
    """A complete raw-HF model directory: bf16 shards + index, config.json,
    generation_config.json and a tokenizer. `drop_mtp`: the head's tensors
    stripped (config still declares it); `declare_mtp=False`: the tensors
    kept but `num_nextn_predict_layers: 0`. The default `noise` makes the
    head right about half of the time; `model` stores that model instead."""
    cfg = copy.deepcopy(cfg or config())
    model = model if model is not None else build(cfg, seed=seed, predictable=True, noise=noise)
    weights = {
        k: v.astype(mx.float32 if k.endswith(FLOAT32_TENSORS) else mx.bfloat16)
        for k, v in hf_weights(model, drop_mtp=drop_mtp, shared_head_head=shared_head_head).items()
    }
    if not declare_mtp:
        cfg["num_nextn_predict_layers"] = 0
    return write_hf_dir(path, weights, cfg, shards, SHARD_NAME)


def main(argv=None) -> None:
    """python -m mlx_mtp.testing.glm4_moe DIR [--noise X] [--seed N]"""
    args = parse_args(argv, "python -m mlx_mtp.testing.glm4_moe",
                      "Write a tiny predictable GLM-4.5 + nextn checkpoint (random weights).", noise=1.2,
                      noise_help="how far the trunk strays from the predictable rule "
                      "(1.2: the head is right about half of the time)")
    path = write_model_dir(Path(args.output_dir), seed=args.seed, noise=args.noise)
    print(f"wrote a tiny GLM-4.5 + nextn checkpoint (random weights) to {path}")


if __name__ == "__main__":
    main()
