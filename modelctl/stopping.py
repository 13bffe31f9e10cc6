"""Stopping a server: the one path used by `down`, `restart`, `modelctl run` and the supervisor.

A stop has three steps, and only the first and last hold the state lock:
1. `mark_stopping`: the record says a stop is under way (state stopping, who carries it out);
2. `stop_processes` (modelctl/process.py): SIGTERM, wait, SIGKILL the instance's provable
   processes, then check that the port is free — never under the lock;
3. `mark_stopped`: stopping → stopped, unless another command has moved the record since.
If the stopper dies between 1 and 3 (Ctrl-C), the supervisor sees a stop whose owner is gone
and carries it out itself.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from modelctl import lifecycle as lc
from modelctl.names import ServerRef
from modelctl.process import ProcessIdentity, StopResult, StopTarget, identity_of, is_alive, stop_processes
from modelctl.state import BrokenRecord, ServerRecord, StateStore

DEFAULT_STOP_TIMEOUT = 10.0


def record_identity(rec: ServerRecord) -> ProcessIdentity | None:
    """The recorded leader of the server's instance, if one is recorded."""
    if rec.pid is None or rec.create_time is None:
        return None
    return ProcessIdentity(rec.pid, rec.create_time)


def target_of(rec: ServerRecord) -> StopTarget:
    """What proves which processes are this record's instance.

    The port is checked after the stop only where something of ours may have held it.
    """
    members = tuple(ProcessIdentity(int(p), float(c)) for p, c in rec.members)
    port = rec.port if rec.state in lc.MAY_HAVE_PROCESSES and rec.pid is not None else None
    return StopTarget(rec.label, record_identity(rec), rec.instance, members, port, rec.host)


def target_of_broken(rec: BrokenRecord) -> StopTarget | None:
    """What a broken record still tells about its process, if its fields for that are intact."""
    data = rec.data or {}
    pid, created, token = data.get("pid"), data.get("create_time"), data.get("instance")
    leader = None
    if isinstance(pid, int) and not isinstance(pid, bool) and isinstance(created, (int, float)):
        leader = ProcessIdentity(pid, float(created))
    token = token if isinstance(token, str) and token else None
    if leader is None and token is None:
        return None
    port = data.get("port") if isinstance(data.get("port"), int) else None
    return StopTarget(rec.label, leader, token, (), port, str(data.get("host") or "127.0.0.1"))


def stop_owner_alive(rec: ServerRecord) -> bool:
    if not rec.stop_owner:
        return False
    pid, created = rec.stop_owner
    return is_alive(ProcessIdentity(int(pid), float(created)))


def mark_stopping(rec: ServerRecord, owner: ProcessIdentity | None, desired_after: str) -> None:
    """A deliberate stop begins; `desired_after` is what the server should do once stopped."""
    rec.desired = desired_after  # first, so that the exit is not taken for a crash
    if rec.state in lc.MAY_HAVE_PROCESSES:
        if rec.state != lc.STOPPING:
            lc.move(rec, lc.STOPPING)
        rec.stop_owner = [owner.pid, owner.create_time] if owner else None
        rec.detail = "stopping"
    elif rec.state in (lc.BACKOFF, lc.FAILED):
        lc.move(rec, lc.STOPPED)  # nothing runs; leftovers are still looked for by the stop
        rec.detail = None
    rec.next_start_at = None
    rec.progress = None


def mark_stopped(rec: ServerRecord, instance: str | None) -> bool:
    """The instance's processes are gone. False if the record has moved on (another command)."""
    if rec.instance != instance:
        return False
    if rec.state == lc.STOPPING:
        lc.move(rec, lc.STOPPED, expect=lc.STOPPING)
    elif rec.state != lc.STOPPED:
        return False
    rec.pid = rec.create_time = rec.ready_at = None
    rec.members, rec.stop_owner, rec.running_fingerprint = [], None, None
    rec.detail, rec.progress = None, None
    return True


def stop_timeout_of(rec: ServerRecord) -> float:
    from modelctl.profile import record_spec

    spec = record_spec(rec)
    return spec.stop_timeout if spec is not None else DEFAULT_STOP_TIMEOUT


def finish_stop(rec: ServerRecord, instance: str | None, result: StopResult) -> None:
    """The stop is done: mark the record stopped (unless it has moved on) and say if the port still answers."""
    if mark_stopped(rec, instance) and not result.ok:
        # our processes are gone, but something we cannot prove is ours answers on the port
        rec.last_error = f"after stopping, the port still answers: {result.port_holder}"


@dataclass
class Stopped:
    """What one stop did: the record's label, how the processes ended, and whether the port is free."""

    label: str
    result: StopResult
    note: str = ""


def stop_servers(
    store: StateStore,
    records: Sequence[ServerRecord | BrokenRecord],
    desired_after: str = "stopped",
    before_release: Callable[[], Any] | None = None,
) -> list[Stopped]:
    """Stop servers the three-step way, all at once; returns when every one is gone (or not ours).

    Runs the process stops in daemon threads: a Ctrl-C ends the command at once and leaves the
    records `stopping` with a dead owner, which the supervisor finishes.
    """
    me = identity_of(os.getpid())
    jobs: list[tuple[ServerRef, str, StopTarget | None, float, str | None, bool]] = []
    with store.locked():
        for old in records:
            rec = store.load(old.ref)
            if isinstance(rec, ServerRecord):
                target = target_of(rec)  # before the marking: the state says whether a port check is due
                mark_stopping(rec, me, desired_after)
                store.save(rec)
                jobs.append((rec.ref, rec.label, target, stop_timeout_of(rec), rec.instance, True))
            elif isinstance(rec, BrokenRecord):
                jobs.append((rec.ref, rec.label, target_of_broken(rec), DEFAULT_STOP_TIMEOUT, None, False))
    if before_release is not None:
        before_release()

    results: dict[str, StopResult] = {}

    def run(label: str, target: StopTarget | None, timeout: float) -> None:
        results[label] = stop_processes(target, timeout) if target is not None and not target.empty else StopResult("not running")

    threads = [threading.Thread(target=run, args=(label, t, timeout), daemon=True) for _, label, t, timeout, _, _ in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    out = []
    with store.locked():
        for ref, label, _, _, instance, readable in jobs:
            result = results.get(label) or StopResult("not running")
            note = ""
            if readable:
                store.update(ref, functools.partial(finish_stop, instance=instance, result=result))
            else:
                note = "broken record: left in place to fix or remove"
            out.append(Stopped(label, result, note))
    return out
