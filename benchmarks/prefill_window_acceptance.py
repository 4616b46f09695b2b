"""What reading only the newest prompt positions costs the MTP head in acceptance.

During prefill the drafter reads only the last `engine.DRAFTER_PREFILL_WINDOW`
prompt positions (that keeps prefill with a drafter on as fast as without).
Output never changes; acceptance right after a long prompt can. This script
measures it: greedy, fixed k, on demo-qwen, with prompts cut from real Python
source (what the demo was trained on) at several lengths, once with the
window and once with the head reading the whole prompt.

    python benchmarks/prefill_window_acceptance.py [--lengths 512,1024,2048,3072] [-k 3] [-n 64]

Acceptance is not a timing, so any machine and load gives the same figures.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path
from typing import List

from mlx_mtp import engine
from mlx_mtp.api import load
from mlx_mtp.engine import Stats, decode


def source_tokens(tokenizer, count: int) -> List[int]:
    """`count` tokens of the standard library's own source, file after file."""
    text = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text.append(path.read_text(encoding="utf-8", errors="replace"))
        ids = tokenizer.encode("".join(text))
        if len(ids) >= count * 4:
            break
    return ids


def acceptance(model, prompt: List[int], k: int, tokens: int, window: int) -> Stats:
    saved = engine.DRAFTER_PREFILL_WINDOW
    engine.DRAFTER_PREFILL_WINDOW = window
    try:
        stats = Stats()
        for _ in decode(model.target, prompt, drafter=model.drafter, num_draft=k,
                        max_tokens=tokens, stats=stats):
            pass
        return stats
    finally:
        engine.DRAFTER_PREFILL_WINDOW = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,1024,2048,3072")
    parser.add_argument("-k", type=int, default=3)
    parser.add_argument("-n", type=int, default=64, help="tokens generated per prompt")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per length")
    args = parser.parse_args()

    model, tokenizer = load("demo-qwen")
    lengths = [int(x) for x in args.lengths.split(",")]
    ids = source_tokens(tokenizer, max(lengths) * args.prompts)
    window = engine.DRAFTER_PREFILL_WINDOW
    print(f"demo-qwen, greedy, k={args.k}, {args.n} tokens after each prompt, "
          f"{args.prompts} prompts per length; window = {window} prompt positions")
    print(f"{'prompt':>7} {'window':>8} {'full':>8} {'change':>8}")
    for length in lengths:
        rates = {}
        for label, w in (("window", window), ("full", 10**9)):
            accepted = drafted = 0
            for i in range(args.prompts):
                start = (i * len(ids)) // args.prompts
                prompt = ids[start:start + length]
                stats = acceptance(model, prompt, args.k, args.n, w)
                accepted += stats.accepted_tokens
                drafted += stats.draft_tokens
            rates[label] = accepted / drafted if drafted else 0.0
        change = rates["window"] - rates["full"]
        print(f"{length:>7} {rates['window']:>8.1%} {rates['full']:>8.1%} {change:>+8.1%}")


if __name__ == "__main__":
    main()
