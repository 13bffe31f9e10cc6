"""The commands that watch servers from outside: `metrics` (Prometheus text) and `top` (a live
view). Each registers itself on the app (modelctl/cli/app.py)."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from modelctl.cli.app import ProfileScope, app, console, controller, scope


@app.command()
def metrics(profile: Optional[str] = ProfileScope) -> None:
    """The supervisor's view as Prometheus metrics (also in STATE/metrics.prom while it runs)."""
    from modelctl.observe.metrics import exposition

    ctl = controller()
    which = scope(profile, None)
    sys.stdout.write(exposition(lambda: ctl.status(which)).decode())


@app.command()
def top(
    profile: Optional[str] = ProfileScope,
    interval: float = typer.Option(2.0, "--interval", metavar="SECONDS", help="Seconds between frames."),
    once: bool = typer.Option(False, "--once", help="Print one frame (rates over --interval) and exit."),
    wide: bool = typer.Option(False, "--wide", help="Every column, however wide (a pipe or a file always gets every column)."),
) -> None:
    """A live view of every server: state, memory, GPU memory, request rate and latency (q quits)."""
    from modelctl.cli import top as top_view

    ctl = controller()
    which = scope(profile, None)
    if once:
        console.print(top_view.once(ctl, which, interval, console.width if console.is_terminal and not wide else None))
        return
    try:
        top_view.run(ctl, which, interval, console, wide)
    except KeyboardInterrupt:
        pass
