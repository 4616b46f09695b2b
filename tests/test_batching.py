"""Batched speculative decoding (mlx_mtp/batching.py, docs/batching.md).

Lossless under concurrency: rows with different prompts and lengths, joining
at different steps, each produce exactly what their prompt gives alone with
plain decoding (greedy), on a Qwen3.5 hybrid with its MTP head and on Gemma 4
with its assistant (prompts longer than the sliding window, compacting every
few tokens). With a fixed k each row's drafts, acceptances and target passes
also equal its single-sequence speculative run: it drafts with its own state.
At temperature > 0 a batch reproduces the target distribution (4-token joint,
Pearson chi-square p > 1e-3, fixed seeds, as tests/test_sampling.py).
One host sync per cycle; cancel frees the row's arrays; a prompt that extends
a finished row pre-fills only its new tokens and decodes the same tokens.
A long prompt joining mid-stream pre-fills one chunk per step while the
running row keeps producing tokens; joining rows share padded prefill passes
(recurrent layers masked, KV rows trimmed) and still equal plain decoding.
"""

from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
import pytest
from test_sampling import _exact_joint, chi_square_p_value

import tiny
from mlx_mtp import SamplingParams, Stats, decode
from mlx_mtp.api import SpeculativeModel
from mlx_mtp.batching import PREFILL_PAD, BatchGenerator, PromptCacheLRU, RowEvent
from mlx_mtp.drafters import LookupThenModelDrafter, MTPDrafter, NGramDrafter
from mlx_mtp.drafters.gemma4_assistant import Gemma4AssistantDrafter
from mlx_mtp.engine import ContextLengthError
from mlx_mtp.models.batch_cache import RaggedKVCache
from mlx_mtp.models.gemma4 import SlidingWindowCache
from mlx_mtp.testing.gemma import WINDOW, assistant_config, build_assistant, build_target, hf_config, text_config

GREEDY = SamplingParams()
QWEN_PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43, 44, 45, 46, 47], list(range(2, 30)), [88, 3, 3, 3, 71], [7],
                [12, 13, 14], list(range(60, 20, -1))]
#: longer than the sliding window (8), so rounds already slide
GEMMA_PROMPTS = [list(range(3, 3 + 2 * WINDOW + 3)), [40, 41, 42] * WINDOW, [5, 17, 33, 2, 9], list(range(10, 40)),
                 [7, 8], list(range(50, 50 + 3 * WINDOW)), [60, 61] * 7]
MAX_TOKENS = [30, 20, 40, 25, 33, 12, 28]
ARRIVALS = [0, 0, 1, 3, 4, 6, 9]  # the step each request arrives at


@pytest.fixture(scope="module")
def qwen():
    # noise=1.6: the head is right about half the time (tests/test_engine.py).
    model = tiny.build(tiny.text_config(), seed=3, predictable=True, noise=1.6)
    return SpeculativeModel(model, MTPDrafter(model))


def _gemma(kind: str, layout: str, ordered: bool) -> SpeculativeModel:
    cfg = hf_config(kind, tie_word_embeddings=False) if layout == "gemma4" else text_config(kind, tie_word_embeddings=False)
    target = build_target(cfg, seed=1, predictable=True)
    assistant = build_assistant(assistant_config(cfg.get("text_config", cfg), ordered=ordered), target, seed=1,
                                predictable=True)
    return SpeculativeModel(target, Gemma4AssistantDrafter(assistant, target))


@pytest.fixture(scope="module", params=[("e2b", "gemma4", True), ("dense", "gemma4_text", False)],
                ids=["e2b-sparse-head", "dense"])
def gemma(request):
    return _gemma(*request.param)


def plain(model: SpeculativeModel, prompt, max_tokens, params=GREEDY, eos=()) -> List[int]:
    return [t for c in decode(model.target, prompt, num_draft=0, max_tokens=max_tokens, params=params,
                              eos_token_ids=eos) for t in c.tokens]


def alone(model: SpeculativeModel, prompt, max_tokens, k, eos=()) -> Tuple[List[int], Stats]:
    """The same request decoded speculatively on its own."""
    drafter = type(model.drafter)(model.target) if isinstance(model.drafter, MTPDrafter) else \
        Gemma4AssistantDrafter(model.drafter.assistant, model.target)
    stats = Stats()
    out = [t for c in decode(model.target, prompt, drafter=drafter, num_draft=k, max_tokens=max_tokens,
                             eos_token_ids=eos, stats=stats) for t in c.tokens]
    return out, stats


def run_batch(gen: BatchGenerator, requests: Sequence[dict], on_step=None) -> Dict[int, Tuple[List[int], RowEvent]]:
    """Add each request at its step ("at"), step until done. Returns per
    request index (tokens, final event)."""
    order = sorted(range(len(requests)), key=lambda i: requests[i].get("at", 0))
    ids: Dict[int, int] = {}
    tokens: Dict[int, List[int]] = {}
    final: Dict[int, RowEvent] = {}
    step = 0
    while order or gen.has_work():
        while order and requests[order[0]].get("at", 0) <= step:
            i = order.pop(0)
            r = requests[i]
            ids[gen.add(r["prompt"], r.get("params", GREEDY), r["max_tokens"], r.get("eos", ()),
                        seed=r.get("seed"))] = i
        events = gen.step()
        for e in events:
            tokens.setdefault(ids[e.row_id], []).extend(e.tokens)
            if e.finish_reason is not None:
                assert ids[e.row_id] not in final, "a row finished twice"
                final[ids[e.row_id]] = e
        if on_step is not None:
            on_step(step, gen, events, ids)
        step += 1
        assert step < 10_000
    return {i: (tokens.get(i, []), final[i]) for i in ids.values()}


def requests_for(prompts, eos_row: Optional[Tuple[int, int]] = None) -> List[dict]:
    reqs = [dict(prompt=p, max_tokens=n, at=a) for p, n, a in zip(prompts, MAX_TOKENS, ARRIVALS)]
    if eos_row is not None:
        reqs[eos_row[0]]["eos"] = (eos_row[1],)
    return reqs


def check_lossless(model: SpeculativeModel, reqs: List[dict], results, k: Optional[int],
                   every_row_rejects: bool = True) -> None:
    drafted = accepted = 0
    for i, r in enumerate(reqs):
        tokens, event = results[i]
        assert tokens == plain(model, r["prompt"], r["max_tokens"], eos=r.get("eos", ())), i
        s = event.stats
        assert s.generated_tokens == len(tokens)
        assert s.draft_tokens > 0, i
        if every_row_rejects:  # each row accepted some drafts and rejected some
            assert 0 < s.accepted_tokens < s.draft_tokens, (i, s.accepted_tokens, s.draft_tokens)
        assert s.host_syncs == s.target_passes
        if k is not None:
            # Same draft lengths, same drafter state: the row's cycles are
            # exactly those of its single-sequence speculative run.
            _, ref = alone(model, r["prompt"], r["max_tokens"], k, eos=r.get("eos", ()))
            assert (s.draft_tokens, s.accepted_tokens, s.target_passes) == \
                (ref.draft_tokens, ref.accepted_tokens, ref.target_passes), i
        drafted += s.draft_tokens
        accepted += s.accepted_tokens
    assert 0 < accepted < drafted  # acceptances and rejections both happen


def concurrency(seen: List[int]):
    def on_step(step, gen, events, ids):
        seen.append(len(gen._rows))
    return on_step


# --- lossless under concurrency -------------------------------------------------------


def test_qwen_rows_equal_plain_decoding(qwen):
    reqs = requests_for(QWEN_PROMPTS, eos_row=(3, plain(qwen, QWEN_PROMPTS[3], 25)[11]))
    seen: List[int] = []
    gen = BatchGenerator(qwen, max_batch=5, num_draft=3, prefill_chunk=6)
    results = run_batch(gen, reqs, concurrency(seen))
    check_lossless(qwen, reqs, results, k=3)
    assert max(seen) == 5 and gen.queued == 0  # a full batch, requests waited for a slot
    assert results[3][1].finish_reason == "stop" and results[0][1].finish_reason == "length"
    rejected = sum(s.target_passes - s.accepted_per_position[-1] for _, e in results.values() for s in [e.stats])
    assert rejected > 20  # many ragged rollbacks of KV, Gated-DeltaNet and head state


def test_gemma_rows_equal_plain_decoding(gemma, monkeypatch):
    # Compact every few tokens, so sliding rows drop their oldest keys (per
    # row, by different amounts) between rollbacks.
    monkeypatch.setattr(RaggedKVCache, "step", 3)
    monkeypatch.setattr(SlidingWindowCache, "step", 3)
    reqs = requests_for(GEMMA_PROMPTS)
    starts: List[int] = []

    def on_step(step, gen, events, ids):
        for c in gen.cache or []:
            if isinstance(c, RaggedKVCache) and c.window is not None:
                starts.extend(c.starts)
                assert all(n >= min(c.history, s + n) for s, n in zip(c.starts, c.lengths))

    results = run_batch(BatchGenerator(gemma, max_batch=4, num_draft=3, prefill_chunk=7), reqs, on_step)
    check_lossless(gemma, reqs, results, k=3)
    assert max(starts) > 0  # the window really slid


@pytest.mark.parametrize("num_draft", [1, 5])
def test_fixed_draft_lengths(qwen, num_draft):
    reqs = requests_for(QWEN_PROMPTS[:4])
    results = run_batch(BatchGenerator(qwen, max_batch=4, num_draft=num_draft, prefill_chunk=64), reqs)
    check_lossless(qwen, reqs, results, k=num_draft)
    for _, event in results.values():
        assert set(event.stats.k_histogram) <= set(range(num_draft + 1))


def test_per_request_draft_length(qwen):
    """A request's own num_draft: N drafts N in that row (0: none) next to
    rows that follow the generator's k."""
    gen = BatchGenerator(qwen, max_batch=4, num_draft=3, prefill_chunk=64)
    own = {0: 0, 1: 5, 2: None, 3: 1}
    ids = {gen.add(QWEN_PROMPTS[i], GREEDY, MAX_TOKENS[i], (), num_draft=own[i]): i for i in own}
    results: Dict[int, Tuple[List[int], Stats]] = {i: ([], None) for i in own}
    while gen.has_work():
        for e in gen.step():
            results[ids[e.row_id]][0].extend(e.tokens)
            results[ids[e.row_id]] = (results[ids[e.row_id]][0], e.stats)
    for i, k in own.items():
        tokens, stats = results[i]
        assert tokens == plain(qwen, QWEN_PROMPTS[i], MAX_TOKENS[i]), i
        ref = alone(qwen, QWEN_PROMPTS[i], MAX_TOKENS[i], 3 if k is None else k)[1]
        assert (stats.draft_tokens, stats.accepted_tokens, stats.target_passes) == \
            (ref.draft_tokens, ref.accepted_tokens, ref.target_passes), i
    assert results[0][1].draft_tokens == 0 and results[0][1].drafter == "none"
    with pytest.raises(ValueError):
        gen.add([5], GREEDY, 4, (), num_draft=-1)


def test_auto_draft_length_per_batch_size(qwen):
    """One adaptive policy per batch-size bucket; rows stay lossless and
    draft from the first cycle of a bucket."""
    reqs = requests_for(QWEN_PROMPTS)
    gen = BatchGenerator(qwen, max_batch=8, num_draft="auto", prefill_chunk=64)
    results = run_batch(gen, reqs)
    check_lossless(qwen, reqs, results, k=None, every_row_rejects=False)
    used = {bucket for bucket, policy in gen._policies.items() if policy.cycles}
    assert used >= {2, 4, 8}, used
    assert gen._policies[1] is qwen.draft_policy  # the model's own, shared with single-sequence calls


@pytest.mark.parametrize("kind", ["ngram", "mtp+ngram"])
def test_prompt_lookup_rows(qwen, kind):
    """Prompt lookup drafts per row from its own n-gram index (host drafts,
    rows without a match draft nothing that cycle); with a model drafter
    behind it the batch drafts with the model drafter."""
    drafter = NGramDrafter() if kind == "ngram" else LookupThenModelDrafter(MTPDrafter(qwen.target))
    model = SpeculativeModel(qwen.target, drafter)
    prompts = [[5, 17, 33, 2, 9] * 3, [40, 41, 42, 43] * 4, QWEN_PROMPTS[2], [88, 3, 3, 3, 71]]
    reqs = [dict(prompt=p, max_tokens=n, at=a) for p, n, a in zip(prompts, (40, 30, 40, 35), (0, 1, 1, 4))]
    results = run_batch(BatchGenerator(model, max_batch=3, num_draft=4, prefill_chunk=16), reqs)
    for i, r in enumerate(reqs):
        tokens, event = results[i]
        assert tokens == plain(qwen, r["prompt"], r["max_tokens"]), i
        assert event.stats.draft_tokens > 0 and event.stats.accepted_tokens > 0


def test_mlx_lm_target_rows():
    """Any mlx-lm model with plain KV caches batches too (prompt lookup)."""
    from mlx_mtp.models.mlx_lm_target import MlxLmTarget
    from mlx_mtp.testing import mlx_lm_models

    cfg = mlx_lm_models.config("llama", tie_word_embeddings=False)
    model = SpeculativeModel(MlxLmTarget(mlx_lm_models.build(cfg, predictable=True), cfg), NGramDrafter())
    reqs = [dict(prompt=p, max_tokens=30, at=a) for p, a in (([5, 6, 7, 8, 9], 0), ([20, 21, 22, 23] * 3, 0), ([40], 2))]
    results = run_batch(BatchGenerator(model, max_batch=3, num_draft=4), reqs)
    for i, r in enumerate(reqs):
        assert results[i][0] == plain(model, r["prompt"], r["max_tokens"]), i
    assert sum(e.stats.accepted_tokens for _, e in results.values()) > 0


def test_plain_decoding_without_drafter(qwen):
    reqs = requests_for(QWEN_PROMPTS[:5])
    for gen in (BatchGenerator(SpeculativeModel(qwen.target, None), max_batch=3),
                BatchGenerator(qwen, max_batch=3, num_draft=0)):
        results = run_batch(gen, reqs)
        for i, r in enumerate(reqs):
            tokens, event = results[i]
            assert tokens == plain(qwen, r["prompt"], r["max_tokens"])
            assert event.stats.draft_tokens == 0 and event.stats.drafter == "none"


def test_penalties_and_mixed_params(qwen):
    """Penalised greedy rows next to plain ones: each is its prompt's plain
    decoding with its own penalties (sampling.penalize per row)."""
    params = [SamplingParams(repetition_penalty=1.3, repetition_context_size=8), GREEDY,
              SamplingParams(presence_penalty=0.5, frequency_penalty=0.3, repetition_context_size=12), GREEDY]
    reqs = [dict(prompt=p, max_tokens=n, at=a, params=q)
            for p, n, a, q in zip(QWEN_PROMPTS, MAX_TOKENS, ARRIVALS, params)]
    results = run_batch(BatchGenerator(qwen, max_batch=4, num_draft=3, prefill_chunk=64), reqs)
    for i, r in enumerate(reqs):
        tokens, event = results[i]
        assert tokens == plain(qwen, r["prompt"], r["max_tokens"], params=r["params"]), i
        assert event.stats.draft_tokens > 0


# --- prefill while rows decode ------------------------------------------------------------


def test_long_prompt_prefills_in_chunks_while_a_row_decodes(qwen):
    """A long prompt that joins mid-stream pre-fills one chunk per step; the
    running row gets a cycle, and tokens, in every one of those steps; both
    rows equal plain decoding (and their single-sequence speculative runs)."""
    chunk = 8
    long_prompt = [(7 * i) % 90 + 5 for i in range(10 * chunk + 3)]
    reqs = [dict(prompt=QWEN_PROMPTS[0], max_tokens=80), dict(prompt=long_prompt, max_tokens=20)]
    gen = BatchGenerator(qwen, max_batch=4, num_draft=3, prefill_chunk=chunk)
    running = gen.add(reqs[0]["prompt"], GREEDY, reqs[0]["max_tokens"], ())
    tokens: Dict[int, List[int]] = {0: [], 1: []}
    final: Dict[int, RowEvent] = {}
    ids = {running: 0}
    during_prefill: List[int] = []  # the running row's new tokens in each step the long prompt pre-filled
    step = 0
    while gen.has_work():
        if step == 3:
            ids[gen.add(long_prompt, GREEDY, reqs[1]["max_tokens"], ())] = 1
        prefilling = step >= 3 and not tokens[1]
        events = gen.step()
        for e in events:
            tokens[ids[e.row_id]].extend(e.tokens)
            if e.finish_reason is not None:
                final[ids[e.row_id]] = e
        if prefilling:
            during_prefill.append(sum(len(e.tokens) for e in events if e.row_id == running))
        step += 1
    # One chunk per step: the long prompt's first token comes in the step
    # its last chunk runs, and the running row decoded in each of them.
    assert len(during_prefill) == -(-len(long_prompt) // chunk)
    assert all(n > 0 for n in during_prefill), during_prefill
    assert sum(during_prefill) < len(tokens[0])  # it was still running afterwards
    check_lossless(qwen, reqs, {i: (tokens[i], final[i]) for i in (0, 1)}, k=3, every_row_rejects=False)


def test_a_short_prompt_does_not_wait_for_a_long_ones_chunks(qwen):
    """A short prompt that arrives while a long one pre-fills starts in the
    step it is admitted (short rests go first, within half the budget); the
    long one keeps at least half of every step; both equal plain decoding."""
    chunk = 16
    long_prompt = [(7 * i) % 90 + 5 for i in range(6 * chunk + 3)]
    short_prompt = QWEN_PROMPTS[0][: chunk // 4]
    reqs = [dict(prompt=long_prompt, max_tokens=12), dict(prompt=short_prompt, max_tokens=12)]
    gen = BatchGenerator(qwen, max_batch=4, num_draft=3, prefill_chunk=chunk)
    ids = {gen.add(long_prompt, GREEDY, 12, ()): 0}
    tokens: Dict[int, List[int]] = {0: [], 1: []}
    final: Dict[int, RowEvent] = {}
    first_step: Dict[int, int] = {}
    long_progress: List[int] = []
    step = 0
    while gen.has_work():
        if step == 1:
            ids[gen.add(short_prompt, GREEDY, 12, ())] = 1
        before = next((r.begin for r in gen._joining if ids.get(r.row_id) == 0), None)
        events = gen.step()
        after = next((r.begin for r in gen._joining if ids.get(r.row_id) == 0), len(long_prompt))
        if before is not None:
            long_progress.append(after - before)
        for e in events:
            i = ids[e.row_id]
            if e.tokens and i not in first_step:
                first_step[i] = step
            tokens[i].extend(e.tokens)
            if e.finish_reason is not None:
                final[i] = e
        step += 1
    assert first_step[1] == 1  # admitted and started in the same step
    assert first_step[0] > first_step[1]  # the long one was still pre-filling
    assert all(n >= chunk // 2 for n in long_progress[:-1]), long_progress
    check_lossless(qwen, reqs, {i: (tokens[i], final[i]) for i in (0, 1)}, k=3, every_row_rejects=False)


@pytest.mark.parametrize("which", ["qwen", "gemma"])
def test_joining_rows_share_padded_prefill_passes(qwen, which, monkeypatch):
    """Rows joining together pre-fill in one target pass: shorter chunks are
    padded (Gated-DeltaNet masked, KV rows trimmed, Gemma's sliding rows
    compacting every few tokens), a row mid-prefill joins fresh ones, and
    every row still equals plain decoding and its own speculative run."""
    if which == "gemma":
        monkeypatch.setattr(RaggedKVCache, "step", 3)
        monkeypatch.setattr(SlidingWindowCache, "step", 3)
    model = qwen if which == "qwen" else _gemma("dense", "gemma4_text", False)
    prompts = QWEN_PROMPTS if which == "qwen" else GEMMA_PROMPTS
    # With 16 tokens a step, oldest first: a long prompt's last chunk next to
    # the first chunks of rows that joined after it.
    picks, arrivals = ((2, 6, 0, 1, 3), (0, 0, 1, 1, 2)) if which == "qwen" else ((0, 2, 4, 6, 1), (0, 1, 1, 1, 2))
    reqs = [dict(prompt=prompts[i], max_tokens=MAX_TOKENS[i] // 2 + 6, at=a) for i, a in zip(picks, arrivals)]
    gen = BatchGenerator(model, max_batch=5, num_draft=3, prefill_chunk=16)
    passes: List[List[Tuple[int, int]]] = []
    real = gen._prefill_pass
    monkeypatch.setattr(gen, "_prefill_pass",
                        lambda group: passes.append([(row.begin, size) for row, size in group]) or real(group))
    results = run_batch(gen, reqs)
    check_lossless(model, reqs, results, k=3, every_row_rejects=False)
    shared = [p for p in passes if len(p) > 1]
    assert max(len(p) for p in shared) >= 3, passes  # several joining rows in one pass
    assert any(len({size for _, size in p}) > 1 for p in shared), passes  # padded
    assert any(any(begin > 0 for begin, _ in p) for p in shared), passes  # a row with cached state among them
    for p in shared:
        sizes = [size for _, size in p]
        assert max(sizes) - min(sizes) <= PREFILL_PAD


# --- sampling -----------------------------------------------------------------------------


def test_sampling_distribution_in_a_batch():
    """1000 rows at temperature 1 (top-k 3), 8 at a time in continuous
    batching next to greedy rows with other prompts, one seed each: the
    4-token joint of the sampled rows matches the exact target joint
    (chi-square p > 1e-3; a broken accept rule fails by orders of magnitude)."""
    model = tiny.build(tiny.text_config(), seed=5, predictable=True, noise=2.0)
    spec = SpeculativeModel(model, MTPDrafter(model))
    params = SamplingParams(temp=1.0, top_k=3)
    prompt, length, n_samples = [5, 17, 33], 4, 1000
    exact = _exact_joint(model, prompt, params, length)
    reqs = [dict(prompt=prompt, max_tokens=length, params=params, seed=s, at=s // 6) for s in range(n_samples)]
    companions = [dict(prompt=p, max_tokens=12, at=40 * j) for j, p in enumerate(QWEN_PROMPTS[:5])]
    results = run_batch(BatchGenerator(spec, max_batch=8, num_draft=3, prefill_chunk=64), reqs + companions)
    observed, drafted, accepted = {}, 0, 0
    for i in range(n_samples):
        tokens, event = results[i]
        observed[tuple(tokens)] = observed.get(tuple(tokens), 0) + 1
        drafted += event.stats.draft_tokens
        accepted += event.stats.accepted_tokens
    assert 0 < accepted < drafted
    p_value = chi_square_p_value(observed, exact, n_samples)
    assert p_value > 1e-3, p_value
    for j, r in enumerate(companions):
        assert results[n_samples + j][0] == plain(spec, r["prompt"], r["max_tokens"])


def test_seed_reproduces_a_row_alone(qwen):
    """A sampled row with a seed is the same in a batch as alone (k fixed):
    its keys are its own."""
    params = SamplingParams(temp=0.8, top_p=0.9)
    prompt, n = QWEN_PROMPTS[1], 24
    alone_tokens = [t for c in decode(qwen.target, prompt, drafter=MTPDrafter(qwen.target), num_draft=2,
                                      params=params, max_tokens=n, seed=11) for t in c.tokens]
    reqs = [dict(prompt=QWEN_PROMPTS[0], max_tokens=30), dict(prompt=prompt, max_tokens=n, params=params, seed=11, at=2),
            dict(prompt=QWEN_PROMPTS[2], max_tokens=20, params=params, seed=3, at=1)]
    results = run_batch(BatchGenerator(qwen, max_batch=3, num_draft=2), reqs)
    assert results[1][0] == alone_tokens


# --- host syncs --------------------------------------------------------------------------


def test_one_host_sync_per_cycle(qwen, monkeypatch):
    """A step with only decoding rows reads the device once (the packed
    result) and never calls mx.eval; prefill chunks are queued without a
    sync of their own while rows decode."""
    counts = {"eval": 0, "tolist": 0, "item": 0}
    real_eval, real_tolist, real_item = mx.eval, mx.array.tolist, mx.array.item

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(mx, "eval", counting("eval", real_eval))
    monkeypatch.setattr(mx.array, "tolist", counting("tolist", real_tolist))
    monkeypatch.setattr(mx.array, "item", counting("item", real_item))
    gen = BatchGenerator(qwen, max_batch=4, num_draft=3, prefill_chunk=4)
    for p, n in zip(QWEN_PROMPTS[:3], (40, 40, 40)):
        gen.add(p, GREEDY, n, ())
    decode_steps = prefill_steps = 0
    while gen.has_work():
        before = dict(counts)
        joining, decoding = len(gen._joining) + gen.queued, len(gen._rows)
        gen.step()
        delta = {k: counts[k] - before[k] for k in counts}
        if decoding and not joining:
            decode_steps += 1
            assert delta == {"eval": 0, "tolist": 1, "item": 0}, delta
        elif decoding:
            prefill_steps += 1
            # The cycle's read, plus the first token's when the prefill ends.
            assert delta["eval"] == 0 and delta["item"] == 0 and delta["tolist"] in (1, 2), delta
    assert decode_steps > 10 and prefill_steps > 3


# --- cancel and memory ---------------------------------------------------------------------


def test_cancel_leaves_others_correct_and_frees_memory(qwen):
    mx.eval(qwen.target.parameters())
    baseline = mx.get_active_memory()
    reqs = requests_for(QWEN_PROMPTS[:5])
    gen = BatchGenerator(qwen, max_batch=3, num_draft=3, prefill_chunk=6, prompt_cache_bytes=0)
    ids: Dict[int, int] = {}
    for i, r in enumerate(reqs):
        ids[gen.add(r["prompt"], GREEDY, r["max_tokens"], ())] = i
    victims = {1: 6, 3: 0, 4: 2}  # request -> step it is cancelled at: decoding, queued, joining
    tokens: Dict[int, List[int]] = {}
    finish: Dict[int, str] = {}
    step = 0
    while gen.has_work():
        for i, at in victims.items():
            if at == step:
                row_id = next(r for r, j in ids.items() if j == i)
                decoding = any(r.row_id == row_id for r in gen._rows)
                rows_before, bytes_before = len(gen._rows), gen.cache_nbytes
                gen.cancel(row_id)
                if decoding:  # its rows of every cache are gone already
                    assert len(gen._rows) == rows_before - 1 and (gen.cache.size if gen.cache else 0) == rows_before - 1
                    assert gen.cache_nbytes < bytes_before
        for e in gen.step():
            tokens.setdefault(ids[e.row_id], []).extend(e.tokens)
            if e.finish_reason:
                finish[ids[e.row_id]] = e.finish_reason
        step += 1
    for i, r in enumerate(reqs):
        if i in victims:
            assert finish[i] == "cancelled"
        else:
            assert finish[i] == "length" and tokens[i] == plain(qwen, r["prompt"], r["max_tokens"])
    assert 0 < len(tokens.get(1, [])) < reqs[1]["max_tokens"]  # cancelled mid-way
    gen.cancel(12345)  # unknown rows are ignored
    # Every cache array is dropped: memory is back where it was.
    assert gen.cache_nbytes == 0 and not gen.has_work()
    mx.clear_cache()
    assert mx.get_active_memory() - baseline < 64 * 1024


# --- prompt cache --------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["qwen", "gemma"])
def test_prompt_cache_reuse(qwen, which):
    model = qwen if which == "qwen" else _gemma("e2b", "gemma4", True)
    prompts = QWEN_PROMPTS if which == "qwen" else GEMMA_PROMPTS
    gen = BatchGenerator(model, max_batch=3, num_draft=3, prefill_chunk=5)
    first = run_batch(gen, [dict(prompt=prompts[2], max_tokens=20), dict(prompt=prompts[0], max_tokens=15)])
    assert len(gen.prompt_cache) == 2
    out = first[0][0]
    extended = prompts[2] + out + [9, 10, 11]
    # The next turn arrives while another row decodes.
    second = run_batch(gen, [dict(prompt=prompts[1], max_tokens=25), dict(prompt=extended, max_tokens=18, at=2)])
    tokens, event = second[1]
    cached = len(prompts[2]) + len(out) - 1  # the last sampled token is never cached
    assert event.stats.prefilled_tokens == len(extended) - cached
    assert tokens == plain(model, extended, 18)
    assert event.stats.draft_tokens > 0
    # A prompt that does not extend anything pre-fills in full.
    third = run_batch(gen, [dict(prompt=[1] + prompts[0], max_tokens=5)])
    assert third[0][1].stats.prefilled_tokens == len(prompts[0]) + 1


def test_saved_row_equals_plain_caches(qwen):
    """A finished row's saved caches (after many ragged rollbacks) equal the
    caches plain decoding of the same tokens leaves, in every layer."""
    gen = BatchGenerator(qwen, max_batch=4, num_draft=4, prefill_chunk=64)
    reqs = requests_for(QWEN_PROMPTS[:4])
    results = run_batch(gen, reqs)
    prompt, n = reqs[2]["prompt"], reqs[2]["max_tokens"]
    saved = gen.prompt_cache._entries[tuple(prompt + results[2][0][:-1])][0]
    plain_cache = qwen.target.make_cache()
    list(decode(qwen.target, prompt, num_draft=0, max_tokens=n, cache=plain_cache))
    for a, b in zip(saved.cache, plain_cache):
        xs = a.cache if hasattr(a, "cache") else (a.keys[..., : a.offset, :], a.values[..., : a.offset, :])
        ys = b.cache if hasattr(b, "cache") else (b.keys[..., : b.offset, :], b.values[..., : b.offset, :])
        for x, y in zip(xs, ys):
            assert x.shape == y.shape
            np.testing.assert_allclose(np.array(x), np.array(y), rtol=1e-4, atol=1e-5)
    # The head's cache equals a fresh head run over the same pairs.
    sequence = prompt + results[2][0]
    hidden = qwen.target.hidden(mx.array(sequence[:-1])[None])
    ref = qwen.target.make_mtp_cache()
    qwen.target.mtp(qwen.target.embed(mx.array(sequence[1:])[None]), hidden, ref)
    for a, b in zip(saved.drafter.cache, ref):
        assert a.offset == b.offset == len(sequence) - 1
        np.testing.assert_allclose(np.array(a.keys[..., : a.offset, :]), np.array(b.keys[..., : b.offset, :]),
                                   rtol=1e-4, atol=1e-4)


class ParkThenDraft:
    """A policy that decodes plainly for `plain` cycles, then drafts 3 for
    `drafting` cycles, and so on."""

    k_max = 3

    def __init__(self, plain: int, drafting: int):
        self.plain, self.period, self.cycles = plain, plain + drafting, 0

    def choose(self) -> int:
        return 0 if self.cycles % self.period < self.plain else 3

    def update(self, k, accepted, seconds) -> None:
        self.cycles += 1

    def reason(self):
        return None


def test_parked_drafter_catches_up_in_batches(qwen, monkeypatch):
    """While the batch decodes plainly the head reads the skipped positions
    in batches of CATCH_UP_BATCH (one head pass per batch, not per cycle)
    and ends exactly as if it had read each one."""
    gen = BatchGenerator(qwen, max_batch=3, num_draft="auto", prefill_chunk=64)
    policy = ParkThenDraft(plain=70, drafting=6)
    gen._policies.update({bucket: policy for bucket in (1, 2, 4)})
    observed = []
    real_observe = gen.drafter.observe
    monkeypatch.setattr(gen.drafter, "observe", lambda t, h, keep: observed.append(t.shape[1]) or real_observe(t, h, keep))
    reqs = [dict(prompt=QWEN_PROMPTS[i], max_tokens=n, at=a) for i, n, a in ((0, 110, 0), (2, 95, 0), (1, 60, 3))]
    results = run_batch(gen, reqs)
    for i, r in enumerate(reqs):
        assert results[i][0] == plain(qwen, r["prompt"], r["max_tokens"]), i
    assert max(observed) > 30 and len(observed) < 30, observed  # batched, not a pass per plain cycle
    assert sum(e.stats.draft_tokens for _, e in results.values()) > 0
    prompt, out = reqs[0]["prompt"], results[0][0]
    saved = gen.prompt_cache._entries[tuple(prompt + out[:-1])][0]
    sequence = prompt + out
    ref = qwen.target.make_mtp_cache()
    qwen.target.mtp(qwen.target.embed(mx.array(sequence[1:])[None]), qwen.target.hidden(mx.array(sequence[:-1])[None]), ref)
    for a, b in zip(saved.drafter.cache, ref):
        assert a.offset == b.offset == len(sequence) - 1
        np.testing.assert_allclose(np.array(a.keys[..., : a.offset, :]), np.array(b.keys[..., : b.offset, :]),
                                   rtol=1e-4, atol=1e-4)


def test_prompt_cache_lru_is_bounded(qwen):
    gen = BatchGenerator(qwen, max_batch=2, num_draft=3, prompt_cache_bytes=1)  # nothing fits
    run_batch(gen, [dict(prompt=QWEN_PROMPTS[0], max_tokens=8)])
    assert len(gen.prompt_cache) == 0
    probe = BatchGenerator(qwen, max_batch=2, num_draft=3)
    run_batch(probe, [dict(prompt=QWEN_PROMPTS[0], max_tokens=8)])
    one = probe.prompt_cache.nbytes
    gen = BatchGenerator(qwen, max_batch=2, num_draft=3, prompt_cache_bytes=int(2.5 * one))
    run_batch(gen, [dict(prompt=[20 + i] + QWEN_PROMPTS[0], max_tokens=8, at=i) for i in range(5)])
    assert len(gen.prompt_cache) == 2 and gen.prompt_cache.nbytes <= int(2.5 * one)
    # The newest entries stay (least recently used out first).
    assert [key[0] for key in gen.prompt_cache._entries] == [23, 24]


def test_prompt_cache_takes_the_longest_prefix():
    lru = PromptCacheLRU(1 << 20)

    class Entry:
        def __init__(self, tokens):
            self.tokens, self.nbytes = tokens, 10

    for tokens in ([1, 2], [1, 2, 3, 4], [1, 5]):
        lru.put(Entry(tokens))
    assert lru.take([1, 2, 3, 4, 5]).tokens == [1, 2, 3, 4]
    assert lru.take([1, 2, 3, 4]).tokens == [1, 2]  # a proper prefix only
    assert lru.take([1, 2, 3]) is None and len(lru) == 1


# --- limits ----------------------------------------------------------------------------------


def test_limits(qwen):
    gen = BatchGenerator(qwen, max_batch=2, num_draft=3, max_context=40)
    with pytest.raises(ContextLengthError, match="40"):
        gen.add(list(range(2, 50)), GREEDY, 10, ())
    with pytest.raises(ValueError):
        gen.add([5], GREEDY, 0, ())
    prompt = list(range(2, 30))  # 28 tokens: the context is full 12 tokens later
    results = run_batch(gen, [dict(prompt=prompt, max_tokens=100), dict(prompt=[5], max_tokens=1)])
    tokens, event = results[0]
    stats = Stats()
    alone = [t for c in decode(qwen.target, prompt, num_draft=0, max_tokens=100, max_context=40, stats=stats)
             for t in c.tokens]
    assert event.finish_reason == stats.finish_reason == "context" and tokens == alone
    assert results[1][1].finish_reason == "length" and len(results[1][0]) == 1
