"""Prometheus metrics of one daemon (its own registry, so several can share a process
in tests), named as Prometheus asks: counters end in `_total` (the client adds it),
durations are seconds, sizes bytes. What an engine counts carries a `model` label (the
served name); the process metrics (CPU seconds, resident memory, open files) come from
prometheus_client's process collector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

if TYPE_CHECKING:
    from edgelm.engine.loop import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ...
        m = ["model"]
        self.requests = Counter(
            "edgelm_requests", "HTTP requests by route and status", ["endpoint", "status"], registry=r
        )
        self.finished = Counter(
            "edgelm_sequences_finished", "Sequences ended, by finish reason", ["model", "reason"], registry=r
        )
        self.queue = Gauge("edgelm_queue_length", "Sequences waiting to be scheduled", m, registry=r)
        self.running = Gauge("edgelm_running_sequences", "Sequences in the running batch", m, registry=r)
        self.tokens_in = Counter("edgelm_prompt_tokens", "Prompt tokens received", m, registry=r)
        self.tokens_cached = Counter(
            "edgelm_prompt_tokens_cached", "Prompt tokens served from the prefix cache", m, registry=r
        )
        self.tokens_reused = Counter(
            "edgelm_prompt_tokens_reused",
            "Prompt tokens taken over from cached KV past an early change (prompt reuse)",
            m,
            registry=r,
        )
        self.tokens_computed = Counter(
            "edgelm_prompt_tokens_computed", "Prompt tokens computed (neither cached nor reused)", m, registry=r
        )
        self.tokens_out = Counter("edgelm_generated_tokens", "Tokens generated", m, registry=r)
        self.ttft = Histogram(
            "edgelm_time_to_first_token_seconds", "Time to first token", m, buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "edgelm_time_per_output_token_seconds",
            "Time between tokens of a stream",
            m,
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "edgelm_request_duration_seconds",
            "Time from submission to the last token",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.steps = Counter("edgelm_steps", "Scheduler steps run", m, registry=r)
        self.step_tokens = Counter("edgelm_step_tokens", "Tokens computed in steps", m, registry=r)
        self.preemptions = Counter("edgelm_preemptions", "Sequences preempted (recomputed later)", m, registry=r)
        self.grammar_masks = Counter(
            "edgelm_grammar_masks", "Token masks computed for constrained decoding", m, registry=r
        )
        self.grammar_mask_seconds = Counter(
            "edgelm_grammar_mask_seconds", "Time spent computing token masks", m, registry=r
        )
        self.kv_used = Gauge("edgelm_kv_blocks_used", "KV blocks held by sequences", m, registry=r)
        self.kv_cached = Gauge("edgelm_kv_blocks_cached", "KV blocks holding a reusable prefix", m, registry=r)
        self.kv_total = Gauge("edgelm_kv_blocks_total", "KV blocks in the cache", m, registry=r)
        self.models_loaded = Gauge("edgelm_models_loaded", "Models in memory", registry=r)
        self.connections_open = Gauge("edgelm_http_connections_open", "HTTP connections open", registry=r)
        self.connections_dropped = Counter(
            "edgelm_http_connections_dropped",
            "HTTP connections closed by the server: header_timeout, evicted (at the cap), refused (503)",
            ["reason"],
            registry=r,
        )
        # Cumulative counts read from elsewhere (the schedulers, the connection guard),
        # turned into counter increments: the last value seen of each.
        self._seen: dict[tuple[str, str], float] = {}
        self._gauge_models: set[str] = set()

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)

    def advance(self, counter: Counter, key: tuple[str, str], total: float, *labels: str) -> None:
        """Move `counter{labels}` up to the cumulative `total` (a source that restarted,
        such as a model loaded again, counts from zero)."""
        last = self._seen.get(key, 0.0)
        delta = total - last if total >= last else total
        self._seen[key] = total
        if delta > 0:
            counter.labels(*labels).inc(delta)

    def set_engine_gauges(self, stats: Sequence[tuple[str, EngineStats]]) -> None:
        """The scheduler gauges of each loaded model, and its cumulative counts as counters;
        the gauges of models no longer loaded are removed."""
        names = {name for name, _ in stats}
        for gone in self._gauge_models - names:
            for g in (self.queue, self.running, self.kv_total, self.kv_used, self.kv_cached):
                try:
                    g.remove(gone)
                except KeyError:
                    pass
            for kind in ("preemptions", "masks", "mask_seconds"):
                self._seen.pop((kind, gone), None)
        self._gauge_models = names
        for name, s in stats:
            self.queue.labels(name).set(s.waiting)
            self.running.labels(name).set(s.running)
            self.kv_total.labels(name).set(s.kv_blocks_total)
            self.kv_used.labels(name).set(s.kv_blocks_used)
            self.kv_cached.labels(name).set(s.kv_blocks_cached)
            self.advance(self.preemptions, ("preemptions", name), s.preemptions, name)
            self.advance(self.grammar_masks, ("masks", name), s.grammar_masks, name)
            self.advance(self.grammar_mask_seconds, ("mask_seconds", name), s.grammar_mask_seconds, name)

    def set_connections(self, open_now: int, dropped: dict[str, int]) -> None:
        self.connections_open.set(open_now)
        for reason, n in dropped.items():
            self.advance(self.connections_dropped, ("dropped", reason), n, reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """What one model's engine records: the daemon's metrics with its `model` label set."""

    def __init__(self, m: Metrics, model: str) -> None:
        self.model = model
        self.parent = m
        self.tokens_in = m.tokens_in.labels(model)
        self.tokens_cached = m.tokens_cached.labels(model)
        self.tokens_reused = m.tokens_reused.labels(model)
        self.tokens_computed = m.tokens_computed.labels(model)
        self.tokens_out = m.tokens_out.labels(model)
        self.ttft = m.ttft.labels(model)
        self.tpot = m.tpot.labels(model)
        self.e2e = m.e2e.labels(model)
        self.steps = m.steps.labels(model)
        self.step_tokens = m.step_tokens.labels(model)
        self.kv_total = m.kv_total.labels(model)

    def finished(self, reason: str) -> Counter:
        return self.parent.finished.labels(self.model, reason)
