"""`modelctl run SERVER`: one server in the foreground, for systemd (Type=notify).

The same reconcile logic as the supervisor, for one server whose record says `managed_by:
systemd`: prepare and start it, send READY=1 once its health probe passes, and exit when it
exits (systemd restarts it: Restart=on-failure). SIGTERM stops the whole process group.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time

from modelctl import lifecycle as lc
from modelctl.control import Controller, record_identity, select_specs
from modelctl.errors import ModelctlError
from modelctl.process import is_alive, stop_process_group
from modelctl.profile import Profile
from modelctl.state import ServerRecord, StateStore
from modelctl.supervisor import Supervisor

log = logging.getLogger("modelctl.run")

MANAGED_BY = "systemd"


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


def unit_name(profile_name: str, server: str) -> str:
    return f"modelctl-{profile_name}-{server}.service"


def run_foreground(
    store: StateStore, profile: Profile, name: str, port: int | None = None, gpus: list[int] | None = None, poll: float = 0.05
) -> int:
    """Run one server until it exits or we are told to stop; returns the exit status for systemd."""
    spec = select_specs(profile, [name])[0]
    if port is not None:
        spec = dataclasses.replace(spec, port=port)
    if gpus is not None:
        spec = dataclasses.replace(spec, gpus=tuple(gpus))
    ctl = Controller(store)
    existing = store.load(name)
    if existing is not None and is_alive(record_identity(existing)):
        if existing.managed_by != MANAGED_BY:
            raise ModelctlError(f"server '{name}' is running under the modelctl supervisor; `modelctl down {name}` first")
        stop_process_group(record_identity(existing), spec.stop_timeout)  # left over from an earlier run
    with store.locked():
        _, records = ctl.plan_up(profile, [spec], managed_by=MANAGED_BY, force=True)
        rec = records[0]
        rec.desired, rec.state = "running", lc.STOPPED
        rec.pid = rec.create_time = rec.started_at = rec.ready_at = None
        rec.info = {**rec.info, "systemd_unit": unit_name(profile.name, name)}
        store.save(rec)

    notifier = Notifier(os.environ.get("NOTIFY_SOCKET"))
    stop_requested: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop_requested.append(signum))
    supervisor = Supervisor(store, managed_by=MANAGED_BY, only={name}, log_to_files=False)
    notifier.send(f"STATUS=starting {name}")
    notified = False
    try:
        while True:
            if stop_requested:
                notifier.send(f"STOPPING=1\nSTATUS=stopping {name}")
                _stop(store, name, spec.stop_timeout)
                return 0
            supervisor.tick()
            rec = store.load(name)
            if rec is None:
                return 1
            if rec.state == lc.READY and not notified:
                notifier.send(f"READY=1\nSTATUS=ready at {rec.url}")
                log.info("%s: ready at %s", name, rec.url)
                notified = True
            if rec.state in (lc.BACKOFF, lc.FAILED) or rec.desired != "running":
                why = rec.last_error or rec.last_exit or rec.detail or rec.state
                log.error("%s: %s; exiting for systemd to restart it", name, why)
                notifier.send(f"STATUS=exited: {why}")
                _finish(store, name)
                return _exit_status(rec)
            time.sleep(poll)
    finally:
        supervisor.executor.shutdown(wait=False)


def _exit_status(rec: ServerRecord) -> int:
    exit_text = rec.last_exit or ""
    if exit_text.startswith("exit code "):
        code = int(exit_text.split()[-1])
        return code if code > 0 else 1
    return 1


def _finish(store: StateStore, name: str) -> None:
    def mark(r: ServerRecord) -> None:
        r.desired = "stopped"
        if r.state != lc.STOPPED:
            r.move(lc.STOPPING if r.state in lc.RUNNING else lc.STOPPED)
            if r.state == lc.STOPPING:
                r.move(lc.STOPPED)

    store.update(name, mark)


def _stop(store: StateStore, name: str, timeout: float) -> None:
    def mark(r: ServerRecord) -> None:
        r.desired = "stopped"
        if r.state in lc.RUNNING and r.state != lc.STOPPING:
            r.move(lc.STOPPING)

    rec = store.update(name, mark)
    ident = record_identity(rec) if rec else None
    if ident is not None:
        stop_process_group(ident, timeout)
    _finish(store, name)
