"""Generated text, split as it streams into reasoning, content and tool calls.

The markers of a `Markup` can arrive split over several pieces of text, so
text that could be the start of a marker is held back until the next piece
decides. Whitespace next to a marker (the newlines templates put around
think blocks and calls) is dropped, as `chat_session.split_thinking` does;
content that has no markers at all comes out exactly as generated.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .formats import Markup

REASONING = "reasoning"
CONTENT = "content"
CALL = "call"


@dataclass
class Delta:
    """One piece of output: text of `kind` REASONING or CONTENT, or a
    finished tool call (kind CALL, `call` in OpenAI's form)."""

    kind: str
    text: str = ""
    call: Optional[Dict[str, Any]] = None


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _partial_marker(text: str, markers: List[str]) -> int:
    """How many characters at the end of `text` could begin one of `markers`."""
    hold = 0
    for marker in markers:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:n]):
                hold = max(hold, n)
                break
    return hold


class OutputParser:
    """Feed it text as it is generated; it returns `Delta`s.

    in_reasoning: the prompt already opened the think block (Qwen's
    templates end the generation prompt with "<think>"), so the text starts
    inside it. tools: the request's tool schemas; None leaves tool-call
    markup in the content."""

    def __init__(self, markup: Markup, in_reasoning: bool = False,
                 tools: Optional[List[Dict[str, Any]]] = None):
        self.markup = markup
        self.tools = tools
        self.mode = REASONING if in_reasoning else CONTENT
        self.pending = ""
        # Right after a marker the next text's leading whitespace is dropped.
        self.strip_next = in_reasoning
        self.calls = 0

    def _markers(self) -> List[str]:
        m = self.markup
        if self.mode == REASONING:
            return [m.think_close]
        if self.mode == CALL:
            return [m.call_close]
        return [m.think_open] + ([m.call_open] if self.tools is not None else [])

    def feed(self, text: str) -> List[Delta]:
        self.pending += text
        out: List[Delta] = []
        while True:
            found = [(self.pending.find(s), s) for s in self._markers()]
            found = [(i, s) for i, s in found if i >= 0]
            if not found:
                break
            i, marker = min(found)
            before, self.pending = self.pending[:i], self.pending[i + len(marker):]
            if self.mode == CALL:
                self._end_call(out, before, closed=True)
            else:
                # Whitespace before a marker is the template's spacing, not text.
                self._emit(out, before.rstrip() if self.mode == CONTENT else before, final=True)
                self._switch(marker)
        if self.mode != CALL:
            hold = _partial_marker(self.pending, self._markers())
            text = self.pending[: len(self.pending) - hold]
            # Trailing whitespace waits too: if a marker follows, it is dropped.
            kept = len(text.rstrip())
            self._emit(out, text[:kept], final=False)
            self.pending = self.pending[kept:]
        return out

    def finish(self) -> List[Delta]:
        """The rest, once generation has ended: an unclosed think block is
        reasoning; an unclosed call is still read as a call when it parses."""
        out: List[Delta] = []
        rest, self.pending = self.pending, ""
        if self.mode == CALL:
            self._end_call(out, rest, closed=False)
        else:
            self._emit(out, rest, final=True)
        return out

    def _emit(self, out: List[Delta], text: str, final: bool) -> None:
        if self.strip_next:
            text = text.lstrip()
            if not text:
                return
            self.strip_next = False
        if final and self.mode == REASONING:
            text = text.rstrip()
        if text:
            out.append(Delta(self.mode, text))

    def _switch(self, marker: str) -> None:
        m = self.markup
        if marker == m.think_open:
            self.mode, self.strip_next = REASONING, True
        elif marker == m.think_close:
            self.mode, self.strip_next = CONTENT, True
        else:  # a call opens; its body is what follows
            self.mode = CALL

    def _end_call(self, out: List[Delta], body: str, closed: bool) -> None:
        self.mode, self.strip_next = CONTENT, True
        try:
            name, arguments = self.markup.parse_call(body, self.tools)
        except ValueError:
            # Not a call after all: keep the model's text where it was.
            m = self.markup
            self.strip_next = False
            self._emit(out, m.call_open + body + (m.call_close if closed else ""), final=True)
            return
        out.append(Delta(CALL, call={
            "index": self.calls, "id": new_call_id(), "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
        }))
        self.calls += 1
