"""Generated text, split as it streams into reasoning, content and tool calls.

The markers of a `Markup` can arrive split over several pieces of text, so
text that could be the start of a marker is held back until the next piece
decides. Whitespace next to a marker (the newlines templates put around
think blocks and calls) is dropped, as `chat_session.split_thinking` does;
content that has no markers at all comes out exactly as generated.

A tool call streams as OpenAI streams one: its first delta carries the
index, id, type and function name (with "" arguments) as soon as the name
is known, later ones pieces of `function.arguments` as the model writes
them (the format's `stream_call`); joined, the pieces are the call's
arguments, and the non-streamed reply joins the same pieces (`merge_calls`).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .formats import Markup
from .formats.markers import partial_marker_length

REASONING = "reasoning"
CONTENT = "content"
CALL = "call"


@dataclass
class Delta:
    """One piece of output: text of `kind` REASONING or CONTENT, or a piece
    of a tool call (kind CALL, `call` as an entry of OpenAI's streamed
    `tool_calls`: the first of a call has index, id, type and
    function.name with "" arguments, the others index and a
    function.arguments piece)."""

    kind: str
    text: str = ""
    call: Optional[Dict[str, Any]] = None


@dataclass
class _OpenCall:
    """The call being streamed: its index, id and the arguments sent so far."""

    index: int
    id: str
    sent: str = ""


def merge_calls(deltas: List[Delta]) -> List[Dict[str, Any]]:
    """The whole calls (index, id, type, function name and arguments) that
    the CALL deltas stream, in index order: what a client accumulates."""
    calls: Dict[int, Dict[str, Any]] = {}
    for d in deltas:
        if d.kind != CALL:
            continue
        index, function = d.call["index"], d.call["function"]
        if index not in calls:
            calls[index] = {"index": index, "id": d.call["id"], "type": "function",
                            "function": {"name": function["name"], "arguments": ""}}
        calls[index]["function"]["arguments"] += function.get("arguments", "")
    return [calls[i] for i in sorted(calls)]


_TRAILING_WORD = re.compile(r"[A-Za-z0-9.+\-]+$")


def close_json(prefix: str) -> str:
    """`prefix`, the start of a JSON object as a call's arguments stream,
    completed into valid JSON: the open string closed, a key without a value
    given null, a cut literal or number finished, the open brackets closed.
    For a call the model broke off after its arguments began to stream: what
    was sent cannot be taken back, so the client gets at least valid JSON."""
    if not prefix.strip():
        return "{}"
    stack: List[str] = []
    in_string = escape = key_string = after_key = False
    last = ""  # the last character outside strings that is not whitespace
    for ch in prefix:
        if in_string:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_string, last = False, '"'
                after_key = key_string
            continue
        if ch == '"':
            in_string = True
            key_string = bool(stack) and stack[-1] == "}" and last in ("{", ",")
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
        elif ch == ":":
            after_key = False
        if not ch.isspace():
            last = ch
    tail = ""
    if in_string:
        tail += ("\\" if escape else "") + '"' + (": null" if key_string else "")
    elif after_key:
        tail += ": null"
    elif last == ":":
        tail += "null"
    elif last == ",":
        tail += '"": null' if stack and stack[-1] == "}" else "null"
    else:
        word = _TRAILING_WORD.search(prefix)
        if word is not None:
            w = word.group(0)
            literal = next((x for x in ("true", "false", "null") if x.startswith(w)), None)
            if literal is not None:
                tail += literal[len(w):]
            elif w[-1] in ".eE+-":
                tail += "0"
    return prefix + tail + "".join(reversed(stack))


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


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
        self.call: Optional[_OpenCall] = None

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
        if self.mode == CALL:
            # The call so far, less what may be the start of its closing
            # marker; read whole each time (a call is short next to a step).
            body = self.pending[: len(self.pending) - partial_marker_length(self.pending, self._markers())]
            name, arguments = self.markup.stream_call(body, self.tools, False)
            if name is not None:
                self._send(out, name, arguments)
        else:
            hold = partial_marker_length(self.pending, self._markers())
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
            self.mode, self.call = CALL, None

    def _send(self, out: List[Delta], name: Optional[str], arguments: str) -> None:
        """The call's first delta once its name is known, then the new end
        of its arguments text."""
        if self.call is None:
            self.call = _OpenCall(self.calls, new_call_id())
            out.append(Delta(CALL, call={"index": self.call.index, "id": self.call.id, "type": "function",
                                         "function": {"name": name, "arguments": ""}}))
        sent = self.call.sent
        if len(arguments) > len(sent) and arguments.startswith(sent):
            out.append(Delta(CALL, call={"index": self.call.index, "function": {"arguments": arguments[len(sent):]}}))
            self.call.sent = arguments

    def _end_call(self, out: List[Delta], body: str, closed: bool) -> None:
        self.mode, self.strip_next = CONTENT, True
        try:
            name, arguments = self.markup.stream_call(body, self.tools, True)
        except ValueError:
            if self.call is None:
                # Not a call after all: keep the model's text where it was.
                m = self.markup
                self.strip_next = False
                self._emit(out, m.call_open + body + (m.call_close if closed else ""), final=True)
                return
            name, arguments = None, close_json(self.call.sent)
        if self.call is not None and not arguments.startswith(self.call.sent):
            arguments = close_json(self.call.sent)  # what was sent stays sent
        self._send(out, name, arguments)
        self.call = None
        self.calls += 1
