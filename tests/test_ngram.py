"""Prompt-lookup (n-gram) drafting, alone and in front of a model drafter.

- The index: longest suffix first, newest earlier occurrence, never the
  suffix itself, the overlapping copy, O(new tokens) per cycle, rewind;
  checked against a brute-force scan.
- The accept rule with a one-hot draft (a deterministic drafter): a draft d
  is accepted with probability p(d), a rejection resamples from p with d
  removed and renormalised. Bound: chi-square p-value > 1e-3 (as in
  test_sampling.py), binomial acceptance within 4 standard deviations.
- Greedy output equals plain decoding for ngram and each combination on
  Qwen3.5 (hybrid rollback), Gemma 4 (sliding window past its size) and
  tiny mlx-lm Llama and Qwen3, with prompts that repeat so drafts are often
  right and sometimes wrong. One host sync per cycle.
- At temperature > 0 the output follows the target's distribution exactly
  (4-token joint, chi-square p > 1e-3, fixed seeds).
"""

import random
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest

import tiny
from mlx_mtp import SamplingParams, Stats, decode
from mlx_mtp.draft_policy import DraftPolicy, SourcePolicies, StepCosts
from mlx_mtp.drafters import LookupThenModelDrafter, MTPDrafter, NGramDrafter
from mlx_mtp.drafters.gemma4_assistant import Gemma4AssistantDrafter
from mlx_mtp.drafters.ngram import N_MAX, N_MIN, UNDO_DEPTH, NGramIndex
from mlx_mtp.engine import PromptCache
from mlx_mtp.models.mlx_lm_target import MlxLmTarget
from mlx_mtp.sampling import accept_sampled, one_hot, probabilities
from mlx_mtp.testing import mlx_lm_models
from mlx_mtp.testing.gemma import WINDOW
from test_sampling import _exact_joint, chi_square_p_value

# --- the index ------------------------------------------------------------------


def brute_force_match(seq, n_min=N_MIN, n_max=N_MAX):
    """(n, start): the longest suffix n_max..n_min with an earlier
    occurrence (one that ends before the sequence does), its newest one."""
    L = len(seq)
    for n in range(min(n_max, L), n_min - 1, -1):
        suffix = seq[L - n :]
        for i in range(L - n - 1, -1, -1):
            if seq[i : i + n] == suffix:
                return n, i + n
    return 0, -1


def test_longest_suffix_and_newest_occurrence():
    index = NGramIndex()
    # "1 2 3 9" then "2 3 8" then "1 2 3": the 3-gram [1 2 3] beats the
    # newer 2-gram [2 3], and its newest earlier occurrence is the first one.
    index.extend([1, 2, 3, 9, 5, 2, 3, 8, 6, 1, 2, 3])
    assert index.longest_match() == (3, 3)
    assert index.continuation(3, 4) == [9, 5, 2, 3]
    index.extend([7, 2, 3])  # now only [2 3] recurs: its newest occurrence wins
    n, start = index.longest_match()
    assert (n, index.tokens[start]) == (2, 7)


def test_the_current_suffix_never_matches_itself():
    index = NGramIndex()
    index.extend([4, 5, 6])
    assert index.longest_match() == (0, -1)
    index.extend([4, 5])
    assert index.longest_match() == (2, 2)  # the earlier [4 5], continued by 6


def test_overlapping_copy_continues_the_period():
    index = NGramIndex()
    index.extend([9, 1, 2, 1, 2, 1, 2])
    n, start = index.longest_match()
    assert n == N_MAX and index.continuation(start, 7) == [1, 2, 1, 2, 1, 2, 1]
    run = NGramIndex()
    run.extend([3, 3, 3])
    n, start = run.longest_match()
    assert run.continuation(start, 5) == [3] * 5


def test_index_matches_brute_force_on_random_sequences():
    rng = random.Random(0)
    for trial in range(40):
        vocab = rng.choice([3, 5, 12])
        seq = [rng.randrange(vocab) for _ in range(rng.randint(1, 120))]
        index = NGramIndex()
        for t in seq:  # token by token, as the engine feeds it
            index.extend([t])
            assert index.longest_match() == brute_force_match(index.tokens), (trial, index.tokens)


class CountingList(list):
    """A list that counts the elements read through indexing and slicing."""

    reads = 0

    def __getitem__(self, item):
        out = super().__getitem__(item)
        CountingList.reads += len(out) if isinstance(item, slice) else 1
        return out


class CountingDict(dict):
    writes = 0

    def __setitem__(self, key, value):
        CountingDict.writes += 1
        super().__setitem__(key, value)


def test_sync_reads_only_new_tokens_and_writes_per_n():
    """Each cycle costs O(tokens it adds): reads of the engine's token list
    and index writes both scale with the new tokens, not the context."""
    rng = random.Random(1)
    drafter = NGramDrafter()
    cache_tokens = CountingList(rng.randrange(50) for _ in range(20000))
    last = 7
    drafter.propose(cache_tokens, last)
    drafter.index.latest = {n: CountingDict(d) for n, d in drafter.index.latest.items()}
    for step in range(30):  # cycles that verify 1..4 tokens, as the engine appends them
        new = [rng.randrange(50) for _ in range(1 + step % 4)]
        cache_tokens.extend([last] + new[:-1])
        last = new[-1]
        CountingList.reads = CountingDict.writes = 0
        drafter.propose(cache_tokens, last)
        assert CountingList.reads <= len(new) + 1, (step, CountingList.reads)
        assert CountingDict.writes == len(new) * (N_MAX - N_MIN + 1)
    assert drafter.index.tokens == list(cache_tokens) + [last]


def test_rewind_restores_the_index_of_the_shorter_sequence():
    rng = random.Random(2)
    seq = [rng.randrange(6) for _ in range(300)]
    for drop in (1, 5, UNDO_DEPTH, UNDO_DEPTH + 3):  # from the undo log, and by a rebuild
        index = NGramIndex()
        index.extend(seq)
        index.rewind(drop)
        fresh = NGramIndex()
        fresh.extend(seq[:-drop])
        assert index.tokens == fresh.tokens and index.latest == fresh.latest, drop


def test_sync_starts_over_on_a_sequence_that_does_not_extend():
    drafter = NGramDrafter()
    assert drafter.propose([1, 2, 3, 1], 2) == [3, 1, 2, 3, 1, 2, 3, 1, 2, 3]
    assert drafter.propose([5, 6], 5) == []  # indexed afresh: no stale match
    assert drafter.index.tokens == [5, 6, 5]


def test_bad_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match="n_min <= n_max"):
        NGramIndex(3, 2)
    with pytest.raises(ValueError, match="max_draft"):
        NGramDrafter(max_draft=0)
    with pytest.raises(ValueError, match="min_match"):
        LookupThenModelDrafter(NGramDrafter(), min_match=9)


# --- the accept rule with a one-hot draft ----------------------------------------


def test_one_hot_accept_rule():
    """accept_sampled(draft_probs=None) is the rule with q = one-hot: the
    same decisions as an explicit one-hot q, acceptance ~ p(d), and after a
    rejection the token follows p with d removed and renormalised."""
    rng = np.random.default_rng(3)
    V, n_samples = 7, 6000
    logits = mx.array(rng.standard_normal((2, V)).astype(np.float32) * 1.2)
    params = SamplingParams(temp=1.0)
    p = np.array(probabilities(logits, params))[0]
    d = int(np.argsort(p)[-2])  # a likely but not certain draft
    drafts = mx.array([d], mx.int32)
    keys = mx.random.split(mx.random.key(11), n_samples)
    implicit = np.array(mx.stack([mx.stack(accept_sampled(logits, drafts, None, params, keys[i]))
                                  for i in range(n_samples)]))
    explicit = np.array(mx.stack([mx.stack(accept_sampled(logits, drafts, one_hot(drafts, V), params, keys[i]))
                                  for i in range(200)]))
    assert (implicit[:200] == explicit).all()
    accepted = implicit[:, 0] == 1
    rate = accepted.mean()
    assert abs(rate - p[d]) < 4 * np.sqrt(p[d] * (1 - p[d]) / n_samples), (rate, p[d])
    after_rejection = implicit[~accepted, 1]
    assert d not in after_rejection
    residual = {t: (0.0 if t == d else float(p[t] / (1 - p[d]))) for t in range(V)}
    assert chi_square_p_value(Counter(int(t) for t in after_rejection), residual, len(after_rejection)) > 1e-3
    # The emitted first token follows p itself.
    first = [d if a else int(t) for a, t in zip(accepted, implicit[:, 1])]
    assert chi_square_p_value(Counter(first), {t: float(p[t]) for t in range(V)}, n_samples) > 1e-3


# --- greedy equivalence on every kind of target -----------------------------------


def run(model, prompt, drafter=None, k=0, max_tokens=120, **kw):
    stats = Stats()
    out = [t for c in decode(model, prompt, drafter=drafter, num_draft=k, max_tokens=max_tokens, stats=stats, **kw)
           for t in c.tokens]
    return out, stats


def repetitive_prompts(model, seed=0):
    """Prompts that repeat themselves, and one that holds the model's own
    continuation, so lookup drafts are often right (and sometimes wrong)."""
    rng = random.Random(seed)
    base = [rng.randrange(3, 90) for _ in range(7)]
    own = run(model, base, max_tokens=50)[0]
    return [base * 3, base + own[:30] + base, [5, 17, 33, 2, 9]]


def check_equivalence(model, drafters, ks=(3, "auto"), max_tokens=120, seed=0):
    prompts = repetitive_prompts(model, seed)
    totals = Counter()
    for prompt in prompts:
        plain, _ = run(model, prompt, max_tokens=max_tokens)
        for make in drafters:
            for k in ks:
                drafter = make()
                spec, stats = run(model, prompt, drafter, k, max_tokens)
                assert spec == plain, (drafter.name, k, prompt)
                assert stats.host_syncs_per_cycle == 1.0
                assert stats.generated_tokens == len(spec)
                assert sum(c["drafted"] for c in stats.sources.values()) == stats.draft_tokens
                assert sum(c["accepted"] for c in stats.sources.values()) == stats.accepted_tokens
                if k == "auto":
                    continue  # its draft lengths follow timings: counted only for equivalence
                for name, c in stats.sources.items():
                    totals[name, "drafted"] += c["drafted"]
                    totals[name, "accepted"] += c["accepted"]
    for name in {name for name, _ in totals}:
        # Drafts were accepted and rejected at a fixed k: rollback ran at many depths.
        assert 0 < totals[name, "accepted"] < totals[name, "drafted"], (name, totals)
    return totals


@pytest.fixture(scope="module")
def qwen35():
    return tiny.build(tiny.text_config(), seed=3, predictable=True, noise=1.6)


@pytest.fixture(scope="module")
def gemma():
    return tiny.often_right_gemma_pair()


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def mlx_lm_target(request):
    cfg = mlx_lm_models.config(request.param)
    model = mlx_lm_models.build(cfg, seed=4, predictable=not cfg["tie_word_embeddings"])
    return MlxLmTarget(model, cfg)


def test_greedy_equals_plain_qwen35_hybrid(qwen35):
    totals = check_equivalence(qwen35, [NGramDrafter, lambda: LookupThenModelDrafter(MTPDrafter(qwen35))])
    assert totals["ngram", "drafted"] and totals["mtp", "drafted"]  # both sources drafted


def test_greedy_equals_plain_gemma4_sliding_window(gemma):
    target, assistant = gemma
    n = 10 * WINDOW  # well past the sliding window
    totals = check_equivalence(
        target, [NGramDrafter, lambda: LookupThenModelDrafter(Gemma4AssistantDrafter(assistant, target))],
        max_tokens=n,
    )
    assert totals["ngram", "drafted"] and totals["gemma4-assistant", "drafted"]


def test_greedy_equals_plain_mlx_lm_models(mlx_lm_target):
    # Lookup on these repetitive tiny models is right at k=3; a deep k=8
    # draft reaches past the repeats, so rejections happen too.
    check_equivalence(mlx_lm_target, [NGramDrafter], ks=(3, 8, "auto"))


def test_stops_inside_a_long_host_draft(qwen35):
    prompt = repetitive_prompts(qwen35)[1]
    plain, _ = run(qwen35, prompt, max_tokens=80)
    for stop_at in (0, 3, 17, 41):
        eos = [plain[stop_at]]
        expected = plain[: plain.index(eos[0])]
        spec, stats = run(qwen35, prompt, NGramDrafter(), "auto", 80, eos_token_ids=eos)
        assert spec == expected and stats.finish_reason == "stop"
    for n in (1, 2, 9, 33):
        assert run(qwen35, prompt, NGramDrafter(), 3, n)[0] == plain[:n]


def test_no_explicit_eval_inside_the_cycle(qwen35, monkeypatch):
    """Host drafts add no sync: one read per cycle, mx.eval only per prefill chunk."""
    calls = tiny.count_evals(monkeypatch)
    prompt = repetitive_prompts(qwen35)[0]
    for drafter in (NGramDrafter(), LookupThenModelDrafter(MTPDrafter(qwen35))):
        calls.clear()
        out, stats = run(qwen35, prompt, drafter, 3, 60, prefill_step_size=4)
        assert len(out) == 60 and stats.draft_tokens > 0
        assert len(calls) == (len(prompt) + 3) // 4
        assert stats.host_syncs == stats.target_passes


def test_model_drafter_stays_in_step_whichever_source_drafts(qwen35):
    """After lookup cycles the MTP head's cache holds every position, as if
    it had drafted each cycle itself (docs/ngram.md#combined)."""
    prompt = repetitive_prompts(qwen35)[1]
    head = MTPDrafter(qwen35)
    spec, stats = run(qwen35, prompt, LookupThenModelDrafter(head), 3, 80)
    assert stats.sources["ngram"]["cycles"] > 2 and stats.sources["mtp"]["cycles"] > 2
    sequence = prompt + spec
    hidden = qwen35.hidden(mx.array(sequence[:-1])[None])
    ref = qwen35.make_mtp_cache()
    qwen35.mtp(qwen35.embed(mx.array(sequence[1:])[None]), hidden, ref)
    for a, b in zip(head.cache, ref):
        assert a.offset == b.offset == len(sequence) - 1
        np.testing.assert_allclose(np.array(a.keys[..., : a.offset, :]), np.array(b.keys[..., : b.offset, :]),
                                   rtol=1e-4, atol=1e-4)


def test_prompt_cache_turns(qwen35):
    for make in (NGramDrafter, lambda: LookupThenModelDrafter(MTPDrafter(qwen35))):
        drafter, pc = make(), PromptCache()
        history = repetitive_prompts(qwen35)[0]
        for turn, extra in enumerate([[9, 11], [40, 41, 42], [7]]):
            prompt = history + extra
            out, _ = run(qwen35, prompt, drafter, 3, 40, prompt_cache=pc)
            assert out == run(qwen35, prompt, max_tokens=40)[0], turn
            history = prompt + out


# --- per-source policies ------------------------------------------------------------


def test_source_policies_route_each_cycle_to_its_source():
    lookup, model = DraftPolicy(10), DraftPolicy(6)
    policies = SourcePolicies(lookup, model)
    assert policies.k_max == 10
    for _ in range(2):  # a measured plain step first (plain_first_cycles); the first is a warm-up
        policies.observe_plain(4, 0.02)
    assert policies.select(True) and policies.choose() == lookup.choose()
    policies.update(4, 4, 0.01)
    assert lookup.cycles == 1 and model.cycles == 0
    assert not policies.select(False)
    policies.update(3, 1, 0.01)
    assert lookup.cycles == 1 and model.cycles == 1
    policies.observe_plain(10, 0.05)  # plain time is shared
    assert lookup.cycle_seconds(0) == model.cycle_seconds(0)


def test_a_parked_lookup_gives_the_cycle_to_the_model_and_keeps_probing():
    lookup = DraftPolicy(10)
    for _ in range(20):
        lookup.update(4, 0, None)  # every lookup draft rejected: it parks
    assert lookup.parked
    model = DraftPolicy(6)
    policies = SourcePolicies(lookup, model)
    picked = []
    for _ in range(3 * lookup.probe_spacing):
        picked.append(policies.select(True))
        k = policies.choose()
        policies.update(k, 0, None)
    assert 1 <= sum(picked) <= 4  # probes only, at the lookup policy's spacing
    assert model.cycles == len(picked) - sum(picked)


def test_a_parked_lookup_recovers_while_the_model_policy_pipelines(qwen35):
    """With the model's policy parked, plain steps are queued before their
    input is known; a lookup that had drafts still counts those cycles, so
    it probes, sees its drafts accepted and drafts again."""
    from mlx_mtp.engine import _FixedDraftLength

    class TimingBlind(DraftPolicy):
        # Decides from acceptance alone, on a fixed cheap-verify cost
        # shape: measured times would make the probe spacing, and whether
        # the lookup un-parks at all, depend on how loaded the machine is.
        def update(self, k, accepted, seconds):
            super().update(k, accepted, None)

        def observe_plain(self, cycles, seconds):
            pass

    lookup = TimingBlind(10, costs=StepCosts(verify={1: 1.0, 11: 1.5}))
    for _ in range(20):
        lookup.update(4, 0, None)
    assert lookup.parked
    policy = SourcePolicies(lookup, _FixedDraftLength(0))
    prompt = repetitive_prompts(qwen35)[0]
    out, stats = run(qwen35, prompt, LookupThenModelDrafter(MTPDrafter(qwen35)), "auto", 300, policy=policy)
    assert out == run(qwen35, prompt, max_tokens=300)[0]
    assert stats.sources["ngram"]["cycles"] >= 3 and not lookup.parked


def test_auto_combined_learns_per_source(qwen35):
    from mlx_mtp.engine import auto_policy

    drafter = LookupThenModelDrafter(MTPDrafter(qwen35))
    policy = auto_policy(drafter)
    assert isinstance(policy, SourcePolicies) and policy.lookup.k_max == 10
    prompt = repetitive_prompts(qwen35)[1]
    out, stats = run(qwen35, prompt, drafter, "auto", 100, policy=policy)
    assert out == run(qwen35, prompt, max_tokens=100)[0]
    assert stats.sources["ngram"]["cycles"] == sum(n for k, n in policy.lookup.histogram.items() if k)
    assert stats.sources["mtp"]["cycles"] == sum(n for k, n in policy.model.histogram.items() if k)


# --- the distribution at temperature > 0 --------------------------------------------


@pytest.mark.parametrize("kind", ["ngram", "mtp+ngram"])
def test_sampling_with_one_hot_drafts_matches_target_distribution(kind):
    # A fairly predictable target at a high temperature: lookup drafts are
    # proposed from the first cycle on, mostly accepted, sometimes not.
    model = tiny.build(tiny.text_config(), seed=5, predictable=True, noise=1.0)
    params = SamplingParams(temp=3.0, top_k=3)
    # The model's own greedy continuation, then its start again.
    base = [5, 17, 33]
    prompt = base + run(model, base, max_tokens=8)[0] + base
    length, n_samples = 4, 1000
    exact = _exact_joint(model, prompt, params, length)
    observed, drafted, accepted = Counter(), 0, 0
    for seed in range(n_samples):
        drafter = NGramDrafter() if kind == "ngram" else LookupThenModelDrafter(MTPDrafter(model), min_match=2)
        out, stats = run(model, prompt, drafter, 3, length, params=params, seed=seed)
        observed[tuple(out)] += 1
        drafted += stats.sources.get("ngram", {}).get("drafted", 0)
        accepted += stats.sources.get("ngram", {}).get("accepted", 0)
    assert 0.5 * drafted < accepted < 0.97 * drafted  # one-hot drafts accepted and rejected
    assert chi_square_p_value(observed, exact, n_samples) > 1e-3


# --- front ends --------------------------------------------------------------------


def test_cli_drafters_and_one_line_errors(tiny_model_dir, tiny_model_dir_no_mtp):
    import json

    from click.testing import CliRunner

    from mlx_mtp.cli import main

    runner = CliRunner()
    args = ["generate", "-m", str(tiny_model_dir), "-n", "40", "--temp", "0", "--json", "-k", "3",
            "--no-chat-template", "abcabcabc abcabc abcabc abc"]
    ref = json.loads(runner.invoke(main, args + ["--drafter", "none"]).stdout)
    for drafter, sources in (("ngram", {"ngram"}), ("mtp+ngram", {"mtp", "ngram"})):
        out = runner.invoke(main, args + ["--drafter", drafter])
        assert out.exit_code == 0, out.output
        got = json.loads(out.stdout)
        assert got["tokens"] == ref["tokens"]
        stats = got["stats"]
        assert stats["drafter"] == drafter and set(stats["sources"]) <= sources and stats["sources"]
        for c in stats["sources"].values():
            assert set(c) == {"cycles", "drafted", "accepted", "acceptance_rate"}
    for bad in ("auto+ngram", "ngram+ngram", "+ngram"):
        r = runner.invoke(main, ["generate", "-m", str(tiny_model_dir), "--drafter", bad, "hi"])
        assert r.exit_code == 2 and r.output.count("error:") == 1 and "Traceback" not in r.output, r.output
    r = runner.invoke(main, ["generate", "-m", str(tiny_model_dir_no_mtp), "--drafter", "mtp+ngram", "hi"])
    assert r.exit_code == 1 and r.output.count("error:") == 1 and "MTP head" in r.output, r.output
    r = runner.invoke(main, ["generate", "-m", str(tiny_model_dir), "--drafter", "assistant+ngram", "hi"])
    assert r.exit_code == 1 and "no assistant/ folder" in r.output, r.output


def test_stats_line_shows_each_source():
    from mlx_mtp.report import format_stats

    stats = Stats(drafter="mtp+ngram", num_draft=3, generated_tokens=30, target_passes=10, host_syncs=10,
                  draft_tokens=40, accepted_tokens=25, accepted_per_position=[0] * 10,
                  drafted_per_position=[0] * 10,
                  sources={"mtp": {"cycles": 6, "drafted": 18, "accepted": 9},
                           "ngram": {"cycles": 2, "drafted": 22, "accepted": 16}})
    line = format_stats(stats)
    assert "mtp 50% (9/18) in 6 cycles, ngram 73% (16/22) in 2 cycles" in line
    assert stats.to_dict()["sources"]["ngram"]["acceptance_rate"] == round(16 / 22, 4)


def test_bench_compares_drafters_and_reports_lookup_apart(tiny_model_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from mlx_mtp.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"category": "code", "prompt": "def f(x): return x\\ndef f(x): return x"}\n')
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "-m", str(tiny_model_dir), "--drafter", "mtp,ngram,mtp+ngram",
                                       "-k", "2", "-n", "12", "--prompts", str(prompts), "--lookup",
                                       "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    assert "lossless check: every mode reproduced the baseline tokens exactly" in result.output
    assert "lookup categories (reported apart from the standard table)" in result.output
    report = json.loads(out.read_text())
    keys = {"0", "mtp:2", "ngram:2", "mtp+ngram:2"}
    assert set(report["modes"]) == keys and set(report["lookup"]["modes"]) == keys
    assert {r["category"] for r in report["lookup"]["modes"]["0"]["runs"]} == {"code_edit", "doc_qa", "json_reformat"}
    assert {r["category"] for r in report["modes"]["0"]["runs"]} == {"code"}
    for key in keys - {"0"}:
        mode = report["modes"][key]
        assert mode["tokens_per_pass"] > 0 and "speedup" in mode and mode["drafter"] == key.split(":")[0]
    r = CliRunner().invoke(main, ["bench", "-m", str(tiny_model_dir), "--drafter", "mtp,eagle"])
    assert r.exit_code == 2 and "error:" in r.output and "Traceback" not in r.output


def test_api_load_and_with_drafter(tiny_model_dir, tmp_path):
    import mlx_mtp
    from mlx_mtp.api import with_drafter
    from mlx_mtp.testing.gemma import write_pair

    model, tokenizer = mlx_mtp.load(tiny_model_dir, drafter="mtp+ngram")
    assert isinstance(model.drafter, LookupThenModelDrafter) and model.drafter.name == "mtp+ngram"
    text = "one two three one two three one two"
    ref = mlx_mtp.generate(with_drafter(model, "none"), tokenizer, text, max_tokens=30)
    assert mlx_mtp.generate(model, tokenizer, text, max_tokens=30) == ref
    assert mlx_mtp.generate(with_drafter(model, "ngram"), tokenizer, text, max_tokens=30) == ref
    target_dir, assistant_dir = write_pair(tmp_path / "gemma", kind="dense")
    gemma, _ = mlx_mtp.load(target_dir, drafter=f"{assistant_dir}+ngram")
    assert gemma.drafter.name == "gemma4-assistant+ngram"
    assert gemma.drafter.default_num_draft == gemma.drafter.model.default_num_draft
