"""Shared fixtures: complete tiny model directories (weights + tokenizer).

Nothing is downloaded: the checkpoint comes from `tiny.py` and the tokenizer
is built in-process with the `tokenizers` library.
"""

from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

# Special tokens first, so their ids are fixed and small. EOS is <|im_end|>,
# id 1, which is the `eos_token_id` tiny.hf_config() writes.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_end|>", "<|im_start|>", "<think>", "</think>"]
EOS_TOKEN = "<|im_end|>"
EOS_TOKEN_ID = 1
# Byte-level BPE symbols, as in the Qwen tokenizers: "\n" is "Ċ" and " " is
# "Ġ". Printable ASCII minus a few characters, so the vocabulary is exactly
# tiny.VOCAB; characters not in it (and any non-ASCII byte) are dropped when
# encoding, as byte-level BPE does for bytes it has no symbol for.
DROPPED_CHARS = "^`~{}"
CHARS = ["\u010a", "\u0120"] + [chr(c) for c in range(33, 127) if chr(c) not in DROPPED_CHARS]
# The Qwen2/3/3.5 pre-tokenizer regex (transformers rebuilds Qwen3.5 tokenizers
# with it from the vocabulary, so tokenizer.json uses the same pipeline).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"""
    r""" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# A small Qwen-style template: optional system message, and the Qwen3
# `enable_thinking` switch (on by default: the prompt opens a <think> block;
# off: an empty think block is written for the model).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else -%}"
    "{{ '<think>\\n' }}"
    "{%- endif -%}"
    "{%- endif -%}"
)


def build_tokenizer():
    """A byte-level BPE tokenizer (no merges: one token per character) with
    exactly tiny.VOCAB ids, built like Qwen's."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {}
    for token in SPECIAL_TOKENS + CHARS:
        vocab[token] = len(vocab)
    assert len(vocab) == tiny.VOCAB, len(vocab)
    assert vocab[EOS_TOKEN] == EOS_TOKEN_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    assert tok.get_vocab_size() == tiny.VOCAB
    return tok


def write_tokenizer(path: Path) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": "<|endoftext|>",
        "bos_token": None,
        "add_bos_token": False,
        "model_max_length": 2048,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(path / "tokenizer_config.json", "w") as f:
        json.dump(config, f, indent=1)
    return path


def write_model_dir(path: Path, drop_mtp: bool = False, seed: int = 0) -> Path:
    """A complete tiny model directory: raw HF safetensors + tokenizer.

    predictable=True with noise=1.6 gives roughly 50% draft acceptance."""
    config = tiny.hf_config()
    model = tiny.build(config, seed=seed, predictable=True, noise=1.6)
    tiny.save_hf_checkpoint(model, Path(path), config, raw=True, drop_mtp=drop_mtp)
    write_tokenizer(path)
    return Path(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen3.5 model directory with its MTP head."""
    return write_model_dir(tmp_path_factory.mktemp("tiny-mtp") / "model")


@pytest.fixture(scope="session")
def tiny_model_dir_no_mtp(tmp_path_factory) -> Path:
    """The same model saved without the `mtp.*` weights."""
    return write_model_dir(tmp_path_factory.mktemp("tiny-no-mtp") / "model", drop_mtp=True)
