"""`mlx-mtp bench`: how much faster is drafting, on this machine, per kind of prompt?

Baseline (k=0) and every requested draft length run in one process,
interleaved prompt by prompt after a warm-up, so machine drift cancels.
At temperature 0 every mode must reproduce the baseline's tokens exactly;
a mismatch is reported loudly (and makes the command exit non-zero).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from .api import SpeculativeModel, build_prompt, stream_generate
from .defaults import prompt_suite
from .engine import EmptyPromptError, draft_step_cost
from .options import AUTO, GenerationOptions, NumDraft

#: What `run_bench` generates with unless told otherwise (as `mlx-mtp bench`).
BENCH_OPTIONS = GenerationOptions(max_tokens=192, seed=0)


def load_prompts(path: Optional[Path] = None) -> List[Dict[str, str]]:
    """JSON lines with "prompt" and optionally "category"."""
    path = Path(path) if path else prompt_suite()
    prompts = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                prompts.append({"category": str(item.get("category", f"prompt{i}")), "prompt": str(item["prompt"])})
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise ValueError(f"{path}:{i}: expected a JSON object with a \"prompt\" field") from e
            if not prompts[-1]["prompt"].strip():
                raise EmptyPromptError(f"{path}:{i}: the prompt is empty or only whitespace")
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def tuned_blas(libraries: Sequence[str]) -> List[str]:
    """The tuned BLAS libraries among those loaded that MLX can call.
    NumPy's and SciPy's own OpenBLAS (libscipy_openblas64_...) export
    suffixed symbols, so MLX never calls them: only a plain build counts."""
    return sorted(lib for lib in libraries if ("openblas" in lib or "mkl" in lib) and "64_" not in lib)


def backend_description() -> str:
    """Which regime the figures come from: Metal, CUDA, or CPU and its BLAS."""
    device = mx.default_device()
    if device.type == mx.gpu:
        if mx.metal.is_available():
            return "Metal GPU"
        return "CUDA GPU" if hasattr(mx, "cuda") and mx.cuda.is_available() else "GPU"
    blas = "reference BLAS (compute-bound: a k+1-token verify costs more than one token)"
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split("/")[-1].strip() for line in f if "blas" in line.lower()}
        tuned = tuned_blas(libs)
        if tuned:
            blas = f"{tuned[0]} (tuned BLAS: models bigger than the CPU caches are bandwidth-bound, like on a Mac GPU)"
    except OSError:
        blas = "unknown BLAS"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores), {blas}"


def ideal_speedup(tokens_per_pass: float, k: int, c: float) -> float:
    """(1 - a^(k+1)) / ((1 - a)(1 + k c)); the numerator is the expected
    tokens per pass, for which we use the measured value."""
    return tokens_per_pass / (1 + k * c)


@dataclass
class Run:
    category: str
    k: NumDraft
    tokens: List[int]
    stats: Dict[str, Any]
    context: int = 0


@dataclass
class ModeSummary:
    k: NumDraft
    runs: List[Run] = field(default_factory=list)
    #: the drafter, when the bench compares several ("mtp", "ngram", "mtp+ngram")
    drafter: Optional[str] = None

    @property
    def key(self) -> str:
        """How the mode is named in the report: "3", or "mtp+ngram:3" when
        several drafters are compared."""
        return str(self.k) if self.drafter is None or self.k == 0 else f"{self.drafter}:{self.k}"

    def aggregate(self) -> Dict[str, Any]:
        predicted = sum(r.stats["generated_tokens"] for r in self.runs)
        drafted = sum(r.stats["draft_tokens"] for r in self.runs)
        accepted = sum(r.stats["accepted_tokens"] for r in self.runs)
        return {
            "n_requests": len(self.runs),
            "total_predicted": predicted,
            "total_draft": drafted,
            "total_draft_accepted": accepted,
            "aggregate_accept_rate": round(accepted / drafted, 4) if drafted else 0.0,
            "wall_s_total": round(sum(r.stats["prefill_s"] + r.stats["decode_s"] for r in self.runs), 3),
        }

    def tokens_per_pass(self) -> float:
        decoded = sum(r.stats["generated_tokens"] - 1 for r in self.runs)
        return decoded / max(1, sum(r.stats["target_passes"] for r in self.runs))

    def acceptance_per_depth(self) -> List[float]:
        """Per draft depth: accepted / drafted at that depth, over all runs."""
        depth = max((len(r.stats["drafted_per_position"]) for r in self.runs), default=0)
        drafted, accepted = [0] * depth, [0] * depth
        for r in self.runs:
            for j, (d, a) in enumerate(zip(r.stats["drafted_per_position"], r.stats["accepted_per_position"])):
                drafted[j] += d
                accepted[j] += a
        return [round(a / d, 3) if d else 0.0 for a, d in zip(accepted, drafted)]

    def k_histogram(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for r in self.runs:
            for k, n in r.stats.get("k_histogram", {}).items():
                out[k] = out.get(k, 0) + n
        return dict(sorted(out.items(), key=lambda kv: int(kv[0])))

    def parked_fraction(self) -> float:
        hist = self.k_histogram()
        return hist.get("0", 0) / max(1, sum(hist.values()))

    def sources(self) -> Dict[str, Dict[str, int]]:
        """Per draft source, over all runs: cycles, drafted, accepted."""
        out: Dict[str, Dict[str, int]] = {}
        for r in self.runs:
            for name, c in r.stats.get("sources", {}).items():
                total = out.setdefault(name, {"cycles": 0, "drafted": 0, "accepted": 0})
                for field_name in total:
                    total[field_name] += c[field_name]
        return out


def long_prefix(tokenizer, prompts: List[Dict[str, str]], num_tokens: int) -> str:
    """About `num_tokens` tokens of text to put before each prompt (the
    context ladder): the suite's own prompts, repeated."""
    text = "\n\n".join(p["prompt"] for p in prompts)
    ids: List[int] = []
    while len(ids) < num_tokens:
        ids += list(tokenizer.encode(text, add_special_tokens=False))
    return tokenizer.decode(ids[:num_tokens])


def median_interval(values: Sequence[float], confidence: float = 0.95) -> Tuple[float, float, float]:
    """(low, high, coverage): a distribution-free confidence interval for
    the median of `values`, from their order statistics (the sign test), so
    one disturbed run cannot move it and no noise model is assumed. With
    few values the widest interval, [min, max], may cover less than
    `confidence`; `coverage` says how much (5 values: 94%)."""
    xs = sorted(values)
    n = len(xs)
    if n < 2:
        return (xs[0], xs[0], 0.0) if xs else (0.0, 0.0, 0.0)

    def coverage(j: int) -> float:  # of [xs[j], xs[n-1-j]]: 1 - 2 P(Bin(n, 1/2) <= j)
        return 1 - 2 * sum(math.comb(n, i) for i in range(j + 1)) / 2**n

    j = 0  # the widest interval; narrow it while the coverage allows
    while j + 1 <= n - 2 - j and coverage(j + 1) >= confidence:
        j += 1
    return xs[j], xs[n - 1 - j], coverage(j)


def _paired_ratios(summary: ModeSummary, base: ModeSummary) -> Dict[str, List[float]]:
    """Per category, the decode-speed ratios of the mode to the baseline on
    the same prompt in the same round."""
    ratios: Dict[str, List[float]] = {}
    for r, b in zip(summary.runs, base.runs):
        if b.stats["decode_tokens_per_s"] > 0:
            ratios.setdefault(r.category, []).append(r.stats["decode_tokens_per_s"] / b.stats["decode_tokens_per_s"])
    return ratios


def _summarize(summaries: Dict[Any, ModeSummary], costs: Dict[str, float],
               echo: Callable[[str], None]) -> Dict[str, Any]:
    """The per-mode JSON entries and printed lines for one context length.
    `costs`: draft step cost c per mode key, for the fixed-k modes."""
    base = summaries[0]
    base_prefill = statistics.mean(r.stats["prefill_tokens_per_s"] for r in base.runs)
    modes: Dict[str, Any] = {}
    for summary in summaries.values():
        k = summary.k
        agg = summary.aggregate()
        entry: Dict[str, Any] = {"aggregate": agg, "runs": [r.__dict__ for r in summary.runs]}
        if summary.drafter is not None and k != 0:
            entry.update(drafter=summary.drafter, draft_sources=summary.sources())
        echo(f"== {_label(summary)} " + json.dumps(agg))
        prefill = statistics.mean(r.stats["prefill_tokens_per_s"] for r in summary.runs)
        if k == 0:
            entry.update(prefill_tokens_per_s=prefill)
            echo(f"   baseline decode {statistics.mean(r.stats['decode_tokens_per_s'] for r in summary.runs):.1f} "
                 f"tok/s  prefill {prefill:.0f} tok/s")
            modes["0"] = entry
            continue
        # Paired ratios (same prompt, same round); per category their median,
        # so with --rounds one disturbed run cannot decide a category.
        paired = _paired_ratios(summary, base)
        ratios = [x for v in paired.values() for x in v]
        mean = statistics.mean(ratios) if ratios else 0.0
        spread = statistics.pstdev(ratios) if len(ratios) > 1 else 0.0
        tpp = summary.tokens_per_pass()
        entry.update(speedup=mean, speedup_median=statistics.median(ratios) if ratios else 0.0,
                     speedup_min=min(ratios, default=0), speedup_max=max(ratios, default=0),
                     speedup_std=spread, tokens_per_pass=tpp, acceptance_per_depth=summary.acceptance_per_depth(),
                     speedup_per_category={c: statistics.median(v) for c, v in paired.items()},
                     speedup_interval_per_category={c: [round(x, 4) for x in median_interval(v)]
                                                    for c, v in {**paired, "all": ratios}.items()},
                     prefill_tokens_per_s=prefill,
                     prefill_vs_baseline=prefill / base_prefill if base_prefill else 0.0)
        line = (f"   speedup {mean:.2f}x (min {min(ratios, default=0):.2f}, max {max(ratios, default=0):.2f}, "
                f"sd {spread:.2f})  tokens/pass {tpp:.2f}  acceptance per depth {summary.acceptance_per_depth()}")
        if k == AUTO:
            entry.update(k_histogram=summary.k_histogram(), parked_fraction=summary.parked_fraction())
            line += f"  chosen k {summary.k_histogram()}  parked {100 * summary.parked_fraction():.0f}% of cycles"
        else:
            c = costs[summary.key]
            ideal = ideal_speedup(tpp, k, c)
            entry.update(draft_step_cost=c, ideal_speedup=ideal, measured_over_ideal=mean / ideal if ideal else 0.0)
            line += f"  ideal {ideal:.2f}x (c={c:.3f})  measured/ideal {mean / ideal if ideal else 0:.2f}"
        if entry.get("draft_sources"):
            line += "  by source " + json.dumps(entry["draft_sources"])
        echo(line + f"  prefill {prefill:.0f} tok/s ({entry['prefill_vs_baseline']:.2f}x of drafting off)")
        modes[summary.key] = entry
    return modes


def _label(summary: ModeSummary) -> str:
    return f"k={summary.k}" if summary.drafter is None or summary.k == 0 else f"{summary.drafter} k={summary.k}"


def drafter_table(modes: Dict[str, Any]) -> List[str]:
    """Tokens per pass and speedup per drafter mode, one line each, for the
    bench's comparison of drafters."""
    lines = [f"{'mode':<24} {'tokens/pass':>11} {'speedup':>8}  acceptance"]
    for key, m in modes.items():
        if key != "0":
            rate = m["aggregate"]["aggregate_accept_rate"]
            lines.append(f"{key:<24} {m['tokens_per_pass']:>11.2f} {m['speedup']:>7.2f}x  {100 * rate:.0f}%")
    return lines


def auto_verdict(modes: Dict[str, Any], floor: float = 0.97) -> Optional[str]:
    """The closing line: was `auto` >= floor x the baseline on every
    category, and how close did it come to the best fixed k?

    "yes": every category's median paired ratio is >= floor. "NO": some
    category's whole confidence interval lies below floor. Otherwise the
    lowest category is below floor but its interval reaches it: the
    machine's noise is larger than the margin, and the line says so rather
    than guess (more --rounds narrow the intervals)."""
    if AUTO not in modes:
        return None
    auto = modes[AUTO]
    per_category = auto["speedup_per_category"]
    intervals = auto.get("speedup_interval_per_category", {})
    worst_category, worst = min(per_category.items(), key=lambda kv: kv[1])
    below = [c for c, v in per_category.items() if c in intervals and intervals[c][1] < floor]
    if worst >= floor:
        verdict = "yes"
    elif below or worst_category not in intervals or intervals[worst_category][2] == 0:
        verdict = "NO"
    else:
        verdict = "within noise"
    line = f"auto: >= {floor:.2f}x the baseline on every category: {verdict} (lowest {worst:.2f}x on {worst_category}"
    if worst_category in intervals and intervals[worst_category][2] > 0:
        lo, hi, cover = intervals[worst_category]
        line += f", {100 * cover:.0f}% interval {lo:.2f}-{hi:.2f}"
    line += ")"
    if "all" in intervals and intervals["all"][2] > 0:
        lo, hi, cover = intervals["all"]
        line += f"; all categories {auto['speedup_median']:.2f}x ({100 * cover:.0f}% interval {lo:.2f}-{hi:.2f})"
    line += f"; mean {auto['speedup']:.2f}x"
    fixed = {k: m for k, m in modes.items() if k not in ("0", AUTO)}
    if fixed:
        best_k, best = max(fixed.items(), key=lambda kv: kv[1]["speedup"])
        line += f"; best fixed k={best_k} {best['speedup']:.2f}x, auto/best {auto['speedup'] / best['speedup']:.2f}"
    return line


def run_bench(
    model: SpeculativeModel,
    tokenizer,
    *,
    num_drafts: Sequence[NumDraft],
    prompts: List[Dict[str, str]],
    options: Optional[GenerationOptions] = None,
    contexts: Sequence[int] = (0,),
    echo: Callable[[str], None] = print,
    drafters: Sequence[str] = (),
    lookup_prompts: Optional[List[Dict[str, str]]] = None,
    rounds: int = 1,
    **overrides: Any,
) -> Dict[str, Any]:
    """Run every prompt at k=0 and at each draft length in `num_drafts`
    (ints and/or "auto"), interleaved prompt by prompt, for each context
    length in `contexts` (0: the prompt alone; N: after ~N tokens of text).

    `drafters`: compare these drafters ("mtp", "ngram", "mtp+ngram", ... as
    `load` names them) at each draft length on the same target; by default
    the model's own. `lookup_prompts`: the categories where prompt lookup
    matters (code_edit, doc_qa, json_reformat), run after the others at
    context 0 and reported apart (`report["lookup"]`), so the standard table
    stays comparable with other tools' figures. `rounds`: run the suite this
    many times (odd rounds in reverse mode order); per-category speedups are
    then medians of the paired ratios, which a noisy machine moves less.

    `options` (default `BENCH_OPTIONS`) holds max_tokens, sampling and seed;
    keyword `overrides` change single fields (max_tokens=..., temp=...). Its
    num_draft is ignored: the modes are the draft lengths."""
    from .api import with_drafter

    options = options if options is not None else BENCH_OPTIONS
    if overrides:
        options = options.replace(**overrides)
    max_tokens, temp, seed = options.max_tokens, options.sampling.temp, options.seed
    # Greedy decoding must give the very same tokens in every mode.
    check_lossless = options.sampling.greedy
    ks: List[NumDraft] = [k for k in num_drafts if k != 0]
    models: Dict[Optional[str], SpeculativeModel] = {None: model}
    if drafters:  # modes are named by what drafts ("gemma4-assistant+ngram"), not how it was asked for
        chosen = [with_drafter(model, d) for d in drafters]
        models = {(m.drafter.name if m.drafter else "none"): m for m in chosen}
    if not drafters and model.drafter is None and ks:
        raise ValueError(f"this model has no drafter ({model.drafter_note}); only the baseline can run")
    modes: List[ModeSummary] = [ModeSummary(0)] + [ModeSummary(k, drafter=d) for d in models for k in ks]
    names = ", ".join(d for d in models if d) or (model.drafter.name if model.drafter else "none")
    echo(f"backend: {backend_description()}")
    echo(f"model: {model.path}  drafter: {names}  "
         f"modes: {', '.join(_label(m) for m in modes)}  max_tokens={max_tokens} temp={temp} seed={seed}"
         + (f"  contexts: {', '.join(map(str, contexts))}" if list(contexts) != [0] else ""))

    def generate(prompt: str, mode: ModeSummary, n: int) -> Run:
        tokens: List[int] = []
        stats = None
        for r in stream_generate(models[mode.drafter] if mode.k else model, tokenizer, prompt, options,
                                 num_draft=mode.k, max_tokens=n):
            tokens += r.tokens
            stats = r.stats
        return Run("", mode.k, tokens, stats.to_dict())

    for mode in modes:  # warm-up: compile and allocate every path once
        generate(prompts[0]["prompt"], mode, 16)

    costs: Dict[str, float] = {}
    first = build_prompt(tokenizer, prompts[0]["prompt"])
    for mode in modes[1:]:
        drafter = models[mode.drafter].drafter
        if mode.k != AUTO and drafter is not None:
            costs[mode.key] = draft_step_cost(model.target, drafter, first, mode.k)
    if costs:
        echo("draft step cost c (vs one target step): " + ", ".join(f"{key}: {c:.3f}" for key, c in costs.items()))

    mismatches = []
    report: Dict[str, Any] = {"backend": backend_description(), "model": str(model.path), "temp": temp,
                              "max_tokens": max_tokens, "modes": {}, "lossless_mismatches": mismatches}

    def run_suite(items: List[Dict[str, str]], prefix: str, context: int) -> Dict[str, Any]:
        summaries = {0 if m.k == 0 else m.key: ModeSummary(m.k, drafter=m.drafter) for m in modes}
        echo("")
        for round_index in range(rounds):
            # Odd rounds run the modes in reverse, so a machine that drifts
            # over a prompt's runs favours no mode.
            order = list(summaries.values())
            if round_index % 2:
                order.reverse()
            for item in items:
                runs: Dict[Any, Run] = {}
                for summary in order:
                    run = generate(prefix + item["prompt"], summary, max_tokens)
                    run.category, run.context = item["category"], context
                    summary.runs.append(run)
                    runs[summary.key] = run
                    s = run.stats
                    echo(
                        f"{item['category']:<18} " + (f"ctx={context:<6} " if context else "")
                        + (f"r{round_index + 1} " if rounds > 1 else "")
                        + f"{_label(summary):<8} pred={s['generated_tokens']:<4} draft={s['draft_tokens']:<4} "
                        f"acc={s['accepted_tokens']:<4} rate={s['acceptance_rate']:.3f} "
                        f"tok/pass={s['tokens_per_pass']:.2f} tok/s={s['decode_tokens_per_s']:.1f} "
                        f"prefill={s['prefill_tokens_per_s']:.0f} tok/s"
                    )
                baseline = runs[summaries[0].key]
                for summary in order:
                    if summary.k != 0 and check_lossless and runs[summary.key].tokens != baseline.tokens:
                        mismatches.append((item["category"], summary.key, context))
                        echo(f"!!! LOSSLESS CHECK FAILED: {item['category']} {_label(summary)} ctx={context} "
                             "differs from the baseline")
        echo("" if not context else f"\n-- context {context} tokens")
        return _summarize(summaries, costs, echo)

    for context in contexts:
        prefix = long_prefix(tokenizer, prompts, context) + "\n\n" if context else ""
        summary = run_suite(prompts, prefix, context)
        report.setdefault("contexts", {})[str(context)] = {"modes": summary}
        if context == contexts[0]:
            report["modes"] = summary
        verdict = auto_verdict(summary)
        if verdict:
            echo(verdict)
            report["contexts"][str(context)]["auto_verdict"] = verdict
        if drafters:
            for line in drafter_table(summary):
                echo(line)
    if lookup_prompts:
        echo("\n-- lookup categories (reported apart from the standard table): "
             + ", ".join(sorted({p["category"] for p in lookup_prompts})))
        report["lookup"] = {"modes": run_suite(lookup_prompts, "", 0)}
        for line in drafter_table(report["lookup"]["modes"]):
            echo(line)
    if mismatches:
        echo(f"!!! LOSSLESS CHECK FAILED for {len(mismatches)} prompt/mode pairs: {mismatches}")
    elif check_lossless:
        echo("lossless check: every mode reproduced the baseline tokens exactly")
    return report


def plot(report: Dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install 'mlx-mtp[plot]'") from e
    modes = report["modes"]
    categories = list(dict.fromkeys(r["category"] for r in modes["0"]["runs"]))  # in order, once each (--rounds)

    def per_category(runs: List[Dict[str, Any]]) -> List[float]:
        speeds: Dict[str, List[float]] = {}
        for r in runs:
            speeds.setdefault(r["category"], []).append(r["stats"]["decode_tokens_per_s"])
        return [statistics.median(speeds[c]) for c in categories]

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(modes)
    for i, (k, entry) in enumerate(modes.items()):
        xs = [j + i * width for j in range(len(categories))]
        ax1.bar(xs, per_category(entry["runs"]), width, label=f"k={k}")
        if k != "0":
            ax2.bar(xs, [entry["speedup_per_category"][c] for c in categories], width, label=f"k={k}")
    for ax, title in ((ax1, "decode tok/s"), (ax2, "speedup over k=0")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(categories))], categories, rotation=35, ha="right")
        ax.set_title(title)
        ax.legend()
    ax2.axhline(1.0, color="gray", lw=0.8)
    fig.suptitle(f"{Path(report['model']).name} - {report['backend']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
