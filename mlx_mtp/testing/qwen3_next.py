"""Tiny Qwen3-Next (`qwen3_next`) checkpoints with their MTP head, for tests
and smoke runs (random weights, nothing downloaded).

`config()` has the field names of Qwen/Qwen3-Next-80B-A3B-Instruct's
config.json at toy sizes (and, like it, no field counting the MTP layers);
`build()` makes a float32 model (predictable: the head is right often, not
always); `write_model_dir()` stores it the way the released repo does: bf16
shards with `model.safetensors.index.json`, one tensor per expert
(`...mlp.experts.E.{gate,up,down}_proj.weight`, head included), the conv
weights as `[C, 1, K]`, zero-centred norms (stored w - 1) except the gated
`linear_attn.norm`, and the head as `mtp.*`.

    python -m mlx_mtp.testing.qwen3_next DIR
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..loading.writers import is_norm
from ..models import qwen3_next
from . import EOS_TOKEN_ID, VOCAB, write_hf_dir
from .fixtures import BRANCHES, SSM_DRAWS, init_model, parse_args, pass_through, per_expert, predictable_trunk

SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"
#: Norms stored zero-centred in raw HF (transformers' `Qwen3NextRMSNorm`:
#: x * (1 + w)); `linear_attn.norm` (`Qwen3NextRMSNormGated`) is plain.
ZERO_CENTRED = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                ".q_norm.weight", ".k_norm.weight")


def config(num_hidden_layers: int = 3, **overrides) -> dict:
    """Qwen3-Next-80B-A3B-Instruct's config.json fields at toy sizes: every
    `full_attention_interval`-th layer gated attention, the rest Gated
    DeltaNet, every layer MoE (4 experts, top 2, a gated shared expert)."""
    cfg = {
        "architectures": ["Qwen3NextForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "decoder_sparse_step": 1,
        "eos_token_id": EOS_TOKEN_ID,
        "full_attention_interval": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 16,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_value_head_dim": 16,
        "max_position_embeddings": 2048,
        "mlp_only_layers": [],
        "model_type": "qwen3_next",
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": 2,
        "output_router_logits": False,
        "partial_rotary_factor": 0.25,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 10000000,
        "router_aux_loss_coef": 0.001,
        "shared_expert_intermediate_size": 48,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.57.0.dev0",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }
    cfg.update(overrides)
    if "layer_types" not in overrides:
        interval = cfg["full_attention_interval"]
        cfg["layer_types"] = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(cfg["num_hidden_layers"])
        ]
    return cfg


def _norm_value(rng, shape) -> np.ndarray:
    # 1 + k/128: then the stored w = k/128 and mlx-lm's bf16 `w + 1.0` are
    # exact, so a loaded bf16 checkpoint cast to float32 holds exactly the
    # weights a float32 reference computes (1 + w) from.
    return 1.0 + np.round(12.8 * rng.standard_normal(shape)) / 128


def build(cfg: Optional[dict] = None, seed: int = 0, predictable: bool = False, noise: float = 0.3) -> qwen3_next.Model:
    """A float32 `qwen3_next.Model` with random weights and its head;
    `predictable` and `noise` as `fixtures.init_model` takes them."""
    cfg = copy.deepcopy(cfg or config())
    mx.random.seed(seed)
    model = qwen3_next.Model(qwen3_next.ModelArgs.from_dict(cfg))
    return init_model(model, seed, predictable, noise, _make_predictable, SSM_DRAWS, norm=_norm_value)


def _make_predictable(model: qwen3_next.Model, params: Dict[str, np.ndarray], rng, noise: float) -> None:
    # Same scheme as mlx_mtp.testing._make_predictable, in Qwen3-Next's names.
    H = model.hidden_size
    predictable_trunk(params, rng, model.vocab_size, H, noise, branches=BRANCHES + ("out_proj.weight",))
    if "mtp.fc.weight" in params:  # fc reads [embedding, hidden]: pass the embedding on
        params["mtp.fc.weight"] = pass_through(rng, H)


def hf_weights(model: qwen3_next.Model, drop_mtp: bool = False) -> Dict[str, mx.array]:
    """`model`'s weights under the released checkpoint's names and layout:
    per-expert tensors, conv weights `[C, 1, K]`, zero-centred norms, the
    head as `mtp.*` (its norms all zero-centred too)."""
    out: Dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        if name.startswith("mtp.") and drop_mtp:
            continue
        if name.endswith(ZERO_CENTRED) or (name.startswith("mtp.") and is_norm(name)):
            value = value - 1.0
        if name.endswith("conv1d.weight"):
            value = value.moveaxis(2, 1)
        experts = per_expert(name, value)
        if experts is not None:
            out.update(experts)
            continue
        out[name] = value
    return out


def write_model_dir(
    path: Path,
    cfg: Optional[dict] = None,
    *,
    seed: int = 0,
    noise: float = 0.3,
    drop_mtp: bool = False,
    shards: int = 2,
    model: Optional[qwen3_next.Model] = None,
) -> Path:
    """A complete raw-HF model directory: bf16 shards + index, config.json,
    generation_config.json and a tokenizer. `drop_mtp`: the head's tensors
    stripped, as mlx-lm's conversion leaves a checkpoint."""
    cfg = copy.deepcopy(cfg or config())
    model = model if model is not None else build(cfg, seed=seed, predictable=True, noise=noise)
    weights = {k: v.astype(mx.bfloat16) for k, v in hf_weights(model, drop_mtp=drop_mtp).items()}
    return write_hf_dir(path, weights, cfg, shards, SHARD_NAME)


def main(argv=None) -> None:
    """python -m mlx_mtp.testing.qwen3_next DIR [--noise X] [--seed N]"""
    args = parse_args(argv, "python -m mlx_mtp.testing.qwen3_next",
                      "Write a tiny predictable Qwen3-Next + MTP checkpoint (random weights).", noise=0.3)
    path = write_model_dir(Path(args.output_dir), seed=args.seed, noise=args.noise)
    print(f"wrote a tiny Qwen3-Next + MTP checkpoint (random weights) to {path}")


if __name__ == "__main__":
    main()
