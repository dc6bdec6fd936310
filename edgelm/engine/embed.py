"""The engine of an embedding model: inputs from every request are batched into one
forward pass on a worker thread (the Rust call releases the GIL), and each request's
vectors are handed back on the event loop.

    engine = EmbedEngine(model.native, max_step_tokens=512, max_queue=256, metrics=m)
    engine.start()
    vectors = await engine.embed([[101, 7592, 102], [101, 2088, 102]])   # (2, n_embd) float32

An embedding model has no KV cache and nothing to stream: a batch is whole sequences,
taken first come first served until the step's token budget is spent (a sequence
longer than the budget runs alone), so many inputs of one request and inputs of many
concurrent requests share each weight read. A sequence's vector does not depend on
what shares its batch (the Rust forward is batch-invariant). A request whose client
went away is dropped before its inputs run.

For /health, the gauges and the mDNS busy state, `stats()` reports the queue as a
generation engine does (waiting and running sequences; no KV blocks). `submit`, the
generation entry point, refuses: an embedding model does not generate text.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from edgelm._native import Model as NativeModel
from edgelm.engine.loop import EngineError, EngineStats
from edgelm.engine.metrics import Metrics
from edgelm.engine.scheduler import QueueFull

if TYPE_CHECKING:
    from edgelm.engine.loop import GenRequest, Stream

log = logging.getLogger("edgelm.serve")


@dataclass
class _Job:
    """One request's inputs and where their vectors go."""

    seqs: list[list[int]]
    future: asyncio.Future[npt.NDArray[np.float32]]
    out: npt.NDArray[np.float32]
    left: int
    cancelled: bool = False


@dataclass
class _Item:
    job: _Job
    index: int

    @property
    def tokens(self) -> list[int]:
        return self.job.seqs[self.index]


@dataclass
class EmbedLimits:
    """`max_running`: sequences per batch; `max_step_tokens`: tokens per batch;
    `max_queue`: requests waiting before 429."""

    max_running: int = 64
    max_step_tokens: int = 512
    max_queue: int = 256


@dataclass
class EmbedQueue:
    """The batcher's state: sequences waiting, and the batch running."""

    limits: EmbedLimits
    waiting: collections.deque[_Item] = field(default_factory=collections.deque)
    running: list[_Item] = field(default_factory=list)


class EmbedEngine:
    def __init__(self, native: NativeModel, limits: EmbedLimits, metrics: Metrics, name: str) -> None:
        self.native = native
        self.n_embd = native.n_embd
        self.name = name
        self.metrics = metrics.for_model(name)  # this model's series (label `model`)
        self.sched = EmbedQueue(limits)
        self._jobs = 0  # requests in flight (event-loop thread)
        self._lock = threading.Lock()  # guards sched.waiting / sched.running
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="edgelm-embed", daemon=True)
        self._thread.start()

    @property
    def n_active(self) -> int:
        return self._jobs

    def stats(self) -> EngineStats:
        """As a generation engine reports it; an embedding model holds no KV blocks."""
        with self._lock:
            s = self.sched
            return EngineStats(len(s.running), len(s.waiting), s.limits.max_running, 0, 0, 0, 0, 0, 0.0)

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for requests in flight, then drop the rest; returns how
        many were dropped."""
        deadline = time.monotonic() + grace_s
        while self._jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._lock:
            dropped = {id(it.job): it.job for it in self.sched.waiting}
            self.sched.waiting.clear()
        for job in dropped.values():
            job.cancelled = True
            if not job.future.done():
                job.future.set_exception(EngineError("the model was unloaded before this request ran"))
        t_end = time.monotonic() + 5.0
        while self._jobs and time.monotonic() < t_end:  # a batch in flight finishes
            await asyncio.sleep(0.02)
        return len(dropped)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # -- requests (event-loop thread) ----------------------------------------------
    def submit(self, req: GenRequest) -> Stream:
        """Generation: refused, the model only embeds."""
        raise EngineError(
            f'"{self.name}" is an embedding model: it does not generate text (it serves /api/embed and /v1/embeddings)'
        )

    async def embed(self, seqs: list[list[int]]) -> npt.NDArray[np.float32]:
        """Pooled, unnormalized vectors for `seqs`, shape (len(seqs), n_embd). Raises
        QueueFull when `max_queue` requests wait, EngineError when the model fails."""
        if self._closed:
            raise EngineError("the engine is shutting down")
        if not seqs:
            return np.zeros((0, self.n_embd), dtype=np.float32)
        with self._lock:
            n_waiting = len({id(it.job) for it in self.sched.waiting})
            if n_waiting >= self.sched.limits.max_queue:
                raise QueueFull(f"{n_waiting} embedding requests are waiting")
            loop = asyncio.get_running_loop()
            job = _Job(seqs, loop.create_future(), np.zeros((len(seqs), self.n_embd), dtype=np.float32), len(seqs))
            self.sched.waiting.extend(_Item(job, i) for i in range(len(seqs)))
        self._jobs += 1
        self.metrics.tokens_in.inc(sum(len(s) for s in seqs))
        self._wake.set()
        try:
            return await job.future
        finally:
            self._jobs -= 1
            if not job.future.done():  # the client went away: its waiting inputs never run
                job.cancelled = True
                with self._lock:
                    self.sched.waiting = collections.deque(it for it in self.sched.waiting if it.job is not job)

    # -- the worker thread ---------------------------------------------------------
    def _take(self) -> list[_Item]:
        """The next batch: waiting sequences in arrival order while the budget lasts
        (the first always, so an input longer than the budget runs alone)."""
        lim = self.sched.limits
        batch: list[_Item] = []
        n_tok = 0
        w = self.sched.waiting
        while w and len(batch) < lim.max_running:
            it = w[0]
            if it.job.cancelled:
                w.popleft()
                continue
            if batch and n_tok + len(it.tokens) > lim.max_step_tokens:
                break
            batch.append(w.popleft())
            n_tok += len(it.tokens)
        return batch

    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while not self._closed:
            with self._lock:
                batch = self._take()
                self.sched.running = batch
            if not batch:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                raw = self.native.embed_bytes([it.tokens for it in batch])  # the GIL is released inside
                vecs = np.frombuffer(raw, dtype=np.float32).reshape(len(batch), self.n_embd)
            except Exception as e:  # a bad input that slipped through, or a bug: fail these requests
                log.exception("embedding step failed")
                loop.call_soon_threadsafe(self._fail, batch, f"embedding failed: {e}")
            else:
                self.metrics.steps.inc()
                self.metrics.step_tokens.inc(sum(len(it.tokens) for it in batch))
                loop.call_soon_threadsafe(self._deliver, batch, vecs)
            with self._lock:
                self.sched.running = []

    # -- results (event-loop thread) -----------------------------------------------
    def _deliver(self, batch: list[_Item], vecs: npt.NDArray[np.float32]) -> None:
        for it, v in zip(batch, vecs):
            job = it.job
            if job.future.done():
                continue
            job.out[it.index] = v
            job.left -= 1
            if job.left == 0:
                job.future.set_result(job.out)

    def _fail(self, batch: list[_Item], msg: str) -> None:
        for it in batch:
            it.job.cancelled = True  # its other inputs need not run
            if not it.job.future.done():
                it.job.future.set_exception(EngineError(msg))
