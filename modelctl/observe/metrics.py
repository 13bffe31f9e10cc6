"""The supervisor's view of every server as Prometheus metrics, with prometheus_client.

`modelctl metrics` prints them; the supervisor writes the same text atomically to
<state>/metrics.prom (node_exporter's textfile-collector convention) and, with
`supervise --metrics-port N`, serves it on 127.0.0.1:N for a scraper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from modelctl.observe.rows import BROKEN, StatusRow
from modelctl.state import lifecycle as lc
from modelctl.state.record import HELD, HELD_BY_INSTANCE, socket_mode
from modelctl.units import STARTUP_PHASES

STATES = (*lc.STATES, BROKEN)


class ServerCollector(Collector):
    """Reads the status rows at each collection: what `modelctl status` sees, now."""

    def __init__(self, rows: Callable[[], list[StatusRow]]):
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
        wakes = CounterMetricFamily(
            "modelctl_server_wakes", "Starts of an idle on-demand server by a client (or up --now)", labels=["server"]
        )
        idle_stops = CounterMetricFamily("modelctl_server_idle_stops", "Stops of an on-demand server after idle_timeout", labels=["server"])
        evictions = CounterMetricFamily(
            "modelctl_server_evictions", "Stops of an on-demand server to make room in the budget", labels=["server"]
        )
        wake = GaugeMetricFamily("modelctl_server_wake_seconds", "How long the first client waited at the last wake", labels=["server"])
        held = GaugeMetricFamily(
            "modelctl_server_socket_held", "1 while the server's listening socket is held across its restarts", labels=["server"]
        )
        backlog = GaugeMetricFamily("modelctl_server_backlog", "Connections waiting in the held socket's backlog", labels=["server"])
        for r in rows:
            server = r.id
            for s in STATES:
                state.add_metric([server, s], 1.0 if r.state == s else 0.0)
            restarts.add_metric([server], float(r.restarts))
            up.add_metric([server], 1.0 if r.state == lc.READY else 0.0)
            if r.rss is not None:
                rss.add_metric([server], float(r.rss))
            if r.gpu_memory is not None:
                gpu.add_metric([server], float(r.gpu_memory))
            for phase in (*STARTUP_PHASES, "total"):
                if r.startup and phase in r.startup:
                    startup.add_metric([server, phase], float(r.startup[phase]))
            if r.last_exit is not None and (code := exit_returncode(r.last_exit)) is not None:
                last_exit.add_metric([server], float(code))
            if r.socket:
                held.add_metric([server], 1.0 if socket_mode(r.socket) in (HELD, HELD_BY_INSTANCE) else 0.0)
            if r.backlog is not None:
                backlog.add_metric([server], float(r.backlog))
            if r.start == "on-demand":
                wakes.add_metric([server], float(r.wakes))
                idle_stops.add_metric([server], float(r.idle_stops))
                evictions.add_metric([server], float(r.evictions))
                if r.last_wake_seconds is not None:
                    wake.add_metric([server], r.last_wake_seconds)
        yield from (state, restarts, up, rss, gpu, startup, last_exit, held, backlog, wakes, idle_stops, evictions, wake)


def exit_returncode(last_exit: dict[str, Any]) -> int | None:
    """The code, or a signal as its negative number (as Popen reports it)."""
    if last_exit.get("signal") is not None:
        return -int(last_exit["signal"])
    code = last_exit.get("code")
    return int(code) if code is not None else None


def registry_for(rows: Callable[[], list[StatusRow]]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(rows))
    return registry


def exposition(rows: Callable[[], list[StatusRow]]) -> bytes:
    return generate_latest(registry_for(rows))
