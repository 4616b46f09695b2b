"""Gemma 4 targets with their assistant drafter (docs/gemma4-assistant.md).

- The target wrapper: logits(hidden(x)) equals mlx-lm's model, plain decoding
  equals mlx-lm's generate_step (which uses its RotatingKVCache).
- Greedy speculative output is token-identical to plain decoding for k=1..6,
  for E2B-style (per-layer inputs, KV sharing), MoE and dense targets, with
  generations many times longer than the sliding window, and with a cache
  that compacts its sliding rows every few tokens.
- Rejection sampling with the assistant reproduces the target distribution.
- Incompatible pairs are refused with a one-line reason.
"""

import json
import re
import math
from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.generate import generate_step

import mlx_mtp
from mlx_mtp import SamplingParams, Stats, decode
from mlx_mtp.api import DrafterUnavailableError, make_drafter
from mlx_mtp.drafters.gemma4_assistant import Gemma4AssistantDrafter
from mlx_mtp.models.gemma4 import SlidingWindowCache
from mlx_mtp.loading.assistant import load_assistant
from mlx_mtp.models.gemma4_assistant import AssistantError, compatibility_problem
from mlx_mtp.models.gemma4_assistant import quantize as quantize_assistant
from mlx_mtp.sampling import probabilities
from mlx_mtp.testing.gemma import (
    WINDOW,
    assistant_config,
    build_assistant,
    build_target,
    hf_config,
    save_assistant,
    save_target,
    text_config,
    write_pair,
)

PROMPTS = [[5, 17, 33, 2, 9], [40, 41, 42], list(range(3, 20))]


def _pair(kind, ordered, layout="gemma4_text", seed=1):
    cfg = text_config(kind, tie_word_embeddings=False)
    if layout == "gemma4":
        cfg = hf_config(kind, tie_word_embeddings=False)
    target = build_target(cfg, seed=seed, predictable=True)
    text = cfg.get("text_config", cfg)
    assistant = build_assistant(assistant_config(text, ordered=ordered), target, seed=seed, predictable=True)
    return target, assistant


@pytest.fixture(scope="module")
def e2b():  # per-layer inputs + KV sharing, sparse head, multimodal layout
    return _pair("e2b", ordered=True, layout="gemma4")


def run(model, prompt, k=0, drafter=None, max_tokens=40, params=SamplingParams(), seed=None):
    stats = Stats()
    out = [
        t
        for c in decode(model, prompt, drafter=drafter if k else None, num_draft=k, max_tokens=max_tokens,
                        params=params, seed=seed, stats=stats)
        for t in c.tokens
    ]
    return out, stats


@pytest.mark.parametrize("kind", ["e2b", "moe", "dense"])
def test_target_wrapper_matches_mlx_lm(kind):
    for cfg in (text_config(kind), hf_config(kind)):
        model = build_target(cfg, seed=2)
        x = mx.array([list(range(4, 4 + 3 * WINDOW))])
        np.testing.assert_array_equal(np.array(model.logits(model.hidden(x))), np.array(model(x)))
        prompt = [5, 17, 33]
        ours, _ = run(model, prompt, max_tokens=4 * WINDOW)
        ref = [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=4 * WINDOW)]
        assert ours == ref


def _check_greedy(target, assistant, ks, max_tokens=40, prompts=PROMPTS):
    drafter = Gemma4AssistantDrafter(assistant, target)
    accepted = drafted = 0
    for prompt in prompts:
        plain, _ = run(target, prompt, max_tokens=max_tokens)
        for k in ks:
            spec, stats = run(target, prompt, k, drafter, max_tokens=max_tokens)
            assert spec == plain, (k, prompt)
            assert stats.host_syncs_per_cycle == 1.0
            accepted += stats.accepted_tokens
            drafted += stats.draft_tokens
    assert 0 < accepted < drafted  # both acceptances and rejections happened
    return accepted / drafted


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_greedy_equals_plain_e2b(e2b, k):
    # 40 tokens = 5 sliding windows.
    _check_greedy(*e2b, ks=[k], prompts=PROMPTS[:2])


@pytest.mark.parametrize("kind, ordered", [("moe", False), ("dense", False), ("dense", True)])
def test_greedy_equals_plain_other_kinds(kind, ordered):
    _check_greedy(*_pair(kind, ordered), ks=[2, 5], prompts=PROMPTS[1:])


def test_long_generation_with_compacting_sliding_cache(e2b, monkeypatch):
    # Small buffers: the sliding caches drop old rows every few tokens, so
    # rollbacks land right after compactions too. 160 tokens = 20 windows.
    monkeypatch.setattr(SlidingWindowCache, "step", 3)
    target, assistant = e2b
    drafter = Gemma4AssistantDrafter(assistant, target)
    plain, _ = run(target, PROMPTS[0], max_tokens=160)
    spec, stats = run(target, PROMPTS[0], 3, drafter, max_tokens=160)
    assert spec == plain and len(spec) == 160
    assert stats.target_passes - stats.accepted_per_position[-1] > 10  # many partial rollbacks
    ref = [int(t) for t, _ in generate_step(mx.array(PROMPTS[0]), target, max_tokens=160)]
    assert spec == ref


def test_sliding_cache_rolls_back_exactly():
    cache = SlidingWindowCache(window=4, slack=2)
    cache.step = 2
    rng = np.random.default_rng(0)
    seen = []
    for n in [3, 1, 4, 2, 5, 1, 1, 3, 6, 2]:
        k = mx.array(rng.standard_normal((1, 1, n, 2)).astype(np.float32))
        keys, _ = cache.update_and_fetch(k, k)
        seen.extend(np.array(k)[0, 0])
        assert keys.shape[2] >= min(len(seen), 4 + n - 1)
        np.testing.assert_array_equal(np.array(keys)[0, 0], np.array(seen[cache.start :]))
        drop = n - 1
        cache.trim(drop)  # a rejected draft: keep one token of the pass
        del seen[len(seen) - drop :]
        assert cache.offset == len(seen) and cache.start <= max(0, cache.offset - 3)


def test_shared_kv_views_are_the_cache_rows(e2b):
    target, _ = e2b
    cache = target.make_cache()
    target.hidden(mx.array([list(range(3, 30))]), cache)
    kv = target.shared_kv(cache)
    layers = target.shared_kv_layers
    assert layers == {"sliding_attention": 3, "full_attention": 2}  # last non-shared of each type
    keys, values, start = kv["full_attention"]
    assert start == 0 and keys.shape[2] == 27
    keys, values, start = kv["sliding_attention"]
    assert start + keys.shape[2] == 27


# --- parity with transformers ---------------------------------------------------


def _torch_state(flat, torch):
    return {k: torch.tensor(np.array(v.astype(mx.float32) if v.dtype != mx.int32 else v)) for k, v in flat.items()}


def _hf_text_config(cfg):
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"})


@pytest.mark.parametrize("kind", ["e2b", "moe", "dense"])
def test_target_hidden_and_shared_kv_match_transformers(kind):
    torch = pytest.importorskip("torch")
    from transformers import Gemma4ForCausalLM

    from mlx_mtp.loading.writers import hf_target_weights as _hf_target_weights

    cfg = text_config(kind)
    model = build_target(cfg, seed=4)
    ref = Gemma4ForCausalLM(_hf_text_config(cfg)).eval()
    state = _torch_state(_hf_target_weights(model, "gemma4_text"), torch)
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ref.tie_weights()
    tokens = list(range(4, 4 + 3 * WINDOW))
    with torch.no_grad():
        out = ref(torch.tensor([tokens]), use_cache=False, output_hidden_states=True, return_shared_kv_states=True)
    cache = model.make_cache()
    hidden = model.hidden(mx.array([tokens]), cache)
    np.testing.assert_allclose(np.array(hidden), out.hidden_states[-1].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(model.logits(hidden)), out.logits.numpy(), rtol=1e-4, atol=1e-4)
    for layer_type, (keys, values, start) in model.shared_kv(cache).items():
        ref_k, ref_v = out.shared_kv_states[layer_type]
        np.testing.assert_allclose(np.array(keys), ref_k[:, :, start:].numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.array(values), ref_v[:, :, start:].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ordered", [False, True], ids=["dense-head", "sparse-head"])
@pytest.mark.parametrize("kind", ["e2b", "moe"])
def test_assistant_matches_transformers(kind, ordered):
    """Gemma4AssistantForCausalLM built from transformers' own config classes
    (they accept these tiny configs) on the same random weights."""
    torch = pytest.importorskip("torch")
    from mlx.utils import tree_flatten
    from transformers.models.gemma4_assistant import Gemma4AssistantConfig, Gemma4AssistantForCausalLM

    tcfg = text_config(kind)
    acfg = assistant_config(tcfg, ordered=ordered)
    assistant = build_assistant(acfg, seed=5)
    hf_cfg = Gemma4AssistantConfig(
        text_config=_hf_text_config(acfg["text_config"]),
        **{k: v for k, v in acfg.items() if k not in ("text_config", "model_type", "architectures")},
    )
    ref = Gemma4AssistantForCausalLM(hf_cfg).eval()
    missing, unexpected = ref.load_state_dict(_torch_state(dict(tree_flatten(assistant.parameters())), torch),
                                              strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ref.tie_weights()

    rng = np.random.default_rng(6)
    B = tcfg["hidden_size"]
    target = build_target(tcfg, seed=6)
    kv_dims = target.kv_head_dims
    position = 21
    lengths = {"full_attention": position, "sliding_attention": WINDOW}
    shared = {
        t: tuple(rng.standard_normal((1, kv_dims[t][0], lengths[t], kv_dims[t][1])).astype(np.float32) for _ in "kv")
        for t in lengths
    }
    emb = rng.standard_normal((1, 1, B)).astype(np.float32) * 4
    state = rng.standard_normal((1, 1, B)).astype(np.float32)
    with torch.no_grad():
        out = ref(
            inputs_embeds=torch.tensor(np.concatenate([emb, state], -1)),
            position_ids=torch.tensor([[position]]),
            shared_kv_states={t: tuple(torch.tensor(x) for x in kv) for t, kv in shared.items()},
        )
    y, s_next = assistant.step(
        mx.array(emb), mx.array(state), {t: tuple(mx.array(x) for x in kv) for t, kv in shared.items()}, position
    )
    np.testing.assert_allclose(np.array(s_next), out.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)
    logits = np.array(assistant.logits(y[0, -1]))
    np.testing.assert_allclose(logits, out.logits[0, -1].numpy(), rtol=1e-4, atol=1e-4)
    assert int(assistant.greedy_token(y[0, -1])) == int(out.logits[0, -1].argmax())
    if ordered:  # only top_k clusters scored, the rest at min - 1
        assert (logits == logits.min()).sum() == logits.size - 3 * logits.size // 8


# --- sampling -------------------------------------------------------------------


def _chi_square_p(observed, expected, n):
    stat, dof, po, pe = 0.0, -1, 0, 0.0
    assert set(observed) <= {c for c, p in expected.items() if p > 0}
    for c, p in expected.items():
        e, o = p * n, observed.get(c, 0)
        if e < 5:
            po, pe = po + o, pe + e
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if pe > 0:
        stat += (po - pe) ** 2 / pe
        dof += 1
    dof = max(dof, 1)
    z = ((stat / dof) ** (1 / 3) - (1 - 2 / (9 * dof))) / math.sqrt(2 / (9 * dof))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampling_matches_target_distribution():
    # A noisier target so that 3 tokens per step are plausible.
    cfg = text_config("dense", tie_word_embeddings=False)
    target = build_target(cfg, seed=7, predictable=True, noise=1.5)
    assistant = build_assistant(assistant_config(cfg, ordered=True), target, seed=7, predictable=True, noise=0.8)
    drafter = Gemma4AssistantDrafter(assistant, target)
    params = SamplingParams(temp=1.0, top_k=3)
    prompt, length, n = [5, 17, 33], 3, 500
    joint = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for prefix, pr in joint.items():
            h = target.hidden(mx.array([prompt + list(prefix)]))
            p = np.array(probabilities(target.logits(h[:, -1, :])[0], params))
            for t in np.nonzero(p)[0]:
                nxt[prefix + (int(t),)] = pr * float(p[t])
        joint = nxt
    observed, acc, drafted = Counter(), 0, 0
    for seed in range(n):
        out, stats = run(target, prompt, 2, drafter, max_tokens=length, params=params, seed=seed)
        observed[tuple(out)] += 1
        acc += stats.accepted_tokens
        drafted += stats.draft_tokens
    assert 0 < acc < drafted
    assert _chi_square_p(observed, joint, n) > 1e-3


# --- loading, pairing, CLI ---------------------------------------------------------


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("gemma") / "pair", kind="e2b")


def test_load_pair_and_generate(pair_dirs):
    target_dir, assistant_dir = pair_dirs
    model, tokenizer = mlx_mtp.load(target_dir, drafter=str(assistant_dir))
    assert model.drafter.name == "gemma4-assistant"
    assert model.drafter.default_num_draft == 4  # generation_config.json num_assistant_tokens
    assert model.default_num_draft == "auto"
    prompt = list(range(3, 12))
    spec, stats = run(model.target, prompt, 4, model.drafter, max_tokens=48)
    plain, _ = run(model.target, prompt, max_tokens=48)
    assert spec == plain and stats.accepted_tokens > 0


def test_cli_generate_with_assistant(pair_dirs):
    from mlx_mtp.cli import main

    target_dir, assistant_dir = pair_dirs
    result = CliRunner().invoke(
        main, ["generate", "-m", str(target_dir), "--drafter", str(assistant_dir), "hi", "-n", "40", "--json",
               "--temp", "0"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["stats"]["drafter"] == "gemma4-assistant" and out["stats"]["num_draft"] == "auto"
    assert out["stats"]["accepted_tokens"] > 0


@pytest.mark.parametrize("target_bits, drafter_kind", [(4, "bf16"), (8, "q8")])
def test_quantized_target_and_drafter(tmp_path, target_bits, drafter_kind):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model

    cfg = hf_config("e2b", tie_word_embeddings=False)
    target = build_target(cfg, seed=1, predictable=True)
    acfg = assistant_config(cfg["text_config"], ordered=True, hidden=64)  # 64: every matrix quantizable
    assistant = build_assistant(acfg, target, seed=1, predictable=True)
    order = np.array(assistant.masked_embedding.token_ordering)
    qtarget, qcfg = quantize_model(target, cfg, 32, target_bits)
    save_target(qtarget, tmp_path / "t", qcfg, raw=False)
    from mlx_mtp.testing import write_tokenizer

    write_tokenizer(tmp_path / "t")
    if drafter_kind == "bf16":
        assistant.set_dtype(mx.bfloat16)
        save_assistant(assistant, tmp_path / "a", acfg)
    else:
        q = quantize_assistant(assistant, bits=8, group_size=32)
        save_assistant(assistant, tmp_path / "a", acfg, quantization=q)
    model, _ = mlx_mtp.load(tmp_path / "t", drafter=str(tmp_path / "a"))
    loaded = model.drafter.assistant
    # token_ordering and the norms are never quantized or cast.
    assert loaded.masked_embedding.token_ordering.dtype == mx.int32
    np.testing.assert_array_equal(np.array(loaded.masked_embedding.token_ordering), order)
    for name, value in tree_flatten(loaded.parameters()):
        if "norm" in name:
            assert value.dtype in (mx.float32, mx.bfloat16) and not name.endswith("scales"), name
    assert hasattr(model.target.language_model.model.layers[0].self_attn.q_proj, "scales")
    if drafter_kind == "q8":
        assert hasattr(loaded.pre_projection, "scales") and hasattr(loaded.model.embed_tokens, "scales")
    prompt = [5, 17, 33, 2]
    spec, stats = run(model.target, prompt, 3, model.drafter, max_tokens=32)
    plain, _ = run(model.target, prompt, max_tokens=32)
    assert spec == plain and stats.accepted_tokens > 0


def test_incompatible_pairs_are_refused(tmp_path, pair_dirs):
    target = build_target(text_config("e2b"), seed=1)
    base = text_config("e2b")
    cases = {
        "hidden size 80": assistant_config(base, backbone_hidden_size=80),
        "vocabularies differ": assistant_config(dict(base, vocab_size=128)),
        "head dims differ": assistant_config(dict(base, head_dim=8)),
    }
    for reason, acfg in cases.items():
        problem = compatibility_problem(target, build_assistant(acfg))
        assert problem and reason in problem and "\n" not in problem
        with pytest.raises(AssistantError, match=reason):
            Gemma4AssistantDrafter(build_assistant(acfg), target)
    # A non-Gemma target.
    import tiny

    qwen = tiny.build(tiny.text_config(), seed=0)
    assert "Gemma 4 targets" in compatibility_problem(qwen, build_assistant(assistant_config(base)))
    # Through the API and the CLI: one line, no traceback.
    bad = save_assistant(build_assistant(cases["hidden size 80"]), tmp_path / "bad", cases["hidden size 80"])
    target_dir, _ = pair_dirs
    with pytest.raises(DrafterUnavailableError, match="hidden size 80"):
        mlx_mtp.load(target_dir, drafter=str(bad))
    from mlx_mtp.cli import main

    result = CliRunner().invoke(main, ["generate", "-m", str(target_dir), "--drafter", str(bad), "hi"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert [l for l in result.stderr.splitlines() if l.startswith("error:")][0].count("hidden size 80") == 1
    # Not an assistant at all, and a missing sparse head.
    with pytest.raises(DrafterUnavailableError, match="not a Gemma 4 assistant"):
        make_drafter(target, str(target_dir))
    acfg = assistant_config(base, ordered=True)
    a = build_assistant(acfg)
    path = save_assistant(a, tmp_path / "nosparse", acfg)
    w = mx.load(str(path / "model.safetensors"))
    mx.save_safetensors(str(path / "model.safetensors"), {k: v for k, v in w.items() if "masked" not in k})
    # A dropped sparse head (as GGUF converters do) falls back to the dense tied head, with a note.
    dense = load_assistant(path)
    assert re.search("sparse-head tensors are missing.*dense tied head", dense.load_note)
    assert not dense.args.use_ordered_embeddings and not hasattr(dense, "masked_embedding")
    y = mx.random.normal((dense.args.text.hidden_size,))
    np.testing.assert_array_equal(np.array(dense.logits(y)), np.array(a.dense_logits(y)))


def test_prompt_cache_turns_with_assistant(e2b):
    from mlx_mtp.engine import PromptCache

    target, assistant = e2b
    drafter = Gemma4AssistantDrafter(assistant, target)
    pc, history = PromptCache(), [5, 17, 33, 2]
    for extra, k in [([9, 11], 3), ([40, 41, 42], 0), ([7], 4)]:
        prompt = history + extra
        stats = Stats()
        out = [t for c in decode(target, prompt, drafter=drafter, num_draft=k, max_tokens=3 * WINDOW,
                                 stats=stats, prompt_cache=pc) for t in c.tokens]
        assert out == run(target, prompt, max_tokens=3 * WINDOW)[0]
        history = prompt + out
    assert stats.prefilled_tokens < len(prompt)


def test_auto_drafter_points_gemma_users_to_the_assistant(e2b):
    target, _ = e2b
    drafter, note = make_drafter(target, "auto")  # a returned note, not a warning
    assert re.search("--drafter PATH_OR_REPO", note)
    assert drafter is None and "assistant" in note
