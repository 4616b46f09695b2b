"""The OpenAI-compatible HTTP front end: routes, errors, auth, streaming.

No model logic here: prompts come from `mlx_mtp.api.build_prompt` (the chat
template, as every front end renders it), tokens from the batched decoder
through the worker thread (worker.py), text from `TextStream` and its
structure from `OutputParser`. See docs/serve.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Dict, List, Optional, Sequence, Tuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from mlx_mtp import defaults
from mlx_mtp.api import SpeculativeModel, build_prompt
from mlx_mtp.engine import ContextLengthError
from mlx_mtp.sampling import SamplingParams

from .formats import Markup, detect
from .parse import CALL, CONTENT, REASONING, Delta, OutputParser, merge_calls
from .schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, unsupported
from .text import TextStream
from .worker import Added, Failed, Job, Worker

#: request bodies above this are refused (413): a long coding-agent prompt
#: is a few MB of JSON
MAX_BODY_BYTES = 16 << 20
#: the decoder's finish reasons in OpenAI's words: a full context is "length"
FINISH_REASONS = {"stop": "stop", "length": "length", "context": "length", "cancelled": "stop"}
OWNER = "mlx-mtp"


@dataclass(frozen=True)
class ServeConfig:
    model_name: str
    host: str = defaults.SERVE_HOST
    port: int = defaults.SERVE_PORT
    max_batch: int = defaults.SERVE_MAX_BATCH
    max_queue: int = defaults.SERVE_MAX_QUEUE
    num_draft: Any = None  # None: the model's default (auto with a drafter)
    api_key: Optional[str] = None
    prompt_cache_gb: float = defaults.SERVE_PROMPT_CACHE_GB
    max_body_bytes: int = MAX_BODY_BYTES


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   kind: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def generation_defaults(path: Optional[Path]) -> SamplingParams:
    """The sampling a request gets for the fields it leaves out: the model's
    generation_config.json (as vLLM serves it), else OpenAI's defaults
    (temperature 1, top_p 1). `do_sample: false` there means greedy."""
    config: Dict[str, Any] = {}
    if path is not None and (Path(path) / "generation_config.json").is_file():
        try:
            config = json.loads((Path(path) / "generation_config.json").read_text())
        except (OSError, ValueError):
            config = {}
    greedy = config.get("do_sample") is False and "temperature" not in config
    return SamplingParams(
        temp=0.0 if greedy else float(config.get("temperature", 1.0)),
        top_p=float(config.get("top_p", 1.0)),
        top_k=max(0, int(config.get("top_k", 0) or 0)),
        min_p=float(config.get("min_p", 0.0) or 0.0),
        repetition_penalty=float(config.get("repetition_penalty", 1.0) or 1.0),
    )


class State:
    """What the routes share: the model, its tokenizer, the worker."""

    def __init__(self, model: SpeculativeModel, tokenizer: Any, config: ServeConfig, generator: Any):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.worker = Worker(generator)
        self.markup: Markup = detect(getattr(tokenizer, "chat_template", None), tokenizer.get_vocab())
        self.defaults = generation_defaults(model.path)
        self.context = int(model.target.context_length)
        self.vocab = int(getattr(model.target, "vocab_size", 0) or 0) or len(tokenizer.get_vocab())
        self.created = int(time.time())
        #: admitted requests not yet finished: the 429 limit counts these
        self.outstanding = 0
        # The names a request's "model" may use for this model.
        path = Path(config.model_name)
        self.model_names = {config.model_name, path.name} | ({str(model.path)} if model.path else set())

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name not in self.model_names:
            raise ApiError(404, f"model {name!r} not found: this server serves {self.config.model_name!r}",
                           param="model", code="model_not_found")

    def sampling(self, body: Any) -> SamplingParams:
        changes = {
            "temp": body.temperature, "top_p": body.top_p, "min_p": body.min_p,
            "top_k": None if body.top_k is None else max(0, body.top_k),
            "repetition_penalty": body.repetition_penalty, "presence_penalty": body.presence_penalty,
            "frequency_penalty": body.frequency_penalty, "repetition_context_size": body.repetition_context_size,
        }
        try:
            return dataclasses.replace(self.defaults, **{k: v for k, v in changes.items() if v is not None})
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    def max_tokens(self, requested: Optional[int], prompt: Sequence[int]) -> int:
        """The request's limit within the context left after the prompt (all
        of it when not given); generation that reaches it ends with "length"."""
        if len(prompt) >= self.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens but the model's context is "
                                f"{self.context} tokens", param="messages", code="context_length_exceeded")
        room = self.context - len(prompt)
        return min(requested, room) if requested is not None else room


# -- one request's row ----------------------------------------------------------


class Row:
    """An admitted request: submits its job, yields (text, finish, stats)
    as its tokens arrive, and always gives its row and its place back."""

    def __init__(self, state: State, job: Job, text: TextStream):
        self.state, self.job, self.text = state, job, text
        self.finished = False  # the decoder ended the row itself
        self.closed = False

    @classmethod
    async def start(cls, state: State, prompt: List[int], params: SamplingParams, max_tokens: int,
                    eos: Sequence[int], seed: Optional[int], stops: Sequence[str],
                    num_draft: Any = None) -> "Row":
        limit = state.config.max_batch + state.config.max_queue
        if state.outstanding >= limit:
            raise ApiError(429, f"the server is busy: {state.outstanding} requests are running or queued "
                                f"(--max-batch {state.config.max_batch}, --max-queue {state.config.max_queue})",
                           code="rate_limit_exceeded", kind="rate_limit_exceeded")
        state.outstanding += 1
        job = Job(prompt, params, max_tokens, eos, seed, asyncio.get_running_loop(), num_draft=num_draft)
        row = cls(state, job, TextStream(state.tokenizer, stops))
        try:
            state.worker.submit(job)
            first = await job.events.get()
        except BaseException:
            row.close()
            raise
        if isinstance(first, Failed):
            row.finished = True
            row.close()
            error = first.error
            if isinstance(error, (ContextLengthError, ValueError)):
                raise ApiError(400, str(error), code="context_length_exceeded"
                               if isinstance(error, ContextLengthError) else None) from None
            raise ApiError(500, f"generation failed: {error}", kind="server_error") from None
        assert isinstance(first, Added)
        return row

    async def pieces(self) -> AsyncIterator[Tuple[str, Optional[str], Any]]:
        try:
            while True:
                item = await self.job.events.get()
                if isinstance(item, Failed):
                    self.finished = True
                    raise ApiError(500, f"generation failed: {item.error}", kind="server_error")
                piece = self.text.feed(item.tokens)
                if self.text.stopped:  # a stop string: the row is cancelled below
                    yield piece, "stop", item.stats
                    return
                if item.finish_reason is not None:
                    self.finished = True
                    piece += self.text.finish()
                    yield piece, FINISH_REASONS.get(item.finish_reason, item.finish_reason), item.stats
                    return
                if piece:
                    yield piece, None, item.stats
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the row (a disconnect, a stop string, an error) unless the
        decoder ended it, and free its place in the queue. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.state.outstanding -= 1
        if not self.finished:
            self.state.worker.cancel(self.job)


def usage(prompt_tokens: int, completion_tokens: int, stats: Any) -> Dict[str, Any]:
    cached = max(0, stats.prompt_tokens - stats.prefilled_tokens) if stats is not None else 0
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


def timings(completion_tokens: int, stats: Any) -> Dict[str, Any]:
    """llama.cpp's per-request figures: pre-filled and predicted tokens with
    their times, drafted and accepted tokens."""
    if stats is None:
        return {}
    prompt_ms, predicted_ms = 1000 * stats.prefill_s, 1000 * stats.decode_s
    return {
        "prompt_n": stats.prefilled_tokens, "prompt_ms": round(prompt_ms, 3),
        "prompt_per_second": round(1000 * stats.prefilled_tokens / prompt_ms, 3) if prompt_ms else 0.0,
        "predicted_n": completion_tokens, "predicted_ms": round(predicted_ms, 3),
        "predicted_per_second": round(1000 * completion_tokens / predicted_ms, 3) if predicted_ms else 0.0,
        "draft_n": stats.draft_tokens, "draft_n_accepted": stats.accepted_tokens,
    }


def sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class RowStream(StreamingResponse):
    """Server-sent events that close their row however the response ends:
    a client that disconnects before the first chunk never starts the body
    generator, whose own cleanup would then never run."""

    def __init__(self, row: "Row", content: AsyncIterator[str]):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self.row = row

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.row.close()


async def whole(request: Request, row: "Row", work: Any) -> Any:
    """A non-streamed answer: `work` unless the client leaves first; the
    row is closed either way."""
    try:
        return await unless_disconnected(request, work)
    finally:
        row.close()


async def until_disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Any) -> Any:
    """Await `work`; if the client disconnects first, cancel it (its row
    is cancelled by `Row.close`) and give up."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        raise HTTPException(499, "client closed the request")
    return task.result()


# -- chat ------------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise ApiError(400, f"{where}: content parts of type {part.type!r} are not supported (text only)",
                           param="messages")
        parts.append(part.text)
    return "".join(parts)


def chat_messages(messages: List[ChatMessage]) -> List[Dict[str, Any]]:
    """The request's messages as the chat template takes them: text content,
    "developer" as "system", tool-call arguments as objects (templates
    iterate over them) and a tool result's function name filled in from the
    call it answers."""
    names: Dict[str, str] = {}
    out = []
    for i, m in enumerate(messages):
        message: Dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                   "content": _text(m.content, f"message {i}")}
        if m.tool_calls:
            calls = []
            for call in m.tool_calls:
                arguments = call.function.arguments
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments) if arguments.strip() else {}
                    except ValueError:
                        raise ApiError(400, f"message {i}: tool call arguments are not JSON",
                                       param="messages") from None
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function.name, "arguments": arguments}})
                if call.id:
                    names[call.id] = call.function.name
            message["tool_calls"] = calls
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        name = m.name or (names.get(m.tool_call_id) if m.role == "tool" and m.tool_call_id else None)
        if name:
            message["name"] = name
        if m.reasoning_content:
            message["reasoning_content"] = m.reasoning_content
        out.append(message)
    return out


def _stops(stop: Any) -> List[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _prompt_error(e: Exception, param: str) -> ApiError:
    return ApiError(400, f"cannot build the prompt: {e}", param=param)


def chat_prompt(state: State, body: ChatCompletionRequest, tools: Optional[List[Dict[str, Any]]]) -> List[int]:
    from jinja2 import TemplateError

    try:
        return build_prompt(state.tokenizer, chat_messages(body.messages), tools=tools,
                            template_kwargs=body.chat_template_kwargs)
    except ApiError:
        raise
    except (ValueError, TypeError, KeyError, TemplateError) as e:
        raise _prompt_error(e, "messages") from None


def opens_reasoning(state: State, prompt: Sequence[int]) -> bool:
    """Whether the generation prompt ends inside a think block (Qwen's
    templates end it with "<think>"), so the answer starts with reasoning."""
    tail = state.tokenizer.decode(list(prompt[-16:]))
    return tail.rstrip().endswith(state.markup.think_open)


def turn_end(state: State) -> Tuple[List[int], List[str]]:
    """Token ids and strings that end a turn with tool calls (Gemma 4's
    <|tool_response>): single tokens stop as EOS does, others as stop strings."""
    vocab = state.tokenizer.get_vocab()
    ids = [vocab[t] for t in state.markup.turn_end if t in vocab]
    return ids, [t for t in state.markup.turn_end if t not in vocab]


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


async def chat_completions(state: State, body: ChatCompletionRequest, request: Request) -> Any:
    state.check_model(body.model)
    refused = unsupported(body)
    if refused:
        raise ApiError(400, refused[1], param=refused[0])
    use_tools = bool(body.tools) and body.tool_choice != "none"
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if use_tools else None
    prompt = chat_prompt(state, body, tools)
    params = state.sampling(body)
    max_tokens = state.max_tokens(body.max_completion_tokens or body.max_tokens, prompt)
    eos, stops = set(state.tokenizer.eos_token_ids), _stops(body.stop)
    if tools:
        end_ids, end_stops = turn_end(state)
        eos |= set(end_ids)
        stops += end_stops
    parser = OutputParser(state.markup, in_reasoning=opens_reasoning(state, prompt), tools=tools)
    row = await Row.start(state, prompt, params, max_tokens, sorted(eos), body.seed, stops, body.num_draft)
    meta = {"id": completion_id("chatcmpl"), "created": int(time.time()), "model": state.config.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return RowStream(row, _chat_stream(row, parser, meta, len(prompt), include_usage))
    return await whole(request, row, _chat_whole(row, parser, meta, len(prompt)))


def _delta(d: Delta) -> Dict[str, Any]:
    if d.kind == CALL:
        return {"tool_calls": [d.call]}
    return {"reasoning_content" if d.kind == REASONING else "content": d.text}


def _chat_finish(finish: Optional[str], calls: int) -> Optional[str]:
    return "tool_calls" if calls and finish == "stop" else finish


async def _chat_stream(row: Row, parser: OutputParser, meta: Dict[str, Any], prompt_tokens: int,
                       include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: Dict[str, Any], finish: Optional[str] = None, **extra: Any) -> str:
        return sse({**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for piece, finish, stats in row.pieces():
            deltas = parser.feed(piece) + (parser.finish() if finish else [])
            for d in deltas:
                yield chunk(_delta(d))
            if finish:
                n = len(row.text.tokens)
                yield chunk({}, _chat_finish(finish, parser.calls), timings=timings(n, stats))
                if include_usage:
                    yield sse({**meta, "object": "chat.completion.chunk", "choices": [],
                               "usage": usage(prompt_tokens, n, stats), "timings": timings(n, stats)})
    except ApiError as e:  # the status line has gone out: report in the stream
        yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
    yield SSE_DONE


async def _chat_whole(row: Row, parser: OutputParser, meta: Dict[str, Any], prompt_tokens: int) -> Dict[str, Any]:
    deltas: List[Delta] = []
    finish, stats = None, None
    async for piece, finish, stats in row.pieces():
        deltas += parser.feed(piece) + (parser.finish() if finish else [])
    reasoning = "".join(d.text for d in deltas if d.kind == REASONING)
    content = "".join(d.text for d in deltas if d.kind == CONTENT)
    calls = merge_calls(deltas)  # the streamed pieces, joined: the same arguments either way
    message: Dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
    n = len(row.text.tokens)
    return {**meta, "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": _chat_finish(finish, len(calls))}],
            "usage": usage(prompt_tokens, n, stats), "timings": timings(n, stats)}


# -- completions -------------------------------------------------------------------


def completion_prompt(state: State, body: CompletionRequest) -> List[int]:
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        if len(prompt) != 1:
            raise ApiError(400, "a list of prompts is not supported: send one request per prompt", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        try:
            return build_prompt(state.tokenizer, prompt, chat_template=False)
        except ValueError as e:
            raise _prompt_error(e, "prompt") from None
    if not prompt:
        raise ApiError(400, "the prompt is empty", param="prompt")
    bad = next((t for t in prompt if not 0 <= t < state.vocab), None)
    if bad is not None:
        raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{state.vocab - 1})", param="prompt")
    return list(prompt)


async def completions(state: State, body: CompletionRequest, request: Request) -> Any:
    state.check_model(body.model)
    refused = unsupported(body)
    if refused:
        raise ApiError(400, refused[1], param=refused[0])
    prompt = completion_prompt(state, body)
    params = state.sampling(body)
    try:
        max_tokens = state.max_tokens(body.max_tokens, prompt)
    except ApiError as e:
        e.param = "prompt"
        raise
    row = await Row.start(state, prompt, params, max_tokens, sorted(state.tokenizer.eos_token_ids), body.seed,
                          _stops(body.stop), body.num_draft)
    meta = {"id": completion_id("cmpl"), "created": int(time.time()), "model": state.config.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return RowStream(row, _completion_stream(row, meta, len(prompt), include_usage))
    return await whole(request, row, _completion_whole(row, meta, len(prompt)))


def _completion_choice(text: str, finish: Optional[str]) -> Dict[str, Any]:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


async def _completion_stream(row: Row, meta: Dict[str, Any], prompt_tokens: int,
                             include_usage: bool) -> AsyncIterator[str]:
    try:
        async for piece, finish, stats in row.pieces():
            extra = {"timings": timings(len(row.text.tokens), stats)} if finish else {}
            yield sse({**meta, "object": "text_completion", "choices": [_completion_choice(piece, finish)], **extra})
            if finish and include_usage:
                yield sse({**meta, "object": "text_completion", "choices": [],
                           "usage": usage(prompt_tokens, len(row.text.tokens), stats)})
    except ApiError as e:
        yield sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.code}})
    yield SSE_DONE


async def _completion_whole(row: Row, meta: Dict[str, Any], prompt_tokens: int) -> Dict[str, Any]:
    text, finish, stats = "", None, None
    async for piece, finish, stats in row.pieces():
        text += piece
    n = len(row.text.tokens)
    return {**meta, "object": "text_completion", "choices": [_completion_choice(text, finish)],
            "usage": usage(prompt_tokens, n, stats), "timings": timings(n, stats)}


# -- models and health ---------------------------------------------------------------


def model_card(state: State) -> Dict[str, Any]:
    return {"id": state.config.model_name, "object": "model", "created": state.created, "owned_by": OWNER}


def gb(n_bytes: float) -> float:
    return round(n_bytes / 1e9, 6)


def health(state: State) -> Dict[str, Any]:
    import mlx.core as mx

    model = state.model
    drafted, accepted = state.worker.acceptance()
    num_draft = state.config.num_draft if state.config.num_draft is not None else model.default_num_draft
    return {
        "status": "ok",
        "model": state.config.model_name,
        "drafter": model.drafter.name if model.drafter is not None else None,
        "drafter_note": model.drafter_note if model.drafter is None else model.drafter.note,
        "num_draft": num_draft if model.drafter is not None else 0,
        "max_batch": state.config.max_batch,
        "acceptance": {"drafted": drafted, "accepted": accepted,
                       "rate": round(accepted / drafted, 4) if drafted else 0.0},
        "requests": {"active": state.worker.active, "queued": state.worker.queued,
                     "served": state.worker.totals.requests, "cancelled": state.worker.totals.cancelled},
        "memory": {"active_gb": gb(mx.get_active_memory()), "peak_gb": gb(mx.get_peak_memory()),
                   "mlx_cache_gb": gb(mx.get_cache_memory()),
                   "batch_cache_gb": gb(state.worker.cache_bytes),
                   "prompt_cache_gb": gb(state.worker.prompt_cache_bytes)},
    }


# -- the guards: body size and API key ------------------------------------------------


class BodyLimit:
    """ASGI middleware: 413 for a body over `max_bytes`, announced or streamed."""

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        too_large = f"the request body is larger than {self.max_bytes} bytes"
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            response = error_response(413, too_large, code="request_too_large")
            return await response(scope, receive, send)
        seen = 0

        async def limited() -> Dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI passes an HTTPException raised while reading the body on.
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, limited, send)


class BearerAuth:
    """ASGI middleware: with an API key, /v1/ routes need `Authorization:
    Bearer KEY` (401 otherwise). /health stays open for monitors."""

    def __init__(self, app: Any, api_key: str):
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: Dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path", "").startswith("/v1/"):
            header = dict(scope.get("headers") or []).get(b"authorization", b"")
            scheme, _, key = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(key.strip(), self.api_key):
                response = error_response(401, "invalid or missing API key: send Authorization: Bearer KEY",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# -- the app ------------------------------------------------------------------------


def _validation_message(exc: RequestValidationError) -> Tuple[str, Optional[str]]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if not loc:  # no body, a JSON list, or not JSON at all (another content type)
        return "the request body must be a JSON object (Content-Type: application/json)", None
    return f"{param or 'body'}: {first.get('msg')}", param


def build_app(model: SpeculativeModel, tokenizer: Any, config: ServeConfig, generator: Any) -> FastAPI:
    """The FastAPI app serving `model` through `generator` (a BatchGenerator;
    the worker thread starts and stops with the app)."""
    state = State(model, tokenizer, config, generator)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        try:
            yield
        finally:
            state.worker.stop()

    app = FastAPI(title="mlx-mtp", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.post("/v1/chat/completions")
    async def _chat(body: ChatCompletionRequest, request: Request) -> Any:
        return await chat_completions(state, body, request)

    @app.post("/v1/completions")
    async def _completions(body: CompletionRequest, request: Request) -> Any:
        return await completions(state, body, request)

    @app.get("/v1/models")
    async def _models() -> Dict[str, Any]:
        return {"object": "list", "data": [model_card(state)]}

    @app.get("/v1/models/{name:path}")
    async def _model(name: str) -> Dict[str, Any]:
        state.check_model(name)
        return model_card(state)

    @app.get("/health")
    async def _health() -> Dict[str, Any]:
        return health(state)

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    if config.api_key:  # added last: it runs first, before the body is read
        app.add_middleware(BearerAuth, api_key=config.api_key)
    return app
