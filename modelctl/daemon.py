"""The supervisor as a daemon: one per state directory, started detached by any command that needs it.

- Singleton: a flock on the state directory itself (an inode that cannot be deleted or
  replaced under its holder, unlike a lock file). A second supervisor gives up at once.
- Heartbeat: the supervisor touches supervisor.json every loop; `status` reports one whose
  heartbeat is old as not responding (stopped with SIGSTOP, hung).
- Subreaper: orphaned descendants of servers (double-forking daemons) re-parent to the
  supervisor instead of init, so it reaps them and attributes them to their server.
- Signals are queued and handled in the loop, never in the handler; a finished background job
  or a command's SIGUSR1 wakes the loop at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import psutil

from modelctl import logfiles
from modelctl.errors import ModelctlError
from modelctl.process import INSTANCE_VAR, ProcessIdentity, describe_exit, identity_of, is_alive, set_child_subreaper, spawn_detached
from modelctl.spec import LogSpec
from modelctl.state import StateStore, acquire_flock, write_atomic

if TYPE_CHECKING:
    from modelctl.supervisor import Supervisor

log = logging.getLogger("modelctl.daemon")

TICK_SECONDS = 0.25
HOUSEKEEPING_SECONDS = 5.0
HEARTBEAT_STALE_SECONDS = 5.0  # twenty ticks without a heartbeat: not responding
SUPERVISOR_LOG = LogSpec(max_bytes=10 * 1024 * 1024, keep=2)


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


def _info_path(store: StateStore) -> str:
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
        with open(_info_path(store)) as f:
            st = os.fstat(f.fileno())
            data = json.loads(f.read())
        return SupervisorInfo(int(data["pid"]), float(data["create_time"]), max(0.0, time.time() - st.st_mtime))
    except (OSError, ValueError, KeyError, TypeError):
        return SupervisorInfo(None, None, None)


class SupervisorLock:
    """The singleton: an exclusive flock on the state directory, held for the supervisor's life."""

    def __init__(self, store: StateStore):
        self.store = store
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.store.ensure()
        fd = os.open(self.store.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            # a command checking for a supervisor holds a shared lock for a moment: wait that out
            acquire_flock(fd, 1.0, "the supervisor lock")
        except ModelctlError:
            os.close(fd)
            return False
        self.fd = fd
        me = identity_of(os.getpid())
        info = {"pid": os.getpid(), "create_time": me.create_time if me else None, "started_at": time.time()}
        write_atomic(self.store.root / "supervisor.json", json.dumps(info))
        return True

    def heartbeat(self) -> None:
        with contextlib.suppress(OSError):
            os.utime(_info_path(self.store))

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_info_path(self.store))
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


class Daemon:
    """Runs a Supervisor's ticks until told to stop or, with exit_when_idle, until nothing should run."""

    def __init__(self, supervisor: Supervisor, exit_when_idle: bool = True, metrics_port: int | None = None):
        self.sup = supervisor
        self.store = supervisor.store
        self.exit_when_idle = exit_when_idle
        self.metrics_port = metrics_port
        self.signals: list[int] = []
        self.wake_fd: int | None = None
        self.next_housekeeping = 0.0
        self.attributed: set[int] = set()

    def serve(self) -> int:
        # handlers first: a command wakes us (SIGUSR1) as soon as supervisor.json appears, and
        # SIGUSR1's default action would end us
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        lock = SupervisorLock(self.store)
        if not lock.acquire():
            log.info("another supervisor is running for %s", self.store.root)
            return 0
        if not set_child_subreaper():
            log.warning("cannot become a child subreaper: daemons that escape their server are not tracked")
        rfd, wfd = os.pipe()
        for fd in (rfd, wfd):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wfd)
        self.wake_fd = wfd
        self.sup.on_wake = self.wake
        if self.metrics_port is not None:
            self._serve_metrics()
        log.info("supervisor pid %s watching %s", os.getpid(), self.store.root)
        try:
            while True:
                self.sup.tick()
                lock.heartbeat()
                received, self.signals = self.signals, []
                if signal.SIGCHLD in received:
                    self.reap_orphans()
                self.housekeeping()
                if signal.SIGTERM in received or signal.SIGINT in received:
                    log.info("supervisor stopping on signal; servers keep running")
                    return 0
                if self.exit_when_idle and self._idle():
                    log.info("nothing left to supervise; exiting")
                    return 0
                self._sleep(rfd)
        finally:
            signal.set_wakeup_fd(-1)
            self.wake_fd = None
            os.close(rfd)
            os.close(wfd)
            self.sup.executor.shutdown(wait=False)
            lock.release()

    def _rows(self) -> list[dict[str, Any]]:
        from modelctl.control import Controller

        return Controller(self.store).status()

    def _serve_metrics(self) -> None:
        from prometheus_client import start_http_server

        from modelctl.metrics import registry_for

        start_http_server(self.metrics_port or 0, addr="127.0.0.1", registry=registry_for(self._rows))
        log.info("metrics on http://127.0.0.1:%s/metrics", self.metrics_port)

    def write_metrics(self) -> None:
        """The textfile-collector file: written whole and renamed, so a reader never sees half."""
        from modelctl.metrics import exposition

        write_atomic(self.store.root / "metrics.prom", exposition(self._rows).decode(), mode=0o644)

    def _sleep(self, rfd: int) -> None:
        timeout = TICK_SECONDS
        if self.sup.next_wake is not None:
            timeout = min(timeout, max(0.0, self.sup.next_wake - self.sup.clock()))
            self.sup.next_wake = None
        with contextlib.suppress(InterruptedError):
            select.select([rfd], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(rfd, 512):
                pass

    def _idle(self) -> bool:
        with self.store.locked():
            return not self.sup.wants_to_run()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # handled in the loop, never here

    def wake(self) -> None:
        if self.wake_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.wake_fd, b"!")

    def housekeeping(self) -> None:
        now = time.monotonic()
        if now < self.next_housekeeping:
            return
        self.next_housekeeping = now + HOUSEKEEPING_SECONDS
        self.reap_orphans()
        self.sup.housekeeping()
        try:
            self.write_metrics()
        except Exception:
            log.exception("writing metrics.prom failed")
        with contextlib.suppress(OSError):
            logfiles.rotate_if_needed(self.store.root / "supervisor.log", SUPERVISOR_LOG)

    def reap_orphans(self) -> None:
        """Reap exited orphans; attribute live ones to their server by the token they carry."""
        ours = {slot.handle.ident.pid for slot in self.sup.slots.values() if slot.handle is not None and slot.handle.popen is not None}
        try:
            children = psutil.Process().children()
        except psutil.NoSuchProcess:
            return
        for child in children:
            if child.pid in ours:
                continue  # our own spawned servers are reaped through their Popen
            try:
                if child.status() == psutil.STATUS_ZOMBIE:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(child.pid, os.WNOHANG)
                    continue
                token = child.environ().get(INSTANCE_VAR)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            if child.pid in self.attributed:
                continue
            self.attributed.add(child.pid)
            ref = self.sup.adopt_orphan(child.pid, token)
            if ref is not None:
                log.info("%s: pid %s left its server's process tree; tracked as the server's", ref, child.pid)
            else:
                log.warning("pid %s re-parented to the supervisor but carries no server's token; left alone", child.pid)


# ---------------------------------------------------------------------- starting one
def start_supervisor(store: StateStore) -> int:
    """Start a detached supervisor for this state directory (it exits at once if one runs)."""
    store.ensure()
    # straight to the daemon: the supervisor needs neither typer nor rich
    argv = [sys.executable, "-m", "modelctl.daemon", "--state-dir", str(store.root)]
    log_path = store.root / "supervisor.log"
    try:
        fd = logfiles.open_for_append(log_path)
    except OSError as e:
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
        raise ModelctlError(f"the supervisor exited at once ({describe_exit(popen.returncode)}); {log_path}:\n" + "\n".join(tail))
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


def main(argv: list[str] | None = None) -> int:
    """`python -m modelctl.daemon --state-dir DIR`: what `up` starts (`modelctl supervise` in the foreground)."""
    import argparse

    from modelctl.supervisor import Supervisor

    parser = argparse.ArgumentParser(prog="python -m modelctl.daemon")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--stay", action="store_true", help="keep running when no server is wanted")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return Daemon(Supervisor(StateStore(args.state_dir)), exit_when_idle=not args.stay).serve()
    except ModelctlError as e:
        log.error("%s", e)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
