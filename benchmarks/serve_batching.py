"""Batched speculative decoding under concurrency (mlx_mtp/batching.py).

For 1, 2, 4 and 8 concurrent streams, drafting off (k=0) against on (a
fixed k and `auto`): aggregate tok/s (every stream's tokens over the wall
time of the run), per-stream decode tok/s (mean over streams), requests/s
and time to first token (median and 90th percentile over the streams, from
the moment all of them arrive); with `--rounds R`, medians over R
interleaved runs. The closing lines give the issue's yardstick: per-stream
speedup over drafting off at N streams, as a fraction of it at 1 stream. Greedy, so every mode must give the same
tokens; a mismatch is printed loudly.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python benchmarks/serve_batching.py
    python benchmarks/serve_batching.py --hidden 64 --layers 4 --tokens 16   # a quick check that it runs

`--prompt-tokens N` gives every stream a prompt of about N tokens (the
default is 12 + 3i for stream i): with long prompts, time to first token is
mostly prefill, which the streams arriving together share
(docs/batching.md#prefill).

Prints figures; asserts nothing. The model is a predictable Qwen3.5 + MTP
head of about 120M fp32 parameters (`bandwidth_config(1024, 8)`): on a CPU
with OpenBLAS preloaded it is bandwidth-bound, the regime a Mac GPU is in;
with the reference BLAS it is compute-bound and a wider verify costs more.
The header says which.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np

from mlx_mtp.api import SpeculativeModel
from mlx_mtp.batching import BatchGenerator
from mlx_mtp.bench import backend_description
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.sampling import SamplingParams
from mlx_mtp.testing import VOCAB, bandwidth_config, build


def params_of(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def run(gen: BatchGenerator, prompts: Sequence[List[int]], tokens: int) -> Tuple[dict, List[List[int]]]:
    """All prompts arrive at once; step until every stream is done."""
    start = time.perf_counter()
    ids = {gen.add(p, SamplingParams(), tokens, ()): i for i, p in enumerate(prompts)}
    out: Dict[int, List[int]] = {i: [] for i in ids.values()}
    first: Dict[int, float] = {}
    stats = {}
    while gen.has_work():
        for e in gen.step():
            i = ids[e.row_id]
            if e.tokens and i not in first:
                first[i] = time.perf_counter() - start
            out[i] += e.tokens
            if e.finish_reason is not None:
                stats[i] = e.stats
    wall = time.perf_counter() - start
    total = sum(len(t) for t in out.values())
    drafted = sum(s.draft_tokens for s in stats.values())
    accepted = sum(s.accepted_tokens for s in stats.values())
    figures = {
        "aggregate": total / wall,
        "per_stream": statistics.mean(s.decode_tokens_per_s for s in stats.values()),
        "requests_per_s": len(prompts) / wall,
        "ttft_p50_ms": 1000 * float(np.percentile(list(first.values()), 50)),
        "ttft_p90_ms": 1000 * float(np.percentile(list(first.values()), 90)),
        "acceptance": accepted / drafted if drafted else 0.0,
        "tokens_per_pass": statistics.mean(s.tokens_per_pass for s in stats.values()),
    }
    return figures, [out[i] for i in range(len(prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--concurrency", default="1,2,4,8")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="prompt length per stream (0: 12 + 3i)")
    ap.add_argument("-k", "--num-draft", default="2,auto", help="drafting modes besides k=0")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each concurrency's modes this many times (odd rounds in reverse order) and report "
                    "medians: this machine's noise moves single runs by 20%%")
    ap.add_argument("--random-head", action="store_true",
                    help="a head that is almost never right: the case where auto must hold the k=0 floor")
    args = ap.parse_args()

    model = build(bandwidth_config(args.hidden, args.layers, VOCAB), seed=0, predictable=True,
                  random_head=args.random_head)
    spec = SpeculativeModel(model, MTPDrafter(model))
    modes = [0] + [m if m == "auto" else int(m) for m in args.num_draft.split(",") if m]
    print(f"backend: {backend_description()}")
    head = "random head" if args.random_head else "predictable head"
    concurrency = [int(c) for c in args.concurrency.split(",")]
    lengths = [args.prompt_tokens + i if args.prompt_tokens else 12 + 3 * i for i in range(max(concurrency))]
    print(f"model: {params_of(model) / 1e6:.1f}M params fp32, {args.layers} layers, hidden {args.hidden}, {head}; "
          f"prompts of {lengths[0]}-{lengths[-1]} tokens, {args.tokens} tokens per stream, greedy; "
          f"drafting off (k=0) vs on")
    prompts_all = [[(7 * i + j) % (VOCAB - 10) + 5 for j in range(n)] for i, n in enumerate(lengths)]
    # One generator per mode for the whole run, as a server keeps one: the
    # adaptive policy of each batch size learns once.
    generators = {mode: BatchGenerator(spec, max_batch=max(concurrency), num_draft=mode, prompt_cache_bytes=0)
                  for mode in modes}
    header = f"{'streams':>7} {'mode':>6} {'agg tok/s':>10} {'stream tok/s':>13} {'req/s':>7} " \
             f"{'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'accept':>7} {'tok/pass':>8} {'vs off':>7}"
    print(header)
    speedups: Dict[int, Dict[object, float]] = {}  # streams -> mode -> per-stream speedup over off
    for n in concurrency:
        prompts = prompts_all[:n]
        for mode in modes:  # warm-up at this batch size
            run(generators[mode], [p[::-1] for p in prompts], args.tokens // 2)
        results: Dict[object, List[dict]] = {mode: [] for mode in modes}
        base_tokens = None
        for r in range(args.rounds):
            for mode in (modes if r % 2 == 0 else modes[::-1]):
                figures, tokens = run(generators[mode], prompts, args.tokens)
                results[mode].append(figures)
                if mode == 0:
                    base_tokens = tokens if base_tokens is None else base_tokens
                elif base_tokens is not None and tokens != base_tokens:
                    print(f"!! MISMATCH: k={mode} at {n} streams differs from k=0")
        speedups[n] = {}
        for mode in modes:
            # Medians over the rounds; "vs off" pairs each round with its own k=0 run.
            med = {key: statistics.median(f[key] for f in results[mode]) for key in results[mode][0]}
            vs_off = statistics.median(f["aggregate"] / b["aggregate"] for f, b in zip(results[mode], results[0]))
            speedups[n][mode] = statistics.median(
                f["per_stream"] / b["per_stream"] for f, b in zip(results[mode], results[0]))
            label = "off" if mode == 0 else ("auto" if mode == "auto" else f"k={mode}")
            print(f"{n:>7} {label:>6} {med['aggregate']:>10.1f} {med['per_stream']:>13.1f} "
                  f"{med['requests_per_s']:>7.2f} {med['ttft_p50_ms']:>12.0f} {med['ttft_p90_ms']:>12.0f} "
                  f"{med['acceptance']:>7.0%} {med['tokens_per_pass']:>8.2f} {vs_off:>6.2f}x")
    single = speedups.get(1)
    if single:
        for n in concurrency:
            if n > 1:
                line = ", ".join(f"{'auto' if m == 'auto' else f'k={m}'} {speedups[n][m]:.2f}x vs {single[m]:.2f}x "
                                 f"({speedups[n][m] / single[m]:.0%})" for m in modes if m != 0)
                print(f"per-stream speedup at {n} streams against 1 stream: {line}")

if __name__ == "__main__":
    main()
