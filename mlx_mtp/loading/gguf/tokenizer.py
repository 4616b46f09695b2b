"""Tokenizers from `tokenizer.ggml.*` metadata, built as HF fast tokenizers
(PreTrainedTokenizerFast) and wrapped like mlx-lm's own:

- byte-level BPE ("gpt2": qwen35 and friends), with the pre-tokenizer split
  named by `tokenizer.ggml.pre`;
- SentencePiece-style pieces (`tokenizer.ggml.model = "gemma4"`, also
  "llama"): U+2581 for spaces, byte tokens `<0xNN>` (type 6), merges (scores
  are all -1000 in gemma4 files), BOS added. Built as a `tokenizers` BPE with
  byte fallback, the layout of HF's own Gemma tokenizer.json; files without
  merges get them from the scores, as HF's SentencePiece converter does.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple, Union

from ..safetensors import CheckpointError
from ..tokenizer_formats import QWEN_PRETOKENIZE_REGEX

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (llama.cpp's names).
_QWEN2_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
_LLAMA3_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
PRE_TOKENIZER_REGEX = {
    "qwen35": QWEN_PRETOKENIZE_REGEX,
    "qwen2": _QWEN2_REGEX,
    "llama-bpe": _LLAMA3_REGEX,
    "llama3": _LLAMA3_REGEX,
}
# `tokenizer.ggml.token_type` values.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
SPM_KINDS = ("gemma4", "llama")
# Metadata ids generation stops on: end of sequence, of turn, of message.
STOP_ID_KEYS = ("eos", "eot", "eom")
# Tokens that end generation by their text, as llama.cpp decides (llama-vocab.cpp):
# the chat templates' end-of-turn tokens, and ends of text that the HF configs
# list as EOS but the converter does not write (only tokenizer_config's
# eos_token becomes eos_token_id: <|im_end|> for Qwen3.5, not <|endoftext|>).
END_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
              "<end_of_turn>", "<turn|>", "<eos>", "<|tool_response>")


def _tokens(meta: Dict[str, Any]) -> List[str]:
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise CheckpointError("GGUF file has no tokenizer (tokenizer.ggml.tokens is missing)")
    return tokens


def _named_token(meta: Dict[str, Any], tokens: List[str], key: str) -> Optional[str]:
    """The token `tokenizer.ggml.{key}_token_id` points at, if any."""
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def stop_token_ids(meta: Dict[str, Any]) -> List[int]:
    """Every id generation stops on: the declared eos / eot / eom ids, then
    the END_TOKENS the vocabulary has (what llama.cpp stops on too)."""
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    ids: List[int] = []
    for key in STOP_ID_KEYS:
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= int(i) < len(tokens) and int(i) not in ids:
            ids.append(int(i))
    by_text: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in END_TOKENS:
            by_text.setdefault(t, i)  # the first of duplicate pieces, as the vocabulary keeps
    ids += [by_text[t] for t in END_TOKENS if t in by_text and by_text[t] not in ids]
    return ids


def config_eos(meta: Dict[str, Any]) -> Optional[Union[int, List[int]]]:
    """`eos_token_id` for a config made from GGUF metadata: every stop id, so
    a model converted from the GGUF stops where the GGUF does."""
    ids = stop_token_ids(meta)
    return None if not ids else ids[0] if len(ids) == 1 else ids


def _add_special_pieces(tok, tokens: List[str], types: List[int]) -> None:
    """Control and user-defined pieces as added tokens (control ones special)."""
    from tokenizers import AddedToken

    tok.add_tokens([
        AddedToken(t, special=(ty == TOKEN_CONTROL), normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ])


def _fast_tokenizer(tok, meta: Dict[str, Any], **named: Optional[str]):
    """The PreTrainedTokenizerFast over `tok`, with the named special tokens
    that exist and the file's chat template."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {k: v for k, v in named.items() if v is not None}
    template = meta.get("tokenizer.chat_template")
    if template:
        kwargs["chat_template"] = template
    return PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **kwargs)


def build_tokenizer(meta: Dict[str, Any]):
    """A HF fast tokenizer from `tokenizer.ggml.*` metadata, plus the EOS ids:
    byte-level BPE ("gpt2") or SentencePiece-style vocabularies."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind in SPM_KINDS:  # SentencePiece-style pieces (gemma4)
        return build_spm_tokenizer(meta)
    tokens = _tokens(meta)
    if kind != "gpt2":
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported "
                              f"(byte-level BPE 'gpt2', SentencePiece-style {', '.join(SPM_KINDS)})")
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in (meta.get("tokenizer.ggml.merges") or [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok.normalizer = normalizers.NFC()
    regex = PRE_TOKENIZER_REGEX.get(pre)
    if regex is None and pre.startswith("qwen"):
        regex = QWEN_PRETOKENIZE_REGEX
    if regex is None:  # GPT-2's own split
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    _add_special_pieces(tok, tokens, types)
    bos = _named_token(meta, tokens, "bos")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    hf = _fast_tokenizer(tok, meta, eos_token=_named_token(meta, tokens, "eos"),
                         pad_token=_named_token(meta, tokens, "padding"), bos_token=bos,
                         unk_token=_named_token(meta, tokens, "unknown"))
    return hf, stop_token_ids(meta)


def merges_from_scores(tokens: List[str], scores: List[float], types: List[int]) -> List[Tuple[str, str]]:
    """BPE merges for a SentencePiece vocabulary that only has scores: every
    split of a normal piece into two pieces of the vocabulary, ordered by the
    merged piece's score (then by the parts' ids), as HF's converter does."""
    vocab = {t: i for i, t in enumerate(tokens)}
    found = []
    for piece, i in vocab.items():
        if types[i] not in (TOKEN_NORMAL, TOKEN_USER_DEFINED) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            a, b = piece[:cut], piece[cut:]
            if a in vocab and b in vocab:
                found.append((-scores[i], vocab[a], vocab[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def build_spm_tokenizer(meta: Dict[str, Any]):
    """A HF fast tokenizer for a SentencePiece-style GGUF vocabulary, plus the
    EOS ids: BPE with byte fallback over U+2581 pieces (Gemma's layout)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    tokens = _tokens(meta)
    types = [int(t) for t in (meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))]
    scores = [float(s) for s in (meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))]
    raw_merges = meta.get("tokenizer.ggml.merges") or []
    merges = [tuple(m.split(" ", 1)) for m in raw_merges] if raw_merges else merges_from_scores(tokens, scores, types)
    vocab: Dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)

    unk = _named_token(meta, tokens, "unknown") or next(
        (t for t, ty in zip(tokens, types) if ty == TOKEN_UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    replace = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    _add_special_pieces(tok, tokens, types)
    bos, eos = _named_token(meta, tokens, "bos"), _named_token(meta, tokens, "eos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else []))
        pair = single + " " + " ".join(([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else []))
        special = [(t, vocab[t]) for t in {bos if add_bos else None, eos if add_eos else None} if t]
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
    hf = _fast_tokenizer(tok, meta, eos_token=eos, pad_token=_named_token(meta, tokens, "padding"),
                         bos_token=bos, unk_token=unk)
    return hf, stop_token_ids(meta)


def load_gguf_tokenizer(meta: Dict[str, Any]):
    """The GGUF tokenizer wrapped like mlx-lm's own (streaming detokenizer)."""
    from functools import partial

    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, SPMStreamingDetokenizer, TokenizerWrapper

    hf, eos_ids = build_tokenizer(meta)
    if meta.get("tokenizer.ggml.model") in SPM_KINDS:
        spaced = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
        detok = partial(SPMStreamingDetokenizer, trim_space=spaced)
    else:
        detok = BPEStreamingDetokenizer
    return TokenizerWrapper(hf, detokenizer_class=detok, eos_token_ids=eos_ids)
