"""Qwen's tool calls: `<tool_call>...</tool_call>`, with either body.

- Qwen3.5 / 3.6 (and Qwen3-Coder) write XML-ish markup, as their chat
  templates render past calls:
      <tool_call>
      <function=get_weather>
      <parameter=city>
      Paris
      </parameter>
      </function>
      </tool_call>
- Qwen2.5 / Qwen3 (Hermes style) write one JSON object:
      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, List, Optional, Tuple

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


def parse_call(body: str, tools: Optional[List[Dict[str, Any]]] = None) -> Tuple[str, Dict[str, Any]]:
    """(name, arguments) of the text between <tool_call> and </tool_call>;
    ValueError when it is neither form."""
    body = body.strip()
    if body.startswith("{"):
        return _parse_json(body)
    return _parse_xml(body, tools)


def _parse_json(body: str) -> Tuple[str, Dict[str, Any]]:
    call = json.loads(body)
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        raise ValueError("a JSON tool call needs a \"name\"")
    arguments = call.get("arguments", call.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ValueError("tool call arguments must be an object")
    return call["name"], arguments


def _parse_xml(body: str, tools: Optional[List[Dict[str, Any]]]) -> Tuple[str, Dict[str, Any]]:
    match = _FUNCTION.match(body)
    if match is None:
        raise ValueError("no <function=NAME> in the tool call")
    name = match.group(1).strip()
    types = _parameter_types(name, tools)
    arguments = {}
    for key, raw in _PARAMETER.findall(match.group(2)):
        key = key.strip()
        arguments[key] = _value(_trim_newline(raw), types.get(key))
    return name, arguments


def _trim_newline(text: str) -> str:
    """The template puts the value on lines of its own: drop one newline each side."""
    if text.startswith("\n"):
        text = text[1:]
    if text.endswith("\n"):
        text = text[:-1]
    return text


def _parameter_types(name: str, tools: Optional[List[Dict[str, Any]]]) -> Dict[str, Any]:
    """{parameter: JSON-schema type} of the declared function `name`."""
    for tool in tools or []:
        function = tool.get("function") or {}
        if function.get("name") == name:
            properties = (function.get("parameters") or {}).get("properties") or {}
            return {k: (v or {}).get("type") for k, v in properties.items() if isinstance(v, dict)}
    return {}


def _value(raw: str, schema_type: Any) -> Any:
    """A parameter's text as the schema wants it: strings stay text (a
    string "42" must not become a number); anything else is read as JSON
    when it parses, else kept as text."""
    if schema_type == "string":
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw
