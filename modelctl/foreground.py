"""`modelctl run SERVER`: one server in the foreground, for systemd (Type=notify).

The same reconcile logic as the supervisor, for one server whose record says `managed_by:
systemd`: prepare and start it, send READY=1 once its health probe passes, and exit when it
exits (systemd restarts it: Restart=on-failure). SIGTERM stops the whole process group through
the same stop path as `down`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
from typing import Any

from modelctl import lifecycle as lc
from modelctl.control import SYSTEMD, Controller, select_specs
from modelctl.errors import ModelctlError
from modelctl.names import unit_name
from modelctl.process import is_alive, set_child_subreaper
from modelctl.profile import Profile
from modelctl.state import ServerRecord, StateStore
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
    existing = store.load(spec.ref)
    if isinstance(existing, ServerRecord) and is_alive(record_identity(existing)):
        if existing.managed_by != SYSTEMD:
            raise ModelctlError(f"server {existing.label} is running under the modelctl supervisor; `modelctl down {existing.label}` first")
        stop_servers(store, [existing])  # left over from an earlier run
    with store.locked():
        _, records = ctl.plan_up(profile, [spec], managed_by=SYSTEMD, force=True)
        rec = records[0]
        if rec.state != lc.STOPPED:
            lc.force(rec, lc.STOPPED, "modelctl run starts the server afresh")
        rec.pid = rec.create_time = rec.started_at = rec.ready_at = None
        rec.info = {**rec.info, "systemd_unit": unit_name(profile.name, name)}
        store.save(rec)

    set_child_subreaper()
    notifier = Notifier(os.environ.get("NOTIFY_SOCKET"))
    stop_requested: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        stop_requested.append(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    supervisor = Supervisor(store, managed_by=SYSTEMD, only={spec.ref}, log_to_files=False)
    notifier.send(f"STATUS=starting {spec.ref}")
    notified = False
    try:
        while True:
            if stop_requested:
                notifier.send(f"STOPPING=1\nSTATUS=stopping {spec.ref}")
                current = store.load(spec.ref)
                if isinstance(current, ServerRecord):
                    stop_servers(store, [current])
                return 0
            supervisor.tick()
            current = store.load(spec.ref)
            if not isinstance(current, ServerRecord):
                return 1
            if current.state == lc.READY and not notified:
                notifier.send(f"READY=1\nSTATUS=ready at {current.url}")
                log.info("%s: ready at %s", current.label, current.url)
                notified = True
            if current.state in (lc.BACKOFF, lc.FAILED) or current.desired != "running":
                why = current.last_error or current.last_exit or current.detail or current.state
                log.error("%s: %s; exiting for systemd to restart it", current.label, why)
                notifier.send(f"STATUS=exited: {why}")
                store.update(spec.ref, _at_rest)
                return _exit_status(current)
            time.sleep(poll)
    finally:
        supervisor.executor.shutdown(wait=False)


def _at_rest(rec: ServerRecord) -> None:
    rec.desired = "stopped"
    if rec.state == lc.BACKOFF:
        lc.move(rec, lc.STOPPED, expect=lc.BACKOFF)
        rec.next_start_at = None


def _exit_status(rec: ServerRecord) -> int:
    exit_text = rec.last_exit or ""
    if exit_text.startswith("exit code "):
        code = int(exit_text.split()[-1])
        return code if code > 0 else 1
    return 1
