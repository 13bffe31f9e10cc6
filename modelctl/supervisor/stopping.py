"""Stopping a server: the one path used by `down`, `restart`, `modelctl run` and the supervisor.

A stop has three steps, and only the first and last hold the state lock:
1. `lifecycle.begin_stop`: the record says a stop is under way (state stopping, who carries it out);
2. `stop_processes` (modelctl/host/process.py): SIGTERM, wait, SIGKILL the instance's provable
   processes, then check that the port is free — never under the lock;
3. `lifecycle.stopped`: stopping → stopped, unless another command has moved the record since.
If the stopper dies between 1 and 3 (Ctrl-C), the supervisor sees a stop whose owner is gone
and carries it out itself. A disk that refuses the record (full, read-only) does not keep the
processes running: they are stopped all the same, and the stop says what it could not record.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from modelctl.backends import get_backend
from modelctl.host.files import DiskError
from modelctl.host.identity import ProcessIdentity, identity_of, is_alive
from modelctl.host.process import StopResult, StopTarget, stop_processes
from modelctl.names import ServerRef
from modelctl.profile import record_spec
from modelctl.spec import ServerSpec
from modelctl.state import lifecycle as lc
from modelctl.state.record import ServerRecord
from modelctl.state.store import BrokenRecord, StateStore

DEFAULT_STOP_TIMEOUT = 10.0
# states after which nothing of ours can hold the port: a stop checks the port in every other
NOTHING_LEFT = frozenset({lc.STOPPED, lc.IDLE})


def target_of(rec: ServerRecord, spec: ServerSpec | None = None) -> StopTarget:
    """What proves which processes are this record's instance.

    The port is checked after the stop wherever something of ours may have held it: an instance
    (recorded or only intended), or a state that may have left a process behind, failed included.
    """
    inst = rec.instance
    members = inst.member_identities if inst else ()
    port = rec.port if inst is not None or rec.state not in NOTHING_LEFT else None
    return StopTarget(rec.label, rec.leader, rec.token, members, port, rec.host, leader_first=_leader_first(rec, spec))


def _leader_first(rec: ServerRecord, spec: ServerSpec | None) -> bool:
    """`spec`: the record's, where the caller has it parsed already (the supervisor's path)."""
    spec = spec if spec is not None else record_spec(rec)
    return spec is not None and get_backend(spec.kind).stops_leader_first(spec)


def successor_target(rec: ServerRecord) -> StopTarget | None:
    """A new instance that was starting beside the serving one: stopped with it."""
    inst = rec.successor
    if inst is None:
        return None
    leader = ProcessIdentity(inst.pid, inst.create_time) if inst.pid is not None and inst.create_time is not None else None
    return StopTarget(f"{rec.label} (new instance)", leader, inst.token, inst.member_identities)


def target_of_broken(rec: BrokenRecord) -> StopTarget | None:
    """What a broken record still tells about its process, if its fields for that are intact."""
    data = rec.data or {}
    inst = data.get("instance")
    if isinstance(inst, dict):  # version 3: the instance is its own part
        pid, created, token = inst.get("pid"), inst.get("create_time"), inst.get("token")
    else:
        pid, created, token = data.get("pid"), data.get("create_time"), inst
    leader = None
    if isinstance(pid, int) and not isinstance(pid, bool) and isinstance(created, (int, float)):
        leader = ProcessIdentity(pid, float(created))
    token = token if isinstance(token, str) and token else None
    if leader is None and token is None:
        return None
    port = data.get("port") if isinstance(data.get("port"), int) else None
    return StopTarget(rec.label, leader, token, (), port, str(data.get("host") or "127.0.0.1"))


def stop_owner_alive(rec: ServerRecord) -> bool:
    owner = rec.instance.stop_owner if rec.instance else None
    if not owner:
        return False
    pid, created = owner
    return is_alive(ProcessIdentity(int(pid), float(created)))


def stop_timeout_of(rec: ServerRecord) -> float:
    spec = record_spec(rec)
    return spec.stop_timeout if spec is not None else DEFAULT_STOP_TIMEOUT


def finish_stop(rec: ServerRecord, token: str | None, result: StopResult) -> None:
    """The stop is done: mark the record stopped (unless it has moved on) and say if the port still answers."""
    lc.stopped(rec, token, result.port_holder)


@dataclass
class Stopped:
    """What one stop did: the record's label, how the processes ended, and whether the port is free.

    `unproven`: the record could not be read, so no process could be proven to be the server's.
    `unrecorded`: the processes were stopped, but the disk refused the record that says so.
    """

    label: str
    result: StopResult
    note: str = ""
    unproven: str = ""
    unrecorded: str = ""

    @property
    def ok(self) -> bool:
        return self.result.ok and not self.unproven and not self.unrecorded


@dataclass
class _Job:
    ref: ServerRef
    label: str
    target: StopTarget | None
    timeout: float
    token: str | None
    readable: bool
    unproven: str = ""
    unrecorded: str = ""
    also: StopTarget | None = None  # a successor starting beside the instance


def stop_servers(
    store: StateStore,
    records: Sequence[ServerRecord | BrokenRecord],
    desired_after: lc.Desired = "stopped",
    before_release: Callable[[], Any] | None = None,
) -> list[Stopped]:
    """Stop servers the three-step way, all at once; returns when every one is gone (or not ours).

    Runs the process stops in daemon threads: a Ctrl-C ends the command at once and leaves the
    records `stopping` with a dead owner, which the supervisor finishes.
    """
    with store.locked():
        jobs = [job for old in records if (job := _mark_stopping(store, old, desired_after)) is not None]
    if before_release is not None:
        before_release()

    results: dict[str, StopResult] = {}

    def run(job: _Job) -> None:
        if job.also is not None:
            stop_processes(job.also, job.timeout)
        # an empty target signals nothing, but its port is still checked (a failed record's)
        results[job.label] = stop_processes(job.target, job.timeout) if job.target is not None else StopResult("not running")

    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with store.locked():
        return [_mark_stopped(store, job, results.get(job.label) or StopResult("not running")) for job in jobs]


def _mark_stopping(store: StateStore, old: ServerRecord | BrokenRecord, desired_after: lc.Desired) -> _Job | None:
    """Step 1, under the lock: the record says a stop is under way, and what proves its processes."""
    rec = store.load(old.ref)
    if isinstance(rec, ServerRecord):
        target = target_of(rec)  # before the marking: the state says whether a port check is due
        lc.begin_stop(rec, identity_of(os.getpid()), desired_after)
        job = _Job(rec.ref, rec.label, target, stop_timeout_of(rec), rec.token, True, also=successor_target(rec))
        try:
            store.save(rec)
        except DiskError as e:
            job.unrecorded = str(e)  # stop it all the same: a full disk must not keep it running
        return job
    if isinstance(rec, BrokenRecord):
        broken_target = target_of_broken(rec)
        why = (
            ""
            if broken_target is not None
            else f"cannot read the record, so cannot prove which process is the server: {rec.path} ({rec.error})"
        )
        return _Job(rec.ref, rec.label, broken_target, DEFAULT_STOP_TIMEOUT, None, False, unproven=why)
    return None


def _mark_stopped(store: StateStore, job: _Job, result: StopResult) -> Stopped:
    """Step 3, under the lock: stopping → stopped, unless the record moved on; what the stop did."""
    note = ""
    if job.readable:
        try:
            store.update(job.ref, functools.partial(finish_stop, token=job.token, result=result))
        except DiskError as e:
            job.unrecorded = job.unrecorded or str(e)
    else:
        note = "broken record: left in place to fix or remove"
    return Stopped(job.label, result, note, job.unproven, job.unrecorded)
