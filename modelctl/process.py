"""Processes: start detached in their own session, know them by pid + create_time, stop whole groups."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Mapping, Sequence

import psutil

# create_time is rounded differently by different readers; within this it is the same process
_CREATE_TIME_SLACK = 0.05


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as modelctl knows it: a pid alone can be reused, pid + create_time cannot."""

    pid: int
    create_time: float

    @property
    def pgid(self) -> int:
        return self.pid  # servers are session (and group) leaders: start_new_session=True


def identity_of(pid: int) -> ProcessIdentity | None:
    try:
        return ProcessIdentity(pid, psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def is_alive(ident: ProcessIdentity | None) -> bool:
    """True if this very process (not a reuse of its pid) is alive and not a zombie."""
    if ident is None:
        return False
    try:
        proc = psutil.Process(ident.pid)
        if abs(proc.create_time() - ident.create_time) > _CREATE_TIME_SLACK:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def spawn_detached(
    argv: Sequence[str], env: Mapping[str, str], log_path: os.PathLike | str | None, cwd: str | None = None
) -> tuple[subprocess.Popen, ProcessIdentity]:
    """Start argv in a new session with stdout and stderr appended to log_path (0600).

    With no log_path the output goes where ours goes (the journal, under systemd).
    """
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if log_path is not None else None
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT if fd is not None else None,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        if fd is not None:
            os.close(fd)
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:  # exited (and is a zombie we have not reaped yet) — still ours
        created = time.time()
    return proc, ProcessIdentity(proc.pid, created)


def group_members(ident: ProcessIdentity) -> list[psutil.Process]:
    """Live processes of the server's process group, plus descendants that left it.

    Members that outlived the leader (vLLM workers after a SIGKILL of the parent) are still found
    by pgid; only processes created after the leader count, so a reused pgid is never taken.
    """
    members: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == ident.pgid and proc.create_time() >= ident.create_time - _CREATE_TIME_SLACK:
                members[proc.pid] = proc
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied, PermissionError):
            continue
    if is_alive(ident):
        try:
            for child in psutil.Process(ident.pid).children(recursive=True):
                members.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
    alive = []
    for proc in members.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.NoSuchProcess:
            continue
    return alive


def group_rss(ident: ProcessIdentity) -> int:
    total = 0
    for proc in group_members(ident):
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def _signal_members(ident: ProcessIdentity, members: list[psutil.Process], sig: int) -> None:
    try:
        os.killpg(ident.pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for proc in members:  # descendants that moved to another group
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def stop_process_group(ident: ProcessIdentity, timeout: float, poll: float = 0.05) -> str:
    """SIGTERM the group, wait up to `timeout`, SIGKILL what is left; return when none is alive.

    Returns how it ended: "terminated", "killed" or "not running". A pid whose create_time
    differs (reused) is never signalled.
    """
    members = group_members(ident)
    if not members:
        return "not running"
    _signal_members(ident, members, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        members = group_members(ident)
        if not members:
            return "terminated"
        time.sleep(poll)
    for _ in range(100):
        members = group_members(ident)
        if not members:
            return "killed"
        _signal_members(ident, members, signal.SIGKILL)
        time.sleep(poll)
    raise RuntimeError(f"processes of group {ident.pgid} survived SIGKILL: {[p.pid for p in members]}")


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited (status unknown: not a child of this supervisor)"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def describe_process(pid: int) -> str:
    """'pid 123 (nginx: master process)' for messages."""
    try:
        proc = psutil.Process(pid)
        cmd = " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {pid}"
    if len(cmd) > 80:
        cmd = cmd[:77] + "..."
    return f"pid {pid} ({cmd})"
