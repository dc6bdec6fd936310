"""The asyncio side of serving: requests come in as `Stream`s, one task runs the
scheduler's steps on a worker thread (the Rust step releases the GIL, so the event
loop keeps serving HTTP while the model computes), and each step's tokens are
handed to their streams.

    engine = AsyncEngine(model, executor, limits, metrics)
    engine.start()
    stream = engine.submit(GenRequest(prompt=ids, max_tokens=32))
    async for delta in stream:
        print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from edgelm.serve.metrics import Metrics
from edgelm.serve.scheduler import Executor, Scheduler, SchedulerLimits, SeqOutput, Sequence
from edgelm.stops import StopMatcher

log = logging.getLogger("edgelm.serve")


@dataclass
class GenRequest:
    prompt: list[int]
    max_tokens: int
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    timeout_s: float | None = None


@dataclass
class Delta:
    text: str
    token: int | None = None
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


class EngineError(Exception):
    pass


class Stream:
    """The outputs of one sequence, in order; the last has a finish_reason."""

    def __init__(self, engine: AsyncEngine, seq: Sequence, stops: list[str]) -> None:
        self._engine = engine
        self.seq = seq
        self.matcher = StopMatcher(stops)
        self.queue: asyncio.Queue[Delta | BaseException] = asyncio.Queue()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished = False

    @property
    def n_prompt(self) -> int:
        return len(self.seq.prompt)

    @property
    def n_cached(self) -> int:
        return self.seq.n_cached_prompt

    @property
    def n_generated(self) -> int:
        return self.seq.n_generated

    def abort(self) -> None:
        """Stop generating (client gone); blocks are freed at the next step."""
        if not self.finished:
            self._engine._abort(self)

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Delta]:
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return


class AsyncEngine:
    def __init__(
        self,
        executor: Executor,
        limits: SchedulerLimits,
        metrics: Metrics,
        eog_ids: frozenset[int],
        enable_prefix_cache: bool = True,
    ) -> None:
        self.executor = executor
        self.sched = Scheduler(executor, limits, eog_ids, enable_prefix_cache)
        self.metrics = metrics
        self.metrics.kv_total.set(executor.n_blocks)
        self._streams: dict[int, Stream] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="edgelm-step")
        self._closed = False
        self.n_steps = 0

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="edgelm-engine")

    @property
    def n_active(self) -> int:
        return len(self._streams)

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for in-flight requests to finish, then abort the rest;
        returns how many were aborted."""
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self._streams.values())
        for s in left:
            self.sched.abort(s.seq, "abort")
        self._wake.set()
        t_end = time.monotonic() + 5.0
        while self._streams and time.monotonic() < t_end:
            await asyncio.sleep(0.02)
        return len(left)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await asyncio.wait([self._task], timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- requests ----------------------------------------------------------------
    def submit(self, req: GenRequest) -> Stream:
        """Queue a request; raises QueueFull or ValueError (it can never fit)."""
        if self._closed:
            raise EngineError("the engine is shutting down")
        deadline = time.monotonic() + req.timeout_s if req.timeout_s else None
        seq = Sequence(
            prompt=req.prompt,
            max_tokens=req.max_tokens,
            sampling=req.sampling,
            stop_ids=req.stop_ids,
            ignore_eos=req.ignore_eos,
            deadline=deadline,
        )
        stream = Stream(self, seq, req.stop)
        self.sched.add(seq)
        self._streams[seq.id] = stream
        self.metrics.tokens_in.inc(len(req.prompt))
        self._wake.set()
        return stream

    def _abort(self, stream: Stream) -> None:
        self.sched.abort(stream.seq, "abort")
        self._wake.set()

    # -- the loop ----------------------------------------------------------------
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not self.sched.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                items = self.sched.schedule()
            except Exception as e:  # a scheduler bug: fail what is in flight, keep serving
                log.exception("scheduling failed")
                self._fail_all(e)
                continue
            results: list[Any] = []
            if items:
                try:
                    results = await loop.run_in_executor(self._pool, self.executor.step, items)
                except Exception as e:  # a bug or a resource failure: fail this step's requests, keep serving
                    log.exception("step failed")
                    self.sched.process([])
                    for sid, *_ in items:
                        st = self._streams.pop(sid, None)
                        if st is not None:
                            self.sched.finish_now(st.seq, "error")
                            st.finished = True
                            st.queue.put_nowait(EngineError(f"generation failed: {e}"))
                    continue
                self.n_steps += 1
                self.metrics.steps.inc()
                self.metrics.step_tokens.inc(sum(b - a for _, a, b, _, _ in items))
            outs = self.sched.process(results)
            self._dispatch(outs)
            self._update_gauges()
            if not items:
                await asyncio.sleep(0.002)  # nothing runnable yet (a shared prefix in flight)

    def _fail_all(self, e: Exception) -> None:
        for st in list(self._streams.values()):
            self.sched.finish_now(st.seq, "error")
            st.finished = True
            st.queue.put_nowait(EngineError(f"generation failed: {e}"))
        self._streams.clear()
        self.sched._planned = []

    def _dispatch(self, outs: list[SeqOutput]) -> None:
        now = time.perf_counter()
        for o in outs:
            st = self._streams.get(o.seq.id)
            if st is None:
                continue
            finish = o.finish_reason
            text = ""
            if o.token is not None:
                self.metrics.tokens_out.inc()
                if st.first_token_at is None:
                    st.first_token_at = now
                    self.metrics.ttft.observe(now - st.submitted)
                    self.metrics.tokens_cached.inc(st.n_cached)
                elif st.last_token_at is not None:
                    self.metrics.tpot.observe(now - st.last_token_at)
                st.last_token_at = now
                text = st.matcher.push(o.text)
                if st.matcher.stopped and finish is None:
                    self.sched.finish_now(st.seq, "stop")
                    finish = "stop"
            if finish is not None:
                text += st.matcher.flush()
                st.finished = True
                del self._streams[o.seq.id]
                self.metrics.finished.labels(finish).inc()
                self.metrics.e2e.observe(now - st.submitted)
                if finish == "error":
                    st.queue.put_nowait(EngineError(o.seq.error or "generation failed"))
                    continue
            st.queue.put_nowait(Delta(text, o.token, o.logprob, o.top, finish))

    def _update_gauges(self) -> None:
        m, s = self.metrics, self.sched
        m.queue.set(len(s.waiting))
        m.running.set(len(s.running))
        m.kv_used.set(s.blocks.n_used)
        m.kv_cached.set(s.blocks.n_cached)
        m.preemptions.set(s.n_preemptions)
