"""A multi-turn chat kept at the token level.

Re-rendering the history through the chat template rarely reproduces the
tokens the model actually produced (templates drop think blocks, text
re-tokenizes differently), so a `PromptCache` would silently miss. Instead
the session keeps the conversation's token ids (each prompt plus what was
generated) and builds the next prompt by appending only the template's text
for the new user turn. The new prompt then extends the cached tokens and a
turn pre-fills just its own tokens.
"""

from __future__ import annotations

import copy
import json
import threading
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from .api import GenerationResponse, SpeculativeModel, load, resolve_model, stream_generate
from .defaults import CHAT_MAX_TOKENS
from .engine import ContextLengthError, PromptCache, Stats
from .options import GenerationOptions
from .sampling import SamplingParams
from .templates import apply_template

FORMAT = "mlx-mtp-chat"
#: What a chat generates with unless told otherwise: answers may be long
#: (`mlx-mtp chat`'s -n default). Greedy, as the rest of the library; the
#: `chat` command adds the readable sampling of defaults.py.
CHAT_OPTIONS = GenerationOptions(max_tokens=CHAT_MAX_TOKENS)
# Contents the template renders verbatim, used to find where the assistant's
# text ends and the next user turn begins.
_USER_SENTINEL = "MLXMTPUSERSENTINEL"
_ASSISTANT_SENTINEL = "MLXMTPASSISTANTSENTINEL"


class ContextFullError(ContextLengthError):
    """The conversation no longer fits the model's context: /clear it."""


class NoChatTemplateError(ValueError):
    """The model's tokenizer has no chat template, which a chat needs."""


@dataclass
class TurnResult:
    """One finished (or cancelled) assistant turn."""

    text: str
    tokens: List[int]
    from_draft: List[bool]
    stats: Optional[Stats]
    finish_reason: Optional[str]  # "stop", "length", "context" or "cancelled"
    prompt_tokens: int = 0


#: Roles a conversation's messages may have (the system message is kept
#: apart, as `ChatSession.system`).
ROLES = ("user", "assistant", "system", "tool")


@dataclass
class Message:
    role: str
    content: str
    # Per generated token: came from the drafter (assistant turns only; empty
    # for loaded conversations).
    from_draft: List[bool] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)
    #: the chat message's other keys, handed to the template as they are:
    #: an assistant's "tool_calls", a tool result's "tool_call_id" / "name"
    extra: Dict[str, Any] = field(default_factory=dict)

    def as_chat(self) -> Dict[str, Any]:
        return {"role": self.role, "content": self.content, **self.extra}

    @classmethod
    def from_chat(cls, message: Any, where: str = "message") -> "Message":
        """A `Message` from a chat-API message dict: {"role", "content"},
        a "tool" result, or an assistant turn with "tool_calls" (whose
        content may be null). ValueError saying what is wrong otherwise."""
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"{where} is not a {{\"role\", \"content\"}} object with a role in {', '.join(ROLES)}")
        role, content = message["role"], message.get("content")
        extra = {k: v for k, v in message.items() if k not in ("role", "content")}
        calls = extra.get("tool_calls")
        if calls is not None and (role != "assistant" or not isinstance(calls, list)
                                  or not all(isinstance(c, dict) for c in calls)):
            raise ValueError(f"{where}: \"tool_calls\" must be a list of objects on an assistant message")
        if content is None and calls:  # a pure tool call, as chat APIs send it
            content = ""
        if not isinstance(content, str):
            raise ValueError(f"{where} has no text \"content\"")
        return cls(role, content, extra=extra)


def split_thinking(text: str, opens_thinking: bool) -> Tuple[str, str]:
    """(reasoning, answer) of an answer's text; the reasoning ends at </think>.

    opens_thinking: the generation prompt already opened the think block
    (Qwen-style templates end it with "<think>"), so the text starts inside it."""
    start = 0
    if not opens_thinking:
        stripped = text.lstrip()
        if not stripped.startswith("<think>"):
            return "", text
        start = len(text) - len(stripped) + len("<think>")
    end = text.find("</think>", start)
    if end < 0:
        return text[start:].strip("\n"), ""
    return text[start:end].strip("\n"), text[end + len("</think>"):].lstrip("\n")


class _Option:
    """A `ChatSession` attribute (temp, num_draft, ...) that reads and
    replaces one field of the session's `GenerationOptions`, so the options
    stay the one place the settings live."""

    _SAMPLING = {f.name for f in fields(SamplingParams)}

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, session: Any, owner: Optional[type] = None) -> Any:
        if session is None:
            return self
        holder = session.options.sampling if self.name in self._SAMPLING else session.options
        return getattr(holder, self.name)

    def __set__(self, session: Any, value: Any) -> None:
        session.options = session.options.replace(**{self.name: value})


def draft_spans(tokenizer: Any, response: GenerationResponse) -> List[Tuple[str, bool]]:
    """Split one response's text into (text, from_draft) runs.

    A cycle emits its accepted drafts first and the target's own token last,
    so the text splits at most once; the target part is the decoded tail when
    the streamed text ends with it (the detokenizer may hold back partial
    characters, in which case the piece is attributed as a whole)."""
    text = response.text
    if not text:
        return []
    flags = response.from_draft
    n = sum(1 for f in flags if f)
    if n == 0:
        return [(text, False)]
    if n == len(flags):
        return [(text, True)]
    tail = tokenizer.decode(response.tokens[n:])
    if tail and text.endswith(tail) and len(tail) < len(text):
        return [(text[: -len(tail)], True), (tail, False)]
    return [(text, False)]


class ChatSession:
    """A conversation with one model: messages, token ids, the prompt cache
    and the generation options. Not UI-specific: drive it from any thread,
    one `send` at a time; `cancel` may be called from any thread.

    The settings live in `options` (a `GenerationOptions`); `temp`,
    `num_draft`, `max_tokens`, ... read and change single fields of it."""

    num_draft = _Option()
    temp = _Option()
    top_p = _Option()
    top_k = _Option()
    min_p = _Option()
    seed = _Option()
    enable_thinking = _Option()
    max_tokens = _Option()
    max_context = _Option()

    def __init__(
        self,
        model: SpeculativeModel,
        tokenizer: Any,
        options: Optional[GenerationOptions] = None,
        *,
        model_id: Optional[str] = None,
        **overrides: Any,
    ) -> None:
        """options: how to generate (default `CHAT_OPTIONS`); keyword
        `overrides` change single fields of it (max_tokens=..., temp=...)."""
        if not getattr(tokenizer, "chat_template", None):
            raise NoChatTemplateError("this model's tokenizer has no chat template: chat needs one")
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id or (str(model.path) if model.path else None)
        options = options if options is not None else CHAT_OPTIONS
        if overrides:
            options = options.replace(**overrides)
        # Resolved once, so /mtp and the stats bar see the k in use; passed on
        # as it is (an int or "auto"), never computed with.
        if model.drafter is None:
            options = options.replace(num_draft=0)
        elif options.num_draft is None:
            options = options.replace(num_draft=model.default_num_draft)
        #: the settings of every turn; the prompts are token ids built here, so
        #: of its prompt fields only `system` and `enable_thinking` matter
        self.options = options.replace(system=options.system or None)
        #: things to tell the user about the model (warnings while loading it)
        self.load_notes: List[str] = []
        self.messages: List[Message] = []
        # The conversation's token ids (every prompt and every generated
        # token); None when they must be rebuilt from `messages` (after
        # /system or loading a file from another model).
        self.tokens: Optional[List[int]] = []
        self.prompt_cache = PromptCache()
        self.last: Optional[TurnResult] = None
        self._cancel = threading.Event()

    @classmethod
    def open(
        cls,
        model_path: str,
        options: Optional[GenerationOptions] = None,
        *,
        drafter: str = "auto",
        model_id: Optional[str] = None,
        progress: Optional[Callable[[int, str], None]] = None,
    ) -> "ChatSession":
        """Find, load and warm up a model and start a session on it.

        progress(step, text) is called as each of the steps 0..3 begins
        (finding, loading, warming up, ready). Warnings raised meanwhile are
        kept in `load_notes` rather than printed."""
        stage = progress or (lambda step, text: None)
        with warnings.catch_warnings(record=True) as caught:
            # "default": a warning raised again from the same place is kept once.
            warnings.simplefilter("default")
            stage(0, "finding the model (Hugging Face repos download once)")
            path = resolve_model(model_path)
            stage(1, f"loading weights and tokenizer from {path}")
            model, tokenizer = load(path, drafter=drafter)
            session = cls(model, tokenizer, options, model_id=model_id or str(model_path))
            stage(2, "warming up")
            session.warm_up()
            stage(3, "ready")
        session.load_notes = [str(w.message) for w in caught]
        return session

    def warm_up(self) -> None:
        """One tiny generation, so the first message does not wait for the
        kernels to compile. The conversation is untouched."""
        tiny = GenerationOptions(num_draft=self.model.default_num_draft, max_tokens=2)
        for _ in stream_generate(self.model, self.tokenizer, [0, 0], tiny):
            pass

    @property
    def notes(self) -> List[str]:
        """What the user should know about this model, once: the drafter's
        own note (a fallback it took while loading) and warnings while loading.
        Why there is no drafter at all is `model.drafter_note`."""
        drafter = self.model.drafter
        return ([drafter.note] if drafter is not None and drafter.note else []) + list(self.load_notes)

    # -- settings ---------------------------------------------------------

    @property
    def system(self) -> Optional[str]:
        return self.options.system

    @system.setter
    def system(self, value: Optional[str]) -> None:
        value = value or None
        if value != self.options.system and self.messages:
            # The system message opens the prompt: the history is re-encoded
            # (one full pre-fill) on the next turn.
            self.tokens = None
        self.options = self.options.replace(system=value)

    @property
    def supports_thinking(self) -> bool:
        return "enable_thinking" in (getattr(self.tokenizer, "chat_template", None) or "")

    @property
    def context_limit(self) -> int:
        return int(self.max_context or self.model.target.context_length)

    @property
    def context_used(self) -> int:
        if self.tokens is not None:
            # An answer that runs into the limit ends with one token sampled
            # after the last position, never fed back: it takes no context.
            return min(len(self.tokens), self.context_limit)
        return len(self.render(self.messages, generation_prompt=False)) if self.messages else 0

    @property
    def opens_thinking(self) -> bool:
        """Whether the generation prompt opens a think block itself (Qwen-style
        templates end it with "<think>"), with the current settings."""
        try:
            tail = self._apply([{"role": "user", "content": "x"}], generation_prompt=True)
        except Exception:  # a template that cannot render this: no think block
            return False
        return tail.rstrip().endswith("<think>")

    def split_thinking(self, text: str, opens_thinking: Optional[bool] = None) -> Tuple[str, str]:
        """(reasoning, answer) of an answer's text. opens_thinking: as it was
        when the answer was generated (default: `opens_thinking` now)."""
        if opens_thinking is None:
            opens_thinking = self.opens_thinking
        return split_thinking(text, opens_thinking)

    # -- prompts ----------------------------------------------------------

    def _apply(self, chat: List[Dict[str, Any]], generation_prompt: bool) -> str:
        """`chat` through the template with this session's template settings
        (thinking, tools, template arguments), as every front end renders."""
        o = self.options
        return apply_template(self.tokenizer, chat, add_generation_prompt=generation_prompt,
                              enable_thinking=o.enable_thinking, tools=o.tools, template_kwargs=o.chat_template_kwargs)

    def render(self, messages: List[Message], generation_prompt: bool) -> List[int]:
        """Token ids of the system message and `messages` through the chat
        template (plus the generation prompt when asked)."""
        chat = ([{"role": "system", "content": self.system}] if self.system else []) + [
            m.as_chat() for m in messages
        ]
        text = self._apply(chat, generation_prompt)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def turn_suffix(self, text: Union[str, Message]) -> Optional[List[int]]:
        """Tokens that close the previous assistant turn and open a new turn
        (user text, or a `Message` such as a tool result) plus the generation
        prompt: the template's output after an assistant message, found with
        sentinel contents. None when the template does not render the
        sentinel verbatim."""
        new = text if isinstance(text, Message) else Message("user", text)
        chat = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": _USER_SENTINEL},
            {"role": "assistant", "content": _ASSISTANT_SENTINEL},
            new.as_chat(),
        ]
        rendered = self._apply(chat, generation_prompt=True)
        i = rendered.find(_ASSISTANT_SENTINEL)
        if i < 0:
            return None
        return list(self.tokenizer.encode(rendered[i + len(_ASSISTANT_SENTINEL):], add_special_tokens=False))

    def prompt_for(self, text: Union[str, Message]) -> List[int]:
        """The token prompt for a new user message `text` (or a `Message`)."""
        new = text if isinstance(text, Message) else Message("user", text)
        # Only after an assistant turn do the cached tokens end where the
        # template's text after an assistant message begins.
        if self.tokens and self.messages and self.messages[-1].role == "assistant":
            suffix = self.turn_suffix(new)
            if suffix is not None:
                # The generated tokens stay as they were; the EOS that ended
                # the answer was never cached, the template's closing
                # (in the suffix) takes its place.
                return self.tokens + suffix
        return self.render(self.messages + [new], generation_prompt=True)

    # -- generation -------------------------------------------------------

    def cancel(self) -> None:
        """Stop the generation in progress after its current cycle, or, while
        a long prompt pre-fills, after its current chunk."""
        self._cancel.set()

    def stream(self, text: Union[str, Dict[str, Any]]) -> Iterator[GenerationResponse]:
        """Send `text` (a user message, or a chat message dict such as
        {"role": "tool", "content": ...} with a tool's result) and yield the
        answer as it is generated.

        The turn is recorded when the generator ends, is closed or is
        cancelled: the partial answer is kept and the session stays usable.
        Raises ContextFullError (before recording anything) when the prompt
        does not fit."""
        self._cancel.clear()
        message = Message("user", text) if isinstance(text, str) else Message.from_chat(text)
        if message.role not in ("user", "tool"):
            raise ValueError(f"a turn answers a user or tool message, not {message.role!r}")
        prompt = self.prompt_for(message)
        limit = self.context_limit
        if len(prompt) >= limit:
            raise ContextFullError(
                f"the context is full ({len(prompt)} of {limit} tokens with this message): /clear to start over"
            )
        # `cancelled` lets a stop act between prefill chunks too, before the
        # first token; what was pre-filled then stays cached, a prefix of
        # the recorded turn (its message with an empty answer).
        responses = stream_generate(self.model, self.tokenizer, prompt, self.options, prompt_cache=self.prompt_cache,
                                    cancelled=self._cancel.is_set)
        pieces: List[str] = []
        tokens: List[int] = []
        flags: List[bool] = []
        stats: Optional[Stats] = None
        finish: Optional[str] = None
        failed = False
        try:
            while not self._cancel.is_set():
                try:
                    r = next(responses)
                except StopIteration:
                    break
                pieces.append(r.text)
                tokens.extend(r.tokens)
                flags.extend(r.from_draft)
                stats, finish = r.stats, r.finish_reason
                yield r
        except GeneratorExit:
            finish = "cancelled"
            raise
        except BaseException:
            failed = True
            raise
        finally:
            # Closing runs on this thread: the decode loop stops between
            # cycles, where the prompt cache is consistent.
            responses.close()
            if self._cancel.is_set() and finish not in ("stop", "length", "context"):
                finish = "cancelled"
            self._record(message, prompt, "".join(pieces), tokens, flags, stats, finish, failed)

    def send(
        self, text: Union[str, Dict[str, Any]], on_response: Optional[Callable[[GenerationResponse], None]] = None
    ) -> TurnResult:
        """Send `text`, run the turn to its end (or until `cancel`) and return it."""
        for r in self.stream(text):
            if on_response is not None:
                on_response(r)
        assert self.last is not None
        return self.last

    def _record(self, message, prompt, answer, tokens, flags, stats, finish, failed) -> None:
        if stats is None and failed:
            # Nothing came out (an error before or during the pre-fill): the
            # conversation is unchanged, but the cache may be half-written.
            self.prompt_cache.clear()
            return
        self.messages.append(message)
        self.messages.append(Message("assistant", answer, list(flags), list(tokens)))
        self.tokens = list(prompt) + list(tokens)
        cached = self.prompt_cache.tokens
        if failed or cached != self.tokens[: len(cached)]:
            self.prompt_cache.clear()
        self.last = TurnResult(answer, list(tokens), list(flags), copy.copy(stats), finish, len(prompt))

    @property
    def context_full(self) -> bool:
        return bool(self.last and self.last.finish_reason == "context") or self.context_used >= self.context_limit - 1

    def clear(self) -> None:
        """Forget the conversation (settings stay)."""
        self.messages = []
        self.tokens = []
        self.prompt_cache.clear()
        self.last = None

    # -- files ------------------------------------------------------------

    def to_dict(self) -> Dict[str, Any]:
        return {
            "format": FORMAT,
            "version": 1,
            "model": self.model_id,
            "system": self.system,
            "settings": {
                "num_draft": self.num_draft, "temp": self.temp, "top_p": self.top_p, "top_k": self.top_k,
                "min_p": self.min_p, "enable_thinking": self.enable_thinking, "max_tokens": self.max_tokens,
                # They shape the prompt, so the saved tokens were made with them.
                "tools": list(self.options.tools) if self.options.tools else None,
                "chat_template_kwargs": dict(self.options.chat_template_kwargs),
            },
            # Plain {"role", "content"} messages, as chat APIs use them.
            "messages": [m.as_chat() for m in self.messages],
            "from_draft": [m.from_draft if m.role == "assistant" else None for m in self.messages],
            # The exact token ids, so a reload of the same model continues
            # from the very same sequence.
            "tokens": self.tokens,
        }

    def save(self, path: Union[str, Path]) -> Path:
        """Write the conversation as JSON."""
        path = Path(path).expanduser()
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path

    def load(self, path: Union[str, Path]) -> None:
        """Replace the conversation with one saved by `save` (or any JSON
        object with a "messages" list of chat messages, or such a list):
        {"role", "content"}, "tool" results and assistant "tool_calls"."""
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ValueError(f"{path}: not a saved chat (no \"messages\" list)")
        system = data.get("system")
        messages: List[Message] = []
        flags_list = data.get("from_draft") or []
        for i, m in enumerate(data["messages"]):
            message = Message.from_chat(m, f"{path}: message {i}")
            if message.role == "system":
                system = message.content
                continue
            flags = flags_list[i] if i < len(flags_list) and isinstance(flags_list[i], list) else []
            message.from_draft = [bool(f) for f in flags] if message.role == "assistant" else []
            messages.append(message)
        tokens = data.get("tokens")
        vocab = int(getattr(self.model.target, "vocab_size", 0) or 0) or None
        same_model = data.get("model") is not None and data.get("model") == self.model_id
        valid = (
            isinstance(tokens, list)
            and all(isinstance(t, int) and t >= 0 and (vocab is None or t < vocab) for t in tokens)
        )
        settings = data.get("settings") or {}
        template = {k: settings[k] for k in ("tools", "chat_template_kwargs") if k in settings}
        try:  # checked before anything changes
            options = self.options.replace(system=system or None, **template)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None
        self.clear()
        self.options = options
        if "enable_thinking" in settings:
            self.enable_thinking = settings["enable_thinking"]
        self.messages = messages
        # Token ids only mean something to the model that produced them;
        # otherwise the history is re-encoded through the template.
        self.tokens = list(tokens) if (same_model and valid and messages) else (None if messages else [])
