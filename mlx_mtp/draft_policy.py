"""Adaptive choice of the draft length k, one decode cycle at a time.

A cycle drafts k tokens, verifies k+1 positions in one target pass and
commits the accepted prefix plus one bonus token.  Whether drafting pays
depends on two things that change from machine to machine and over a run:

* how likely drafts are accepted (code vs prose, context length), and
* what a cycle costs as a function of k: T(k) ~ V(k+1) + k*D, where V(m)
  is the target pass over m tokens and D one draft step.  On a Mac GPU a
  4-token verify costs about one plain step; on a CPU about 1.8; with a
  tiny target a draft step costs as much as the target step.

`DraftPolicy` estimates both online from the cycles it is told about and
picks the k with the most expected committed tokens per second.  When no
k > 0 is expected to beat plain decoding (k = 0) it *parks* at k = 0 and
probes a short draft now and then, at a bounded cost (see `DraftPolicy`),
so a stretch of text that becomes predictable is picked up again.  Our
promise is "never slower than plain decoding, faster where possible".

Pure Python on purpose: it runs on the host every cycle, must not touch
MLX (no device syncs), and stays unit-testable on any machine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = [
    "StepCosts",
    "DraftPolicy",
    "expected_tokens",
    "best_k",
    "DEFAULT_TUNABLES",
    "SourcePolicies",
]


# ---------------------------------------------------------------------------
# Calibrated step costs


@dataclass
class StepCosts:
    """Measured costs in seconds (from `mlx-mtp tune`, see calibration.py).

    verify: tokens in the target pass (1..k_max+1) -> seconds; verify[1] is
        a plain decoding step.
    draft: seconds of one draft step.
    """

    verify: Dict[int, float] = field(default_factory=dict)
    draft: float = 0.0

    def __post_init__(self) -> None:
        # Normalise once so lookups in the hot path are plain int keys.
        verify: Dict[int, float] = {}
        for m, s in dict(self.verify).items():
            m_int, s_f = int(m), float(s)
            if m_int < 1 or not math.isfinite(s_f) or s_f <= 0.0:
                raise ValueError(f"bad verify cost {m!r}: {s!r}")
            verify[m_int] = s_f
        draft = float(self.draft)
        if not math.isfinite(draft) or draft < 0.0:
            raise ValueError(f"bad draft cost: {self.draft!r}")
        self.verify = verify
        self.draft = draft

    def verify_seconds(self, tokens: int) -> float:
        """V(tokens); linear inter/extrapolation between measured sizes."""
        if not self.verify:
            raise ValueError("StepCosts has no verify measurements")
        if tokens in self.verify:
            return self.verify[tokens]
        sizes = sorted(self.verify)
        if len(sizes) == 1:
            # One measurement: assume the pass cost does not depend on m,
            # the usual picture on a GPU for small m.
            return self.verify[sizes[0]]
        lo = [m for m in sizes if m < tokens]
        hi = [m for m in sizes if m > tokens]
        if lo and hi:
            m0, m1 = lo[-1], hi[0]
        elif hi:  # below the smallest measured size
            m0, m1 = sizes[0], sizes[1]
        else:  # above the largest: extend the last segment
            m0, m1 = sizes[-2], sizes[-1]
        v0, v1 = self.verify[m0], self.verify[m1]
        slope = (v1 - v0) / (m1 - m0)
        # A bigger pass is never cheaper; and never predict <= 0.
        value = v0 + max(slope, 0.0) * (tokens - m0)
        return max(value, 0.5 * min(self.verify.values()))

    def cycle_seconds(self, k: int) -> float:
        """The cost model of one cycle drafting k tokens: V(k+1) + k*D."""
        return self.verify_seconds(k + 1) + k * self.draft

    def to_dict(self) -> dict:
        # JSON object keys are strings; from_dict turns them back.
        return {
            "verify": {str(m): s for m, s in sorted(self.verify.items())},
            "draft": self.draft,
        }

    @classmethod
    def from_dict(cls, d: Any) -> "StepCosts":
        if not isinstance(d, dict) or not isinstance(d.get("verify"), dict):
            raise ValueError("StepCosts.from_dict needs {'verify': {...}, 'draft': x}")
        return cls(verify={int(m): float(s) for m, s in d["verify"].items()},
                   draft=float(d.get("draft", 0.0)))


# ---------------------------------------------------------------------------
# Pure helpers


def expected_tokens(acceptance_per_depth: Sequence[float], k: int) -> float:
    """Expected tokens one cycle commits when drafting k.

    1 + sum_{j=1..k} prod_{i<=j} a_i, where a_i is the probability that the
    draft at depth i is accepted given that depths < i were: depth j only
    counts when every earlier depth was accepted, and the bonus token is
    always there.
    """
    if k < 0 or k > len(acceptance_per_depth):
        raise ValueError(f"k={k} outside 0..{len(acceptance_per_depth)}")
    total, prod = 1.0, 1.0
    for j in range(k):
        prod *= acceptance_per_depth[j]
        total += prod
    return total


def _argmax_rate(acceptance: Sequence[float], seconds: Callable[[int], float],
                 k_max: int, rates: Optional[List[float]] = None) -> int:
    # Shared by best_k and the policy.  A running product keeps it O(k_max);
    # a relative epsilon turns float-level ties into ties (-> smaller k).
    best, best_rate = 0, -1.0
    total, prod = 1.0, 1.0
    for k in range(k_max + 1):
        if k:
            prod *= acceptance[k - 1]
            total += prod
        t = seconds(k)
        if not t > 0.0:
            raise ValueError(f"cycle_seconds({k}) must be > 0, got {t!r}")
        rate = total / t
        if rates is not None:
            rates[k] = rate
        if rate > best_rate * (1.0 + 1e-12):
            best, best_rate = k, rate
    return best


def best_k(acceptance_per_depth: Sequence[float],
           cycle_seconds: Callable[[int], float], k_max: int) -> int:
    """The k in 0..k_max maximising expected_tokens(k) / cycle_seconds(k).

    Ties go to the smaller k (less work for the same speed).
    """
    if k_max < 0 or k_max > len(acceptance_per_depth):
        raise ValueError(f"k_max={k_max} outside 0..{len(acceptance_per_depth)}")
    return _argmax_rate(acceptance_per_depth, cycle_seconds, k_max)


# ---------------------------------------------------------------------------
# The policy

#: Every tunable of DraftPolicy and its default (pass as keyword arguments).
DEFAULT_TUNABLES: Dict[str, Any] = {
    # Prior per-depth acceptance: mildly optimistic so a run starts drafting,
    # worth only `prior_weight` pseudo-observations so evidence wins fast.
    "prior_acceptance": 0.6,
    "prior_weight": 2.0,
    # Acceptance evidence ages by this factor per drafting cycle (a window
    # of ~1/(1-x) = 12.5 cycles): acceptance shifts between code and prose.
    "acceptance_decay": 0.92,
    # While parked, evidence also ages per cycle (down to `idle_floor`
    # effective observations at depth 1), so that the few probes of a
    # parked stretch carry enough weight to notice a change quickly,
    # without one lucky probe being able to flip the decision alone.
    "idle_decay": 0.98,
    "idle_floor": 2.0,
    # Depth j >= 2 is shrunk towards depth j-1 with this many
    # pseudo-observations: deep depths are seen rarely, and depths never
    # seen inherit the one above them instead of a stale or fixed guess.
    "depth_shrink": 1.0,
    # Cycle times: decaying average per k (window ~10 observations).
    "time_decay": 0.9,
    # Observations of each k discarded as warm-up (compilation, caches).
    "warmup_skip": 1,
    # Later observations are clipped to this multiple of the estimate, so a
    # GC pause or a late compilation cannot poison the average.
    "outlier_clip": 2.0,
    # Default shape when nothing is measured: T(k) = T(0) * (1 + x*k).
    "default_step_growth": 0.25,
    # Draft only if the best k beats plain decoding by this fraction: a
    # guard band against estimation noise (the promise is never slower).
    "margin": 0.05,
    # A policy that is drafting parks when its best k is expected to beat
    # plain decoding by less than this (hysteresis, <= margin): noise in
    # the acceptance estimate alone would otherwise park it now and then
    # where drafting pays, and a parked policy waits for probes.
    "stay_margin": 0.02,
    # Probing while parked: draft length and the cost bound (see class doc).
    "probe_k": 1,
    # After a probe whose first draft was accepted, the next probe drafts
    # probe_k + 1: it times a second drafting k, which the cycle-time line
    # needs (see `_fit_times`), and tests depth 2, so a deep draft is never
    # judged on depth 1's acceptance alone. False: always probe_k.
    "probe_deeper": True,
    "probe_budget": 0.01,
    "probe_min_spacing": 24,
    "probe_max_spacing": 256,
    # While drafting, run `refresh_cycles` plain cycles now and then to
    # refresh T(0): it drifts with context length and with the machine's
    # load, and a stale T(0) could keep a policy drafting where it no longer
    # pays. A run of several, because the first plain step after a draft
    # is not pipelined. The interval is as short as `refresh_budget` of the
    # expected gain allows (a marginal gain is checked often, a large one
    # rarely), within [refresh_min, refresh_every]; sooner (after
    # `refresh_unmeasured` drafting cycles) while T(0) has no measurement.
    # refresh_every = 0 disables.
    "refresh_every": 256,
    "refresh_min": 16,
    "refresh_cycles": 4,
    "refresh_budget": 0.005,
    "refresh_unmeasured": 3,
    # Slow start: a cycle drafts at most this many times the k of the
    # newest drafting cycle (probe_k before any), so neither the first
    # cycles nor one lucky probe can jump to a deep draft whose cost and
    # acceptance were never seen together. 0 disables.
    "growth_limit": 2,
    # A new prompt (`new_sequence`) keeps the times but only this many
    # pseudo-observations of the previous prompt's acceptance, and restarts
    # the slow start: acceptance jumps between prompts (a repetitive answer,
    # then prose), and a policy still sure of the last prompt would draft
    # deep into a new one for a dozen cycles.
    "sequence_carry": 3.0,
    # Decode plainly until T(0) has a retained measurement, for at most
    # this many cycles (plain cycles are the baseline, so they cost
    # nothing): the first decision then compares drafts against a measured
    # plain step, not a guess. 0 disables.
    "plain_first_cycles": 12,
}


class DraftPolicy:
    """Chooses k (0..k_max) for each decode cycle from what it has seen.

    Usage, once per cycle: ``k = policy.choose()``; run the cycle;
    ``policy.update(k, accepted, seconds)``.

    Estimates
        * acceptance per depth j (P(accept j | depths < j accepted)) as a
          decaying ratio of accepted/observed, starting from
          `prior_acceptance` worth `prior_weight` observations;
        * cycle seconds T(k): decaying per-k averages where k was observed;
          otherwise a least-squares line a + b*k through the observed
          drafting k's (>= 2 of them; drafting cycles share a fixed cost,
          see `_fit_times`), else the line through T(0) and the one
          observed drafting k, else the calibration's shape V(k+1) + k*D
          (scaled to the one observed k, if any), else the default shape
          T(0)*(1 + 0.25k).  The first observation of each k is dropped
          (warm-up) and later ones are clipped.

    Decision: k* = argmax_k E(k)/T(k) with E the expected tokens per cycle;
    k > 0 is taken only if it beats k = 0 by `margin` (by `stay_margin`
    while already drafting), else the policy is *parked* at k = 0.

    Probe bound.  While parked, one cycle in every S drafts k_p tokens:
    k_p = `probe_k`, or probe_k + 1 after a probe whose first draft was
    accepted (`probe_deeper`) where that probe's S is at most twice
    `probe_max_spacing`; S is that of the probe it leads to:

        S = clamp(ceil((T(k_p) - T(0)) / (budget * T(0))),
                  probe_min_spacing, probe_max_spacing).

    T(0) is the mean of whole runs of plain cycles (`observe_plain`), so
    the un-pipelined first plain step after a draft is part of it.

    A probe commits at least its bonus token, so its extra time over
    decoding the same tokens plainly is at most T(k_p) - E(k_p)*T(0)
    <= T(k_p) - T(0) (we charge the worst case E = 1, so the bound does not
    rely on probes being lucky), while a probe period decodes >= S tokens
    that take >= S*T(0) plainly.  Hence, under the cost model:

        time spent parked <= (1 + probe_budget) * plain-decoding time of
        the same tokens  (default: at most 1 % slower),

    whenever T(k_p) <= T(0) * (1 + budget * probe_max_spacing) (3.56 plain
    steps by default; beyond that the spacing is capped and the overhead
    is (T(k_p) - T(0)) / (probe_max_spacing * T(0))).  The floor keeps
    probing rare (and the parked fraction >= 1 - 1/24) when probes are
    nearly free.

    Without `costs` it decides from the first cycle from its prior; with
    `costs` (a warm start) the cost shape is known from the first cycle.
    `choose()` is O(1): the O(k_max) work happens in `update()`.
    """

    def __init__(self, k_max: int, costs: Optional[StepCosts] = None,
                 **tunables: Any) -> None:
        unknown = set(tunables) - set(DEFAULT_TUNABLES)
        if unknown:
            raise TypeError(f"unknown DraftPolicy tunables: {sorted(unknown)}")
        if int(k_max) != k_max or k_max < 0:
            raise ValueError(f"k_max must be an int >= 0, got {k_max!r}")
        cfg = {**DEFAULT_TUNABLES, **tunables}
        self._check(cfg)
        self.k_max: int = int(k_max)
        self.costs: Optional[StepCosts] = costs
        self.tunables: Dict[str, Any] = cfg

        self._prior = float(cfg["prior_acceptance"])
        self._acc_decay = float(cfg["acceptance_decay"])
        self._idle_decay = float(cfg["idle_decay"])
        self._idle_floor = float(cfg["idle_floor"])
        self._shrink = float(cfg["depth_shrink"])
        self._t_decay = float(cfg["time_decay"])
        self._warmup = int(cfg["warmup_skip"])
        self._clip = float(cfg["outlier_clip"])
        self._growth = float(cfg["default_step_growth"])
        self._margin = float(cfg["margin"])
        self._stay_margin = min(float(cfg["stay_margin"]), self._margin)
        self._probe_k = min(int(cfg["probe_k"]), self.k_max)
        self._deeper = bool(cfg["probe_deeper"]) and 0 < self._probe_k < self.k_max
        self._next_probe = self._probe_k
        self._probe_hit = False    # the newest probe's first draft was accepted
        self._budget = float(cfg["probe_budget"])
        self._min_spacing = int(cfg["probe_min_spacing"])
        self._max_spacing = int(cfg["probe_max_spacing"])
        self._refresh_every = int(cfg["refresh_every"])
        self._refresh_min = min(int(cfg["refresh_min"]), self._refresh_every)
        self._refresh_cycles = max(int(cfg["refresh_cycles"]), 1)
        self._refresh_budget = float(cfg["refresh_budget"])
        self._refresh_interval = self._refresh_every
        self._refresh_left = 0     # plain cycles left in the current refresh run
        self._refresh_unmeasured = int(cfg["refresh_unmeasured"])
        self._growth_limit = int(cfg["growth_limit"])
        self._carry = float(cfg["sequence_carry"])
        # A calibration (costs) already knows T(0)'s shape: no need to wait.
        self._plain_first = int(cfg["plain_first_cycles"]) if costs is None else 0

        K = self.k_max
        # Acceptance: decayed accepted / observed counts for depths 1..K
        # (index j-1).  The prior lives in depth 1's counts, so it decays
        # away like any evidence; deeper depths start empty and inherit.
        self._acc: List[float] = [0.0] * K
        self._obs: List[float] = [0.0] * K
        if K:
            w = float(cfg["prior_weight"])
            self._acc[0], self._obs[0] = self._prior * w, w
        self._a: List[float] = [self._prior] * K  # current estimates

        # Cycle times per k (index k = 0..K).
        self._t_seen: List[int] = [0] * (K + 1)   # all observations
        self._t_n: List[int] = [0] * (K + 1)      # retained observations
        self._t_mean: List[float] = [0.0] * (K + 1)
        self._t: List[float] = [1.0] * (K + 1)    # model T(k)
        self._rates: List[float] = [0.0] * (K + 1)

        self._hist: Dict[int, int] = {}
        self._cycles = 0
        self._since_probe = 0      # parked cycles since the last k > 0 cycle
        self._since_plain = 0      # drafting cycles since the last k = 0 cycle
        self._best = 0             # argmax over all k (with the margin rule)
        self._last_drafted = 0     # k of the newest cycle that drafted
        self._spacing = self._min_spacing
        self._recompute()

    @staticmethod
    def _check(cfg: Dict[str, Any]) -> None:
        def unit(name: str, lo_open: bool = False) -> None:
            v = float(cfg[name])
            if not (0.0 < v <= 1.0 if lo_open else 0.0 <= v <= 1.0):
                raise ValueError(f"{name} must be in {'(0' if lo_open else '[0'}, 1], got {v!r}")
        unit("prior_acceptance")
        for name in ("acceptance_decay", "idle_decay", "time_decay"):
            unit(name, lo_open=True)
        for name in ("prior_weight", "idle_floor", "depth_shrink", "margin", "stay_margin",
                     "default_step_growth", "sequence_carry"):
            if float(cfg[name]) < 0.0:
                raise ValueError(f"{name} must be >= 0")
        if float(cfg["prior_weight"]) <= 0.0:
            raise ValueError("prior_weight must be > 0")
        if float(cfg["outlier_clip"]) < 1.0:
            raise ValueError("outlier_clip must be >= 1")
        for name in ("probe_budget", "refresh_budget"):
            if not 0.0 < float(cfg[name]) < 1.0:
                raise ValueError(f"{name} must be in (0, 1)")
        if int(cfg["probe_k"]) < 1:
            raise ValueError("probe_k must be >= 1")
        if not 1 <= int(cfg["probe_min_spacing"]) <= int(cfg["probe_max_spacing"]):
            raise ValueError("need 1 <= probe_min_spacing <= probe_max_spacing")
        for name in ("warmup_skip", "refresh_every", "refresh_min", "refresh_cycles",
                     "refresh_unmeasured", "growth_limit",
                     "plain_first_cycles"):
            if int(cfg[name]) < 0:
                raise ValueError(f"{name} must be >= 0")

    # -- the per-cycle interface -------------------------------------------

    def choose(self) -> int:
        """k for the next cycle, 0..k_max.  O(1); does not change state."""
        if self._cycles < self._plain_first and self._t_n[0] == 0 and not self._last_drafted:
            return 0  # no plain step measured yet (see plain_first_cycles)
        if self._best > 0:
            if self._refresh_left or self._refresh_due():
                return 0
            return self._slow_start(self._best)
        if self._probe_k > 0 and self._since_probe >= self._spacing - 1:
            return self._next_probe
        return 0

    def _slow_start(self, k: int) -> int:
        if not self._growth_limit:
            return k
        last = self._last_drafted
        if not last:
            return min(k, max(self._probe_k, 1))
        # Grow only from a k whose time is measured (its first cycle may be
        # a discarded warm-up): otherwise run that k again.
        return min(k, last * self._growth_limit if self._t_n[last] else last)

    def update(self, k: int, accepted: int, seconds: float) -> None:
        """Record one finished cycle: k drafted, `accepted` of them kept.

        `seconds` is the cycle's wall time; a non-finite or non-positive
        value only skips the timing part.
        """
        if not 0 <= k <= self.k_max:
            raise ValueError(f"k={k} outside 0..{self.k_max}")
        if not 0 <= accepted <= k:
            raise ValueError(f"accepted={accepted} outside 0..{k}")
        self._cycles += 1
        self._hist[k] = self._hist.get(k, 0) + 1

        if k > 0:
            if self._best == 0:
                self._probe_hit = accepted > 0
            self._observe_acceptance(k, accepted)
            self._last_drafted = k
            self._since_probe = 0
            self._since_plain += 1
            self._refresh_left = 0
        else:
            if self._refresh_left:
                self._refresh_left -= 1
            elif self._best > 0 and self._since_plain and self._t_n[0]:
                self._refresh_left = self._refresh_cycles - 1  # a refresh run begins
            self._since_plain = 0
            if self._best == 0:
                self._since_probe += 1
                self._age_while_parked()
        if isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0:
            self._observe_time(k, float(seconds))
        self._recompute()

    def new_sequence(self) -> None:
        """A new prompt begins (the policy lives on the model, across
        prompts): the acceptance evidence shrinks to `sequence_carry`
        observations at depth 1 (deeper depths in proportion), so the new
        text's first cycles outweigh the old; the cycle times, which belong
        to the machine, are kept. The slow start begins again from
        `probe_k` * `growth_limit`."""
        if self.k_max and self._obs[0] > self._carry:
            f = self._carry / self._obs[0]
            for j in range(self.k_max):
                self._acc[j] *= f
                self._obs[j] *= f
        if self._growth_limit:
            self._last_drafted = min(self._last_drafted, max(self._probe_k, 1) * self._growth_limit)
        self._recompute()

    def observe_plain(self, cycles: int, seconds: float) -> None:
        """Wall time of `cycles` consecutive plain cycles, for callers that
        cannot time them one by one: pipelined plain steps overlap (or one
        cycle's read also waits for the next, queued step), so only a run of
        them has a clean time. Their `update` calls then pass seconds=None."""
        if cycles > 0 and math.isfinite(seconds) and seconds > 0:
            self._observe_time(0, seconds / cycles)
            self._recompute()

    # -- read-only views ----------------------------------------------------

    @property
    def acceptance_per_depth(self) -> List[float]:
        """Estimated P(accept depth j | depths < j accepted), j = 1..k_max."""
        return list(self._a)

    @property
    def histogram(self) -> Dict[int, int]:
        """k actually run (as reported to update) -> number of cycles."""
        return dict(sorted(self._hist.items()))

    @property
    def cycles(self) -> int:
        return self._cycles

    @property
    def parked_fraction(self) -> float:
        """Fraction of the recorded cycles that ran at k = 0."""
        return self._hist.get(0, 0) / self._cycles if self._cycles else 0.0

    @property
    def parked(self) -> bool:
        """True when no k > 0 is currently expected to beat k = 0."""
        return self._best == 0

    @property
    def probe_spacing(self) -> int:
        """Cycles per probe while parked (one probe, S-1 plain cycles)."""
        return self._spacing

    def cycle_seconds(self, k: int) -> float:
        """The model's T(k): seconds once anything was measured or
        calibrated, else relative units with T(0) = 1."""
        return self._t[k]

    def expected_rate(self, k: int) -> float:
        """Expected committed tokens per second (same units as
        cycle_seconds) when drafting k."""
        if not 0 <= k <= self.k_max:
            raise ValueError(f"k={k} outside 0..{self.k_max}")
        return self._rates[k]

    def reason(self) -> Optional[str]:
        """When parked, a short human reason; None while drafting."""
        if self._best > 0:
            return None
        if self.k_max == 0:
            return "parked: k_max is 0"
        a1 = self._a[0]
        ratio = self._t[self._probe_k] / self._t[0]
        return (f"parked: drafts accepted {a1:.0%}, a verify costs {ratio:.1f} steps; "
                f"probing k={self._next_probe} every {self._spacing} cycles")

    def __repr__(self) -> str:
        a = ", ".join(f"{x:.2f}" for x in self._a)
        return (f"DraftPolicy(k_max={self.k_max}, best={self._best}, "
                f"acceptance=[{a}], cycles={self._cycles})")

    # -- internals ------------------------------------------------------------

    def _refresh_due(self) -> bool:
        # While drafting, T(0) is never measured and drifts with context;
        # an occasional plain cycle keeps "never slower" honest.
        if self._refresh_every == 0:
            return False
        if self._t_n[0] == 0:
            limit = min(self._refresh_unmeasured, self._refresh_every)
            # Right after a warm-up-discarded k=0 cycle, measure it again.
            if self._t_seen[0] > 0:
                limit = 1
            return self._since_plain >= max(limit, 1)
        return self._since_plain >= self._refresh_interval

    def _observe_acceptance(self, k: int, accepted: int) -> None:
        # Age every depth, then add this cycle: depths 1..accepted accepted,
        # depth accepted+1 rejected (if it was drafted); deeper depths were
        # not tested (their outcome is unknown), so they get no count.
        d = self._acc_decay
        acc, obs = self._acc, self._obs
        for j in range(self.k_max):
            acc[j] *= d
            obs[j] *= d
        for j in range(accepted):
            acc[j] += 1.0
            obs[j] += 1.0
        if accepted < k:
            obs[accepted] += 1.0

    def _age_while_parked(self) -> None:
        # Parked cycles bring no acceptance evidence; ageing it lets the
        # sparse probes weigh more, bounded below by idle_floor (depth 1).
        if not self.k_max or self._idle_decay >= 1.0:
            return
        obs0 = self._obs[0]
        if obs0 <= self._idle_floor:
            return
        f = max(self._idle_decay, self._idle_floor / obs0)
        for j in range(self.k_max):
            self._acc[j] *= f
            self._obs[j] *= f

    def _observe_time(self, k: int, seconds: float) -> None:
        self._t_seen[k] += 1
        if self._t_seen[k] <= self._warmup:
            return  # warm-up: compilation and first-touch costs
        n = self._t_n[k]
        if n:
            x = min(seconds, self._clip * self._t_mean[k])
            # 1/n weights until the window fills, then exponential.
            w = max(1.0 - self._t_decay, 1.0 / (n + 1))
            self._t_mean[k] += w * (x - self._t_mean[k])
        else:
            # First retained value: clip against the model if the model
            # rests on any measurement (a second warm-up cycle, a GC pause).
            x = seconds
            if any(self._t_n):
                x = min(x, self._clip * self._t[k])
            self._t_mean[k] = x
        self._t_n[k] = n + 1

    def _shape(self, k: int) -> float:
        if self.costs is not None and self.costs.verify:
            return self.costs.cycle_seconds(k)
        return 1.0 + self._growth * k

    def _fit_times(self) -> None:
        # Every drafting cycle pays costs a plain one does not (the read
        # that ends it stops the pipelining of plain steps; the accept
        # step), so T(k) for k >= 1 is a fixed cost plus a cost per draft
        # token. A line through T(0) would charge that fixed cost again for
        # every extra token (in the tiny regime T(1) is over two plain
        # steps, while each further token adds a fraction of one), so the
        # line is fitted through the drafting k's alone once two of them are
        # measured. With one drafting k the line from T(0) stays: an upper
        # bound on deeper drafts, which keeps the policy from drafting deep
        # on a guess; the deep probes measure the second k.
        K = self.k_max
        t, n, mean = self._t, self._t_n, self._t_mean
        drafting = [k for k in range(1, K + 1) if n[k]]
        lo = min((mean[k] for k in range(K + 1) if n[k]), default=math.inf)
        if len(drafting) >= 2:
            cnt = len(drafting)
            kbar = sum(drafting) / cnt
            ybar = sum(mean[k] for k in drafting) / cnt
            var = sum(k * k for k in drafting) / cnt - kbar * kbar
            cov = sum(k * mean[k] for k in drafting) / cnt - kbar * ybar
            # A bigger k is never cheaper (b >= 0); below the measured
            # range the line must stay positive.
            b = max(cov / var, 0.0) if var > 0 else 0.0
            a = ybar - b * kbar
            for k in range(1, K + 1):
                t[k] = mean[k] if n[k] else max(a + b * k, 0.25 * lo)
            # T(0) unmeasured: the line's intercept, never above T(1).
            t[0] = mean[0] if n[0] else max(min(a, t[1]), 0.25 * lo)
            return
        measured = [k for k in range(K + 1) if n[k]]
        if len(measured) == 2:
            # T(0) and one drafting k: the line through both.
            k1 = measured[1]
            b = max(mean[k1] - mean[0], 0.0) / k1
            for k in range(K + 1):
                t[k] = mean[k] if n[k] else max(mean[0] + b * k, 0.25 * lo)
        elif measured:
            # One measured k: scale the known (or default) shape to it.
            only = measured[0]
            scale = mean[only] / self._shape(only)
            for k in range(K + 1):
                t[k] = mean[k] if k == only else scale * self._shape(k)
        else:
            for k in range(K + 1):
                t[k] = self._shape(k)

    def _estimate_acceptance(self) -> None:
        acc, obs, a = self._acc, self._obs, self._a
        above = self._prior
        for j in range(self.k_max):
            if j == 0:
                est = acc[0] / obs[0] if obs[0] > 1e-12 else self._prior
            else:
                est = (acc[j] + self._shrink * above) / (obs[j] + self._shrink) \
                    if obs[j] + self._shrink > 1e-12 else above
            est = min(max(est, 0.0), 1.0)
            a[j] = est
            above = est

    def _recompute(self) -> None:
        # O(k_max): estimates, time model, rates, decision, probe spacing.
        self._estimate_acceptance()
        self._fit_times()
        t = self._t
        k = _argmax_rate(self._a, t.__getitem__, self.k_max, self._rates)
        # Hysteresis: the margin guards the step from parked to drafting;
        # a policy already drafting keeps on while it is expected to beat
        # plain decoding by the smaller `stay_margin`.
        margin = self._margin if self._best == 0 else self._stay_margin
        if k > 0 and self._rates[k] <= self._rates[0] * (1.0 + margin):
            k = 0
        self._best = k
        if k > 0 and self._refresh_every:
            # A refresh run of c plain cycles loses about c*g/(1+g) plain
            # steps against drafting at gain g, over R cycles of E(k)/(1+g)
            # plain steps each: R = c*g / (budget * E(k)) keeps the loss
            # within the budget.
            gain = self._rates[k] / self._rates[0] - 1.0
            tokens = self._rates[k] * t[k]
            r = math.ceil(self._refresh_cycles * max(gain, 0.0) / (self._refresh_budget * tokens))
            self._refresh_interval = min(max(r, self._refresh_min), self._refresh_every)
        if k == 0 and self._probe_k > 0:
            s = self._spacing_for(self._probe_k)
            self._next_probe = self._probe_k
            self._spacing = min(max(s, self._min_spacing), self._max_spacing)
            # One deeper after a probe whose first draft was accepted: only
            # then can a deeper draft pay.
            if self._deeper and self._probe_hit:
                # A deep probe may wait up to twice the cap, so that its
                # own spacing keeps the bound (its time is estimated from
                # the line through T(0), an upper bound, until measured).
                s = self._spacing_for(self._probe_k + 1)
                if s <= 2 * self._max_spacing:
                    self._next_probe = self._probe_k + 1
                    self._spacing = max(s, self._spacing)

    def _spacing_for(self, k: int) -> int:
        # The fewest cycles per probe of k within the budget (see class doc).
        t = self._t
        overhead = max(t[k] - t[0], 0.0)
        return math.ceil(overhead / (self._budget * t[0]) - 1e-9)


# ---------------------------------------------------------------------------
# Several draft sources


class SourcePolicies:
    """One draft-length policy per source of a combined drafter: prompt
    lookup in front of a model drafter (drafters/combined.py).

    Each source is judged on its own cycles: its acceptance per depth and
    its cycle times (a lookup draft costs no drafter time, so its T(k) is
    the verify pass alone). Per cycle the engine says whether the lookup has
    drafts (`select`). The lookup's policy then decides the cycle, unless it
    is parked: then the model's policy decides it, and the lookup's policy
    counts a parked cycle, so its probes keep their spacing and a lookup
    that starts paying is picked up again. Plain cycles cost the same
    whichever policy chose them, so their times go to both.

    `k_max`, `choose`, `update`, `observe_plain`, `new_sequence` and `reason` are those of a
    single policy (the engine drives this one like any other); `choose`,
    `update` and `reason` act on the source `select` picked.
    """

    def __init__(self, lookup: Any, model: Any) -> None:
        self.lookup, self.model = lookup, model
        self.k_max: int = max(lookup.k_max, model.k_max)
        self.active = model
        self._lookup_parked = False  # the lookup had drafts, its policy said 0

    def peek(self, lookup_has_drafts: bool) -> int:
        """The k the next cycle would draft; changes nothing."""
        if lookup_has_drafts:
            k = self.lookup.choose()
            if k > 0:
                return k
        return self.model.choose()

    def select(self, lookup_has_drafts: bool, plain: bool = False) -> bool:
        """Pick the policy of the next cycle; True when the lookup drafts it.
        `plain`: the cycle is already a plain step (queued before its input
        was known): the model's policy owns it, and a lookup that had
        drafts counts it as parked, so its probe schedule still advances."""
        uses_lookup = lookup_has_drafts and not plain and self.lookup.choose() > 0
        self._lookup_parked = lookup_has_drafts and not uses_lookup
        self.active = self.lookup if uses_lookup else self.model
        return uses_lookup

    def choose(self) -> int:
        return self.active.choose()

    def update(self, k: int, accepted: int, seconds: Optional[float]) -> None:
        self.active.update(k, accepted, seconds)
        if self._lookup_parked:
            self.lookup.update(0, 0, None)
            self._lookup_parked = False
        if k == 0 and isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0:
            other = self.model if self.active is self.lookup else self.lookup
            if hasattr(other, "observe_plain"):
                other.observe_plain(1, seconds)

    def new_sequence(self) -> None:
        for policy in (self.lookup, self.model):
            if hasattr(policy, "new_sequence"):
                policy.new_sequence()

    def observe_plain(self, cycles: int, seconds: float) -> None:
        for policy in (self.lookup, self.model):
            if hasattr(policy, "observe_plain"):
                policy.observe_plain(cycles, seconds)

    def reason(self) -> Optional[str]:
        return self.active.reason()
