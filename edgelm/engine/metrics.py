"""Prometheus metrics of one daemon (its own registry, so several can share a process
in tests)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from edgelm.engine.loop import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "edgelm_requests", "Requests by endpoint and outcome", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "edgelm_sequences_finished", "Sequences ended, by finish reason", ["reason"], registry=r
        )
        self.queue = Gauge("edgelm_queue_length", "Sequences waiting to be scheduled", registry=r)
        self.running = Gauge("edgelm_running_sequences", "Sequences in the running batch", registry=r)
        self.tokens_in = Counter("edgelm_prompt_tokens", "Prompt tokens received", registry=r)
        self.tokens_cached = Counter(
            "edgelm_prompt_tokens_cached", "Prompt tokens served from the prefix cache", registry=r
        )
        self.tokens_out = Counter("edgelm_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "edgelm_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "edgelm_time_per_output_token_seconds",
            "Time between tokens of a stream",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "edgelm_request_duration_seconds", "Request duration", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.steps = Counter("edgelm_steps", "Scheduler steps run", registry=r)
        self.step_tokens = Counter("edgelm_step_tokens", "Tokens computed in steps", registry=r)
        self.preemptions = Gauge("edgelm_preemptions", "Sequences preempted so far (recomputed later)", registry=r)
        self.grammar_masks = Gauge("edgelm_grammar_masks", "Token masks computed for constrained decoding", registry=r)
        self.grammar_mask_seconds = Gauge("edgelm_grammar_mask_seconds", "Time spent computing them", registry=r)
        self.kv_used = Gauge("edgelm_kv_blocks_used", "KV blocks held by sequences", registry=r)
        self.kv_cached = Gauge("edgelm_kv_blocks_cached", "KV blocks holding a reusable prefix", registry=r)
        self.kv_total = Gauge("edgelm_kv_blocks_total", "KV blocks in the cache", registry=r)
        self.models_loaded = Gauge("edgelm_models_loaded", "Models in memory", registry=r)
        self.connections_open = Gauge("edgelm_http_connections_open", "HTTP connections open", registry=r)
        self.connections_dropped = Gauge(
            "edgelm_http_connections_dropped",
            "HTTP connections closed by the server so far: header_timeout, evicted (at the cap), refused (503)",
            ["reason"],
            registry=r,
        )

    def set_engine_gauges(self, stats: Sequence[EngineStats]) -> None:
        """The scheduler gauges, summed over the engines (one per loaded model)."""
        self.queue.set(sum(s.waiting for s in stats))
        self.running.set(sum(s.running for s in stats))
        self.kv_total.set(sum(s.kv_blocks_total for s in stats))
        self.kv_used.set(sum(s.kv_blocks_used for s in stats))
        self.kv_cached.set(sum(s.kv_blocks_cached for s in stats))
        self.preemptions.set(sum(s.preemptions for s in stats))
        self.grammar_masks.set(sum(s.grammar_masks for s in stats))
        self.grammar_mask_seconds.set(sum(s.grammar_mask_seconds for s in stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)
