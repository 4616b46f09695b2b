"""Tiny checkpoints of plain mlx-lm architectures (Llama, Qwen3, and a
sliding-window Llama), built from mlx-lm's own ModelArgs and model classes
and saved in mlx-lm's layout with the test tokenizer: targets for prompt
lookup through `MlxLmTarget`. Random weights, nothing downloaded.

`predictable=True` (untied heads only) makes the next token mostly a fixed
permutation of the current one, as `mlx_mtp.testing.build` does for Qwen3.5,
so greedy output runs through the permutation's cycles and repeats itself:
prompt lookup then drafts right much of the time.

    python -m mlx_mtp.testing.mlx_lm_models DIR [--arch llama|qwen3]
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict

import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama, qwen3
from mlx_lm.utils import save_config, save_model

from . import VOCAB, write_tokenizer
from .fixtures import load_params, parse_args, predictable_trunk, random_params

ARCHITECTURES = {"llama": (llama.Model, llama.ModelArgs), "qwen3": (qwen3.Model, qwen3.ModelArgs)}


def config(arch: str = "llama", **overrides: Any) -> Dict[str, Any]:
    """A tiny config (hidden 64, 2 layers) for `arch`, in HF key names."""
    cfg = {
        "model_type": arch,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": arch == "qwen3",  # one tied head, one lm_head
        "eos_token_id": 1,
    }
    cfg.update(overrides)
    return cfg


def build(cfg: Dict[str, Any], seed: int = 0, predictable: bool = False, noise: float = 0.5) -> nn.Module:
    """mlx-lm's own model for `cfg` with random float32 weights."""
    cls, args_cls = ARCHITECTURES[cfg["model_type"]]
    model = cls(args_cls.from_dict(copy.deepcopy(cfg)))
    rng = np.random.default_rng(seed)
    params = random_params(model, rng, norm_test=lambda name: "norm" in name)
    if predictable:
        if cfg["tie_word_embeddings"]:
            raise ValueError("predictable models need an untied lm_head (it encodes the permutation)")
        predictable_trunk(params, rng, cfg["vocab_size"], cfg["hidden_size"], noise)
    return load_params(model, params)


def write_model_dir(path: Path, arch: str = "llama", seed: int = 0, predictable: bool = None,
                    **overrides: Any) -> Path:
    """A complete mlx-lm layout directory (model.safetensors, config.json,
    tokenizer) that `mlx_lm.load` and `mlx_mtp.load` both read."""
    path = Path(path)
    cfg = config(arch, **overrides)
    if predictable is None:
        predictable = not cfg["tie_word_embeddings"]
    model = build(cfg, seed=seed, predictable=predictable)
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(cfg, path / "config.json")
    write_tokenizer(path)
    return path


def main(argv=None) -> None:
    args = parse_args(argv, "python -m mlx_mtp.testing.mlx_lm_models", "Write a tiny mlx-lm checkpoint (random weights).",
                      extra=lambda ap: ap.add_argument("--arch", choices=sorted(ARCHITECTURES), default="llama"))
    path = write_model_dir(Path(args.output_dir), args.arch, seed=args.seed)
    print(f"wrote a tiny {args.arch} checkpoint in mlx-lm's layout (random weights) to {path}")


if __name__ == "__main__":
    main()
