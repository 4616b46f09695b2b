"""The request bodies the server accepts, as pydantic models.

Wrong types and out-of-range values fail here, with the field's name, and
become a 400 (app.py). Fields we do not know are ignored: real clients send
many optional ones. Known fields that would change the output and that we
cannot honour are refused in `unsupported` (never silently dropped).
"""

from __future__ import annotations

from typing import Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from mlx_mtp.defaults import ADDITIVE_PENALTY_RANGE

_LO, _HI = ADDITIVE_PENALTY_RANGE


class _Body(BaseModel):
    # NaN / Inf are valid Python JSON but never a valid setting.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class FunctionCall(_Body):
    name: str
    #: OpenAI sends a JSON string; an object is taken as well
    arguments: Union[str, Dict[str, Any]] = "{}"


class ToolCall(_Body):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Body):
    type: str
    text: Optional[str] = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[ContentPart], None] = None
    name: Optional[str] = None
    tool_calls: Optional[List[ToolCall]] = None
    tool_call_id: Optional[str] = None
    reasoning_content: Optional[str] = None


class FunctionDefinition(_Body):
    name: str
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = None
    strict: Optional[bool] = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: Dict[str, Any]


class StreamOptions(_Body):
    include_usage: bool = False


class ResponseFormat(_Body):
    type: str


class _Sampling(_Body):
    """The fields chat and completions share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    #: extensions (llama.cpp, vLLM): 0 or -1 keep every token
    top_k: Optional[int] = Field(None, ge=-1)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    presence_penalty: Optional[float] = Field(None, ge=_LO, le=_HI)
    frequency_penalty: Optional[float] = Field(None, ge=_LO, le=_HI)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    repetition_context_size: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = None
    stop: Union[str, List[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1)
    logit_bias: Optional[Dict[str, float]] = None
    #: lossless decoding: the draft length never changes the output, and
    #: every row of a batch shares the server's -k, so it is checked only
    num_draft: Union[Literal["auto"], int, None] = None
    user: Optional[str] = None


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[List[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    chat_template_kwargs: Optional[Dict[str, Any]] = None


class CompletionRequest(_Sampling):
    prompt: Union[str, List[int], List[str], List[List[int]]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    best_of: Optional[int] = None
    logprobs: Optional[int] = None


def unsupported(request: _Sampling) -> Optional[tuple]:
    """(param, message) for the first field that asks for something this
    server does not do, else None."""
    if request.n != 1:
        return "n", "n > 1 is not supported: send one request per completion"
    if request.logit_bias:
        return "logit_bias", "logit_bias is not supported"
    if isinstance(request.num_draft, int) and request.num_draft < 0:
        return "num_draft", "num_draft must be auto or an integer >= 0"
    if isinstance(request, ChatCompletionRequest):
        if request.logprobs or request.top_logprobs:
            return "logprobs", "logprobs are not supported"
        if request.response_format is not None and request.response_format.type != "text":
            return "response_format", (f"response_format {request.response_format.type!r} is not supported: "
                                       "the server does not constrain output to a schema")
        choice = request.tool_choice
        if choice == "required" or isinstance(choice, NamedToolChoice):
            return "tool_choice", ("tool_choice 'required' or a named function is not supported: "
                                   "use 'auto' or 'none'")
    if isinstance(request, CompletionRequest):
        if request.echo:
            return "echo", "echo is not supported"
        if request.suffix:
            return "suffix", "suffix is not supported"
        if request.best_of not in (None, 1):
            return "best_of", "best_of > 1 is not supported"
        if request.logprobs:
            return "logprobs", "logprobs are not supported"
    return None
