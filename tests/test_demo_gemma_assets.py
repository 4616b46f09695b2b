"""The bundled Gemma 4 demo pair (assets/demo-gemma + its assistant) loads
through the real code path, drafts with real acceptance, and stays lossless
under greedy decoding."""

from __future__ import annotations

from pathlib import Path

import pytest

import mlx_mtp

DEMO_GEMMA = Path(__file__).resolve().parent.parent / "assets" / "demo-gemma"
ASSISTANT = DEMO_GEMMA / "assistant"

pytestmark = pytest.mark.skipif(
    not ((DEMO_GEMMA / "model.safetensors").exists() and (ASSISTANT / "model.safetensors").exists()),
    reason="assets/demo-gemma is not built",
)


@pytest.fixture(scope="module")
def demo():
    return mlx_mtp.load(DEMO_GEMMA, drafter=str(ASSISTANT))


def test_demo_gemma_pairs_with_its_assistant(demo):
    model, tokenizer = demo
    assert model.drafter is not None and model.drafter.name == "gemma4-assistant"
    assert model.drafter.default_num_draft >= 1 and model.default_num_draft == "auto"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in tokenizer.eos_token_ids


@pytest.mark.parametrize(
    "prompt, chat",
    [("def fibonacci(n):", True), ("import os\n\n\ndef main(argv):\n", False)],
)
def test_demo_gemma_speculative_equals_plain(demo, prompt, chat):
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


def test_demo_gemma_by_name_finds_its_bundled_assistant():
    # `-m demo-gemma` alone: the assistant/ folder inside the model is used.
    model, _ = mlx_mtp.load("demo-gemma")
    assert model.drafter is not None and model.drafter.name == "gemma4-assistant"
