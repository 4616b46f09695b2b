"""`mlx-mtp serve`: the real server on a free loopback port, driven by the
official `openai` client (and httpx for what the client will not send).

The decoder is the real batched one, `mlx_mtp.batching.BatchGenerator`,
except where `ScriptedGenerator` answers with fixed text: the tool-call
and reasoning markup a tiny model never writes.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import mlx_mtp  # noqa: E402
from mlx_mtp.api import build_prompt  # noqa: E402
from mlx_mtp.apps.serve import ServeConfig, make_server  # noqa: E402
from mlx_mtp.apps.serve.app import chat_messages  # noqa: E402
from mlx_mtp.apps.serve.formats import GEMMA4, QWEN, detect  # noqa: E402
from mlx_mtp.apps.serve.parse import CALL, CONTENT, REASONING, OutputParser, close_json, merge_calls  # noqa: E402
from mlx_mtp.apps.serve.schemas import ChatMessage  # noqa: E402
from mlx_mtp.batching import RowEvent  # noqa: E402
from mlx_mtp.engine import Stats  # noqa: E402

from test_templates import GEMMA4_TEMPLATE, QWEN36_TEMPLATE, WEATHER, _tokenizers  # noqa: E402

MODEL = "demo-qwen"
API_KEY = "sk-test-key"
#: a small body limit, so the 413 test sends little
BODY_LIMIT = 256 << 10
NUM_DRAFT = 3
PROMPTS = ["def fibonacci(n):", "import os\n", "class Stack:", "for i in range(10):"]

# -- decoders for the tests ---------------------------------------------------------


class ScriptedGenerator:
    """Answers every request with the tokens of one text, a few per step,
    and keeps the prompts it was given."""

    def __init__(self, tokens: List[int], per_step: int = 3):
        self.tokens, self.per_step = tokens, per_step
        self.rows: Dict[int, int] = {}
        self.prompts: List[List[int]] = []
        self.num_drafts: List[object] = []

    def add(self, prompt, params, max_tokens, eos_token_ids, seed=None, num_draft=None) -> int:
        self.prompts.append(list(prompt))
        self.num_drafts.append(num_draft)
        row_id = len(self.prompts)
        self.rows[row_id] = 0
        return row_id

    def cancel(self, row_id: int) -> None:
        self.rows.pop(row_id, None)

    def step(self) -> List[RowEvent]:
        events = []
        for row_id, at in list(self.rows.items()):
            piece = self.tokens[at:at + self.per_step]
            self.rows[row_id] = at + len(piece)
            done = self.rows[row_id] >= len(self.tokens)
            stats = Stats(prompt_tokens=len(self.prompts[row_id - 1]), generated_tokens=self.rows[row_id])
            if done:
                del self.rows[row_id]
            events.append(RowEvent(row_id, piece, "stop" if done else None, stats))
        return events

    active = property(lambda self: len(self.rows))
    queued = property(lambda self: 0)

    def has_work(self) -> bool:
        return bool(self.rows)


# -- servers --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    url: str
    server: Any
    thread: threading.Thread
    key: Optional[str] = None

    def client(self, **kwargs) -> "openai.OpenAI":
        # No retries: a 429 or a 500 must reach the test as it is.
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key or "none", max_retries=0, **kwargs)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    @property
    def decoder(self) -> Any:
        """The generator the server's worker thread runs."""
        return self.server.config.app.state.serve.worker.generator

    def record_batch_sizes(self) -> List[int]:
        """From now on, the rows decoding at each step (appended as it runs)."""
        decoder, sizes = self.decoder, []
        step = decoder.step

        def recording_step():
            sizes.append(decoder.active)
            return step()

        decoder.step = recording_step
        return sizes


def start(model, tokenizer, generator=None, name: str = MODEL, **config) -> Running:
    """uvicorn serving `model` on a free loopback port, in a thread, with
    the server's own BatchGenerator unless `generator` is given."""
    # A fixed draft length: `auto` may park drafting on a tiny CPU model,
    # and every row must draft here.
    config = ServeConfig(model_name=name, port=free_port(), num_draft=NUM_DRAFT, **config)
    server = make_server(model, tokenizer, config, generator=generator, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "the server did not start"
        time.sleep(0.02)
    return Running(f"http://127.0.0.1:{config.port}", server, thread, config.api_key)


@pytest.fixture(scope="module")
def demo():
    return mlx_mtp.load(MODEL)


@pytest.fixture(scope="module")
def served(demo):
    running = start(*demo, api_key=API_KEY, max_body_bytes=BODY_LIMIT)
    yield running
    running.stop()


def reference(demo, prompt, max_tokens: int, **kwargs) -> str:
    """Single-request greedy decoding through the library."""
    model, tokenizer = demo
    return mlx_mtp.generate(model, tokenizer, prompt, max_tokens=max_tokens, temp=0.0, **kwargs)


def user(text: str) -> List[Dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- endpoints ------------------------------------------------------------------------


def test_models_and_health(served):
    assert [m.id for m in served.client().models.list().data] == [MODEL]
    health = httpx.get(f"{served.url}/health").json()  # open without the key
    assert health["status"] == "ok" and health["drafter"] == "mtp" and health["num_draft"] == NUM_DRAFT
    assert set(health["requests"]) >= {"active", "queued"} and health["memory"]["active_gb"] > 0
    assert set(health["acceptance"]) == {"drafted", "accepted", "rate"}


def test_chat_greedy_equals_generate(served, demo):
    expected = reference(demo, user(PROMPTS[0]), 40)
    r = served.client().chat.completions.create(model=MODEL, messages=user(PROMPTS[0]), temperature=0,
                                                max_tokens=40)
    choice = r.choices[0]
    assert choice.message.content == expected and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    prompt = build_prompt(demo[1], user(PROMPTS[0]))
    assert r.usage.prompt_tokens == len(prompt) and r.usage.total_tokens == len(prompt) + r.usage.completion_tokens
    t = r.model_extra["timings"]
    assert set(t) >= {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "draft_n", "draft_n_accepted"}
    assert t["predicted_n"] == r.usage.completion_tokens and t["prompt_n"] == len(prompt)
    assert t["draft_n"] > 0 and 0 <= t["draft_n_accepted"] <= t["draft_n"]


def test_chat_stream_with_usage(served, demo):
    expected = reference(demo, user(PROMPTS[1]), 30)
    stream = served.client().chat.completions.create(model=MODEL, messages=user(PROMPTS[1]), temperature=0,
                                                     max_tokens=30, stream=True,
                                                     stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.model_extra["timings"]["draft_n"] > 0


def test_completions_text_and_token_ids(served, demo):
    model, tokenizer = demo
    expected = reference(demo, PROMPTS[2], 24, chat_template=False)
    client = served.client()
    r = client.completions.create(model=MODEL, prompt=PROMPTS[2], temperature=0, max_tokens=24)
    assert r.choices[0].text == expected
    ids = tokenizer.encode(PROMPTS[2])
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=24)
    assert by_ids.choices[0].text == expected and by_ids.usage.prompt_tokens == len(ids)
    streamed = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=24, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_stop_strings_and_length(served, demo):
    full = reference(demo, user(PROMPTS[0]), 40)
    stop = full[10:14]
    cut = full[: full.index(stop)]
    client = served.client()
    r = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[0]), temperature=0, max_tokens=40,
                                       stop=[stop])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[0]), temperature=0,
                                       max_completion_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5


def test_max_tokens_past_the_context_ends_with_length(served, demo):
    context = demo[0].target.context_length
    ids = (demo[1].encode("x = 1\n") * context)[: context - 4]
    r = served.client().completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=100)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens <= 4


def test_penalties_map_onto_sampling(served, demo):
    messages = user(PROMPTS[3])
    expected = reference(demo, messages, 30, repetition_penalty=1.3, presence_penalty=0.5)
    r = served.client().chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30,
                                                presence_penalty=0.5, extra_body={"repetition_penalty": 1.3})
    assert r.choices[0].message.content == expected
    # Neutral values and fields that cannot change the output are accepted.
    neutral = served.client().chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=30, presence_penalty=0, frequency_penalty=0,
        user="someone", parallel_tool_calls=True, extra_body={"num_draft": 2, "top_k": 0, "min_p": 0.0})
    assert neutral.choices[0].message.content == reference(demo, messages, 30)


def test_a_follow_up_turn_prefills_only_its_new_tokens(served, demo):
    client = served.client()
    first = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[2]), temperature=0, max_tokens=16)
    history = user(PROMPTS[2]) + [{"role": "assistant", "content": first.choices[0].message.content},
                                  {"role": "user", "content": "and then?"}]
    follow = client.chat.completions.create(model=MODEL, messages=history, temperature=0, max_tokens=16)
    assert follow.choices[0].message.content == reference(demo, history, 16)
    cached = follow.usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and follow.model_extra["timings"]["prompt_n"] == follow.usage.prompt_tokens - cached


def test_sampling_defaults_come_from_generation_config(tmp_path):
    from mlx_mtp.apps.serve.app import generation_defaults

    assert generation_defaults(None).temp == 1.0  # OpenAI's default
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert generation_defaults(tmp_path).temp == 0.0
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20}))
    params = generation_defaults(tmp_path)
    assert (params.temp, params.top_p, params.top_k, params.repetition_penalty) == (0.6, 0.95, 20, 1.0)


# -- faults -----------------------------------------------------------------------------


def _post(served, path: str, key: Optional[str] = API_KEY, **kwargs) -> httpx.Response:
    kwargs.setdefault("headers", {"Authorization": f"Bearer {key}"} if key else {})
    return httpx.post(f"{served.url}{path}", timeout=60, **kwargs)


def _error(response: httpx.Response, status: int) -> Dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_bad_json_and_wrong_types_are_400(served):
    bad_json = _post(served, "/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert "JSON" in _error(bad_json, 400)["message"]
    wrong = [
        {"model": MODEL, "messages": "hi"},
        {"model": MODEL, "messages": user("hi"), "temperature": "hot"},
        {"model": MODEL, "messages": user("hi"), "max_tokens": 0},
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        {"model": MODEL, "messages": user("hi"), "top_p": 2},
        {"model": MODEL, "messages": []},
    ]
    params = [_error(_post(served, "/v1/chat/completions", json=body), 400)["param"] for body in wrong]
    assert params[1] == "temperature" and params[2] == "max_tokens" and params[4] == "top_p"
    assert _error(_post(served, "/v1/completions", json={"prompt": [1, 10**9]}), 400)["param"] == "prompt"


def test_unsupported_fields_are_refused_not_ignored(served):
    client = served.client()
    for extra in ({"n": 2}, {"logprobs": True},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
                  {"tool_choice": "required", "tools": [WEATHER]}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2, **extra)
        assert e.value.body["param"] == next(iter(extra))


def test_unknown_model_is_404(served):
    with pytest.raises(openai.NotFoundError) as e:
        served.client().chat.completions.create(model="gpt-9", messages=user("hi"), max_tokens=2)
    assert "gpt-9" in e.value.body["message"]


def test_prompt_longer_than_the_context_is_400_with_both_lengths(served, demo):
    context = demo[0].target.context_length
    with pytest.raises(openai.BadRequestError) as e:
        served.client().completions.create(model=MODEL, prompt=[5] * (context + 10), max_tokens=2)
    message = e.value.body["message"]
    assert str(context + 10) in message and str(context) in message


def test_api_key_and_body_limit(served):
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 2}
    assert _error(_post(served, "/v1/chat/completions", key=None, json=body), 401)["code"] == "invalid_api_key"
    _error(_post(served, "/v1/chat/completions", key="wrong", json=body), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0).models.list()
    huge = {"model": MODEL, "messages": user("x" * (BODY_LIMIT + 1))}
    _error(_post(served, "/v1/chat/completions", json=huge), 413)


def test_full_queue_is_429(demo):
    running = start(*demo, max_batch=1, max_queue=0)
    try:
        client = running.client()
        stream = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[0]), temperature=0,
                                                max_tokens=3000, stream=True)
        next(iter(stream))  # admitted and running
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
        stream.close()
        deadline = time.time() + 20  # the cancel frees the place
        while httpx.get(f"{running.url}/health").json()["requests"]["active"] and time.time() < deadline:
            time.sleep(0.05)
        r = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=2)
        assert r.choices[0].finish_reason in ("stop", "length")
    finally:
        running.stop()


def test_disconnect_mid_stream_leaves_the_others_correct(demo):
    running = start(*demo, max_batch=4)
    try:
        client = running.client()
        expected = reference(demo, user(PROMPTS[1]), 40)
        doomed = client.chat.completions.create(model=MODEL, messages=user(PROMPTS[0]), temperature=0,
                                                max_tokens=3000, stream=True)
        chunks = iter(doomed)
        for _ in range(3):
            next(chunks)
        with ThreadPoolExecutor(1) as pool:
            other = pool.submit(lambda: "".join(
                c.choices[0].delta.content or "" for c in client.chat.completions.create(
                    model=MODEL, messages=user(PROMPTS[1]), temperature=0, max_tokens=40, stream=True)
                if c.choices))
            time.sleep(0.2)
            doomed.close()  # the client goes away mid-stream
            assert other.result(timeout=120) == expected
        deadline = time.time() + 20
        while time.time() < deadline:
            health = httpx.get(f"{running.url}/health").json()
            if not health["requests"]["active"] and not health["requests"]["queued"]:
                break
            time.sleep(0.05)
        assert not health["requests"]["active"] and not health["requests"]["queued"]
        assert health["requests"]["cancelled"] == 1  # its row was cancelled, not run to the end
        assert health["memory"]["batch_cache_gb"] == 0  # and its cache freed
    finally:
        running.stop()


@pytest.mark.parametrize("name", [MODEL, "demo-gemma"])  # hybrid Qwen3.5, Gemma 4 with its sliding window
def test_concurrent_greedy_rows_each_equal_their_single_decoding(served, demo, name):
    pair = demo if name == MODEL else mlx_mtp.load(name)
    running = served if name == MODEL else start(*pair, name=name)
    lengths = [24, 40, 32, 48]
    expected = [reference(pair, user(p), n) for p, n in zip(PROMPTS, lengths)]
    client = running.client()
    sizes = running.record_batch_sizes()

    def ask(i: int):
        time.sleep(0.05 * i)  # arrivals at different times
        r = client.chat.completions.create(model=name, messages=user(PROMPTS[i]), temperature=0,
                                           max_tokens=lengths[i])
        return r.choices[0].message.content, r.model_extra["timings"]

    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(ask, range(4)))
    finally:
        if running is not served:
            running.stop()
    for (text, t), want in zip(results, expected):
        assert text == want
        assert t["draft_n"] > 0
    assert max(sizes) > 1  # the rows did run together


# -- tool calls and reasoning -----------------------------------------------------------

QWEN_XML_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                 "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
QWEN_JSON_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'
GEMMA4_CALL = '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>,days:3}<tool_call|>'
TYPED_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}


def _feed(markup, text: str, step: int, **kwargs):
    parser = OutputParser(markup, **kwargs)
    deltas = []
    for i in range(0, len(text), step):
        deltas += parser.feed(text[i:i + step])
    return deltas + parser.finish()


def _parse(markup, text: str, step: int, **kwargs):
    deltas = _feed(markup, text, step, **kwargs)
    joined = {kind: "".join(d.text for d in deltas if d.kind == kind) for kind in (REASONING, CONTENT)}
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in merge_calls(deltas)]
    return joined[REASONING], joined[CONTENT], calls


@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
@pytest.mark.parametrize("markup,text,reasoning", [
    (QWEN, "<think>\nLook it up.\n</think>\n\nChecking.\n\n" + QWEN_XML_CALL, False),
    (QWEN, "Look it up.\n</think>\n\nChecking.\n\n" + QWEN_JSON_CALL, True),
    (GEMMA4, "<|channel>thought\nLook it up.<channel|>Checking." + GEMMA4_CALL, False),
])
def test_tool_call_markup_parses_the_same_however_it_streams(markup, text, reasoning, step):
    got = _parse(markup, text, step, in_reasoning=reasoning, tools=[TYPED_WEATHER])
    assert got == ("Look it up.", "Checking.", [("get_weather", {"city": "Paris", "days": 3})])


def test_markup_without_tools_or_broken_stays_text():
    assert _parse(QWEN, "a " + QWEN_JSON_CALL, 3) == ("", "a " + QWEN_JSON_CALL, [])
    broken = "<tool_call>\nnot a call\n</tool_call>"
    assert _parse(QWEN, broken, 1, tools=[])[1] == broken
    assert _parse(GEMMA4, "<|tool_call>f{a:1}<tool_call|>", 4, tools=[])[1] == "<|tool_call>f{a:1}<tool_call|>"
    # Once its name has streamed a call stays a call: a body broken off
    # after that still ends as valid JSON (what was sent, closed).
    assert _parse(GEMMA4, '<|tool_call>call:f{a:<|"|>x}<tool_call|>', 4, tools=[])[2] == [("f", {"a": "x}"})]
    # A Qwen string parameter stays a string even when it looks like a number.
    assert _parse(QWEN, QWEN_XML_CALL.replace("Paris", "42"), 5, tools=[TYPED_WEATHER])[2][0][1]["city"] == "42"
    assert detect('{{ "<|tool_call>" }}', {}) is GEMMA4 and detect("x", {"<|channel>": 5}) is GEMMA4
    assert detect(QWEN36_TEMPLATE, {}) is QWEN


LONG_CITY = "Saint-Rémy-de-Provence \"old town\" \\ north"


@pytest.mark.parametrize("markup,text", [
    (QWEN, "<tool_call>\n<function=get_weather>\n<parameter=city>\n" + LONG_CITY +
     "\n</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"),
    (QWEN, '<tool_call>\n{"name": "get_weather", "arguments": {"city": ' + json.dumps(LONG_CITY) +
     ', "days": 3}}\n</tool_call>'),
    (GEMMA4, '<|tool_call>call:get_weather{city:<|"|>' + LONG_CITY + '<|"|>,days:3}<tool_call|>'),
], ids=["qwen-xml", "qwen-json", "gemma4"])
def test_tool_call_arguments_stream_as_deltas(markup, text):
    """OpenAI's streamed form: the call's first delta has its index, id,
    type and name with "" arguments; the others only pieces of the
    arguments, which arrive as the model writes them and join, however the
    text is split, to the same JSON text, which is the call's arguments."""
    body = text[len(markup.call_open):-len(markup.call_close)]
    expected = markup.parse_call(body, [TYPED_WEATHER])[1]
    joined = set()
    for step in (1, 3, 8, 10_000):
        deltas = [d.call for d in _feed(markup, text, step, tools=[TYPED_WEATHER]) if d.kind == CALL]
        first, rest = deltas[0], deltas[1:]
        assert first["id"].startswith("call_") and first["type"] == "function" and first["index"] == 0
        assert first["function"] == {"name": "get_weather", "arguments": ""}
        assert all(set(d) == {"index", "function"} and set(d["function"]) == {"arguments"} for d in rest)
        pieces = [d["function"]["arguments"] for d in rest]
        if step == 1:  # the city streams character by character, not as one piece
            assert len(pieces) > len(LONG_CITY) // 2, pieces
        (call,) = merge_calls(_feed(markup, text, step, tools=[TYPED_WEATHER]))
        assert "".join(pieces) == call["function"]["arguments"]
        joined.add("".join(pieces))
    (arguments,) = joined
    assert json.loads(arguments) == expected


def test_a_call_cut_off_still_gives_valid_json():
    for prefix in ['{"a": "x', '{"a', '{"a": ', '{"a": 1,', '{"a": tr', '{"a": [1, {"b": "c\\', "{", ""]:
        assert isinstance(json.loads(close_json(prefix)), dict), prefix
    # max_tokens ends the reply inside a call whose arguments were streaming.
    (call,) = merge_calls(_feed(QWEN, '<tool_call>\n{"name": "f", "arguments": {"path": "/tm', 2, tools=[]))
    assert json.loads(call["function"]["arguments"]) == {"path": "/tm"}


def test_tool_messages_reach_the_template():
    messages = [ChatMessage.model_validate(m) for m in [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]]
    out = chat_messages(messages)
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert out[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "get_weather"}


@pytest.fixture(scope="module")
def qwen36(demo):
    """demo-qwen's weights with the Qwen3.6 fixture template (tools, think)."""
    model, _ = demo
    _, tokenizer = mlx_mtp.load(MODEL)  # its own copy: the template changes
    tokenizer.chat_template = QWEN36_TEMPLATE
    tokenizer._tokenizer.chat_template = QWEN36_TEMPLATE
    return model, tokenizer


def test_tool_call_round_trip(qwen36):
    model, tokenizer = qwen36
    answer = "Let me check.\n</think>\n\n" + QWEN_XML_CALL
    generator = ScriptedGenerator(tokenizer.encode(answer, add_special_tokens=False))
    running = start(model, tokenizer, generator=generator)
    try:
        client = running.client()
        question = user("Weather in Paris?")
        r = client.chat.completions.create(model=MODEL, messages=question, tools=[TYPED_WEATHER])
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and message.content is None
        assert message.model_extra["reasoning_content"] == "Let me check."
        (call,) = message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris",
                                                                                               "days": 3}
        # Streamed: the same call as a tool_calls delta, reasoning apart from content.
        chunks = list(client.chat.completions.create(model=MODEL, messages=question, tools=[TYPED_WEATHER],
                                                     stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert [(tc.index, tc.function.name) for tc in streamed if tc.function.name] == [(0, "get_weather")]
        assert "".join(tc.function.arguments or "" for tc in streamed) == call.function.arguments
        assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Let me check."
        assert not "".join(d.content or "" for d in deltas)
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # The client sends the call and its result back: the template renders both.
        history = question + [message.model_dump(exclude_none=True),
                              {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}]
        client.chat.completions.create(model=MODEL, messages=history, tools=[TYPED_WEATHER])
        rendered = tokenizer.decode(generator.prompts[-1])
        assert "<parameter=city>\nParis\n</parameter>" in rendered and "<parameter=days>\n3\n</parameter>" in rendered
        assert "<tool_response>\nsunny, 21C\n</tool_response>" in rendered and '"name": "get_weather"' in rendered
        # tool_choice "none": no tools in the prompt, markup left as text.
        r = client.chat.completions.create(model=MODEL, messages=question, tools=[TYPED_WEATHER], tool_choice="none")
        assert "<tools>" not in tokenizer.decode(generator.prompts[-1])
        assert r.choices[0].message.tool_calls is None and "<tool_call>" in r.choices[0].message.content
    finally:
        running.stop()


@pytest.mark.parametrize("fmt", ["qwen", "gemma4"])
def test_streamed_tool_call_arguments_with_the_openai_client(qwen36, fmt):
    """Through the server and the official client: the call's first chunk
    names it, later chunks carry only argument pieces (many, as the model
    writes them), and they join to the non-streamed reply's arguments."""
    model, tokenizer = qwen36
    city = LONG_CITY
    if fmt == "qwen":
        answer = "Let me check.\n</think>\n\n" + QWEN_XML_CALL.replace("Paris", city)
    else:  # a Gemma 4 template and vocabulary: the server reads Gemma 4's markup
        hf, tokenizer = _tokenizers(GEMMA4_TEMPLATE, gemma=True)
        city = city.replace("é", "e")  # the fixture's char-level vocabulary is ASCII
        answer = GEMMA4_CALL.replace("Paris", city)
        hf.add_tokens(sorted({c for c in answer if hf.decode(hf.encode(c, add_special_tokens=False)) != c}))
    generator = ScriptedGenerator(tokenizer.encode(answer, add_special_tokens=False), per_step=2)
    running = start(model, tokenizer, generator=generator)
    try:
        client = running.client()
        question = user("Weather in Paris?")
        whole = client.chat.completions.create(model=MODEL, messages=question, tools=[TYPED_WEATHER])
        (call,) = whole.choices[0].message.tool_calls
        assert json.loads(call.function.arguments) == {"city": city, "days": 3}
        chunks = list(client.chat.completions.create(model=MODEL, messages=question, tools=[TYPED_WEATHER],
                                                     stream=True))
        streamed = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        first, rest = streamed[0], streamed[1:]
        assert (first.index, first.id, first.type, first.function.name) == (0, first.id, "function", "get_weather")
        assert first.id.startswith("call_") and first.function.arguments == ""
        assert all(tc.index == 0 and tc.id is None and tc.function.name is None for tc in rest)
        assert len(rest) > 10  # piece by piece, not one delta at the end
        assert "".join(tc.function.arguments for tc in rest) == call.function.arguments
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
    finally:
        running.stop()


def test_thinking_follows_the_template_and_chat_template_kwargs(qwen36):
    model, tokenizer = qwen36
    generator = ScriptedGenerator(tokenizer.encode("Fine.", add_special_tokens=False))
    running = start(model, tokenizer, generator=generator)
    try:
        client = running.client()
        r = client.chat.completions.create(model=MODEL, messages=user("hi"))
        assert tokenizer.decode(generator.prompts[-1]).endswith("<think>\n")  # the template's default
        assert r.choices[0].message.model_extra.get("reasoning_content") == "Fine."
        r = client.chat.completions.create(model=MODEL, messages=user("hi"),
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
        assert tokenizer.decode(generator.prompts[-1]).endswith("</think>\n\n")
        assert r.choices[0].message.content == "Fine."
        # A request's num_draft reaches its own row; without one the server's -k applies.
        client.chat.completions.create(model=MODEL, messages=user("hi"), extra_body={"num_draft": 2})
        client.completions.create(model=MODEL, prompt="hi", extra_body={"num_draft": "auto"})
        assert generator.num_drafts[-3:] == [None, 2, "auto"]
        with pytest.raises(openai.BadRequestError):  # a name the renderer sets itself
            client.chat.completions.create(model=MODEL, messages=user("hi"),
                                           extra_body={"chat_template_kwargs": {"tools": []}})
    finally:
        running.stop()


# -- the command --------------------------------------------------------------------------


def test_cli_serve_answers_and_shuts_down_cleanly_on_sigterm():
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "mlx_mtp.cli", "serve", "-m", MODEL, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            assert process.poll() is None and time.time() < deadline, process.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        assert client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=4).choices
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode in (0, -signal.SIGTERM), err
    assert "Finished server process" in err and "Traceback" not in err
