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
from mlx_mtp.testing.gemma import WINDOW
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
    return tiny.often_right_gemma_pair()


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


def test_catch_up_runs_in_the_last_plain_cycle_not_in_the_drafting_one(qwen):
    """The policy reads a drafting cycle's time as the cost of drafting k;
    the parked drafter's catch-up pass is queued in the plain cycle before
    it instead (its cost lands in the plain run, once per stretch)."""
    prompt = [5, 17, 33, 2, 9]
    zeros = CATCH_UP_BATCH // 2 + 3  # a catch-up still pending when drafting resumes
    log = []

    class ParkThenDraft(ScriptedPolicy):
        def __init__(self):
            super().__init__(3)
            self.script = [3] * 3 + [0] * zeros + [3] * 2000

        def update(self, k, accepted, seconds):
            log.append(("update", k))
            super().update(k, accepted, seconds)

    drafter = MTPDrafter(qwen)
    real_observe = drafter.observe

    def observe(next_tokens, hidden):
        log.append(("observe", hidden.shape[1]))
        real_observe(next_tokens, hidden)

    drafter.observe = observe
    spec, _ = tokens_of(qwen, prompt, drafter, num_draft="auto", policy=ParkThenDraft(), max_tokens=60)
    assert spec == tokens_of(qwen, prompt, num_draft=0, max_tokens=60)[0]
    updates = [i for i, e in enumerate(log) if e[0] == "update"]
    resumed = next(j for j in range(1, len(updates)) if log[updates[j]] == ("update", 3)
                   and log[updates[j - 1]] == ("update", 0))
    last_plain, drafting = updates[resumed - 1], updates[resumed]
    catch_up = [e for e in log[updates[resumed - 2] + 1 : last_plain] if e[0] == "observe"]
    assert catch_up and catch_up[0][1] >= zeros - 1  # the stretch, in one pass
    assert all(n <= 3 + 1 for kind, n in log[last_plain + 1 : drafting] if kind == "observe")
    assert drafter.cache[0].offset == len(prompt) + len(spec) - 1


def test_prompt_cache_across_turns_with_auto(qwen):
    drafter = MTPDrafter(qwen)
    pc = PromptCache()
    history, cache_tokens = [5, 17, 33, 2], []
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


def test_random_head_fixture_is_useless_and_lossless():
    """`build(..., random_head=True)`: the floor case anyone can bench."""
    good = tiny.build(tiny.text_config(), seed=3, predictable=True, noise=0.3)
    bad = tiny.build(tiny.text_config(), seed=3, predictable=True, noise=0.3, random_head=True)
    prompt = [5, 17, 33]
    plain, _ = tokens_of(good, prompt, num_draft=0, max_tokens=60)
    assert tokens_of(bad, prompt, num_draft=0, max_tokens=60)[0] == plain  # same trunk
    spec_good, s_good = tokens_of(good, prompt, MTPDrafter(good), num_draft=2, max_tokens=60)
    spec_bad, s_bad = tokens_of(bad, prompt, MTPDrafter(bad), num_draft=2, max_tokens=60)
    assert spec_good == spec_bad == plain
    assert s_good.acceptance_rate > 0.8 and s_bad.acceptance_rate < 0.2


def test_cli_k_auto_json_and_bad_values(tiny_model_dir):
    import json

    from click.testing import CliRunner

    from mlx_mtp.cli import main

    result = CliRunner().invoke(main, ["generate", "-m", str(tiny_model_dir), "-k", "auto", "-n", "30", "--json", "hi"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)["stats"]
    assert stats["num_draft"] == "auto"
    assert sum(stats["k_histogram"].values()) == stats["target_passes"]
    assert 0 <= stats["parked_fraction"] <= 1 and len(stats["acceptance_per_depth"]) == 6
    for bad in ("fast", "-1", "2.5"):
        r = CliRunner().invoke(main, ["generate", "-m", str(tiny_model_dir), "-k", bad, "hi"])
        assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output, r.output


def test_tune_stores_costs_and_load_starts_from_them(tiny_model_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import mlx_mtp
    from mlx_mtp.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert mlx_mtp.load(tiny_model_dir)[0].step_costs is None
    result = CliRunner().invoke(main, ["tune", "-m", str(tiny_model_dir), "--repeats", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mlx-mtp" / "calibration.json").exists()
    assert "7 tokens" in result.output  # verify passes of 1..k_max+1 tokens
    model, tokenizer = mlx_mtp.load(tiny_model_dir)
    costs = model.step_costs
    assert costs is not None and sorted(costs.verify) == list(range(1, 8)) and costs.draft > 0
    # The policy starts from it, and auto stays lossless.
    prompt = [5, 17, 33]
    spec = [t for r in mlx_mtp.stream_generate(model, tokenizer, prompt, max_tokens=30) for t in r.tokens]
    assert model.draft_policy is not None and model.draft_policy.costs is costs
    assert spec == [t for r in mlx_mtp.stream_generate(model, tokenizer, prompt, num_draft=0, max_tokens=30)
                    for t in r.tokens]
    # Another drafter, model or machine is another key: nothing is mixed up.
    no_draft = mlx_mtp.load(tiny_model_dir, drafter="none")[0]
    assert no_draft.step_costs is None


def test_bench_auto_mode_and_context_ladder(tiny_model_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from mlx_mtp.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"category": "code", "prompt": "def f(x):"}\n{"category": "chat", "prompt": "hello"}\n')
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "-m", str(tiny_model_dir), "-k", "1,auto", "-n", "12",
                                       "--prompts", str(prompts), "--context", "0,64", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "auto: >= 0.97x the baseline on every category:" in result.output
    assert "best fixed k=1" in result.output
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"0", "1", "auto"}
    auto = report["modes"]["auto"]
    assert set(auto["speedup_per_category"]) == {"code", "chat"}
    assert sum(auto["k_histogram"].values()) > 0 and 0 <= auto["parked_fraction"] <= 1
    assert set(report["contexts"]) == {"0", "64"}
    ladder = report["contexts"]["64"]["modes"]
    assert all(r["stats"]["prompt_tokens"] > 64 for r in ladder["0"]["runs"])
    assert [r["tokens"] for r in ladder["auto"]["runs"]] == [r["tokens"] for r in ladder["0"]["runs"]]
