"""Lossless contract with a draft length that changes from cycle to cycle.

`num_draft="auto"` lets the adaptive policy pick k each cycle, parking at
k = 0 (plain decoding, pipelined) and coming back. These tests drive the
engine with a scripted policy that jumps between 0 and k_max in a seeded
random order, so every transition (to and from 0, deep and shallow) runs
across Gated-DeltaNet and sliding-window rollbacks, then with the real
policy. Output must equal plain decoding token for token (greedy) and in
distribution (sampling), with one host sync per cycle.
"""

import random
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

import tiny
from mlx_mtp import SamplingParams, Stats, decode
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.drafters.gemma4_assistant import Gemma4AssistantDrafter
from mlx_mtp.engine import CATCH_UP_BATCH, PromptCache
from mlx_mtp.testing.gemma import WINDOW, assistant_config, build_assistant, build_target, text_config
from test_sampling import _exact_joint, chi_square_p_value


class ScriptedPolicy:
    """Draft lengths from a seeded sequence with long runs of k = 0 (longer
    than the catch-up batch) and abrupt jumps to every other length."""

    def __init__(self, k_max: int, seed: int = 0, zero_run: int = CATCH_UP_BATCH + 5):
        self.k_max = k_max
        rng = random.Random(seed)
        self.script = []
        while len(self.script) < 2000:
            if rng.random() < 0.3:
                self.script += [0] * rng.randint(1, zero_run)
            else:
                self.script += [rng.randint(0, k_max) for _ in range(rng.randint(1, 6))]
        self.i = 0
        self.updates = []

    def choose(self) -> int:
        k = self.script[self.i % len(self.script)]
        self.i += 1
        return k

    def update(self, k: int, accepted: int, seconds: float) -> None:
        self.updates.append((k, accepted))

    def reason(self):
        return None


@pytest.fixture(scope="module", params=["dense", "moe"])
def qwen(request):
    return tiny.build(tiny.text_config(moe=request.param == "moe"), seed=3, predictable=True, noise=1.6)


@pytest.fixture(scope="module")
def gemma():
    cfg = text_config("dense", tie_word_embeddings=False)
    target = build_target(cfg, seed=1, predictable=True)
    assistant = build_assistant(assistant_config(cfg, ordered=False), target, seed=1, predictable=True)
    return target, assistant


def tokens_of(model, prompt, drafter=None, max_tokens=200, **kw):
    stats = Stats()
    out = [t for c in decode(model, prompt, drafter=drafter, max_tokens=max_tokens, stats=stats, **kw)
           for t in c.tokens]
    return out, stats


def check_transitions(stats: Stats, policy: ScriptedPolicy) -> None:
    ks = [k for k, _ in policy.updates]
    to_zero = sum(1 for a, b in zip(ks, ks[1:]) if a > 0 and b == 0)
    from_zero = sum(1 for a, b in zip(ks, ks[1:]) if a == 0 and b > 0)
    assert to_zero >= 3 and from_zero >= 3, ks
    assert stats.host_syncs_per_cycle == 1.0
    assert 0 < stats.accepted_tokens < stats.draft_tokens  # acceptances and rejections
    assert sum(stats.k_histogram.values()) == stats.target_passes
    assert 0 < stats.parked_fraction < 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scripted_k_greedy_equals_plain_qwen(qwen, seed):
    prompt = [5, 17, 33, 2, 9]
    plain, _ = tokens_of(qwen, prompt, num_draft=0, max_tokens=300)
    policy = ScriptedPolicy(6, seed)
    spec, stats = tokens_of(qwen, prompt, MTPDrafter(qwen), num_draft="auto", policy=policy, max_tokens=300)
    assert spec == plain
    check_transitions(stats, policy)


@pytest.mark.parametrize("seed", [0, 1])
def test_scripted_k_greedy_equals_plain_gemma_sliding(gemma, seed):
    target, assistant = gemma
    prompt = list(range(3, 20))
    n = 12 * WINDOW  # many sliding-window wraps
    plain, _ = tokens_of(target, prompt, num_draft=0, max_tokens=n)
    policy = ScriptedPolicy(5, seed, zero_run=2 * WINDOW)
    spec, stats = tokens_of(target, prompt, Gemma4AssistantDrafter(assistant, target), num_draft="auto",
                            policy=policy, max_tokens=n)
    assert spec == plain
    check_transitions(stats, policy)


def test_auto_policy_greedy_equals_plain(qwen):
    for prompt in ([5], [40, 41, 42, 43], list(range(2, 40))):
        plain, _ = tokens_of(qwen, prompt, num_draft=0)
        spec, stats = tokens_of(qwen, prompt, MTPDrafter(qwen), num_draft="auto")
        assert spec == plain
        assert stats.num_draft == "auto" and stats.host_syncs_per_cycle == 1.0
        assert sum(stats.k_histogram.values()) == stats.target_passes


def test_auto_with_eos_and_max_tokens(qwen):
    prompt = [5, 17, 33, 2, 9]
    plain, _ = tokens_of(qwen, prompt, num_draft=0, max_tokens=120)
    for stop_at in (0, 5, 37, 90):
        eos = plain[stop_at]
        expected = plain[: plain.index(eos)]
        spec, stats = tokens_of(qwen, prompt, MTPDrafter(qwen), num_draft="auto",
                                policy=ScriptedPolicy(4, stop_at), max_tokens=120, eos_token_ids=[eos])
        assert spec == expected and stats.finish_reason == "stop"
    for n in (1, 2, 7, 66):
        spec, stats = tokens_of(qwen, prompt, MTPDrafter(qwen), num_draft="auto",
                                policy=ScriptedPolicy(4, n), max_tokens=n)
        assert spec == plain[:n] and stats.finish_reason == "length"


def test_catch_up_leaves_the_head_as_if_it_had_followed(qwen):
    """After a long parked stretch the head's cache holds every position,
    exactly as a drafter that observed each step would (batched catch-up)."""
    prompt = [5, 17, 33, 2, 9]

    class ParkThenDraft(ScriptedPolicy):
        def __init__(self):
            super().__init__(3)
            self.script = [3] * 3 + [0] * (2 * CATCH_UP_BATCH + 7) + [3] * 2000

    drafter = MTPDrafter(qwen)
    policy = ParkThenDraft()
    spec, stats = tokens_of(qwen, prompt, drafter, num_draft="auto", policy=policy, max_tokens=2 * CATCH_UP_BATCH + 60)
    assert spec == tokens_of(qwen, prompt, num_draft=0, max_tokens=2 * CATCH_UP_BATCH + 60)[0]
    # The head sees every position but the newest sampled token.
    assert drafter.cache[0].offset == len(prompt) + len(spec) - 1
    # Drafting resumed with a head that is right about as often as before.
    assert stats.accepted_per_position[0] > 0.3 * stats.drafted_per_position[0]


def test_prompt_cache_across_turns_with_auto(qwen):
    drafter = MTPDrafter(qwen)
    pc = PromptCache()
    history = [5, 17, 33, 2]
    for turn, extra in enumerate([[9, 11], [40, 41, 42], [7], [8, 9]]):
        prompt = history + extra
        stats = Stats()
        out = [t for c in decode(qwen, prompt, drafter=drafter, num_draft="auto", max_tokens=90, stats=stats,
                                 prompt_cache=pc, policy=ScriptedPolicy(5, turn)) for t in c.tokens]
        assert out == tokens_of(qwen, prompt, num_draft=0, max_tokens=90)[0], turn
        if turn:
            assert stats.prefilled_tokens == len(prompt) - len(cache_tokens)
        cache_tokens = list(pc.tokens)
        assert cache_tokens == prompt + out[:-1]
        history = prompt + out


def test_sampling_distribution_with_changing_k():
    """Rejection sampling stays exact while k jumps between 0 and 4."""
    model = tiny.build(tiny.text_config(), seed=5, predictable=True, noise=2.0)
    params = SamplingParams(temp=1.0, top_k=3)
    prompt = [5, 17, 33]
    length, n_samples = 4, 1000
    exact = _exact_joint(model, prompt, params, length)
    drafter = MTPDrafter(model)
    observed, drafted, accepted, ks = Counter(), 0, 0, Counter()
    for seed in range(n_samples):
        stats = Stats()
        policy = ScriptedPolicy(4, seed, zero_run=2)
        out = [t for c in decode(model, prompt, drafter=drafter, num_draft="auto", params=params,
                                 max_tokens=length, seed=seed, stats=stats, policy=policy) for t in c.tokens]
        observed[tuple(out)] += 1
        drafted += stats.draft_tokens
        accepted += stats.accepted_tokens
        ks.update(stats.k_histogram)
    # With 4 tokens to generate, drafts are capped at 2: every length 0..2 occurs.
    assert 0 < accepted < drafted and set(ks) == {0, 1, 2}
    # Chi-square goodness of fit of the 4-token joint, p > 1e-3 (as test_sampling).
    assert chi_square_p_value(observed, exact, n_samples) > 1e-3


def test_prefill_window_keeps_output_and_bounds_head_work(qwen, monkeypatch):
    """Over a prompt longer than the drafter's prefill window the head reads
    only the newest positions; output is unchanged."""
    import mlx_mtp.engine as engine

    monkeypatch.setattr(engine, "DRAFTER_PREFILL_WINDOW", 16)
    prompt = list(range(2, 90))
    drafter = MTPDrafter(qwen)
    spec, _ = tokens_of(qwen, prompt, drafter, num_draft=3, max_tokens=40)
    assert spec == tokens_of(qwen, prompt, num_draft=0, max_tokens=40)[0]
    # 16 prompt positions + the 39 decoded after the first token.
    assert drafter.cache[0].offset == 16 + len(spec) - 1


def test_auto_with_a_useless_head_stays_lossless():
    """A head with random weights (acceptance near 0): whatever the policy
    picks from this machine's timings, the output is the target's. (Whether
    it parks is a matter of measured speed: see tests/test_draft_policy.py
    for the decisions on synthetic costs and `mlx-mtp bench` for real ones.)"""
    model = tiny.build(tiny.text_config(), seed=3, predictable=True, noise=0.3)
    rng = np.random.default_rng(0)
    model.mtp.fc.weight = mx.array(rng.standard_normal(model.mtp.fc.weight.shape).astype(np.float32))
    prompt = [5, 17, 33]
    spec, stats = tokens_of(model, prompt, MTPDrafter(model), num_draft="auto", max_tokens=400)
    assert spec == tokens_of(model, prompt, num_draft=0, max_tokens=400)[0]
    assert stats.acceptance_rate < 0.3 and stats.host_syncs_per_cycle == 1.0
