"""The output markup of each model family the server understands.

A model writes its reasoning and its tool calls as plain text between
marker strings; a `Markup` names those markers and how to read one call's
body. One module per format holds its call parser (qwen.py, gemma4.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import gemma4, qwen

#: (function name, arguments object) of one tool call's body; ValueError
#: when the body is not a call.
CallParser = Callable[[str, Optional[List[Dict[str, Any]]]], Tuple[str, Dict[str, Any]]]
#: (body so far, tools, final) -> (function name or None while unknown,
#: arguments JSON text so far). While the call is open the text is a prefix
#: of the whole call's; final=True reads the whole body (ValueError when it
#: is not a call), and its text parses to what CallParser gives.
CallStreamer = Callable[[str, Optional[List[Dict[str, Any]]], bool], Tuple[Optional[str], str]]


@dataclass(frozen=True)
class Markup:
    name: str
    think_open: str
    think_close: str
    call_open: str
    call_close: str
    parse_call: CallParser
    #: the same call read as it streams (function.arguments deltas)
    stream_call: CallStreamer
    #: text the model writes to hand the turn back while it waits for a tool
    #: result (Gemma 4's `<|tool_response>`): generation ends there
    turn_end: Tuple[str, ...] = ()


QWEN = Markup("qwen", "<think>", "</think>", qwen.CALL_OPEN, qwen.CALL_CLOSE, qwen.parse_call, qwen.stream_call)
GEMMA4 = Markup("gemma4", gemma4.THINK_OPEN, gemma4.THINK_CLOSE, gemma4.CALL_OPEN, gemma4.CALL_CLOSE,
                gemma4.parse_call, gemma4.stream_call, turn_end=(gemma4.RESPONSE_OPEN,))


def detect(chat_template: Optional[str], vocabulary: Dict[str, int]) -> Markup:
    """Gemma 4's markup when its template or vocabulary has the Gemma 4
    markers, else Qwen's (`<think>`, `<tool_call>`), which also covers the
    many models that took Qwen's / Hermes' form, and harms none: the
    markers only matter where they appear."""
    template = chat_template or ""
    if gemma4.CALL_OPEN in template or gemma4.CHANNEL in vocabulary:
        return GEMMA4
    return QWEN
