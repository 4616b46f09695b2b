"""The `mlx-mtp` command line, on tiny random checkpoints (nothing downloaded)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_mtp.cli import main

STATS_KEYS = {
    "prompt_tokens": int,
    "generated_tokens": int,
    "draft_tokens": int,
    "accepted_tokens": int,
    "acceptance_rate": float,
    "target_passes": int,
    "tokens_per_pass": float,
    "host_syncs_per_cycle": float,
    "prefill_tokens_per_s": float,
    "decode_tokens_per_s": float,
    "peak_memory_gb": float,
    "drafter": str,
    "num_draft": (int, str),  # a draft length, or "auto"
    "finish_reason": (str, type(None)),
}


def run(*args, input=None, env=None):
    runner = CliRunner()
    return runner.invoke(main, [str(a) for a in args], input=input, env=env, catch_exceptions=False)


def run_json(model_dir, *args, input=None):
    # --temp 0: generate samples by default; these checks need one exact text.
    result = run("generate", "-m", model_dir, "--json", "--temp", 0, *args, input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def assert_error(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert result.stdout == ""


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    import mlx_mtp

    return mlx_mtp.load(tiny_model_dir, drafter="none")[1]


# --json ----------------------------------------------------------------------


def test_json_schema(tiny_model_dir, tokenizer):
    # The default is k=auto, labelled as such; `auto` may park on a tiny
    # model, so the draft bookkeeping below runs at a fixed k.
    assert run_json(tiny_model_dir, "hello world", "-n", 4)["stats"]["num_draft"] == "auto"
    out = run_json(tiny_model_dir, "hello world", "-n", 48, "-k", 3)
    assert set(out) == {"text", "tokens", "stats", "trace"}
    assert isinstance(out["text"], str) and out["text"]
    assert all(isinstance(t, int) and 0 <= t < 96 for t in out["tokens"])
    stats = out["stats"]
    for key, kind in STATS_KEYS.items():
        assert key in stats, key
        assert isinstance(stats[key], kind) or (kind is float and isinstance(stats[key], int)), key
    assert stats["drafter"] == "mtp" and stats["num_draft"] == 3
    assert stats["generated_tokens"] == len(out["tokens"]) <= 48
    assert stats["finish_reason"] in ("length", "stop")
    trace = out["trace"]
    assert len(trace) == stats["target_passes"] > 0
    for entry in trace:
        assert set(entry) == {"drafted", "accepted"}
        assert 0 <= entry["accepted"] <= len(entry["drafted"]) <= 3
    assert sum(e["accepted"] for e in trace) == stats["accepted_tokens"] > 0
    assert sum(len(e["drafted"]) for e in trace) == stats["draft_tokens"]
    assert 0 < stats["acceptance_rate"] < 1
    assert tokenizer.decode(out["tokens"]) == out["text"]


def test_json_greedy_same_tokens_with_and_without_drafting(tiny_model_dir):
    plain = run_json(tiny_model_dir, "hello world", "-n", 40, "-k", 0)
    drafted = run_json(tiny_model_dir, "hello world", "-n", 40, "-k", 3)
    none = run_json(tiny_model_dir, "hello world", "-n", 40, "--drafter", "none")
    assert plain["tokens"] == drafted["tokens"] == none["tokens"]
    assert plain["text"] == drafted["text"]
    assert plain["stats"]["drafter"] == "none" and plain["stats"]["draft_tokens"] == 0
    assert all(e["drafted"] == [] for e in plain["trace"])
    assert len(plain["trace"]) == plain["stats"]["target_passes"]
    assert drafted["stats"]["target_passes"] < plain["stats"]["target_passes"]


def test_json_sampling_is_reproducible_with_seed(tiny_model_dir):
    # A fixed k: with -k auto the draft lengths follow measured timings, and
    # which tokens a seeded sampling run draws depends on them (docs/adaptive-draft.md).
    args = ("hello", "-n", 24, "--temp", 0.8, "--top-p", 0.9, "--top-k", 40, "--min-p", 0.01, "--seed", 7, "-k", 2)
    a = run_json(tiny_model_dir, *args)
    b = run_json(tiny_model_dir, *args)
    assert a["tokens"] == b["tokens"] and a["trace"] == b["trace"]


def test_stop_string(tiny_model_dir):
    full = run_json(tiny_model_dir, "hello world", "-n", 40)["text"]
    stop = full[12:15]
    cut = full.index(stop)
    out = run_json(tiny_model_dir, "hello world", "-n", 40, "--stop", stop, "--stop", "never-there")
    assert out["text"] == full[:cut]
    assert out["stats"]["finish_reason"] == "stop"
    assert len(out["trace"]) == out["stats"]["target_passes"]


def test_prompt_options_change_the_prompt(tiny_model_dir):
    def prompt_tokens(*args, input=None):
        return run_json(tiny_model_dir, *args, "-n", 1, input=input)["stats"]["prompt_tokens"]

    default = prompt_tokens("hi")
    assert prompt_tokens("hi", "--thinking") == default  # the template's default
    assert prompt_tokens("hi", "--no-thinking") == default + 4  # "\n</think>\n\n"
    system = "be brief"
    # <|im_start|> "system\n" SYSTEM <|im_end|> "\n": one token per character
    assert prompt_tokens("hi", "--system", system) == default + 1 + len("system\n") + len(system) + 2
    assert prompt_tokens("hello", "--no-chat-template") == 5
    assert prompt_tokens("-", "--no-chat-template", input="hello\n") == 5
    assert prompt_tokens("--no-chat-template", input="hello") == 5


def test_one_token(tiny_model_dir):
    out = run_json(tiny_model_dir, "hi", "-n", 1)
    assert len(out["tokens"]) == 1 and out["trace"] == []
    assert out["stats"]["target_passes"] == 0 and out["stats"]["finish_reason"] == "length"


# streaming -------------------------------------------------------------------


def test_streaming_text_to_stdout_stats_to_stderr(tiny_model_dir):
    expected = run_json(tiny_model_dir, "hello world", "-n", 32)["text"]
    result = run("generate", "-m", tiny_model_dir, "hello world", "-n", 32, "--temp", 0)
    assert result.exit_code == 0, result.output
    assert result.stdout.rstrip("\n") == expected.rstrip("\n")
    assert "[mtp k=auto]" not in result.stdout
    stats_line = result.stderr.strip().splitlines()[-1]
    assert stats_line.startswith("[mtp k=auto] prompt ")
    for part in ("tok/s", "acceptance ", "tok/pass", "syncs/cycle", "peak "):
        assert part in stats_line
    assert "note:" not in result.stderr


def test_streaming_notes_when_drafting_is_off(tiny_model_dir, tiny_model_dir_no_mtp):
    result = run("generate", "-m", tiny_model_dir, "hi", "-n", 4, "-k", 0)
    assert result.exit_code == 0
    assert "note: drafting disabled (-k 0)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("[none k=0] ")

    result = run("generate", "-m", tiny_model_dir, "hi", "-n", 4, "--drafter", "none")
    assert result.exit_code == 0 and "note: drafting disabled (--drafter none)" in result.stderr

    result = run("generate", "-m", tiny_model_dir_no_mtp, "hi", "-n", 4)
    assert result.exit_code == 0, result.output
    assert "note:" in result.stderr and "mtp" in result.stderr
    assert "acceptance" not in result.stderr


def test_json_stdout_is_clean_when_loading_warns(tiny_model_dir_no_mtp):
    result = run("generate", "-m", tiny_model_dir_no_mtp, "hi", "-n", 4, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # nothing else on stdout
    assert out["stats"]["drafter"] == "none"
    assert "note:" in result.stderr


def test_keyboard_interrupt_prints_stats_and_exits_130(tiny_model_dir, monkeypatch):
    gen = importlib.import_module("mlx_mtp.api")
    real = gen.stream_generate

    def interrupted(*args, **kwargs):
        # Ctrl-C while waiting for the fourth response (the third pass).
        for i, response in enumerate(real(*args, **kwargs)):
            yield response
            if i == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(gen, "stream_generate", interrupted)
    result = run("generate", "-m", tiny_model_dir, "hello", "-n", 64)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert result.stdout.strip()
    assert "[mtp k=auto] prompt " in result.stderr and "finish interrupted" in result.stderr

    result = run("generate", "-m", tiny_model_dir, "hello", "-n", 64, "--json")
    assert result.exit_code == 130
    out = json.loads(result.stdout)
    assert out["stats"]["finish_reason"] == "interrupted"
    assert len(out["trace"]) == out["stats"]["target_passes"] == 2


# errors ----------------------------------------------------------------------


def test_missing_path(tmp_path):
    assert_error(run("generate", "-m", tmp_path / "nope", "hi"), 1, "no such file or directory")


def test_directory_without_config(tmp_path):
    assert_error(run("generate", "-m", tmp_path, "hi"), 1, "config.json")


def test_unknown_repo_fails_fast_offline():
    result = run("generate", "-m", "nobody/does-not-exist-xyz", "hi", env={"HF_HUB_OFFLINE": "1"})
    assert_error(result, 1, "nobody/does-not-exist-xyz")


def test_bad_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text("{")
    assert_error(run("generate", "-m", tmp_path, "hi"), 1, "not valid JSON")


def test_unsupported_model_type(tmp_path):
    # (llama is loaded by mlx-lm's own classes now: a type neither knows)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    assert_error(run("generate", "-m", tmp_path, "hi"), 1, "supported neither")


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("--temp", "-1"), "--temp"),
        (("--temp", "nan"), "--temp"),
        (("--top-p", "0"), "--top-p"),
        (("--top-p", "1.5"), "--top-p"),
        (("--min-p", "2"), "--min-p"),
        (("--top-k", "-1"), "--top-k"),
        (("-k", "-1"), "--num-draft"),
        (("-n", "0"), "--max-tokens"),
        (("--drafter", "eagle"), "--drafter"),
    ],
)
def test_bad_flags(tiny_model_dir, args, fragment):
    assert_error(run("generate", "-m", tiny_model_dir, "hi", *args), 2, fragment)


def test_default_model_is_the_bundled_demo():
    # No -m: the bundled demo model, offline, with drafting on.
    result = run("generate", "def fibonacci(n):", "-n", 8, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["stats"]["drafter"] == "mtp" and out["stats"]["generated_tokens"] > 0


def test_empty_stdin(tiny_model_dir):
    assert_error(run("generate", "-m", tiny_model_dir, input=""), 2, "no prompt")


def test_prompt_longer_than_context(tiny_model_dir):
    result = run("generate", "-m", tiny_model_dir, "--no-chat-template", "x" * 2100)
    assert_error(result, 1, "2100 tokens", "context is 2048")
    result = run("generate", "-m", tiny_model_dir, "hello", "--max-context", 8, "--json")
    assert_error(result, 1, "context is 8")


def test_mtp_drafter_without_the_head(tiny_model_dir_no_mtp):
    result = run("generate", "-m", tiny_model_dir_no_mtp, "hi", "--drafter", "mtp")
    assert_error(result, 1, "MTP head", "--drafter none")


# the installed entry point ---------------------------------------------------


def test_entry_point_subprocess(tiny_model_dir_no_mtp):
    script = Path(sys.executable).parent / "mlx-mtp"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "mlx_mtp.cli"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        cmd + ["generate", "-m", str(tiny_model_dir_no_mtp), "--json", "-n", "8", "-"],
        input="hello\n", capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)  # exactly one JSON object on stdout
    assert out["stats"]["generated_tokens"] == len(out["tokens"]) > 0
    assert "note:" in proc.stderr and "Traceback" not in proc.stderr

    proc = subprocess.run(cmd + ["generate", "-m", str(tiny_model_dir_no_mtp), "--top-p", "0", "hi"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stdout == ""
