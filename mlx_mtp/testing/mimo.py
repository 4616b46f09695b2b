"""Tiny MiMo (`mimo`) checkpoints with their MTP head, for tests and smoke
runs (random weights, nothing downloaded).

`config()` has the field names of XiaomiMiMo/MiMo-7B-RL's config.json at toy
sizes (`num_nextn_predict_layers: 1`, q/k/v biases, remote-code `auto_map`);
`build()` makes a float32 model (predictable: the head is right often, not
always); `write_model_dir()` stores it the way the released repos do: bf16
shards with `model.safetensors.index.json`, the head as
`model.mtp_layers.{k}.*` (no copy of `embed_tokens` or `lm_head`: the
engines take the trunk's).

    python -m mlx_mtp.testing.mimo DIR
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..models import mimo
from . import EOS_TOKEN_ID, VOCAB, write_hf_dir
from .fixtures import init_model, parse_args, pass_through, predictable_trunk, small_normal_draw

SHARD_NAME = "model-{:05d}-of-{:05d}.safetensors"


def config(num_hidden_layers: int = 3, mtp_layers: int = 1, **overrides) -> dict:
    """MiMo-7B-RL's config.json fields at toy sizes."""
    cfg = {
        "architectures": ["MiMoForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_mimo.MiMoConfig",
            "AutoModel": "modeling_mimo.MiMoModel",
            "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM",
        },
        "bos_token_id": 0,
        "eos_token_id": EOS_TOKEN_ID,
        "hidden_act": "silu",
        "hidden_size": 64,
        "initializer_range": 0.02,
        "intermediate_size": 96,
        "max_position_embeddings": 2048,
        "max_window_layers": num_hidden_layers,
        "model_type": "mimo",
        "num_attention_heads": 4,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": 2,
        "num_nextn_predict_layers": mtp_layers,
        "rms_norm_eps": 1e-5,
        "rope_scaling": None,
        "rope_theta": 640000,
        "sliding_window": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": VOCAB,
    }
    cfg.update(overrides)
    return cfg


def build(cfg: Optional[dict] = None, seed: int = 0, predictable: bool = False, noise: float = 0.3) -> mimo.Model:
    """A float32 `mimo.Model` with random weights and its head;
    `predictable` and `noise` as `fixtures.init_model` takes them."""
    cfg = copy.deepcopy(cfg or config())
    mx.random.seed(seed)
    model = mimo.Model(mimo.ModelArgs.from_dict(cfg))
    return init_model(model, seed, predictable, noise, _make_predictable, [("bias", small_normal_draw)])


def _make_predictable(model: mimo.Model, params: Dict[str, np.ndarray], rng, noise: float) -> None:
    # Same scheme as mlx_mtp.testing._make_predictable, in MiMo's names.
    H = model.hidden_size
    predictable_trunk(params, rng, model.vocab_size, H, noise)
    for i in range(len(model.mtp.layers) if "mtp" in model else 0):
        # input_proj reads [hidden, embedding] (MiMo's order): pass the
        # embedding half on, so a swapped order would lose the head its skill.
        params[f"mtp.layers.{i}.input_proj.weight"] = pass_through(rng, H, embedding_first=False)


def hf_weights(model: mimo.Model, drop_mtp: bool = False) -> Dict[str, mx.array]:
    """`model`'s weights under the released checkpoints' names: the head as
    `model.mtp_layers.{k}.*`, everything else as mlx-lm names it."""
    out: Dict[str, mx.array] = {}
    for name, value in tree_flatten(model.parameters()):
        if name.startswith("mtp."):
            if drop_mtp:
                continue
            name = "model.mtp_layers." + name[len("mtp.layers."):]
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
    model: Optional[mimo.Model] = None,
) -> Path:
    """A complete raw-HF model directory: bf16 shards + index, config.json,
    generation_config.json and a tokenizer. `drop_mtp`: the head's tensors
    stripped (config still declares it), as mlx-lm's conversion leaves it."""
    cfg = copy.deepcopy(cfg or config())
    model = model if model is not None else build(cfg, seed=seed, predictable=True, noise=noise)
    weights = {k: v.astype(mx.bfloat16) for k, v in hf_weights(model, drop_mtp=drop_mtp).items()}
    return write_hf_dir(path, weights, cfg, shards, SHARD_NAME)


def main(argv=None) -> None:
    """python -m mlx_mtp.testing.mimo DIR [--noise X] [--seed N]"""
    args = parse_args(argv, "python -m mlx_mtp.testing.mimo",
                      "Write a tiny predictable MiMo + MTP checkpoint (random weights).", noise=0.3)
    path = write_model_dir(Path(args.output_dir), seed=args.seed, noise=args.noise)
    print(f"wrote a tiny MiMo + MTP checkpoint (random weights) to {path}")


if __name__ == "__main__":
    main()
