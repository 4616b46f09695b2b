"""Holding back streamed text that may be the start of a markup tag."""

from __future__ import annotations

from typing import List


def partial_marker_length(text: str, markers: List[str]) -> int:
    """How many characters at the end of `text` could begin one of `markers`
    (the stream holds them back until the next token says which)."""
    hold = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:n]):
                hold = max(hold, n)
                break
    return hold
