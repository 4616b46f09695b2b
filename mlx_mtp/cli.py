"""The `mlx-mtp` command line.

    mlx-mtp generate -m Qwen/Qwen3.5-4B "Write a haiku about rollbacks"
    echo "prompt" | mlx-mtp generate -m ./model --json

Text streams to stdout; a one-line summary (and any notes or warnings) goes
to stderr. Errors are one `error: ...` line on stderr: exit 2 for bad
arguments (an empty or whitespace-only prompt is one), 1 for everything
else, 130 on Ctrl-C (start-up included: the package imports MLX lazily, so
this module runs its handling first).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import click

from . import defaults
from .report import cli_words, format_stats

if TYPE_CHECKING:  # the real import waits for a command to run: it loads MLX
    from .options import GenerationOptions

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class _Main(click.Group):
    """A group that reports every error as one `error: ...` line on stderr
    (no usage block, no traceback) with click's exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.Abort:  # Ctrl-C outside generation
            click.echo(file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        except click.ClickException as e:
            no_args = getattr(click.exceptions, "NoArgsIsHelpError", ())
            if isinstance(e, no_args):  # bare `mlx-mtp`: show the help
                e.show()
                sys.exit(e.exit_code)
            message = e.format_message()
            if isinstance(e, click.UsageError) and e.ctx is not None:
                message = f"{message.rstrip('.')}. Try '{e.ctx.command_path} --help'."
            _error(message)
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


def _error(message: str) -> None:
    message = " ".join(str(message).split()) or "unknown error"
    click.echo(f"error: {message}", err=True)


class _Finite(click.ParamType):
    """A float in [lo, hi] (lo excluded when lo_open); NaN and inf rejected."""

    name = "float"

    def __init__(self, lo: Optional[float] = None, hi: Optional[float] = None, lo_open: bool = False):
        self.lo, self.hi, self.lo_open = lo, hi, lo_open

    def convert(self, value, param, ctx):
        if isinstance(value, float):
            x = value
        else:
            try:
                x = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.lo is not None and (x <= self.lo if self.lo_open else x < self.lo):
            self.fail(f"{x:g} is not in the range {self._range()}", param, ctx)
        if self.hi is not None and x > self.hi:
            self.fail(f"{x:g} is not in the range {self._range()}", param, ctx)
        return x

    def _range(self) -> str:
        lo = "" if self.lo is None else f"{self.lo:g}{'<' if self.lo_open else '<='}"
        hi = "" if self.hi is None else f"<={self.hi:g}"
        return f"{lo}x{hi}"


class _DrafterArg(click.ParamType):
    """auto / none / mtp, or something that can name a drafter model: an
    existing path or an owner/name repo id (anything else is a typo)."""

    name = "drafter"

    def convert(self, value, param, ctx):
        from .loading.assistant import drafter_problem  # the one check every front end uses

        value = str(value)
        problem = drafter_problem(value)
        if problem:
            self.fail(problem, param, ctx)
        return value


class _DraftLength(click.ParamType):
    """`auto` (the adaptive policy) or a draft length N >= 0."""

    name = "auto|N"

    def __init__(self, most: Optional[int] = None):
        self.most = most

    def convert(self, value, param, ctx):
        if value == "auto":
            return value
        try:
            k = int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not auto or a whole number", param, ctx)
        if k < 0 or (self.most is not None and k > self.most):
            limit = f"0..{self.most}" if self.most is not None else ">= 0"
            self.fail(f"{k} is not auto or a draft length in {limit}", param, ctx)
        return k


def _tools_file(ctx, param, value: Optional[str]) -> Optional[List[Dict[str, Any]]]:
    """--tools FILE.json: the list of tool schemas in it (a one-line usage
    error when the file is missing or holds something else)."""
    from .templates import load_tools

    if value is None:
        return None
    try:
        return load_tools(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _template_args(ctx, param, values: tuple) -> Dict[str, Any]:
    """--template-arg KEY=VALUE (repeatable) as one dict; VALUE is JSON
    when it parses as JSON, else the string."""
    from .templates import parse_template_arg

    args: Dict[str, Any] = {}
    for text in values:
        try:
            key, value = parse_template_arg(text)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None
        args[key] = value
    return args


def template_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Declare --tools and --template-arg on a command (generate and chat
    take them alike)."""
    command = click.option(
        "--template-arg", "chat_template_kwargs", multiple=True, callback=_template_args, metavar="KEY=VALUE",
        help="Pass KEY to the chat template (repeatable), e.g. reasoning_effort=high or "
             "preserve_thinking=true; VALUE is read as JSON when it parses, else as text.")(command)
    return click.option(
        "--tools", "tools", default=None, callback=_tools_file, metavar="FILE.json",
        help="Declare these tools to the chat template: a JSON list of function schemas.")(command)


_K_HELP = ("Tokens drafted per cycle: auto (default) picks 0..6 each cycle from measured acceptance and speed, "
           "never slower than plain decoding; N drafts exactly N; 0 is plain decoding.")


def _seed_range(ctx, param, value: Optional[int]) -> Optional[int]:
    """--seed in 0..2**64-1, the seeds MLX takes (the API reduces others)."""
    if value is None:
        return None
    from .engine import SEED_MODULUS  # imported here: it loads MLX

    if not 0 <= value < SEED_MODULUS:
        raise click.BadParameter(f"{value} is not in the range 0..2**64-1")
    return value


def sampling_options(
    temp_help: str = "Sampling temperature (0: greedy).",
    seed_default: Optional[int] = None,
    seed_help: Optional[str] = "Random seed for sampling.",
    readable: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare --temp, --top-p, --top-k, --min-p, the penalties and --seed on
    a command and hand it one `options: GenerationOptions` (sampling and seed
    set) in their place. The commands differ only in the --temp / --seed
    wording, bench's fixed default seed and whether the defaults are greedy
    (bench: exact, checkable output) or `readable` (generate and chat: the
    sampling in defaults.py, which keeps a small model out of loops)."""
    temp, top_p, penalty = (defaults.TEMP, defaults.TOP_P, defaults.REPETITION_PENALTY) if readable else (0.0, 1.0, 1.0)
    lo, hi = defaults.ADDITIVE_PENALTY_RANGE
    flags = [
        click.option("--temp", type=_Finite(lo=0.0), default=temp, show_default=True, help=temp_help),
        click.option("--top-p", type=_Finite(lo=0.0, hi=1.0, lo_open=True), default=top_p, show_default=True,
                     help="Nucleus sampling mass, 0 < p <= 1."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Keep the k most likely tokens (0: all)."),
        click.option("--min-p", type=_Finite(lo=0.0, hi=1.0), default=0.0, show_default=True,
                     help="Drop tokens below min-p times the top probability."),
        click.option("--repetition-penalty", type=_Finite(lo=0.0, lo_open=True), default=penalty,
                     show_default=True, help="Penalise recent tokens: positive logits / P, negative ones * P (mlx-lm's rule; 1: off)."),
        click.option("--repetition-context-size", type=click.IntRange(min=1),
                     default=defaults.REPETITION_CONTEXT_SIZE, show_default=True,
                     help="How many of the newest tokens, prompt included, the penalties look at."),
        click.option("--presence-penalty", type=_Finite(lo=lo, hi=hi), default=0.0, show_default=True,
                     help=f"Subtract this from the logit of every recent token ({lo:g}..{hi:g}, as OpenAI's)."),
        click.option("--frequency-penalty", type=_Finite(lo=lo, hi=hi), default=0.0, show_default=True,
                     help=f"Subtract this per recent occurrence of a token ({lo:g}..{hi:g}, as OpenAI's)."),
        click.option("--seed", type=int, default=seed_default, show_default=seed_default is not None,
                     callback=_seed_range, help=seed_help),
    ]

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def with_options(*args: Any, temp: float, top_p: float, top_k: int, min_p: float,
                         repetition_penalty: float, repetition_context_size: int, presence_penalty: float,
                         frequency_penalty: float, seed: Optional[int], **kwargs: Any) -> Any:
            # Imported here: the options pull in MLX, and `--help` stays fast without it.
            from .options import GenerationOptions

            options = GenerationOptions.make(
                temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=repetition_penalty,
                repetition_context_size=repetition_context_size, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, seed=seed,
            )
            return command(*args, options=options, **kwargs)

        # Applied innermost first, as stacked @click.option lines would be, so
        # the flags keep their place in --help between the command's others.
        for flag in reversed(flags):
            with_options = flag(with_options)
        return with_options

    return decorate


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-mtp", prog_name="mlx-mtp")
def main() -> None:
    """Lossless speculative decoding on MLX with multi-token-prediction heads."""


@main.command()
@click.argument("prompt", required=False)
@click.option("-m", "--model", "model_path", default=None, metavar="PATH_OR_REPO",
              help="Local model directory, Hugging Face repo id, or a bundled demo "
                   "(demo-qwen, demo-gemma, tiny-qwen35). Default: the bundled demo.")
@click.option("--drafter", type=_DrafterArg(), default="auto", show_default=True,
              metavar="auto|none|mtp|ngram|mtp+ngram|assistant+ngram|PATH_OR_REPO[+ngram]",
              help="auto: the MTP head when there is one, else plain decoding; mtp: require it; none: plain "
                   "decoding; a directory, repo id or .gguf file: a separate drafter model (Gemma 4 assistant); "
                   "ngram: prompt lookup (any mlx-lm model); X+ngram: prompt lookup where the text repeats, "
                   "else X (assistant: the model's bundled one).")
@click.option("-k", "--num-draft", type=_DraftLength(), default=None, metavar="auto|N", help=_K_HELP)
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most tokens to generate.")
@sampling_options(readable=True)
@click.option("--system", default=None, help="System message.")
@click.option("--no-chat-template", is_flag=True, help="Use the prompt as raw text.")
@click.option("--thinking/--no-thinking", "enable_thinking", default=None,
              help="Turn the chat template's thinking mode on or off (default: the template's).")
@template_options
@click.option("--stop", multiple=True, help="Stop string (repeatable); not included in the output.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (text, tokens, stats, per-cycle trace) instead of streaming.")
@click.option("--max-context", type=click.IntRange(min=1), default=None, hidden=True,
              help="Override the model's context length.")
def generate(
    prompt: Optional[str],
    model_path: str,
    drafter: str,
    num_draft: Optional[int],
    max_tokens: int,
    options: GenerationOptions,
    system: Optional[str],
    no_chat_template: bool,
    enable_thinking: Optional[bool],
    tools: Optional[List[Dict[str, Any]]],
    chat_template_kwargs: Dict[str, Any],
    stop: tuple,
    as_json: bool,
    max_context: Optional[int],
) -> None:
    """Generate from PROMPT (or stdin, when PROMPT is '-' or left out)."""
    prompt = _read_prompt(prompt)
    model_path = model_path or _default_model()
    options = options.replace(
        num_draft=num_draft, max_tokens=max_tokens, system=system, chat_template=not no_chat_template,
        enable_thinking=enable_thinking, tools=tools, chat_template_kwargs=chat_template_kwargs, stop=stop,
        max_context=max_context,
    )
    try:
        _generate(prompt, model_path, drafter, options, as_json)
    except KeyboardInterrupt:  # while loading: nothing to report
        click.echo(file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _default_model() -> str:
    from .defaults import default_model

    return default_model()


def _read_prompt(prompt: Optional[str]) -> str:
    """PROMPT, or stdin for '-' / no PROMPT. Bytes that are not UTF-8 become
    U+FFFD with one warning; an empty or blank prompt is a usage error."""
    if prompt is None or prompt == "-":
        stdin = sys.stdin
        if stdin is None or (prompt is None and stdin.isatty()):
            raise click.UsageError("no prompt: pass PROMPT, or '-' / a pipe to read it from stdin")
        # Bytes, so that invalid UTF-8 is ours to handle whatever the locale.
        raw = stdin.buffer.read() if hasattr(stdin, "buffer") else stdin.read().encode("utf-8", "surrogateescape")
        if raw.endswith(b"\n"):  # `echo` adds one
            raw = raw[:-1]
        if not raw:
            raise click.UsageError("no prompt: stdin was empty")
    else:
        # Python hands argv bytes that are not UTF-8 over as lone surrogates.
        raw = prompt.encode("utf-8", "surrogateescape")
    prompt = _decode_prompt(raw)
    if not prompt.strip():
        raise click.UsageError("the prompt is empty or only whitespace")
    return prompt


def _decode_prompt(raw: bytes) -> str:
    """UTF-8 text; invalid bytes are replaced by U+FFFD and one warning says so."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", "replace")
        bad = text.count("\ufffd") - raw.decode("utf-8", "ignore").count("\ufffd")
        click.echo(f"warning: the prompt is not valid UTF-8: {bad} invalid byte sequence(s) replaced with U+FFFD",
                   err=True)
        return text


def _runtime_errors() -> tuple:
    from .engine import ContextLengthError, CorruptWeightsError
    from .api import DrafterUnavailableError
    from .loading import CheckpointError, ModelNotFoundError

    return (ModelNotFoundError, CheckpointError, DrafterUnavailableError, ContextLengthError, CorruptWeightsError)


def _generate(prompt: str, model_path: str, drafter: str, options: GenerationOptions, as_json: bool) -> None:
    from .api import stream_generate  # imported late: keeps `--help` fast

    known = _runtime_errors()
    try:
        model, tokenizer = _load(model_path, drafter)
    except known as e:
        _fail(e)
    except (OSError, ValueError) as e:  # tokenizer or config problems
        _fail(e, prefix=f"cannot load {model_path}: ")

    if options.num_draft is None:
        options = options.replace(num_draft=model.default_num_draft)
    num_draft = options.num_draft
    _show_notes(model)
    if model.drafter is not None and num_draft == 0:
        _note("drafting disabled (-k 0); plain decoding")
    _warn_deep_drafts(model, [num_draft])

    out = sys.stdout
    text: List[str] = []
    tokens: List[int] = []
    trace: List[Dict[str, Any]] = []
    stats = None
    passes = 0
    interrupted = False
    try:
        for response in stream_generate(model, tokenizer, prompt, options):
            stats = response.stats
            # One trace entry per verify pass: the prefill and a trailing
            # text-only response do not advance target_passes.
            if stats.target_passes > passes:
                passes = stats.target_passes
                trace.append({"drafted": list(response.drafted), "accepted": int(response.accepted)})
            tokens.extend(response.tokens)
            text.append(response.text)
            if not as_json and response.text:
                out.write(response.text)
                out.flush()
    except KeyboardInterrupt:
        interrupted = True
        if stats is not None:
            stats.finish_reason = "interrupted"
    except known as e:
        _end_stream(as_json, text)
        _fail(e)
    except ValueError as e:  # e.g. an empty prompt
        _end_stream(as_json, text)
        _fail(e)

    if as_json:
        payload = {
            "text": "".join(text),
            "tokens": tokens,
            "stats": _stats_dict(stats, num_draft),
            "trace": trace,
        }
        out.write(json.dumps(payload) + "\n")
        out.flush()
    else:
        _end_stream(as_json, text)
    if stats is not None:
        click.echo(format_stats(stats), err=True)
    if interrupted:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


def _load(model_path: str, drafter: str) -> tuple:
    """load(), with stray prints and warnings kept off stdout: each distinct
    warning becomes one `warning: ...` line on stderr. The drafter's notes are
    not warnings; `_show_notes` prints them."""
    from .api import load

    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(sys.stderr):
        # "default": a warning raised again from the same place is recorded once.
        warnings.simplefilter("default")
        model, tokenizer = load(model_path, drafter=drafter)
    for w in caught:
        click.echo(f"warning: {cli_words(str(w.message))}", err=True)
    return model, tokenizer


def _note(message: str) -> None:
    click.echo(f"note: {cli_words(message)}", err=True)


def _show_notes(model: Any) -> None:
    """Why drafting is off, or what the loaded drafter had to fall back on."""
    if model.drafter is None:
        _note(model.drafter_note or "no drafter")
    elif model.drafter.note:
        _note(model.drafter.note)


def _warn_deep_drafts(model: Any, num_drafts: List[Any]) -> None:
    """One warning when a fixed -k drafts deeper than the drafter can use
    (it still runs as asked: -k is the user's to choose)."""
    from .engine import deep_draft_warning

    deepest = max((k for k in num_drafts if isinstance(k, int)), default=0)
    warning = deep_draft_warning(model.drafter, deepest)
    if warning:
        click.echo(f"warning: -k {deepest} {warning}", err=True)


def _end_stream(as_json: bool, text: List[str]) -> None:
    """End streamed text with a newline so the stats line starts on its own."""
    if as_json:
        return
    written = "".join(text)
    if written and not written.endswith("\n"):
        out = sys.stdout
        out.write("\n")
        out.flush()
    text.clear()


def _fail(e: BaseException, prefix: str = "") -> None:
    _error(prefix + cli_words(str(e) or type(e).__name__))
    sys.exit(EXIT_ERROR)


STATS_KEYS = (
    "prompt_tokens", "generated_tokens", "draft_tokens", "accepted_tokens", "acceptance_rate",
    "target_passes", "tokens_per_pass", "host_syncs_per_cycle", "prefill_tokens_per_s",
    "decode_tokens_per_s", "peak_memory_gb", "drafter", "num_draft", "finish_reason",
)


def _stats_dict(stats: Any, num_draft: Any) -> Dict[str, Any]:
    if stats is None:  # interrupted before the prefill finished
        from .engine import Stats

        stats = Stats(num_draft=num_draft, finish_reason="interrupted")
    return stats.to_dict()


def _draft_lengths(ctx, param, value: str) -> List[Any]:
    words = [x.strip() for x in value.split(",") if x.strip()]
    try:
        ks = sorted({int(x) for x in words if x != "auto"})
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected draft lengths like 1,2,3,auto") from None
    if not words or any(k < 0 for k in ks):
        raise click.BadParameter(f"{value!r}: expected non-negative draft lengths like 1,2,3,auto")
    return ks + (["auto"] if "auto" in words else [])


def _drafter_list(ctx, param, value: Optional[str]) -> List[str]:
    """--drafter mtp,ngram,mtp+ngram for bench: each checked as generate checks one."""
    from .loading.assistant import drafter_problem

    words = [x.strip() for x in (value or "").split(",") if x.strip()]
    for word in words:
        problem = drafter_problem(word)
        if problem:
            raise click.BadParameter(problem)
    return words


def _context_lengths(ctx, param, value: Optional[str]) -> List[int]:
    if not value:
        return [0]
    try:
        lengths = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected token counts like 512,2048") from None
    if not lengths or any(n < 0 for n in lengths):
        raise click.BadParameter(f"{value!r}: expected non-negative token counts like 512,2048")
    return lengths


@main.command()
@click.option("-m", "--model", "models", multiple=True, metavar="PATH_OR_REPO",
              help="Model to benchmark (repeatable). Default: the bundled demo models.")
@click.option("-k", "--num-draft", "num_drafts", default="1,2,3,4,auto", show_default=True, callback=_draft_lengths,
              help="Draft lengths to compare with the k=0 baseline, comma-separated; auto is the adaptive policy.")
@click.option("--context", "contexts", default=None, callback=_context_lengths, metavar="N1,N2,...",
              help="Context ladder: run the suite again after a prefix of about N tokens, for each N.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=192, show_default=True)
@sampling_options(temp_help="Sampling temperature (0: greedy, and the lossless check runs).", seed_default=0,
                  seed_help=None)
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON lines with a \"prompt\" (and \"category\") per line. Default: the bundled suite.")
@click.option("--drafter", "drafters", default=None, callback=_drafter_list, metavar="D1,D2,...",
              help="Compare these drafters at each draft length, e.g. mtp,ngram,mtp+ngram (as for generate). "
                   "Default: the model's own (auto).")
@click.option("--lookup/--no-lookup", "lookup", default=None,
              help="Also run the categories where prompt lookup matters (code_edit, doc_qa, json_reformat), "
                   "reported apart from the standard table. Default: on with the bundled suite, off with --prompts.")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run the suite this many times, odd rounds in reverse mode order; per-category speedups are "
                   "medians of the paired ratios (steadier figures on a noisy machine).")
@click.option("--json-out", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Write every figure to this JSON file.")
@click.option("--plot", "plot_file", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Save a PNG of tok/s and speedup per category and mode (needs matplotlib).")
def bench(models: tuple, num_drafts: List[Any], contexts: List[int], max_tokens: int, options: GenerationOptions,
          prompts_file: Optional[str], drafters: List[str], lookup: Optional[bool], rounds: int,
          json_out: Optional[str], plot_file: Optional[str]) -> None:
    """Compare plain decoding with drafting, prompt by prompt."""
    from . import bench as bench_mod
    from .defaults import DEFAULT_MODEL_ORDER, demo_model_path

    if plot_file:  # find out now, not after the whole run
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            _fail(RuntimeError("--plot needs matplotlib: pip install 'mlx-mtp[plot]'"))
    from .engine import EmptyPromptError

    try:
        prompts = bench_mod.load_prompts(prompts_file)
        lookup_prompts = None
        if lookup or (lookup is None and prompts_file is None):
            from .defaults import lookup_prompt_suite

            lookup_prompts = bench_mod.load_prompts(lookup_prompt_suite())
    except EmptyPromptError as e:  # as for generate: an empty prompt is a usage error
        raise click.BadParameter(str(e), param_hint="'--prompts'") from None
    except (OSError, ValueError) as e:
        _fail(e)
    if not models:
        models = [name for name in ("demo-qwen", "demo-gemma") if demo_model_path(name)] or [DEFAULT_MODEL_ORDER[-1]]
    reports = []
    failed = False
    for model_path in models:
        model, tokenizer = _load_or_fail(model_path, "auto")
        _show_notes(model)
        _warn_deep_drafts(model, num_drafts)
        try:
            report = bench_mod.run_bench(model, tokenizer, num_drafts=num_drafts, prompts=prompts, contexts=contexts,
                                         options=options.replace(max_tokens=max_tokens), echo=click.echo,
                                         drafters=drafters, lookup_prompts=lookup_prompts, rounds=rounds)
        except ValueError as e:
            _fail(e)
        failed |= bool(report["lossless_mismatches"])
        reports.append(report)
        click.echo("")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(reports if len(reports) > 1 else reports[0], f, indent=1)
        click.echo(f"wrote {json_out}", err=True)
    if plot_file:
        try:
            bench_mod.plot(reports[0], plot_file)
        except RuntimeError as e:
            _fail(e)
        click.echo(f"wrote {plot_file}", err=True)
    if failed:
        sys.exit(EXIT_ERROR)


def _load_or_fail(model_path: str, drafter: str) -> tuple:
    try:
        return _load(model_path, drafter)
    except _runtime_errors() as e:
        _fail(e)
    except (OSError, ValueError) as e:
        _fail(e, prefix=f"cannot load {model_path}: ")


def _has_terminal() -> bool:
    """Whether stdin and stdout are a TTY: a full-screen app without one
    would wait for keys that never come."""
    return bool(sys.stdin and sys.stdout and sys.stdin.isatty() and sys.stdout.isatty())


@main.command()
@click.option("-m", "--model", "model_path", default=None, metavar="PATH_OR_REPO",
              help="Local model directory, .gguf file or Hugging Face repo id. Default: the bundled demo model.")
@click.option("--drafter", type=_DrafterArg(), default="auto", show_default=True, metavar="auto|none|mtp|PATH",
              help="auto: the MTP head when there is one; mtp: require it; none: plain decoding; "
                   "or a separate drafter model.")
@click.option("-k", "--num-draft", type=_DraftLength(most=16), default=None, metavar="auto|N",
              help=_K_HELP + " /draft auto|N changes it.")
@sampling_options(temp_help="Sampling temperature (0: greedy). /temp T changes it.", readable=True)
@click.option("--system", default=None, help="System message. /system TEXT changes it.")
@click.option("--thinking/--no-thinking", "enable_thinking", default=None,
              help="The chat template's thinking mode (default: the template's). /think on|off changes it.")
@template_options
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=defaults.CHAT_MAX_TOKENS, show_default=True,
              help="Most tokens per answer.")
@click.option("--markdown", is_flag=True, help="Start in the Markdown view instead of the draft view (F2 toggles).")
@click.option("--max-context", type=click.IntRange(min=2), default=None, hidden=True,
              help="Override the model's context length.")
def chat(model_path: Optional[str], drafter: str, num_draft: Optional[int], options: GenerationOptions,
         system: Optional[str], enable_thinking: Optional[bool], tools: Optional[List[Dict[str, Any]]],
         chat_template_kwargs: Dict[str, Any], max_tokens: int, markdown: bool, max_context: Optional[int]) -> None:
    """Chat in the terminal, with drafted tokens shown as they are accepted."""
    if not _has_terminal():
        _fail(RuntimeError("chat needs a terminal (stdin and stdout are not both a TTY); "
                           "use mlx-mtp generate for pipes and scripts"))
    try:
        from .apps.chat.app import run
    except ImportError as e:  # textual missing
        _fail(e, prefix="the chat app cannot start: ")
    options = options.replace(num_draft=num_draft, system=system, enable_thinking=enable_thinking, tools=tools,
                              chat_template_kwargs=chat_template_kwargs, max_tokens=max_tokens,
                              max_context=max_context)
    load_error = run(model_path, options, drafter=drafter, show_drafts=not markdown)
    if load_error is not None:  # it was shown in the app; the exit status says so too
        _fail(RuntimeError(load_error), prefix="could not load the model: ")


@main.command()
@click.option("-m", "--model", "model_path", default=None, metavar="PATH_OR_REPO",
              help="Model to calibrate (default: the bundled demo).")
@click.option("--drafter", type=_DrafterArg(), default="auto", show_default=True, metavar="auto|mtp|PATH_OR_REPO",
              help="The drafter to calibrate with (as for generate).")
@click.option("--repeats", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed repeats per measurement.")
@click.option("--json", "as_json", is_flag=True, help="Print the measured costs as JSON.")
def tune(model_path: Optional[str], drafter: str, repeats: int, as_json: bool) -> None:
    """Measure verify and draft costs on this machine for `-k auto`.

    Stored in the user cache directory per machine, model, drafter and
    quantization; later runs of this model start their adaptive draft
    length from it and keep refining it online."""
    from .api import DrafterUnavailableError, tune as run_tune
    from .calibration import calibration_path

    model, tokenizer = _load_or_fail(model_path or _default_model(), drafter)
    _show_notes(model)
    try:
        costs = run_tune(model, tokenizer, repeats=repeats)
    except DrafterUnavailableError as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(costs.to_dict()))
        return
    one = costs.verify[1]
    click.echo(f"target pass, by tokens in the pass (relative to 1 token; "
               f"a draft step costs {1000 * costs.draft:.2f} ms = {costs.draft / one:.2f} of one):")
    for n, seconds in sorted(costs.verify.items()):
        click.echo(f"  {n:>2} tokens  {1000 * seconds:8.2f} ms  {seconds / one:5.2f}x")
    click.echo(f"saved to {calibration_path()}", err=True)


@main.command()
@click.option("-m", "--model", "model_path", default=None, metavar="PATH_OR_REPO",
              help="Local model directory, .gguf file or Hugging Face repo id. Default: the bundled demo model.")
@click.option("--drafter", type=_DrafterArg(), default="auto", show_default=True, metavar="auto|none|mtp|PATH",
              help="As for generate: auto, mtp, none, or a separate drafter model.")
@click.option("-k", "--num-draft", type=_DraftLength(), default=None, metavar="auto|N", help=_K_HELP)
@click.option("--host", default=defaults.SERVE_HOST, show_default=True,
              help="Address to listen on (loopback by default; 0.0.0.0 exposes the server to the network).")
@click.option("--port", type=click.IntRange(0, 65535), default=defaults.SERVE_PORT, show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=defaults.SERVE_MAX_BATCH, show_default=True,
              help="Requests decoded together, each drafting.")
@click.option("--max-queue", type=click.IntRange(min=0), default=defaults.SERVE_MAX_QUEUE, show_default=True,
              help="Requests that may wait for a free row; more get HTTP 429.")
@click.option("--api-key", default=None, envvar="MLX_MTP_API_KEY", metavar="KEY",
              help="Require 'Authorization: Bearer KEY' on /v1/ (also read from MLX_MTP_API_KEY).")
@click.option("--prompt-cache-gb", type=_Finite(lo=0.0), default=defaults.SERVE_PROMPT_CACHE_GB, show_default=True,
              help="Memory for cached prompts across requests (LRU).")
def serve(model_path: Optional[str], drafter: str, num_draft: Any, host: str, port: int, max_batch: int,
          max_queue: int, api_key: Optional[str], prompt_cache_gb: float) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (docs/serve.md)."""
    try:
        from .apps.serve import ServeConfig, run as run_server
        from .apps.serve.server import address_problem
    except ImportError as e:  # fastapi / uvicorn missing
        _fail(e, prefix="the server needs its extra (pip install 'mlx-mtp[serve]'): ")
    problem = address_problem(host, port)
    if problem:  # before the model loads, which can take minutes
        _fail(RuntimeError(problem))
    model_path = model_path or _default_model()
    model, tokenizer = _load_or_fail(model_path, drafter)
    _show_notes(model)
    if host not in defaults.LOOPBACK_HOSTS and not api_key:
        click.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use it", err=True)
    run_server(model, tokenizer, ServeConfig(model_name=model_path, host=host, port=port, max_batch=max_batch,
                                             max_queue=max_queue, num_draft=num_draft, api_key=api_key,
                                             prompt_cache_gb=prompt_cache_gb))


# --- checkpoints: convert / graft / inspect (issue #4) -------------------------


def _checkpoint_errors() -> tuple:
    from .loading import CheckpointError, ModelNotFoundError

    return (CheckpointError, ModelNotFoundError, ValueError, OSError)


@main.command()
@click.argument("src", metavar="SRC")
@click.option("-o", "--output", "out", required=True, metavar="DIR", help="Output directory (new or empty).")
@click.option("--bits", type=click.IntRange(2, 8), default=None, help="Quantize the trunk to this many bits.")
@click.option("--group-size", type=click.Choice(["16", "32", "64", "128"]), default=None,
              help="Quantization group size (default: the mode's).")
@click.option("--mode", type=click.Choice(["affine", "mxfp4", "nvfp4", "mxfp8"]), default=None,
              help="Quantization mode (default affine when --bits is given).")
@click.option("--mtp-bits", type=click.IntRange(2, 8), default=None,
              help="Quantize the MTP head to this many bits (default: 8 inside a trunk below 8 bits).")
@click.option("--mtp-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Keep the MTP head in float at this dtype.")
@click.option("--dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Float dtype of unquantized tensors (default: as stored).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def convert(src: str, out: str, bits: Optional[int], group_size: Optional[str], mode: Optional[str],
            mtp_bits: Optional[int], mtp_dtype: Optional[str], dtype: Optional[str], quiet: bool) -> None:
    """Convert SRC (HF repo / directory or a .gguf file) to an MLX checkpoint
    that keeps its MTP head."""
    from .loading.convert import convert as run_convert

    if mtp_bits is not None and mtp_dtype is not None:
        raise click.UsageError("give --mtp-bits or --mtp-dtype, not both")
    try:
        config = run_convert(src, out, bits=bits, group_size=int(group_size) if group_size else None, mode=mode,
                             mtp_bits=mtp_bits, mtp_dtype=mtp_dtype, dtype=dtype, progress=not quiet)
    except _checkpoint_errors() as e:
        _fail(e)
    from .loading.assistant import bundled_assistant
    from .models.registry import head_layout

    layout = head_layout(config)
    heads = layout.declared_layers if layout is not None else 0

    bundled = ", assistant/ drafter copied as it is" if bundled_assistant(out) else ""
    click.echo(f"wrote {out} ({config.get('model_type')}, MTP head: {heads} layer(s){bundled})", err=True)


@main.command()
@click.option("--from", "src", required=True, metavar="PATH_OR_REPO",
              help="Original HF checkpoint (directory or repo id) that has the mtp.* head.")
@click.option("--into", "into", required=True, metavar="DIR", help="MLX checkpoint that lacks the head (modified in place).")
@click.option("--bits", type=click.IntRange(2, 8), default=None,
              help="Quantize the head to this many bits (default: 8 in a quantized model, else float).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default=None, help="Group size for --bits.")
@click.option("--mtp-dtype", type=click.Choice(["bfloat16", "float16", "float32"]), default=None,
              help="Keep the head in float at this dtype.")
@click.option("--force", is_flag=True, help="Replace a head that is already there.")
def graft(src: str, into: str, bits: Optional[int], group_size: Optional[str], mtp_dtype: Optional[str],
          force: bool) -> None:
    """Copy the MTP head from an original HF checkpoint into an MLX quant."""
    from .loading.graft import graft as run_graft

    if bits is not None and mtp_dtype is not None:
        raise click.UsageError("give --bits or --mtp-dtype, not both")
    try:
        summary = run_graft(src, into, bits=bits, group_size=int(group_size) if group_size else None,
                            mtp_dtype=mtp_dtype, force=force)
    except _checkpoint_errors() as e:
        _fail(e)
    click.echo(f"grafted {summary['tensors']} head tensors ({summary['precision']}) from "
               f"{', '.join(summary['shards'])} into {into}", err=True)


@main.command(name="inspect")
@click.argument("path", metavar="PATH")
@click.option("--drafter", type=_DrafterArg(), default=None, metavar="auto|none|mtp|PATH",
              help="Check compatibility with this drafter.")
@click.option("--verify", is_flag=True,
              help="Also read every tensor and refuse NaN / Inf values (reads the whole checkpoint).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def inspect_cmd(path: str, drafter: Optional[str], verify: bool, as_json: bool) -> None:
    """Report a checkpoint's architecture, size, quantization and drafter."""
    from .loading.inspect import format_report, inspect_path

    try:
        report = inspect_path(path, drafter, verify=verify)
    except _checkpoint_errors() as e:
        _fail(e)
    if as_json:
        click.echo(json.dumps(report))
    else:
        click.echo(format_report(report))


if __name__ == "__main__":
    main()
