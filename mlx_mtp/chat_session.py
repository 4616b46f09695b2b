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
from .engine import ContextLengthError, PromptCache, Stats
from .options import GenerationOptions
from .sampling import SamplingParams

FORMAT = "mlx-mtp-chat"
#: What a chat generates with unless told otherwise (as `mlx-mtp chat`):
#: answers may be long.
CHAT_OPTIONS = GenerationOptions(max_tokens=2048)
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


@dataclass
class Message:
    role: str
    content: str
    # Per generated token: came from the drafter (assistant turns only; empty
    # for loaded conversations).
    from_draft: List[bool] = field(default_factory=list)
    tokens: List[int] = field(default_factory=list)

    def as_chat(self) -> Dict[str, str]:
        return {"role": self.role, "content": self.content}


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
            return len(self.tokens)
        return len(self.render(self.messages, generation_prompt=False)) if self.messages else 0

    @property
    def opens_thinking(self) -> bool:
        """Whether the generation prompt opens a think block itself (Qwen-style
        templates end it with "<think>"), with the current settings."""
        try:
            tail = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False,
                **self._template_extra(),
            )
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

    def _template_extra(self) -> Dict[str, Any]:
        return {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}

    def render(self, messages: List[Message], generation_prompt: bool) -> List[int]:
        """Token ids of the system message and `messages` through the chat
        template (plus the generation prompt when asked)."""
        chat = ([{"role": "system", "content": self.system}] if self.system else []) + [
            m.as_chat() for m in messages
        ]
        text = self.tokenizer.apply_chat_template(
            chat, add_generation_prompt=generation_prompt, tokenize=False, **self._template_extra()
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def turn_suffix(self, text: str) -> Optional[List[int]]:
        """Tokens that close the previous assistant turn and open a new user
        turn with `text` plus the generation prompt: the template's output
        after an assistant message, found with sentinel contents. None when
        the template does not render the sentinel verbatim."""
        chat = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": _USER_SENTINEL},
            {"role": "assistant", "content": _ASSISTANT_SENTINEL},
            {"role": "user", "content": text},
        ]
        rendered = self.tokenizer.apply_chat_template(
            chat, add_generation_prompt=True, tokenize=False, **self._template_extra()
        )
        i = rendered.find(_ASSISTANT_SENTINEL)
        if i < 0:
            return None
        return list(self.tokenizer.encode(rendered[i + len(_ASSISTANT_SENTINEL):], add_special_tokens=False))

    def prompt_for(self, text: str) -> List[int]:
        """The token prompt for a new user message `text`."""
        if self.tokens and self.messages:
            suffix = self.turn_suffix(text)
            if suffix is not None:
                # The generated tokens stay as they were; the EOS that ended
                # the answer was never cached, the template's closing
                # (in the suffix) takes its place.
                return self.tokens + suffix
        return self.render(self.messages + [Message("user", text)], generation_prompt=True)

    # -- generation -------------------------------------------------------

    def cancel(self) -> None:
        """Stop the generation in progress after its current cycle."""
        self._cancel.set()

    def stream(self, text: str) -> Iterator[GenerationResponse]:
        """Send `text` and yield the answer as it is generated.

        The turn is recorded when the generator ends, is closed or is
        cancelled: the partial answer is kept and the session stays usable.
        Raises ContextFullError (before recording anything) when the prompt
        does not fit."""
        self._cancel.clear()
        prompt = self.prompt_for(text)
        limit = self.context_limit
        if len(prompt) >= limit:
            raise ContextFullError(
                f"the context is full ({len(prompt)} of {limit} tokens with this message): /clear to start over"
            )
        responses = stream_generate(self.model, self.tokenizer, prompt, self.options, prompt_cache=self.prompt_cache)
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
            self._record(text, prompt, "".join(pieces), tokens, flags, stats, finish, failed)

    def send(
        self, text: str, on_response: Optional[Callable[[GenerationResponse], None]] = None
    ) -> TurnResult:
        """Send `text`, run the turn to its end (or until `cancel`) and return it."""
        for r in self.stream(text):
            if on_response is not None:
                on_response(r)
        assert self.last is not None
        return self.last

    def _record(self, text, prompt, answer, tokens, flags, stats, finish, failed) -> None:
        if stats is None and failed:
            # Nothing came out (an error before or during the pre-fill): the
            # conversation is unchanged, but the cache may be half-written.
            self.prompt_cache.clear()
            return
        self.messages.append(Message("user", text))
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
        object with a "messages" list of {"role", "content"}, or such a list)."""
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
        if isinstance(data, list):
            data = {"messages": data}
        if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
            raise ValueError(f"{path}: not a saved chat (no \"messages\" list)")
        system = data.get("system")
        messages: List[Message] = []
        flags_list = data.get("from_draft") or []
        for i, m in enumerate(data["messages"]):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in (
                "user", "assistant", "system"
            ):
                raise ValueError(f"{path}: message {i} is not a {{\"role\", \"content\"}} object")
            if m["role"] == "system":
                system = m["content"]
                continue
            flags = flags_list[i] if i < len(flags_list) and isinstance(flags_list[i], list) else []
            messages.append(Message(m["role"], m["content"], [bool(f) for f in flags]))
        tokens = data.get("tokens")
        vocab = int(getattr(self.model.target, "vocab_size", 0) or 0) or None
        same_model = data.get("model") is not None and data.get("model") == self.model_id
        valid = (
            isinstance(tokens, list)
            and all(isinstance(t, int) and t >= 0 and (vocab is None or t < vocab) for t in tokens)
        )
        self.clear()
        self.options = self.options.replace(system=system or None)
        settings = data.get("settings") or {}
        if "enable_thinking" in settings:
            self.enable_thinking = settings["enable_thinking"]
        self.messages = messages
        # Token ids only mean something to the model that produced them;
        # otherwise the history is re-encoded through the template.
        self.tokens = list(tokens) if (same_model and valid and messages) else (None if messages else [])
