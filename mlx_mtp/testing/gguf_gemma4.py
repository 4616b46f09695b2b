"""Tiny gemma4 / gemma4-assistant GGUF files for tests, laid out the way
llama.cpp's converter writes them (docs/gguf.md#gemma4-and-gemma4-assistant): GGUF names, fused
`ffn_gate_up_exps`, no `attn_v` where K and V are shared, a synthesized
`rope_freqs`, per-layer metadata arrays, the assistant's `nextn.*`
projections with its sparse-head tensors dropped (as llama.cpp 0c1e570's
converter does) or kept under gguf-py's names (`sparse_head=True`: what a
converter that keeps them writes), and a SentencePiece-style (`gemma4`)
tokenizer in `tokenizer.ggml.*` metadata.

The writers return the weights as stored (dequantized, in mlx-lm's module
layout), so a test can save the same values as safetensors and compare.

    python -m mlx_mtp.testing.gguf_gemma4 DIR   # DIR/target.gguf + DIR/assistant.gguf
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
from mlx.utils import tree_flatten

from ..loading.gguf.gemma4 import ASSISTANT_TOP, CENTROIDS, FUSED_EXPERTS, LAYER, ORDERING, TOP
from ..models.base import FULL, SLIDING
from .gguf import QType, add_tensor, default_qtype, finish
GEMMA_VOCAB = 384
# Gemma-style ids: pad 0, eos 1, bos 2, unk 3 (as testing.gemma's configs say).
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "speculative decoding drafts tokens that the target model checks at once",
    "hello world, this is a tiny tokenizer for tests of the gemma layout",
    "numbers 0123456789 and punctuation: (a, b); c! d? e.",
    "the model reads the weights once for all the drafted tokens",
] * 4


def build_gemma_tokenizer(vocab_size: int = GEMMA_VOCAB):
    """See _build_gemma_tokenizer (cached: training takes a moment)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_build_gemma_tokenizer(vocab_size))


@functools.lru_cache(maxsize=4)
def _build_gemma_tokenizer(vocab_size: int) -> str:
    """A `tokenizers.Tokenizer` laid out like Gemma's tokenizer.json: BPE with
    byte fallback over U+2581 pieces (spaces replaced, no pre-tokenizer),
    special tokens first, the 256 byte tokens, then trained pieces; padded
    with `<unusedN>` control tokens to exactly `vocab_size` ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    fixed = SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    budget = vocab_size - len(fixed)
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    trainer = trainers.BpeTrainer(vocab_size=budget, show_progress=False, min_frequency=2)
    trainer_tok.train_from_iterator(_CORPUS, trainer)
    learned = trainer_tok.get_vocab()
    pieces = [t for t, _ in sorted(learned.items(), key=lambda kv: kv[1]) if t not in fixed]
    import json

    merges = json.loads(trainer_tok.to_str())["model"]["merges"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    tokens = fixed + pieces[:budget]
    tokens += [f"<unused{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [m for m in merges if m[0] in vocab and m[1] in vocab and m[0] + m[1] in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens if _is_control(t)])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", 2)])
    return tok.to_str()


def _is_control(token: str) -> bool:
    return token in SPECIALS or token.startswith("<unused")


def hf_tokenizer(tok=None):
    """The reference HF tokenizer (what the original checkpoint ships)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok or build_gemma_tokenizer(), bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", chat_template=GEMMA_CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def write_gemma_tokenizer_metadata(w, tok=None, with_merges: bool = True) -> None:
    """`tokenizer.ggml.*` as llama.cpp writes them for Gemma 4 (model "gemma4";
    scores all -1000, merges included). with_merges=False writes a
    scores-only ("llama"-style) vocabulary instead, scores from merge ranks."""
    import json

    tok = tok or build_gemma_tokenizer()
    spec = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [3 if _is_control(t) else 6 if (t.startswith("<0x") and len(t) == 6) else 1 for t in tokens]
    types[tokens.index("<unk>")] = 2
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    w.add_string("tokenizer.ggml.model", "gemma4" if with_merges else "llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if with_merges:
        w.add_token_scores([-1000.0] * len(tokens))
        w.add_token_merges(merges)
    else:  # SentencePiece scores: earlier merges score higher
        rank = {a + b: i for i, (a, b) in enumerate(m.split(" ", 1) for m in merges)}
        w.add_token_scores([-float(rank.get(t, len(merges) + i)) for i, t in enumerate(tokens)])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_bool("tokenizer.ggml.add_space_prefix", False)
    w.add_string("tokenizer.chat_template", GEMMA_CHAT_TEMPLATE)


# --- the writers -------------------------------------------------------------------

_INV_TOP = {v: k for k, v in TOP.items()}
_INV_LAYER = {v: k for k, v in LAYER.items()}
_INV_ASSISTANT = {"pre_projection.weight": "nextn.pre_projection.weight",
                  "post_projection.weight": "nextn.post_projection.weight"}
assert set(_INV_ASSISTANT.values()) <= set(ASSISTANT_TOP)


def _gguf_name(name: str) -> str:
    if name in _INV_TOP:
        return _INV_TOP[name]
    if name in _INV_ASSISTANT:
        return _INV_ASSISTANT[name]
    i, rest = name[len("model.layers."):].split(".", 1)
    return f"blk.{i}.{_INV_LAYER[rest]}"


def _common_metadata(w, arch: str, text: dict, n: int) -> None:
    types = text["layer_types"][:n]
    rope = text["rope_parameters"]
    kv_full = text.get("num_global_key_value_heads") if text.get("attention_k_eq_v") else None
    kv = [text["num_key_value_heads"] if t == SLIDING else (kv_full or text["num_key_value_heads"]) for t in types]
    w.add_uint32(f"{arch}.context_length", text["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", text["hidden_size"])
    w.add_uint32(f"{arch}.block_count", n)
    w.add_uint32(f"{arch}.attention.head_count", text["num_attention_heads"])
    w.add_array(f"{arch}.attention.head_count_kv", kv)
    w.add_uint32(f"{arch}.attention.key_length", text["global_head_dim"])
    w.add_uint32(f"{arch}.attention.value_length", text["global_head_dim"])
    w.add_uint32(f"{arch}.attention.key_length_swa", text["head_dim"])
    w.add_uint32(f"{arch}.attention.value_length_swa", text["head_dim"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", text["rms_norm_eps"])
    w.add_uint32(f"{arch}.attention.sliding_window", text["sliding_window"])
    w.add_array(f"{arch}.attention.sliding_window_pattern", [t == SLIDING for t in types])
    w.add_float32(f"{arch}.rope.freq_base", float(rope[FULL]["rope_theta"]))
    w.add_float32(f"{arch}.rope.freq_base_swa", float(rope[SLIDING]["rope_theta"]))
    w.add_uint32(f"{arch}.rope.dimension_count", text["global_head_dim"])
    w.add_uint32(f"{arch}.rope.dimension_count_swa", text["head_dim"])


def _rope_freqs(text: dict) -> np.ndarray:
    """What the converter synthesizes for the proportional RoPE of full layers."""
    half = text["global_head_dim"] // 2
    rotated = int(text["global_head_dim"] * text["rope_parameters"][FULL].get("partial_rotary_factor", 1.0)) // 2
    return np.where(np.arange(half) < rotated, 1.0, 1e30).astype(np.float32)


def write_gemma4_gguf(model, text: dict, path: Union[str, Path], qtype: QType = "F32",
                      tokenizer: bool = True, seed: int = 0) -> Dict[str, np.ndarray]:
    """Write a gemma4_text target (mlx-lm names, float) as a llama.cpp-style
    GGUF. Returns {module path: stored values}."""
    import gguf

    pick = default_qtype(qtype) if isinstance(qtype, str) else qtype
    arch = "gemma4"
    n = text["num_hidden_layers"]
    shared = text.get("num_kv_shared_layers", 0)
    w = gguf.GGUFWriter(str(path), arch)
    _common_metadata(w, arch, text, n)
    ff = text["intermediate_size"]
    if text.get("use_double_wide_mlp") and shared:
        w.add_array(f"{arch}.feed_forward_length", [ff if i < n - shared else 2 * ff for i in range(n)])
    else:
        w.add_uint32(f"{arch}.feed_forward_length", ff)
    w.add_uint32(f"{arch}.attention.shared_kv_layers", shared)
    w.add_uint32(f"{arch}.embedding_length_per_layer_input", text.get("hidden_size_per_layer_input") or 0)
    if text.get("final_logit_softcapping"):
        w.add_float32(f"{arch}.final_logit_softcapping", float(text["final_logit_softcapping"]))
    if text.get("enable_moe_block"):
        w.add_uint32(f"{arch}.expert_count", text["num_experts"])
        w.add_uint32(f"{arch}.expert_used_count", text["top_k_experts"])
        w.add_uint32(f"{arch}.expert_feed_forward_length", text["moe_intermediate_size"])
    if tokenizer:
        write_gemma_tokenizer_metadata(w)
    w.add_tensor("rope_freqs.weight", _rope_freqs(text))

    params = {k: np.array(v).astype(np.float32) for k, v in tree_flatten(model.parameters())}
    stored: Dict[str, np.ndarray] = {}
    for i, (name, x) in enumerate(params.items()):
        if ".experts.switch_glu.up_proj" in name:
            continue  # written fused with gate_proj
        if ".experts.switch_glu.gate_proj" in name:
            up_name = name.replace("gate_proj", "up_proj")
            fused = np.concatenate([x, params[up_name]], axis=-2)
            layer = name.split(".")[2]
            values = add_tensor(w, f"blk.{layer}.{FUSED_EXPERTS}", fused, pick, seed + i)
            half = x.shape[-2]
            stored[name], stored[up_name] = values[..., :half, :], values[..., half:, :]
            continue
        stored[name] = add_tensor(w, _gguf_name(name), x, pick, seed + i)
    finish(w)
    return stored


def write_assistant_gguf(assistant, config: dict, path: Union[str, Path], qtype: QType = "F32",
                         tokenizer: bool = True, seed: int = 0,
                         flag_ordered: Optional[bool] = None, sparse_head: bool = False,
                         ordering_type: str = "F32") -> Dict[str, np.ndarray]:
    """Write a Gemma4Assistant as a llama.cpp-style `gemma4-assistant` GGUF.
    The sparse-head tensors are dropped, as llama.cpp 0c1e570's converter
    does, unless `sparse_head`: then `masked_embd_centroids.weight` (typed
    like any matrix) and `masked_embd_ordering` as `ordering_type` (F32 is
    what the converter's generic path makes of the int64 buffer; I32 some
    other converters), plus the top-k under `masked_embedding.top_k`.
    flag_ordered writes `use_ordered_embeddings` (default: the config's value)."""
    import gguf

    pick = default_qtype(qtype) if isinstance(qtype, str) else qtype
    arch = "gemma4-assistant"
    text = config["text_config"]
    n = text["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), arch)
    _common_metadata(w, arch, text, n)
    w.add_uint32(f"{arch}.feed_forward_length", text["intermediate_size"])
    w.add_uint32(f"{arch}.embedding_length_out", config["backbone_hidden_size"])
    w.add_uint32(f"{arch}.nextn_predict_layers", n)
    ordered = config.get("use_ordered_embeddings", False) if flag_ordered is None else flag_ordered
    w.add_bool(f"{arch}.use_ordered_embeddings", bool(ordered))
    if tokenizer:
        write_gemma_tokenizer_metadata(w)
    w.add_tensor("rope_freqs.weight", _rope_freqs(text))
    stored: Dict[str, np.ndarray] = {}
    if sparse_head:
        w.add_uint32(f"{arch}.masked_embedding.top_k", config["centroid_intermediate_top_k"])
    for i, (name, value) in enumerate(tree_flatten(assistant.parameters())):
        if name == "masked_embedding.token_ordering":
            if sparse_head:
                ids = np.array(value).astype(np.float32 if ordering_type == "F32" else np.int32)
                w.add_tensor(ORDERING, ids)
                stored[name] = np.array(value).astype(np.int32)
            continue
        if name.startswith("masked_embedding.") and not sparse_head:
            continue  # dropped by the converter
        gname = CENTROIDS if name == "masked_embedding.centroids.weight" else _gguf_name(name)
        stored[name] = add_tensor(w, gname, np.array(value).astype(np.float32), pick, seed + i)
    finish(w)
    return stored


def write_pair(path: Union[str, Path], kind: str = "e2b", qtype: QType = "F32", ordered: Optional[bool] = None,
               seed: int = 0, sparse_head: bool = False, ordering_type: str = "F32", **overrides):
    """A tiny predictable gemma4 target and its assistant as GGUF files, plus
    the safetensors directories of the very same (stored) values; with
    `sparse_head` the assistant's GGUF keeps its sparse head, and so does the
    safetensors copy. Returns (target.gguf, assistant.gguf, target_dir, assistant_dir)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from .gemma import assistant_config, build_assistant, build_target, save_assistant, save_target, text_config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ordered = (kind == "e2b") if ordered is None else ordered
    assistant_hidden = overrides.pop("assistant_hidden", 48)
    cfg = text_config(kind, tie_word_embeddings=False, vocab_size=GEMMA_VOCAB,
                      vocab_size_per_layer_input=GEMMA_VOCAB, **overrides)
    target = build_target(cfg, seed=seed, predictable=True)
    acfg = assistant_config(cfg, ordered=ordered, hidden=assistant_hidden)
    assistant = build_assistant(acfg, target, seed=seed, predictable=True)
    stored_t = write_gemma4_gguf(target, cfg, path / "target.gguf", qtype=qtype, seed=seed)
    stored_a = write_assistant_gguf(assistant, acfg, path / "assistant.gguf", qtype=qtype, seed=seed + 500,
                                    sparse_head=sparse_head, ordering_type=ordering_type)
    target.update(tree_unflatten([(k, mx.array(v)) for k, v in stored_t.items()]))
    save_target(target, path / "target", cfg, raw=False)
    hf_tokenizer().save_pretrained(str(path / "target"))
    # What the GGUF holds: the sparse head only when kept.
    held = dict(acfg, use_ordered_embeddings=bool(acfg.get("use_ordered_embeddings")) and sparse_head)
    plain = build_assistant(held, seed=seed)
    plain.update(tree_unflatten([(k, mx.array(v)) for k, v in stored_a.items()]))
    save_assistant(plain, path / "assistant", held)
    return path / "target.gguf", path / "assistant.gguf", path / "target", path / "assistant"


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        raise SystemExit("usage: python -m mlx_mtp.testing.gguf_gemma4 OUTPUT_DIR [QTYPE]")
    t, a, _, _ = write_pair(Path(argv[0]), qtype=argv[1] if len(argv) > 1 else "F32")
    print(f"wrote a tiny Gemma 4 target to {t} and its assistant to {a} (random weights)")


if __name__ == "__main__":
    main()
