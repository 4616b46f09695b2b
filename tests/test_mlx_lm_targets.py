"""Any mlx-lm model as a target (models/mlx_lm_target.py, loading/mlx_lm_fallback.py).

- The split: hidden + logits reproduce mlx-lm's own logits for a tied head
  (Qwen3), an lm_head (Llama) and a soft-capped head (Gemma 2), and our
  plain decoding of such a model equals mlx-lm's generate_step.
- Loading: a checkpoint of a model type we have no class for is loaded by
  mlx-lm's classes, `inspect` says so, and the CLI and API generate with
  `--drafter ngram` exactly what plain decoding gives.
- Refusals, one line each: caches that cannot roll back (a sliding window's
  RotatingKVCache, Mamba's ArraysCache) for drafting, a model type neither
  we nor mlx-lm know, a model whose __call__ is not trunk then head.
"""

import json

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx_lm.generate import generate_step
from mlx_lm.models import gemma2, llama, mamba
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache
from mlx_lm.utils import save_config, save_model

import mlx_mtp
from mlx_mtp import Stats, decode
from mlx_mtp.cli import main
from mlx_mtp.drafters import NGramDrafter
from mlx_mtp.models.mlx_lm_target import MlxLmTarget
from mlx_mtp.models.rollback import rollback_problem
from mlx_mtp.testing import VOCAB, write_tokenizer
from mlx_mtp.testing import mlx_lm_models

PROMPT = [5, 17, 33, 2, 9, 5, 17, 33, 2, 9, 5, 17]


def gemma2_config():
    return {"model_type": "gemma2", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
            "num_attention_heads": 4, "head_dim": 16, "rms_norm_eps": 1e-6, "vocab_size": VOCAB,
            "num_key_value_heads": 2, "final_logit_softcapping": 5.0, "query_pre_attn_scalar": 16.0}


def mamba_config():
    return {"model_type": "mamba", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
            "state_size": 8, "num_hidden_layers": 2, "conv_kernel": 4, "use_bias": False,
            "use_conv_bias": True, "time_step_rank": 4}


def random_model(module, cfg, seed=0):
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(dict(cfg)))
    mx.eval(model.parameters())
    return model


def write_dir(path, model, cfg):
    path.mkdir(parents=True, exist_ok=True)
    save_model(path, model)
    save_config(dict(cfg, eos_token_id=1), path / "config.json")
    write_tokenizer(path)
    return path


def plain(model, prompt, n=40):
    return [t for c in decode(model, prompt, max_tokens=n) for t in c.tokens]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlx-lm")
    out = {arch: mlx_lm_models.write_model_dir(root / arch, arch, seed=4) for arch in ("llama", "qwen3")}
    sliding = mlx_lm_models.config("llama", layer_types=["sliding_attention", "full_attention"], sliding_window=16)
    out["sliding"] = write_dir(root / "sliding", mlx_lm_models.build(sliding), sliding)
    out["mamba"] = write_dir(root / "mamba", random_model(mamba, mamba_config()), mamba_config())
    unknown = root / "unknown"
    write_dir(unknown, mlx_lm_models.build(mlx_lm_models.config("llama")), mlx_lm_models.config("llama"))
    (unknown / "config.json").write_text(json.dumps({**json.loads((unknown / "config.json").read_text()),
                                                     "model_type": "no_such_arch"}))
    out["unknown"] = unknown
    return out


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma2"])
def test_split_reproduces_mlx_lm_logits_and_decoding(kind):
    if kind == "gemma2":
        cfg = gemma2_config()
        model = random_model(gemma2, cfg)
    else:
        cfg = mlx_lm_models.config(kind)
        model = mlx_lm_models.build(cfg, seed=1)
    target = MlxLmTarget(model, cfg)
    assert target.split_problem() is None and target.rollback_problem is None
    x = mx.array([PROMPT])
    ours = target.logits(target.hidden(x, target.make_cache()))
    np.testing.assert_allclose(np.array(ours), np.array(model(x, cache=target.make_cache())), rtol=1e-5, atol=1e-5)
    assert target.hidden(x).shape == (1, len(PROMPT), cfg["hidden_size"])
    ref = [int(t) for t, _ in generate_step(mx.array(PROMPT), model, max_tokens=24)]
    assert plain(target, PROMPT, 24) == ref


def test_rollback_problem_names_the_cache_that_cannot_roll_back():
    assert rollback_problem([KVCache(), KVCache()]) is None
    assert "RotatingKVCache" in rollback_problem([KVCache(), RotatingKVCache(max_size=16)])
    assert "ArraysCache" in rollback_problem([ArraysCache(2)])


def test_a_call_that_is_not_trunk_then_head_is_refused():
    class Odd(llama.Model):
        def __call__(self, inputs, cache=None):
            return super().__call__(inputs, cache) + 1.0  # super() needs the real self

    cfg = mlx_lm_models.config("llama")
    odd = Odd(llama.ModelArgs.from_dict(cfg))
    mx.eval(odd.parameters())
    problem = MlxLmTarget(odd, cfg).split_problem()
    assert problem and "trunk then head" in problem and "\n" not in problem


def test_load_falls_back_to_mlx_lm_and_ngram_is_lossless(dirs):
    for arch in ("llama", "qwen3"):
        model, tokenizer = mlx_mtp.load(dirs[arch], drafter="ngram")
        assert isinstance(model.target, MlxLmTarget) and isinstance(model.drafter, NGramDrafter)
        text = "abcabcabc abcabcabc abc"
        spec = mlx_mtp.generate(model, tokenizer, text, chat_template=False, max_tokens=60)
        none, _ = mlx_mtp.load(dirs[arch], drafter="none")
        assert spec == mlx_mtp.generate(none, tokenizer, text, chat_template=False, max_tokens=60)
        auto, _ = mlx_mtp.load(dirs[arch])  # no head: plain decoding, and the note says what would draft
        assert auto.drafter is None and "--drafter ngram" in auto.drafter_note


def test_cli_generate_and_inspect(dirs):
    runner = CliRunner()
    for arch in ("llama", "qwen3"):
        args = ["generate", "-m", str(dirs[arch]), "-n", "40", "--temp", "0", "--no-chat-template", "--json",
                "xyzxyzxyz xyzxyz"]
        out = runner.invoke(main, args + ["--drafter", "ngram"])
        assert out.exit_code == 0, out.output
        result = json.loads(out.stdout)
        ref = json.loads(runner.invoke(main, args + ["--drafter", "none"]).stdout)
        assert result["tokens"] == ref["tokens"]
        assert result["stats"]["drafter"] == "ngram" and result["stats"]["host_syncs_per_cycle"] == 1.0
        assert set(result["stats"]["sources"]) <= {"ngram"}
        report = runner.invoke(main, ["inspect", str(dirs[arch]), "--drafter", "ngram"])
        assert report.exit_code == 0, report.output
        assert f"mlx-lm (mlx_lm.models.{arch})" in report.output
        assert "--drafter ngram: ok" in report.output


@pytest.mark.parametrize("kind,cache", [("sliding", "RotatingKVCache"), ("mamba", "ArraysCache")])
def test_caches_that_cannot_roll_back_refuse_drafting_in_one_line(dirs, kind, cache):
    runner = CliRunner()
    base = ["generate", "-m", str(dirs[kind]), "-n", "8", "--no-chat-template", "hello"]
    out = runner.invoke(main, base + ["--drafter", "ngram"])
    assert out.exit_code == 1 and cache in out.output and "Traceback" not in out.output
    error = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "--drafter none" in error[0]
    assert runner.invoke(main, base + ["--drafter", "none"]).exit_code == 0  # plain decoding never rolls back
    report = runner.invoke(main, ["inspect", str(dirs[kind]), "--drafter", "ngram"])
    assert "--drafter ngram: NOT compatible" in report.output and cache in report.output


def test_unknown_model_type_is_one_line_error(dirs):
    out = CliRunner().invoke(main, ["generate", "-m", str(dirs["unknown"]), "--drafter", "ngram", "hi"])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "'no_such_arch' is supported neither by mlx-mtp" in out.output


def test_ngram_on_mlx_lm_target_with_stats():
    cfg = mlx_lm_models.config("qwen3")
    target = MlxLmTarget(mlx_lm_models.build(cfg, seed=4), cfg)
    stats = Stats()
    out = [t for c in decode(target, PROMPT, drafter=NGramDrafter(), num_draft="auto", max_tokens=80, stats=stats)
           for t in c.tokens]
    assert out == plain(target, PROMPT, 80)
    assert stats.sources["ngram"]["accepted"] > 0 and stats.host_syncs_per_cycle == 1.0
