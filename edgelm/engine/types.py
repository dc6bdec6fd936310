"""The contract between the scheduler and the executor, as in vLLM's v1 engine: the
scheduler decides, the executor computes, and each step is one typed exchange.

    plan = scheduler.schedule()      # StepPlan: forget `finished`, register `new`, run `items`
    result = executor.step(plan)     # StepResult: one SampledToken per sampled item
    outputs = scheduler.update(plan, result)

The types are the Rust extension's (`edgelm._native`, frozen records with the GIL-free
executor on the other side), so the plan crosses into Rust as it is. The scheduler
never calls the executor; the engine loop (edgelm.engine.loop) hands the plan over.

- `NewSequence`: a sequence the executor has not seen: id, prompt tokens, its
  `SamplingParams` (built once from the request, passed unchanged to the sampler) and
  its stop rule (max_tokens with the room in the context folded in, stop token ids,
  ignore_eos). The executor registers it before running the step.
- `StepItem`: one sequence's share of the step: its tokens `start..end` through its
  block table (a prompt chunk, or the one token a running sequence decodes), and
  whether to sample after the last.
- `StepPlan`: `new`, `items`, `finished` (ids the scheduler ended: aborted, timed out,
  stopped by a grammar or a stop string; the executor forgets them first) and `masks`
  (the grammar's token bitmask for each constrained sample) and `copies` (KV runs taken
  over from cached blocks before the forward pass — prompt reuse past an early change,
  edgelm.engine.reuse; only an executor whose `supports_kv_copies` is true gets them).
- `SampledToken`: id, token, log-probability, top alternatives, the text the token
  completes, and `finish_reason` ("stop": an end-of-generation or stop token; "length":
  max_tokens) when it ended its sequence. Stop and length are decided in one place, the
  executor's stop rule (Rust `StopRule`, shared with `Model.generate`); the sequence's
  last text then comes with its last token, and the executor has forgotten it.
- `StepResult`: the sampled tokens, and the new sequences the executor refused (bad
  parameters) with why.

`Executor` is the Protocol both `edgelm._native.Executor` and the tests' fake executor
implement; mypy checks both against it.
"""

from __future__ import annotations

from typing import Protocol

from edgelm._native import NewSequence, SampledToken, SamplingParams, StepItem, StepPlan, StepResult

__all__ = [
    "Executor",
    "KvGeometry",
    "NewSequence",
    "SampledToken",
    "SamplingParams",
    "StepItem",
    "StepPlan",
    "StepResult",
]


class KvGeometry(Protocol):
    """The shape of an executor's KV cache: what the scheduler allocates from."""

    @property
    def n_blocks(self) -> int: ...

    @property
    def block_size(self) -> int: ...


class Executor(KvGeometry, Protocol):
    def step(self, plan: StepPlan) -> StepResult: ...
