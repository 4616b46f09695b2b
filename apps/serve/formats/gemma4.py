"""Gemma 4's markup, as its chat template renders it (and transformers'
serving code reads it back):

- reasoning in the thought channel: `<|channel>thought\\n...<channel|>`;
- a tool call: `<|tool_call>call:NAME{key:<|"|>text<|"|>,n:3}<tool_call|>`,
  an object with bare keys whose strings are delimited by `<|"|>`;
- after its calls the model writes `<|tool_response>`, where the template
  puts the tool's result: the turn ends there.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Tuple

CHANNEL = "<|channel>"
THINK_OPEN = CHANNEL + "thought"
THINK_CLOSE = "<channel|>"
CALL_OPEN = "<|tool_call>"
CALL_CLOSE = "<tool_call|>"
RESPONSE_OPEN = "<|tool_response>"
STRING_DELIMITER = '<|"|>'

_HEAD = re.compile(r"\s*call:([\w.\-]+)\s*(\{.*\})\s*$", re.DOTALL)
_NAME = re.compile(r"\s*call:([\w.\-]+)\s*\{")
# The end of text outside strings that could still become a bare key: a
# name after `{` or `,` whose `:` has not arrived yet.
_KEY_SO_FAR = re.compile(r"[{,]\s*[A-Za-z_][\w\-]*\s*$")
# A bare key: a name right after `{` or `,` (strings were taken out first).
_BARE_KEY = re.compile(r"([{,]\s*)([A-Za-z_][\w\-]*)\s*:")


def parse_call(body: str, tools: Optional[List[Dict[str, Any]]] = None) -> Tuple[str, Dict[str, Any]]:
    """(name, arguments) of the text between <|tool_call> and <tool_call|>;
    ValueError when it is not `call:NAME{...}`."""
    match = _HEAD.match(body)
    if match is None:
        raise ValueError("not a call:NAME{...} tool call")
    arguments = json.loads(to_json(match.group(2)))
    if not isinstance(arguments, dict):
        raise ValueError("tool call arguments must be an object")
    return match.group(1), arguments


def to_json(text: str) -> str:
    """Gemma 4's argument object as JSON: the `<|"|>` strings become JSON
    strings and bare keys get quotes. Keys are quoted only outside strings,
    so a value that contains `a:` stays as written."""
    parts = text.split(STRING_DELIMITER)
    if len(parts) % 2 == 0:
        raise ValueError("an argument string is not closed")
    out = []
    for i, part in enumerate(parts):
        out.append(json.dumps(part, ensure_ascii=False) if i % 2 else _BARE_KEY.sub(r'\1"\2":', part))
    return "".join(out)


def stream_call(body: str, tools: Optional[List[Dict[str, Any]]] = None,
                final: bool = False) -> Tuple[Optional[str], str]:
    """(name or None while unknown, arguments JSON text): while the call is
    open, the part of `to_json`'s output that no later text changes (a
    prefix of the whole call's); final=True reads the whole call (ValueError
    when it is not one). See formats/qwen.py for how the server streams it."""
    if final:
        match = _HEAD.match(body)
        if match is None:
            raise ValueError("not a call:NAME{...} tool call")
        arguments = to_json(match.group(2))
        if not isinstance(json.loads(arguments), dict):
            raise ValueError("tool call arguments must be an object")
        return match.group(1), arguments
    head = _NAME.match(body)
    if head is None:
        return None, ""
    text = body[head.end() - 1 :]  # from the "{"
    # Hold back what the next text may still change: a partial string
    # delimiter, and outside strings a name that may be a key, and
    # whitespace (the object's end drops it).
    text = text[: len(text) - _partial(text, STRING_DELIMITER)]
    parts = text.split(STRING_DELIMITER)
    if len(parts) % 2:  # outside a string at the end
        tail = parts[-1].rstrip()
        key = _KEY_SO_FAR.search(tail)
        if key is not None:
            tail = tail[: key.start() + 1]
        parts[-1] = tail
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(_BARE_KEY.sub(r'\1"\2":', part))
        elif i < len(parts) - 1:
            out.append(json.dumps(part, ensure_ascii=False))
        else:  # the string still open: its text so far, no closing quote
            out.append('"' + json.dumps(part, ensure_ascii=False)[1:-1])
    return head.group(1), "".join(out)


def _partial(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
