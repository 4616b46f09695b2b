"""Tiny Gemma 4 targets and assistant drafters for tests and smoke runs
(random weights, nothing downloaded).

Three target kinds mirror the released shapes at toy size:
- "e2b":   per-layer inputs, KV sharing (the last 2 layers reuse KV), 1 KV head;
- "moe":   26B-A4B style, MoE block next to the dense MLP, K=V full layers;
- "dense": 31B style, K=V full layers with their own KV head count.

`predictable=True` builds a target whose greedy next token is mostly a fixed
permutation of the current one (an untied head reads E[perm^-1]), and an
assistant that knows the permutation through its projection and embedding.
`noise` scales every residual branch (Gemma's post-norms set their size), so
drafts are right only part of the time and every rollback depth shows up.

    python -m mlx_mtp.testing.gemma DIR   # DIR/target + DIR/assistant
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..loading.configs import gemma4_assistant_config
from ..loading.writers import is_norm, save_assistant, save_target
from ..models import gemma4
from ..models.base import FULL, SLIDING
from ..models.gemma4_assistant import AssistantArgs, Gemma4Assistant
from . import VOCAB, write_tokenizer

HIDDEN = 64
WINDOW = 8
ROPE = {
    FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
}


def text_config(kind: str = "e2b", **overrides) -> dict:
    """A `gemma4_text` config (HF key names) of the given kind."""
    cfg = {
        "model_type": "gemma4_text",
        "hidden_size": HIDDEN,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "head_dim": 16,
        "global_head_dim": 32,
        "rms_norm_eps": 1e-6,
        "vocab_size": VOCAB,
        "vocab_size_per_layer_input": VOCAB,
        "sliding_window": WINDOW,
        "max_position_embeddings": 2048,
        "final_logit_softcapping": 30.0,
        "rope_parameters": copy.deepcopy(ROPE),
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "attention_bias": False,
        "enable_moe_block": False,
        "attention_k_eq_v": False,
        "num_kv_shared_layers": 0,
        "hidden_size_per_layer_input": 0,
        "use_double_wide_mlp": False,
        # Written out as null where unused, as released: E2B/E4B null all four,
        # 31B the expert fields; the moe and dense kinds set theirs below.
        "num_global_key_value_heads": None,
        "num_experts": None,
        "top_k_experts": None,
        "moe_intermediate_size": None,
        "use_bidirectional_attention": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
    }
    if kind == "e2b":
        cfg.update(
            num_hidden_layers=6,
            layer_types=[SLIDING, SLIDING, FULL, SLIDING, SLIDING, FULL],
            num_kv_shared_layers=2,
            num_key_value_heads=1,
            hidden_size_per_layer_input=16,
            use_double_wide_mlp=True,
        )
    elif kind in ("moe", "dense"):
        cfg.update(
            num_hidden_layers=4,
            layer_types=[SLIDING, SLIDING, SLIDING, FULL],
            num_key_value_heads=2,
            attention_k_eq_v=True,
            num_global_key_value_heads=1,
        )
        if kind == "moe":
            cfg.update(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
    else:
        raise ValueError(f"unknown tiny Gemma kind {kind!r}")
    cfg.update(overrides)
    return cfg


def hf_config(kind: str = "e2b", **overrides) -> dict:
    """Multimodal-layout config (`gemma4`) as in the released repos: the
    vocabulary is in text_config only (no top-level `vocab_size`)."""
    text = text_config(kind, **overrides)
    return {
        "model_type": "gemma4",
        "architectures": ["Gemma4ForConditionalGeneration"],
        "text_config": text,
        "tie_word_embeddings": text["tie_word_embeddings"],
        "eos_token_id": 1,
    }


def assistant_config(target_text: dict, ordered: bool = False, hidden: int = 48, **overrides) -> dict:
    """A `gemma4_assistant` config that pairs with `target_text`."""
    cfg = gemma4_assistant_config(
        hidden_size=hidden,
        intermediate_size=64,
        layer_types=[SLIDING, SLIDING, SLIDING, FULL],
        num_attention_heads=4,
        num_key_value_heads=target_text.get("num_key_value_heads", 1),
        head_dim=target_text["head_dim"],
        global_head_dim=target_text["global_head_dim"],
        attention_k_eq_v=target_text.get("attention_k_eq_v", False),
        num_global_key_value_heads=target_text.get("num_global_key_value_heads"),
        vocab_size=target_text["vocab_size"],
        sliding_window=target_text["sliding_window"],
        max_position_embeddings=target_text["max_position_embeddings"],
        rope_parameters=target_text["rope_parameters"],
        backbone_hidden_size=target_text["hidden_size"],
        use_ordered_embeddings=ordered,
        num_centroids=8,
        centroid_intermediate_top_k=3,
    )
    cfg.update(overrides)
    return cfg


def _random_params(model, rng) -> Dict[str, np.ndarray]:
    params = {}
    for name, value in tree_flatten(model.parameters()):
        shape = value.shape
        if name.endswith("token_ordering"):
            params[name] = rng.permutation(shape[0]).astype(np.int32)
        elif is_norm(name) or name.endswith(("router.scale", "per_expert_scale")):
            params[name] = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith("layer_scalar"):
            params[name] = np.ones(shape)
        else:
            fan_in = shape[-1] if len(shape) > 1 else 1
            params[name] = rng.standard_normal(shape) / np.sqrt(fan_in)
    return params


def _apply(model, params: Dict[str, np.ndarray]) -> None:
    arrays = {
        k: mx.array(v, dtype=mx.int32 if v.dtype.kind in "iu" else mx.float32) for k, v in params.items()
    }
    model.update(tree_unflatten(list(arrays.items())))
    mx.eval(model.parameters())
    model.eval()


def _unit_rows(rng, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def build_target(config: dict, seed: int = 0, predictable: bool = False, noise: float = 0.7):
    """A random tiny Gemma 4 target (float32) for `config` (either layout).
    predictable=True needs tie_word_embeddings=False (the head encodes the
    permutation)."""
    config = copy.deepcopy(config)
    if config["model_type"] == "gemma4":
        model = gemma4.Model(gemma4.ModelArgs.from_dict(config))
        prefix = "language_model."
    else:
        model = gemma4.TextModel(gemma4.TextModelArgs.from_dict(config))
        prefix = ""
    rng = np.random.default_rng(seed)
    params = _random_params(model, rng)
    if predictable:
        text = model.text_model
        if text.tie_word_embeddings:
            raise ValueError("predictable targets need tie_word_embeddings=False")
        V, H = text.args.vocab_size, text.args.hidden_size
        perm = rng.permutation(V)
        E = _unit_rows(rng, V, H)
        params[prefix + "model.embed_tokens.weight"] = E
        params[prefix + "lm_head.weight"] = 6.0 * E[np.argsort(perm)]
        for name in params:
            # Gemma's post-norms set the size of every residual branch.
            if name.endswith(
                ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight", "post_per_layer_input_norm.weight")
            ):
                params[name] = params[name] * noise
        model._perm = perm
        model._embed_unit = E
    _apply(model, params)
    return model


def build_assistant(
    config: dict, target=None, seed: int = 0, predictable: bool = False, noise: float = 0.6
) -> Gemma4Assistant:
    """A random assistant; predictable=True (with a predictable `target`)
    makes it predict the target's permutation from the token it is fed."""
    model = Gemma4Assistant(AssistantArgs.from_config(copy.deepcopy(config)))
    rng = np.random.default_rng(seed + 1000)
    params = _random_params(model, rng)
    if predictable:
        perm, E = target._perm, target._embed_unit
        V, B = E.shape
        h = model.args.text.hidden_size
        P = np.linalg.qr(rng.standard_normal((B, h)))[0].T  # [h, B], orthonormal rows
        pre = np.zeros((h, 2 * B))
        pre[:, :B] = P * np.sqrt(h / B)  # the embedding half arrives scaled by sqrt(B); x gets rms 1
        pre[:, B:] = 0.05 * rng.standard_normal((h, B)) / np.sqrt(B)
        params["pre_projection.weight"] = pre
        Ed = E[np.argsort(perm)] @ P.T
        Ed /= np.linalg.norm(Ed, axis=1, keepdims=True)
        params["model.embed_tokens.weight"] = 6.0 * Ed
        for name in params:
            if name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
                params[name] = params[name] * noise
            elif name == "model.norm.weight":
                params[name] = np.ones_like(params[name])
        if model.args.use_ordered_embeddings:
            order = params["masked_embedding.token_ordering"]
            clusters = order.reshape(model.args.num_centroids, -1)
            params["masked_embedding.centroids.weight"] = np.stack([Ed[c].sum(0) for c in clusters])
    _apply(model, params)
    return model


# --- a complete pair (saved with mlx_mtp.loading.writers) ----------------------


def write_pair(path: Path, kind: str = "e2b", ordered: Optional[bool] = None, layout: str = "gemma4",
               seed: int = 0, noise: float = 0.7, num_assistant_tokens: int = 4) -> Tuple[Path, Path]:
    """A complete tiny target directory (HF safetensors + tokenizer) and a
    matching assistant directory. Returns (target_dir, assistant_dir)."""
    path = Path(path)
    ordered = (kind == "e2b") if ordered is None else ordered
    cfg = hf_config(kind, tie_word_embeddings=False) if layout == "gemma4" else text_config(kind, tie_word_embeddings=False)
    target = build_target(cfg, seed=seed, predictable=True, noise=noise)
    save_target(target, path / "target", cfg)
    write_tokenizer(path / "target")
    text = cfg.get("text_config", cfg)
    acfg = assistant_config(text, ordered=ordered)
    assistant = build_assistant(acfg, target, seed=seed, predictable=True)
    save_assistant(assistant, path / "assistant", acfg, num_assistant_tokens=num_assistant_tokens)
    return path / "target", path / "assistant"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python -m mlx_mtp.testing.gemma OUTPUT_DIR")
    t, a = write_pair(Path(argv[0]))
    print(f"wrote a tiny Gemma 4 target to {t} and its assistant to {a} (random weights)")


if __name__ == "__main__":
    main()
