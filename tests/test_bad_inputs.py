"""Bad input, one table: every row runs one command on one broken input and
asserts its exit code, the one line that explains it (no traceback) and that
no input file changed (the input tree is hashed before and after).

To add a case, add a `Case` to CASES; when it needs a new broken input, add
a builder to INPUTS (built once per module, on first use) and name it in the
argv as "{name}". Rows run in-process through click's CliRunner; only the
SIGINT rows (SIGNAL_CASES) start a subprocess.

Exit codes (mlx_mtp/cli.py): 2 bad arguments (usage errors, an empty
prompt), 1 everything else, 130 Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

import pytest
from click.testing import CliRunner

from mlx_mtp.cli import main
from mlx_mtp.defaults import assets_dir
from mlx_mtp.testing import write_model_dir

# --- broken inputs ------------------------------------------------------------------


def _model(root: Path) -> Path:
    return write_model_dir(root / "model")


def _stripped_head(root: Path) -> Path:
    return write_model_dir(root / "stripped", drop_mtp=True)


def _empty_dir(root: Path) -> Path:
    (root / "empty").mkdir()
    return root / "empty"


def _config_only(root: Path) -> Path:
    """A partial download: config.json and nothing else."""
    path = root / "config-only"
    path.mkdir()
    shutil.copy(INPUTS["model"] / "config.json", path)
    return path


def _no_tokenizer(root: Path) -> Path:
    """Weights and config, tokenizer files missing."""
    path = root / "no-tokenizer"
    path.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(INPUTS["model"] / name, path)
    return path


def _bad_json(root: Path) -> Path:
    path = root / "bad-json"
    path.mkdir()
    (path / "config.json").write_text('{"model_type": "qwen3_5", ')
    return path


def _llama_config(root: Path) -> Path:
    path = root / "llama"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def _unknown_type(root: Path) -> Path:
    """A whole checkpoint whose config names an architecture neither we nor
    mlx-lm run."""
    path = root / "unknown-type"
    shutil.copytree(INPUTS["model"], path)
    (path / "config.json").write_text(json.dumps({"model_type": "frobnicator"}))
    return path


def _gguf(root: Path) -> Path:
    from mlx_mtp.testing import build, hf_config
    from mlx_mtp.testing.gguf import write_qwen35_gguf

    text = hf_config(linear_key_head_dim=32, linear_value_head_dim=32)["text_config"]
    write_qwen35_gguf(build(text), text, root / "model.gguf")
    return root / "model.gguf"


def _truncated_gguf(root: Path) -> Path:
    data = INPUTS["gguf"].read_bytes()
    path = root / "truncated.gguf"
    path.write_bytes(data[: len(data) // 2])
    return path


def _random_gguf(root: Path) -> Path:
    """The GGUF magic, then noise."""
    path = root / "random.gguf"
    path.write_bytes(b"GGUF" + os.urandom(4096))
    return path


def _nan_weights(root: Path) -> Path:
    """model.safetensors with bytes overwritten by 0xff (float NaN) in the
    middle of the data: some tensors are now NaN, the file still loads."""
    path = root / "nan-weights"
    shutil.copytree(INPUTS["model"], path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    middle = header + (len(data) - header) // 2
    data[middle - 50_000 : middle + 50_000] = b"\xff" * 100_000
    weights.write_bytes(bytes(data))
    return path


def _truncated(root: Path) -> Path:
    """model.safetensors cut in half (an interrupted download)."""
    path = root / "truncated"
    shutil.copytree(INPUTS["model"], path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    return path


def _foreign_quant(root: Path) -> Path:
    """A config claiming a quantization convert cannot read (AWQ)."""
    path = root / "awq"
    shutil.copytree(INPUTS["model"], path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _unlabelled_fp8(root: Path) -> Path:
    """FP8 weights whose config lost its quantization_config."""
    from mlx_mtp.testing.fp8 import write_fp8_model_dir

    path = write_fp8_model_dir(root / "unlabelled-fp8")
    config = json.loads((path / "config.json").read_text())
    config.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(config))
    return path


def _blank_prompts(root: Path) -> Path:
    path = root / "blank-prompts.jsonl"
    path.write_text('{"category": "code", "prompt": "def f(x):"}\n{"category": "chat", "prompt": "  \\n "}\n')
    return path


def _fifo_config(root: Path) -> Path:
    """A model whose config.json is a FIFO: loading blocks on it until the
    test writes, so a signal can land at a known point of start-up."""
    path = root / "fifo-model"
    path.mkdir()
    for f in INPUTS["model"].iterdir():
        if f.name != "config.json":
            shutil.copy(f, path)
    os.mkfifo(path / "config.json")
    return path


class _Inputs:
    """Broken inputs by name, each built on first use under one folder."""

    def __init__(self, builders: Dict[str, Callable[[Path], Path]]):
        self.builders = builders
        self.root: Optional[Path] = None
        self.built: Dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.built:
            self.built[name] = self.builders[name](self.root)
        return self.built[name]


INPUTS = _Inputs({
    "model": _model,
    "stripped": _stripped_head,
    "empty": _empty_dir,
    "config-only": _config_only,
    "no-tokenizer": _no_tokenizer,
    "bad-json": _bad_json,
    "llama": _llama_config,
    "unknown-type": _unknown_type,
    "gguf": _gguf,
    "truncated-gguf": _truncated_gguf,
    "random-gguf": _random_gguf,
    "nan-weights": _nan_weights,
    "truncated": _truncated,
    "awq": _foreign_quant,
    "unlabelled-fp8": _unlabelled_fp8,
    "blank-prompts": _blank_prompts,
    "fifo-model": _fifo_config,
})


@pytest.fixture(scope="module", autouse=True)
def inputs(tmp_path_factory) -> _Inputs:
    INPUTS.root, INPUTS.built = tmp_path_factory.mktemp("bad-inputs"), {}
    return INPUTS


# --- the table ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    argv: Tuple[str, ...]  # "{name}" stands for the path of INPUTS[name]
    code: int  # expected exit status
    says: str  # a fragment of the one line that explains what happened
    line: str = "error: "  # how that line starts ("warning: ", "note: ", "[" for the stats line)
    stdin: Optional[bytes] = None
    patch: Optional[Callable[[pytest.MonkeyPatch], None]] = None  # set up the circumstance (Ctrl-C, no TTY...)
    absent: str = ""  # must not appear anywhere in the output


#: Python source: demo-qwen's tokenizer makes about 8 tokens of each copy.
CODE = "def f(x):\n    return x\n"
#: What Python makes of argv bytes that are not UTF-8 ($'\xff\xfe').
NOT_UTF8_ARG = b"def f(\xff\xfe):".decode("utf-8", "surrogateescape")


def _interrupt(target: str) -> Callable[[pytest.MonkeyPatch], None]:
    """A Ctrl-C while `target` (a dotted function name) runs: start-up."""

    def raise_interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    return lambda monkeypatch: monkeypatch.setattr(target, raise_interrupt)


def _terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mlx_mtp.cli._has_terminal", lambda: True)


def _chat_interrupted(monkeypatch: pytest.MonkeyPatch) -> None:
    _terminal(monkeypatch)
    _interrupt("mlx_mtp.apps.chat.app.run")(monkeypatch)


def _chat_headless(monkeypatch: pytest.MonkeyPatch) -> None:
    """`mlx-mtp chat` as if in a terminal; the app runs headless and quits
    once its load has failed, as a user would after reading the error."""
    import asyncio

    from mlx_mtp.apps.chat.app import ChatApp

    def run(app: ChatApp) -> None:
        async def until_failed() -> None:
            async with app.run_test(size=(100, 32)) as pilot:
                for _ in range(1200):
                    if app.load_error is not None:
                        return
                    await pilot.pause(0.05)

        asyncio.run(until_failed())

    _terminal(monkeypatch)
    monkeypatch.setattr(ChatApp, "run", run)


def _no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError


CASES = [
    # models that are not there, or not whole
    Case("missing-dir", ("generate", "-m", "{empty}/nope", "hi"), 1, "no such file or directory"),
    Case("empty-dir", ("generate", "-m", "{empty}", "hi"), 1, "config.json"),
    Case("config-only", ("generate", "-m", "{config-only}", "hi"), 1, "safetensors"),
    Case("no-tokenizer", ("generate", "-m", "{no-tokenizer}", "hi"), 1, "tokenizer"),
    Case("bad-json", ("generate", "-m", "{bad-json}", "hi"), 1, "not valid JSON"),
    Case("unknown-model-type", ("generate", "-m", "{unknown-type}", "hi"), 1, "'frobnicator'"),
    Case("truncated-gguf", ("generate", "-m", "{truncated-gguf}", "hi"), 1, "truncated.gguf"),
    Case("random-gguf", ("generate", "-m", "{random-gguf}", "hi"), 1, "random.gguf"),
    Case("inspect-truncated-gguf", ("inspect", "{truncated-gguf}"), 1, "truncated.gguf"),
    # drafters
    Case("stripped-head-mtp", ("generate", "-m", "{stripped}", "--drafter", "mtp", "hi"), 1, "--drafter none"),
    Case("stripped-head-auto", ("generate", "-m", "{stripped}", "-n", "2", "hi"), 0, "no mtp.* weights", line="note: "),
    Case("mismatched-drafter", ("generate", "-m", "{model}", "--drafter", str(assets_dir() / "demo-gemma" / "assistant"),
                                "hi"), 1, "cannot pair"),
    Case("drafter-typo", ("generate", "-m", "{model}", "--drafter", "eagle", "hi"), 2, "--drafter"),
    # prompts
    Case("over-long-prompt", ("generate", "-m", "{model}", "--no-chat-template", "x" * 2100), 1, "context is 2048"),
    Case("empty-stdin", ("generate", "-m", "{model}"), 2, "no prompt", stdin=b""),
    # flags
    Case("temp-nan", ("generate", "-m", "{model}", "--temp", "nan", "hi"), 2, "--temp"),
    Case("top-p-zero", ("generate", "-m", "{model}", "--top-p", "0", "hi"), 2, "--top-p"),
    Case("k-negative", ("generate", "-m", "{model}", "-k", "-1", "hi"), 2, "--num-draft"),
    Case("max-tokens-zero", ("generate", "-m", "{model}", "-n", "0", "hi"), 2, "--max-tokens"),
    Case("bench-k-words", ("bench", "-m", "{model}", "-k", "one,two"), 2, "-k"),
    Case("bench-bad-context", ("bench", "-m", "{model}", "--context", "-5"), 2, "--context"),
    Case("seed-negative", ("generate", "-m", "{model}", "--seed", "-1", "hi"), 2, "--seed"),
    Case("seed-2**64", ("generate", "-m", "{model}", "--seed", str(2**64), "hi"), 2, "0..2**64-1"),
    Case("bench-seed-2**64", ("bench", "-m", "{model}", "--seed", str(2**64)), 2, "--seed"),
    Case("seed-2**64-1", ("generate", "-m", "{model}", "--seed", str(2**64 - 1), "--temp", "1", "-n", "2", "hi"),
         0, "prompt", line="["),
    Case("k-deeper-than-useful", ("generate", "-m", "{model}", "-k", "100", "-n", "3", "hi"), 0,
         "-k 100 drafts deeper than the mtp drafter can use", line="warning: "),
    Case("plot-without-matplotlib", ("bench", "-m", "{empty}/nope", "--plot", "{empty}/p.png"), 1, "matplotlib",
         patch=_no_matplotlib),  # checked before the model is even looked for
    # weights that load but are damaged
    Case("nan-weights", ("generate", "-m", "{nan-weights}", "hi"), 1, "weights are most likely corrupt",
         absent="<|endoftext|>"),
    # empty prompts: a usage error wherever they come from
    Case("empty-prompt", ("generate", "-m", "{model}", ""), 2, "the prompt is empty"),
    Case("blank-prompt", ("generate", "-m", "{model}", " \t\n "), 2, "the prompt is empty"),
    Case("blank-stdin", ("generate", "-m", "{model}", "-"), 2, "the prompt is empty", stdin=b"  \n\n"),
    Case("bench-blank-prompt", ("bench", "-m", "{model}", "--prompts", "{blank-prompts}"), 2,
         "blank-prompts.jsonl:2: the prompt is empty"),
    Case("eos-at-once", ("generate", "--no-chat-template", "--temp", "0", "def fibonacci(n):"), 0,
         "finish stop after 0 tokens: the model emitted end-of-sequence", line="["),
    # prompt bytes that are not UTF-8: replaced, with one warning
    Case("not-utf8-argv", ("generate", "-m", "{model}", "-n", "2", NOT_UTF8_ARG), 0, "not valid UTF-8",
         line="warning: "),
    Case("not-utf8-stdin", ("generate", "-m", "{model}", "-n", "2"), 0, "2 invalid byte", line="warning: ",
         stdin=b"def f(\xff\xfe):\n"),
    # over-long prompts: our one line, not the tokenizer's warning
    Case("over-long-demo-prompt", ("generate", "-m", "demo-qwen", "--no-chat-template", CODE * 600), 1,
         "context is 4096", absent="indexing errors"),
    # chat
    Case("chat-without-terminal", ("chat", "-m", "{model}"), 1, "needs a terminal"),
    Case("chat-load-fails", ("chat", "-m", "{empty}/nope"), 1, "could not load the model", patch=_chat_headless),
    # Ctrl-C during start-up: exit 130 quietly, whatever the subcommand
    Case("ctrl-c-loading-generate", ("generate", "-m", "{model}", "hi"), 130, "", patch=_interrupt("mlx_mtp.api.load")),
    Case("ctrl-c-loading-bench", ("bench", "-m", "{model}"), 130, "", patch=_interrupt("mlx_mtp.api.load")),
    Case("ctrl-c-loading-tune", ("tune", "-m", "{model}"), 130, "", patch=_interrupt("mlx_mtp.api.load")),
    Case("ctrl-c-loading-chat", ("chat", "-m", "{model}"), 130, "", patch=_chat_interrupted),
    Case("ctrl-c-inspect", ("inspect", "{model}"), 130, "", patch=_interrupt("mlx_mtp.loading.inspect.inspect_path")),
    Case("ctrl-c-convert", ("convert", "{model}", "-o", "{empty}/out"), 130, "",
         patch=_interrupt("mlx_mtp.loading.convert.convert")),
    Case("ctrl-c-graft", ("graft", "--from", "{model}", "--into", "{stripped}"), 130, "",
         patch=_interrupt("mlx_mtp.loading.graft.graft")),
    # convert / inspect (convert onto existing or source folders, NaN checks, ...)
    Case("convert-onto-existing", ("convert", "{model}", "-o", "{stripped}", "--quiet"), 1, "not empty"),
    Case("convert-onto-source", ("convert", "{model}", "-o", "{model}", "--quiet"), 1, "not empty"),
    Case("convert-into-source", ("convert", "{model}", "-o", "{model}/sub", "--quiet"), 1, "inside the source"),
    # (a refused convert into "{empty}/out" must also clean up: the input hash covers it)
    Case("convert-nan", ("convert", "{nan-weights}", "-o", "{empty}/out", "--quiet"), 1, "NaN or Inf"),
    Case("inspect-verify-nan", ("inspect", "{nan-weights}", "--verify"), 1, "NaN or Inf"),
    Case("convert-truncated", ("convert", "{truncated}", "-o", "{empty}/out", "--quiet"), 1, "truncated"),
    Case("inspect-truncated", ("inspect", "{truncated}"), 1, "truncated safetensors file"),
    Case("convert-foreign-quant", ("convert", "{awq}", "-o", "{empty}/out", "--quiet"), 1, "quant_method 'awq'"),
    Case("convert-unlabelled-fp8", ("convert", "{unlabelled-fp8}", "-o", "{empty}/out", "--quiet"), 1,
         "F8_E4M3"),
    Case("convert-unknown-model-type", ("convert", "{unknown-type}", "-o", "{empty}/out"), 1, "'frobnicator'"),
    Case("inspect-unknown-model-type", ("inspect", "{unknown-type}"), 1, "'frobnicator'"),
    Case("inspect-drafter-demo-name", ("inspect", "{model}", "--drafter", "demo-qwen"), 2, "bundled demo model"),
    Case("generate-drafter-demo-name", ("generate", "-m", "{model}", "--drafter", "demo-qwen", "hi"), 2,
         "bundled demo model"),
]


def _tree_hash(paths) -> str:
    """One digest over every file under `paths` (names and bytes)."""
    digest = hashlib.sha256()
    for top in sorted({Path(p) for p in paths}):
        files = sorted(top.rglob("*")) if top.is_dir() else [top]
        for f in files:
            if f.is_file():
                digest.update(str(f).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def _argv(case_argv: Tuple[str, ...]) -> Tuple[list, list]:
    """The row's argv with "{name}" filled in, and the paths it reads: the
    inputs, any existing path in it, and the bundled demo it runs."""
    argv, paths = [], [INPUTS.root]
    for arg in case_argv:
        for name in INPUTS.builders:
            if "{" + name + "}" in arg:
                arg = arg.replace("{" + name + "}", str(INPUTS[name]))
        argv.append(arg)
        if len(arg) < 4096 and os.path.exists(arg):
            paths.append(arg)
    if "-m" in argv:
        demo = argv[argv.index("-m") + 1]
    else:
        demo = "demo-qwen" if argv[0] in ("generate", "bench", "chat", "tune") else None
    if demo in ("demo-qwen", "demo-gemma", "tiny-qwen35"):
        paths.append(assets_dir() / demo)
    return argv, paths


def assert_says(code: int, stdout: str, stderr: str, prefix: str, fragment: str, absent: str = "") -> None:
    """No traceback; exactly one line starts with `prefix` and holds
    `fragment` (with no fragment, nothing says "error:"); an error exit
    prints nothing on stdout and one error line."""
    output = stdout + stderr
    assert "Traceback" not in output, output
    assert not absent or absent not in output, output
    if fragment:
        lines = [line for line in stderr.splitlines() if line.startswith(prefix)]
        assert len(lines) == 1, stderr
        assert fragment in lines[0], lines[0]
    else:
        assert "error:" not in stderr, stderr
    if code not in (0, 130):
        assert stdout == "" and stderr.count("error: ") == 1, output


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, monkeypatch):
    argv, paths = _argv(case.argv)
    before = _tree_hash(paths)
    if case.patch is not None:
        case.patch(monkeypatch)
    result = CliRunner().invoke(main, argv, input=case.stdin, env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == case.code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert_says(case.code, result.stdout, result.stderr, case.line, case.says, case.absent)
    assert _tree_hash(paths) == before, "an input file changed"


# --- Ctrl-C as a real signal: a subprocess each -------------------------------------

#: Runs `mlx_mtp.cli.main(argv)` like the installed `mlx-mtp` script, in one
#: of these modes: "plain"; "ctrl-c-importing-mlx" (SIGINT arrives while
#: MLX is being imported, the slowest part of start-up); "no-eos" (the
#: tokenizer has no EOS, so generation runs until -n).
DRIVER = r"""
import importlib.abc, os, signal, sys

mode, argv = sys.argv[1], sys.argv[2:]
if mode == "ctrl-c-importing-mlx":
    class Interrupt(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "mlx.core":
                os.kill(os.getpid(), signal.SIGINT)
            return None

    sys.meta_path.insert(0, Interrupt())
from mlx_mtp.cli import main

if mode == "no-eos":
    import mlx_mtp.api as api

    real_load = api.load

    def load(*args, **kwargs):
        model, tokenizer = real_load(*args, **kwargs)
        tokenizer._eos_token_ids = set()
        return model, tokenizer

    api.load = load
main(argv, prog_name="mlx-mtp")
"""


def _start(mode: str, argv: list) -> subprocess.Popen:
    # SIGINT restored to its default: a test run started in the background
    # (`pytest &`) hands its children SIGINT ignored.
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, mode, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=dict(os.environ, HF_HUB_OFFLINE="1"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _when_loading_blocks(proc: subprocess.Popen) -> None:
    """Wait until the process has opened the FIFO config.json to read it,
    then send SIGINT while it waits for its bytes."""
    fifo = INPUTS["fifo-model"] / "config.json"
    deadline = time.monotonic() + 120
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # fails until a reader has it open
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "never reached the config"
            time.sleep(0.05)
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        os.close(fd)


def _when_text_streams(proc: subprocess.Popen) -> None:
    """Send SIGINT once generated text has reached stdout."""
    assert proc.stdout.read(1), "no text came out"
    proc.send_signal(signal.SIGINT)


#: (id, driver mode, argv, what to do to the running process, a fragment of stderr)
SIGNAL_CASES = [
    ("ctrl-c-loading", "plain", ("generate", "-m", "{fifo-model}", "hi"), _when_loading_blocks, ""),
    ("ctrl-c-generating", "no-eos", ("generate", "-m", "{model}", "-n", "1900", "hi"), _when_text_streams,
     "finish interrupted"),
] + [
    (f"ctrl-c-importing-{argv[0]}", "ctrl-c-importing-mlx", argv, None, "")
    for argv in [
        ("generate", "-m", "{model}", "hi"),
        ("bench", "-m", "{model}"),
        ("tune", "-m", "{model}"),
        ("inspect", "{model}"),
        ("convert", "{model}", "-o", "{empty}/out"),
        ("graft", "--from", "{model}", "--into", "{stripped}"),
    ]
]


@pytest.mark.parametrize("mode, case_argv, act, says", [c[1:] for c in SIGNAL_CASES], ids=[c[0] for c in SIGNAL_CASES])
def test_ctrl_c(mode, case_argv, act, says):
    argv, paths = _argv(case_argv)
    before = _tree_hash(paths)
    proc = _start(mode, argv)
    if act is not None:
        act(proc)
    stdout, stderr = (b.decode("utf-8", "replace") for b in proc.communicate(timeout=120))
    assert proc.returncode == 130, (proc.returncode, stderr)
    assert_says(130, stdout, stderr, "[", says)  # the stats line, when there is one
    if says:
        assert stderr.rstrip().endswith("interrupted"), stderr
    assert _tree_hash(paths) == before, "an input file changed"


# --- the Python API: ValueErrors (and kin) with one-line messages --------------------


@pytest.fixture(scope="module")
def loaded():
    import mlx_mtp

    return mlx_mtp.load(INPUTS["model"])


def _api(call: Callable[..., object]) -> Callable[[tuple], object]:
    return lambda loaded: call(*loaded)


def _collect(model, tokenizer, prompt, **options):
    import mlx_mtp

    return list(mlx_mtp.stream_generate(model, tokenizer, prompt, **options))


API_CASES = [
    ("empty-text", lambda m, t: _collect(m, t, ""), "EmptyPromptError", "the prompt is empty"),
    ("blank-text", lambda m, t: _collect(m, t, "  \n\t"), "EmptyPromptError", "the prompt is empty"),
    ("blank-raw-text", lambda m, t: _collect(m, t, "   ", chat_template=False), "EmptyPromptError",
     "the prompt is empty"),
    ("no-token-ids", lambda m, t: _collect(m, t, []), "EmptyPromptError", "the prompt is empty"),
    ("over-long-token-ids", lambda m, t: _collect(m, t, [5] * 2100), "ContextLengthError", "context is 2048"),
    ("negative-num-draft", lambda m, t: _collect(m, t, "hi", num_draft=-1), "ValueError", "num_draft"),
]


@pytest.mark.parametrize("call, error, says", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(loaded, call, error, says):
    with pytest.raises(ValueError) as info:
        call(*loaded)
    assert type(info.value).__name__ == error
    assert says in str(info.value) and "\n" not in str(info.value)


def test_api_corrupt_weights():
    import mlx_mtp

    model, tokenizer = mlx_mtp.load(INPUTS["nan-weights"])
    with pytest.raises(mlx_mtp.CorruptWeightsError, match="corrupt"):
        mlx_mtp.generate(model, tokenizer, "hi", max_tokens=4)


def test_api_reduces_seeds_modulo_2_64(loaded):
    import mlx_mtp

    def tokens(seed):
        responses = mlx_mtp.stream_generate(*loaded, "hi", max_tokens=12, temp=1.5, seed=seed, num_draft=2)
        return [t for r in responses for t in r.tokens]

    assert tokens(-1) == tokens(2**64 - 1)
    assert tokens(2**64 + 5) == tokens(5)
    assert tokens(-1) != tokens(5) or tokens(0) != tokens(5)  # the seed does matter


def test_demo_tokenizers_know_the_context_and_never_warn_about_length():
    """The demos' model_max_length is their context; and a tokenizer's own
    limit never prints transformers' "indexing errors" warning through us."""
    import logging

    import mlx_mtp
    from mlx_mtp.api import build_prompt

    for name in ("demo-qwen", "demo-gemma"):
        config = json.loads((assets_dir() / name / "config.json").read_text())
        text = config.get("text_config", config)
        tokenizer_config = json.loads((assets_dir() / name / "tokenizer_config.json").read_text())
        assert tokenizer_config["model_max_length"] == text["max_position_embeddings"] == 4096

    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    records = Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        _, tokenizer = mlx_mtp.load(INPUTS["model"], drafter="none")  # model_max_length 2048
        assert len(build_prompt(tokenizer, CODE * 400)) > 2048
        assert not [m for m in records.messages if "indexing errors" in m]
        # The control: the same tokenizer loaded by transformers itself does warn.
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(INPUTS["model"]).encode(CODE * 400)
        assert [m for m in records.messages if "indexing errors" in m]
    finally:
        logger.removeHandler(records)


# --- chat: the context limit, and a stop while a long prompt pre-fills --------------


def _no_eos(monkeypatch, tokenizer) -> None:
    monkeypatch.setattr(tokenizer, "_eos_token_ids", set())


def test_chat_context_never_shows_more_than_the_limit(loaded, monkeypatch):
    from mlx_mtp.chat_session import ChatSession

    model, tokenizer = loaded
    _no_eos(monkeypatch, tokenizer)
    session = ChatSession(model, tokenizer, max_tokens=500, max_context=60)
    turn = session.send("hi")
    assert turn.finish_reason == "context"
    assert session.context_used == session.context_limit == 60
    pytest.importorskip("textual")
    from mlx_mtp.apps.chat.app import format_stats_bar

    assert "ctx 60/60" in format_stats_bar(session, turn.stats).plain


def test_chat_stop_during_prefill_keeps_history_and_cache_consistent(loaded, monkeypatch):
    """A stop lands between prefill chunks (8 tokens here): the turn ends
    with no answer, the message stays in the history, the cache holds a
    prefix of it, and the next turn is what a fresh session would answer."""
    import mlx_mtp.engine as engine
    from mlx_mtp.chat_session import ChatSession

    model, tokenizer = loaded
    real_prefill = engine._prefill
    session = ChatSession(model, tokenizer, max_tokens=16)

    def prefill_in_8s(*args, **kwargs):
        args = list(args)
        args[8] = 8  # step_size
        cancelled = args[9] if len(args) > 9 else kwargs.pop("cancelled", None)

        def stop_after_first_chunk() -> bool:
            session.cancel()  # as the app's Esc does, from any thread
            return cancelled()

        return real_prefill(*args[:9], stop_after_first_chunk)

    session.send("one")  # a first turn, so the stopped one extends a cached history
    monkeypatch.setattr(engine, "_prefill", prefill_in_8s)
    turn = session.send("a long message " * 4)
    assert turn.finish_reason == "cancelled" and turn.tokens == [] and turn.text == ""
    assert turn.stats.prefilled_tokens == 8
    assert [m.role for m in session.messages] == ["user", "assistant"] * 2
    cached = session.prompt_cache.tokens
    assert session.tokens[: len(cached)] == cached and len(cached) < len(session.tokens)

    monkeypatch.setattr(engine, "_prefill", real_prefill)
    prompt = session.prompt_for("and now?")
    after = session.send("and now?")
    assert after.stats.prefilled_tokens == len(prompt) - len(cached)
    # ...and the answer is the one an uncached run of the same prompt gives.
    uncached = _collect(model, tokenizer, prompt, max_tokens=16, num_draft=session.num_draft)
    assert [t for r in uncached for t in r.tokens] == after.tokens
