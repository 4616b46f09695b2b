"""The draft / verify decode loop shared by every drafter kind.

Per cycle, all of it built as one lazy graph and evaluated with one host sync:
  1. the drafter proposes k tokens (autoregressively, inside the graph);
  2. the target verifies [last token, d_1..d_k] in one forward pass;
  3. the accept rule keeps the longest valid prefix plus one bonus token.
Then, on the host: cut at a stop, roll every cache back to exactly the kept
prefix and hand the verified hidden states to the drafter. k = 0 is plain
decoding. The draft length is fixed (`num_draft=N`) or chosen per cycle by
the adaptive policy (`num_draft="auto"`, docs/adaptive-draft.md).
See docs/engine.md for the accept rules and the speedup arithmetic.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx

from .drafters.base import Drafter
from .draft_policy import SourcePolicies
from .drafters.combined import LookupThenModelDrafter
from .models.base import Target
from .models.rollback import rollback, set_recording
from .options import AUTO, NumDraft
from .sampling import SamplingParams, accept_greedy, accept_sampled, penalize, recent_tokens, sample

if TYPE_CHECKING:
    from .draft_policy import StepCosts

#: Largest draft length `num_draft="auto"` considers.
AUTO_MAX_DRAFT = 6
#: While the policy decodes plainly, the drafter catches up on the skipped
#: positions in batches of this many (one cheap batched pass instead of a
#: drafter step per token), and always before it drafts again.
CATCH_UP_BATCH = 64
#: The drafter reads only this many of the newest prompt positions during
#: prefill: its pass over a long prompt is what makes prefill slower with
#: drafting on, and drafts depend mostly on recent context. Output never
#: changes; only acceptance right after a long prompt can.
DRAFTER_PREFILL_WINDOW = 256
#: mx.random.key takes seeds in 0..2**64-1: any other integer seed is
#: reduced modulo this (so -1 seeds like 2**64-1).
SEED_MODULUS = 2**64


class ContextLengthError(ValueError):
    pass


class EmptyPromptError(ValueError):
    """The prompt holds nothing to generate from (no tokens, or only whitespace)."""


class CorruptWeightsError(RuntimeError):
    """The target's first logits are not finite: its weights are most likely damaged."""


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
    num_draft: NumDraft = 0  # as asked: an int, or "auto"
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
    k_histogram: Dict[int, int] = field(default_factory=dict)  # draft length -> cycles
    parked_reason: Optional[str] = None  # why "auto" decodes plainly right now
    last_k: int = 0  # the draft length of the newest cycle
    # per draft source ("mtp", "ngram", ...): cycles it drafted, tokens drafted, accepted
    sources: Dict[str, Dict[str, int]] = field(default_factory=dict)

    @property
    def acceptance_rate(self) -> float:
        """accepted / drafted (llama.cpp's 'rate')."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def acceptance_per_depth(self) -> List[float]:
        """Fraction of drafts accepted at each depth, of those drafted that deep."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_per_position, self.drafted_per_position)]

    @property
    def tokens_per_pass(self) -> float:
        # The first token comes from the prefill pass.
        decoded = self.generated_tokens - 1
        return decoded / self.target_passes if self.target_passes else 0.0

    @property
    def host_syncs_per_cycle(self) -> float:
        return self.host_syncs / self.target_passes if self.target_passes else 0.0

    @property
    def parked_fraction(self) -> float:
        """Fraction of cycles that drafted nothing."""
        cycles = sum(self.k_histogram.values())
        return self.k_histogram.get(0, 0) / cycles if cycles else 0.0

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
            "parked_fraction",
        ):
            d[name] = round(getattr(self, name), 4)
        d["acceptance_per_depth"] = [round(a, 4) for a in self.acceptance_per_depth]
        d["k_histogram"] = {str(k): v for k, v in sorted(self.k_histogram.items())}
        d["sources"] = {
            name: {**c, "acceptance_rate": round(c["accepted"] / c["drafted"], 4) if c["drafted"] else 0.0}
            for name, c in self.sources.items()
        }
        d["peak_memory_gb"] = round(mx.get_peak_memory() / 1e9, 4)
        return d

    def record_cycle(self, k: int, accepted: int, source: Optional[str] = None) -> None:
        self.target_passes += 1
        self.host_syncs += 1
        self.draft_tokens += k
        self.accepted_tokens += accepted
        self.k_histogram[k] = self.k_histogram.get(k, 0) + 1
        self.last_k = k
        for j in range(k):
            self.drafted_per_position[j] += 1
            self.accepted_per_position[j] += int(j < accepted)
        if k and source is not None:
            counts = self.sources.setdefault(source, {"cycles": 0, "drafted": 0, "accepted": 0})
            counts["cycles"] += 1
            counts["drafted"] += k
            counts["accepted"] += accepted


def _cache_arrays(cache: List[Any]) -> List[mx.array]:
    out = []
    for c in cache:
        items = c.cache if hasattr(c, "cache") else (getattr(c, "keys", None), getattr(c, "values", None))
        out.extend(x for x in items if isinstance(x, mx.array))
    return out


def context_length(model: Target) -> int:
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
    feed: Optional["_DrafterFeed"] = None  # with what it has still to read

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
        self.cache, self.tokens, self.last_hidden, self.drafter, self.feed = None, [], None, None, None


class _FixedDraftLength:
    """The policy for `num_draft=N`: exactly N every cycle."""

    def __init__(self, k: int):
        self.k = self.k_max = k

    def choose(self) -> int:
        return self.k

    def update(self, k: int, accepted: int, seconds: float) -> None:
        pass

    def reason(self) -> Optional[str]:
        return None


class _DrafterFeed:
    """The drafter's view of the sequence. Observations are handed over
    lazily; while nothing is drafted they are batched (CATCH_UP_BATCH) so a
    parked drafter costs one batched pass per batch, not a step per token."""

    def __init__(self, drafter: Drafter):
        self.drafter = drafter
        self.tokens: List[mx.array] = []
        self.hidden: List[mx.array] = []
        self.pending = 0

    def observe(self, next_tokens: mx.array, hidden: mx.array, batch: bool = False) -> None:
        self.tokens.append(next_tokens)
        self.hidden.append(hidden)
        self.pending += hidden.shape[1]
        if not batch or self.pending >= CATCH_UP_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        tokens = self.tokens[0] if len(self.tokens) == 1 else mx.concatenate(self.tokens)
        hidden = self.hidden[0] if len(self.hidden) == 1 else mx.concatenate(self.hidden, axis=1)
        self.drafter.observe(tokens, hidden)
        self.tokens, self.hidden, self.pending = [], [], 0


class _PlainClock:
    """Times runs of plain cycles for the policy. Pipelined plain steps
    cannot be timed one by one (they overlap; on MLX's CPU back end a read
    even waits for the queued next step too), but a run of them can: it is
    reported when it ends (the next cycle drafts) and every PLAIN_WINDOW
    cycles, cut only where no step is queued, so each report holds exactly
    its own steps' work."""

    PLAIN_WINDOW = 32
    #: The first windows are short, so that a policy that decodes plainly
    #: until it has measured a plain step (draft_policy's
    #: plain_first_cycles) gets its measurement within a few tokens.
    FIRST_WINDOWS = (4, 4)

    def __init__(self, policy):
        # Only a policy that learns from plain time needs the windows cut.
        self.enabled = hasattr(policy, "observe_plain")
        self.start: Optional[float] = None
        self.cycles = 0
        self.reports = 0

    def _window(self) -> int:
        return self.FIRST_WINDOWS[self.reports] if self.reports < len(self.FIRST_WINDOWS) else self.PLAIN_WINDOW

    def due(self) -> bool:
        """The next plain cycle closes a window: do not queue past it."""
        return self.enabled and self.cycles + 1 >= self._window()

    def tick(self, policy, cycle_start: float, now: float, queued_next: bool) -> None:
        if self.start is None:
            self.start = cycle_start
        self.cycles += 1
        if self.cycles >= self._window() and not queued_next:
            self._report(policy, now)

    def flush(self, policy, now: float) -> None:
        if self.cycles:
            self._report(policy, now)

    def _report(self, policy, now: float) -> None:
        if self.enabled:
            policy.observe_plain(self.cycles, now - self.start)
        self.start, self.cycles = None, 0
        self.reports += 1


def _validate(prompt: List[int], num_draft: NumDraft, max_tokens: int, ctx: int) -> None:
    if not prompt:
        raise EmptyPromptError("the prompt is empty")
    if num_draft != AUTO and (not isinstance(num_draft, int) or num_draft < 0):
        raise ValueError(f"num_draft must be an integer >= 0 or {AUTO!r}, got {num_draft!r}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if len(prompt) >= ctx:
        raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the model's context is {ctx} tokens")


def useful_draft_length(drafter: Drafter) -> int:
    """The deepest draft worth making with `drafter`, the most `auto` ever
    picks. Both kinds draft by feeding their own guesses back (the MTP head
    is trained one token ahead; the Gemma 4 assistant stays at the round's
    first position), so acceptance falls with depth and published settings
    stay at 3..6: deeper fixed drafts cost steps that are almost never kept."""
    return max(AUTO_MAX_DRAFT, drafter.default_num_draft)


def deep_draft_warning(drafter: Optional[Drafter], k: NumDraft) -> Optional[str]:
    """One line when a fixed draft length `k` is deeper than `drafter` can
    use (it still runs as asked), else None. Front ends show it once."""
    if drafter is None or not isinstance(k, int) or k <= useful_draft_length(drafter):
        return None
    most = useful_draft_length(drafter)
    return (f"drafts deeper than the {drafter.name} drafter can use: drafts past depth {most} are "
            f"almost never accepted but each costs a draft step (auto stays within 0..{most})")


def auto_policy(drafter: Drafter, costs: Optional["StepCosts"] = None):
    """A fresh adaptive policy for `drafter`. Keep one per model and pass it
    to every `decode` call (the API does), so what it learnt carries over.
    Prompt lookup in front of a model drafter gets one policy per source."""
    from .draft_policy import DraftPolicy, StepCosts

    if isinstance(drafter, LookupThenModelDrafter):
        return SourcePolicies(auto_policy(drafter.lookup, costs), auto_policy(drafter.model, costs))
    if drafter.host_drafts and costs is not None:
        costs = StepCosts(verify=costs.verify, draft=0.0)  # a lookup costs no drafter time
    return DraftPolicy(useful_draft_length(drafter), costs)


def _make_policy(num_draft: NumDraft, drafter: Optional[Drafter], costs: Optional["StepCosts"]):
    if drafter is None or num_draft == 0:
        return _FixedDraftLength(0)
    if num_draft == AUTO:
        return auto_policy(drafter, costs)
    if isinstance(drafter, LookupThenModelDrafter):
        # -k N is the model drafter's length; the lookup drafts its own.
        return SourcePolicies(_FixedDraftLength(drafter.lookup.default_num_draft), _FixedDraftLength(int(num_draft)))
    return _FixedDraftLength(int(num_draft))


def _prefill(
    model: Target,
    prompt: List[int],
    begin: int,
    cache: List[Any],
    feed: Optional[_DrafterFeed],
    prev_hidden: Optional[mx.array],
    params: SamplingParams,
    key: mx.array,
    step_size: int,
    cancelled: Optional[Callable[[], bool]] = None,
) -> Tuple[Optional[mx.array], mx.array, int]:
    """Run prompt[begin:] through the target in chunks (logits only for the
    last position) and let the drafter read the newest positions. Returns
    (head, hidden state of the newest position run, prompt tokens now in the
    cache). `head` is the evaluated int32 pair [first sampled token, 1 if
    its logits were all finite else 0], or None when `cancelled()` turned
    true between two chunks: the caches then hold prompt[:end] only."""
    tokens = mx.array(prompt, mx.int32)
    # Positions the drafter reads: the newest DRAFTER_PREFILL_WINDOW.
    drafter_from = max(begin, len(prompt) - DRAFTER_PREFILL_WINDOW)
    if feed is not None and drafter_from > begin:
        # A gap in what it has seen would skew its positions: start it afresh.
        feed.drafter.reset()
        prev_hidden = None
    first = head = hidden = None
    for start in range(begin, len(prompt), step_size):
        end = min(start + step_size, len(prompt))
        hidden = model.hidden(tokens[None, start:end], cache)
        if end == len(prompt):
            logits = model.logits(hidden[:, -1, :])[0]
            first, _ = sample(logits, params, key, recent_tokens(prompt, params))
            # Read with the token in the same evaluation (no sync of its
            # own): NaN/Inf weights show up here before any text does.
            head = mx.stack([first.astype(mx.int32), mx.isfinite(logits).all().astype(mx.int32)])
            next_tokens = mx.concatenate([tokens[start + 1 : end], first[None]])
        else:
            next_tokens = tokens[start + 1 : end + 1]
        lazy = []
        if feed is not None and end > drafter_from:
            if prev_hidden is not None:
                feed.observe(tokens[start : start + 1], prev_hidden)
                prev_hidden = None
            skip = max(0, drafter_from - start)
            feed.observe(next_tokens[skip:], hidden[:, skip:, :])
            lazy = feed.drafter.lazy_state()
        mx.eval(_cache_arrays(cache) + lazy + ([first, head] if head is not None else []))
        # Between chunks the caches are consistent and evaluated: a cheap
        # place to stop a long prompt (no sync beyond the chunk's own).
        if head is None and cancelled is not None and cancelled():
            return None, hidden[:, -1:, :], end
    return head, hidden[:, -1:, :], len(prompt)


def cut_at_stop(
    emitted: List[int], accepted: int, eos: set, generated: int, max_tokens: int
) -> Tuple[List[int], Optional[str], int]:
    """The tokens of one cycle that are kept, why the sequence ends (or
    None), and `cut`: how many of the verified positions after `last` stay
    in the caches. The token at `cut` is the newest sampled one (EOS, the
    last kept, or the bonus): like every "last" token, it is not cached."""
    kept: List[int] = []
    reason = None
    for token in emitted:
        if token in eos:
            reason = "stop"
            break
        kept.append(token)
        if generated + len(kept) >= max_tokens:
            reason = "length"
            break
    if reason == "stop":
        return kept, reason, len(kept)
    if reason == "length":
        return kept, reason, len(kept) - 1
    return kept, None, accepted


def decode(
    model: Target,
    prompt: Sequence[int],
    *,
    drafter: Optional[Drafter] = None,
    num_draft: NumDraft = 0,
    params: SamplingParams = SamplingParams(),
    max_tokens: int = 256,
    eos_token_ids: Sequence[int] = (),
    seed: Optional[int] = None,
    max_context: Optional[int] = None,
    prefill_step_size: int = 2048,
    stats: Optional[Stats] = None,
    cache: Optional[List[Any]] = None,
    prompt_cache: Optional[PromptCache] = None,
    costs: Optional["StepCosts"] = None,
    policy: Optional[Any] = None,
    cancelled: Optional[Callable[[], bool]] = None,
) -> Iterator[Cycle]:
    """Generate from `prompt` token ids; yields one `Cycle` for the prefill and
    one per draft/verify cycle. `stats` is updated in place as it goes.
    `seed`: any integer, reduced modulo SEED_MODULUS (2**64) for MLX.

    `num_draft`: tokens drafted per cycle, or "auto" to let the adaptive
    policy choose each cycle (0 when drafting does not pay), warm-started
    from `costs` (a calibration from `mlx-mtp tune`) when given.
    `policy`: with "auto", the policy to use and keep learning in (see
    `auto_policy`); any object with `k_max`, `choose()`, `update(k,
    accepted, seconds)` and `reason()` will do (tests use a scripted one).
    `cache`: an empty list from `model.make_cache()` to keep (and inspect) the
    target's cache; by default a fresh one is made.
    `prompt_cache`: reuse the state a previous call left when `prompt` extends
    its tokens (chat turns); only the new tokens are pre-filled. With it, a
    drafter keeps following the sequence even at num_draft=0, so drafting
    can be switched back on without a full re-prefill.
    `cancelled`: asked between prefill chunks (a long prompt can be
    stopped before its first token); when it says True the call ends with
    finish_reason "cancelled" and no tokens, and `prompt_cache` holds the
    prompt tokens pre-filled so far (a prefix of `prompt`).
    Raises CorruptWeightsError when the first logits hold NaN or Inf."""
    prompt = [int(t) for t in prompt]
    ctx = max_context or context_length(model)
    _validate(prompt, num_draft, max_tokens, ctx)
    if drafter is not None and num_draft == 0 and prompt_cache is None:
        drafter = None  # plain decoding: no drafter work at all
    if policy is None or drafter is None or num_draft != AUTO:
        policy = _make_policy(num_draft, drafter, costs)
    k_max = policy.k_max
    if hasattr(policy, "new_sequence"):  # a policy kept across prompts (draft_policy.py)
        policy.new_sequence()
    stats = stats if stats is not None else Stats()
    stats.drafter = drafter.name if (drafter and num_draft) else "none"
    stats.num_draft = num_draft if drafter is not None else 0
    stats.prompt_tokens = len(prompt)
    stats.accepted_per_position = [0] * k_max
    stats.drafted_per_position = [0] * k_max
    eos = set(int(t) for t in eos_token_ids)
    key = mx.random.key(int(seed) % SEED_MODULUS if seed is not None else random.getrandbits(32))

    start_time = time.perf_counter()
    reuse = prompt_cache is not None and prompt_cache.reusable_for(prompt, drafter)
    if reuse:
        cache, begin, prev_hidden = prompt_cache.cache, len(prompt_cache.tokens), prompt_cache.last_hidden
        feed = prompt_cache.feed
        if feed is not None:
            # Its newest entry paired h(tokens[-1]) with a token we had not
            # seen for sure (the last sampled one): redo it with the real one.
            feed.flush()
            drafter.rewind(1)
    else:
        cache = model.make_cache() if cache is None else cache
        begin, prev_hidden = 0, None
        feed = None
        if drafter is not None:
            drafter.reset()
    if drafter is not None and feed is None:
        feed = _DrafterFeed(drafter)
    if drafter is not None:
        drafter.bind(model, cache)
    stats.prefilled_tokens = len(prompt) - begin
    key, sub = mx.random.split(key)
    head, last_hidden, prefilled = _prefill(model, prompt, begin, cache, feed, prev_hidden, params, sub,
                                            prefill_step_size, cancelled)
    cache_tokens = list(prompt[:prefilled])

    def save_prompt_cache():
        if prompt_cache is not None:
            prompt_cache.cache, prompt_cache.tokens = cache, cache_tokens
            prompt_cache.last_hidden, prompt_cache.drafter, prompt_cache.feed = last_hidden, drafter, feed

    if head is None:  # cancelled between prefill chunks
        stats.prefill_s = time.perf_counter() - start_time
        stats.prefilled_tokens = prefilled - begin
        stats.generated_tokens = 0
        stats.finish_reason = "cancelled"
        # What the caches hold is a prefix of the prompt: a later call that
        # extends it (the same turn sent again, or the history with this
        # message in it) pre-fills only the rest.
        save_prompt_cache()
        yield Cycle([], [], [], 0)
        return
    last, finite = head.tolist()  # evaluated with the last chunk: no new sync
    if not finite:
        raise CorruptWeightsError(
            "the model's first logits are NaN or infinite: its weights are most likely corrupt "
            "(a damaged download or conversion); download or convert it again"
        )
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

    def build_cycle(last_token: mx.array, k: int, before: Sequence[int], host: Optional[List[int]] = None):
        """Steps 1-3 as one lazy graph: draft, verify, accept. Returns the
        packed result [n, d_1..d_k, bonus], the verify hidden states and k.
        `before`: the tokens before `last_token`, which the penalties see.
        `host`: drafts already known on the host (prompt lookup), used
        instead of the drafter's graph."""
        nonlocal key
        if k:
            feed.flush()  # a parked drafter catches up before it drafts
        if params.greedy:
            draft_key = verify_key = None
        else:
            key, draft_key, verify_key = mx.random.split(key, 3)
        # The penalties' history up to `last_token` (maybe still lazy); the
        # drafter and every verify row extend it with the drafts before them.
        history = recent_tokens(before, params)
        if history is not None:
            history = mx.concatenate([history, last_token.reshape(1)])
        if k and host is not None:
            drafts, draft_probs = mx.array(host[:k], mx.int32), None  # deterministic: q is one-hot
        elif k:
            drafts, draft_probs = drafter.draft(k, params, draft_key, history)
        else:
            drafts, draft_probs = no_drafts, None
        verify_input = mx.concatenate([last_token.reshape(1), drafts])[None] if k else last_token.reshape(1, 1)
        set_recording(cache, k > 0)  # only a draft can need a rollback
        hidden = model.hidden(verify_input, cache)
        set_recording(cache, False)
        logits = model.logits(hidden)[0]
        if history is not None:
            logits = penalize(logits, mx.concatenate([history, drafts]), params)
        if params.greedy:
            n, bonus = accept_greedy(logits, drafts)
        else:
            n, bonus = accept_sampled(logits, drafts, draft_probs, params, verify_key)
        packed = mx.concatenate([n.reshape(1), drafts, bonus.reshape(1)])
        return packed, hidden, k

    def draft_length(generated: int, position: int) -> int:
        # Never draft past max_tokens or the context.
        return max(0, min(policy.choose(), max_tokens - generated - 1, ctx - position - 1))

    # Host drafts (docs/ngram.md#engine): the drafter looks up the verified
    # sequence every cycle; with a lookup in front of a model drafter, the
    # lookup's drafts pick the source, whose own policy picks k.
    host_drafting = drafter is not None and drafter.host_drafts
    routed = isinstance(policy, SourcePolicies)

    def plan(generated: int, position: int, proposal: Optional[List[int]],
             commit: bool = True) -> Tuple[int, Optional[List[int]]]:
        """The next cycle's draft length and its host drafts (None: the
        drafter drafts in the graph). commit=False only looks: the k the
        cycle would draft if the lookup stayed as `proposal`."""
        if routed:
            if not commit:
                k = policy.peek(proposal is not None)
                return max(0, min(k, max_tokens - generated - 1, ctx - position - 1)), None
            if not policy.select(proposal is not None):
                proposal = None
        k = draft_length(generated, position)
        return (k, None) if proposal is None else (min(k, len(proposal)), proposal)

    queued = None  # a k=0 step already on the device (plain decoding pipeline)
    planned = None  # the draft length already chosen for the next cycle
    plain_clock = _PlainClock(policy)
    cycle_start = decode_start
    while True:
        generated = stats.generated_tokens
        position = len(prompt) + generated - 1  # where `last` goes
        if position >= ctx:
            stats.finish_reason = "context"
            return
        # Host-side lookup on the verified sequence: no device work, no sync.
        proposal = drafter.propose(cache_tokens, last) if host_drafting else None
        host = None
        if queued is not None:
            (packed, hidden, k), queued = queued, None
            if routed:  # a pipelined plain step: the model's policy parked
                policy.select(proposal is not None, plain=True)
        elif planned is None:
            k, host = plan(generated, position, proposal)
            packed, hidden, k = build_cycle(mx.array([last], mx.int32), k, cache_tokens, host)
        else:
            k = planned
            packed, hidden, k = build_cycle(mx.array([last], mx.int32), k, cache_tokens)
        source = drafter.source_name(host is not None) if k else None
        planned = None
        if (k == 0 and prompt_cache is None and generated + 1 < max_tokens and position + 1 < ctx
                and not plain_clock.due()):
            if host_drafting:
                # The next input is not on the host yet: judge by this
                # lookup (a match that starts there is picked up a cycle
                # late), and plan that cycle again once its input is known.
                planned = 0 if plan(generated + 1, position + 1, proposal, commit=False)[0] == 0 else None
            else:
                planned = draft_length(generated + 1, position + 1)
        if planned == 0:
            planned = None
            # Nothing the next plain step needs is on the host: queue it on
            # the lazy bonus token so the device never waits (as mlx-lm's
            # generate_step does). Without a prompt cache a stop can simply
            # drop it; the drafter sees the step through the feed.
            if feed is not None:
                feed.observe(packed[-1:], hidden, batch=True)
            # The current step gets its own evaluation first: a read of it
            # then waits for it alone, not for the queued step as well.
            mx.async_eval(packed)
            queued = build_cycle(packed[-1:], 0, cache_tokens[-params.repetition_context_size :] + [last])
            mx.async_eval(queued[0])
            observed = True
        elif planned and feed is not None and feed.pending:
            # The next cycle drafts after a parked stretch: the drafter's
            # catch-up is queued now, behind this plain step, so its cost
            # lands in the run of plain cycles (once per stretch) and not in
            # the drafting cycle's time, which the policy reads as what a
            # cycle drafting k costs (in the dispatch-bound regime a
            # catch-up pass costs about a plain step, whatever its length).
            feed.observe(packed[-1:], hidden, batch=True)
            feed.flush()
            mx.async_eval(packed, *[x for x in drafter.lazy_state() if x is not None])
            observed = True
        else:
            observed = False
        out = packed.tolist()  # the one host sync of the cycle
        now = time.perf_counter()
        n, drafted, bonus = out[0], out[1 : k + 1], out[k + 1]
        stats.record_cycle(k, n, source)
        if k:
            plain_clock.flush(policy, cycle_start)
            policy.update(k, n, now - cycle_start)
        else:
            policy.update(0, 0, None)
            plain_clock.tick(policy, cycle_start, now, queued is not None)
        cycle_start = now
        emitted = drafted[:n] + [bonus]
        kept, stats.finish_reason, cut = cut_at_stop(emitted, n, eos, generated, max_tokens)

        # Roll back to the kept prefix and seed the drafter.
        if k:
            rollback(cache, k + 1, cut + 1)
        if feed is not None and not observed:
            feed.observe(mx.array(emitted[: cut + 1], mx.int32), hidden[:, : cut + 1, :], batch=k == 0)
        cache_tokens.extend([last] + emitted[:cut])
        last_hidden = hidden[:, cut : cut + 1, :]
        stats.parked_reason = policy.reason()
        stats.generated_tokens += len(kept)
        stats.decode_s = time.perf_counter() - decode_start
        save_prompt_cache()
        yield Cycle(kept, [i < n for i in range(len(kept))], drafted, n)
        if stats.finish_reason is not None:
            if feed is not None:
                feed.flush()  # lazy: leaves the drafter complete for whoever inspects it
            plain_clock.flush(policy, cycle_start)
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
    model: Target,
    drafter: Drafter,
    prompt: Sequence[int],
    max_verify: int,
    draft_steps: int = 1,
    repeats: int = 10,
) -> "StepCosts":
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

    from .draft_policy import StepCosts

    verify = {n: _mean_seconds(target_pass(n), repeats) for n in range(1, max_verify + 1)}
    return StepCosts(verify=verify, draft=_mean_seconds(draft_run, repeats) / draft_steps)


def draft_step_cost(model: Target, drafter: Drafter, prompt: Sequence[int], k: int) -> float:
    """c: one draft step's cost relative to one target decode step."""
    costs = measure_step_costs(model, drafter, prompt, max_verify=1, draft_steps=k)
    return costs.draft / costs.verify[1]
