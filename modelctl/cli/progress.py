"""Progress while a command waits: the live table of `up` and `restart` (state, seconds, what is
happening, a download's bar), plain timed lines when the output is not a terminal, and the
waiting line of a `down` that takes more than a second."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from modelctl.cli.format import styled_state
from modelctl.state import lifecycle as lc
from modelctl.state.record import ServerRecord
from modelctl.units import format_bytes, format_duration

T = TypeVar("T")


# the supervisor's words for what a start waits on, as a person reads them
PLAIN_WORDS = {
    "the socket is held; waiting for the server's READY=1": "loading; clients that connect wait for it",
    "waiting for health": "waiting for its health probe",
}


def without_state(state: str, detail: str) -> str:
    """A detail that begins by repeating the state (`starting: the socket is held...`) without it,
    in plain words."""
    prefix = f"{state}: "
    detail = detail[len(prefix) :] if detail.startswith(prefix) else ("" if detail == state else detail)
    return PLAIN_WORDS.get(detail, detail)


def state_line(rec: ServerRecord) -> str:
    if rec.state in (lc.CRASHED, lc.FAILED):
        return rec.state  # why: said once, after the wait
    detail = without_state(rec.state, rec.detail or "")
    return f"{rec.state} ({detail})" if detail else rec.state


class WaitDisplay:
    """Live per-server progress while `up` or `restart` waits: state, elapsed seconds, what is happening."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.t0 = time.time()
        self.rates: dict[str, tuple[float, int]] = {}
        self.last_lines: dict[str, str] = {}

    def table(self, records: list[ServerRecord]) -> Table:
        from rich.progress_bar import ProgressBar

        # the name, the state and the time are never cut: only what is happening gives way
        t = Table(box=None, pad_edge=False)
        t.add_column("server", no_wrap=True, min_width=max([6, *(len(r.label) for r in records)]))
        t.add_column("state", no_wrap=True, min_width=max([5, *(len(r.state) for r in records)]))
        t.add_column("time", justify="right", no_wrap=True, min_width=6)
        t.add_column("", no_wrap=True, overflow="ellipsis")
        for rec in records:
            inst = rec.instance
            started = max(inst.started_at, self.t0) if inst is not None else self.t0
            elapsed = (inst.ready_at or 0) - started if rec.state == lc.READY and inst is not None else time.time() - started
            cell: Text | Table = Text(without_state(rec.state, rec.detail or ""), style="dim")
            if rec.progress and rec.progress.get("total"):
                total, done = int(rec.progress["total"]), int(rec.progress.get("completed") or 0)
                grid = Table.grid(padding=(0, 1))
                grid.add_row(
                    ProgressBar(total=total, completed=done, width=30),
                    Text(
                        f"{rec.progress.get('status', '')} {format_bytes(done)}/{format_bytes(total)} {self._rate(rec.label, done, total)}"
                    ),
                )
                cell = grid
            t.add_row(rec.label, styled_state(rec.state), f"{max(elapsed, 0):.1f}s", cell)
        return t

    def _rate(self, label: str, done: int, total: int) -> str:
        now = time.time()
        if label not in self.rates:
            self.rates[label] = (now, done)
            return ""
        t0, d0 = self.rates[label]
        if now - t0 < 0.5 or done <= d0:
            return ""
        rate = (done - d0) / (now - t0)
        eta = (total - done) / rate if rate > 0 else None
        return f"{format_bytes(int(rate))}/s ETA {format_duration(eta)}"

    def lines(self, records: list[ServerRecord]) -> None:
        """Plain progress lines when the output is not a terminal: one per change of a server."""
        for rec in records:
            line = f"{rec.label}: {state_line(rec)}"
            if self.last_lines.get(rec.label) != line:
                self.last_lines[rec.label] = line
                self.console.print(f"[{time.time() - self.t0:6.1f}s] {line}", highlight=False)


def wait_with_display(console: Console, wait: Callable[[Callable[[list[ServerRecord]], None]], T]) -> T:
    """Run `wait(on_update)` with a live table on a terminal, timed lines elsewhere."""
    from rich.live import Live

    display = WaitDisplay(console)
    if console.is_terminal:
        with Live(display.table([]), console=console, refresh_per_second=8, transient=True) as live:
            return wait(lambda recs: live.update(display.table(recs)))
    return wait(display.lines)


def while_waiting(console: Console, what: str, labels: Sequence[str], work: Callable[[], T], after: float = 1.0) -> T:
    """Run `work` in a thread; if it takes longer than `after` seconds, say what is being waited for
    (a live line on a terminal, one line elsewhere) until it is done. A Ctrl-C ends the wait at once."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as e:  # handed to the caller's thread
            error.append(e)

    thread = threading.Thread(target=run, daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(after)
    if thread.is_alive() and labels:
        names = ", ".join(labels)
        if console.is_terminal:
            from rich.live import Live

            with Live(console=console, refresh_per_second=4, transient=True) as live:
                while thread.is_alive():
                    live.update(Group(Text(f"{what} {names} … {time.monotonic() - t0:.0f}s", style="dim")))
                    thread.join(0.25)
        else:
            console.print(f"{what} {names} …", highlight=False)
            thread.join()
    thread.join()
    if error:
        raise error[0]
    return result[0]
