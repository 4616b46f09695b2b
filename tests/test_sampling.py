"""Rejection sampling reproduces the target distribution.

Bound used throughout: Pearson chi-square over the cells with expected count
>= 5 (rarer cells pooled into one), p-value > 1e-3 (Wilson-Hilferty
approximation of the chi-square tail). Seeds are fixed, so the tests are
deterministic; a broken accept rule (e.g. exact-match acceptance at
temperature > 0, or a wrong residual) fails them by many orders of magnitude.
"""

import math
from collections import Counter
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np
import pytest

import tiny
from mlx_mtp import SamplingParams, Stats, decode
from mlx_mtp.drafters import Drafter, MTPDrafter
from mlx_mtp.sampling import accept_sampled, probabilities


def chi_square_p_value(observed: Dict, expected_probs: Dict, n: int) -> float:
    cells = set(observed) | {c for c, p in expected_probs.items() if p > 0}
    assert set(observed) <= {c for c, p in expected_probs.items() if p > 0}, "sampled an impossible outcome"
    stat, dof, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for c in cells:
        e = expected_probs.get(c, 0.0) * n
        o = observed.get(c, 0)
        if e < 5:
            pooled_obs += o
            pooled_exp += e
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
        dof += 1
    dof = max(dof, 1)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_transform_matches_mlx_lm_filters():
    logits = mx.array(np.random.default_rng(0).standard_normal((3, 50)).astype(np.float32))
    p = probabilities(logits, SamplingParams(temp=0.7, top_k=5))
    assert np.allclose(np.array(p.sum(-1)), 1.0, atol=1e-5)
    assert ((np.array(p) > 0).sum(-1) == 5).all()
    p = probabilities(logits, SamplingParams(temp=1.0, top_p=0.5))
    ref = np.array(mx.softmax(logits, -1))
    for row, ref_row in zip(np.array(p), ref):
        kept = row > 0
        assert ref_row[kept].sum() >= 0.5 - 1e-6
        assert ref_row[~kept].max(initial=0) <= ref_row[kept].min() + 1e-7


def test_accept_rule_reproduces_fixed_distributions():
    """Synthetic history-independent target: p_j fixed per position, drafts
    from a very different q_j. Emitted token j must follow p_j."""
    rng = np.random.default_rng(1)
    V, k, n_samples = 6, 3, 6000
    p_logits = mx.array(rng.standard_normal((k + 1, V)).astype(np.float32) * 1.5)
    q = mx.softmax(mx.array(rng.standard_normal((k, V)).astype(np.float32) * 2.0), axis=-1)
    params = SamplingParams(temp=1.0)
    p = np.array(probabilities(p_logits, params))

    def one(key):
        dkey, akey = mx.random.split(key)
        drafts = mx.random.categorical(mx.log(q), key=dkey).astype(mx.int32)
        n, bonus = accept_sampled(p_logits, drafts, q, params, akey)
        return mx.concatenate([n.reshape(1), drafts, bonus.reshape(1)])

    keys = mx.random.split(mx.random.key(7), n_samples)
    rows = np.array(mx.stack([one(keys[i]) for i in range(n_samples)]))
    counts = [Counter() for _ in range(k + 1)]
    reached = [0] * (k + 1)
    for row in rows:
        n, drafts, bonus = int(row[0]), row[1 : k + 1], int(row[k + 1])
        emitted = list(drafts[:n]) + [bonus]
        for j, t in enumerate(emitted):
            counts[j][int(t)] += 1
            reached[j] += 1
    assert reached[0] == n_samples and 0 < reached[1] < n_samples  # rejections happen
    for j in range(k + 1):
        if reached[j] < 200:
            continue
        expected = {t: float(p[j, t]) for t in range(V)}
        assert chi_square_p_value(counts[j], expected, reached[j]) > 1e-3, j


class PoorDrafter(Drafter):
    """Drafts from a fixed distribution with no knowledge of the target:
    most drafts are rejected, exercising the residual distribution."""

    name = "poor"

    def __init__(self, vocab: int, seed: int = 0):
        logits = np.random.default_rng(seed).standard_normal(vocab) * 3
        self.q = mx.softmax(mx.array(logits.astype(np.float32)))

    def reset(self):
        pass

    def observe(self, next_tokens, hidden):
        pass

    def draft(self, k: int, params: SamplingParams, key: Optional[mx.array],
              history: Optional[mx.array] = None) -> Tuple[mx.array, Optional[mx.array]]:
        q = mx.broadcast_to(self.q, (k, self.q.shape[0]))
        return mx.random.categorical(mx.log(q), key=key).astype(mx.int32), q


def _exact_joint(model, prompt, params: SamplingParams, length: int) -> Dict[Tuple[int, ...], float]:
    """Exact probability of every continuation of `length` tokens (top-k keeps this small)."""
    joint = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, pr in joint.items():
            hidden = model.hidden(mx.array(prompt + list(prefix))[None])
            probs = np.array(probabilities(model.logits(hidden[:, -1, :])[0], params))
            for t in np.nonzero(probs)[0]:
                nxt[prefix + (int(t),)] = pr * float(probs[t])
        joint = nxt
    return joint


@pytest.mark.parametrize("drafter_kind", ["poor", "mtp"])
def test_speculative_sampling_matches_target_distribution(drafter_kind):
    model = tiny.build(tiny.text_config(), seed=5, predictable=True, noise=2.0)
    params = SamplingParams(temp=1.0, top_k=3)
    prompt = [5, 17, 33]
    length, n_samples = 4, 1000
    exact = _exact_joint(model, prompt, params, length)
    drafter = PoorDrafter(tiny.VOCAB) if drafter_kind == "poor" else MTPDrafter(model)
    observed, stats_total = Counter(), Stats()
    for seed in range(n_samples):
        stats = Stats()
        out = [
            t
            for c in decode(model, prompt, drafter=drafter, num_draft=3, params=params,
                            max_tokens=length, seed=seed, stats=stats)
            for t in c.tokens
        ]
        observed[tuple(out)] += 1
        stats_total.draft_tokens += stats.draft_tokens
        stats_total.accepted_tokens += stats.accepted_tokens
    # Deliberately imperfect drafters: there must be rejections to test.
    assert 0 < stats_total.accepted_tokens < stats_total.draft_tokens
    p_value = chi_square_p_value(observed, exact, n_samples)
    assert p_value > 1e-3, (p_value, stats_total.acceptance_rate)


def test_seed_makes_sampling_reproducible():
    model = tiny.build(tiny.text_config(), seed=5, predictable=True, noise=2.0)
    params = SamplingParams(temp=0.8, top_p=0.9)

    def sample_run(seed):
        return [t for c in decode(model, [3, 4], drafter=MTPDrafter(model), num_draft=2,
                                  params=params, max_tokens=20, seed=seed) for t in c.tokens]

    assert sample_run(11) == sample_run(11)
    assert sample_run(11) != sample_run(12)
