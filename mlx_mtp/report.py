"""How figures are written for people: shared by the CLI, `bench` and the chat app.

Only plain strings here (no click, no Textual), so every front end prints a
figure the same way and this module stays cheap to import.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["format_memory", "format_acceptance", "format_draft_lengths", "format_sources", "format_stats",
           "cli_words"]


def format_memory(n_bytes: float) -> str:
    """Bytes as "1.23 GB", or "456.7 MB" below 0.1 GB."""
    gb = n_bytes / 1e9
    return f"{gb:.2f} GB" if gb >= 0.1 else f"{gb * 1000:.1f} MB"


def format_acceptance(stats: Any, label: str = "acceptance") -> str:
    """ "acceptance 71% (45/63)": share of drafted tokens the target accepted."""
    return f"{label} {100 * stats.acceptance_rate:.0f}% ({stats.accepted_tokens}/{stats.draft_tokens})"


def format_draft_lengths(stats: Any) -> str:
    """ "k chosen 0:12 3:40, parked 23%": what the adaptive policy picked, per cycle."""
    hist = " ".join(f"{k}:{n}" for k, n in sorted(stats.k_histogram.items()))
    return f"k chosen {hist or '-'}, parked {100 * stats.parked_fraction:.0f}%"


def format_sources(stats: Any) -> str:
    """ "ngram 92% (48/52) in 6 cycles, mtp 70% (33/47) in 16": acceptance
    per draft source of a combined drafter."""
    return ", ".join(
        f"{name} {100 * c['accepted'] / max(1, c['drafted']):.0f}% ({c['accepted']}/{c['drafted']}) "
        f"in {c['cycles']} cycles"
        for name, c in sorted(stats.sources.items())
    )


def format_stats(stats: Any) -> str:
    """One readable line for a finished generation, e.g.
    [mtp k=3] prompt 12 tok @ 850 tok/s | 64 tok @ 120.3 tok/s | acceptance 71% (45/63) | ..."""
    d = stats.to_dict()
    parts = [
        f"[{stats.drafter} k={stats.num_draft}] prompt {stats.prompt_tokens} tok "
        f"@ {d['prefill_tokens_per_s']:.0f} tok/s",
        f"{stats.generated_tokens} tok @ {d['decode_tokens_per_s']:.1f} tok/s",
    ]
    if stats.draft_tokens:
        parts.append(format_acceptance(stats))
    if len(stats.sources) > 1:
        parts.append(format_sources(stats))
    if stats.num_draft == "auto":
        parts.append(format_draft_lengths(stats))
    parts += [
        f"{stats.tokens_per_pass:.1f} tok/pass",
        f"{stats.host_syncs_per_cycle:.1f} syncs/cycle",
        # to_dict() holds the peak rounded to 0.1 MB: the same figure as --json.
        f"peak {format_memory(d['peak_memory_gb'] * 1e9)}",
    ]
    if stats.finish_reason == "stop" and not stats.generated_tokens:
        # Nothing was printed: say why, or an empty output looks like a bug.
        parts.append("finish stop after 0 tokens: the model emitted end-of-sequence")
    elif stats.finish_reason and stats.finish_reason != "length":
        parts.append(f"finish {stats.finish_reason}")
    return " | ".join(parts)


# The library names a setting the way its Python API spells it
# (drafter="none"); the command-line front ends show their own flag instead.
_API_DRAFTER = re.compile(r'\bdrafter="([^"]*)"')


def cli_words(message: str) -> str:
    """A library message in command-line words: drafter="none" -> --drafter none."""
    return _API_DRAFTER.sub(r"--drafter \1", message)
