"""The one supervisor loop, for the detached daemon and for `modelctl run` alike.

Read it as its own description (gunicorn's arbiter is the model): each iteration handles the
signals that arrived (queued by the handler, handled here by `handle_<signal>`), ticks the
supervisor, asks the exit policy whether to end, does the chores when they are due, and sleeps
until the next event: a signal, a finished job, an adopted process's exit (its pidfd), or the
next timer. Every iteration runs under a final guard that logs and carries on: nothing a server
or a disk does ends the loop. The two uses differ only in their `ExitPolicy`: the daemon exits
when nothing is left to supervise; `modelctl run` notifies systemd and exits when its server does.

SIGHUP re-reads every record now and reopens the supervisor's log file (after logrotate moved
it); SIGUSR1 (a command changed a record) looks at the records again; SIGCHLD reaps. The loop
also wakes when a client connects to an idle on-demand server (its held socket turns readable)
and when an instance says READY=1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from modelctl.host.process import set_child_subreaper
from modelctl.supervisor.chores import Chores
from modelctl.supervisor.core import Supervisor

log = logging.getLogger("modelctl.supervisor.runner")

MAX_SLEEP = 1.0  # the heartbeat moves at least this often
CHORES_SECONDS = 5.0
RESCAN_SECONDS = 2.0  # records are listed again this often even without a SIGUSR1
SWEEP_SECONDS = 15.0  # every record is reconciled this often, due or not: a safety net
GUARD_PAUSE = 0.5  # after an iteration failed: not a busy loop


class ExitPolicy(Protocol):
    """What differs between the daemon and `modelctl run`."""

    def after_tick(self, runner: Runner) -> int | None:
        """An exit status to end the loop with, or None to go on."""

    def on_stop_signal(self, runner: Runner, signum: int) -> int:
        """SIGTERM or SIGINT arrived: do what must be done, return the exit status."""

    def chores(self, runner: Runner) -> None:
        """The policy's own periodic work (the daemon's metrics file)."""

    def reopen_log(self) -> None:
        """SIGHUP: reopen the log file, where there is one."""


class Runner:
    def __init__(self, supervisor: Supervisor, policy: ExitPolicy):
        self.sup = supervisor
        self.policy = policy
        self.chores = Chores(supervisor)
        self.signals: list[int] = []
        self.handlers: dict[int, Callable[[], int | None]] = {
            signal.SIGTERM: lambda: self.policy.on_stop_signal(self, signal.SIGTERM),
            signal.SIGINT: lambda: self.policy.on_stop_signal(self, signal.SIGINT),
            signal.SIGHUP: self.handle_hup,
            signal.SIGUSR1: self.handle_usr1,
            signal.SIGCHLD: self.handle_chld,
        }
        self.wake_r: int | None = None
        self.wake_w: int | None = None
        self.rescan = True
        self.sweep = True
        self.next_chores = 0.0
        self.next_rescan = 0.0
        self.next_sweep = 0.0

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        self._setup()
        try:
            while True:
                code = self._guarded_iteration()
                if code is not None:
                    return code
        finally:
            self._teardown()

    def _guarded_iteration(self) -> int | None:
        try:
            return self.iteration()
        except Exception:
            log.exception("supervisor loop: an iteration failed; carrying on")
            time.sleep(GUARD_PAUSE)
            return None

    def iteration(self) -> int | None:
        code = self.handle_signals()
        if code is not None:
            return code
        now = time.monotonic()
        rescan = self.rescan or now >= self.next_rescan
        sweep = self.sweep or now >= self.next_sweep
        self.rescan = self.sweep = False
        if rescan:
            self.next_rescan = now + RESCAN_SECONDS
        if sweep:
            self.next_sweep = now + SWEEP_SECONDS
        self.sup.tick(rescan=rescan, sweep=sweep)
        code = self.policy.after_tick(self)
        if code is not None:
            return code
        if now >= self.next_chores:
            self.next_chores = now + CHORES_SECONDS
            self.chores.run()
            self.policy.chores(self)
        self.sleep()
        return None

    # ------------------------------------------------------------------ signals
    def handle_signals(self) -> int | None:
        received, self.signals = self.signals, []
        for signum in dict.fromkeys(received):  # each once, in the order they came
            code = self.handlers[signum]()
            if code is not None:
                return code
        return None

    def handle_hup(self) -> None:
        log.info("SIGHUP: reopening the log and reading every record again")
        self.policy.reopen_log()
        for slot in self.sup.slots.values():
            slot.rec = slot.stamp = slot.saved = None
            slot.spec = None
        self.rescan = self.sweep = True

    def handle_usr1(self) -> None:
        self.rescan = True

    def handle_chld(self) -> None:
        self.chores.reap_orphans()
        self.sup.mark_dirty()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.signals.append(signum)  # handled in the loop, never here

    # ------------------------------------------------------------------ sleeping
    def wake(self) -> None:
        if self.wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self.wake_w, b"!")

    def sleep(self) -> None:
        if self.signals:
            return
        timeout = MAX_SLEEP
        due = self.sup.next_due()
        if due != float("inf"):
            timeout = min(timeout, max(0.0, due - self.sup.clock()))
        pidfds, notify_fds, watch_fds = self.sup.pidfds(), self.sup.notify_fds(), self.sup.watch_fds()
        waiting = [*([self.wake_r] if self.wake_r is not None else []), *pidfds, *notify_fds, *watch_fds]
        try:
            readable, _, _ = select.select(waiting, [], [], timeout)
        except InterruptedError:
            readable = []
        except OSError:  # an fd closed under us by a finishing stop: look again next time
            readable = []
        ready = set(readable)
        if exited := ready & set(pidfds):
            self.sup.mark_dirty(exited)
        if said := ready & set(notify_fds):
            self.sup.on_notify(said)
        if clients := ready & set(watch_fds):
            self.sup.on_pending(clients)
        if self.wake_r is not None:
            with contextlib.suppress(BlockingIOError, OSError):
                while os.read(self.wake_r, 512):
                    pass

    # ------------------------------------------------------------------ set-up
    def install_handlers(self) -> None:
        """Queue our signals from now on (idempotent); the loop handles them."""
        for sig in self.handlers:
            signal.signal(sig, self._on_signal)

    def _setup(self) -> None:
        self.install_handlers()
        if not set_child_subreaper():
            log.warning("cannot become a child subreaper: daemons that escape their server are not tracked")
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.wake_w)
        self.sup.on_wake = self.wake

    def _teardown(self) -> None:
        signal.set_wakeup_fd(-1)
        for fd in (self.wake_r, self.wake_w):
            if fd is not None:
                os.close(fd)
        self.wake_r = self.wake_w = None
        self.sup.on_wake = lambda: None
        self.sup.shutdown()
