"""Prometheus metrics of one server (its own registry, so several apps in one process — tests — never
share counters)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("diffmas_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.queue_length = Gauge("diffmas_queue_length", "Requests waiting for a batch", registry=r)
        self.in_flight = Gauge("diffmas_in_flight", "Requests in the running batch", registry=r)
        self.latency = Histogram(
            "diffmas_request_latency_seconds", "Time from arrival to answer", buckets=LATENCY_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "diffmas_queue_wait_seconds",
            "Time from arrival to the start of its batch",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "diffmas_batch_size", "Requests per batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.tokens = Counter("diffmas_tokens", "Tokens processed, by kind", ["kind"], registry=r)
        self.trace_bytes = Counter("diffmas_trace_bytes", "KV-trace bytes of answered requests", registry=r)

    def observe_result(self, result) -> None:
        """Count one answered request's tokens and trace bytes (a RunResult)."""
        for kind, n in result.n_tokens.items():
            self.tokens.labels(kind=kind).inc(n)
        self.trace_bytes.inc(result.trace_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
