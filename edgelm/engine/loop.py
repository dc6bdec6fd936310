"""The asyncio side of serving: requests come in as `Stream`s, an engine thread runs
the steps back to back — the scheduler plans, the executor computes (the Rust step
releases the GIL, so the event loop keeps serving HTTP while the model computes), the
scheduler applies the result — and each step's tokens are handed to their streams on
the event loop.

    engine = AsyncEngine(executor, limits, metrics, eog_ids)
    engine.start()
    stream = engine.submit(GenRequest(prompt=ids, max_tokens=32, sampling=SamplingParams(temperature=0)))
    async for delta in stream:
        print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from edgelm.engine.metrics import Metrics
from edgelm.engine.reuse import ReuseConfig
from edgelm.engine.scheduler import Scheduler, SchedulerLimits, SeqOutput, Sequence
from edgelm.engine.types import Executor, SamplingParams, StepResult
from edgelm.stops import StopMatcher

log = logging.getLogger("edgelm.serve")


@dataclass
class GenRequest:
    """What the HTTP layer asks an engine for: the contract between them."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)  # stop strings (matched here, on the text)
    stop_ids: frozenset[int] = frozenset()  # stop tokens (the executor's stop rule)
    ignore_eos: bool = False
    timeout_s: float | None = None
    matcher: Any = None  # llguidance LLMatcher (structured output)
    prompt_reuse: bool | None = None  # take over cached KV past an early change (None: the model's setting)


@dataclass
class Delta:
    text: str
    token: int | None = None
    logprob: float = 0.0
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None


class EngineError(Exception):
    pass


@dataclass(frozen=True)
class EngineStats:
    """What an engine is doing, for /health, the gauges and the mDNS busy state."""

    running: int
    waiting: int
    max_running: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_blocks_cached: int
    preemptions: int
    grammar_masks: int
    grammar_mask_seconds: float

    @property
    def busy(self) -> bool:
        """Requests wait, or the batch is full."""
        return self.waiting > 0 or self.running >= self.max_running


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
    def n_reused(self) -> int:
        """Prompt tokens taken over past an early change (edgelm.engine.reuse)."""
        return self.seq.n_reused_prompt

    @property
    def n_generated(self) -> int:
        return self.seq.n_generated

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated tokens so far (Ollama's `context`)."""
        return list(self.seq.tokens)

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
    """Continuous batching on a dedicated engine thread.

    The thread runs schedule → step → update back to back, so the next step starts
    as soon as the previous one is done, without a round trip through the event loop;
    it hands each step's outputs to the loop (`call_soon_threadsafe`), where they are
    matched against stop strings and streamed. Requests enter and leave the scheduler
    under a lock, and take effect at the next step.
    """

    def __init__(
        self,
        executor: Executor,
        limits: SchedulerLimits,
        metrics: Metrics,
        eog_ids: frozenset[int],
        enable_prefix_cache: bool = True,
        gauges: Callable[[], None] | None = None,
        model: str = "",
        reuse: ReuseConfig | None = None,
    ) -> None:
        self.executor = executor
        self._sched = Scheduler(executor, limits, eog_ids, enable_prefix_cache, reuse=reuse)
        self.metrics = metrics.for_model(model)  # this model's series (label `model`)
        self._gauges = gauges  # sets the gauges for every model served (else: this engine's)
        if gauges is None:
            self.metrics.kv_total.set(executor.n_blocks)
        self._streams: dict[int, Stream] = {}  # event-loop thread only
        self._lock = threading.Lock()  # guards the scheduler
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._gauges_at = 0.0

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="edgelm-engine", daemon=True)
        self._thread.start()

    @property
    def n_active(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        with self._lock:
            s = self._sched
            return EngineStats(
                len(s.running),
                len(s.waiting),
                s.limits.max_running,
                s.blocks.n_blocks,
                s.blocks.n_used,
                s.blocks.n_cached,
                s.n_preemptions,
                s.n_masks,
                s.mask_seconds,
            )

    async def drain(self, grace_s: float) -> int:
        """Wait up to `grace_s` for in-flight requests to finish, then abort the rest;
        returns how many were aborted."""
        deadline = time.monotonic() + grace_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = list(self._streams.values())
        with self._lock:
            for s in left:
                self._sched.abort(s.seq, "abort")
        self._wake.set()
        t_end = time.monotonic() + 5.0
        while self._streams and time.monotonic() < t_end:
            await asyncio.sleep(0.02)
        return len(left)

    async def close(self) -> None:
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # -- requests (event-loop thread) ----------------------------------------------
    def submit(self, req: GenRequest) -> Stream:
        """Queue a request; raises edgelm.errors.Busy (the queue is full) or BadRequest
        (it can never fit)."""
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
            matcher=req.matcher,
            reuse=req.prompt_reuse,
        )
        stream = Stream(self, seq, req.stop)
        with self._lock:
            self._sched.add(seq)
        self._streams[seq.id] = stream
        self.metrics.tokens_in.inc(len(req.prompt))
        self._wake.set()
        return stream

    def _abort(self, stream: Stream, reason: str = "abort") -> None:
        with self._lock:
            self._sched.abort(stream.seq, reason)
        self._wake.set()

    # -- the engine thread ---------------------------------------------------------
    def _run(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while not self._closed:
            with self._lock:
                plan = self._sched.schedule() if self._sched.has_work() else None
            if plan is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                result = StepResult() if plan.is_empty() else self.executor.step(plan)  # the GIL is released inside
            except Exception as e:  # a bug or a resource failure: fail this step's requests, keep serving
                log.exception("step failed")
                with self._lock:
                    outs = self._sched.fail(plan, f"generation failed: {e}")
                loop.call_soon_threadsafe(self._dispatch, outs)
                continue
            if plan.items:
                self.metrics.steps.inc()
                self.metrics.step_tokens.inc(plan.n_tokens)
            with self._lock:
                try:
                    outs = self._sched.update(plan, result)
                except Exception as e:  # a scheduler bug: fail every request, keep serving
                    log.exception("scheduling failed")
                    outs = self._sched.fail(plan, f"generation failed: {e}")
                    loop.call_soon_threadsafe(self._fail_all, f"generation failed: {e}")
            if outs:
                loop.call_soon_threadsafe(self._dispatch, outs)
            if not plan.items:
                time.sleep(0.002)  # nothing runnable yet (a shared prefix in flight)

    # -- outputs (event-loop thread) -----------------------------------------------
    def _fail_all(self, msg: str) -> None:
        for sid in list(self._streams):
            st = self._streams.pop(sid)
            st.finished = True
            self._abort(st, "error")
            st.queue.put_nowait(EngineError(msg))

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
                    self.metrics.tokens_reused.inc(st.n_reused)
                    self.metrics.tokens_computed.inc(st.n_prompt - st.n_cached - st.n_reused)
                elif st.last_token_at is not None:
                    self.metrics.tpot.observe(now - st.last_token_at)
                st.last_token_at = now
                text = st.matcher.push(o.text)
                if st.matcher.stopped and finish is None:
                    self._abort(st, "stop")  # freed at the next step
                    finish = "stop"
            if finish is not None:
                text += st.matcher.flush()
                st.finished = True
                del self._streams[o.seq.id]
                self.metrics.finished(finish).inc()
                self.metrics.e2e.observe(now - st.submitted)
                if finish == "error":
                    st.queue.put_nowait(EngineError(o.seq.error or "generation failed"))
                    continue
            st.queue.put_nowait(Delta(text, o.token, o.logprob, o.top, finish))
        if now - self._gauges_at > 0.05:  # gauges are sampled, not per token
            self._update_gauges()

    def _update_gauges(self) -> None:
        self._gauges_at = time.perf_counter()
        if self._gauges is not None:
            self._gauges()
            return
        self.metrics.parent.set_engine_gauges([(self.metrics.model, self.stats())])
