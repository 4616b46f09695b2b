"""Chat template arguments: the thinking default, tools, tool messages and
template keyword arguments, on every front end (API, ChatSession, CLI).

The repository ships no real Qwen3.5/3.6 or Gemma 4 chat template (the demo
models have a small ChatML one), so QWEN36_TEMPLATE and GEMMA4_TEMPLATE below
are tiny fixtures written to reproduce the published templates' behaviour
that matters here, not copies of them:

- Qwen3.5/3.6: the generation prompt opens "<think>\\n" unless
  `enable_thinking is defined and enable_thinking is false` (then an empty
  think block); tools are declared as JSON in <tools> in the system turn;
  assistant tool_calls render as <tool_call><function=NAME><parameter=...>;
  "tool" messages render as <tool_response> inside a user turn; past
  assistant reasoning is dropped unless `preserve_thinking` (Qwen3.6).
- Gemma 4: `<|think|>` is written into a system turn only when
  `enable_thinking` is true; the generation prompt is "<|turn>model\\n" plus,
  when thinking is off (`not enable_thinking | default(false)`), an empty
  thought channel; tools are declared as <|tool>declaration:NAME...<tool|>
  in the system turn.

Every rendering is also compared with what transformers' own
apply_chat_template renders from the same template.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import mlx_mtp
from mlx_mtp.api import build_prompt
from mlx_mtp.chat_session import ChatSession, Message
from mlx_mtp.cli import main
from mlx_mtp.options import GenerationOptions
from mlx_mtp.templates import apply_template, parse_template_arg

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY = ASSETS / "tiny-qwen35"

QWEN36_TEMPLATE = """
{%- if tools -%}
{{- '<|im_start|>system\\n' -}}
{%- if messages[0].role == 'system' -%}{{- messages[0].content + '\\n\\n' -}}{%- endif -%}
{{- '# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>' -}}
{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}
{{- '\\n</tools><|im_end|>\\n' -}}
{%- elif messages[0].role == 'system' -%}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}
{%- endif -%}
{%- set ns = namespace(last_query_index=-1) -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}{%- set ns.last_query_index = loop.index0 -%}{%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}
{{- '<|im_start|>user\\n' + message.content + '<|im_end|>\\n' -}}
{%- elif message.role == 'assistant' -%}
{%- set content = message.content or '' -%}
{%- set reasoning = message.reasoning_content or '' -%}
{%- if reasoning and (preserve_thinking is defined and preserve_thinking or loop.index0 > ns.last_query_index) -%}
{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content -}}
{%- else -%}
{{- '<|im_start|>assistant\\n' + content -}}
{%- endif -%}
{%- for tool_call in message.tool_calls or [] -%}
{%- set call = tool_call.function if tool_call.function is defined else tool_call -%}
{{- '\\n\\n<tool_call>\\n<function=' + call.name + '>\\n' -}}
{%- for name, value in call.arguments | items -%}
{{- '<parameter=' + name + '>\\n' + (value if value is string else value | tojson) + '\\n</parameter>\\n' -}}
{%- endfor -%}
{{- '</function>\\n</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' -}}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}
{%- else -%}{{- '<think>\\n' -}}{%- endif -%}
{%- endif -%}
"""

GEMMA4_TEMPLATE = """
{{- bos_token -}}
{%- set loop_messages = messages -%}
{%- if (enable_thinking is defined and enable_thinking) or tools or messages[0]['role'] in ['system', 'developer'] -%}
{{- '<|turn>system\\n' -}}
{%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}
{%- if messages[0]['role'] in ['system', 'developer'] -%}
{{- messages[0]['content'] | trim -}}
{%- set loop_messages = messages[1:] -%}
{%- endif -%}
{%- for tool in tools or [] -%}
{{- '<|tool>declaration:' + tool['function']['name'] + '{description:<|"|>' + tool['function']['description'] + '<|"|>}<tool|>' -}}
{%- endfor -%}
{{- '<turn|>\\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
{{- '<|turn>' + role + '\\n' + (message['content'] | trim) + '<turn|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|turn>model\\n' -}}
{%- if not enable_thinking | default(false) -%}{{- '<|channel>thought\\n<channel|>' -}}{%- endif -%}
{%- endif -%}
"""

# Gemma 4's control tokens; "<|channel>" / "<channel|>" are what make mlx-lm
# think the vocabulary has a thinking mode.
GEMMA4_SPECIALS = ["<bos>", "<|turn>", "<turn|>", "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>"]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "sunny, 21C", "tool_call_id": "call0"},
]
HI = [{"role": "user", "content": "hi"}]


def _tokenizers(template: str, gemma: bool = False):
    """(HF tokenizer, mlx-lm TokenizerWrapper) over the tiny char-level
    tokenizer with `template`."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    from mlx_mtp.testing import ENDOFTEXT, EOS_TOKEN, build_tokenizer

    tok = build_tokenizer()
    if gemma:
        tok.add_special_tokens(GEMMA4_SPECIALS)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=ENDOFTEXT,
                                 bos_token="<bos>" if gemma else None, chat_template=template,
                                 clean_up_tokenization_spaces=False)
    return hf, TokenizerWrapper(hf)


def _reference(hf, messages, thinking=None, **kwargs) -> str:
    """What transformers renders: enable_thinking passed only when set."""
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    return hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)


@pytest.fixture(scope="module")
def qwen():
    return _tokenizers(QWEN36_TEMPLATE)


@pytest.fixture(scope="module")
def gemma():
    return _tokenizers(GEMMA4_TEMPLATE, gemma=True)


@pytest.fixture(scope="module")
def tiny():
    """The bundled random-weight Qwen3.5 with the Qwen3.6 fixture template."""
    model, tokenizer = mlx_mtp.load(TINY)
    tokenizer.chat_template = QWEN36_TEMPLATE
    return model, tokenizer


# -- the thinking default (issue 11 item 2) -------------------------------


@pytest.mark.parametrize("thinking", [None, True, False])
def test_qwen_thinking_matches_transformers(qwen, thinking):
    hf, wrapper = qwen
    text = apply_template(wrapper, HI, enable_thinking=thinking)
    assert text == _reference(hf, HI, thinking)
    # Qwen3.5/3.6 think unless told not to.
    expected = "<think>\n\n</think>\n\n" if thinking is False else "<think>\n"
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" + expected


@pytest.mark.parametrize("thinking", [None, True, False])
def test_gemma_thinking_matches_transformers(gemma, thinking):
    hf, wrapper = gemma
    text = apply_template(wrapper, HI, enable_thinking=thinking)
    assert text == _reference(hf, HI, thinking)
    if thinking:
        assert text == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nhi<turn|>\n<|turn>model\n"
    else:  # unset is Gemma 4's own default: no thinking
        assert text == "<bos><|turn>user\nhi<turn|>\n<|turn>model\n<|channel>thought\n<channel|>"


def test_mlx_lm_wrapper_default_turns_gemma_thinking_on(gemma):
    # Why the renderer bypasses the wrapper when thinking is unset: its
    # default passes enable_thinking=True for this vocabulary.
    hf, wrapper = gemma
    assert wrapper.has_thinking
    assert "<|think|>" in wrapper.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("thinking", [None, True, False])
def test_every_front_end_renders_gemma_alike(tiny, gemma, thinking):
    hf, wrapper = gemma
    expected = wrapper.encode(_reference(hf, HI, thinking), add_special_tokens=False)
    assert build_prompt(wrapper, "hi", enable_thinking=thinking) == expected
    assert build_prompt(wrapper, HI, enable_thinking=thinking) == expected
    session = ChatSession(tiny[0], wrapper, enable_thinking=thinking)
    assert session.prompt_for("hi") == expected
    assert session.opens_thinking is False


# -- tools, tool messages, template arguments (issue 11 item 9) -----------


def test_tools_are_declared_in_the_prompt(qwen, gemma):
    hf, wrapper = qwen
    text = apply_template(wrapper, HI, tools=[WEATHER])
    assert text == _reference(hf, HI, tools=[WEATHER])
    assert json.dumps(WEATHER) in text and text.startswith("<|im_start|>system\n# Tools")

    hf, wrapper = gemma
    text = apply_template(wrapper, HI, tools=[WEATHER])
    assert text == _reference(hf, HI, tools=[WEATHER])
    assert '<|tool>declaration:get_weather{description:<|"|>Current weather in a city<|"|>}<tool|>' in text
    assert "<|think|>" not in text  # tools open the system turn, not thinking


def test_tool_calls_and_tool_results_render(qwen):
    hf, wrapper = qwen
    text = apply_template(wrapper, TOOL_TURNS, tools=[WEATHER])
    assert text == _reference(hf, TOOL_TURNS, tools=[WEATHER])
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>" in text
    assert text.endswith("<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n<think>\n")
    # The API takes the same history.
    assert build_prompt(wrapper, TOOL_TURNS, tools=[WEATHER]) == wrapper.encode(text, add_special_tokens=False)


def test_template_kwargs_reach_the_template(qwen):
    hf, wrapper = qwen
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b", "reasoning_content": "old thought"},
        {"role": "user", "content": "c"},
    ]
    dropped = apply_template(wrapper, history)
    kept = apply_template(wrapper, history, template_kwargs={"preserve_thinking": True})
    assert "old thought" not in dropped and "<think>\nold thought\n</think>" in kept
    assert kept == _reference(hf, history, preserve_thinking=True)
    # An explicit enable_thinking wins over one among the template arguments.
    both = apply_template(wrapper, HI, enable_thinking=True, template_kwargs={"enable_thinking": False})
    assert both.endswith("<think>\n") and not both.endswith("</think>\n\n")
    assert apply_template(wrapper, HI, template_kwargs={"enable_thinking": False}).endswith("</think>\n\n")


def test_options_check_template_arguments():
    options = GenerationOptions(tools=[WEATHER], chat_template_kwargs={"reasoning_effort": "high"})
    assert options.tools == (WEATHER,) and hash(options) == hash(GenerationOptions())
    assert GenerationOptions.make(tools=[]).tools is None
    for bad in ({"tools": []}, {"add_generation_prompt": False}, {"not a name": 1}):
        with pytest.raises(ValueError):
            GenerationOptions(chat_template_kwargs=bad)
    for bad in ({"name": "f"}, ["f"]):
        with pytest.raises(ValueError, match="list of JSON objects"):
            GenerationOptions(tools=bad)
    assert parse_template_arg("preserve_thinking=true") == ("preserve_thinking", True)
    assert parse_template_arg("reasoning_effort=high") == ("reasoning_effort", "high")
    assert parse_template_arg('budget={"max": 3}') == ("budget", {"max": 3})
    assert parse_template_arg("note=a=b") == ("note", "a=b")


def test_api_passes_tools_and_kwargs(tiny):
    model, tokenizer = tiny
    plain = build_prompt(tokenizer, "hi")
    with_tools = build_prompt(tokenizer, "hi", tools=[WEATHER])
    assert len(with_tools) > len(plain)
    # generate() takes them as options; greedy decoding of that prompt.
    text = mlx_mtp.generate(model, tokenizer, "hi", tools=[WEATHER], max_tokens=8)
    assert text == mlx_mtp.generate(model, tokenizer, with_tools, max_tokens=8)
    last = list(mlx_mtp.stream_generate(model, tokenizer, "hi", chat_template_kwargs={"enable_thinking": False},
                                        max_tokens=4))[-1]
    assert last.stats.prompt_tokens == len(build_prompt(tokenizer, "hi", enable_thinking=False))


def test_chat_session_tool_turn_extends_the_cached_tokens(tiny):
    model, tokenizer = tiny
    session = ChatSession(model, tokenizer, tools=[WEATHER], max_tokens=8)
    first = session.send("Weather in Paris?")
    assert "get_weather" in tokenizer.decode(session.tokens[: first.prompt_tokens])
    history = list(session.tokens)
    prompt = session.prompt_for(Message("tool", "sunny"))
    assert prompt[: len(history)] == history
    assert tokenizer.decode(prompt[len(history):]).startswith(
        "<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>")
    second = session.send({"role": "tool", "content": "sunny", "tool_call_id": "call0"})
    assert second.prompt_tokens == len(prompt)
    assert [m.role for m in session.messages] == ["user", "assistant", "tool", "assistant"]
    assert session.messages[2].as_chat() == {"role": "tool", "content": "sunny", "tool_call_id": "call0"}
    with pytest.raises(ValueError):
        session.send({"role": "assistant", "content": "x"})


def test_chat_session_loads_tool_messages(tiny, tmp_path):
    model, tokenizer = tiny
    path = tmp_path / "tools.json"
    path.write_text(json.dumps({"messages": TOOL_TURNS + [{"role": "assistant", "content": "Sunny."}],
                                "settings": {"tools": [WEATHER]}}))
    session = ChatSession(model, tokenizer)
    session.load(path)
    assert session.options.tools == (WEATHER,)
    assert session.tokens is None  # no saved tokens: re-encoded through the template
    assert session.messages[1].extra == {"tool_calls": [CALL]} and session.messages[1].content == ""
    chat = [m.as_chat() for m in session.messages] + [{"role": "user", "content": "Thanks"}]
    expected = tokenizer.encode(_reference(tokenizer._tokenizer, chat, tools=[WEATHER]), add_special_tokens=False)
    assert session.prompt_for("Thanks") == expected

    # Saved and loaded again, the tool messages and tools come back as they were.
    again = ChatSession(model, tokenizer, model_id=session.model_id)
    again.load(session.save(tmp_path / "again.json"))
    assert [m.as_chat() for m in again.messages] == [m.as_chat() for m in session.messages]
    assert again.options.tools == (WEATHER,)

    for bad in ([{"role": "tool", "content": None}], [{"role": "user", "content": "x", "tool_calls": [CALL]}],
                [{"role": "assistant", "content": "x", "tool_calls": "f"}], [{"role": "robot", "content": "x"}]):
        path.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match="message 0"):
            session.load(path)
    assert len(session.messages) == 4  # a failed load changes nothing


# -- the CLI -----------------------------------------------------------------


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _json(*args) -> dict:
    result = _run("generate", "--json", "-n", 12, *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """The bundled demo-qwen with the Qwen3.6 fixture template."""
    path = tmp_path_factory.mktemp("demo") / "demo-qwen"
    shutil.copytree(ASSETS / "demo-qwen", path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN36_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_cli_greedy_output_unchanged_without_template_args():
    # The bundled demo, as before this change: the prompt mlx-lm's wrapper
    # renders, sent as raw text so both runs sample alike whatever the CLI's
    # sampling defaults are.
    model, tokenizer = mlx_mtp.load("demo-qwen")
    old = tokenizer.apply_chat_template([{"role": "user", "content": "def fibonacci(n):"}],
                                        add_generation_prompt=True, tokenize=False)
    assert build_prompt(tokenizer, "def fibonacci(n):") == tokenizer.encode(old, add_special_tokens=False)
    out = _json("--temp", 0, "def fibonacci(n):")
    before = _json("--temp", 0, "--no-chat-template", old)
    assert out["stats"]["prompt_tokens"] == before["stats"]["prompt_tokens"]
    assert out["tokens"] == before["tokens"] and out["text"] == before["text"]
    # The library, greedy by default, agrees.
    assert mlx_mtp.generate(model, tokenizer, "def fibonacci(n):", max_tokens=12) == \
        mlx_mtp.generate(model, tokenizer, tokenizer.encode(old, add_special_tokens=False), max_tokens=12)


def test_cli_tools_and_template_args_reach_the_prompt(demo_dir, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    tokenizer = mlx_mtp.load(demo_dir)[1]
    plain = _json("-m", demo_dir, "hi")
    assert plain["stats"]["prompt_tokens"] == len(build_prompt(tokenizer, "hi"))
    with_tools = _json("-m", demo_dir, "--tools", tools, "hi")
    assert with_tools["stats"]["prompt_tokens"] == len(build_prompt(tokenizer, "hi", tools=[WEATHER]))
    # VALUE is JSON: false is the boolean, which the template tests with `is false`.
    off = _json("-m", demo_dir, "--template-arg", "enable_thinking=false", "--template-arg", "x=1", "hi")
    assert off["stats"]["prompt_tokens"] == len(build_prompt(tokenizer, "hi", enable_thinking=False))
    assert off["stats"]["prompt_tokens"] != plain["stats"]["prompt_tokens"]


@pytest.mark.parametrize("content, fragment", [
    (None, "no such file"),
    ("[{", "not valid JSON"),
    ('{"name": "f"}', "list of JSON objects"),
    ('["f"]', "list of JSON objects"),
])
def test_cli_bad_tools_file_is_one_line(tmp_path, content, fragment):
    path = tmp_path / "tools.json"
    if content is not None:
        path.write_text(content)
    result = _run("generate", "--tools", path, "hi")
    assert result.exit_code == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert "--tools" in lines[0]


@pytest.mark.parametrize("arg", ["novalue", "=3", "tools=[]", "add_generation_prompt=false"])
def test_cli_bad_template_arg_is_one_line(arg):
    result = _run("generate", "--template-arg", arg, "hi")
    assert result.exit_code == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--template-arg" in lines[0], result.stderr
