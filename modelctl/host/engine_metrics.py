"""What a server says about its own traffic on its Prometheus `/metrics`, whatever the engine:
the bundled server, vLLM, TEI and TGI. `top` shows the request rate and latency; the supervisor
tells an idle on-demand server from a busy one by its counters and its requests in progress.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT = 1.0
# (requests counter, latency histogram, gauges of requests under way) each engine exposes; the first found wins
ENGINES = (
    ("sentence_requests", "sentence_request_duration_seconds", ("sentence_requests_in_progress",)),  # the bundled server
    ("vllm:request_success", "vllm:e2e_request_latency_seconds", ("vllm:num_requests_running", "vllm:num_requests_waiting")),
    ("te_request_count", "te_request_duration", ("te_queue_size",)),  # TEI
    ("tgi_request_count", "tgi_request_duration", ("tgi_queue_size",)),
)
OWN_ROUTES = {"/health", "/metrics"}  # the supervisor's probes and our own scrapes are not traffic


@dataclass
class Scrape:
    at: float
    requests: float
    latency_sum: float
    latency_count: float
    buckets: dict[float, float]
    in_progress: float = 0.0  # requests running or waiting in the engine now


def scrape(url: str) -> Scrape | None:
    """One read of a server's /metrics: its request count and latency histogram, or None."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=SCRAPE_TIMEOUT) as resp:
            text = resp.read(4 << 20).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    try:
        families = {f.name: f for f in text_string_to_metric_families(text)}
    except ValueError:
        return None
    for counter, histogram, gauges in ENGINES:
        if counter not in families:
            continue
        requests = sum(
            s.value for s in families[counter].samples if not s.name.endswith("_created") and s.labels.get("route") not in OWN_ROUTES
        )
        total = count = 0.0
        buckets: dict[float, float] = {}
        for s in families[histogram].samples if histogram in families else []:
            if s.labels.get("route") in OWN_ROUTES:
                continue
            if s.name.endswith("_sum"):
                total += s.value
            elif s.name.endswith("_count"):
                count += s.value
            elif s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
        in_progress = sum(s.value for g in gauges if g in families for s in families[g].samples if s.labels.get("route") not in OWN_ROUTES)
        return Scrape(time.time(), requests, total, count, buckets, in_progress)
    return None
