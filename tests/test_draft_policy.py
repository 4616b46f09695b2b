"""The adaptive draft-length policy and the calibration store.

Everything here is pure Python arithmetic on synthetic runs: no model, no
MLX, no wall-clock timing.  A simulated run draws acceptances from a fixed
seed and charges each cycle a synthetic cost, T(k) = V(k+1) + k*D.
"""

from __future__ import annotations

import json
import math
import random
from typing import Callable, List, Optional, Sequence, Tuple

import pytest

from mlx_mtp.calibration import (
    calibration_key,
    calibration_path,
    load_costs,
    machine_id,
    save_costs,
)
from mlx_mtp.draft_policy import (
    DEFAULT_TUNABLES,
    DraftPolicy,
    StepCosts,
    best_k,
    expected_tokens,
)

K_MAX = 6


def cycle_cost(verify: Callable[[int], float], draft: float) -> Callable[[int], float]:
    return lambda k: verify(k + 1) + k * draft


# Synthetic machines (seconds per cycle; a plain step is 1.0).
# GPU-like: a verify costs about one step whatever its size.
GPU = cycle_cost(lambda m: 1.0 + 0.01 * (m - 1), 0.03)
# CPU-like: a 4-token verify costs 1.8 steps.
CPU = cycle_cost(lambda m: 1.0 + 0.8 * (m - 1) / 3, 0.05)
# Tiny target: a draft step costs as much as a target step; never pays.
TINY = cycle_cost(lambda m: 1.0 + 0.3 * (m - 1), 1.0)


def costs_of(cost: Callable[[int], float], k_max: int = K_MAX) -> StepCosts:
    """A calibration whose V(k+1) + k*D equals `cost` (draft folded into V)."""
    return StepCosts(verify={m: cost(m - 1) for m in range(1, k_max + 2)}, draft=0.0)


def brute_best(acc: Sequence[float], cost: Callable[[int], float], k_max: int) -> int:
    """The formula, spelled out: argmax_k E(k)/T(k), ties to the smaller k."""
    rates = []
    for k in range(k_max + 1):
        e = 1.0 + sum(math.prod(acc[:j]) for j in range(1, k + 1))
        rates.append(e / cost(k))
    return max(range(k_max + 1), key=lambda k: (rates[k], -k))


# ---------------------------------------------------------------------------
# Simulation


class Run:
    def __init__(self) -> None:
        self.ks: List[int] = []
        self.tokens: List[int] = []
        self.seconds: List[float] = []  # charged (no warm-up surcharge)

    def rate(self, lo: int = 0, hi: Optional[int] = None) -> float:
        return sum(self.tokens[lo:hi]) / sum(self.seconds[lo:hi])


def simulate(choose: Callable[[], int], update: Callable[[int, int, float], None],
             acceptance: Callable[[int], Sequence[float]], cost: Callable[[int], float],
             cycles: int, seed: int = 7, noise: float = 0.05, warmup: float = 20.0,
             k_max: int = K_MAX) -> Run:
    """Drive a chooser for `cycles` cycles.

    Common random numbers: the draws of cycle c depend only on (seed, c),
    so fixed-k baselines and the policy see the same luck.  The policy is
    fed the first cycle of each k `warmup` times slower (compilation); that
    one-off engine cost is charged to neither side of the comparison.
    """
    rng = random.Random(seed)
    draws = [[rng.random() for _ in range(k_max + 1)] for _ in range(cycles)]
    seen = set()
    run = Run()
    for c in range(cycles):
        k = choose()
        assert 0 <= k <= k_max
        acc, u = acceptance(c), draws[c]
        n = 0
        while n < k and u[n] < acc[n]:
            n += 1
        seconds = cost(k) * (1.0 + noise * (u[k_max] - 0.5))
        update(k, n, seconds * (warmup if k not in seen else 1.0))
        seen.add(k)
        run.ks.append(k)
        run.tokens.append(n + 1)
        run.seconds.append(seconds)
    return run


def fixed_rate(k: int, acceptance, cost, cycles: int, **kw) -> float:
    return simulate(lambda: k, lambda *a: None, acceptance, cost, cycles, **kw).rate()


def run_policy(acceptance, cost, cycles: int, costs: Optional[StepCosts] = None,
               seed: int = 7, **kw) -> Tuple[DraftPolicy, Run]:
    policy = DraftPolicy(K_MAX, costs)
    run = simulate(policy.choose, policy.update, acceptance, cost, cycles, seed=seed, **kw)
    return policy, run


def flat(a: float) -> Callable[[int], List[float]]:
    return lambda c: [a] * K_MAX


# ---------------------------------------------------------------------------
# Pure helpers


def test_expected_tokens_formula():
    assert expected_tokens([], 0) == 1.0
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5], 1) == pytest.approx(1.5)
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1.75)
    assert expected_tokens([0.9, 0.0, 1.0], 3) == pytest.approx(1.9)
    assert expected_tokens([1.0] * 5, 5) == pytest.approx(6.0)
    acc = [0.8, 0.7, 0.6, 0.5]
    for k in range(5):
        want = 1 + sum(math.prod(acc[:j]) for j in range(1, k + 1))
        assert expected_tokens(acc, k) == pytest.approx(want)
    with pytest.raises(ValueError):
        expected_tokens([0.5], 2)


def test_best_k_gpu_like_high_acceptance_picks_large_k():
    acc = [0.8] * K_MAX
    k = best_k(acc, GPU, K_MAX)
    assert k == brute_best(acc, GPU, K_MAX)
    assert k >= 4


def test_best_k_cpu_like_low_acceptance_follows_the_arithmetic():
    assert CPU(3) == pytest.approx(1.8 + 3 * 0.05)  # 4-token verify = 1.8 steps
    acc = [0.3] * K_MAX
    want = brute_best(acc, CPU, K_MAX)
    assert want in (0, 1)
    assert best_k(acc, CPU, K_MAX) == want


def test_best_k_parks_on_hopeless_drafts():
    for cost in (GPU, CPU, TINY):
        assert best_k([0.01] * K_MAX, cost, K_MAX) == 0


def test_best_k_ties_go_to_smaller_k():
    # Acceptance 0 and free drafting: every k commits 1 token per unit time.
    assert best_k([0.0] * 4, lambda k: 1.0, 4) == 0
    # E(1)/T(1) == E(2)/T(2) exactly: 1.5/1.5 == 1.75/1.75.
    assert best_k([0.5, 0.5], lambda k: {0: 2.0, 1: 1.5, 2: 1.75}[k], 2) == 1


def test_best_k_rejects_bad_inputs():
    with pytest.raises(ValueError):
        best_k([0.5], GPU, 3)
    with pytest.raises(ValueError):
        best_k([0.5], lambda k: 0.0, 1)


# ---------------------------------------------------------------------------
# StepCosts


def test_step_costs_round_trip_and_model():
    costs = StepCosts(verify={1: 0.010, 2: 0.012, 4: 0.018}, draft=0.001)
    d = costs.to_dict()
    json.dumps(d)  # JSON-able
    back = StepCosts.from_dict(json.loads(json.dumps(d)))
    assert back == costs
    assert back.verify == {1: 0.010, 2: 0.012, 4: 0.018}
    assert costs.cycle_seconds(0) == pytest.approx(0.010)
    assert costs.cycle_seconds(1) == pytest.approx(0.012 + 0.001)
    assert costs.verify_seconds(3) == pytest.approx(0.015)  # interpolated
    assert costs.verify_seconds(6) == pytest.approx(0.024)  # extrapolated
    with pytest.raises(ValueError):
        StepCosts.from_dict({"draft": 1.0})
    with pytest.raises(ValueError):
        StepCosts(verify={1: -1.0}, draft=0.0)


# ---------------------------------------------------------------------------
# The policy: bookkeeping and the interface


def test_policy_measures_a_plain_step_first_without_costs_and_choose_is_pure():
    policy = DraftPolicy(K_MAX)
    # No calibration: decode plainly (the baseline, free) until a plain
    # step is measured, so the first decision compares against a measured
    # T(0) rather than a guess.
    assert policy.choose() == 0
    assert policy.choose() == 0  # no state change
    assert policy.acceptance_per_depth == [DEFAULT_TUNABLES["prior_acceptance"]] * K_MAX
    assert policy.histogram == {} and policy.parked_fraction == 0.0
    policy.update(0, 0, None)
    policy.observe_plain(4, 4.0)  # the first report is a discarded warm-up
    assert policy.choose() == 0
    policy.update(0, 0, None)
    policy.observe_plain(4, 4.0)
    # The mildly optimistic prior then drafts, starting at probe_k (slow start).
    assert policy.choose() == DEFAULT_TUNABLES["probe_k"]
    assert policy.reason() is None


def test_plain_first_gives_up_when_no_plain_time_arrives():
    policy = DraftPolicy(K_MAX)
    for _ in range(DEFAULT_TUNABLES["plain_first_cycles"]):
        assert policy.choose() == 0
        policy.update(0, 0, None)  # a caller that never times plain cycles
    assert policy.choose() > 0


def test_warm_start_decides_from_the_first_cycle():
    assert DraftPolicy(K_MAX, costs_of(TINY)).choose() == 0
    assert DraftPolicy(K_MAX, costs_of(TINY)).reason().startswith("parked:")
    gpu = DraftPolicy(K_MAX, costs_of(GPU))
    prior = gpu.acceptance_per_depth
    best = brute_best(prior, GPU, K_MAX)
    assert best >= 3 and gpu.expected_rate(best) > gpu.expected_rate(0)
    # It drafts from the first cycle, but slow start caps the first draft at
    # probe_k and grows it x2 per measured k while drafts keep landing.
    seen = []
    for _ in range(12):
        k = gpu.choose()
        seen.append(k)
        gpu.update(k, k, GPU(k))
    assert seen[0] == DEFAULT_TUNABLES["probe_k"]
    drafted = [k for k in seen if k]  # a plain cycle now and then refreshes T(0)
    assert all(b <= 2 * a for a, b in zip(drafted, drafted[1:])), seen
    assert seen[-1] == K_MAX  # every draft accepted: the deepest k pays


def test_after_parking_drafts_grow_back_at_most_twofold_per_cycle():
    # Park on a drafter that is always wrong; then every draft lands. Slow
    # start: the probe, then at most 2x the previous drafting k, so one lucky
    # probe cannot jump straight to a deep draft.
    def drafting_ks():
        policy = DraftPolicy(K_MAX, costs_of(CPU))
        for _ in range(40):
            k = policy.choose()
            policy.update(k, 0, CPU(k))
        assert policy.parked
        ks = []
        for _ in range(600):
            k = policy.choose()
            if k:
                ks.append(k)
            policy.update(k, k, CPU(k))
        return ks

    ks = drafting_ks()
    # The first probe after parking (a deep one every other probe).
    assert ks[0] in (DEFAULT_TUNABLES["probe_k"], DEFAULT_TUNABLES["probe_k"] + 1)
    assert all(b <= 2 * a for a, b in zip(ks, ks[1:])), ks
    assert ks[-1] == K_MAX


def test_prior_gives_way_to_evidence_within_a_handful_of_cycles():
    policy = DraftPolicy(K_MAX, costs_of(CPU))
    assert policy.choose() > 0
    for _ in range(6):
        policy.update(2, 0, CPU(2))
    assert policy.acceptance_per_depth[0] < 0.2
    assert policy.choose() == 0


def test_histogram_and_parked_fraction_bookkeeping():
    policy = DraftPolicy(4)
    for k, n in [(0, 0), (0, 0), (2, 1), (3, 3), (0, 0), (2, 2)]:
        policy.update(k, n, 1.0 + 0.1 * k)
    assert policy.histogram == {0: 3, 2: 2, 3: 1}
    assert policy.cycles == 6
    assert policy.parked_fraction == pytest.approx(0.5)
    with pytest.raises(ValueError):
        policy.update(5, 0, 1.0)
    with pytest.raises(ValueError):
        policy.update(2, 3, 1.0)
    policy.update(1, 0, float("nan"))  # bad timing: only the timing is skipped
    assert policy.cycles == 7


def test_acceptance_observes_depths_up_to_first_rejection():
    policy = DraftPolicy(3, prior_weight=1e-9, depth_shrink=0.0)
    policy.update(3, 1, 1.0)  # depth 1 accepted, depth 2 rejected, 3 untested
    a = policy.acceptance_per_depth
    assert a[0] == pytest.approx(1.0) and a[1] == pytest.approx(0.0)
    policy.update(3, 3, 1.0)  # all three accepted
    a = policy.acceptance_per_depth
    assert a[0] == pytest.approx(1.0)
    assert 0.4 < a[1] < 0.6  # one rejection, one acceptance (decayed)
    assert a[2] == pytest.approx(1.0)


def test_unknown_tunable_is_an_error():
    with pytest.raises(TypeError):
        DraftPolicy(4, no_such_knob=1)
    with pytest.raises(ValueError):
        DraftPolicy(4, probe_budget=0.0)


def test_warmup_and_outliers_do_not_poison_the_time_model():
    policy = DraftPolicy(4)
    policy.update(2, 2, 50.0)  # first cycle of k=2: compilation, discarded
    for _ in range(5):
        policy.update(2, 2, 1.0)
    assert policy.cycle_seconds(2) == pytest.approx(1.0)
    policy.update(2, 2, 1000.0)  # a GC pause: clipped
    assert policy.cycle_seconds(2) < 1.25
    # Still wants to draft (a plain refresh cycle to measure T(0) may come first).
    assert not policy.parked


def test_unobserved_k_uses_the_fitted_line():
    policy = DraftPolicy(6, refresh_every=0)
    for k, s in [(1, 9.0), (1, 1.2), (3, 9.0), (3, 1.6)]:
        policy.update(k, k, s)
    assert policy.cycle_seconds(1) == pytest.approx(1.2)
    assert policy.cycle_seconds(3) == pytest.approx(1.6)
    assert policy.cycle_seconds(0) == pytest.approx(1.0)  # a + b*k, b = 0.2
    assert policy.cycle_seconds(5) == pytest.approx(2.0)


def test_the_line_leaves_out_the_plain_step_once_two_drafting_ks_are_timed():
    # Drafting cycles share a fixed cost (1.9 plain steps here) a plain one
    # has not: through T(0) and T(1) alone the line charges it again per
    # token, an upper bound; with T(2) too, the drafting line takes over.
    policy = DraftPolicy(6, refresh_every=0, warmup_skip=0)
    policy.observe_plain(4, 4.0)
    policy.update(1, 1, 2.2)
    assert policy.cycle_seconds(4) == pytest.approx(1.0 + 1.2 * 4)
    policy.update(2, 2, 2.5)
    assert policy.cycle_seconds(0) == pytest.approx(1.0)
    assert policy.cycle_seconds(4) == pytest.approx(1.9 + 0.3 * 4)
    assert policy.cycle_seconds(6) == pytest.approx(1.9 + 0.3 * 6)


def test_a_probe_whose_draft_was_accepted_is_followed_by_a_deeper_one():
    # TINY: no draft ever pays, so the policy stays parked and only probes.
    policy = DraftPolicy(K_MAX, costs_of(TINY))
    budget = DEFAULT_TUNABLES["probe_budget"]
    hits = [False, True, True, False, True, False, True]
    probes, spacings, since = [], [], 0
    while len(probes) < len(hits):
        k = policy.choose()
        since += 1
        if k:
            probes.append(k)
            spacings.append(since)
            since = 0
        policy.update(k, k if k and hits[len(probes) - 1] else 0, TINY(k))
        assert policy.parked
        if k:
            # The bound: the next probe waits as long as its own cost needs.
            kp = policy.choose() or (2 if hits[len(probes) - 1] else 1)
            t = policy.cycle_seconds
            assert policy.probe_spacing >= (t(kp) - t(0)) / (budget * t(0))
    # One deeper exactly when the probe before it landed its first draft.
    assert probes == [1] + [2 if hit else 1 for hit in hits[:-1]], probes
    assert spacings[2] > spacings[1]  # a deep probe costs more, so it waits longer


def test_reason_when_parked():
    policy = DraftPolicy(4, costs_of(CPU, 4))
    for _ in range(30):
        k = policy.choose()
        policy.update(k, 0, CPU(k))
    assert policy.parked and policy.choose() in (0, 1)
    text = policy.reason()
    assert text.startswith("parked: drafts accepted ")
    assert "%" in text and "verify costs 1.3 steps" in text  # T(1)/T(0) = 1.317
    assert f"every {policy.probe_spacing} cycles" in text


def test_k_max_zero_is_plain_decoding():
    policy = DraftPolicy(0)
    for _ in range(5):
        assert policy.choose() == 0
        policy.update(0, 0, 1.0)
    assert policy.parked_fraction == 1.0
    assert policy.reason() == "parked: k_max is 0"
    assert policy.acceptance_per_depth == []


# ---------------------------------------------------------------------------
# The policy on simulated runs


@pytest.mark.parametrize("name,cost", [("gpu", GPU), ("cpu", CPU), ("tiny", TINY)])
def test_useless_drafter_parks_and_stays_as_fast_as_plain(name, cost):
    cycles = 3000
    policy, run = run_policy(flat(0.01), cost, cycles)
    plain = fixed_rate(0, flat(0.01), cost, cycles)
    assert policy.parked_fraction >= 0.9
    # TINY's probes are so dear that the probe bound itself (1 %) is what
    # they cost; there the start-up cycles get half a percent on top.
    floor = 0.97 if name != "tiny" else 1.0 - DEFAULT_TUNABLES["probe_budget"] - 0.005
    assert run.rate() >= floor * plain
    assert policy.parked and policy.reason() is not None


@pytest.mark.parametrize("warm", [False, True])
def test_good_drafter_on_cheap_verifies_finds_the_best_fixed_k(warm):
    # Acceptance falling with depth gives an interior optimum.
    profile = [0.85, 0.75, 0.6, 0.4, 0.3, 0.2]
    cost = lambda k: 1.0 + 0.04 * k  # noqa: E731  (GPU-like, slightly steeper)
    cycles = 3000
    fixed = [fixed_rate(k, lambda c: profile, cost, cycles) for k in range(K_MAX + 1)]
    best = max(range(K_MAX + 1), key=lambda k: fixed[k])
    assert best == brute_best(profile, cost, K_MAX) and 0 < best < K_MAX
    policy, run = run_policy(lambda c: profile, cost, cycles,
                             costs=costs_of(cost) if warm else None)
    hist = policy.histogram
    assert max(hist, key=hist.get) == best
    assert hist[best] >= 0.5 * cycles
    near = [k for k in range(K_MAX + 1) if fixed[k] >= 0.97 * fixed[best]]
    assert sum(hist.get(k, 0) for k in near) >= 0.9 * cycles
    assert run.rate() >= 0.95 * fixed[best]


@pytest.mark.parametrize("a", [0.3, 0.6, 0.8])
@pytest.mark.parametrize("name,cost", [("gpu", GPU), ("cpu", CPU)])
def test_never_slower_than_plain_and_close_to_the_best_fixed_k(name, cost, a):
    cycles = 3000
    fixed = [fixed_rate(k, flat(a), cost, cycles) for k in range(K_MAX + 1)]
    _, run = run_policy(flat(a), cost, cycles)
    assert run.rate() >= 0.97 * fixed[0]
    assert run.rate() >= 0.95 * max(fixed)


# Dispatch-bound, as the tiny demos on a CPU: plain steps are pipelined, and
# every drafting cycle pays a fixed cost for the read that ends it (nearly a
# plain step) before its per-token cost; only deep drafts pay.
PIPELINED = lambda k: 1.0 if k == 0 else 1.9 + 0.3 * k  # noqa: E731


@pytest.mark.parametrize("a", [0.5, 0.9])
def test_a_fixed_cost_of_drafting_does_not_hide_deep_drafts_that_pay(a):
    # k = 1 costs 2.2 plain steps and never pays; a line through T(0) and
    # T(1) alone would put k = 6 at 8.2 steps, where it costs 3.7 and, at
    # acceptance 0.9, runs 1.4x. The deep probes time k = 2 and find it.
    cycles, noise = 6000, 0.3  # the tiny regime is noisy (+-15 % here)
    fixed = [fixed_rate(k, flat(a), PIPELINED, cycles, noise=noise) for k in range(K_MAX + 1)]
    policy, run = run_policy(flat(a), PIPELINED, cycles, noise=noise)
    assert run.rate() >= 0.97 * fixed[0]
    if a == 0.9:
        assert max(range(K_MAX + 1), key=lambda k: fixed[k]) >= 5 and not policy.parked
        # Once found (the second half), as fast as the best fixed k.
        best = max(range(K_MAX + 1), key=lambda k: fixed[k])
        tail = simulate(lambda: best, lambda *x: None, flat(a), PIPELINED, cycles, noise=noise)
        assert run.rate(cycles // 2) >= 0.95 * tail.rate(cycles // 2)
    else:
        assert max(fixed) == fixed[0] and policy.parked


def test_a_good_first_draft_does_not_vouch_for_deeper_ones():
    # demo-gemma's assistant: depth 1 is accepted 93 % of the time, deeper
    # depths 38 %, and a draft step costs 0.85 plain steps; nothing pays.
    # Probing k = 1 alone, depth 2 would inherit depth 1's estimate and a
    # noisy time line could make deep drafts look cheap.
    cost = lambda k: 1.0 if k == 0 else 1.9 + 0.85 * k  # noqa: E731
    acceptance = lambda c: [0.93] + [0.38] * (K_MAX - 1)  # noqa: E731
    cycles, noise = 6000, 0.5
    plain = fixed_rate(0, acceptance, cost, cycles, noise=noise)
    assert all(fixed_rate(k, acceptance, cost, cycles, noise=noise) < plain
               for k in range(1, K_MAX + 1))
    policy, run = run_policy(acceptance, cost, cycles, noise=noise)
    assert run.rate() >= 0.98 * plain
    assert policy.parked_fraction >= 0.95
    assert policy.acceptance_per_depth[1] < 0.6  # depth 2 was tested


@pytest.mark.parametrize("name,cost", [("gpu", GPU), ("cpu", CPU)])
def test_regime_switch_useless_then_good_is_picked_up(name, cost):
    switch, cycles = 1500, 3000
    acceptance = lambda c: [0.01 if c < switch else 0.8] * K_MAX  # noqa: E731
    policy, run = run_policy(acceptance, cost, cycles)
    before = run.ks[500:switch]
    assert sum(k == 0 for k in before) >= 0.9 * len(before)
    # Picked up: within 100 cycles of the switch it drafts for good.
    pickup = next(c for c in range(switch, cycles - 50) if all(run.ks[c:c + 50]))
    assert pickup - switch <= 100
    fixed = [fixed_rate(k, flat(0.8), cost, cycles) for k in range(K_MAX + 1)]
    assert run.rate(switch + 200) >= 0.95 * max(fixed)
    assert policy.reason() is None


@pytest.mark.parametrize("name,cost", [("gpu", GPU), ("cpu", CPU)])
def test_regime_switch_good_then_useless_parks(name, cost):
    switch, cycles = 1500, 3000
    acceptance = lambda c: [0.8 if c < switch else 0.01] * K_MAX  # noqa: E731
    policy, run = run_policy(acceptance, cost, cycles)
    after = run.ks[switch + 100:]
    assert sum(k == 0 for k in after) >= 0.9 * len(after)
    assert policy.parked


@pytest.mark.parametrize("a", [0.0, 0.01])
def test_probe_overhead_in_the_parked_regime_is_within_the_bound(a):
    # Expensive probes (TINY: a k=1 cycle costs 2.3 steps), so the spacing
    # comes from the bound rather than from the floor.
    budget = DEFAULT_TUNABLES["probe_budget"]
    cycles = 12000
    policy, run = run_policy(flat(a), TINY, cycles, noise=0.0)
    t0, tp = TINY(0), TINY(1)
    # What the policy promises, in its own model...
    s = policy.probe_spacing
    assert s >= (policy.cycle_seconds(1) - policy.cycle_seconds(0)) / (
        budget * policy.cycle_seconds(0))
    e1 = expected_tokens(policy.acceptance_per_depth, 1)
    assert s >= (tp - e1 * t0) / (budget * t0)
    # ...and what the run realised, over whole probe periods once parked.
    probes = [c for c in range(500, cycles) if run.ks[c] > 0]
    assert len(probes) >= 50
    lo, hi = probes[0] + 1, probes[-1] + 1
    spent = sum(run.seconds[lo:hi])
    plain = sum(run.tokens[lo:hi]) * t0  # the same tokens decoded plainly
    overhead = spent / plain - 1.0
    assert 0.0 < overhead <= budget + 1e-9  # float rounding at the exact bound
    assert overhead > 0.5 * budget  # the bound, not the floor, sets the pace


def test_probe_floor_keeps_cheap_probes_rare():
    policy, run = run_policy(flat(0.0), GPU, 2000, noise=0.0)
    assert policy.probe_spacing == DEFAULT_TUNABLES["probe_min_spacing"]
    probes = sum(1 for k in run.ks[500:] if k > 0)
    assert probes <= 1500 / DEFAULT_TUNABLES["probe_min_spacing"] + 1


def test_plain_step_time_is_refreshed_while_drafting():
    # Warm-started and drafting from cycle 1: T(0) is measured anyway, in
    # runs of refresh_cycles plain cycles, rarely where drafting gains 2.7x.
    policy, run = run_policy(flat(0.8), GPU, 1000, costs=costs_of(GPU))
    c = DEFAULT_TUNABLES["refresh_cycles"]
    plain = [i for i, k in enumerate(run.ks) if k == 0]
    assert 2 <= len(plain) <= 1 + 4 * c
    runs = [i for i in plain if i - 1 not in plain]
    # (The first ones, before T(0) has a retained measurement, are single.)
    assert len(runs) >= 3
    assert all(all(run.ks[i + j] == 0 for j in range(c)) for i in runs if i > 10)
    assert policy.cycle_seconds(0) == pytest.approx(GPU(0), rel=0.05)


def test_a_marginal_gain_is_checked_often_and_a_plain_step_that_gets_faster_parks():
    # k = 1 gains 21 % on CPU at acceptance 0.6; then the plain step gets
    # 25 % faster (context, load) and drafting stops paying. A stale T(0)
    # would keep the policy drafting until the next refresh.
    switch, cycles = 1500, 3000
    cost = lambda c: (lambda k: 0.75 if k == 0 and c >= switch else CPU(k))  # noqa: E731
    policy = DraftPolicy(K_MAX, costs_of(CPU))
    rng = random.Random(3)
    ks = []
    for c in range(cycles):
        k = policy.choose()
        n = 0
        while n < k and rng.random() < 0.6:
            n += 1
        policy.update(k, n, cost(c)(k))
        ks.append(k)
        if c == switch - 1:
            assert not policy.parked
            interval = policy._refresh_interval
    # The interval follows the gain: 21 % is checked twice as often as
    # the cap (a 2.7x gain above waits the whole 256).
    assert DEFAULT_TUNABLES["refresh_min"] <= interval <= DEFAULT_TUNABLES["refresh_every"] // 2
    parked_at = next(c for c in range(switch, cycles) if all(k == 0 for k in ks[c:c + 100]))
    assert parked_at - switch <= 2 * interval
    assert policy.parked


# ---------------------------------------------------------------------------
# Calibration store


def test_calibration_round_trip(tmp_path):
    path = tmp_path / "sub" / "calibration.json"
    key = calibration_key("Mac|M3", "mlx-community/Qwen3.5-4B", "4bit")
    assert key.count("|") == 2  # parts cannot smuggle in the separator
    costs = StepCosts(verify={1: 0.02, 2: 0.021, 3: 0.023}, draft=0.004)
    assert load_costs(key, path) is None
    save_costs(key, costs, path)
    other = calibration_key("x", "y", "bf16")
    save_costs(other, StepCosts(verify={1: 1.0}, draft=0.5), path)
    assert load_costs(key, path) == costs
    assert load_costs(other, path).draft == 0.5
    assert load_costs("missing", path) is None
    assert [p.name for p in path.parent.iterdir()] == ["calibration.json"]  # no temp left


@pytest.mark.parametrize("content", [b"{not json", b"[]", b'{"entries": 3}',
                                     b'{"entries": {"k": {"verify": "x"}}}', b"\xff\xfe"])
def test_calibration_corrupt_file_reads_as_empty(tmp_path, content):
    path = tmp_path / "calibration.json"
    path.write_bytes(content)
    assert load_costs("k", path) is None
    save_costs("k", StepCosts(verify={1: 0.5}, draft=0.1), path)  # overwrites cleanly
    assert load_costs("k", path) == StepCosts(verify={1: 0.5}, draft=0.1)


def test_calibration_unreadable_path_reads_as_empty(tmp_path):
    assert load_costs("k", tmp_path) is None  # a directory, not a file


def test_calibration_default_path_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibration_path() == tmp_path / "mlx-mtp" / "calibration.json"
    save_costs("k", StepCosts(verify={1: 0.5}, draft=0.1))
    assert load_costs("k") == StepCosts(verify={1: 0.5}, draft=0.1)


def test_machine_id_is_a_nonempty_string():
    mid = machine_id()
    assert isinstance(mid, str) and "cpus=" in mid and "mlx=" in mid
    assert "|" not in calibration_key(mid, "m", "q").split("|", 1)[0]


def test_a_new_prompt_outweighs_the_last_prompts_acceptance():
    # A predictable answer (acceptance 0.95), then a prompt where drafting
    # does not pay on this machine (0.3): told of the new prompt, the policy
    # restarts its slow start and lets the new prompt's cycles decide fast,
    # instead of drafting deep into it on the old prompt's evidence.
    switch, cycles = 300, 340

    def run(tell: bool):
        policy = DraftPolicy(K_MAX, costs_of(CPU))
        done = [0]

        def update(k, n, seconds):
            policy.update(k, n, seconds)
            done[0] += 1
            if tell and done[0] == switch:
                acceptance, seconds = list(policy.acceptance_per_depth), policy.cycle_seconds(3)
                policy.new_sequence()
                # Nothing is forgotten at once: the times stay, and so do the
                # acceptance estimates (deeper depths lean on the shallower
                # one a little more with fewer observations).
                assert policy.cycle_seconds(3) == seconds
                assert policy.acceptance_per_depth[0] == pytest.approx(acceptance[0], abs=1e-9)
                assert policy.acceptance_per_depth == pytest.approx(acceptance, abs=0.02)

        acceptance = lambda c: [0.95 if c < switch else 0.3] * K_MAX  # noqa: E731
        return simulate(policy.choose, update, acceptance, CPU, cycles)

    told, untold = run(True), run(False)
    assert untold.ks[switch - 1] == K_MAX and untold.ks[switch] == K_MAX
    assert told.ks[switch] <= 2 * 2  # probe_k * growth_limit, grown once
    assert sum(told.ks[switch:switch + 10]) < sum(untold.ks[switch:switch + 10])
    assert told.rate(switch) > untold.rate(switch)
    assert told.ks[:switch] == untold.ks[:switch]
