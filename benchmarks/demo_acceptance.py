"""Drafting acceptance of a demo checkpoint: the tables in assets/README.md.

Greedy, the real engine, 96 new tokens on five code prompts (three
chat-templated, two raw), at each fixed k. Every k must give the baseline's
tokens (checked). Counts, not times: it runs in any regime, and compares
two checkpoints of the same model (before and after more training):

    python benchmarks/demo_acceptance.py demo-qwen /tmp/train/demo-qwen

Prints figures; asserts nothing but losslessness.
"""

from __future__ import annotations

import argparse
from typing import List, Tuple

import mlx_mtp
from mlx_mtp.options import GenerationOptions

#: (prompt, chat-templated?)
PROMPTS: List[Tuple[str, bool]] = [
    ("def fibonacci(n):", True),
    ("Write a Python function `read_config`.", True),
    ("Complete this function: def is_prime(n):", True),
    ("import os\n\n\ndef list_files(path):\n", False),
    ("class Stack:\n    def __init__(self):\n", False),
]


def run(model, tokenizer, prompt: str, options: GenerationOptions, k: int):
    """(tokens, stats) of one greedy generation at draft length k."""
    tokens, stats = [], None
    for r in mlx_mtp.stream_generate(model, tokenizer, prompt, options, num_draft=k):
        tokens += r.tokens
        stats = r.stats
    return tokens, stats


def acceptance(path: str, ks: List[int], tokens: int) -> None:
    model, tokenizer = mlx_mtp.load(path)
    drafted = {k: 0 for k in ks}
    accepted = {k: 0 for k in ks}
    passes = {k: 0 for k in ks}
    decoded = {k: 0 for k in ks}
    for prompt, templated in PROMPTS:
        options = GenerationOptions(max_tokens=tokens, chat_template=templated)
        base, _ = run(model, tokenizer, prompt, options, 0)
        for k in ks:
            out, s = run(model, tokenizer, prompt, options, k)
            if out != base:
                print(f"!! LOSSLESS CHECK FAILED: k={k} on {prompt!r}")
            drafted[k] += s.draft_tokens
            accepted[k] += s.accepted_tokens
            passes[k] += s.target_passes
            decoded[k] += s.generated_tokens - 1  # the first token comes from prefill
    print(f"{path}: drafter {model.drafter.name if model.drafter else 'none'}, {len(PROMPTS)} prompts x {tokens} tokens")
    print(f"{'k':>3} {'acceptance':>11} {'tokens/pass':>12}")
    for k in ks:
        print(f"{k:>3} {accepted[k] / max(1, drafted[k]):>11.2f} {decoded[k] / max(1, passes[k]):>12.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="checkpoints or demo names")
    ap.add_argument("-k", default="1,2,3,4")
    ap.add_argument("-n", "--tokens", type=int, default=96)
    args = ap.parse_args()
    for path in args.models:
        acceptance(path, [int(k) for k in args.k.split(",")], args.tokens)


if __name__ == "__main__":
    main()
