"""The gateway's /metrics (Prometheus): per model and server, requests by status, latency to the
answer's head, time in the `max_concurrency` queue, and waits for an idle server to wake."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "gateway_requests",
            "Requests routed, by model name, server, endpoint and status",
            ["model", "server", "endpoint", "code"],
            registry=r,
        )
        self.refused = Counter("gateway_refused", "Requests answered by the gateway itself, by reason", ["reason"], registry=r)
        self.latency = Histogram(
            "gateway_request_seconds",
            "From a request's arrival to the server's answer head, by model name",
            ["model", "server"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "gateway_queue_wait_seconds", "Time in a server's max_concurrency queue", ["server"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.wakes = Counter("gateway_wake_waits", "Requests that waited for an idle or starting server", ["server"], registry=r)
        self.wake_wait = Histogram(
            "gateway_wake_wait_seconds",
            "How long requests waited for a waking server's answer head",
            ["server"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being forwarded now, by server", ["server"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
