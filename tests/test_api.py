"""Python API end to end on a tiny model directory (weights + tokenizer)."""

import mlx_mtp
from mlx_mtp import PromptCache


def test_generate_and_stream_agree(tiny_model_dir):
    model, tokenizer = mlx_mtp.load(tiny_model_dir)
    assert model.drafter is not None and model.drafter.name == "mtp"
    # A fixed k: `auto` may park on a tiny model, where drafting cannot pay.
    text = mlx_mtp.generate(model, tokenizer, "def fib(n):", max_tokens=40, num_draft=3)
    pieces = list(mlx_mtp.stream_generate(model, tokenizer, "def fib(n):", max_tokens=40, num_draft=3))
    assert "".join(p.text for p in pieces) == text
    tokens = [t for p in pieces for t in p.tokens]
    assert tokenizer.decode(tokens) == text
    plain = mlx_mtp.generate(model, tokenizer, "def fib(n):", max_tokens=40, num_draft=0)
    assert plain == text
    stats = pieces[-1].stats
    assert stats.draft_tokens > 0 and sum(sum(p.from_draft) for p in pieces) == stats.accepted_tokens


def test_stop_strings_never_leak(tiny_model_dir):
    model, tokenizer = mlx_mtp.load(tiny_model_dir)
    full = mlx_mtp.generate(model, tokenizer, "hello", max_tokens=60, chat_template=False)
    assert len(full) > 12
    stop = full[8:11]
    cut = mlx_mtp.generate(model, tokenizer, "hello", max_tokens=60, chat_template=False, stop=[stop])
    assert cut == full[: full.index(stop)]
    last = list(mlx_mtp.stream_generate(model, tokenizer, "hello", max_tokens=60, chat_template=False, stop=[stop]))[-1]
    assert last.finish_reason == "stop"


def test_chat_history_with_prompt_cache(tiny_model_dir):
    model, tokenizer = mlx_mtp.load(tiny_model_dir)
    cache = PromptCache()
    history = [{"role": "user", "content": "hi"}]
    first = list(mlx_mtp.stream_generate(model, tokenizer, history, max_tokens=12, prompt_cache=cache,
                                         enable_thinking=False))
    history += [{"role": "assistant", "content": "".join(p.text for p in first)},
                {"role": "user", "content": "more"}]
    second = list(mlx_mtp.stream_generate(model, tokenizer, history, max_tokens=12, prompt_cache=cache,
                                          enable_thinking=False))
    # Whether or not the re-rendered history extends the cached tokens, the
    # answer is the one a fresh run gives.
    fresh = mlx_mtp.generate(model, tokenizer, history, max_tokens=12, enable_thinking=False)
    assert "".join(p.text for p in second) == fresh


def test_lone_surrogates_become_replacement_characters_with_a_warning(tiny_model_dir):
    # What Python makes of undecodable bytes (os.fsdecode, surrogateescape)
    # must not reach the tokenizer, which raises TypeError on it.
    import pytest

    model, tokenizer = mlx_mtp.load(str(tiny_model_dir))
    with pytest.warns(UserWarning, match="lone surrogates"):
        ids = mlx_mtp.api.build_prompt(tokenizer, "def f(\udcff):")
    assert ids == mlx_mtp.api.build_prompt(tokenizer, "def f(\ufffd):")
    with pytest.warns(UserWarning, match="lone surrogates"):
        chat = mlx_mtp.api.build_prompt(tokenizer, [{"role": "user", "content": "x\ud800y"}])
    assert chat == mlx_mtp.api.build_prompt(tokenizer, [{"role": "user", "content": "x\ufffdy"}])
    with pytest.warns(UserWarning, match="lone surrogates"):
        out = mlx_mtp.generate(model, tokenizer, "a\udcffb", max_tokens=4, num_draft=2)
    assert isinstance(out, str)
