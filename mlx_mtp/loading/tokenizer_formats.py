"""Tokenizer conventions written down once: the Qwen pre-tokenizer split and
the ChatML tokens and chat templates. The GGUF tokenizer builder, the test
fixtures and the demo trainers all build their tokenizers from these.
"""

from __future__ import annotations

# The Qwen2/3/3.5 pre-tokenizer regex (llama.cpp's "qwen35"; transformers
# rebuilds Qwen3.5 tokenizers with it from the vocabulary, so tokenizer.json
# uses the same pipeline).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"""
    r""" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML special tokens. The lists that use them order them differently on
# purpose (the order fixes their ids), so only the strings are shared.
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
THINK_START, THINK_END = "<think>", "</think>"

_TURNS = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
)
# Qwen3's `enable_thinking` switch (on by default: the prompt opens a <think>
# block; off: an empty think block is written for the model).
_THINKING_SWITCH = (
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else -%}"
    "{{ '<think>\\n' }}"
    "{%- endif -%}"
)


def chatml_template(thinking: bool = False) -> str:
    """A small Qwen-style ChatML template: optional system message,
    user/assistant turns, and with `thinking` the enable_thinking switch."""
    return (
        _TURNS
        + "{%- if add_generation_prompt -%}"
        + "{{ '<|im_start|>assistant\\n' }}"
        + (_THINKING_SWITCH if thinking else "")
        + "{%- endif -%}"
    )


CHATML_TEMPLATE = chatml_template(thinking=False)
CHATML_THINKING_TEMPLATE = chatml_template(thinking=True)
