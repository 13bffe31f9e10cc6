"""Prometheus metrics of the bundled server (`GET /metrics`), with prometheus_client.

Requests by route and status, their latency, inputs and tokens embedded or scored, model batch
sizes and the queue depth: what TEI and Infinity expose, under `sentence_` names.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# the route of the request being served, for counters bumped inside handlers
current_route: contextvars.ContextVar[str] = contextvars.ContextVar("current_route", default="unmatched")

OWN_ROUTES = ("/health", "/metrics")  # a supervisor's probes and scrapes, not traffic
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self, queue_depth: Callable[[], float], ready: Callable[[], float]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("sentence_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("sentence_request_duration_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.inputs = Counter("sentence_inputs", "Inputs embedded or documents scored", ["route"], registry=r)
        self.tokens = Counter("sentence_tokens", "Tokens run through the model", ["route"], registry=r)
        self.batches = Histogram("sentence_batch_inputs", "Inputs per model batch", buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "sentence_queue_wait_seconds",
            "Per request: from its arrival to its first rows in the model",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        Gauge("sentence_queue_depth", "Inputs waiting for or in the model", registry=r).set_function(queue_depth)
        Gauge("sentence_model_ready", "1 once the model is loaded", registry=r).set_function(ready)
        # requests being served now (not /health and /metrics): how a supervisor tells idle from busy
        self.in_progress = Gauge("sentence_requests_in_progress", "Requests being served now (not /health, /metrics)", registry=r)

    def count(self, inputs: int, tokens: int) -> None:
        route = current_route.get()
        self.inputs.labels(route).inc(inputs)
        self.tokens.labels(route).inc(tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every request by its route template (unknown paths count as `unmatched`)."""

    def __init__(self, app: Any, metrics: Metrics, routes: set[str]):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = (
            scope["path"]
            if scope["path"] in self.routes
            else ("/v1/models/{id}" if scope["path"].startswith("/v1/models/") else "unmatched")
        )
        token = current_route.set(route)
        status = [499]  # no answer sent: the client went away (nginx's 499), not a server error

        async def send_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        t0 = time.perf_counter()
        traffic = route not in OWN_ROUTES
        if traffic:
            self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            if traffic:
                self.metrics.in_progress.dec()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
            self.metrics.requests.labels(route, str(status[0])).inc()
            current_route.reset(token)
