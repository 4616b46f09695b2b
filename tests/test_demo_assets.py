"""The bundled demo checkpoint (assets/demo-qwen) loads through the real code
path, drafts with real acceptance, and stays lossless under greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest

import mlx_mtp

DEMO_QWEN = Path(__file__).resolve().parent.parent / "assets" / "demo-qwen"

pytestmark = pytest.mark.skipif(
    not (DEMO_QWEN / "model.safetensors").exists(), reason="assets/demo-qwen is not built"
)

CODE = (
    "class Foo(Bar):\n"
    "    def __init__(self, x=1, *args, **kw):\n"
    "        \"\"\"Docstring  with  double  spaces.\"\"\"\n"
    "\tif x:  # tab-indented\n"
    "            return {'k': [1, 2.5e-3, None]}  \n"
    "\n\n\n"
    "print(f\"héllo ✓ {x!r:>10}\")\n"
)


@pytest.fixture(scope="module")
def demo():
    return mlx_mtp.load(DEMO_QWEN)


def test_demo_has_mtp_head_and_eos(demo):
    model, tokenizer = demo
    assert model.drafter is not None and model.drafter.name == "mtp"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer.eos_token_ids


def test_demo_tokenizer_round_trips_code(demo):
    from tokenizers import Tokenizer

    _, tokenizer = demo
    ids = tokenizer.encode(CODE, add_special_tokens=False)
    assert tokenizer.decode(ids) == CODE
    # Same ids as the tokenizer.json the training script wrote.
    assert ids == Tokenizer.from_file(str(DEMO_QWEN / "tokenizer.json")).encode(CODE).ids
    detok = tokenizer.detokenizer
    detok.reset()
    for i in ids:
        detok.add_token(i)
    detok.finalize()
    assert detok.text == CODE


def test_demo_chat_template(demo):
    _, tokenizer = demo
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "def f(x):"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|im_start|>user\ndef f(x):<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    "prompt, chat",
    [("def fibonacci(n):", True), ("import os\n\n\ndef main(argv):\n", False), ("class Stack:\n    def push(self, item):\n", False)],
)
def test_demo_speculative_equals_plain(demo, prompt, chat):
    model, tokenizer = demo

    def run(k):
        tokens = []
        for r in mlx_mtp.stream_generate(model, tokenizer, prompt, num_draft=k, max_tokens=40, chat_template=chat):
            tokens += list(r.tokens)
        return tokens, r.stats

    plain, _ = run(0)
    drafted, stats = run(3)
    assert drafted == plain
    assert stats.draft_tokens > 0 and stats.accepted_tokens > 0
    assert stats.tokens_per_pass > 1.0
