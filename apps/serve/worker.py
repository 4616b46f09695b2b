"""The one thread that runs the batched decoder.

MLX work stays on this thread: it loops `BatchGenerator.step()` while there
is work and hands each `RowEvent` to its request's asyncio queue on the
event loop (`call_soon_threadsafe`). Requests never touch the generator:
adds and cancels go through an inbox this thread drains between steps, so
a request joins or leaves only between two scheduler steps.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("mlx_mtp.serve")

#: How long an idle worker sleeps before it looks at its inbox again (a new
#: request wakes it at once; this only bounds how late it sees a stop).
IDLE_WAIT_S = 0.5
#: How long shutdown waits for the step in progress to end.
JOIN_TIMEOUT_S = 10.0


@dataclass
class Added:
    """The generator took the request: its row id."""

    row_id: int


@dataclass
class Failed:
    """The request could not run (add refused it, or a step failed)."""

    error: BaseException


@dataclass
class Job:
    """One request's row, as the worker sees it. `events` receives
    `Added` or `Failed` first, then the generator's RowEvents."""

    prompt: List[int]
    params: Any  # SamplingParams
    max_tokens: int
    eos_token_ids: Sequence[int]
    seed: Optional[int]
    loop: asyncio.AbstractEventLoop
    #: this request's draft length (None: the server's -k); output is the same either way
    num_draft: Any = None
    events: "asyncio.Queue[Any]" = field(default_factory=asyncio.Queue)
    #: set by the worker thread once the generator has the row
    row_id: Optional[int] = None
    #: the newest stats of the row (the generator's own object)
    stats: Any = None

    def deliver(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


@dataclass
class Totals:
    """What the finished rows drafted and accepted, for /health."""

    requests: int = 0
    cancelled: int = 0
    drafted: int = 0
    accepted: int = 0
    generated: int = 0

    def add(self, stats: Any) -> None:
        self.requests += 1
        if stats is not None:
            self.drafted += stats.draft_tokens
            self.accepted += stats.accepted_tokens
            self.generated += stats.generated_tokens


class Worker:
    def __init__(self, generator: Any):
        self.generator = generator
        self._inbox: "queue.SimpleQueue[Tuple[str, Job]]" = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._rows: Dict[int, Job] = {}
        self._thread: Optional[threading.Thread] = None
        self.totals = Totals()
        #: the generator's active and queued rows, and the bytes its batch
        #: caches and its prompt cache hold, after the newest step (read by
        #: /health without touching the generator from another thread)
        self.active = 0
        self.queued = 0
        self.cache_bytes = 0
        self.prompt_cache_bytes = 0

    # -- called from the event loop -----------------------------------------

    def start(self) -> None:
        # A daemon, so a step that never ends cannot keep the process alive.
        self._thread = threading.Thread(target=self._run, name="mlx-mtp-decoder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT_S)

    def submit(self, job: Job) -> None:
        self._inbox.put(("add", job))
        self._wake.set()

    def cancel(self, job: Job) -> None:
        self._inbox.put(("cancel", job))
        self._wake.set()

    def acceptance(self) -> Tuple[int, int]:
        """(drafted, accepted) over every row so far, running ones included."""
        drafted, accepted = self.totals.drafted, self.totals.accepted
        for job in list(self._rows.values()):
            if job.stats is not None:
                drafted += job.stats.draft_tokens
                accepted += job.stats.accepted_tokens
        return drafted, accepted

    # -- the worker thread ----------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            self._drain()
            if not self.generator.has_work():
                self._snapshot()
                self._wake.wait(IDLE_WAIT_S)
                continue
            try:
                events = self.generator.step()
            except Exception as e:  # a broken step must not kill the server
                log.exception("decoder step failed")
                self._fail_all(e)
                continue
            for event in events:
                self._dispatch(event)
            self._snapshot()
        for job in list(self._rows.values()):
            self._release(job, RuntimeError("the server is shutting down"))

    def _drain(self) -> None:
        while True:
            try:
                kind, job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._add(job)
            elif job.row_id is not None and self._rows.pop(job.row_id, None) is job:
                self._finish(job)
                self.totals.cancelled += 1
                self.generator.cancel(job.row_id)  # frees its row and cache

    def _add(self, job: Job) -> None:
        try:
            job.row_id = self.generator.add(job.prompt, job.params, job.max_tokens, job.eos_token_ids,
                                            seed=job.seed, num_draft=job.num_draft)
        except Exception as e:  # ContextLengthError, a bad argument
            job.deliver(Failed(e))
            return
        self._rows[job.row_id] = job
        job.deliver(Added(job.row_id))

    def _dispatch(self, event: Any) -> None:
        job = self._rows.get(event.row_id)
        if job is None:  # cancelled meanwhile
            return
        job.stats = event.stats
        if event.finish_reason is not None:
            del self._rows[event.row_id]
            self._finish(job)
        job.deliver(event)

    def _finish(self, job: Job) -> None:
        self.totals.add(job.stats)

    def _fail_all(self, error: BaseException) -> None:
        for row_id, job in list(self._rows.items()):
            self._release(job, error)
            try:
                self.generator.cancel(row_id)
            except Exception:
                log.exception("cancelling row %s after a failed step", row_id)

    def _release(self, job: Job, error: BaseException) -> None:
        self._rows.pop(job.row_id, None)
        self._finish(job)
        job.deliver(Failed(error))

    def _snapshot(self) -> None:
        generator = self.generator
        self.active, self.queued = int(generator.active), int(generator.queued)
        # Optional figures: a generator without them reports 0.
        self.cache_bytes = int(getattr(generator, "cache_nbytes", 0))
        self.prompt_cache_bytes = int(getattr(getattr(generator, "prompt_cache", None), "nbytes", 0))
