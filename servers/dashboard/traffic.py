"""Requests per second and p50/p90 latency of each server over the last minutes, from two
successive reads of its own Prometheus /metrics (modelctl/host/engine_metrics.py knows the
engines: the bundled server, vLLM, TEI, TGI). A server without such metrics has no series."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from modelctl.host.engine_metrics import Scrape

HISTORY_SECONDS = 300.0
RETRY_WITHOUT_METRICS = 30.0  # a server whose /metrics says nothing we know is asked again this late


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets: linear within the bucket that holds
    the q-th request; the largest finite bound when it falls in +Inf."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


@dataclass
class Point:
    at: float
    req_s: float
    p50: float | None  # seconds
    p90: float | None


@dataclass
class Series:
    """One server's recent traffic."""

    last: Scrape | None = None
    points: deque[Point] = field(default_factory=deque)
    no_metrics_until: float = 0.0  # a server without metrics we know is not asked again before this

    def add(self, now: Scrape) -> None:
        before, self.last = self.last, now
        if before is None or now.at <= before.at or now.requests < before.requests:
            return  # the first read, or a new instance (its counters started again)
        done = now.latency_count - before.latency_count
        window = {le: n - before.buckets.get(le, 0.0) for le, n in now.buckets.items()}
        p50 = histogram_quantile(0.5, window) if done > 0 else None
        p90 = histogram_quantile(0.9, window) if done > 0 else None
        self.points.append(Point(now.at, (now.requests - before.requests) / (now.at - before.at), p50, p90))
        while self.points and self.points[0].at < now.at - HISTORY_SECONDS:
            self.points.popleft()

    def to_json(self) -> dict[str, Any] | None:
        if not self.points:
            return None
        last = self.points[-1]
        return {
            "at": [round(p.at, 2) for p in self.points],
            "req_s": [round(p.req_s, 3) for p in self.points],
            "p50_ms": [None if p.p50 is None else round(p.p50 * 1000, 2) for p in self.points],
            "p90_ms": [None if p.p90 is None else round(p.p90 * 1000, 2) for p in self.points],
            "now": {"req_s": round(last.req_s, 3), "p50_ms": _ms(last.p50), "p90_ms": _ms(last.p90)},
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)
