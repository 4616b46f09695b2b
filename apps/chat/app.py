"""`mlx-mtp chat`: a Textual chat on top of mlx_mtp that shows its drafting.

The conversation itself lives in `mlx_mtp.chat_session.ChatSession` (token
level, prompt cache reused across turns, chat template, thinking, warm-up);
this module only renders it. The model runs on worker threads; the UI
thread never waits for it. Installed as `mlx_mtp.apps.chat`.
"""

from __future__ import annotations

import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, List, Optional, Tuple

from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.actions import SkipAction
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, LoadingIndicator, Markdown, ProgressBar, Static, TextArea
from textual.worker import Worker, WorkerState, get_current_worker

from mlx_mtp.chat_session import (
    CHAT_OPTIONS,
    ChatSession,
    ContextFullError,
    NoChatTemplateError,
    draft_spans,
    split_thinking,
)
from mlx_mtp.options import GenerationOptions
from mlx_mtp.report import cli_words, format_acceptance, format_memory

# Theme variables, so the tint follows light and dark themes; the alpha keeps
# the text's own colour readable on top of it.
DRAFT_STYLE = "on $success 30%"
TARGET_STYLE = ""
UPDATE_INTERVAL_S = 0.05  # UI refresh while streaming (the model never waits for it)

HELP = """\
**Commands**

- `/draft auto|N`: adaptive draft length, or N tokens per cycle (0: plain decoding)
- `/mtp on|off`: drafting on or off (F3)
- `/temp T`: sampling temperature (0: greedy)
- `/system TEXT`: system message (`/system` shows it, `/system off` removes it)
- `/think on|off`: the chat template's thinking mode
- `/clear`: start a new conversation
- `/save FILE`, `/load FILE`: the conversation as JSON
- `/stats`: every figure of the last answer

**Keys**: Enter sends; Shift+Enter, Ctrl+J or a trailing `\\` starts a new line;
Up/Down recall earlier messages; Esc or Ctrl+C stops an answer; F2 switches between
the draft view (drafted tokens tinted) and Markdown; Ctrl+P opens the command palette.
"""


def format_stats_bar(session: ChatSession, stats: Any = None, legend: bool = False) -> Content:
    """The one-line live stats: drafter, speed, acceptance, tokens per pass,
    pre-fill, context and memory."""
    import mlx.core as mx

    parts: List[Tuple[str, str]] = []
    k = session.num_draft
    drafter = session.model.drafter
    if drafter is None:
        parts.append(("no drafter", "$warning"))
    elif k == 0:
        parts.append(("mtp off", "$warning"))
    elif k == "auto":
        # The adaptive policy: the draft length of the newest cycle, and
        # why it decodes plainly when it does.
        now = f" (now {stats.last_k})" if stats is not None and stats.target_passes else ""
        parts.append((f"{drafter.name} k=auto{now}", "bold $success"))
        if stats is not None and stats.parked_reason:
            parts.append((stats.parked_reason, "$warning"))
    else:
        parts.append((f"{drafter.name} k={k}", "bold $success"))
    if session.temp:
        parts[-1] = (f"{parts[-1][0]} t={session.temp:g}", parts[-1][1])
    if stats is not None:
        parts.append((f"{stats.decode_tokens_per_s:.1f} tok/s", "bold"))
        if stats.draft_tokens:
            parts.append((format_acceptance(stats, "accept"), ""))
        parts.append((f"{stats.tokens_per_pass:.1f} tok/pass", ""))
        parts.append((f"prefill {stats.prefilled_tokens} tok {1000 * stats.prefill_s:.0f} ms", ""))
    ctx_used, ctx_limit = session.context_used, session.context_limit
    if stats is not None:  # live while an answer streams (its newest token is not in the context yet)
        ctx_used = max(ctx_used, min(stats.prompt_tokens + stats.generated_tokens, ctx_limit))
    parts.append((f"ctx {ctx_used}/{ctx_limit}", "$error" if ctx_used >= 0.95 * ctx_limit else ""))
    parts.append((f"mem {format_memory(mx.get_active_memory())}", ""))
    if legend and drafter is not None:
        parts.append(("drafted", DRAFT_STYLE))
    out = Content()
    for i, (text, style) in enumerate(parts):
        if i:
            out = out + Content.styled(" │ ", "dim")
        out = out + Content.styled(text, style)
    return out


class ChatInput(TextArea):
    """Multi-line input: Enter sends, Shift+Enter / Ctrl+J / a trailing
    backslash give a new line, Up/Down at the edges recall history."""

    BINDINGS = [
        Binding("enter", "submit", "Send", key_display="⏎"),
        Binding("shift+enter", "newline", "New line", key_display="⇧⏎"),
    ]

    class Submitted(Message):
        def __init__(self, text: str) -> None:
            super().__init__()
            self.text = text

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(soft_wrap=True, show_line_numbers=False, compact=True, **kwargs)
        self.sent: List[str] = []
        self._index: Optional[int] = None  # position while recalling
        self._draft = ""  # what was typed before recalling

    async def _on_key(self, event) -> None:
        # Terminals without the kitty keyboard protocol send Enter for
        # Shift+Enter too: Ctrl+J and a trailing backslash always work.
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.endswith("\\") and self.cursor_at_last_line:
                self.action_newline(strip_backslash=True)
            else:
                self.action_submit()
            return
        if event.key in ("shift+enter", "ctrl+j", "alt+enter"):
            event.stop()
            event.prevent_default()
            self.action_newline()
            return
        await super()._on_key(event)

    def action_newline(self, strip_backslash: bool = False) -> None:
        if strip_backslash:
            self.load_text(self.text[:-1])
            self.move_cursor(self.document.end)
        self.insert("\n")

    def action_submit(self) -> None:
        text = self.text.strip()
        if not text:
            return
        if not self.sent or self.sent[-1] != text:
            self.sent.append(text)
        self._index = None
        self.clear()
        self.post_message(self.Submitted(text))

    def _recall(self, index: Optional[int]) -> None:
        self._index = index
        self.load_text(self._draft if index is None else self.sent[index])
        self.move_cursor(self.document.end)

    def action_cursor_up(self, select: bool = False) -> None:
        if not select and self.cursor_at_first_line and self.sent and self._index != 0:
            if self._index is None:
                self._draft = self.text
                self._recall(len(self.sent) - 1)
            else:
                self._recall(self._index - 1)
            return
        super().action_cursor_up(select)

    def action_cursor_down(self, select: bool = False) -> None:
        if not select and self.cursor_at_last_line and self._index is not None:
            nxt = self._index + 1
            self._recall(nxt if nxt < len(self.sent) else None)
            return
        super().action_cursor_down(select)


class UserMessage(Static):
    DEFAULT_CSS = """
    UserMessage {
        background: $boost;
        border-left: thick $primary;
        padding: 0 1;
        margin: 1 0 0 0;
    }
    """

    def __init__(self, text: str) -> None:
        super().__init__(Content(text), markup=False)


class Notice(Static):
    """A line from the app itself (command results, errors)."""

    DEFAULT_CSS = """
    Notice { color: $text-muted; padding: 0 1; margin: 1 0 0 0; }
    Notice.-error { color: $text-error; background: $error-muted; }
    Notice.-help { color: $text; }
    """


class HelpNotice(Markdown):
    DEFAULT_CSS = """
    HelpNotice { margin: 1 0 0 0; padding: 0 1; background: $boost; }
    """


class AssistantMessage(Vertical):
    """One answer, in two views kept in step: the draft view (every token,
    drafted ones tinted) and Markdown (reasoning dimmed above it)."""

    DEFAULT_CSS = """
    AssistantMessage { height: auto; margin: 1 0 0 0; padding: 0 1; border-left: thick $success 40%; }
    AssistantMessage .thinking { color: $text-muted; text-style: italic; display: none; }
    AssistantMessage .thinking.-shown { display: block; }
    AssistantMessage .answer { margin: 0; padding: 0; background: transparent; }
    AssistantMessage .answer > MarkdownBlock:last-child { margin-bottom: 0; }
    AssistantMessage .tokens { display: none; }
    AssistantMessage .meta { color: $text-muted; text-style: italic; }
    """

    def __init__(self, opens_thinking: bool = False) -> None:
        super().__init__()
        self.opens_thinking = opens_thinking
        self.answer_text = ""
        self.spans: List[Tuple[str, bool]] = []
        self._answer_shown = ""

    def compose(self) -> ComposeResult:
        yield Static(classes="thinking", markup=False)
        yield Markdown(classes="answer")
        yield Static(classes="tokens", markup=False)
        yield Static(classes="meta", markup=False)

    def add(self, spans: List[Tuple[str, bool]]) -> None:
        """Append streamed text, as (text, from_draft) runs."""
        for piece, drafted in spans:
            if self.spans and self.spans[-1][1] == drafted:
                self.spans[-1] = (self.spans[-1][0] + piece, drafted)
            else:
                self.spans.append((piece, drafted))
            self.answer_text += piece
        self._refresh_views()

    def set_text(self, text: str) -> None:
        """Whole text without draft information (loaded conversations)."""
        self.answer_text = text
        self.spans = [(text, False)]
        self._refresh_views()

    def on_mount(self) -> None:
        if self.answer_text:
            # After the children (the Markdown widget) are mounted too.
            self.call_after_refresh(self._refresh_views)

    def _refresh_views(self) -> None:
        if not self.is_mounted:
            return  # on_mount renders what arrived before it
        self.query_one(".tokens", Static).update(
            Content.assemble(*((t, DRAFT_STYLE if d else TARGET_STYLE) for t, d in self.spans))
        )
        thinking, answer = split_thinking(self.answer_text, self.opens_thinking)
        box = self.query_one(".thinking", Static)
        box.update(Content.styled("thinking: ", "bold") + Content(thinking) if thinking else "")
        box.set_class(bool(thinking), "-shown")
        markdown = self.query_one(".answer", Markdown)
        if answer.startswith(self._answer_shown) and self._answer_shown:
            delta = answer[len(self._answer_shown):]
            if delta:
                markdown.append(delta)
        elif answer != self._answer_shown:
            markdown.update(answer)
        self._answer_shown = answer

    def set_meta(self, text: str) -> None:
        self.query_one(".meta", Static).update(text)


class LoadingScreen(Screen):
    """Shown while the model loads; load errors stay on it."""

    DEFAULT_CSS = """
    LoadingScreen { align: center middle; }
    LoadingScreen #box { width: 80%; max-width: 90; height: auto; border: round $primary; padding: 1 2; }
    LoadingScreen #title { text-style: bold; }
    LoadingScreen ProgressBar { margin: 1 0; }
    LoadingScreen #error { color: $text-error; display: none; }
    LoadingScreen.-failed #error { display: block; }
    LoadingScreen.-failed LoadingIndicator { display: none; }
    LoadingScreen LoadingIndicator { height: 1; }
    """
    BINDINGS = [Binding("ctrl+q", "app.quit", "Quit")]

    def __init__(self, model_path: str) -> None:
        super().__init__()
        self.model_path = model_path

    def compose(self) -> ComposeResult:
        with Vertical(id="box"):
            yield Static(Content(f"Loading {self.model_path}"), id="title", markup=False)
            yield ProgressBar(total=3, show_eta=False, id="progress")
            yield Static("starting", id="stage", markup=False)
            yield LoadingIndicator()
            yield Static(id="error", markup=False)
        yield Footer()

    def stage(self, step: int, text: str) -> None:
        self.query_one(ProgressBar).update(progress=step)
        self.query_one("#stage", Static).update(text)

    def fail(self, message: str) -> None:
        self.add_class("-failed")
        self.query_one("#stage", Static).update("")
        self.query_one("#error", Static).update(
            Content(f"Could not load the model:\n\n{message}\n\nPress Ctrl+Q to quit and pass another -m MODEL.")
        )


class ChatScreen(Screen):
    """The conversation, the live stats bar and the input."""

    DEFAULT_CSS = """
    ChatScreen #conversation { height: 1fr; padding: 0 1; scrollbar-size-vertical: 1; }
    ChatScreen #welcome { color: $text-muted; padding: 0 1; }
    ChatScreen #statsbar { height: auto; max-height: 2; padding: 0 1; background: $panel; }
    ChatScreen ChatInput { height: auto; min-height: 3; max-height: 10; border: tall $primary 50%; padding: 0 1; }
    ChatScreen ChatInput:focus { border: tall $primary; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop", key_display="esc"),
        Binding("ctrl+c", "stop", "Stop", show=False, priority=True),
        Binding("f2", "toggle_drafts", "Draft view / Markdown"),
        Binding("f3", "toggle_mtp", "MTP on/off"),
        Binding("ctrl+l", "clear", "Clear"),
    ]

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="conversation"):
            yield Static(id="welcome", markup=False)
        yield Static(id="statsbar", markup=False)
        yield ChatInput(id="input", placeholder="Message (Enter sends, Shift+Enter new line, /help)")
        yield Footer()

    def check_action(self, action: str, parameters: tuple) -> Optional[bool]:
        if action == "stop":
            return self.app.generating  # falls through to copy / quit otherwise
        return True

    def action_stop(self) -> None:
        if not self.app.generating:
            raise SkipAction()
        self.app.cancel_generation()

    def action_toggle_drafts(self) -> None:
        self.app.show_drafts = not self.app.show_drafts

    def action_toggle_mtp(self) -> None:
        self.app.run_command("/mtp off" if self.app.session.num_draft else "/mtp on")

    def action_clear(self) -> None:
        self.app.run_command("/clear")


class _Streamed(Message):
    def __init__(self, widget: AssistantMessage, spans: List[Tuple[str, bool]], stats: Any) -> None:
        super().__init__()
        self.widget, self.spans, self.stats = widget, spans, stats


class ChatApp(App):
    """`mlx-mtp chat`."""

    TITLE = "mlx-mtp chat"
    # Not scoped to one widget: the view switch is a class on the screen.
    CSS = """
    Screen { background: $surface; }
    ChatScreen.-drafts AssistantMessage .tokens { display: block; }
    ChatScreen.-drafts AssistantMessage .answer { display: none; }
    ChatScreen.-drafts AssistantMessage .thinking { display: none; }
    """

    def __init__(
        self,
        model_path: Optional[str] = None,
        options: Optional[GenerationOptions] = None,
        *,
        drafter: str = "auto",
        show_drafts: bool = True,
        loaded: Optional[Tuple[Any, Any]] = None,
    ) -> None:
        """options: how every answer is generated (default: the chat's,
        `CHAT_OPTIONS`); the session owns them once the model is loaded.
        loaded: an already loaded (model, tokenizer), to skip loading (tests)."""
        super().__init__()
        if model_path is None:
            from mlx_mtp.defaults import default_chat_model

            model_path = default_chat_model()
        self.model_path = str(model_path)
        self.drafter_choice = drafter
        self.options = options if options is not None else CHAT_OPTIONS
        self._show_drafts = show_drafts
        self._loaded = loaded
        self.session: Optional[ChatSession] = None
        self.generating = False
        self._stop_requested = False
        self.load_error: Optional[str] = None
        self._saved_k = 0  # /mtp on restores this
        # MLX streams belong to the thread that made them and the prompt
        # cache holds lazy arrays: every model call runs on this one thread,
        # driven from the Textual workers.
        self.mlx_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx-mtp")
        self.chat_screen = ChatScreen()

    # -- start up ---------------------------------------------------------

    async def on_mount(self) -> None:
        await self.push_screen(self.chat_screen)
        self.chat_screen.set_class(self._show_drafts, "-drafts")
        self.sub_title = Path(self.model_path).name or self.model_path
        if self._loaded is not None:
            try:
                session = ChatSession(*self._loaded, self.options, model_id=self.model_path)
            except NoChatTemplateError as e:
                self._load_failed(str(e))
                return
            self._session_ready(session)
        else:
            await self.push_screen(LoadingScreen(self.model_path))
            self._load_model()

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_model(self) -> None:
        def stage(step: int, text: str) -> None:
            self.call_from_thread(self._loading_stage, step, text)

        def open_session() -> ChatSession:
            return ChatSession.open(self.model_path, self.options, drafter=self.drafter_choice, progress=stage)

        try:
            session = self.mlx_thread.submit(open_session).result()
        except NoChatTemplateError as e:  # a model that loads, but cannot chat
            self.call_from_thread(self._load_failed, str(e))
            return
        except Exception as e:  # every load error is shown in the app
            self.call_from_thread(self._load_failed, f"{type(e).__name__}: {e}")
            return
        self.call_from_thread(self._session_ready, session)

    def _loading_stage(self, step: int, text: str) -> None:
        if isinstance(self.screen, LoadingScreen):
            self.screen.stage(step, text)

    def _load_failed(self, message: str) -> None:
        self.load_error = message
        if isinstance(self.screen, LoadingScreen):
            self.screen.fail(message)

    def _drafter_note(self) -> str:
        """Why this model drafts nothing, in the words of the command line."""
        return cli_words(self.session.model.drafter_note or "no drafter")

    def _session_ready(self, session: ChatSession) -> None:
        self.session = session
        model = session.model
        if isinstance(self.screen, LoadingScreen):
            self.pop_screen()
        self._saved_k = session.num_draft or model.default_num_draft
        welcome = [f"Model: {self.model_path}"]
        if model.drafter is None:
            welcome.append(f"Drafting off: {self._drafter_note()}")
        else:
            welcome.append(f"Drafting with the {model.drafter.name} head, k={session.num_draft}. "
                           "Tinted text was drafted and accepted; plain text the target produced itself (F2 toggles).")
        welcome.extend(f"note: {cli_words(n)}" for n in session.notes)
        welcome.append("Type a message, or /help for commands.")
        self.chat_screen.query_one("#welcome", Static).update("\n".join(welcome))
        self.update_stats()
        self.chat_screen.query_one(ChatInput).focus()

    def on_unmount(self) -> None:
        if self.session is not None:
            self.session.cancel()
        self.mlx_thread.shutdown(wait=False, cancel_futures=True)

    # -- view -------------------------------------------------------------

    @property
    def show_drafts(self) -> bool:
        return self._show_drafts

    @show_drafts.setter
    def show_drafts(self, value: bool) -> None:
        self._show_drafts = value
        self.chat_screen.set_class(value, "-drafts")
        self.update_stats()
        self.notify("Draft view: drafted tokens tinted" if value else "Markdown view", timeout=2)

    @property
    def conversation(self) -> VerticalScroll:
        return self.chat_screen.query_one("#conversation", VerticalScroll)

    def _mount(self, widget) -> None:
        self.conversation.mount(widget)
        self.conversation.scroll_end(animate=False)

    def note(self, text: str, error: bool = False) -> None:
        self._mount(Notice(Content(text), classes="-error" if error else ""))

    def update_stats(self, stats: Any = None) -> None:
        if self.session is None:
            return
        if stats is None and self.session.last is not None:
            stats = self.session.last.stats
        self.chat_screen.query_one("#statsbar", Static).update(
            format_stats_bar(self.session, stats, legend=self._show_drafts)
        )

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if self.session is None:
            return
        yield SystemCommand("Drafting on/off", "Switch MTP drafting (/mtp on|off)", self.chat_screen.action_toggle_mtp)
        yield SystemCommand("Draft view / Markdown", "Tint drafted tokens, or render Markdown (F2)",
                            self.chat_screen.action_toggle_drafts)
        yield SystemCommand("Clear conversation", "Start over (/clear)", lambda: self.run_command("/clear"))
        yield SystemCommand("Stats", "Every figure of the last answer (/stats)", lambda: self.run_command("/stats"))
        yield SystemCommand("Help", "Commands and keys (/help)", lambda: self.run_command("/help"))

    # -- input ------------------------------------------------------------

    @on(ChatInput.Submitted)
    def _submitted(self, event: ChatInput.Submitted) -> None:
        if self.session is None:
            return
        text = event.text
        if text.startswith("/"):
            self.run_command(text)
        elif self.generating:
            self.notify("Still answering: Esc stops it", severity="warning")
            event.control.load_text(text)
        else:
            self.send(text)

    def send(self, text: str) -> None:
        if len(self.session.prompt_for(text)) >= self.session.context_limit:
            self.note("This message does not fit in what is left of the context.", error=True)
            self._offer_clear()
            return
        self._mount(UserMessage(text))
        # Fixed per answer: a later /think must not re-split an earlier one.
        widget = AssistantMessage(opens_thinking=self.session.opens_thinking)
        self._mount(widget)
        self.generating = True
        self._stop_requested = False
        self.chat_screen.refresh_bindings()
        self._generate(text, widget)

    def cancel_generation(self) -> None:
        if self.generating and self.session is not None:
            self._stop_requested = True
            self.session.cancel()

    @work(thread=True, exclusive=True, group="generate", exit_on_error=False)
    def _generate(self, text: str, widget: AssistantMessage) -> None:
        session = self.session
        tokenizer = session.tokenizer
        pending: List[Tuple[str, bool]] = []
        last_post = 0.0
        last_stats = None
        worker = get_current_worker()

        def flush(stats: Any) -> None:
            nonlocal pending, last_post
            # post_message is thread-safe and does not wait for the UI, so
            # drawing never slows decoding down (or its tok/s figure).
            self.post_message(_Streamed(widget, pending, copy.copy(stats)))
            pending, last_post = [], time.monotonic()

        def run() -> Optional[str]:
            nonlocal last_stats
            try:
                for r in session.stream(text):
                    pending.extend(draft_spans(tokenizer, r))
                    last_stats = r.stats
                    # Asked here, on the generating thread: a stop pressed
                    # before the turn began still counts (stream() starts by
                    # clearing the session's own flag).
                    if self._stop_requested or worker.is_cancelled:
                        session.cancel()
                    if time.monotonic() - last_post >= UPDATE_INTERVAL_S:
                        flush(r.stats)
            except ContextFullError as e:
                return str(e)
            except Exception as e:  # shown in the app; the session stays usable
                return f"{type(e).__name__}: {e}"
            return None

        error = self.mlx_thread.submit(run).result()
        if pending:
            flush(last_stats)
        self.call_from_thread(self._finished, widget, error)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        # A bug in a worker must not leave the app waiting forever.
        if event.state != WorkerState.ERROR:
            return
        error = f"{type(event.worker.error).__name__}: {event.worker.error}"
        if event.worker.group == "load":
            self._load_failed(error)
        elif event.worker.group == "generate":
            self.generating = False
            self.chat_screen.refresh_bindings()
            self.note(f"internal error: {error}", error=True)

    @on(_Streamed)
    def _streamed(self, message: _Streamed) -> None:
        if message.spans:
            message.widget.add(message.spans)
            self.conversation.scroll_end(animate=False)
        if message.stats is not None:
            self.update_stats(message.stats)

    def _finished(self, widget: AssistantMessage, error: Optional[str]) -> None:
        self.generating = False
        self.chat_screen.refresh_bindings()
        session = self.session
        last = session.last
        if error is not None:
            if not widget.answer_text:
                widget.remove()
            self.note(error, error=True)
            if "context is full" in error:
                self._offer_clear()
        elif last is not None:
            s = last.stats
            meta = []
            if s is not None:
                meta.append(f"{len(last.tokens)} tok · {s.decode_tokens_per_s:.1f} tok/s")
                if s.draft_tokens:
                    meta.append(f"{s.accepted_tokens}/{s.draft_tokens} drafts accepted")
                meta.append(f"pre-filled {s.prefilled_tokens} of {last.prompt_tokens} prompt tokens")
            if last.finish_reason in ("cancelled", "length", "context"):
                meta.append({"cancelled": "stopped", "length": "max tokens reached",
                             "context": "context full"}[last.finish_reason])
            widget.set_meta(" · ".join(meta))
            if last.finish_reason == "context" or session.context_full:
                self._offer_clear()
        self.update_stats()
        self.conversation.scroll_end(animate=False)

    def _offer_clear(self) -> None:
        s = self.session
        self.note(f"The context is full ({s.context_used}/{s.context_limit} tokens). "
                  "Press Enter to /clear and start a new conversation.", error=True)
        box = self.chat_screen.query_one(ChatInput)
        box.load_text("/clear")
        box.move_cursor(box.document.end)

    # -- commands ---------------------------------------------------------

    def run_command(self, line: str) -> None:
        """Run one slash command."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        handler = getattr(self, f"_cmd_{name.lstrip('/').lower()}", None)
        if handler is None:
            self.note(f"Unknown command {name}: /help lists them", error=True)
            return
        if self.generating and name not in ("/stats", "/help"):
            self.note(f"{name} waits until the answer ends (Esc stops it)", error=True)
            return
        try:
            handler(arg)
        except (ValueError, OSError) as e:
            self.note(f"{name}: {e}", error=True)
        self.update_stats()

    def _on_off(self, arg: str, what: str) -> bool:
        if arg.lower() in ("on", "1", "true", "yes"):
            return True
        if arg.lower() in ("off", "0", "false", "no"):
            return False
        raise ValueError(f"use {what} on or {what} off")

    def _cmd_help(self, arg: str) -> None:
        self._mount(HelpNotice(HELP))

    def _cmd_draft(self, arg: str) -> None:
        if self.session.model.drafter is None:
            raise ValueError(f"this model has no drafter ({self._drafter_note()})")
        from mlx_mtp.engine import deep_draft_warning, useful_draft_length

        drafter = self.session.model.drafter
        if arg.strip() == "auto":
            self.session.num_draft = self._saved_k = "auto"
            self.note(f"Adaptive draft length: 0..{useful_draft_length(drafter)} per cycle, "
                      "parked at 0 when drafting does not pay")
            return
        try:
            k = int(arg)
        except ValueError:
            raise ValueError("use /draft auto or /draft N, e.g. /draft 3 (0: plain decoding)") from None
        if not 0 <= k <= 16:
            raise ValueError("N must be between 0 and 16")
        self.session.num_draft = k
        if k:
            self._saved_k = k
        self.note(f"Drafting {k} tokens per cycle" if k else "Drafting off (plain decoding)")
        warning = deep_draft_warning(drafter, k)
        if warning:
            self.note(f"warning: /draft {k} {warning}", error=True)

    def _cmd_mtp(self, arg: str) -> None:
        on_ = self._on_off(arg, "/mtp")
        if self.session.model.drafter is None:
            raise ValueError(f"this model has no drafter ({self._drafter_note()})")
        if on_:
            self.session.num_draft = self._saved_k or self.session.model.default_num_draft
            self.note(f"MTP drafting on, k={self.session.num_draft}")
        else:
            if self.session.num_draft:
                self._saved_k = self.session.num_draft
            self.session.num_draft = 0
            self.note("MTP drafting off: plain decoding (the head keeps following, /mtp on resumes)")

    def _cmd_temp(self, arg: str) -> None:
        try:
            t = float(arg)
        except ValueError:
            raise ValueError("use /temp T, e.g. /temp 0.7 (0: greedy)") from None
        if not 0 <= t <= 10 or t != t:
            raise ValueError("T must be between 0 and 10")
        self.session.temp = t
        self.note(f"Temperature {t:g}" + (" (greedy)" if t == 0 else ""))

    def _cmd_system(self, arg: str) -> None:
        if not arg:
            self.note(f"System message: {self.session.system!r}" if self.session.system else "No system message")
            return
        self.session.system = None if arg.lower() in ("off", "none", "clear") else arg
        again = " (the history is re-encoded once on the next message)" if self.session.messages else ""
        self.note((f"System message set{again}" if self.session.system else f"System message removed{again}"))

    def _cmd_think(self, arg: str) -> None:
        on_ = self._on_off(arg, "/think")
        if not self.session.supports_thinking:
            raise ValueError("this model's chat template has no thinking switch")
        self.session.enable_thinking = on_
        self.note(f"Thinking {'on' if on_ else 'off'} from the next message")

    def _cmd_clear(self, arg: str) -> None:
        self.session.clear()
        for child in list(self.conversation.children):
            if child.id != "welcome":
                child.remove()
        self.chat_screen.query_one(ChatInput).clear()
        self.notify("New conversation")

    def _cmd_save(self, arg: str) -> None:
        if not arg:
            raise ValueError("use /save FILE")
        path = self.session.save(arg)
        self.note(f"Saved {len(self.session.messages)} messages to {path}")

    def _cmd_load(self, arg: str) -> None:
        if not arg:
            raise ValueError("use /load FILE")
        self.session.load(arg)
        for child in list(self.conversation.children):
            if child.id != "welcome":
                child.remove()
        for m in self.session.messages:
            if m.role == "user":
                self._mount(UserMessage(m.content))
            elif m.role == "tool":  # a tool's result, sent in the user's place
                self._mount(UserMessage(f"tool result: {m.content}"))
            else:
                widget = AssistantMessage()
                calls = m.extra.get("tool_calls")
                # A pure tool call has no text: show what it calls.
                widget.set_text(m.content or (f"tool calls: {json.dumps(calls, ensure_ascii=False)}" if calls else ""))
                self._mount(widget)
        how = "exact tokens" if self.session.tokens else "re-encoded on the next message"
        self.note(f"Loaded {len(self.session.messages)} messages from {arg} ({how})")

    def _cmd_stats(self, arg: str) -> None:
        last = self.session.last
        if last is None or last.stats is None:
            self.note("No answer yet")
            return
        d = last.stats.to_dict()
        rows = [f"| {k} | {v} |" for k, v in d.items()]
        rows.append(f"| context | {self.session.context_used} / {self.session.context_limit} |")
        self._mount(HelpNotice("**Last answer**\n\n| stat | value |\n|---|---|\n" + "\n".join(rows)))


def run(model_path: Optional[str] = None, options: Optional[GenerationOptions] = None, *,
        drafter: str = "auto", show_drafts: bool = True) -> Optional[str]:
    """Start the chat app (blocks until it quits). Returns why the model
    could not be loaded (shown in the app until the user quit), or None."""
    app = ChatApp(model_path, options, drafter=drafter, show_drafts=show_drafts)
    app.run()
    return app.load_error
