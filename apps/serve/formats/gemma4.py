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
        out.append(json.dumps(part) if i % 2 else _BARE_KEY.sub(r'\1"\2":', part))
    return "".join(out)
