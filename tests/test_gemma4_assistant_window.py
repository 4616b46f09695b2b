"""The assistant's sliding key set (docs/gemma4-assistant.md#the-kv-it-reads).

transformers masks the assistant's sliding layers with |q - k| <= W, so a
round at position p sees the W + 1 target keys p - W - 1 .. p - 1; the
target's own sliding layers see W keys (themselves included). On tiny
random pairs, past the window:

- (a) the first round's drafts equal those of transformers' own assisted
  generation (`SinglePositionMultiTokenCandidateGenerator`), whose plain and
  assisted outputs also equal our plain decoding (the target's convention);
- (b) every later round equals a fresh round over clean target KV (a target
  that decoded only the accepted tokens): transformers' generator run on a
  full forward, and our drafter on a freshly prefilled cache. transformers'
  own later rounds also see rows of rejected drafts, which we do not copy;
- (c) greedy speculative output equals plain decoding for k=1..4, with
  rejections;
- (d) after any rollback the sliding caches keep the W + 1 keys before the
  next position, also when they compact every few tokens.
"""

import mlx.core as mx
import numpy as np
import pytest
from test_gemma4 import _check_greedy, _hf_text_config, _pair, _torch_state, run

from mlx_mtp import SamplingParams, decode
from mlx_mtp.drafters.gemma4_assistant import Gemma4AssistantDrafter
from mlx_mtp.models.base import SLIDING
from mlx_mtp.models.gemma4 import SlidingWindowCache
from mlx_mtp.models.gemma4_assistant import sliding_keys
from mlx_mtp.testing.gemma import WINDOW, assistant_config, text_config

KEYS = sliding_keys(WINDOW)
#: prompts longer than the window, so the first round already slides
LONG_PROMPTS = [list(range(3, 3 + 2 * WINDOW + 3)), [40, 41, 42] * WINDOW]
KINDS = [("e2b", True), ("dense", False)]  # KV sharing + sparse head; K=V full layers + dense head


# --- transformers' reference -------------------------------------------------------


def _hf_pair(kind, ordered, target, assistant, num_assistant_tokens):
    """transformers' Gemma4ForCausalLM and Gemma4AssistantForCausalLM with the
    weights of our (`_pair`) target and assistant."""
    torch = pytest.importorskip("torch")
    from mlx.utils import tree_flatten
    from transformers import Gemma4ForCausalLM
    from transformers.models.gemma4_assistant import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    from mlx_mtp.loading.writers import hf_target_weights

    cfg = text_config(kind, tie_word_embeddings=False)
    ref_target = Gemma4ForCausalLM(_hf_text_config(cfg)).eval()
    missing, unexpected = ref_target.load_state_dict(_torch_state(hf_target_weights(target, "gemma4_text"), torch))
    assert not missing and not unexpected
    ref_target.generation_config.eos_token_id = None  # our runs have no stop token either
    acfg = assistant_config(cfg, ordered=ordered)
    hf_cfg = Gemma4AssistantConfig(
        text_config=_hf_text_config(acfg["text_config"]),
        **{k: v for k, v in acfg.items() if k not in ("text_config", "model_type", "architectures")},
    )
    ref_assistant = Gemma4AssistantForCausalLM(hf_cfg).eval()
    missing, unexpected = ref_assistant.load_state_dict(
        _torch_state(dict(tree_flatten(assistant.parameters())), torch), strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ref_assistant.tie_weights()
    ref_assistant.generation_config.num_assistant_tokens = num_assistant_tokens
    return ref_target, ref_assistant


def _hf_clean_round(ref_target, ref_assistant, tokens, k):
    """transformers' generator, fresh, on a target that ran only
    tokens[:-1] in one pass: the round at the bonus token tokens[-1]."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    gen = SinglePositionMultiTokenCandidateGenerator(
        ref_assistant, ref_target.get_input_embeddings(), GenerationConfig(max_length=len(tokens) + k + 1)
    )
    gen.num_assistant_tokens = k
    with torch.no_grad():
        out = ref_target(torch.tensor([tokens[:-1]]), use_cache=False, output_hidden_states=True,
                         return_shared_kv_states=True)
        ids, _ = gen.get_candidates(torch.tensor([tokens]), {}, out, is_first_iteration=False, n_last_matches=0)
    return ids[0, len(tokens):].tolist()


def _rounds(target, assistant, prompt, k, max_tokens):
    """(tokens through the round's bonus token, its drafts, how many were
    accepted) per drafting round of our greedy speculative run."""
    drafter = Gemma4AssistantDrafter(assistant, target)
    tokens = list(prompt)
    for c in decode(target, prompt, drafter=drafter, num_draft=k, max_tokens=max_tokens):
        if c.drafted:
            yield list(tokens), c.drafted, c.accepted
        tokens += c.tokens


@pytest.fixture(scope="module", params=KINDS, ids=[k for k, _ in KINDS])
def pairs(request):
    kind, ordered = request.param
    target, assistant = _pair(kind, ordered)
    return kind, ordered, target, assistant


@pytest.mark.parametrize("prompt", LONG_PROMPTS, ids=["ramp", "repeat"])
def test_first_round_matches_transformers_assisted_generation(pairs, prompt, monkeypatch):
    torch = pytest.importorskip("torch")
    from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator

    kind, ordered, target, assistant = pairs
    k, max_tokens = 4, 2 * WINDOW
    ref_target, ref_assistant = _hf_pair(kind, ordered, target, assistant, k)
    recorded = []
    get_candidates = SinglePositionMultiTokenCandidateGenerator.get_candidates

    def recording(self, input_ids, *args, **kwargs):
        ids, logits = get_candidates(self, input_ids, *args, **kwargs)
        recorded.append(ids[0, input_ids.shape[1]:].tolist())
        return ids, logits

    monkeypatch.setattr(SinglePositionMultiTokenCandidateGenerator, "get_candidates", recording)
    with torch.no_grad():
        assisted = ref_target.generate(torch.tensor([prompt]), assistant_model=ref_assistant,
                                       max_new_tokens=max_tokens, do_sample=False)
        plain_ref = ref_target.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False)
    first_ref = [d for d in recorded if d][0]  # its first call only hands the prompt to the target
    assert len(prompt) > KEYS and len(first_ref) == k
    ours = next(iter(_rounds(target, assistant, prompt, k, max_tokens)))[1]
    assert ours == first_ref
    # The target's own sliding convention: our plain decoding is transformers'.
    plain, _ = run(target, prompt, max_tokens=max_tokens)
    assert plain == plain_ref[0, len(prompt):].tolist() == assisted[0, len(prompt):].tolist()


@pytest.mark.parametrize("k", [1, 3])
def test_later_rounds_match_transformers_on_clean_kv(pairs, k):
    pytest.importorskip("torch")
    kind, ordered, target, assistant = pairs
    ref_target, ref_assistant = _hf_pair(kind, ordered, target, assistant, k)
    prompt = LONG_PROMPTS[0]
    rounds = list(_rounds(target, assistant, prompt, k, max_tokens=3 * WINDOW))
    assert any(n < k for _, _, n in rounds)  # and rounds right after a rollback
    for tokens, drafts, _ in rounds:
        assert drafts == _hf_clean_round(ref_target, ref_assistant, tokens, len(drafts)), len(tokens)


# --- ours, no torch needed ---------------------------------------------------------------


def _clean_round(target, assistant, tokens, k):
    """Our drafter on a fresh cache that prefilled tokens[:-1] in one pass."""
    cache = target.make_cache()
    hidden = target.hidden(mx.array([tokens[:-1]]), cache)
    drafter = Gemma4AssistantDrafter(assistant, target)
    drafter.bind(target, cache)
    drafter.observe(mx.array([tokens[-1]]), hidden[:, -1:, :])
    drafts, _ = drafter.draft(k, SamplingParams(), None)
    return drafts.tolist()


@pytest.fixture
def compacting(monkeypatch):
    # Small buffers: the sliding caches drop old rows every few tokens, so
    # rollbacks land right after compactions too.
    monkeypatch.setattr(SlidingWindowCache, "step", 3)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_rounds_after_rollbacks_equal_rounds_on_a_clean_cache(pairs, compacting, k):
    _, _, target, assistant = pairs
    cache = target.make_cache()
    sliding = [c for c in cache if isinstance(c, SlidingWindowCache)]
    drafter = Gemma4AssistantDrafter(assistant, target)
    prompt = LONG_PROMPTS[1]
    tokens, rejected = list(prompt), 0
    for c in decode(target, prompt, drafter=drafter, num_draft=k, max_tokens=4 * WINDOW, cache=cache):
        rejected += c.accepted < len(c.drafted)
        tokens += c.tokens
        # (d) Paused right after the rollback: the round at tokens[-1] sees W + 1 keys.
        position = len(tokens) - 1
        for s in sliding:
            assert s.offset == position and s.start <= position - KEYS
        kv, _ = drafter._shared_kv()
        assert kv[SLIDING][0].shape[2] == KEYS
        if c.drafted:
            assert c.drafted == _clean_round(target, assistant, tokens[: len(tokens) - len(c.tokens)], len(c.drafted))
    assert rejected > 3


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_greedy_equals_plain_across_the_window(pairs, k):
    _, _, target, assistant = pairs
    _check_greedy(target, assistant, ks=[k], max_tokens=3 * WINDOW, prompts=LONG_PROMPTS)


def test_sliding_cache_keeps_window_plus_one_keys_after_rollbacks():
    window, slack = 4, 2
    cache = SlidingWindowCache(window=window, slack=slack)
    cache.step = 2
    rng = np.random.default_rng(0)
    seen = []
    for k, n in [(2, 0), (0, 0), (3, 1), (1, 0), (4, 4), (4, 0), (0, 0), (2, 2), (5, 1), (3, 0), (1, 1)]:
        new = mx.array(rng.standard_normal((1, 1, k + 1, 2)).astype(np.float32))  # a verify pass
        keys, _ = cache.update_and_fetch(new, new)
        seen.extend(np.array(new)[0, 0])
        np.testing.assert_array_equal(np.array(keys)[0, 0], np.array(seen[cache.start :]))
        cache.trim(k - n)  # n of k drafts accepted
        del seen[len(seen) - (k - n) :]
        assert cache.offset == len(seen) and cache.rows >= min(cache.offset, sliding_keys(window))
    # A pass and `slack` more roll back exactly after a compaction; one more
    # would lose a key the assistant reads, and is refused.
    rows = mx.zeros((1, 1, 40, 2))
    cache.update_and_fetch(rows, rows)
    cache.update_and_fetch(rows[..., :3, :], rows[..., :3, :])  # no room for 3: keeps history + slack old rows
    cache.trim(3 + slack)
    assert cache.rows >= sliding_keys(window)
    with pytest.raises(RuntimeError, match="slack"):
        cache.trim(1)
