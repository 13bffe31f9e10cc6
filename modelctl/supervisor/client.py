"""The commands' side of the supervisor: is one running for this state directory, start one,
wake it. The supervisor itself (its lock, its loop) is modelctl/supervisor/daemon.py and modelctl/supervisor/runner.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
from dataclasses import dataclass

import psutil

from modelctl.errors import ModelctlError
from modelctl.failures import Exit
from modelctl.host import logfiles
from modelctl.host.files import DiskError, is_disk_error
from modelctl.host.identity import ProcessIdentity, is_alive
from modelctl.host.process import spawn_detached
from modelctl.state.store import StateStore

HEARTBEAT_STALE_SECONDS = 5.0  # the supervisor's heartbeat moves at least once a second


@dataclass(frozen=True)
class SupervisorInfo:
    pid: int | None  # None: running, but its identity is not written yet
    create_time: float | None
    heartbeat_age: float | None

    @property
    def responding(self) -> bool:
        return self.heartbeat_age is not None and self.heartbeat_age < HEARTBEAT_STALE_SECONDS

    @property
    def ident(self) -> ProcessIdentity | None:
        if self.pid is None or self.create_time is None:
            return None
        return ProcessIdentity(self.pid, self.create_time)


def info_path(store: StateStore) -> str:
    return str(store.root / "supervisor.json")


def supervisor_info(store: StateStore) -> SupervisorInfo | None:
    """The running supervisor of this state directory, or None if none holds the lock."""
    try:
        fd = os.open(store.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            # shared and non-blocking: it fails only while a supervisor holds the exclusive lock
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
    finally:
        os.close(fd)
    try:
        with open(info_path(store)) as f:
            st = os.fstat(f.fileno())
            data = json.loads(f.read())
        return SupervisorInfo(int(data["pid"]), float(data["create_time"]), max(0.0, time.time() - st.st_mtime))
    except (OSError, ValueError, KeyError, TypeError):
        return SupervisorInfo(None, None, None)


def start_supervisor(store: StateStore) -> int:
    """Start a detached supervisor for this state directory (it exits at once if one runs)."""
    store.ensure()
    # straight to the daemon: the supervisor needs neither typer nor rich
    argv = [sys.executable, "-m", "modelctl.supervisor.daemon", "--state-dir", str(store.root), "--log-file", "supervisor.log"]
    log_path = store.root / "supervisor.log"
    try:
        fd = logfiles.open_for_append(log_path)
    except OSError as e:
        if is_disk_error(e):
            raise DiskError(log_path, e) from None
        raise ModelctlError(
            f"cannot open the supervisor's log {log_path}: {e.strerror or e} (modelctl never writes through a "
            "symlink or into a file others may write); remove it and run the command again"
        ) from None
    try:
        popen, ident = spawn_detached(argv, dict(os.environ), fd)
    finally:
        os.close(fd)
    # wait until it holds the lock (or lost the race to another one), so callers that check
    # right after this do not start yet another
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and popen.poll() is None and supervisor_info(store) is None:
        time.sleep(0.02)
    if popen.poll() not in (None, 0) and supervisor_info(store) is None:
        tail = logfiles.tail(log_path, 10)
        raise ModelctlError(f"the supervisor exited at once ({Exit.of(popen.returncode).describe()}); {log_path}:\n" + "\n".join(tail))
    info = supervisor_info(store)
    return (info.pid if info and info.pid else None) or ident.pid


def ensure_supervisor(store: StateStore) -> int:
    info = supervisor_info(store)
    if info is not None and info.ident is not None and not is_alive(info.ident):
        # killed: its leader is a zombie while its other threads still hold the lock for a moment
        deadline = time.monotonic() + 2.0
        while info is not None and time.monotonic() < deadline:
            time.sleep(0.01)
            info = supervisor_info(store)
    if info is None:
        return start_supervisor(store)
    return info.pid or -1


def signal_supervisor(store: StateStore, sig: int) -> int | None:
    """Send `sig` to this state directory's supervisor, after checking it is that very process."""
    info = supervisor_info(store)
    if info is None or info.ident is None or not is_alive(info.ident):
        return None
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        psutil.Process(info.ident.pid).send_signal(sig)  # psutil refuses a reused pid
        return info.ident.pid
    return None


def wake_supervisor(store: StateStore) -> None:
    signal_supervisor(store, signal.SIGUSR1)
