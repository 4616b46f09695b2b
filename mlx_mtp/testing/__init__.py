"""Tiny Qwen3.5 + MTP checkpoints for tests and smoke runs (random weights,
nothing downloaded). The Gemma 4 and GGUF fixtures are in the submodules
`gemma`, `gguf` and `gguf_gemma4`.

`predictable=True` builds a target whose next token is mostly a fixed
permutation of the current one, plus an MTP head that knows the permutation.
`noise` mixes in the random layers, so the head is right only some of the time
and every accepted length (and so every rollback depth) shows up.

    python -m mlx_mtp.testing DIR   # a complete tiny model directory
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

from ..loading.tokenizer_formats import (
    CHATML_THINKING_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN_PRETOKENIZE_REGEX,
    THINK_END,
    THINK_START,
)
from ..loading.writers import is_norm, save_hf_checkpoint
from ..models import qwen3_5
from .fixtures import BRANCHES, SSM_DRAWS, fan_in_draw, load_params, pass_through, predictable_trunk, random_params

VOCAB = 96


def text_config(moe: bool = False, mtp_layers: int = 1, **overrides) -> dict:
    cfg = {
        "model_type": "qwen3_5_moe_text" if moe else "qwen3_5_text",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "linear_num_value_heads": 4,
        "linear_num_key_heads": 2,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "linear_conv_kernel_dim": 4,
        "full_attention_interval": 2,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "max_position_embeddings": 2048,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [1, 1, 0],
            "mrope_interleaved": True,
        },
        "mtp_num_hidden_layers": mtp_layers,
        "mtp_use_dedicated_embeddings": False,
        # Fields the released configs carry that mlx-lm ignores or derives
        # otherwise: it reads the rotary factor from rope_parameters and the
        # layer pattern from full_attention_interval. No eos_token_id: some
        # released repos have it only in generation_config.json, which
        # mlx-lm's load_config merges (write_model_dir writes that file).
        "partial_rotary_factor": 0.25,
        "attn_output_gate": True,
        "output_gate_type": "swish",
        "mamba_ssm_dtype": "float32",
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "pad_token_id": None,
    }
    if moe:
        cfg.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            decoder_sparse_step=1,
            norm_topk_prob=True,
            router_aux_loss_coef=0.001,
            output_router_logits=False,
        )
    cfg.update(overrides)
    if "layer_types" not in overrides:
        cfg["layer_types"] = layer_types(cfg["num_hidden_layers"], cfg["full_attention_interval"])
    return cfg


def layer_types(num_layers: int, full_attention_interval: int) -> list:
    """The per-layer `layer_types` list a released config spells out: every
    `full_attention_interval`-th layer is full attention."""
    return ["linear_attention" if (i + 1) % full_attention_interval else "full_attention" for i in range(num_layers)]


#: A tiny Qwen3.5 vision tower config (real field names); `vision_weights`
#: writes its tensors, which every text loader must drop.
VISION_CONFIG = {
    "model_type": "qwen3_5",
    "depth": 1,
    "hidden_size": 32,
    "hidden_act": "gelu_pytorch_tanh",
    "intermediate_size": 64,
    "num_heads": 2,
    "in_channels": 3,
    "patch_size": 4,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 64,
    "num_position_embeddings": 16,
    "initializer_range": 0.02,
}


def hf_config(moe: bool = False, mtp_layers: int = 1, **overrides) -> dict:
    """Multimodal-style config as in the released Qwen3.5 repos (vision
    tower included; EOS only in generation_config.json)."""
    text = text_config(moe, mtp_layers, **overrides)
    return {
        "model_type": "qwen3_5_moe" if moe else "qwen3_5",
        "architectures": ["Qwen3_5MoeForConditionalGeneration" if moe else "Qwen3_5ForConditionalGeneration"],
        "text_config": text,
        "vision_config": copy.deepcopy(VISION_CONFIG),
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


def bandwidth_config(hidden: int = 1024, layers: int = 8, vocab: int = VOCAB, **overrides) -> dict:
    """A Qwen3.5 text config big enough (100M+ parameters at the defaults)
    to be bandwidth-bound on a CPU with OpenBLAS, for speed figures."""
    heads = max(1, hidden // 128)
    cfg = dict(
        hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=128,
        linear_num_value_heads=heads, linear_num_key_heads=max(1, heads // 2),
        linear_key_head_dim=128, linear_value_head_dim=128, vocab_size=vocab,
        max_position_embeddings=8192, full_attention_interval=4,
    )
    cfg.update(overrides)
    return text_config(**cfg)


def build(config: dict, seed: int = 0, predictable: bool = False, noise: float = 0.3,
          random_head: bool = False):
    """A randomly initialised model with the MTP head (float32).

    `random_head=True` re-draws every `mtp.*` weight at random after the
    rest is built: a head that is almost never right (the floor case for
    the adaptive draft length)."""
    mx.random.seed(seed)
    cls = qwen3_5.MoeModel if "moe" in config["model_type"] else qwen3_5.Model
    # mlx-lm's args rewrite rope_parameters in place: keep the caller's dict intact.
    model = cls(qwen3_5.ModelArgs.from_dict(copy.deepcopy(config)))
    rng = np.random.default_rng(seed)
    params = random_params(model, rng, SSM_DRAWS)
    if predictable:
        _make_predictable(model, params, rng, noise)
    if random_head:
        head_rng = np.random.default_rng(seed + 10_000)
        for name in params:
            if name.startswith("mtp.") and not is_norm(name):
                params[name] = fan_in_draw(head_rng, params[name].shape)
    return load_params(model, params)


def _make_predictable(model, params: Dict[str, np.ndarray], rng, noise: float) -> None:
    H = model.hidden_size
    predictable_trunk(params, rng, model.vocab_size, H, noise, embed="language_model.model.embed_tokens.weight",
                      head="language_model.lm_head.weight", branches=BRANCHES + ("out_proj.weight",))
    fc = pass_through(rng, H)
    if "mtp.fc.weight" in params:
        params["mtp.fc.weight"] = fc


# --- a tokenizer for the tiny models, built offline -----------------------

# Special tokens first, so their ids are fixed and small. EOS is <|im_end|>,
# id 1, which is the `eos_token_id` hf_config() writes.
SPECIAL_TOKENS = [ENDOFTEXT, IM_END, IM_START, THINK_START, THINK_END]
EOS_TOKEN = IM_END
EOS_TOKEN_ID = 1
# Byte-level BPE symbols, as in the Qwen tokenizers: "\n" is "Ċ" and " " is
# "Ġ". Printable ASCII minus a few characters, so the vocabulary is exactly
# VOCAB; characters not in it (and any non-ASCII byte) are dropped when
# encoding, as byte-level BPE does for bytes it has no symbol for.
DROPPED_CHARS = "^`~{}"
CHARS = ["\u010a", "\u0120"] + [chr(c) for c in range(33, 127) if chr(c) not in DROPPED_CHARS]
# A small Qwen-style ChatML template: optional system message, and Qwen3's
# `enable_thinking` switch.
CHAT_TEMPLATE = CHATML_THINKING_TEMPLATE


def build_tokenizer():
    """A byte-level BPE tokenizer (no merges: one token per character) with
    exactly VOCAB ids, built like Qwen's."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {}
    for token in SPECIAL_TOKENS + CHARS:
        vocab[token] = len(vocab)
    assert len(vocab) == VOCAB, len(vocab)
    assert vocab[EOS_TOKEN] == EOS_TOKEN_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    assert tok.get_vocab_size() == VOCAB
    return tok


def write_tokenizer(path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": ENDOFTEXT,
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=1)
    return path


def write_model_dir(path: Path, drop_mtp: bool = False, seed: int = 0, config: Optional[dict] = None,
                    noise: float = 1.6, random_head: bool = False, *, real_layout: bool = False) -> Path:
    """A complete model directory: raw HF safetensors + tokenizer +
    generation_config.json (which alone carries the EOS id, as released).

    By default tiny; predictable=True with noise=1.6 gives roughly 50% draft
    acceptance. `config`: another text config (e.g. `bandwidth_config()`),
    nested the way released Qwen3.5 repos are. `real_layout=True` stores
    the weights as those repos do (`publish_layout`); the default keeps one
    float32 `model.safetensors`."""
    if config is None:
        config = hf_config()
    elif "text_config" not in config:
        config = {**hf_config(), "text_config": config}
    model = build(config, seed=seed, predictable=True, noise=noise, random_head=random_head)
    save_hf_checkpoint(model, Path(path), config, raw=True, drop_mtp=drop_mtp)
    if real_layout:
        publish_layout(Path(path), config, seed=seed)
    (Path(path) / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=1))
    write_tokenizer(path)
    return Path(path)


# --- the released repos' storage layout ---------------------------------------

#: generation_config.json of the tiny models: the only place their EOS id is.
GENERATION_CONFIG = {"eos_token_id": [EOS_TOKEN_ID], "pad_token_id": 0, "do_sample": False}
#: Released Qwen3.5 repos name their shards like this, always with an index.
SHARD_NAME = "model.safetensors-{:05d}-of-{:05d}.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: What Qwen3.5's bf16 checkpoints keep in float32 (Qwen3.6 stores them in bf16).
FLOAT32_TENSORS = ("linear_attn.A_log", "linear_attn.norm.weight")


def publish_layout(path: Path, config: dict, shards: int = 2, seed: int = 0) -> Path:
    """Rewrite the one-file raw HF checkpoint in `path` the way the released
    Qwen3.5 repos store theirs: bf16 with `FLOAT32_TENSORS` in float32, the
    vision tower's `model.visual.*` tensors beside the text ones, `shards`
    files named `SHARD_NAME` plus the index, and `dtype` in config.json."""
    path = Path(path)
    weights = {k: v.astype(mx.float32 if k.endswith(FLOAT32_TENSORS) else mx.bfloat16)
               for k, v in mx.load(str(path / "model.safetensors")).items()}
    weights.update(vision_weights(config.get("vision_config") or VISION_CONFIG, seed))
    write_shards(path, weights, shards)
    (path / "model.safetensors").unlink()  # after: the lazy arrays above read it
    config = {**config, "text_config": {**config["text_config"], "dtype": "bfloat16"}}
    (path / "config.json").write_text(json.dumps(config, indent=1))
    return path


def write_shards(path: Path, weights: Dict[str, mx.array], shards: int, name: str = SHARD_NAME,
                 index: str = INDEX_NAME) -> Dict[str, str]:
    """`weights` in `shards` files (sorted names, about as many per file)
    plus the HF index; returns its weight_map."""
    names = sorted(weights)
    per_file = -(-len(names) // shards)
    weight_map: Dict[str, str] = {}
    for i in range(shards):
        fname = name.format(i + 1, shards)
        part = {k: weights[k] for k in names[i * per_file : (i + 1) * per_file]}
        mx.save_safetensors(str(Path(path) / fname), part, metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(v.nbytes for v in weights.values())
    (Path(path) / index).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return weight_map


def write_hf_dir(path: Path, weights: Dict[str, mx.array], config: dict, shards: int, shard_name: str,
                 generation: Optional[dict] = None) -> Path:
    """A complete raw-HF model directory: `weights` in `shards` files named
    `shard_name` plus the index, config.json, generation_config.json
    (`generation`, by default GENERATION_CONFIG) and the tokenizer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_shards(path, weights, shards, name=shard_name)
    (path / "config.json").write_text(json.dumps(config, indent=1))
    generation = GENERATION_CONFIG if generation is None else generation
    (path / "generation_config.json").write_text(json.dumps(generation, indent=1))
    write_tokenizer(path)
    return path


def vision_weights(vision: dict, seed: int = 0) -> Dict[str, mx.array]:
    """Random bf16 `model.visual.*` tensors of a Qwen3.5 vision tower, named
    and shaped as in the released checkpoints."""
    H, I, out = vision["hidden_size"], vision["intermediate_size"], vision["out_hidden_size"]
    P, T, C = vision["patch_size"], vision["temporal_patch_size"], vision["in_channels"]
    merged = H * vision["spatial_merge_size"] ** 2
    shapes = {
        "patch_embed.proj.weight": (H, C, T, P, P), "patch_embed.proj.bias": (H,),
        "pos_embed.weight": (vision["num_position_embeddings"], H),
        "merger.norm.weight": (H,), "merger.norm.bias": (H,),
        "merger.linear_fc1.weight": (merged, merged), "merger.linear_fc1.bias": (merged,),
        "merger.linear_fc2.weight": (out, merged), "merger.linear_fc2.bias": (out,),
    }
    for i in range(vision["depth"]):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.weight": (H,), b + "norm1.bias": (H,), b + "norm2.weight": (H,), b + "norm2.bias": (H,),
            b + "attn.qkv.weight": (3 * H, H), b + "attn.qkv.bias": (3 * H,),
            b + "attn.proj.weight": (H, H), b + "attn.proj.bias": (H,),
            b + "mlp.linear_fc1.weight": (I, H), b + "mlp.linear_fc1.bias": (I,),
            b + "mlp.linear_fc2.weight": (H, I), b + "mlp.linear_fc2.bias": (H,),
        })
    rng = np.random.default_rng(seed + 20_000)
    return {f"model.visual.{k}": mx.array(0.02 * rng.standard_normal(s), dtype=mx.bfloat16) for k, s in shapes.items()}


def main(argv=None) -> None:
    """python -m mlx_mtp.testing DIR [--hidden H --layers L] [--noise X] [--random-head]:
    write a complete model directory (tiny unless --hidden/--layers say otherwise)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mlx_mtp.testing",
                                 description="Write a predictable Qwen3.5 + MTP checkpoint (random weights).")
    ap.add_argument("output_dir")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (with --layers: a bandwidth_config model)")
    ap.add_argument("--layers", type=int, default=None, help="number of trunk layers")
    ap.add_argument("--noise", type=float, default=None,
                    help="how far the trunk strays from the predictable rule (default 1.6 tiny, 0.3 big)")
    ap.add_argument("--random-head", action="store_true", help="an MTP head with random weights (useless drafts)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    big = args.hidden is not None or args.layers is not None
    config = bandwidth_config(args.hidden or 1024, args.layers or 8) if big else None
    noise = args.noise if args.noise is not None else (0.3 if big else 1.6)
    path = write_model_dir(Path(args.output_dir), seed=args.seed, config=config, noise=noise,
                           random_head=args.random_head)
    head = "random MTP head" if args.random_head else "MTP head"
    print(f"wrote a {'bandwidth-bound' if big else 'tiny'} Qwen3.5 + {head} checkpoint (random weights) to {path}")
