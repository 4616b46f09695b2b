"""Python API: load, stream_generate, generate."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import mlx.nn as nn
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from .drafters import Drafter, LookupThenModelDrafter, MTPDrafter, NGramDrafter
from .engine import EmptyPromptError, PromptCache, Stats, decode
from .loading import CheckpointError, load_target, resolve_model_path
from .loading.assistant import ASSISTANT_MODE, LOOKUP_SUFFIX, bundled_assistant
from .models.base import has_builtin_head
from .options import AUTO, GenerationOptions, NumDraft
from .templates import apply_template

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "*.tiktoken")
#: transformers' once-only flag for "Token indices sequence length is longer
#: than the specified maximum sequence length ... will result in indexing errors"
_LENGTH_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def quiet_length_warning(tokenizer: Any) -> Any:
    """Mark transformers' over-length warning as already shown for
    `tokenizer`. Its model_max_length is a tokenizer setting that often
    differs from the model's context; the engine checks the real context
    (ContextLengthError), so the warning only adds a wrong figure."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags[_LENGTH_WARNING] = True
    return tokenizer


class DrafterUnavailableError(ValueError):
    pass


@dataclass
class SpeculativeModel:
    """A target model plus its drafter (None: plain decoding)."""

    target: nn.Module
    drafter: Optional[Drafter]
    config: Dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None
    # Why drafting is off, when it is.
    drafter_note: Optional[str] = None
    # This machine's measured step costs (`mlx-mtp tune`), the adaptive
    # policy's starting point; None until calibrated.
    step_costs: Optional[Any] = None
    # The adaptive draft policy, kept across calls so what it learns about
    # this model on this machine carries over from one prompt to the next.
    draft_policy: Optional[Any] = None

    @property
    def default_num_draft(self) -> NumDraft:
        """The adaptive draft length when there is a drafter, else 0."""
        return AUTO if self.drafter else 0

    @property
    def calibration_key(self) -> str:
        """Which stored calibration fits: this machine, model, drafter and quantization."""
        from .calibration import calibration_key, machine_id

        model_id = str(Path(self.path).resolve()) if self.path else type(self.target).__name__
        drafter = self.drafter.name if self.drafter else "none"
        quantization = self.config.get("quantization") or self.config.get("torch_dtype") or "float"
        return calibration_key(machine_id(), f"{model_id}#{drafter}", str(quantization))

    def load_calibration(self) -> None:
        """Pick up the stored calibration for this model, if any."""
        from .calibration import load_costs

        if self.drafter is not None:
            self.step_costs = load_costs(self.calibration_key)
            self.draft_policy = None

    def policy_for(self, num_draft: NumDraft) -> Optional[Any]:
        """The adaptive policy when `num_draft` is "auto" (made once)."""
        if num_draft != AUTO or self.drafter is None:
            return None
        if self.draft_policy is None:
            from .engine import auto_policy

            self.draft_policy = auto_policy(self.drafter, self.step_costs)
        return self.draft_policy


def make_drafter(target: nn.Module, drafter: str = "auto") -> tuple[Optional[Drafter], Optional[str]]:
    """Pick the drafter for `target`. Returns (drafter, note): the note says
    why there is no drafter (None when there is one). Never warns: each front
    end shows the note once, in its own words.

    drafter: "auto", "mtp", "none", "ngram" (prompt lookup, docs/ngram.md),
    the directory / repo id of a separate drafter model (a Gemma 4
    assistant), or "<one of those models or mtp>+ngram" (prompt lookup in
    front of it)."""
    if drafter == "none":
        return None, 'drafting disabled (drafter="none")'
    problem = getattr(target, "rollback_problem", None)  # an mlx-lm model whose cache cannot roll back
    if problem and drafter != "auto":
        raise DrafterUnavailableError(f'cannot draft with this model: {problem}. Use drafter="none" for plain decoding.')
    if drafter == "ngram":
        return NGramDrafter(), None
    if drafter.endswith(LOOKUP_SUFFIX) and drafter != LOOKUP_SUFFIX:
        model_drafter, _ = make_drafter(target, drafter[: -len(LOOKUP_SUFFIX)])
        return LookupThenModelDrafter(model_drafter), None
    if drafter not in ("auto", "mtp"):
        from .loading.assistant import drafter_problem  # the CLI and inspect check the same way

        problem = drafter_problem(str(drafter))
        if problem:
            raise DrafterUnavailableError(problem)
        return _load_drafter_model(target, str(drafter)), None
    if has_builtin_head(target):
        return MTPDrafter(target), None
    problem = getattr(target, "mtp_problem", None) or "the model has no MTP head"
    if drafter == "mtp":
        raise DrafterUnavailableError(
            f'cannot draft with the MTP head: {problem}. Use drafter="none" for plain decoding.'
        )
    return None, f"{problem}; plain decoding"


def _load_drafter_model(target: nn.Module, path_or_repo: str) -> Drafter:
    from .loading.assistant import load_assistant_drafter
    from .loading import ModelNotFoundError
    from .models.gemma4_assistant import AssistantError

    try:
        return load_assistant_drafter(path_or_repo, target)
    except ModelNotFoundError as e:
        raise DrafterUnavailableError(f"drafter {path_or_repo!r}: {e}") from e
    except AssistantError as e:
        raise DrafterUnavailableError(str(e)) from e


def load(
    path_or_repo: Union[str, Path],
    drafter: str = "auto",
    *,
    lazy: bool = False,
    revision: Optional[str] = None,
) -> tuple[SpeculativeModel, TokenizerWrapper]:
    """Load a target and its drafter from a local directory or a HF repo id.

    drafter: "auto" (use the MTP head when there is one, else an
    `assistant/` folder shipped inside the model directory, else plain
    decoding; `SpeculativeModel.drafter_note` says why), "mtp" (require the
    head), "none", or the directory / repo id of a Gemma 4 assistant drafter
    for a Gemma 4 target.
    """
    from .loading.gguf import is_gguf

    if is_gguf(path_or_repo):  # one file: weights, config and tokenizer
        from .loading.gguf import load_gguf

        target, config, tokenizer = load_gguf(path_or_repo, lazy=lazy)
        chosen, note = make_drafter(target, drafter)
        model = SpeculativeModel(target, chosen, config, Path(path_or_repo), note)
        model.load_calibration()
        return model, quiet_length_warning(tokenizer)
    path = resolve_model_path(str(path_or_repo), revision=revision)
    target, config = load_target(path, lazy=lazy)
    if not any(any(path.glob(p)) for p in TOKENIZER_FILES):
        raise CheckpointError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    chosen, note = make_drafter(target, _with_bundled_assistant(path, target, drafter))
    # Never run a checkpoint's own tokenizer code (configs with `auto_map`,
    # MiMo's say): without this, transformers stops to ask in a terminal.
    tokenizer = load_tokenizer(path, {"trust_remote_code": False}, eos_token_ids=config.get("eos_token_id"))
    model = SpeculativeModel(target, chosen, config, path, note)
    model.load_calibration()
    return model, quiet_length_warning(tokenizer)


def _with_bundled_assistant(path: Optional[Path], target: nn.Module, drafter: str) -> str:
    """`drafter` with the model folder's own assistant/ put in where it
    stands: "auto" for a target without a head (demo-gemma), and the
    "assistant" of "assistant+ngram"."""
    bundled = bundled_assistant(path) if path is not None and Path(path).is_dir() else None
    if drafter == "auto" and not has_builtin_head(target) and bundled is not None:
        return str(bundled)
    if drafter == ASSISTANT_MODE + LOOKUP_SUFFIX:
        if bundled is None:
            raise DrafterUnavailableError(
                f"{path} has no {ASSISTANT_MODE}/ folder: name the assistant, as in drafter=\"PATH{LOOKUP_SUFFIX}\""
            )
        return str(bundled) + LOOKUP_SUFFIX
    return drafter


def with_drafter(model: SpeculativeModel, drafter: str) -> SpeculativeModel:
    """The same loaded target with another drafter (as `load`'s `drafter`
    argument names it), e.g. for `bench` to compare drafters on one model."""
    chosen, note = make_drafter(model.target, _with_bundled_assistant(model.path, model.target, drafter))
    other = replace(model, drafter=chosen, drafter_note=note, step_costs=None, draft_policy=None)
    other.load_calibration()
    return other


def resolve_model(path_or_repo: Union[str, Path], *, revision: Optional[str] = None) -> Union[str, Path]:
    """Where `load` will read `path_or_repo` from: a bundled demo's folder, a
    local directory, a Hugging Face snapshot (downloaded once, so front ends
    can show this step on its own) or a .gguf file as given."""
    from .loading.gguf import is_gguf

    if is_gguf(path_or_repo):
        return path_or_repo
    return resolve_model_path(str(path_or_repo), revision=revision)


@dataclass
class GenerationResponse:
    """One streamed piece: the text and tokens one cycle produced."""

    text: str
    tokens: List[int]
    from_draft: List[bool]
    drafted: List[int]
    accepted: int
    stats: Stats
    finish_reason: Optional[str] = None


Prompt = Union[str, Sequence[int], Sequence[Dict[str, str]]]


def _encodable(text: Any) -> Any:
    """`text` with lone surrogates (what Python makes of undecodable bytes)
    replaced by U+FFFD, with one warning; tokenizers raise TypeError on
    them. Anything that is not a str passes through."""
    if not isinstance(text, str):
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        fixed = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        warnings.warn("the prompt is not valid Unicode: lone surrogates replaced with U+FFFD", stacklevel=3)
        return fixed


def build_prompt(
    tokenizer: TokenizerWrapper,
    prompt: Prompt,
    *,
    system: Optional[str] = None,
    chat_template: bool = True,
    enable_thinking: Optional[bool] = None,
    tools: Optional[Sequence[Dict[str, Any]]] = None,
    template_kwargs: Optional[Dict[str, Any]] = None,
) -> List[int]:
    """Token ids for `prompt`: text (one user message), a chat history (a
    list of {"role", "content"} dicts, tool messages and tool_calls included)
    or token ids (used as they are). The chat template renders as
    `templates.apply_template` does (enable_thinking None: the template's
    own default)."""
    prompt = _encodable(prompt)
    system = _encodable(system)
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        prompt = [{**m, "content": _encodable(m.get("content"))} if isinstance(m, dict) and "content" in m else m
                  for m in prompt]
    if isinstance(prompt, str) and not prompt.strip():
        # Blank text would still become template tokens: refuse it as the
        # engine refuses an empty token list.
        raise EmptyPromptError("the prompt is empty or only whitespace")
    quiet_length_warning(tokenizer)  # a tokenizer the caller loaded: we check the context
    is_chat = isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict)
    if not isinstance(prompt, str) and not is_chat:
        return [int(t) for t in prompt]
    if is_chat and not getattr(tokenizer, "chat_template", None):
        raise ValueError("a chat history needs a tokenizer with a chat template")
    if chat_template and getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + (
            list(prompt) if is_chat else [{"role": "user", "content": prompt}]
        )
        text = apply_template(tokenizer, messages, enable_thinking=enable_thinking, tools=tools,
                              template_kwargs=template_kwargs)
        # The template already carries any BOS token.
        return list(tokenizer.encode(text, add_special_tokens=False))
    if system:
        prompt = f"{system}\n\n{prompt}"
    return list(tokenizer.encode(prompt))


class _StopMatcher:
    """Finds stop strings in streamed text and holds back text that might be
    the start of one, so nothing past a stop is ever emitted."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_generate(
    model: SpeculativeModel,
    tokenizer: TokenizerWrapper,
    prompt: Prompt,
    options: Optional[GenerationOptions] = None,
    *,
    prompt_cache: Optional[PromptCache] = None,
    cancelled: Optional[Callable[[], bool]] = None,
    **overrides: Any,
) -> Iterator[GenerationResponse]:
    """Generate and yield one `GenerationResponse` per target pass.

    `prompt` is text (the chat template is applied unless chat_template=False),
    a chat history (list of {"role", "content"} dicts), or token ids used as
    is; an empty or whitespace-only prompt raises EmptyPromptError (a
    ValueError). `options` says how to generate; keyword `overrides` change single
    fields of it (num_draft=3, temp=0.7, max_tokens=..., as
    `GenerationOptions.replace` takes them). Pass the same `PromptCache`
    across calls (chat turns) to pre-fill only what is new since the
    previous call. `cancelled()` is asked between prefill chunks: True
    stops a long prompt before its first token (finish_reason "cancelled")."""
    options = options if options is not None else GenerationOptions()
    if overrides:
        options = options.replace(**overrides)
    prompt_tokens = build_prompt(
        tokenizer, prompt, system=options.system, chat_template=options.chat_template,
        enable_thinking=options.enable_thinking, tools=options.tools,
        template_kwargs=options.chat_template_kwargs,
    )
    # Handed to the engine as it is (an int, or "auto" for the adaptive
    # policy); only None is resolved here, to the drafter's own default.
    num_draft = model.default_num_draft if options.num_draft is None else options.num_draft
    stats = Stats()
    detok = tokenizer.detokenizer
    detok.reset()
    stopper = _StopMatcher(options.stop)
    cycles = decode(
        model.target,
        prompt_tokens,
        drafter=model.drafter,
        num_draft=num_draft,
        params=options.sampling,
        max_tokens=options.max_tokens,
        eos_token_ids=tokenizer.eos_token_ids,
        seed=options.seed,
        max_context=options.max_context,
        stats=stats,
        prompt_cache=prompt_cache,
        costs=model.step_costs,
        policy=model.policy_for(num_draft),
        cancelled=cancelled,
    )
    finalized = False
    for cycle in cycles:
        text, kept, stopped = "", [], False
        for token in cycle.tokens:
            kept.append(token)
            detok.add_token(token)
            piece, stopped = stopper.feed(detok.last_segment)
            text += piece
            if stopped:
                break
        if stopped:
            stats.generated_tokens -= len(cycle.tokens) - len(kept)
            stats.finish_reason = "stop"
        elif stats.finish_reason is not None:
            detok.finalize()
            text += stopper.feed(detok.last_segment)[0] + stopper.flush()
            finalized = True
        yield GenerationResponse(
            text, kept, cycle.from_draft[: len(kept)], cycle.drafted, cycle.accepted, stats, stats.finish_reason
        )
        if stopped:
            cycles.close()
            return
    if not finalized:  # ended without a final cycle (context full)
        detok.finalize()
        text = stopper.feed(detok.last_segment)[0] + stopper.flush()
        yield GenerationResponse(text, [], [], [], 0, stats, stats.finish_reason)


def generate(
    model: SpeculativeModel,
    tokenizer: TokenizerWrapper,
    prompt: Prompt,
    options: Optional[GenerationOptions] = None,
    *,
    prompt_cache: Optional[PromptCache] = None,
    **overrides: Any,
) -> str:
    """Generate and return the whole text. Arguments as for `stream_generate`."""
    responses = stream_generate(model, tokenizer, prompt, options, prompt_cache=prompt_cache, **overrides)
    return "".join(r.text for r in responses)


def tune(
    model: SpeculativeModel,
    tokenizer: TokenizerWrapper,
    *,
    prompt: Prompt = "def fibonacci(n):",
    repeats: int = 20,
    save: bool = True,
) -> Any:
    """Measure this machine's cost of a target pass over 1..k_max+1 tokens
    and of one draft step, store it (per machine, model, drafter and
    quantization) for later runs, and start `model`'s adaptive policy from
    it. Returns the `StepCosts`."""
    from .calibration import save_costs
    from .engine import auto_policy, measure_step_costs

    if model.drafter is None:
        raise DrafterUnavailableError(f"nothing to tune: {model.drafter_note or 'the model has no drafter'}")
    k_max = auto_policy(model.drafter).k_max
    costs = measure_step_costs(model.target, model.drafter, build_prompt(tokenizer, prompt),
                               max_verify=k_max + 1, repeats=repeats)
    if save:
        save_costs(model.calibration_key, costs)
    model.step_costs, model.draft_policy = costs, None
    return costs

