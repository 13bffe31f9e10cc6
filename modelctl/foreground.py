"""`modelctl run SERVER`: one server in the foreground, for systemd (Type=notify) and Slurm jobs.

The same loop as the daemon (modelctl/runner.py), with its own exit policy, for one server
whose record says `managed_by: systemd`: prepare and start it, send READY=1 once its health
probe passes, and exit when it exits (systemd restarts it: Restart=on-failure). SIGTERM stops the
whole process group through the same stop path as `down`. Orphans that re-parent to it are
reaped like the daemon's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket

from modelctl import lifecycle as lc
from modelctl.control import Controller, select_specs
from modelctl.errors import ModelctlError
from modelctl.identity import is_alive
from modelctl.names import ServerRef, unit_name
from modelctl.profile import Profile
from modelctl.record import ServerRecord
from modelctl.runner import Runner
from modelctl.sockets import Listener, inherited_listen_fd
from modelctl.state import StateStore
from modelctl.stopping import record_identity, stop_servers
from modelctl.supervisor import Supervisor

log = logging.getLogger("modelctl.run")


class Notifier:
    """sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET, silent when it is unset."""

    def __init__(self, address: str | None):
        self.address = address
        if address and address.startswith("@"):
            self.address = "\0" + address[1:]  # the abstract namespace

    def send(self, message: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message.encode(), self.address)
            except OSError as e:
                log.warning("cannot notify systemd at %s: %s", self.address, e)


class ForegroundPolicy:
    """Exit when the one server does (systemd restarts it); READY=1 once it is ready."""

    def __init__(self, store: StateStore, ref: ServerRef, notifier: Notifier):
        self.store, self.ref, self.notifier = store, ref, notifier
        self.notified = False

    def after_tick(self, runner: Runner) -> int | None:
        slot = runner.sup.slots.get(self.ref)
        current = slot.rec if slot is not None else None
        if current is None:
            loaded = self.store.load(self.ref)
            if not isinstance(loaded, ServerRecord):
                log.error("%s: its record is gone or cannot be read; exiting", self.ref)
                return 1
            current = loaded
        if current.state == lc.READY and not self.notified:
            self.notifier.send(f"READY=1\nSTATUS=ready at {current.url}")
            log.info("%s: ready at %s", current.label, current.url)
            self.notified = True
        if current.state == lc.IDLE and current.usage.idle_stops + current.usage.evictions > 0:
            # on demand under systemd: idle again; the .socket unit starts us at the next connection
            log.info("%s: idle; exiting until systemd's socket sees the next client", current.label)
            self.notifier.send(f"STATUS=idle {current.label}")
            return 0
        if current.state in (lc.BACKOFF, lc.FAILED) or not current.wants_running:
            why = current.history.last_error or current.detail or current.state
            log.error("%s: %s; exiting for systemd to restart it", current.label, why)
            self.notifier.send(f"STATUS=exited: {why}")
            self.store.update(self.ref, lc.at_rest)
            return exit_status(current)
        return None

    def on_stop_signal(self, runner: Runner, signum: int) -> int:
        self.notifier.send(f"STOPPING=1\nSTATUS=stopping {self.ref}")
        current = self.store.load(self.ref)
        if isinstance(current, ServerRecord):
            stop_servers(self.store, [current])
        return 0

    def chores(self, runner: Runner) -> None:
        pass

    def reopen_log(self) -> None:
        pass  # the journal has our output


def exit_status(rec: ServerRecord) -> int:
    """What `modelctl run` exits with: the server's own exit code where it had one, else 1."""
    last = rec.history.last_exit
    if last is not None and last.code is not None and last.code > 0:
        return last.code
    return 1


def run_foreground(store: StateStore, profile: Profile, name: str, port: int | None = None, gpus: list[int] | None = None) -> int:
    """Run one server until it exits or we are told to stop; returns the exit status for systemd."""
    spec = select_specs(profile, [name])[0]
    if port is not None:
        spec = dataclasses.replace(spec, port=port)
    if gpus is not None:
        spec = dataclasses.replace(spec, gpus=tuple(gpus))
    ctl = Controller(store)
    handed = inherited_listen_fd()
    listener = Listener.from_fd(handed, spec.host, 0) if handed is not None else None
    if listener is not None:
        listener.port = listener.sock.getsockname()[1]
        if spec.port is None:
            spec = dataclasses.replace(spec, port=listener.port)  # the .socket unit's port
    existing = store.load(spec.ref)
    if isinstance(existing, ServerRecord) and is_alive(record_identity(existing)):
        if existing.wish.managed_by != lc.SYSTEMD:
            raise ModelctlError(f"server {existing.label} is running under the modelctl supervisor; `modelctl down {existing.label}` first")
        stop_servers(store, [existing])  # left over from an earlier run

    def finish(rec: ServerRecord) -> None:
        lc.fresh_start(rec)
        rec.info = {**rec.info, "systemd_unit": unit_name(profile.name, name)}
        if spec.start == "on-demand":
            lc.warm_wanted(rec)  # systemd started us for a client (its socket unit): start now

    ctl.write_up(profile, [spec], managed_by=lc.SYSTEMD, force=True, finish=finish, handed={spec.ref: listener.port} if listener else None)

    notifier = Notifier(os.environ.get("NOTIFY_SOCKET"))
    notifier.send(f"STATUS=starting {spec.ref}")
    supervisor = Supervisor(store, managed_by=lc.SYSTEMD, only={spec.ref}, log_to_files=False)
    if listener is not None:
        # systemd's .socket unit holds the socket across our restarts: hand it on to the server
        supervisor.listeners[spec.ref] = listener
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
        log.info("%s: serving on the socket systemd holds (port %s)", spec.ref, listener.port)
    return Runner(supervisor, ForegroundPolicy(store, spec.ref, notifier)).run()
