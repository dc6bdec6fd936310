"""Continuous batching: the scheduler decides, the executor computes.

Every step runs the next token of each running sequence plus chunks of prompts under
a token budget (chunked prefill), so a long prompt never stalls the streams already
running. The scheduler plans each step and applies its result; it never calls the
executor (`edgelm._native.Executor`, or a fake in tests): the contract between them is
a `StepPlan` and a `StepResult` (edgelm.engine.types).

    sched = Scheduler(executor, SchedulerLimits(...), eog_ids)   # reads the KV geometry
    sched.add(Sequence(...))            # QueueFull when the queue is at its limit
    plan = sched.schedule()             # what the next step does
    outputs = sched.update(plan, executor.step(plan))

`schedule` and `update` run between steps (never while one is in flight), on one
thread; they are the only places sequences enter, leave and change. A step that fails
goes to `fail` instead of `update`: its sequences end with an error.

Policies:
  - A step has two budgets: tokens (`max_step_tokens`, a hard cap) and cost, which is
    what makes the step's duration. A token costs 1 (its share of the weights' work)
    plus `key_cost` for every key it attends to, so a chunk of n prompt tokens from
    position L costs n + key_cost · (n·L + n(n+1)/2). The cost budget is what a full
    chunk costs at the start of a prompt, so a long prompt's chunks shrink as its
    context grows and every step of its prefill takes about as long as the first (with
    key_cost 0 — the default, and on a GPU — cost is tokens).
  - Each step's budget goes first to the decode token of every running sequence
    whose prompt is done, then to newly admitted prompts (FIFO, while there is room:
    max running, KV blocks) — at most half the budget, each chunk capped — and then to
    the prompts still being prefilled, oldest first. A step that admits new prompts
    gives the prefills under way only as much as the new prompts took: it is a short
    step, so a short request sent while a long prompt prefills waits for the step in
    flight and then for little more than its own prompt. A prefill under way still
    gets at least two tokens every step and at least half of any step new requests
    share with it, so a stream of new requests cannot starve it. Running sequences
    keep their place.
  - A prompt's full blocks are looked up in the prefix cache at admission. When the
    next block it needs is being computed right now by another sequence (several
    clients sending the same system prompt at once), it waits a step or two and then
    shares the result instead of computing it twice.
  - Past the prefix cache, a prompt may take over the cached KV of a finished
    sequence's equal runs after an early change (edgelm.engine.reuse): the copies go
    into the admission step's plan, the filled positions are skipped, the gaps are
    computed.
  - Out of KV blocks: preempt the youngest running sequence (its blocks are freed; it
    goes back to the front of the queue and is recomputed later, prefix hits
    included) rather than fail anything. The executor keeps its state (history,
    sampler, decoder) meanwhile: a preempted sequence is not new when it comes back.
  - A sequence ends at a stop token or its token budget by the executor's stop rule
    (the result says so, with the end of its text); the scheduler ends it when its
    grammar is complete, when it is aborted (a client gone, a stop string) or timed
    out — those at the next `schedule`, which frees their blocks and tells the
    executor to forget them.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from edgelm.engine.blocks import BlockManager, OutOfBlocks, chain_hashes
from edgelm.engine.reuse import ReuseConfig, Run, Source, find_runs
from edgelm.engine.types import KvGeometry, NewSequence, SamplingParams, StepItem, StepPlan, StepResult
from edgelm.errors import BadRequest, Busy


class QueueFull(Busy):
    """The waiting queue is at its limit; retry later."""


@dataclass
class SchedulerLimits:
    max_running: int = 16
    max_step_tokens: int = 512
    max_queue: int = 256
    max_context: int = 8192
    # The attention work of one key for one token, in units of one token's work on the
    # weights: 0 counts tokens only. The pool sets it from the model's shape on the CPU
    # (edgelm.engine.pool.key_cost).
    key_cost: float = 0.0

    def __post_init__(self) -> None:
        for k in ("max_running", "max_step_tokens", "max_queue", "max_context"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be at least 1")
        if not self.key_cost >= 0:
            raise ValueError("key_cost must be at least 0")
        if self.max_step_tokens < self.max_running:
            raise ValueError("max_step_tokens must be at least max_running (every running sequence decodes each step)")


# Batching must not change what a request gets. The executor computes a lone token on
# the decode kernels and several tokens of one prompt on the panel kernels, each with
# results independent of the rest of the batch; so a prompt token must never be fed
# alone (unless the prompt is one token): prefix hits and prefill chunks always leave
# at least two tokens together.


def _n_lookup(n_tokens: int, block_size: int) -> int:
    """Full blocks a prefix lookup may serve: at least two tokens stay to compute."""
    return max(n_tokens - 2, 0) // block_size


def _cost(start: int, n: int, key_cost: float) -> float:
    """The cost of computing positions start..start+n of one sequence: each token's
    work on the weights (1) plus its attention over the keys it sees (0..its position)."""
    return n + key_cost * (n * start + n * (n + 1) / 2)


def _fit(start: int, cost: float, key_cost: float) -> int:
    """The most tokens from position `start` whose `_cost` is within `cost`."""
    if cost <= 0:
        return 0
    if key_cost == 0:
        return int(cost)
    b = 1 + key_cost * (start + 0.5)  # the cost is (key_cost/2)·n² + b·n
    n = max(int((math.sqrt(b * b + 2 * key_cost * cost) - b) / key_cost), 0)
    while _cost(start, n + 1, key_cost) <= cost:  # float rounding, either way
        n += 1
    while n > 0 and _cost(start, n, key_cost) > cost:
        n -= 1
    return n


def _chunk(todo: int, budget: int) -> int:
    """Tokens to feed this step (0 = wait): never a lone prompt token."""
    if todo <= 1:
        return todo
    n = min(todo, budget)
    if todo - n == 1:
        n -= 1
    return n if n >= 2 else 0


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    deadline: float | None = None  # time.monotonic() value
    matcher: Any = None  # an llguidance LLMatcher: constrained decoding
    reuse: bool | None = None  # take over cached KV past an early change (None: the model's default)
    id: int = 0  # given by Scheduler.add
    # State (the scheduler's).
    tokens: list[int] = field(init=False)
    n_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    n_generated: int = 0
    n_cached_prompt: int = 0  # prompt tokens served from the prefix cache (first admission)
    n_reused_prompt: int = 0  # prompt tokens taken over past an early change (first admission)
    n_preempted: int = 0
    registered: bool = False  # the executor holds its state
    finish_reason: str | None = None
    abort_reason: str | None = None
    error: str | None = None  # why the executor refused it (finish_reason "error")
    arrival: float = field(default_factory=time.monotonic)
    _hashes: list[int] = field(default_factory=list)
    # Reuse (edgelm.engine.reuse): positions filled by copies, not computed; the copies
    # and the source blocks pinned until the step that makes them; where the
    # approximate entries start (its blocks are cached under a salted hash).
    _fills: list[tuple[int, int]] = field(default_factory=list)
    _copies: list[tuple[list[int], int, list[int], int, int]] = field(default_factory=list)
    _pins: list[int] = field(default_factory=list)
    approx_from: int | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def todo(self) -> int:
        """Tokens to compute before the next position filled by a copy (or the end)."""
        stop = self._fills[0][0] if self._fills else len(self.tokens)
        return stop - self.n_computed

    def skip_filled(self) -> None:
        """Move past the positions copies fill (in the step that computes the ones
        before them, or earlier)."""
        while self._fills and self._fills[0][0] <= self.n_computed:
            self.n_computed = max(self.n_computed, self._fills.pop(0)[1])

    def hashes(self, block_size: int, n: int) -> list[int]:
        """Chain hashes of the first `n` full blocks of this sequence's tokens."""
        if len(self._hashes) < n:
            self._hashes = chain_hashes(self.tokens, block_size, n)
        return self._hashes[:n]


@dataclass
class SeqOutput:
    seq: Sequence
    token: int | None  # None when the sequence ended without a new token (abort, timeout)
    logprob: float
    top: list[tuple[int, float]]
    text: str
    finish_reason: str | None


class Scheduler:
    def __init__(
        self,
        kv: KvGeometry,
        limits: SchedulerLimits,
        eog_ids: Iterable[int] = (),
        enable_prefix_cache: bool = True,
        clock: Callable[[], float] = time.monotonic,
        reuse: ReuseConfig | None = None,
    ) -> None:
        """`kv`: the executor's KV cache shape (read once; the executor itself is never
        called from here). `eog_ids`: the model's end-of-generation tokens (a grammar
        that is complete does not end a sequence whose last token is one of them: the
        stop rule has already)."""
        self.limits = limits
        self.eog = frozenset(eog_ids)
        self.bs = kv.block_size
        # A step may cost what a full chunk costs at the start of a prompt.
        self.step_cost = _cost(0, limits.max_step_tokens, limits.key_cost)
        self.blocks = BlockManager(kv.n_blocks, self.bs, enable_prefix_cache)
        self.clock = clock
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._ids = itertools.count(1)
        self._in_flight: tuple[StepPlan, list[_Planned], list[Sequence]] | None = None
        self._inflight: dict[int, int] = {}  # block hash -> id of the sequence computing it
        self._ended: list[SeqOutput] = []  # ends decided in schedule(), reported by update()
        self._new: list[Sequence] = []  # admitted, for the executor to register in the next plan
        self._forget: list[int] = []  # ended while the executor holds their state
        self.mask_seconds = 0.0  # time spent computing token masks (the grammar's per-token cost)
        self.n_masks = 0
        self.n_preemptions = 0
        self.n_prompt_tokens_computed = 0
        self.n_prompt_tokens_cached = 0
        self.n_prompt_tokens_reused = 0
        # Reuse needs the prefix cache (sources are its cached blocks) and an executor
        # that carries out copies (the CPU one).
        self.reuse = reuse or ReuseConfig()
        self._can_reuse = enable_prefix_cache and bool(getattr(kv, "supports_kv_copies", False))
        self._sources: deque[Source] = deque(maxlen=self.reuse.max_sources)

    # -- intake ------------------------------------------------------------------
    def capacity_tokens(self) -> int:
        return self.blocks.n_blocks * self.bs

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (it gets its id here)."""
        if len(self.waiting) >= self.limits.max_queue:
            raise QueueFull(
                f"the queue holds {len(self.waiting)} requests (limit {self.limits.max_queue})", code="queue_full"
            )
        need = len(seq.prompt) + max(seq.max_tokens, 1)
        if not seq.prompt:
            raise BadRequest("the prompt is empty", "prompt")
        if len(seq.prompt) >= self.limits.max_context:
            raise BadRequest(
                f"the prompt has {len(seq.prompt)} tokens; the context holds {self.limits.max_context}",
                "prompt",
                "context_length_exceeded",
            )
        if min(need, self.limits.max_context) > self.capacity_tokens():
            raise BadRequest(
                f"prompt + max_tokens = {need} tokens do not fit in the KV cache ({self.capacity_tokens()} tokens)",
                "prompt",
                "context_length_exceeded",
            )
        seq.id = next(self._ids)
        self.waiting.append(seq)

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        """End a sequence at the next `schedule` (its blocks are freed then)."""
        if not seq.finished and seq.abort_reason is None:
            seq.abort_reason = reason

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self._ended or self._forget)

    # -- one step ----------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plan the next step."""
        assert self._in_flight is None, "update() with the previous step's result first"
        now = self.clock()
        for seq in [*self.running, *self.waiting]:
            if seq.abort_reason is None and seq.deadline is not None and now >= seq.deadline:
                seq.abort_reason = "timeout"
            if seq.abort_reason is not None:
                self._end(seq, seq.abort_reason)
                self._ended.append(SeqOutput(seq, None, 0.0, [], "", seq.finish_reason))

        kc = self.limits.key_cost
        budget = self.limits.max_step_tokens  # tokens
        cost = self.step_cost
        plan: dict[int, _Planned] = {}

        def limit(seq: Sequence, tokens: int, within: float) -> int:
            """The tokens `seq` may feed within `tokens` and the cost `within`; the
            cost never holds a prompt below two tokens (the token budget may)."""
            return min(tokens, max(_fit(seq.n_computed, within, kc), 2))

        def run(seq: Sequence, n: int, may_preempt: bool = True) -> float:
            """Put `n` tokens of `seq` in the step; their cost (0: no room for them)."""
            nonlocal budget, cost
            if not self._grow(seq, seq.n_computed + n, plan, may_preempt):
                return 0.0
            end = seq.n_computed + n
            plan[seq.id] = (seq, seq.n_computed, end, end == len(seq.tokens))
            c = _cost(seq.n_computed, n, kc)
            budget -= n
            cost -= c
            return c

        # 1. The decode token of every running sequence past its prompt, oldest first.
        for seq in list(self.running):
            if seq in self.running and len(seq.tokens) - seq.n_computed == 1 and budget > 0:
                run(seq, 1)
        # 2. Admit waiting sequences: at most half of the step (each chunk at most that),
        #    so a prefill under way keeps the rest. A new request starts now, not when
        #    a long prompt ahead of it is done.
        admit_budget = max(self.limits.max_step_tokens // 2, 2)
        admit_cost = self.step_cost / 2
        admitted = 0.0  # the cost of the new prompts' chunks
        skipped: list[Sequence] = []
        while (
            self.waiting
            and budget > 0
            and admit_budget > 0
            and admit_cost > 0
            and len(self.running) < self.limits.max_running
        ):
            seq = self.waiting.popleft()
            if not self._admit(seq):
                skipped.append(seq)  # its prefix is being computed by another; next step
                continue
            n = _chunk(seq.todo(), limit(seq, min(budget, admit_budget), admit_cost))
            c = run(seq, n, may_preempt=False) if n > 0 else 0.0
            if c == 0:
                self._unadmit(seq)
                self.waiting.appendleft(seq)
                break
            admit_budget -= n
            admit_cost -= c
            admitted += c
        # 3. Prompts being prefilled (admitted in earlier steps), oldest first: the rest,
        #    or in a step that admitted new prompts as much as they took, so that the
        #    step stays short and the new requests' first tokens come soon.
        share = min(cost, admitted) if admitted else cost
        for seq in list(self.running):
            if seq not in self.running or seq.id in plan:
                continue  # preempted to make room, or already in this step
            n = _chunk(seq.todo(), limit(seq, budget, share))
            if n > 0:
                share -= run(seq, n)
        self.waiting.extendleft(reversed(skipped))

        planned = list(plan.values())
        masks: dict[int, bytes] = {}
        for seq, _a, _b, smp in planned:
            if smp and seq.matcher is not None:
                t0 = time.perf_counter()
                masks[seq.id] = seq.matcher.compute_bitmask()
                self.mask_seconds += time.perf_counter() - t0
                self.n_masks += 1
        new = [
            NewSequence(s.id, list(s.tokens), s.sampling, self._max_tokens(s), sorted(s.stop_ids), s.ignore_eos)
            for s in self._new
        ]
        copies = [c for s, *_ in planned for c in s._copies]
        step = StepPlan(
            new, [StepItem(s.id, a, b, list(s.blocks), smp) for s, a, b, smp in planned], self._forget, masks, copies
        )
        self._in_flight = (step, planned, self._new)
        self._new, self._forget = [], []
        return step

    def update(self, plan: StepPlan, result: StepResult) -> list[SeqOutput]:
        """Apply a step's result; returns one output per sampled token and per
        sequence that ended."""
        assert self._in_flight is not None and self._in_flight[0] is plan, "update() the plan schedule() gave"
        _, planned, new = self._in_flight
        self._in_flight = None
        out, self._ended = self._ended, []
        by_id = {s.id: s for s in new} | {s.id: s for s, *_ in planned}
        refused = result.refused
        for sid, why in refused.items():  # bad parameters: that sequence ends, alone
            seq = by_id[sid]
            seq.registered = False
            seq.error = why
            self._end(seq, "error")
            out.append(SeqOutput(seq, None, 0.0, [], "", "error"))
        for seq, *_ in planned:
            self._unpin(seq)
        for seq, _start, end, _sample in planned:
            if seq.id in refused:
                continue
            if seq.n_computed < len(seq.prompt):
                self.n_prompt_tokens_computed += min(end, len(seq.prompt)) - seq.n_computed
            seq.n_computed = end
            seq.skip_filled()
            n_full = seq.n_computed // self.bs
            for i, h in enumerate(seq.hashes(self.bs, n_full)):
                approx = seq.approx_from is not None and (i + 1) * self.bs > seq.approx_from
                self.blocks.register(seq.blocks[i], _salted(h) if approx else h)
                if self._inflight.get(h) == seq.id:
                    del self._inflight[h]
        for t in result.tokens:
            seq = by_id[t.id]
            seq.tokens.append(t.token)
            seq.n_generated += 1
            reason = t.finish_reason
            if reason is not None:
                seq.registered = False  # the executor has forgotten it
            if seq.matcher is not None:
                seq.matcher.consume_token(t.token)
                if reason != "stop" and seq.matcher.is_stopped() and t.token not in self.eog:
                    reason = "stop"  # the grammar is complete: nothing more may follow
            if reason is not None:
                self._end(seq, reason)
            out.append(SeqOutput(seq, t.token, t.logprob, t.top, t.text, reason))
        return out

    def fail(self, plan: StepPlan, error: str) -> list[SeqOutput]:
        """The step `plan` raised (or its result could not be applied): its sequences
        end with `error`, the others go on."""
        _, planned, new = (
            self._in_flight if self._in_flight is not None and self._in_flight[0] is plan else (plan, [], [])
        )
        self._in_flight = None
        for seq, *_ in planned:
            self._unpin(seq)
        out, self._ended = self._ended, []
        self._forget.extend(plan.finished)  # (forgetting twice is harmless; leaking state is not)
        ids = {it.id for it in plan.items} | {n.id for n in plan.new}
        for seq in [*self.running, *self.waiting, *new, *(s for s, *_ in planned)]:
            if seq.id in ids and not seq.finished:
                seq.registered = True  # whatever the executor kept of it, it forgets
                seq.error = error
                self._end(seq, "error")
                out.append(SeqOutput(seq, None, 0.0, [], "", "error"))
        return out

    # -- internals ---------------------------------------------------------------
    def _max_tokens(self, seq: Sequence) -> int:
        """The executor's token budget for `seq`: its own, within the context."""
        return min(seq.max_tokens, self.limits.max_context - len(seq.prompt))

    def _end(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self._unpin(seq)
        self._remember(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self._new:  # never registered
            self._new.remove(seq)
            seq.registered = False
        self._drop_inflight(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []
        if seq.registered:
            self._forget.append(seq.id)
            seq.registered = False

    def _drop_inflight(self, seq: Sequence) -> None:
        for h in [h for h, sid in self._inflight.items() if sid == seq.id]:
            del self._inflight[h]

    def _admit(self, seq: Sequence) -> bool:
        """Prefix lookup; False when it must wait. A sequence the executor has not
        seen goes into the next plan's `new`."""
        if self._blocked_on_inflight(seq):
            return False
        n_lookup = _n_lookup(len(seq.tokens), self.bs)
        hashes = seq.hashes(self.bs, n_lookup)
        seq.blocks = self.blocks.lookup(hashes)
        seq.n_computed = len(seq.blocks) * self.bs
        if not seq.registered:
            self._new.append(seq)
            seq.registered = True
        if seq.n_preempted == 0:
            seq.n_cached_prompt = seq.n_computed
            self.n_prompt_tokens_cached += seq.n_computed
        if self._can_reuse and (self.reuse.enabled if seq.reuse is None else seq.reuse):
            self._plan_reuse(seq)
        for h in hashes[len(seq.blocks) :]:
            self._inflight.setdefault(h, seq.id)
        self.running.append(seq)
        return True

    def _blocked_on_inflight(self, seq: Sequence) -> bool:
        if not self.blocks.enable_prefix_cache:
            return False
        n_lookup = _n_lookup(len(seq.tokens), self.bs)
        for h in seq.hashes(self.bs, n_lookup):
            if self.blocks.is_cached(h):
                continue
            owner = self._inflight.get(h)
            return owner is not None and owner != seq.id
        return False

    def _unadmit(self, seq: Sequence) -> None:
        self._drop_reuse(seq)
        self._unpin(seq)
        self.running.remove(seq)
        self._drop_inflight(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []
        seq.n_computed = 0

    def _grow(self, seq: Sequence, n_pos: int, plan: dict[int, _Planned], may_preempt: bool = True) -> bool:
        """Make `seq`'s block table hold `n_pos` positions, preempting the youngest
        running sequences if needed. False if `seq` could not get them (it was
        preempted itself, or may not preempt)."""
        while len(seq.blocks) * self.bs < n_pos:
            try:
                seq.blocks.append(self.blocks.allocate())
            except OutOfBlocks:
                if not may_preempt:
                    return False
                victim = max(self.running, key=lambda s: s.arrival)
                self._preempt(victim, plan)
                if victim is seq:
                    return False
        return True

    def _preempt(self, seq: Sequence, plan: dict[int, _Planned]) -> None:
        plan.pop(seq.id, None)
        self._drop_reuse(seq)
        self._unpin(seq)
        self.running.remove(seq)
        self._drop_inflight(seq)
        self.blocks.release(seq.blocks)
        seq.blocks = []
        seq.n_computed = 0
        seq.n_preempted += 1
        self.n_preemptions += 1
        self.waiting.appendleft(seq)

    # -- reuse past an early change (edgelm.engine.reuse) ----------------------------
    def _remember(self, seq: Sequence) -> None:
        """Keep an ending sequence's cached blocks as a source for later prompts."""
        if not self._can_reuse:
            return
        n_full = min(seq.n_computed, len(seq.tokens)) // self.bs
        hashes: list[int] = []
        for b in seq.blocks[:n_full]:
            h = self.blocks.registered_hash(b)
            if h is None:
                break
            hashes.append(h)
        if len(hashes) * self.bs >= 2 * self.reuse.min_run:
            n = len(hashes)
            self._sources.appendleft(Source(list(seq.tokens[: n * self.bs]), list(seq.blocks[:n]), hashes))

    def _valid_len(self, src: Source) -> int:
        """Positions of `src` whose blocks still hold what they held."""
        n = 0
        for b, h in zip(src.blocks, src.hashes):
            if self.blocks.registered_hash(b) != h:
                break
            n += 1
        return n * self.bs

    def _plan_reuse(self, seq: Sequence) -> None:
        """At admission, after the prefix lookup: find runs of the rest of the prompt
        in a source, pin their blocks, give `seq` blocks up to the last run and queue
        the copies for this step. Prompt tokens only; the last two are computed."""
        start, end = seq.n_computed, len(seq.prompt) - 2
        if end - start < self.reuse.min_run:
            return
        best: tuple[int, Source, list[Run], int] | None = None
        for src in list(self._sources):
            n_src = self._valid_len(src)
            if n_src < self.reuse.min_run:
                self._sources.remove(src)  # evicted: it will not come back
                continue
            runs = find_runs(seq.tokens, start, end, src.tokens, src.index(), n_src, self.reuse)
            total = sum(n for *_, n in runs)
            if total and (best is None or total > best[0]):
                best = (total, src, runs, n_src)
        if best is None:
            return
        total, src, runs, _ = best
        pins = sorted({src.blocks[k] for _, j, n in runs for k in range(j // self.bs, (j + n - 1) // self.bs + 1)})
        self.blocks.pin(pins)
        seq._pins = pins
        last = max(d + n for d, _, n in runs)
        try:
            while len(seq.blocks) * self.bs < last:
                seq.blocks.append(self.blocks.allocate())
        except OutOfBlocks:
            self._unpin(seq)
            return
        seq._copies = [(list(src.blocks), j, list(seq.blocks), d, n) for d, j, n in runs]
        seq._fills = [(d, d + n) for d, _, n in runs]
        seq.approx_from = runs[0][0]
        if seq.n_preempted == 0:
            seq.n_reused_prompt = total
        self.n_prompt_tokens_reused += total
        seq.skip_filled()

    def _unpin(self, seq: Sequence) -> None:
        if seq._pins:
            self.blocks.release(seq._pins)
            seq._pins = []
        seq._copies = []

    def _drop_reuse(self, seq: Sequence) -> None:
        """Its blocks are going: what was copied into them goes too (and copies not
        made yet are not counted)."""
        if seq._copies:
            n = sum(c[4] for c in seq._copies)
            self.n_prompt_tokens_reused -= n
            if seq.n_preempted == 0:
                seq.n_reused_prompt = 0
        seq._fills = []
        seq.approx_from = None


def _salted(h: int) -> int:
    """The cache key of a block holding taken-over (approximate) entries: never equal
    to an exact prefix's, so the prefix cache never serves it to a request."""
    return hash(("reused", h))


_Planned = tuple[Sequence, int, int, bool]
"""(sequence, first token, end, sample) of one step's item."""
