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

from .markers import partial_marker_length

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"

_FUNCTION = re.compile(r"<function=([^>\n]+)>(.*?)(?:</function>|$)", re.DOTALL)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)
_FUNCTION_HEAD = re.compile(r"<function=([^>\n]+)>")
_FUNCTION_END = "</function>"
_PARAMETER_OPEN = "<parameter="
_PARAMETER_END = "</parameter>"
_JSON_NAME = re.compile(r'\{\s*"name"\s*:\s*')
_JSON_ARGUMENTS = re.compile(r'\s*,\s*"(?:arguments|parameters)"\s*:\s*')


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


# -- streaming ------------------------------------------------------------------
#
# `stream_call(body, tools, final)` -> (name, arguments text so far). While
# the call is open (final=False) the text is the part of the arguments JSON
# that no later text can change: a prefix of what the whole body gives
# (final=True). The server sends the name once it is known and then each
# new piece of the text as a `function.arguments` delta, as vLLM's
# qwen3_coder and hermes parsers do (vllm/tool_parsers/qwen3coder_tool_parser.py:
# header with id and name and "" arguments first, then "{" and the
# parameters); here a string parameter's value also streams as it is written.


def stream_call(body: str, tools: Optional[List[Dict[str, Any]]] = None,
                final: bool = False) -> Tuple[Optional[str], str]:
    """(function name or None while unknown, arguments JSON text). With
    final=True `body` is the whole call: ValueError when it is not one."""
    text = body.lstrip()
    if text.startswith("{"):
        return _stream_json(text, final)
    return _stream_xml(text, tools, final)


def _stream_xml(text: str, tools: Optional[List[Dict[str, Any]]], final: bool) -> Tuple[Optional[str], str]:
    head = _FUNCTION_HEAD.match(text)
    if head is None:
        if final:
            raise ValueError("no <function=NAME> in the tool call")
        return None, ""
    name = head.group(1).strip()
    types = _parameter_types(name, tools)
    rest = text[head.end():]
    end = rest.find(_FUNCTION_END)
    closed = final or end >= 0
    if end >= 0:
        rest = rest[:end]
    elif final:
        rest = rest.rstrip()  # parse_call strips the body
    else:  # the end may be the start of a marker: wait for the next text
        rest = rest[: len(rest) - partial_marker_length(rest, [_FUNCTION_END, _PARAMETER_END, _PARAMETER_OPEN])]
    items, partial = [], None
    for match in _PARAMETER.finditer(rest):
        key, raw = match.group(1).strip(), match.group(2)
        ended = closed or match.group(0).endswith(_PARAMETER_END) or rest.startswith(_PARAMETER_OPEN, match.end())
        prefix = json.dumps(key, ensure_ascii=False) + ": "
        if ended:
            items.append(prefix + json.dumps(_value(_trim_newline(raw), types.get(key)), ensure_ascii=False))
        elif types.get(key) == "string":
            # Its text streams; trailing whitespace waits (one newline is
            # the template's, and the end of the body is stripped).
            value = (raw[1:] if raw.startswith("\n") else raw).rstrip()
            partial = prefix + '"' + json.dumps(value, ensure_ascii=False)[1:-1]
        else:  # a number, object, ...: read as JSON once it is whole
            partial = prefix
    # json.dumps(dict) form: {"k": v, "k2": v2}
    arguments = "{" + ", ".join(items)
    if partial is not None:
        arguments += (", " if items else "") + partial
    elif closed:
        arguments += "}"
    return name, arguments


def _stream_json(text: str, final: bool) -> Tuple[Optional[str], str]:
    """Hermes JSON: the name is known once its string closes; the arguments
    object streams as the model writes it (when "arguments" follows the
    name, as Hermes templates put it); any other layout comes whole."""
    decoder = json.JSONDecoder()
    name, arguments = None, ""
    head = _JSON_NAME.match(text)
    if head is not None:
        try:
            name, at = decoder.raw_decode(text, head.end())
        except ValueError:
            name = None
        if not isinstance(name, str):
            name = None
        else:
            args = _JSON_ARGUMENTS.match(text, at)
            if args is not None and text.startswith("{", args.end()):
                try:
                    _, stop = decoder.raw_decode(text, args.end())
                    arguments = text[args.end():stop]
                except ValueError:  # still open: all of the rest is inside it
                    arguments = text[args.end():] if not final else ""
    if not final:
        return name, arguments
    whole_name, whole = _parse_json(text.strip())
    if name == whole_name and arguments and json.loads(arguments) == whole:
        return name, arguments
    return whole_name, json.dumps(whole, ensure_ascii=False)
