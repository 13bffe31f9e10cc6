"""A state in its colour (shared by status, up and top); bytes and durations are modelctl/units.py."""

from __future__ import annotations

from rich.text import Text

from modelctl.state import lifecycle as lc

STATE_STYLE = {
    lc.READY: "green",
    lc.STARTING: "yellow",
    lc.UNHEALTHY: "dark_orange",
    lc.BACKOFF: "dark_orange",
    lc.CRASHED: "red",
    lc.FAILED: "bold red",
    lc.STOPPING: "cyan",
    lc.STOPPED: "dim",
    "broken": "bold magenta",
}


def styled_state(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))
