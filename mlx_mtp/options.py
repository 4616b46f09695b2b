"""One object for everything a caller can ask of a generation.

It travels unchanged from the front ends (CLI, chat app, server) through
`ChatSession` and `stream_generate` to the engine, so no layer repeats the
list of sampling arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

from .sampling import SamplingParams
from .templates import check_template_kwargs, check_tools

#: `num_draft` value that lets the adaptive draft policy pick k per cycle.
AUTO = "auto"

NumDraft = Union[int, str, None]


@dataclass(frozen=True)
class GenerationOptions:
    #: tokens drafted per cycle: an int (0 is plain decoding), AUTO, or None
    #: for the drafter's default
    num_draft: NumDraft = None
    max_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: Optional[int] = None
    stop: Tuple[str, ...] = ()
    system: Optional[str] = None
    #: False: the prompt text is used as is, without the chat template
    chat_template: bool = True
    #: None: the chat template's own default
    enable_thinking: Optional[bool] = None
    #: override the model's context length
    max_context: Optional[int] = None
    #: tool schemas (JSON objects) the chat template declares to the model
    tools: Optional[Tuple[Dict[str, Any], ...]] = field(default=None, hash=False)
    #: more keyword arguments for the chat template (reasoning_effort=...,
    #: preserve_thinking=...); an explicit enable_thinking wins over one here
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self):
        if isinstance(self.num_draft, str) and self.num_draft != AUTO:
            raise ValueError(f"num_draft must be an integer >= 0 or {AUTO!r}, got {self.num_draft!r}")
        if isinstance(self.num_draft, int) and self.num_draft < 0:
            raise ValueError(f"num_draft must be >= 0, got {self.num_draft}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))
        # Copied and checked once here, so every front end fails the same way
        # and a caller's later change to its list or dict cannot leak in.
        if self.tools is not None:
            object.__setattr__(self, "tools", tuple(check_tools(self.tools)) or None)
        object.__setattr__(self, "chat_template_kwargs", check_template_kwargs(self.chat_template_kwargs or {}))

    def replace(self, **changes) -> "GenerationOptions":
        """A copy with some fields changed; sampling fields (temp, top_p,
        top_k, min_p, repetition_penalty, repetition_context_size,
        presence_penalty, frequency_penalty) may be given directly."""
        sampling_fields = {f.name for f in dataclasses.fields(SamplingParams)}
        sampling = {k: changes.pop(k) for k in list(changes) if k in sampling_fields}
        if sampling:
            changes["sampling"] = dataclasses.replace(changes.get("sampling", self.sampling), **sampling)
        return dataclasses.replace(self, **changes)

    @classmethod
    def make(cls, **values) -> "GenerationOptions":
        """Build from flat keyword arguments (temp=..., top_p=..., max_tokens=...)."""
        return cls().replace(**values)
