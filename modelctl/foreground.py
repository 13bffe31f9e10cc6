"""`modelctl run SERVER`: one server in the foreground, for systemd (Type=notify) and Slurm jobs.

The same loop as the daemon (modelctl/supervisor/runner.py), with its own exit policy, for one server
whose record says `managed_by: systemd`: prepare and start it, send READY=1 once its health
probe passes, and exit when it exits (systemd restarts it: Restart=on-failure). SIGTERM stops the
whole process group through the same stop path as `down`. Orphans that re-parent to it are
reaped like the daemon's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from modelctl.control import Controller, select_specs
from modelctl.errors import ModelctlError
from modelctl.host.files import write_atomic
from modelctl.host.identity import is_alive
from modelctl.host.sockets import Listener, inherited_listen_fd
from modelctl.names import ServerRef, unit_name
from modelctl.profile import Profile, parse_server
from modelctl.spec import ServerSpec
from modelctl.state import lifecycle as lc
from modelctl.state.record import ServerRecord
from modelctl.state.store import StateStore
from modelctl.supervisor.core import Supervisor
from modelctl.supervisor.runner import Runner
from modelctl.supervisor.stopping import stop_servers

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


class Reporter:
    """Where the server landed, as JSON in a file the submitting machine can read (a Slurm job's
    --report on the shared filesystem): job, node, port, URL and state, rewritten when they change."""

    def __init__(self, path: Path | None):
        self.path = path
        self.last: dict[str, Any] | None = None
        self.node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()

    def report(self, rec: ServerRecord, state: str | None = None) -> None:
        if self.path is None:
            return
        host = rec.host if rec.host not in ("0.0.0.0", "::", "") else self.node
        url = f"http://{host}:{rec.port}" if rec.port else ""
        facts = {
            "server": rec.label,
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "node": self.node,
            "host": rec.host,
            "port": rec.port,
            "url": url,
            "state": state or rec.state,
            "pid": rec.pid,
            "restarts": rec.history.restarts,
            "last_error": rec.history.last_error,
            "last_exit": rec.history.last_exit.describe() if rec.history.last_exit is not None else None,
            "last_line": rec.history.exits[-1].line if rec.history.exits else None,  # what it printed last
        }
        if facts == self.last:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps({**facts, "updated": time.time()}, indent=1) + "\n", mode=0o644)
            self.last = facts
        except OSError as e:
            log.warning("cannot write the report %s: %s", self.path, e)


class ForegroundPolicy:
    """Exit when the one server does (systemd restarts it); READY=1 once it is ready.

    With restart_in_place (a Slurm job: nobody outside restarts it), the supervisor's restart
    policy brings a crashed server back on the same port, and we exit only when it gives up.
    """

    def __init__(
        self, store: StateStore, ref: ServerRef, notifier: Notifier, restart_in_place: bool = False, reporter: Reporter | None = None
    ):
        self.store, self.ref, self.notifier = store, ref, notifier
        self.restart_in_place = restart_in_place
        self.reporter = reporter or Reporter(None)
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
        self.reporter.report(current)
        if current.state == lc.READY and not self.notified:
            self.notifier.send(f"READY=1\nSTATUS=ready at {current.url}")
            log.info("%s: ready at %s", current.label, current.url)
            self.notified = True
        if current.state == lc.IDLE and current.usage.idle_stops + current.usage.evictions > 0:
            # on demand under systemd: idle again; the .socket unit starts us at the next connection
            log.info("%s: idle; exiting until systemd's socket sees the next client", current.label)
            self.notifier.send(f"STATUS=idle {current.label}")
            return 0
        if current.state == lc.BACKOFF and self.restart_in_place and current.wants_running:
            self.notified = False  # READY=1 again once the restarted instance is ready
            return None
        if current.state in (lc.BACKOFF, lc.FAILED) or not current.wants_running:
            why = current.history.last_error or current.detail or current.state
            log.error("%s: %s; exiting%s", current.label, why, "" if self.restart_in_place else " for systemd to restart it")
            self.notifier.send(f"STATUS=exited: {why}")
            self.store.update(self.ref, lc.at_rest)
            self.reporter.report(current, lc.FAILED if current.state in (lc.BACKOFF, lc.FAILED) else lc.STOPPED)
            return exit_status(current)
        return None

    def on_stop_signal(self, runner: Runner, signum: int) -> int:
        self.notifier.send(f"STOPPING=1\nSTATUS=stopping {self.ref}")
        current = self.store.load(self.ref)
        if isinstance(current, ServerRecord):
            self.reporter.report(current, lc.STOPPING)
            stop_servers(self.store, [current])
            self.reporter.report(current, lc.STOPPED)
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


def with_keys(spec: ServerSpec, **keys: Any) -> ServerSpec:
    """The spec with keys of its mapping replaced, parsed again: the record keeps the mapping, and
    the supervisor starts each instance from it."""
    return parse_server(spec.name, {**spec.raw, **keys}, spec.source, spec.profile)


def inherit_gpus(spec: ServerSpec, visible: str | None) -> ServerSpec:
    """The GPUs a batch system gave the job (Slurm's CUDA_VISIBLE_DEVICES from its GRES), as they
    are: modelctl allocates none, and the server's environment keeps the job's value."""
    env = {k: v for k, v in spec.env.items() if k != "CUDA_VISIBLE_DEVICES"}
    if visible is not None:
        env["CUDA_VISIBLE_DEVICES"] = visible
    keys: dict[str, Any] = {"gpus": 0, "env": env}
    count = len([g for g in (visible or "").split(",") if g.strip()])
    if spec.kind == "vllm" and count > 1 and not spec.options.get("tensor_parallel_size"):
        keys["tensor_parallel_size"] = count  # what gpus: N gives vLLM where modelctl allocates them
    return with_keys(spec, **keys)


def run_foreground(
    store: StateStore,
    profile: Profile,
    name: str,
    port: int | None = None,
    gpus: list[int] | str | None = None,
    host: str | None = None,
    restart_in_place: bool = False,
    report: Path | None = None,
) -> int:
    """Run one server until it exits or we are told to stop; returns the exit status for systemd.

    gpus: ids to use, or "inherit" (the job's CUDA_VISIBLE_DEVICES). restart_in_place: restart a
    crashed server here (a Slurm job) instead of exiting for systemd to restart us.
    """
    spec = select_specs(profile, [name])[0]
    if port is not None:
        spec = dataclasses.replace(spec, port=port)
    if host is not None:
        spec = with_keys(spec, host=host)
    if isinstance(gpus, str):  # "inherit"
        spec = inherit_gpus(spec, os.environ.get("CUDA_VISIBLE_DEVICES"))
    elif gpus is not None:
        spec = dataclasses.replace(spec, gpus=tuple(gpus))
    ctl = Controller(store)
    handed = inherited_listen_fd()
    listener = Listener.from_fd(handed, spec.host, 0) if handed is not None else None
    if listener is not None:
        listener.port = listener.sock.getsockname()[1]
        if spec.port is None:
            spec = dataclasses.replace(spec, port=listener.port)  # the .socket unit's port
    existing = store.load(spec.ref)
    if isinstance(existing, ServerRecord) and is_alive(existing.leader):
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
        supervisor.held.adopt(spec.ref, listener)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
        log.info("%s: serving on the socket systemd holds (port %s)", spec.ref, listener.port)
    policy = ForegroundPolicy(store, spec.ref, notifier, restart_in_place=restart_in_place, reporter=Reporter(report))
    return Runner(supervisor, policy).run()
