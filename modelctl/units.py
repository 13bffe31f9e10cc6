"""Units for people: bytes, durations and startup phases as text (no I/O, no rich)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

STARTUP_PHASES = ("port_open", "healthy", "prepare")


def format_bytes(n: float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_duration(seconds: float | None, precise: bool = False) -> str:
    if seconds is None:
        return "-"
    if precise and seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{(whole % 3600) // 60:02d}m"
    return f"{whole // 86400}d{(whole % 86400) // 3600:02d}h"


def format_startup(startup: Mapping[str, Any]) -> str:
    """`12.3s = port open 8.0s + healthy 4.1s + prepare 0.2s`."""
    parts = [f"{phase.replace('_', ' ')} {float(startup[phase]):.1f}s" for phase in STARTUP_PHASES if phase in startup]
    total = startup.get("total")
    return (f"{float(total):.1f}s = " if total is not None else "") + " + ".join(parts)
