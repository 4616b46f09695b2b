"""`mlx-mtp chat`: the token-level ChatSession and the Textual app, driven
headless with Pilot on the bundled tiny model (random weights, real drafting)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("textual")

import mlx_mtp  # noqa: E402
from mlx_mtp.chat_session import ChatSession, ContextFullError  # noqa: E402

TINY = Path(__file__).resolve().parent.parent / "assets" / "tiny-qwen35"


@pytest.fixture(scope="module")
def loaded():
    return mlx_mtp.load(TINY)


def _no_eos(monkeypatch, tokenizer) -> None:
    # The random model would stop at its EOS after a few dozen tokens; without
    # one it runs until max_tokens, long enough to cancel mid-way.
    monkeypatch.setattr(tokenizer, "_eos_token_ids", set())


# -- ChatSession --------------------------------------------------------------


def test_second_turn_prefills_only_its_new_tokens(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=48)
    first = session.send("Write a haiku about caches")
    assert first.stats.prefilled_tokens == first.prompt_tokens  # nothing cached yet
    history = len(session.tokens)
    assert history == first.prompt_tokens + len(first.tokens)

    prompt = session.prompt_for("And one about rollbacks?")
    assert prompt[:history] == session.tokens  # extends the conversation's tokens
    cached = len(session.prompt_cache.tokens)
    # The cache holds everything but the newest sampled token (the EOS, or
    # the last answer token when the answer ran out of max_tokens).
    assert cached == history - (first.finish_reason != "stop")
    second = session.send("And one about rollbacks?")
    # Only the new user turn is run, not the history.
    assert second.stats.prefilled_tokens == len(prompt) - cached
    assert second.stats.prefilled_tokens < second.prompt_tokens / 2
    # ...and the answer is the one a fresh, uncached run gives.
    assert mlx_mtp.generate(model, tokenizer, prompt, max_tokens=48) == second.text
    assert session.context_used == len(prompt) + len(second.tokens)


def test_cancelled_turn_keeps_partial_answer_and_cache_consistent(loaded, monkeypatch):
    model, tokenizer = loaded
    _no_eos(monkeypatch, tokenizer)
    session = ChatSession(model, tokenizer, max_tokens=400)
    seen = []
    for r in session.stream("hello"):
        seen.extend(r.tokens)
        if len(seen) >= 10:
            session.cancel()
    last = session.last
    assert last.finish_reason == "cancelled" and 10 <= len(last.tokens) < 400
    assert last.tokens == seen and session.messages[-1].content == last.text
    cached = session.prompt_cache.tokens
    assert cached and session.tokens[: len(cached)] == cached

    # Closing the generator mid-way (a consumer that stops reading) also records the turn.
    stream = session.stream("go on")
    next(stream), next(stream)
    stream.close()
    assert session.last.finish_reason == "cancelled" and len(session.messages) == 4
    cached = session.prompt_cache.tokens
    assert session.tokens[: len(cached)] == cached

    monkeypatch.undo()
    prompt = session.prompt_for("and now?")
    third = session.send("and now?")
    assert third.stats.prefilled_tokens == len(prompt) - len(cached)
    assert mlx_mtp.generate(model, tokenizer, prompt, max_tokens=400) == third.text


def test_drafting_off_and_on_keeps_the_cache(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=32)
    session.send("one")
    session.num_draft = 0
    plain = session.send("two")
    assert plain.stats.draft_tokens == 0 and not any(plain.from_draft)
    assert plain.stats.prefilled_tokens < plain.prompt_tokens / 2
    session.num_draft = 3
    drafted = session.send("three")
    assert drafted.stats.draft_tokens > 0 and drafted.stats.prefilled_tokens < drafted.prompt_tokens / 2


def test_save_and_load(loaded, tmp_path):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=24, system="be brief", model_id="tiny")
    session.send("hi")
    path = session.save(tmp_path / "chat.json")
    data = json.loads(path.read_text())
    assert data["messages"][0] == {"role": "user", "content": "hi"} and data["system"] == "be brief"

    again = ChatSession(model, tokenizer, max_tokens=24, model_id="tiny")
    again.load(path)
    assert [m.as_chat() for m in again.messages] == [m.as_chat() for m in session.messages]
    assert again.tokens == session.tokens and again.system == "be brief"
    assert again.send("more").text == session.send("more").text

    other = ChatSession(model, tokenizer, max_tokens=24, model_id="another model")
    other.load(path)
    assert other.tokens is None  # token ids of another model: re-encoded
    assert other.send("more").finish_reason in ("stop", "length")
    with pytest.raises(ValueError):
        (tmp_path / "bad.json").write_text('{"nope": 1}')
        other.load(tmp_path / "bad.json")


def test_context_full(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=200, max_context=64)
    with pytest.raises(ContextFullError):
        session.send("x" * 80)
    assert session.messages == []
    result = session.send("hi")
    assert result.finish_reason in ("context", "stop")
    if result.finish_reason == "context":
        assert session.context_full


# -- the app ------------------------------------------------------------------


def _app(loaded, **options):
    from mlx_mtp.apps.chat.app import ChatApp
    from mlx_mtp.chat_session import CHAT_OPTIONS

    options.setdefault("max_tokens", 64)
    return ChatApp(str(TINY), CHAT_OPTIONS.replace(**options), loaded=loaded)


async def _wait(pilot, condition, timeout: float = 20.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    raise AssertionError("timed out")


async def _send(app, pilot, text: str) -> None:
    from mlx_mtp.apps.chat.app import ChatInput

    box = app.chat_screen.query_one(ChatInput)
    box.load_text(text)
    await pilot.press("enter")
    await pilot.pause()
    await _wait(pilot, lambda: not app.generating)
    await pilot.pause(0.1)


def _statsbar(app) -> str:
    return str(app.chat_screen.query_one("#statsbar").render())


def test_app_streams_text_and_stats(loaded, monkeypatch, tmp_path):
    from mlx_mtp.apps.chat import app as chat_app

    monkeypatch.setattr(chat_app, "UPDATE_INTERVAL_S", 0.0)
    updates = []
    original = chat_app.AssistantMessage.add
    monkeypatch.setattr(chat_app.AssistantMessage, "add",
                        lambda self, spans: (updates.append(list(spans)), original(self, spans))[1])

    async def main():
        # A fixed k: with "auto" the policy may park on this tiny model (it
        # decides from timings), and then no drafted run would be marked.
        app = _app(loaded, num_draft=3)
        async with app.run_test(size=(100, 32)) as pilot:
            await _wait(pilot, lambda: app.session is not None)
            await _send(app, pilot, "Write a haiku about caches")
            widget = app.chat_screen.query(chat_app.AssistantMessage).last()
            last = app.session.last
            assert widget.answer_text == last.text and last.text
            assert len(updates) >= 2  # streamed in pieces, not at the end
            assert any(d for u in updates for _, d in u)  # drafted runs are marked
            bar = _statsbar(app)
            for part in ("mtp k=3", "tok/s", "accept", "tok/pass", "prefill", "ctx", "mem"):
                assert part in bar
            assert f"prefill {last.stats.prefilled_tokens} tok" in bar

            # Markdown view and back (F2); the draft view is a class on the screen.
            assert app.chat_screen.has_class("-drafts")
            await pilot.press("f2")
            assert not app.chat_screen.has_class("-drafts")
            await pilot.pause(0.2)
            svg = app.save_screenshot(path=str(tmp_path), filename="chat.svg")
            text = Path(svg).read_text()
            assert "mlx-mtp" in text and "tok/s" in text
            await pilot.press("f2")
            assert app.chat_screen.has_class("-drafts")

    asyncio.run(main())


def test_app_toggle_drafting_and_commands(loaded):
    async def main():
        app = _app(loaded)
        async with app.run_test(size=(100, 32)) as pilot:
            await _wait(pilot, lambda: app.session is not None)
            await _send(app, pilot, "/mtp off")
            assert app.session.num_draft == 0 and "mtp off" in _statsbar(app)
            await _send(app, pilot, "hello")
            assert app.session.last.stats.draft_tokens == 0
            await _send(app, pilot, "/mtp on")
            assert app.session.num_draft == "auto"  # the default: adaptive
            await _send(app, pilot, "/draft 2")
            assert app.session.num_draft == 2 and "mtp k=2" in _statsbar(app)
            await _send(app, pilot, "again")
            assert app.session.last.stats.num_draft == 2 and app.session.last.stats.draft_tokens > 0
            # Drafting back on does not re-fill the history.
            assert app.session.last.stats.prefilled_tokens < app.session.last.prompt_tokens / 2
            await pilot.press("f3")
            assert app.session.num_draft == 0
            await _send(app, pilot, "/temp 0.7")
            assert app.session.temp == 0.7
            await _send(app, pilot, "/think off")
            assert app.session.enable_thinking is False
            await _send(app, pilot, "/system be brief")
            assert app.session.system == "be brief" and app.session.tokens is None
            await _send(app, pilot, "/draft lots")
            await _send(app, pilot, "/draft 12")  # runs as asked, with the CLI's depth warning
            assert app.session.num_draft == 12
            await _send(app, pilot, "/nope")
            from mlx_mtp.apps.chat.app import Notice

            errors = [str(n.render()) for n in app.chat_screen.query(Notice) if n.has_class("-error")]
            assert any("/draft N" in e for e in errors) and any("Unknown command /nope" in e for e in errors)
            assert any("/draft 12 drafts deeper than the mtp drafter can use" in e for e in errors)
            await _send(app, pilot, "/stats")
            await _send(app, pilot, "/help")
            await _send(app, pilot, "after the settings")
            assert app.session.last.finish_reason in ("stop", "length")

    asyncio.run(main())


def test_app_cancel_then_send_again(loaded, monkeypatch):
    from mlx_mtp.apps.chat.app import AssistantMessage

    model, tokenizer = loaded
    _no_eos(monkeypatch, tokenizer)

    async def main():
        app = _app(loaded, max_tokens=1500)
        async with app.run_test(size=(100, 32)) as pilot:
            await _wait(pilot, lambda: app.session is not None)
            from mlx_mtp.apps.chat.app import ChatInput

            app.chat_screen.query_one(ChatInput).load_text("talk for a long time")
            await pilot.press("enter")
            widget = app.chat_screen.query(AssistantMessage).last()
            await _wait(pilot, lambda: len(widget.answer_text) > 5)
            assert app.generating
            await pilot.press("escape")
            await _wait(pilot, lambda: not app.generating)
            await pilot.pause(0.1)
            last = app.session.last
            assert last.finish_reason == "cancelled" and len(last.tokens) < 1500
            assert widget.answer_text == last.text  # the partial answer stays
            cached = app.session.prompt_cache.tokens
            assert app.session.tokens[: len(cached)] == cached

            monkeypatch.undo()
            app.session.max_tokens = 64
            prompt = app.session.prompt_for("shorter please")
            await _send(app, pilot, "shorter please")
            second = app.session.last
            assert second.finish_reason in ("stop", "length")
            assert second.stats.prefilled_tokens == len(prompt) - len(cached)
            # Ctrl+C also stops an answer (and is left to copy/quit otherwise).
            _no_eos(monkeypatch, tokenizer)
            app.session.max_tokens = 1500
            app.chat_screen.query_one(ChatInput).load_text("once more")
            await pilot.press("enter")
            await _wait(pilot, lambda: app.generating and app.session is not None)
            await pilot.pause(0.2)
            await pilot.press("ctrl+c")
            await _wait(pilot, lambda: not app.generating)
            assert app.session.last.finish_reason == "cancelled"

    asyncio.run(main())


def test_app_clear_save_and_load(loaded, tmp_path):
    from mlx_mtp.apps.chat.app import AssistantMessage, UserMessage

    async def main():
        app = _app(loaded)
        async with app.run_test(size=(100, 32)) as pilot:
            await _wait(pilot, lambda: app.session is not None)
            await _send(app, pilot, "first message")
            await _send(app, pilot, "second message")
            answers = [m.content for m in app.session.messages if m.role == "assistant"]
            path = tmp_path / "conversation.json"
            await _send(app, pilot, f"/save {path}")
            assert json.loads(path.read_text())["messages"][2]["content"] == "second message"

            await _send(app, pilot, "/clear")
            assert app.session.messages == [] and app.session.context_used == 0
            assert not app.chat_screen.query(AssistantMessage) and not app.chat_screen.query(UserMessage)
            assert "ctx 0/" in _statsbar(app)

            await _send(app, pilot, f"/load {path}")
            assert [m.content for m in app.session.messages if m.role == "assistant"] == answers
            await pilot.pause(0.1)
            assert [w.answer_text for w in app.chat_screen.query(AssistantMessage)] == answers
            assert len(app.chat_screen.query(UserMessage)) == 2
            await _send(app, pilot, "third message")
            assert len(app.session.messages) == 6

    asyncio.run(main())


def test_app_input_newlines_and_history(loaded):
    from mlx_mtp.apps.chat.app import ChatInput

    async def main():
        app = _app(loaded)
        async with app.run_test(size=(100, 32)) as pilot:
            await _wait(pilot, lambda: app.session is not None)
            box = app.chat_screen.query_one(ChatInput)
            assert box.has_focus
            await pilot.press("a", "shift+enter", "b", "ctrl+j", "c")
            assert box.text == "a\nb\nc"
            await pilot.press("backslash", "enter", "d")
            assert box.text == "a\nb\nc\nd"
            await pilot.press("enter")
            await _wait(pilot, lambda: not app.generating and app.session.last is not None)
            assert app.session.messages[0].content == "a\nb\nc\nd" and box.text == ""
            await pilot.press("/", "s", "t", "a", "t", "s", "enter")
            await pilot.press("up")
            assert box.text == "/stats"
            await pilot.press("up")
            assert box.text == "a\nb\nc\nd"
            await pilot.press("down", "down")
            assert box.text == ""

    asyncio.run(main())


def test_app_loads_with_progress_and_reports_errors(tmp_path):
    from mlx_mtp.apps.chat.app import ChatApp, LoadingScreen

    async def main():
        app = ChatApp(None)  # the bundled default model
        async with app.run_test(size=(100, 32)) as pilot:
            assert isinstance(app.screen, LoadingScreen)
            await _wait(pilot, lambda: app.session is not None, timeout=60)
            assert not isinstance(app.screen, LoadingScreen)
            assert "mtp" in _statsbar(app)

        broken = ChatApp(str(tmp_path / "no-such-model"))
        async with broken.run_test(size=(100, 32)) as pilot:
            await _wait(pilot, lambda: broken.load_error is not None)
            assert isinstance(broken.screen, LoadingScreen) and broken.screen.has_class("-failed")
            assert "no such file" in broken.load_error
            assert broken.is_running  # still up: the error is shown, not raised

    asyncio.run(main())


def test_app_context_full_offers_clear(loaded, monkeypatch):
    from mlx_mtp.apps.chat.app import ChatInput, Notice

    model, tokenizer = loaded
    _no_eos(monkeypatch, tokenizer)  # the answer runs into the context limit

    async def main():
        app = _app(loaded, max_context=80, max_tokens=500)
        async with app.run_test(size=(100, 32)) as pilot:
            await _wait(pilot, lambda: app.session is not None)
            await _send(app, pilot, "hi")
            assert app.session.last.finish_reason == "context"
            box = app.chat_screen.query_one(ChatInput)
            assert box.text == "/clear"
            assert any("context is full" in str(n.render()) for n in app.chat_screen.query(Notice))
            await _send(app, pilot, "x" * 100)  # too long for the context: refused, not crashed
            assert len(app.session.messages) == 2 and box.text == "/clear"
            await pilot.press("enter")
            await pilot.pause(0.1)
            assert app.session.messages == [] and app.session.context_used == 0

    asyncio.run(main())


def test_cli_chat_command():
    from click.testing import CliRunner

    from mlx_mtp.cli import main

    result = CliRunner().invoke(main, ["chat", "--help"])
    assert result.exit_code == 0
    for option in ("--model", "--drafter", "--num-draft", "--temp", "--system", "--thinking"):
        assert option in result.output


def test_stats_bar_shows_the_adaptive_k_and_why_it_is_parked(loaded):
    from mlx_mtp.apps.chat.app import format_stats_bar
    from mlx_mtp.engine import Stats

    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, max_tokens=8, num_draft="auto")
    assert "mtp k=auto" in str(format_stats_bar(session))
    stats = Stats(target_passes=5, last_k=0, generated_tokens=6,
                  parked_reason="parked: drafts accepted 3%, a verify costs 1.8 steps; probing k=1 every 45 cycles")
    bar = str(format_stats_bar(session, stats))
    assert "mtp k=auto (now 0)" in bar and "parked: drafts accepted 3%" in bar
