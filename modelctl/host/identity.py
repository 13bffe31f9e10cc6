"""A process as modelctl knows it: pid + create_time (a pid alone can be reused, the pair cannot)."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

from modelctl.sanitize import one_line

# create_time is rounded differently by different readers; within this it is the same process
CREATE_TIME_SLACK = 0.05


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as modelctl knows it: a pid alone can be reused, pid + create_time cannot."""

    pid: int
    create_time: float

    def as_pair(self) -> list[float]:
        return [self.pid, self.create_time]


def identity_of(pid: int) -> ProcessIdentity | None:
    try:
        return ProcessIdentity(pid, psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def same_process(proc: psutil.Process, create_time: float) -> bool:
    return abs(proc.create_time() - create_time) <= CREATE_TIME_SLACK


def is_alive(ident: ProcessIdentity | None) -> bool:
    """True if this very process (not a reuse of its pid) is alive and not a zombie."""
    if ident is None:
        return False
    try:
        proc = psutil.Process(ident.pid)
        return same_process(proc, ident.create_time) and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def describe_process(pid: int) -> str:
    """'pid 123 (nginx: master process)' for messages."""
    try:
        proc = psutil.Process(pid)
        cmd = " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {pid}"
    if len(cmd) > 80:
        cmd = cmd[:77] + "..."
    return f"pid {pid} ({one_line(cmd)})"
