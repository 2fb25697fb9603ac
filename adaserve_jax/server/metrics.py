"""Prometheus metrics of the gRPC server (own registry; served over HTTP by `app.py`)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from adaserve_jax.scheduler.request import RequestState

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
_ACCEPT_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0)


class ServerMetrics:
    """Request outcomes, SLO attainment per category, goodput, latency and load."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "adaserve_requests", "Finished RPCs by outcome", ["outcome"], registry=r
        )
        self.slo = Counter(
            "adaserve_slo_requests",
            "Completed requests with an SLO, by category and whether the SLO was attained",
            ["category", "attained"],
            registry=r,
        )
        self.goodput_tokens = Counter(
            "adaserve_goodput_tokens",
            "Output tokens of requests that attained their SLO",
            registry=r,
        )
        self.output_tokens = Counter("adaserve_output_tokens", "All output tokens", registry=r)
        self.ttft = Histogram(
            "adaserve_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "adaserve_tpot_seconds",
            "Mean time per output token of a request (after the first)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.accepted_per_step = Histogram(
            "adaserve_tokens_per_step",
            "Tokens a request gained per verify step (accepted draft tokens + 1 bonus)",
            buckets=_ACCEPT_BUCKETS,
            registry=r,
        )
        self.accepted_tokens = Counter(
            "adaserve_accepted_draft_tokens", "Accepted draft tokens", registry=r
        )
        self.verify_steps = Counter(
            "adaserve_request_verify_steps", "Verify steps summed over requests", registry=r
        )
        self.queue_depth = Gauge("adaserve_queue_depth", "Requests waiting for a slot", registry=r)
        self.running = Gauge("adaserve_running_requests", "Requests holding a KV slot", registry=r)
        self.slots_in_use = Gauge("adaserve_kv_slots_in_use", "KV cache slots in use", registry=r)
        self.slots_total = Gauge("adaserve_kv_slots_total", "KV cache slots", registry=r)

    def bind_stats(self, stats: Callable[[], dict]) -> None:
        """Read the load gauges from `stats()` (the serving loop's stats) at scrape time."""
        self.queue_depth.set_function(lambda: stats()["waiting"])
        self.running.set_function(lambda: stats()["running"])
        self.slots_in_use.set_function(lambda: stats()["slots_in_use"])
        self.slots_total.set_function(lambda: stats()["slots_total"])

    def record(self, outcome: str, state: RequestState | None = None) -> None:
        self.requests.labels(outcome).inc()
        if state is None or outcome in ("cancelled", "error"):
            return
        n = len(state.output)
        self.output_tokens.inc(n)
        if (ttft := state.ttft_s()) is not None:
            self.ttft.observe(ttft)
        if (tpot := state.mean_tpot_s()) is not None:
            self.tpot.observe(tpot)
        if state.stats.steps:
            self.accepted_per_step.observe(1 + state.stats.accepted / state.stats.steps)
            self.accepted_tokens.inc(state.stats.accepted)
            self.verify_steps.inc(state.stats.steps)
        attained = state.attained()
        if attained is not None:
            category = state.request.category or "custom"
            self.slo.labels(category, str(attained).lower()).inc()
            if attained:
                self.goodput_tokens.inc(n)
