"""Two "no tax" figures of the never-slower promise, measured interleaved:

1. our k=0 decoding against mlx-lm's own `stream_generate` on the same
   weights (both with detokenization, greedy);
2. prefill with the MTP drafter on against off, at 1k and 4k prompt tokens,
   on a deep model (32 layers + 1 MTP layer, a realistic depth ratio).

    LD_PRELOAD=.../libopenblas.so.0 python benchmarks/baseline_and_prefill.py

Prints figures; asserts nothing. Say which regime the numbers come from: on
Linux CPU with OpenBLAS preloaded, a 100M+ fp32 model is bandwidth-bound.
"""

from __future__ import annotations

import argparse
import statistics
import time

from mlx_lm import stream_generate as lm_stream_generate
from mlx_lm.tokenizer_utils import TokenizerWrapper

import mlx_mtp
from mlx_mtp.api import SpeculativeModel
from mlx_mtp.bench import backend_description, median_interval
from mlx_mtp.defaults import demo_model_path
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.engine import decode
from mlx_mtp.testing import bandwidth_config, build


def demo_tokenizer() -> TokenizerWrapper:
    from transformers import AutoTokenizer

    return TokenizerWrapper(AutoTokenizer.from_pretrained(str(demo_model_path("demo-qwen"))))


def ratio_summary(ratios) -> str:
    """The median paired ratio and its distribution-free interval."""
    low, high, coverage = median_interval(ratios)
    return (f"median {statistics.median(ratios):.3f} ({100 * coverage:.0f}% interval {low:.3f}-{high:.3f}, "
            f"{len(ratios)} rounds)")


def params_of(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def baseline(rounds: int, tokens: int) -> None:
    tok = demo_tokenizer()
    model = build(bandwidth_config(1024, 8, tok.vocab_size), seed=0, predictable=True)
    print(f"[k=0 vs mlx-lm] model: {params_of(model) / 1e6:.0f}M params fp32, 8 layers, hidden 1024")
    spec = SpeculativeModel(model, MTPDrafter(model))
    prompt = tok.encode("def fibonacci(n):\n    ")

    def ours() -> float:
        t0, n = None, 0
        for r in mlx_mtp.stream_generate(spec, tok, prompt, num_draft=0, max_tokens=tokens):
            n += len(r.tokens)
            t0 = t0 or time.perf_counter()
        return (n - 1) / (time.perf_counter() - t0)

    def theirs() -> float:
        t0, n = None, 0
        for r in lm_stream_generate(model, tok, prompt, max_tokens=tokens):
            n += 1
            t0 = t0 or time.perf_counter()
        return (n - 1) / (time.perf_counter() - t0)

    ours(), theirs()  # warm-up
    ratios, a, b = [], [], []
    for r in range(rounds):  # odd rounds run mlx-lm first, so drift favours neither
        if r % 2 == 0:
            x, y = ours(), theirs()
        else:
            y, x = theirs(), ours()
        a.append(x), b.append(y), ratios.append(x / y)
    print(f"  ours k=0 {statistics.median(a):.1f} tok/s, mlx-lm stream_generate {statistics.median(b):.1f} tok/s, "
          f"ours/mlx-lm {ratio_summary(ratios)}")


def prefill(rounds: int, lengths) -> None:
    model = build(bandwidth_config(512, 32, 3072), seed=0, predictable=True)
    print(f"[prefill] model: {params_of(model) / 1e6:.0f}M params fp32, 32 layers + 1 MTP layer, hidden 512")
    drafter = MTPDrafter(model)
    for n in lengths:
        prompt = [(7 * i) % 3000 + 10 for i in range(n)]

        def run(d) -> float:
            stats = mlx_mtp.Stats()
            for _ in decode(model, prompt, drafter=d, num_draft=3 if d else 0, max_tokens=1, stats=stats):
                pass
            return stats.prefill_tokens_per_s

        run(drafter), run(None)
        on, off = [], []
        for r in range(rounds):
            if r % 2 == 0:
                on.append(run(drafter))
                off.append(run(None))
            else:
                off.append(run(None))
                on.append(run(drafter))
        ratios = [x / y for x, y in zip(on, off)]
        print(f"  {n} tokens: drafter on {statistics.median(on):.0f} tok/s, off {statistics.median(off):.0f} tok/s, "
              f"on/off {ratio_summary(ratios)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--only", choices=["baseline", "prefill"], default=None)
    args = ap.parse_args()
    print(f"backend: {backend_description()}")
    if args.only in (None, "baseline"):
        baseline(args.rounds, args.tokens)
    if args.only in (None, "prefill"):
        prefill(args.rounds, [int(x) for x in args.lengths.split(",")])


if __name__ == "__main__":
    main()
