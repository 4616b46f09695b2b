"""Checks the MTP-head families' tests (test_glm4_moe, test_deepseek_v3,
test_qwen3_next, test_mimo) share: greedy and sampled losslessness,
rollback of the trunk's and the head's caches, loading a raw directory and
one stripped of its head. Each takes the family's own `run` where the
families' helpers differ."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from test_sampling import _exact_joint, chi_square_p_value

import mlx_mtp
from mlx_mtp import SamplingParams, Stats, decode
from mlx_mtp.api import DrafterUnavailableError
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.testing import VOCAB


def raw_tensors(model_dir) -> dict:
    """A raw directory's tensors by their stored names, as float32 numpy."""
    out = {}
    for f in sorted(model_dir.glob("model-*.safetensors")):
        out.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(f)).items()})
    return out


def assert_greedy_equals_plain(target, plain_runs, prompts, k, run) -> None:
    """Greedy speculative decoding with `k` drafts gives `plain_runs`' tokens
    for every prompt, one host sync a cycle, with acceptances and rejections.
    `run(target, prompt, k)` -> (tokens, stats)."""
    accepted = drafted = 0
    for prompt in prompts:
        spec, stats = run(target, prompt, k)
        assert spec == plain_runs[tuple(prompt)], f"k={k} prompt={prompt}"
        assert stats.host_syncs_per_cycle == 1.0
        accepted += stats.accepted_tokens
        drafted += stats.draft_tokens
    assert 0 < accepted < drafted  # both acceptances and rejections


def assert_sampling_matches_target(target) -> None:
    """Temperature 1, top-k 3: the speculative run's 3-token continuations
    follow the target's exact joint distribution (chi-square p > 1e-3,
    300 fixed seeds, as tests/test_sampling.py)."""
    params, prompt, length, n = SamplingParams(temp=1.0, top_k=3), [5, 17, 33], 3, 300
    exact = _exact_joint(target, prompt, params, length)
    drafter, observed, total = MTPDrafter(target), {}, Stats()
    for seed in range(n):
        stats = Stats()
        out = tuple(t for c in decode(target, prompt, drafter=drafter, num_draft=2, params=params, max_tokens=length,
                                      seed=seed, stats=stats) for t in c.tokens)
        observed[out] = observed.get(out, 0) + 1
        total.draft_tokens += stats.draft_tokens
        total.accepted_tokens += stats.accepted_tokens
    assert 0 < total.accepted_tokens < total.draft_tokens
    assert chi_square_p_value(observed, exact, n) > 1e-3


def assert_caches_equal(spec_cache, plain_cache, cache_arrays, same_offset: bool = True) -> None:
    """The target's caches after a speculative run equal plain decoding's
    (rtol 1e-4, atol 1e-5); `same_offset`: with the same offsets too."""
    for a, b in zip(spec_cache, plain_cache):
        if same_offset:
            assert a.offset == b.offset
        for x, y in zip(cache_arrays(a), cache_arrays(b)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def assert_head_cache_matches_fresh_pass(model, drafter, sequence, cache_arrays) -> None:
    """The drafter's head cache equals a fresh head pass over every
    (next token, target hidden) pair of `sequence` (rtol, atol 1e-4)."""
    ref_cache = model.make_mtp_cache()
    model.mtp(model.embed(mx.array([sequence[1:]])), model.hidden(mx.array([sequence[:-1]])), ref_cache)
    for a, b in zip(drafter.cache, ref_cache):
        assert a.offset == b.offset == len(sequence) - 1
        for x, y in zip(cache_arrays(a), cache_arrays(b)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-4)


def assert_loads_with_head(model_dir, run, prompt, eos_token_id: int):
    """`mlx_mtp.load` on the raw directory gives the MTP drafter, no
    problem, the tokenizer's EOS, and speculative == plain on `prompt`.
    `run(target, prompt, k, max_tokens=, drafter=)` -> (tokens, stats).
    Returns the loaded model."""
    model, tokenizer = mlx_mtp.load(model_dir)
    assert isinstance(model.drafter, MTPDrafter) and model.drafter_note is None
    assert model.target.has_mtp and model.target.mtp_problem is None
    assert tokenizer.eos_token_id == eos_token_id
    plain, _ = run(model.target, prompt, 0, max_tokens=16)
    spec, stats = run(model.target, prompt, 3, max_tokens=16, drafter=model.drafter)
    assert spec == plain and stats.draft_tokens > 0
    return model


def assert_stripped_loads_plain(path, run, prompt, stripped_message: str) -> str:
    """A directory stripped of its head loads without a drafter, with a
    one-line note; MTPDrafter refuses it (`stripped_message`, a regex) and
    drafter="mtp" fails in one line; plain decoding still runs. Returns the
    note."""
    model, _ = mlx_mtp.load(path)
    assert model.drafter is None and not model.target.has_mtp
    note = model.drafter_note
    assert "\n" not in note
    with pytest.raises(ValueError, match=stripped_message):
        MTPDrafter(model.target)
    with pytest.raises(DrafterUnavailableError) as e:
        mlx_mtp.load(path, drafter="mtp")
    assert "\n" not in str(e.value)
    tokens, _ = run(model.target, prompt, 0, max_tokens=8)
    assert len(tokens) == 8 and all(0 <= t < VOCAB for t in tokens)
    return note
