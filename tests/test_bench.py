"""`mlx-mtp bench` on a tiny model: tables, aggregate JSON, lossless check."""

import json

from click.testing import CliRunner

from mlx_mtp.bench import auto_verdict, ideal_speedup, load_prompts, median_interval, tuned_blas
from mlx_mtp.cli import main


def test_bundled_prompt_suite_has_the_nine_categories():
    categories = [p["category"] for p in load_prompts()]
    assert categories == [
        "code_python", "code_cpp", "explain_concept", "summarize", "qa_factual",
        "translation", "creative_short", "stepwise_math", "long_code_review",
    ]


def test_ideal_speedup_formula():
    # a = 0.8, k = 3: expected tokens per pass (1 - a^4) / (1 - a) = 2.952
    tpp = (1 - 0.8**4) / (1 - 0.8)
    assert abs(ideal_speedup(tpp, 3, 0.1) - tpp / 1.3) < 1e-12


def test_bench_runs_modes_and_checks_losslessness(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"category": "code", "prompt": "def f(x):"}\n{"category": "chat", "prompt": "hello"}\n')
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main, ["bench", "-m", str(tiny_model_dir), "-k", "1,2", "-n", "12", "--prompts", str(prompts),
               "--json-out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "backend: CPU" in result.output
    assert "lossless check: every mode reproduced the baseline tokens exactly" in result.output
    report = json.loads(out.read_text())
    assert set(report["modes"]) == {"0", "1", "2"}
    for k in ("1", "2"):
        mode = report["modes"][k]
        agg = mode["aggregate"]
        assert set(agg) == {"n_requests", "total_predicted", "total_draft", "total_draft_accepted",
                            "aggregate_accept_rate", "wall_s_total"}
        assert agg["n_requests"] == 2 and agg["total_draft"] > 0
        assert mode["ideal_speedup"] > 0 and mode["measured_over_ideal"] > 0
    base = [r["tokens"] for r in report["modes"]["0"]["runs"]]
    assert [r["tokens"] for r in report["modes"]["2"]["runs"]] == base


def test_bench_bad_prompt_file(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    result = CliRunner().invoke(main, ["bench", "--prompts", str(bad)])
    assert result.exit_code == 1 and "error:" in result.output and "Traceback" not in result.output


def test_bench_rounds_alternate_the_mode_order_and_take_medians(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"category": "code", "prompt": "def f(x):"}\n{"category": "chat", "prompt": "hello"}\n')
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main, ["bench", "-m", str(tiny_model_dir), "-k", "2", "-n", "8", "--prompts", str(prompts),
               "--rounds", "3", "--json-out", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert "lossless check: every mode reproduced the baseline tokens exactly" in result.output
    lines = [line for line in result.output.splitlines() if line.startswith(("code ", "chat "))]
    # Round 1 runs k=0 first, round 2 k=2 first, round 3 k=0 first again.
    firsts = [line for line in lines if line.split()[0] == "code"][::2]
    assert [(" r1 " in f, " r2 " in f, "k=0" in f) for f in firsts] == [
        (True, False, True), (False, True, False), (False, False, True)]
    report = json.loads(out.read_text())
    mode, base = report["modes"]["2"], report["modes"]["0"]
    assert mode["aggregate"]["n_requests"] == 6
    ratios = [r["stats"]["decode_tokens_per_s"] / b["stats"]["decode_tokens_per_s"]
              for r, b in zip(mode["runs"], base["runs"]) if r["category"] == "code"]
    assert len(ratios) == 3 and mode["speedup_per_category"]["code"] == sorted(ratios)[1]


def test_median_interval_is_the_sign_test_interval():
    # 5 values: [min, max] covers the median with 1 - 2/32; 9 values:
    # [2nd, 8th] with 1 - 2 * 10/512; one value has no interval.
    assert median_interval([5, 1, 4, 2, 3]) == (1, 5, 1 - 2 / 32)
    assert median_interval(list(range(9))) == (1, 7, 1 - 2 * 10 / 512)
    assert median_interval([0.9]) == (0.9, 0.9, 0.0)
    low, high, coverage = median_interval([1.0] * 40 + [0.1, 9.0])  # outliers do not move it
    assert (low, high) == (1.0, 1.0) and coverage >= 0.95


def _auto_modes(code, chat, interval_code, interval_chat):
    runs = [{"stats": {"decode_tokens_per_s": 1.0}}]
    return {"0": {"runs": runs}, "auto": {
        "speedup": 1.0, "speedup_median": 1.0, "runs": runs,
        "speedup_per_category": {"code": code, "chat": chat},
        "speedup_interval_per_category": {"code": interval_code, "chat": interval_chat, "all": [0.98, 1.02, 0.96]}}}


def test_auto_verdict_says_yes_no_or_within_noise():
    yes = auto_verdict(_auto_modes(1.0, 0.99, [0.9, 1.1, 0.94], [0.9, 1.1, 0.94]))
    assert "every category: yes (lowest 0.99x on chat" in yes and "all categories 1.00x (96% interval 0.98-1.02)" in yes
    # Below the floor with an interval that reaches it: the noise decides nothing.
    noisy = auto_verdict(_auto_modes(1.0, 0.91, [0.9, 1.1, 0.94], [0.8, 1.05, 0.94]))
    assert "within noise (lowest 0.91x on chat, 94% interval 0.80-1.05)" in noisy
    # A whole interval below it, or a single run below it: NO.
    assert "every category: NO" in auto_verdict(_auto_modes(0.85, 1.0, [0.8, 0.9, 0.94], [0.9, 1.1, 0.94]))
    assert "every category: NO" in auto_verdict(_auto_modes(0.9, 1.0, [0.9, 0.9, 0.0], [1.0, 1.0, 0.0]))


def test_numpys_own_openblas_is_not_mistaken_for_mlxs_blas():
    # SciPy's wheel loads libscipy_openblas64_ (suffixed symbols): MLX still
    # calls the reference BLAS, so the regime must not be called tuned.
    assert tuned_blas(["libscipy_openblas64_-32a4b2a6.so", "libblas.so.3"]) == []
    assert tuned_blas(["libopenblasp-r0.3.21.so", "libblas.so.3"]) == ["libopenblasp-r0.3.21.so"]
