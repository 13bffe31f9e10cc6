"""The supervisor as a daemon: one per state directory, started detached by any command that needs it.

- Singleton: a flock on the state directory itself (an inode that cannot be deleted or
  replaced under its holder, unlike a lock file). A second supervisor gives up at once.
- Heartbeat: the supervisor touches supervisor.json at least once a second; `status` reports
  one whose heartbeat is old as not responding (stopped with SIGSTOP, hung).
- The loop is modelctl/supervisor/runner.py; this module is its exit policy: exit once nothing is left to
  supervise (confirmed under the state lock, and a lock held by another command only postpones
  it), write the metrics file, reopen supervisor.log on SIGHUP.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path

from modelctl.errors import ModelctlError
from modelctl.host import logfiles
from modelctl.host.files import LockTimeout, acquire_flock, write_atomic
from modelctl.host.identity import identity_of
from modelctl.observe.rows import StatusRow, status_rows
from modelctl.spec import LogSpec
from modelctl.state.store import AnyRecord, StateStore
from modelctl.supervisor.client import info_path
from modelctl.supervisor.core import Supervisor
from modelctl.supervisor.runner import Runner

log = logging.getLogger("modelctl.supervisor.daemon")

SUPERVISOR_LOG = LogSpec(max_bytes=10 * 1024 * 1024, keep=2)
IDLE_CHECK_LOCK_SECONDS = 1.0


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
            os.utime(info_path(self.store))

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(info_path(self.store))
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


class DaemonPolicy:
    """The daemon's exit policy: run until nothing is left to supervise (or for good, `--stay`)."""

    def __init__(self, sup: Supervisor, lock: SupervisorLock, exit_when_idle: bool, log_file: Path | None = None):
        self.sup, self.store, self.lock = sup, sup.store, lock
        self.exit_when_idle = exit_when_idle
        self.log_file = log_file

    def after_tick(self, runner: Runner) -> int | None:
        self.lock.heartbeat()
        if self.exit_when_idle and self.idle():
            log.info("nothing left to supervise; exiting")
            return 0
        return None

    def idle(self) -> bool:
        """Nothing wanted: first from what is in memory, then confirmed from disk under the lock.

        A lock another command holds for long only postpones the exit: it never ends the loop.
        """
        if self.sup.wants_to_run():
            return False
        try:
            with self.store.locked(timeout=IDLE_CHECK_LOCK_SECONDS):
                self.sup.tick(rescan=True, sweep=True)
                return not self.sup.wants_to_run()
        except LockTimeout as e:
            log.info("%s; deciding whether to exit later", e)
            return False

    def on_stop_signal(self, runner: Runner, signum: int) -> int:
        log.info("supervisor stopping on signal; servers keep running")
        return 0

    def chores(self, runner: Runner) -> None:
        try:
            self.write_metrics()
        except Exception:
            log.exception("writing metrics.prom failed")
        with contextlib.suppress(OSError):
            logfiles.rotate_if_needed(self.store.root / "supervisor.log", SUPERVISOR_LOG)

    def write_metrics(self) -> None:
        """The textfile-collector file: written whole and renamed, so a reader never sees half."""
        from modelctl.observe.metrics import exposition

        write_atomic(self.store.root / "metrics.prom", exposition(self.rows).decode(), mode=0o644)

    def rows(self) -> list[StatusRow]:
        """Every server's row: the records as the supervisor last read them, the others from disk."""
        cached = {ref: slot.rec for ref, slot in self.sup.slots.items() if slot.rec is not None}
        records: list[AnyRecord] = []
        for ref in self.store.refs():
            rec = cached.get(ref) or self.store.load(ref)
            if rec is not None:
                records.append(rec)
        return status_rows(self.store, records, supervisor_pid=os.getpid())

    def reopen_log(self) -> None:
        if self.log_file is None:
            return
        fd = logfiles.open_for_append(self.log_file)
        try:
            os.dup2(fd, 1)
            os.dup2(fd, 2)
        finally:
            os.close(fd)
        log.info("log reopened: %s", self.log_file)


def serve(store: StateStore, exit_when_idle: bool = True, metrics_port: int | None = None, log_file: Path | None = None) -> int:
    """Be this state directory's supervisor until idle (or until told to stop); 0 if another one runs."""
    lock = SupervisorLock(store)
    sup = Supervisor(store)
    policy = DaemonPolicy(sup, lock, exit_when_idle, log_file)
    runner = Runner(sup, policy)
    # handlers first: a command wakes us (SIGUSR1) as soon as supervisor.json appears, and
    # SIGUSR1's default action would end us
    runner.install_handlers()
    if not lock.acquire():
        log.info("another supervisor is running for %s", store.root)
        return 0
    try:
        if metrics_port is not None:
            from prometheus_client import start_http_server

            from modelctl.observe.metrics import registry_for

            start_http_server(metrics_port or 0, addr="127.0.0.1", registry=registry_for(policy.rows))
            log.info("metrics on http://127.0.0.1:%s/metrics", metrics_port)
        log.info("supervisor pid %s watching %s", os.getpid(), store.root)
        return runner.run()
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    """`python -m modelctl.supervisor.daemon --state-dir DIR`: what `up` starts (`modelctl supervise` in the foreground)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m modelctl.supervisor.daemon")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--stay", action="store_true", help="keep running when no server is wanted")
    parser.add_argument("--log-file", default=None, help="the log our stderr goes to, reopened on SIGHUP (relative: in the state dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    store = StateStore(args.state_dir)
    log_file = store.root / args.log_file if args.log_file else None
    try:
        return serve(store, exit_when_idle=not args.stay, log_file=log_file)
    except ModelctlError as e:
        log.error("%s", e)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
