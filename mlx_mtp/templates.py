"""Rendering a chat through the model's chat template, in one place.

Every front end (generate, the API, `ChatSession`, a server) renders its
prompts here, so they all see the same template arguments and the same
thinking default. See docs/chat-templates.md.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

#: Arguments the renderer passes itself; template keyword arguments may not
#: name them (tools have their own option).
RESERVED_TEMPLATE_ARGS = frozenset(
    {"conversation", "messages", "tools", "tokenize", "add_generation_prompt", "return_dict",
     "continue_final_message", "chat_template"}
)


def check_template_kwargs(kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """A copy of `kwargs` as a plain dict; ValueError for a key the renderer
    sets itself or a key that is not a name."""
    out = dict(kwargs)
    for key in out:
        if not isinstance(key, str) or not key.isidentifier():
            raise ValueError(f"template argument {key!r} is not a name")
        if key in RESERVED_TEMPLATE_ARGS:
            raise ValueError(f"template argument {key!r} is set by mlx-mtp itself"
                             + (" (give tools with tools=... or --tools)" if key == "tools" else ""))
    return out


def check_tools(tools: Any) -> List[Dict[str, Any]]:
    """`tools` as a list of JSON-schema objects; ValueError otherwise."""
    if not isinstance(tools, (list, tuple)) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be a list of JSON objects (function schemas)")
    return [dict(t) for t in tools]


def parse_template_arg(text: str) -> Tuple[str, Any]:
    """(key, value) of one KEY=VALUE: VALUE is JSON when it parses as JSON
    (true, 3, {"a": 1}), else the string as written."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    check_template_kwargs({key: value})
    return key, value


def load_tools(path: str) -> List[Dict[str, Any]]:
    """The tool schemas in a JSON file (a list of objects); ValueError with
    a one-line reason when the file is missing or holds something else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError and bad encodings
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    try:
        return check_tools(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def apply_template(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    enable_thinking: Optional[bool] = None,
    tools: Optional[Sequence[Mapping[str, Any]]] = None,
    template_kwargs: Optional[Mapping[str, Any]] = None,
) -> str:
    """The text of `messages` through `tokenizer`'s chat template.

    enable_thinking None leaves the switch out, so the template's own default
    applies (Qwen3.5/3.6 think, Gemma 4 does not), as transformers renders
    it. `tools` (JSON schemas) and `template_kwargs` (reasoning_effort=...,
    preserve_thinking=...) go to the template as they are; an explicit
    `enable_thinking` wins over one in `template_kwargs`."""
    kwargs = check_template_kwargs(template_kwargs or {})
    if enable_thinking is not None:
        kwargs["enable_thinking"] = enable_thinking
    if tools:
        kwargs["tools"] = check_tools(tools)
    render = _renderer(tokenizer, thinking_set="enable_thinking" in kwargs)
    return render(list(messages), add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)


def _renderer(tokenizer: Any, thinking_set: bool) -> Any:
    """The apply_chat_template to call. mlx-lm's TokenizerWrapper passes
    enable_thinking=True whenever the vocabulary has think tokens, which
    turns Gemma 4's thinking on against its template's default, so with the
    switch unset the wrapped HF tokenizer renders instead. A model that
    mlx-lm renders in Python (no Jinja template) keeps the wrapper."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if thinking_set or not isinstance(tokenizer, TokenizerWrapper):
        return tokenizer.apply_chat_template
    if getattr(tokenizer, "_chat_template", None) is not None:
        return tokenizer.apply_chat_template
    hf = tokenizer._tokenizer

    def render(messages: List[Any], **kwargs: Any) -> str:
        # return_dict=False: newer transformers return a dict by default.
        return hf.apply_chat_template(messages, return_dict=False, **kwargs)

    return render
