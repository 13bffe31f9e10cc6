"""The supervisor's view of every server as Prometheus metrics, with prometheus_client.

`modelctl metrics` prints them; the supervisor writes the same text atomically to
<state>/metrics.prom (node_exporter's textfile-collector convention) and, with
`supervise --metrics-port N`, serves it on 127.0.0.1:N for a scraper.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelctl import lifecycle as lc
from modelctl.format import STARTUP_PHASES

STATES = (*lc.STATES, "broken")


def exit_code(text: str | None) -> int | None:
    """'exit code 3' → 3; 'killed by SIGKILL' → -9 (as Popen reports a signal); else None."""
    if not text:
        return None
    if text.startswith("exit code "):
        return int(text.rsplit(" ", 1)[-1])
    if text.startswith("killed by SIG"):
        try:
            return -signal.Signals[text.rsplit(" ", 1)[-1]].value
        except KeyError:
            return None
    if text.startswith("killed by signal "):
        return -int(text.rsplit(" ", 1)[-1])
    return None


class ServerCollector(Collector):
    """Reads the status rows at each collection: what `modelctl status` sees, now."""

    def __init__(self, rows: Callable[[], list[dict[str, Any]]]):
        self.rows = rows

    def collect(self) -> Iterator[Metric]:
        rows = self.rows()
        state = GaugeMetricFamily("modelctl_server_state", "1 for the server's current state, 0 for the others", labels=["server", "state"])
        restarts = CounterMetricFamily("modelctl_server_restarts", "Restarts after failures", labels=["server"])
        up = GaugeMetricFamily("modelctl_server_up", "1 while the server is ready", labels=["server"])
        rss = GaugeMetricFamily("modelctl_server_rss_bytes", "Resident memory of the server's processes", labels=["server"])
        gpu = GaugeMetricFamily("modelctl_server_gpu_memory_bytes", "GPU memory of the server's processes (NVML)", labels=["server"])
        startup = GaugeMetricFamily("modelctl_server_startup_seconds", "Phases of the last start", labels=["server", "phase"])
        last_exit = GaugeMetricFamily("modelctl_server_last_exit_code", "The last exit's code (negative: the signal)", labels=["server"])
        for r in rows:
            server = r["id"]
            for s in STATES:
                state.add_metric([server, s], 1.0 if r["state"] == s else 0.0)
            restarts.add_metric([server], float(r.get("restarts") or 0))
            up.add_metric([server], 1.0 if r["state"] == lc.READY else 0.0)
            if r.get("rss") is not None:
                rss.add_metric([server], float(r["rss"]))
            if r.get("gpu_memory") is not None:
                gpu.add_metric([server], float(r["gpu_memory"]))
            for phase in (*STARTUP_PHASES, "total"):
                if r.get("startup") and phase in r["startup"]:
                    startup.add_metric([server, phase], float(r["startup"][phase]))
            if (code := exit_code(r.get("last_exit"))) is not None:
                last_exit.add_metric([server], float(code))
        yield from (state, restarts, up, rss, gpu, startup, last_exit)


def registry_for(rows: Callable[[], list[dict[str, Any]]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(rows))
    return registry


def exposition(rows: Callable[[], list[dict[str, Any]]]) -> bytes:
    return generate_latest(registry_for(rows))
