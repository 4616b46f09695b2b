"""The draft / verify decode loop shared by every drafter kind.

Per cycle, all of it built as one lazy graph and evaluated with one host sync:
  1. the drafter proposes k tokens (autoregressively, inside the graph);
  2. the target verifies [last token, d_1..d_k] in one forward pass;
  3. the accept rule keeps the longest valid prefix plus one bonus token.
Then, on the host: roll every cache back to exactly that prefix and hand the
verified hidden states to the drafter. k = 0 is plain decoding.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, List, Optional, Sequence

import mlx.core as mx

from .drafters.base import Drafter
from .models.rollback import rollback, set_recording
from .sampling import SamplingParams, accept_greedy, accept_sampled, sample


class ContextLengthError(ValueError):
    pass


@dataclass
class Cycle:
    """What one draft/verify cycle (or the prefill) produced."""

    tokens: List[int]  # emitted tokens, cut at a stop; EOS itself is not emitted
    from_draft: List[bool]  # per token: accepted from the drafter (else sampled by the target)
    drafted: List[int]  # the draft proposed this cycle
    accepted: int  # how many of `drafted` the target accepted


@dataclass
class Stats:
    drafter: str = "none"
    num_draft: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens actually run (fewer when a prompt cache was reused)
    generated_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    target_passes: int = 0  # verify passes after prefill
    host_syncs: int = 0  # host syncs during decoding (prefill not counted)
    prefill_s: float = 0.0
    decode_s: float = 0.0
    finish_reason: Optional[str] = None
    accepted_per_position: List[int] = field(default_factory=list)
    drafted_per_position: List[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (llama.cpp's 'rate')."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_pass(self) -> float:
        # The first token comes from the prefill pass.
        decoded = self.generated_tokens - 1
        return decoded / self.target_passes if self.target_passes else 0.0

    @property
    def host_syncs_per_cycle(self) -> float:
        return self.host_syncs / self.target_passes if self.target_passes else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prefilled_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decoded = self.generated_tokens - 1
        return decoded / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in (
            "acceptance_rate",
            "tokens_per_pass",
            "host_syncs_per_cycle",
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
        ):
            d[name] = round(getattr(self, name), 4)
        d["peak_memory_gb"] = round(mx.get_peak_memory() / 1e9, 4)
        return d


def _cache_arrays(cache: List[Any]) -> List[mx.array]:
    out = []
    for c in cache:
        items = c.cache if hasattr(c, "cache") else (getattr(c, "keys", None), getattr(c, "values", None))
        out.extend(x for x in items if isinstance(x, mx.array))
    return out


def context_length(model) -> int:
    return int(model.context_length)


@dataclass
class PromptCache:
    """What one `decode` call leaves for the next, so that a new prompt that
    extends the old sequence (the next chat turn) pre-fills only its new
    tokens. Pass the same object to every call; it is updated in place."""

    cache: Optional[List[Any]] = None  # the target's cache
    tokens: List[int] = field(default_factory=list)  # tokens held by `cache`
    last_hidden: Optional[mx.array] = None  # target hidden state of tokens[-1]
    drafter: Optional[Drafter] = None  # the drafter that has seen `tokens`

    def reusable_for(self, prompt: List[int], drafter: Optional[Drafter]) -> bool:
        # Recurrent (Gated-DeltaNet) state cannot be trimmed at will, so the
        # cached tokens must be an exact prefix of the new prompt.
        n = len(self.tokens)
        return bool(
            self.cache is not None
            and 0 < n < len(prompt)
            and prompt[:n] == self.tokens
            and self.drafter is drafter
        )

    def clear(self) -> None:
        self.cache, self.tokens, self.last_hidden, self.drafter = None, [], None, None


def decode(
    model,
    prompt: Sequence[int],
    *,
    drafter: Optional[Drafter] = None,
    num_draft: int = 0,
    params: SamplingParams = SamplingParams(),
    max_tokens: int = 256,
    eos_token_ids: Sequence[int] = (),
    seed: Optional[int] = None,
    max_context: Optional[int] = None,
    prefill_step_size: int = 2048,
    stats: Optional[Stats] = None,
    cache: Optional[List[Any]] = None,
    prompt_cache: Optional[PromptCache] = None,
) -> Iterator[Cycle]:
    """Generate from `prompt` token ids; yields one `Cycle` for the prefill and
    one per draft/verify cycle. `stats` is updated in place as it goes.

    `cache`: an empty list from `model.make_cache()` to keep (and inspect) the
    target's cache; by default a fresh one is made.
    `prompt_cache`: reuse the state a previous call left when `prompt` extends
    its tokens (chat turns); only the new tokens are pre-filled. With it, a
    drafter keeps following the sequence even at num_draft=0, so drafting
    can be switched back on without a full re-prefill."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError("the prompt is empty")
    if num_draft < 0:
        raise ValueError(f"num_draft must be >= 0, got {num_draft}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    ctx = max_context or context_length(model)
    if len(prompt) >= ctx:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens but the model's context is {ctx} tokens"
        )
    if drafter is None:
        num_draft = 0
    elif num_draft == 0 and prompt_cache is None:
        drafter = None  # plain decoding: no drafter work at all
    stats = stats if stats is not None else Stats()
    stats.drafter = drafter.name if (drafter and num_draft) else "none"
    stats.num_draft = num_draft
    stats.prompt_tokens = len(prompt)
    stats.accepted_per_position = [0] * num_draft
    stats.drafted_per_position = [0] * num_draft
    eos = set(int(t) for t in eos_token_ids)
    key = mx.random.key(seed if seed is not None else random.getrandbits(32))

    # Prefill in chunks; logits only for the last position.
    start_time = time.perf_counter()
    tokens = mx.array(prompt, mx.int32)
    reuse = prompt_cache is not None and prompt_cache.reusable_for(prompt, drafter)
    if reuse:
        cache, begin, prev_hidden = prompt_cache.cache, len(prompt_cache.tokens), prompt_cache.last_hidden
        if drafter is not None:
            # Its newest entry paired h(tokens[-1]) with a token we had not
            # seen for sure (the last sampled one): redo it with the real one.
            drafter.rewind(1)
    else:
        cache = model.make_cache() if cache is None else cache
        begin, prev_hidden = 0, None
        if drafter is not None:
            drafter.reset()
    if drafter is not None:
        drafter.bind(model, cache)
    stats.prefilled_tokens = len(prompt) - begin
    first = None
    for start in range(begin, len(prompt), prefill_step_size):
        end = min(start + prefill_step_size, len(prompt))
        hidden = model.hidden(tokens[None, start:end], cache)
        if end == len(prompt):
            key, sub = mx.random.split(key)
            first, _ = sample(model.logits(hidden[:, -1, :])[0], params, sub)
            next_tokens = mx.concatenate([tokens[start + 1 : end], first[None]])
        else:
            next_tokens = tokens[start + 1 : end + 1]
        if drafter is not None:
            if prev_hidden is not None:
                drafter.observe(tokens[start : start + 1], prev_hidden)
                prev_hidden = None
            drafter.observe(next_tokens, hidden)
        lazy = drafter.lazy_state() if drafter is not None else []
        mx.eval(_cache_arrays(cache) + lazy + ([first] if first is not None else []))
    cache_tokens = list(prompt)
    last_hidden = hidden[:, -1:, :]

    def save_prompt_cache():
        if prompt_cache is not None:
            prompt_cache.cache, prompt_cache.tokens = cache, cache_tokens
            prompt_cache.last_hidden, prompt_cache.drafter = last_hidden, drafter

    last = int(first.item())
    stats.prefill_s = time.perf_counter() - start_time
    stats.generated_tokens = 1
    decode_start = time.perf_counter()

    save_prompt_cache()
    if last in eos:
        stats.generated_tokens = 0
        stats.finish_reason = "stop"
        yield Cycle([], [], [], 0)
        return
    yield Cycle([last], [False], [], 0)
    if max_tokens == 1:
        stats.finish_reason = "length"
        return

    no_drafts = mx.zeros((0,), mx.int32)

    def build_cycle(last_token: mx.array, k: int):
        """Steps 1-3 as one lazy graph: draft, verify, accept."""
        nonlocal key
        key, draft_key, verify_key = mx.random.split(key, 3)
        drafts, draft_probs = drafter.draft(k, params, draft_key) if k else (no_drafts, None)
        verify_input = mx.concatenate([last_token.reshape(1), drafts])[None]
        set_recording(cache, k > 0)  # only a draft can need a rollback
        hidden = model.hidden(verify_input, cache)
        set_recording(cache, False)
        logits = model.logits(hidden)[0]
        if params.greedy:
            n, bonus = accept_greedy(logits, drafts)
        else:
            n, bonus = accept_sampled(logits, drafts, draft_probs, params, verify_key)
        packed = mx.concatenate([n.reshape(1), drafts, bonus.reshape(1)])
        return packed, hidden, k

    queued = None  # plain decoding: the next step, already on the device
    while True:
        generated = stats.generated_tokens
        position = len(prompt) + generated - 1  # where `last` goes
        if position >= ctx:
            stats.finish_reason = "context"
            return
        if queued is not None:
            (packed, hidden, k), queued = queued, None
        else:
            # Never draft past max_tokens or the context.
            k = max(0, min(num_draft, max_tokens - generated - 1, ctx - position - 1))
            packed, hidden, k = build_cycle(mx.array([last], mx.int32), k)
        if drafter is None and prompt_cache is None and generated + 1 < max_tokens and position + 1 < ctx:
            # Without a drafter nothing depends on the host: queue the next
            # step on the lazy bonus token so the device never waits (as
            # mlx-lm's generate_step does).
            queued = build_cycle(packed[-1:], 0)
            mx.async_eval(queued[0])
        out = packed.tolist()  # the one host sync of the cycle
        stats.host_syncs += 1
        stats.target_passes += 1

        n, drafted, bonus = out[0], out[1 : k + 1], out[k + 1]
        emitted = drafted[:n] + [bonus]
        stats.draft_tokens += k
        stats.accepted_tokens += n
        for j in range(k):
            stats.drafted_per_position[j] += 1
            stats.accepted_per_position[j] += int(j < n)

        # A stop inside the emitted tokens ends the sequence there.
        kept: List[int] = []
        for token in emitted:
            if token in eos:
                stats.finish_reason = "stop"
                break
            kept.append(token)
            if generated + len(kept) >= max_tokens:
                stats.finish_reason = "length"
                break
        # The token at `cut` is the newest sampled one (EOS, the last kept, or
        # the bonus): like every "last" token, it is not in the cache.
        if stats.finish_reason == "stop":
            cut = len(kept)
        elif stats.finish_reason == "length":
            cut = len(kept) - 1
        else:
            cut = n

        # 4-5: roll back to the accepted prefix, seed the drafter.
        if k:
            rollback(cache, k + 1, cut + 1)
        if drafter is not None:
            drafter.observe(mx.array(emitted[: cut + 1], mx.int32), hidden[:, : cut + 1, :])
        cache_tokens.extend([last] + emitted[:cut])
        last_hidden = hidden[:, cut : cut + 1, :]
        save_prompt_cache()

        stats.generated_tokens += len(kept)
        stats.decode_s = time.perf_counter() - decode_start
        yield Cycle(kept, [i < n for i in range(len(kept))], drafted, n)
        if stats.finish_reason is not None:
            return
        last = bonus


# --- cost measurement (bench, tune and the adaptive policy's calibration) -----


def _mean_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compile and allocate once
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def measure_step_costs(
    model,
    drafter: Drafter,
    prompt: Sequence[int],
    max_verify: int,
    draft_steps: int = 1,
    repeats: int = 10,
) -> dict:
    """Seconds per target pass over 1..`max_verify` tokens (recording on, as
    a verify pass runs it) and per draft step, in the state left by a short
    real generation from `prompt`. Every pass is rolled back afterwards, so
    the caches end as they started."""
    state = PromptCache()
    for _ in decode(model, prompt, drafter=drafter, num_draft=max(1, draft_steps), max_tokens=8, prompt_cache=state):
        pass
    cache, last = state.cache, state.tokens[-1]

    def target_pass(n: int):
        tokens = mx.array([[last] * n], mx.int32)

        def run():
            set_recording(cache, True)
            hidden = model.hidden(tokens, cache)
            set_recording(cache, False)
            mx.eval(model.logits(hidden))
            rollback(cache, n, 0)

        return run

    def draft_run():
        tokens, _ = drafter.draft(draft_steps, SamplingParams(), None)
        mx.eval(tokens)
        drafter.rewind(0)

    verify = {n: _mean_seconds(target_pass(n), repeats) for n in range(1, max_verify + 1)}
    return {"verify": verify, "draft": _mean_seconds(draft_run, repeats) / draft_steps}


def draft_step_cost(model, drafter: Drafter, prompt: Sequence[int], k: int) -> float:
    """c: one draft step's cost relative to one target decode step."""
    costs = measure_step_costs(model, drafter, prompt, max_verify=1, draft_steps=k)
    return costs["draft"] / costs["verify"][1]
