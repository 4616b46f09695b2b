"""Repetition, presence and frequency penalties keep decoding lossless.

- `penalize` equals mlx-lm's make_logits_processors on the same logits and
  history (each penalty alone and all together, a window shorter than the
  history, repeated tokens, logits of both signs, every verify row with its
  own history), and plain decoding with a penalty equals mlx-lm's
  generate_step with those processors.
- Greedy speculative output equals plain decoding with each penalty for
  k = 1..4 and auto, with the Qwen3.5 MTP head and the Gemma 4 assistant;
  both drafters are often right, so acceptances and rejections both happen.
- At temperature > 0 the emitted sequences follow the penalised target
  distribution: Pearson chi-square against the exact joint (computed with
  mlx-lm's processors), p-value > 1e-3 as in test_sampling.py, while the
  unpenalised distribution is far away (total variation > 0.2).
- Still exactly one host sync per cycle with penalties on.
- Options, API and CLI flags, with their range checks.
"""

import json
from collections import Counter
from typing import Dict, List, Tuple

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_logits_processors

import mlx_mtp
import tiny
from mlx_mtp import SamplingParams, Stats, decode
from mlx_mtp import defaults
from mlx_mtp.cli import main
from mlx_mtp.drafters import MTPDrafter
from mlx_mtp.drafters import gemma4_assistant as gemma4_drafter
from mlx_mtp.drafters import mtp as mtp_drafter
from mlx_mtp.drafters.gemma4_assistant import Gemma4AssistantDrafter
from mlx_mtp.engine import PromptCache
from mlx_mtp.options import GenerationOptions
from mlx_mtp.sampling import penalize, probabilities
from mlx_mtp.testing import gemma
from test_sampling import chi_square_p_value

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42, 43]]
KS = [1, 2, 3, 4, "auto"]
# Strong enough to change the tiny models' greedy output (checked below),
# windows shorter than the generation so tokens also leave them mid-cycle.
PENALTIES = {
    "repetition": dict(repetition_penalty=1.3, repetition_context_size=16),
    "presence": dict(presence_penalty=1.5, repetition_context_size=16),
    "frequency": dict(frequency_penalty=0.8, repetition_context_size=24),
}


@pytest.fixture(scope="module")
def qwen():
    # noise=1.6: the head is right about half of the time (as in test_engine).
    return tiny.build(tiny.text_config(), seed=3, predictable=True, noise=1.6)


@pytest.fixture(scope="module")
def gemma_pair():
    cfg = gemma.text_config("e2b", tie_word_embeddings=False)
    target = gemma.build_target(cfg, seed=1, predictable=True)
    assistant = gemma.build_assistant(gemma.assistant_config(cfg, ordered=True), target, seed=1, predictable=True)
    return target, assistant


def run(model, prompt, k, params, drafter=None, max_tokens=48, **kwargs) -> Tuple[List[int], Stats]:
    stats = Stats()
    out = [
        t
        for c in decode(model, prompt, drafter=drafter if k != 0 else None, num_draft=k, params=params,
                        max_tokens=max_tokens, stats=stats, **kwargs)
        for t in c.tokens
    ]
    return out, stats


def mlx_lm_processors(params: SamplingParams):
    """mlx-lm's processors for `params`: one window size for all three."""
    n = params.repetition_context_size
    return make_logits_processors(
        repetition_penalty=params.repetition_penalty, repetition_context_size=n,
        presence_penalty=params.presence_penalty, presence_context_size=n,
        frequency_penalty=params.frequency_penalty, frequency_context_size=n,
    )


def mlx_lm_penalized(logits: mx.array, history: List[int], params: SamplingParams) -> mx.array:
    """logits [V] after mlx-lm's processors with `history` as generate_step's tokens."""
    out = mx.array(logits)[None]  # a copy: the processors write into it
    for processor in mlx_lm_processors(params):
        out = processor(mx.array(history), out)
    return out[0]


# --- parity with mlx-lm ----------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    *PENALTIES.values(),
    dict(repetition_penalty=0.8, repetition_context_size=5),  # < 1 rewards repeats
    dict(presence_penalty=-1.0, frequency_penalty=-0.5, repetition_context_size=7),
    dict(repetition_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.4, repetition_context_size=9),
])
def test_penalty_matches_mlx_lm_processors(kwargs):
    rng = np.random.default_rng(0)
    vocab, rows, length = 40, 5, 30
    logits = mx.array((rng.standard_normal((rows, vocab)) * 3).astype(np.float32))  # both signs
    history = [int(t) for t in rng.integers(0, 12, size=length)]  # many repeats
    params = SamplingParams(**kwargs)
    # Verify-style: row r sees history[: length - rows + 1 + r].
    ours = np.array(penalize(logits, mx.array(history), params))
    for r in range(rows):
        ref = mlx_lm_penalized(logits[r], history[: length - rows + 1 + r], params)
        np.testing.assert_allclose(ours[r], np.array(ref), rtol=1e-6, atol=1e-6)
        assert not np.allclose(ours[r], np.array(logits[r]))  # something was penalised
    # One row ([V]), as plain decoding and each draft step use it.
    one = penalize(logits[0], mx.array(history), params)
    np.testing.assert_allclose(np.array(one), np.array(mlx_lm_penalized(logits[0], history, params)), rtol=1e-6)


def test_no_penalty_leaves_logits_alone():
    logits = mx.array(np.arange(10, dtype=np.float32) - 4)
    assert penalize(logits, mx.array([1, 2, 2]), SamplingParams()) is logits
    assert penalize(logits, None, SamplingParams(repetition_penalty=1.2)) is logits


@pytest.mark.parametrize("penalty", PENALTIES)
def test_plain_decoding_matches_mlx_lm_generate_step(qwen, penalty):
    params = SamplingParams(**PENALTIES[penalty])
    for prompt in PROMPTS:
        ours, _ = run(qwen, prompt, 0, params)
        ref = [int(t) for t, _ in generate_step(mx.array(prompt), qwen, max_tokens=48,
                                                logits_processors=mlx_lm_processors(params))]
        assert ours == ref, prompt
    assert ours != run(qwen, prompt, 0, SamplingParams())[0]  # the penalty changed the text


# --- greedy: speculative == plain ---------------------------------------------------


def _check_greedy(model, drafter, params: SamplingParams, prompts=PROMPTS) -> None:
    accepted = drafted = changed = 0
    for prompt in prompts:
        plain, _ = run(model, prompt, 0, params)
        changed += plain != run(model, prompt, 0, SamplingParams())[0]
        for k in KS:
            spec, stats = run(model, prompt, k, params, drafter)
            assert spec == plain, (k, prompt)
            assert stats.host_syncs_per_cycle == 1.0
            accepted += stats.accepted_tokens
            drafted += stats.draft_tokens
    assert changed  # the penalty is active on these prompts
    assert 0 < accepted < drafted  # both acceptances and rejections happened


@pytest.mark.parametrize("penalty", PENALTIES)
def test_greedy_speculative_equals_plain_qwen_mtp(qwen, penalty):
    _check_greedy(qwen, MTPDrafter(qwen), SamplingParams(**PENALTIES[penalty]))


@pytest.mark.parametrize("penalty", PENALTIES)
def test_greedy_speculative_equals_plain_gemma_assistant(gemma_pair, penalty):
    target, assistant = gemma_pair
    _check_greedy(target, Gemma4AssistantDrafter(assistant, target), SamplingParams(**PENALTIES[penalty]))


@pytest.mark.parametrize("kind", ["mtp", "gemma4-assistant"])
def test_every_draft_step_is_penalised_with_its_own_history(kind, qwen, gemma_pair, monkeypatch):
    """Draft step j samples from the penalised logits with history = the
    newest tokens up to the cycle's last token, then d_1..d_j: the same
    history the target's verify row j uses."""
    if kind == "mtp":
        model, drafter, module = qwen, MTPDrafter(qwen), mtp_drafter
    else:
        model, assistant = gemma_pair
        drafter, module = Gemma4AssistantDrafter(assistant, model), gemma4_drafter
    steps, calls = [], []
    real_sample, real_draft = module.sample, drafter.draft

    def spy_sample(logits, params, key, history=None):
        token, probs = real_sample(logits, params, key, history)
        steps.append((logits, history, token))
        return token, probs

    def spy_draft(k, params, key, history=None):
        calls.append((len(steps), k))
        return real_draft(k, params, key, history)

    monkeypatch.setattr(module, "sample", spy_sample)
    drafter.draft = spy_draft
    params = SamplingParams(repetition_penalty=3.0, repetition_context_size=8)
    prompt = PROMPTS[0]
    out, stats = run(model, prompt, 4, params, drafter, max_tokens=40)
    sequence = prompt + out
    n = params.repetition_context_size
    flipped, end = 0, 0
    for first, k in calls:
        history = [int(t) for t in steps[first][1].tolist()]
        # The newest n tokens before the cycle's last token, then that token.
        end = next(e for e in range(end + 1, len(sequence) + 1) if sequence[max(0, e - n - 1) : e] == history)
        for logits, step_history, token in steps[first : first + k]:
            assert [int(t) for t in step_history.tolist()] == history
            expected = int(np.argmax(np.array(mlx_lm_penalized(logits, history, params))))
            assert int(token.reshape(-1)[0]) == expected
            flipped += expected != int(np.argmax(np.array(logits)))
            history = history + [expected]
    assert stats.draft_tokens > 0 and flipped  # the penalty changed some drafts


def test_prompt_cache_turns_with_penalty(qwen):
    params = SamplingParams(presence_penalty=1.5, repetition_context_size=16)
    pc, drafter = PromptCache(), MTPDrafter(qwen)
    history = [5, 17, 33, 2]
    for extra, k in [([9, 11], 3), ([40, 41], 0), ([7], "auto")]:
        prompt = history + extra
        out, _ = run(qwen, prompt, k, params, drafter, max_tokens=20, prompt_cache=pc)
        assert out == run(qwen, prompt, 0, params, max_tokens=20)[0]
        history = prompt + out


# --- sampling: the penalised target distribution -------------------------------------


def _exact_joint(model, prompt, params: SamplingParams, length: int) -> Dict[Tuple[int, ...], float]:
    """Exact probability of every continuation of `length` tokens, with
    mlx-lm's processors applied to each position's logits (top-k keeps it small)."""
    joint = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, pr in joint.items():
            history = prompt + list(prefix)
            logits = model.logits(model.hidden(mx.array(history)[None])[:, -1, :])[0]
            probs = np.array(probabilities(mlx_lm_penalized(logits, history, params), params))
            for t in np.nonzero(probs)[0]:
                nxt[prefix + (int(t),)] = pr * float(probs[t])
        joint = nxt
    return joint


def test_speculative_sampling_keeps_the_penalised_distribution():
    model = tiny.build(tiny.text_config(), seed=5, predictable=True, noise=2.0)
    # The model's own continuation as the prompt: its likely next tokens are
    # then in the window, where the penalties move them.
    start = [5, 17, 33]
    prompt = start + run(model, start, 0, SamplingParams(), max_tokens=16)[0]
    params = SamplingParams(temp=1.0, top_k=3, repetition_penalty=1.5, presence_penalty=0.5,
                            frequency_penalty=0.5, repetition_context_size=12)
    length, n_samples = 4, 1000
    exact = _exact_joint(model, prompt, params, length)
    unpenalised = _exact_joint(model, prompt, SamplingParams(temp=1.0, top_k=3), length)
    cells = set(exact) | set(unpenalised)
    assert 0.5 * sum(abs(exact.get(c, 0.0) - unpenalised.get(c, 0.0)) for c in cells) > 0.2

    drafter = MTPDrafter(model)
    observed, accepted, drafted = Counter(), 0, 0
    for seed in range(n_samples):
        out, stats = run(model, prompt, 3, params, drafter, max_tokens=length, seed=seed)
        observed[tuple(out)] += 1
        accepted += stats.accepted_tokens
        drafted += stats.draft_tokens
    assert 0 < accepted < drafted  # rejections happen: the residual is exercised
    p_value = chi_square_p_value(observed, exact, n_samples)
    assert p_value > 1e-3, (p_value, accepted / drafted)


# --- one host sync per cycle ------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 3, "auto"])
def test_one_host_sync_per_cycle_with_penalties(qwen, monkeypatch, k):
    calls = tiny.count_evals(monkeypatch)
    params = SamplingParams(temp=0.7, top_p=0.9, repetition_penalty=1.1, presence_penalty=0.3,
                            frequency_penalty=0.3, repetition_context_size=16)
    prompt = PROMPTS[0]
    tokens, stats = run(qwen, prompt, k, params, MTPDrafter(qwen), max_tokens=40, prefill_step_size=2, seed=0)
    assert len(tokens) == 40 and stats.target_passes > 5
    assert len(calls) == (len(prompt) + 1) // 2  # the prefill's chunks, nothing while decoding
    assert stats.host_syncs == stats.target_passes


# --- options, API, CLI ------------------------------------------------------------------


def test_options_carry_the_penalties():
    options = GenerationOptions.make(repetition_penalty=1.2, repetition_context_size=32, presence_penalty=0.5,
                                     frequency_penalty=-0.25)
    s = options.sampling
    assert (s.repetition_penalty, s.repetition_context_size, s.presence_penalty, s.frequency_penalty) == (
        1.2, 32, 0.5, -0.25)
    assert s.penalized and not SamplingParams().penalized
    assert SamplingParams().repetition_context_size == defaults.REPETITION_CONTEXT_SIZE


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3.0), "frequency_penalty"),
    (dict(repetition_context_size=0), "repetition_context_size"),
])
def test_bad_penalties_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        SamplingParams(**kwargs)


def test_api_greedy_with_penalty_is_lossless(tiny_model_dir):
    model, tokenizer = mlx_mtp.load(tiny_model_dir)
    kwargs = dict(max_tokens=40, repetition_penalty=1.3, repetition_context_size=16, presence_penalty=0.5)
    drafted = list(mlx_mtp.stream_generate(model, tokenizer, "def fib(n):", num_draft=3, **kwargs))
    plain = mlx_mtp.generate(model, tokenizer, "def fib(n):", num_draft=0, **kwargs)
    assert "".join(r.text for r in drafted) == plain
    assert drafted[-1].stats.draft_tokens > 0


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_cli_greedy_with_penalties_is_lossless(tiny_model_dir):
    args = ("generate", "-m", tiny_model_dir, "hello world", "-n", 40, "--json", "--temp", 0,
            "--repetition-penalty", 1.3, "--repetition-context-size", 16, "--presence-penalty", 0.5,
            "--frequency-penalty", 0.25)
    outs = []
    for k in (0, 3):
        result = _cli(*args, "-k", k)
        assert result.exit_code == 0, result.output
        outs.append(json.loads(result.stdout))
    assert outs[0]["tokens"] == outs[1]["tokens"] and outs[1]["stats"]["draft_tokens"] > 0


@pytest.mark.parametrize("args, flag", [
    (("--repetition-penalty", "0"), "--repetition-penalty"),
    (("--repetition-penalty", "nan"), "--repetition-penalty"),
    (("--presence-penalty", "2.5"), "--presence-penalty"),
    (("--frequency-penalty", "-3"), "--frequency-penalty"),
    (("--repetition-context-size", "0"), "--repetition-context-size"),
])
def test_cli_bad_penalty_flags(tiny_model_dir, args, flag):
    result = _cli("generate", "-m", tiny_model_dir, "hi", *args)
    assert result.exit_code == 2 and result.stdout == ""
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and flag in errors[0], result.stderr


def _default_shown(help_text: str, flag: str) -> str:
    words = " ".join(help_text.split())
    return words.split(flag + " ", 1)[1].split("[default: ", 1)[1].split("]", 1)[0].split(";")[0]


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_readable_defaults_in_help(command):
    text = _cli(command, "--help").stdout
    assert _default_shown(text, "--temp") == f"{defaults.TEMP}"
    assert _default_shown(text, "--top-p") == f"{defaults.TOP_P}"
    assert _default_shown(text, "--repetition-penalty") == f"{defaults.REPETITION_PENALTY}"
    assert _default_shown(text, "--repetition-context-size") == f"{defaults.REPETITION_CONTEXT_SIZE}"
    assert "--presence-penalty" in text and "--frequency-penalty" in text
    if command == "chat":
        assert _default_shown(text, "--max-tokens") == f"{defaults.CHAT_MAX_TOKENS}"


def test_bench_stays_greedy():
    text = _cli("bench", "--help").stdout
    assert _default_shown(text, "--temp") == "0.0"
    assert _default_shown(text, "--repetition-penalty") == "1.0"
