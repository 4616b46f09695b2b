"""Lossless contract of the draft/verify loop with the Qwen3.5 MTP head.

Greedy: speculative output is token-identical to plain decoding (and to
mlx-lm's own generate_step). Rollback: after a speculative run every cache
equals the cache that plain decoding of the same tokens leaves.
"""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step

import tiny
from mlx_mtp import Stats, decode
from mlx_mtp.drafters import MTPDrafter

PROMPTS = [[5], [5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46, 47], list(range(2, 30)), [88, 3, 3, 3, 71]]


@pytest.fixture(scope="module", params=["dense", "moe"])
def model(request):
    # noise=1.6: the head is right about half of the time, so accepted
    # lengths 0..k all occur and every rollback depth is exercised.
    return tiny.build(tiny.text_config(moe=request.param == "moe"), seed=3, predictable=True, noise=1.6)


def run(model, prompt, k, max_tokens=48, eos=(), cache=None, drafter=None):
    stats = Stats()
    if drafter is None and k:
        drafter = MTPDrafter(model)
    tokens, from_draft = [], []
    for cycle in decode(
        model, prompt, drafter=drafter, num_draft=k, max_tokens=max_tokens,
        eos_token_ids=eos, stats=stats, cache=cache,
    ):
        tokens += cycle.tokens
        from_draft += cycle.from_draft
    return tokens, from_draft, stats


def test_plain_decoding_matches_mlx_lm(model):
    for prompt in PROMPTS[:3]:
        ours, _, _ = run(model, prompt, k=0, max_tokens=24)
        ref = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=24)]
        assert ours == ref


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_greedy_speculative_equals_plain(model, k):
    accepted = drafted = 0
    for prompt in PROMPTS:
        plain, _, _ = run(model, prompt, k=0)
        spec, from_draft, stats = run(model, prompt, k=k)
        assert spec == plain, f"k={k} prompt={prompt}"
        assert stats.host_syncs_per_cycle == 1.0
        assert stats.generated_tokens == len(spec)
        assert sum(from_draft) == stats.accepted_tokens
        accepted += stats.accepted_tokens
        drafted += stats.draft_tokens
    # The run must contain both acceptances and rejections to mean anything.
    assert 0 < accepted < drafted


def test_accepted_lengths_cover_every_depth(model):
    k = 4
    seen = set()
    for prompt in PROMPTS:
        for cycle in decode(model, prompt, drafter=MTPDrafter(model), num_draft=k, max_tokens=64):
            if cycle.drafted:
                seen.add(cycle.accepted)
    assert seen == set(range(k + 1)), seen


def test_long_generation_many_rollbacks(model):
    prompt = PROMPTS[1]
    plain, _, _ = run(model, prompt, k=0, max_tokens=300)
    spec, _, stats = run(model, prompt, k=3, max_tokens=300)
    assert spec == plain
    assert len(spec) == 300
    rejected_cycles = stats.target_passes - stats.accepted_per_position[-1]
    assert rejected_cycles > 20  # many partial rollbacks of GDN and KV state


@pytest.mark.parametrize("k", [1, 3, 6])
def test_eos_mid_cycle(model, k):
    prompt = PROMPTS[1]
    plain, _, _ = run(model, prompt, k=0, max_tokens=64)
    # Every token of the plain run as EOS in turn: the stop must land at the
    # same place whether that token was drafted, a bonus, or the first one.
    for stop_at in range(0, 40, 3):
        eos = [plain[stop_at]]
        expected = plain[: plain.index(eos[0])]
        spec, _, stats = run(model, prompt, k=k, max_tokens=64, eos=eos)
        assert spec == expected
        assert stats.finish_reason == "stop"


def test_max_tokens_is_exact(model):
    for max_tokens in (1, 2, 5, 17):
        spec, _, stats = run(model, PROMPTS[2], k=4, max_tokens=max_tokens)
        assert len(spec) == max_tokens
        assert stats.finish_reason == "length"


def _cache_arrays(c):
    if hasattr(c, "cache"):  # Gated-DeltaNet: conv state, recurrent state
        return [np.array(x) for x in c.cache]
    return [np.array(c.keys[..., : c.offset, :]), np.array(c.values[..., : c.offset, :])]


@pytest.mark.parametrize("k", [2, 5])
def test_rollback_leaves_plain_caches(model, k):
    prompt = PROMPTS[3]
    spec_cache, plain_cache = model.make_cache(), model.make_cache()
    drafter = MTPDrafter(model)
    spec, _, stats = run(model, prompt, k=k, max_tokens=40, cache=spec_cache, drafter=drafter)
    plain, _, _ = run(model, prompt, k=0, max_tokens=40, cache=plain_cache)
    assert spec == plain and stats.accepted_tokens < stats.draft_tokens
    for a, b in zip(spec_cache, plain_cache):
        for x, y in zip(_cache_arrays(a), _cache_arrays(b)):
            assert x.shape == y.shape
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)

    # The head's own cache equals a fresh head run over the same
    # (next token, target hidden) pairs: prompt + generated tokens.
    sequence = prompt + spec
    hidden = model.hidden(mx.array(sequence[:-1])[None])
    ref_cache = model.make_mtp_cache()
    model.mtp(model.embed(mx.array(sequence[1:])[None]), hidden, ref_cache)
    for a, b in zip(drafter.cache, ref_cache):
        assert a.offset == b.offset == len(sequence) - 1
        for x, y in zip(_cache_arrays(a), _cache_arrays(b)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def test_prefill_in_chunks_matches_one_shot(model):
    prompt = list(range(2, 60))
    whole, _, _ = run(model, prompt, k=3)
    stats = Stats()
    chunked = [
        t
        for c in decode(model, prompt, drafter=MTPDrafter(model), num_draft=3, max_tokens=48,
                        prefill_step_size=7, stats=stats)
        for t in c.tokens
    ]
    assert chunked == whole


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_cache_prefills_only_new_tokens(model, k):
    from mlx_mtp.engine import PromptCache

    drafter = MTPDrafter(model)
    pc = PromptCache()
    history = [5, 17, 33, 2]
    for turn, (extra, num_draft) in enumerate([([9, 11], k), ([40, 41, 42], 0), ([7], k), ([8, 9], 3)]):
        prompt = history + extra
        stats = Stats()
        out = [t for c in decode(model, prompt, drafter=drafter, num_draft=num_draft, max_tokens=20,
                                 stats=stats, prompt_cache=pc) for t in c.tokens]
        fresh, _, _ = run(model, prompt, k=num_draft, max_tokens=20)
        assert out == fresh, turn
        # Turn 1 pre-fills the prompt; later turns only what is new since the
        # last cached token (the last sampled token plus the new tokens).
        expected = len(prompt) if turn == 0 else len(prompt) - len(cache_tokens)
        assert stats.prefilled_tokens == expected
        cache_tokens = list(pc.tokens)
        assert cache_tokens == prompt + out[:-1]
        history = prompt + out


def test_prompt_cache_falls_back_when_history_differs(model):
    from mlx_mtp.engine import PromptCache

    pc = PromptCache()
    drafter = MTPDrafter(model)
    list(decode(model, [5, 17, 33, 2], drafter=drafter, num_draft=3, max_tokens=10, prompt_cache=pc))
    other = [6, 17, 33, 2, 9, 9]  # not an extension of the cached tokens
    stats = Stats()
    out = [t for c in decode(model, other, drafter=drafter, num_draft=3, max_tokens=10, stats=stats,
                             prompt_cache=pc) for t in c.tokens]
    assert stats.prefilled_tokens == len(other)
    assert out == run(model, other, k=3, max_tokens=10)[0]


@pytest.mark.parametrize("k", [0, 4])
def test_prompt_cache_after_eos_mid_cycle(model, k):
    from mlx_mtp.engine import PromptCache

    prompt = [5, 17, 33, 2]
    plain, _, _ = run(model, prompt, k=0, max_tokens=30)
    eos = plain[7]
    pc, drafter = PromptCache(), MTPDrafter(model)
    out = [t for c in decode(model, prompt, drafter=drafter, num_draft=k, max_tokens=30, eos_token_ids=[eos],
                             prompt_cache=pc) for t in c.tokens]
    assert out == plain[:7]
    assert pc.tokens == prompt + out  # EOS is the newest sampled token: not in the cache
    nxt = prompt + out + [eos, 12, 13]
    stats = Stats()
    again = [t for c in decode(model, nxt, drafter=drafter, num_draft=k, max_tokens=15, stats=stats,
                               prompt_cache=pc) for t in c.tokens]
    assert stats.prefilled_tokens == 3
    assert again == run(model, nxt, k=k, max_tokens=15)[0]


def test_no_explicit_eval_inside_the_cycle(model, monkeypatch):
    """Besides the one read of the packed result, the cycle never calls
    mx.eval: prefill evaluates once per chunk, decoding not at all."""
    calls = tiny.count_evals(monkeypatch)
    stats = Stats()
    tokens = [t for c in decode(model, PROMPTS[1], drafter=MTPDrafter(model), num_draft=3, max_tokens=40,
                                stats=stats, prefill_step_size=2) for t in c.tokens]
    prefill_chunks = (len(PROMPTS[1]) + 1) // 2
    assert len(tokens) == 40 and stats.target_passes > 5
    assert len(calls) == prefill_chunks
    assert stats.host_syncs == stats.target_passes
