"""`modelctl top`: every server live — state, uptime, restarts, memory, GPU memory, and for
servers that expose Prometheus metrics (the bundled server, vLLM, TEI, TGI) request rate and
latency scraped from their own /metrics — with sparklines of the last minutes.

Keys: q quits (Ctrl-C too). Works over ssh in a plain terminal; `--once` prints one frame.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.text import Text

from modelctl.cli.format import styled_state
from modelctl.cli.tables import Column, render
from modelctl.control import Controller, Scope
from modelctl.host.engine_metrics import Scrape, scrape
from modelctl.observe.rows import StatusRow
from modelctl.units import format_bytes, format_duration

SPARK = "▁▂▃▄▅▆▇█"
HISTORY = 120  # samples kept: 4 minutes at the default 2 s
COLUMNS = (
    Column("server", keep=True),
    Column("state", keep=True),
    Column("uptime", right=True, drop=5),
    Column("restarts", right=True, drop=6),
    Column("memory", right=True, drop=2),
    Column("", drop=9),  # memory over time
    Column("gpu mem", right=True, drop=3),
    Column("req/s", right=True, drop=1),
    Column("", drop=8),  # requests over time
    Column("mean", right=True, drop=4),
    Column("p95", right=True, drop=7),
)


def spark(values: list[float], width: int = 20) -> str:
    values = values[-width:]
    if not values:
        return ""
    top = max(values)
    if top <= 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, int(v / top * (len(SPARK) - 1) + 0.5))] for v in values)


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a histogram's (cumulative) buckets: the upper bound that reaches it."""
    if not buckets:
        return None
    total = buckets.get(math.inf, max(buckets.values()))
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return None


@dataclass
class Series:
    """What top remembers of one server between frames."""

    last: Scrape | None = None
    rate: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    rss: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    latency: float | None = None
    p95: float | None = None
    req_s: float | None = None


class Top:
    def __init__(self, ctl: Controller, scope: Scope = Scope()):
        self.ctl, self.scope = ctl, scope
        self.series: dict[str, Series] = {}
        self.rows: list[StatusRow] = []

    def sample(self) -> None:
        self.rows = self.ctl.status(self.scope)
        for row in self.rows:
            s = self.series.setdefault(row.id, Series())
            s.rss.append(float(row.rss or 0))
            now = scrape(row.url) if row.url and row.state in ("ready", "unhealthy") else None
            if now is None:
                s.req_s = None
                continue
            if s.last is not None and now.at > s.last.at and now.requests >= s.last.requests:
                dt = now.at - s.last.at
                s.req_s = (now.requests - s.last.requests) / dt
                s.rate.append(s.req_s)
                done = now.latency_count - s.last.latency_count
                s.latency = (now.latency_sum - s.last.latency_sum) / done if done > 0 else None
                s.p95 = quantile({le: n - s.last.buckets.get(le, 0.0) for le, n in now.buckets.items()}, 0.95) if done > 0 else None
            s.last = now

    def frame(self, width: int | None = None) -> RenderableType:
        """One frame, fitted to `width` (None: every column): the server's name is never cut."""
        lines = [Text(f"modelctl top — {time.strftime('%H:%M:%S')} — q quits")]
        rows: list[list[str | Text]] = []
        for row in self.rows:
            s = self.series.get(row.id, Series())
            rows.append(
                [
                    row.id,
                    styled_state(row.state),
                    format_duration(row.uptime),
                    str(row.restarts),
                    format_bytes(row.rss),
                    spark(list(s.rss)),
                    format_bytes(row.gpu_memory) if row.gpu_memory is not None else "-",
                    f"{s.req_s:.1f}" if s.req_s is not None else "-",
                    spark(list(s.rate)),
                    f"{s.latency * 1000:.0f}ms" if s.latency is not None else "-",
                    f"≤{s.p95 * 1000:.0f}ms" if s.p95 is not None and math.isfinite(s.p95) else "-",
                ]
            )
        lines += render(COLUMNS, rows, width)
        return Group(*lines)


@contextlib.contextmanager
def _keys() -> Iterator[Any]:
    """Single keystrokes from a terminal (cbreak mode), restored on exit; nothing without a tty."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def run(ctl: Controller, scope: Scope, interval: float, console: Console, wide: bool = False) -> None:
    """Frames until q (or Ctrl-C). A pipe or a file gets the first frame at once (no rates yet),
    then one frame every interval, each whole and followed by a blank line."""
    from rich.live import Live

    top = Top(ctl, scope)
    top.sample()
    if not console.is_terminal:
        while True:
            console.print(top.frame(None))
            console.print()
            sys.stdout.flush()
            time.sleep(interval)
            top.sample()
    width = None if wide else console.width
    with _keys() as fd, Live(top.frame(width), console=console, auto_refresh=False, screen=False) as live:
        while True:
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                ready, _, _ = select.select([fd] if fd is not None else [], [], [], left)
                if ready and os.read(fd, 1) in (b"q", b"Q"):
                    return
            top.sample()
            width = None if wide else console.width
            live.update(top.frame(width), refresh=True)


def once(ctl: Controller, scope: Scope, interval: float, width: int | None = None) -> RenderableType:
    """One frame, with rates measured over `interval` seconds."""
    top = Top(ctl, scope)
    top.sample()
    time.sleep(interval)
    top.sample()
    return top.frame(width)
