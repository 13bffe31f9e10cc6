"""Replacing a running instance: a restart or a new spec, without a gap where the socket is held.

Where the server says READY=1 on a held socket (and the budget has room for both), a successor
starts beside the serving instance on the same socket — or on the new one, when the address
changed — and takes over once it says READY=1; the old instance is then stopped (SIGTERM: its
requests in flight finish) and an old socket closes once it is gone. Otherwise the old instance
stops first and the next tick starts the new one, its clients waiting in the backlog meanwhile.
A successor that fails leaves the old instance serving. A supervisor that dies during the
overlap leaves the successor's token in the record: the next one adopts it, and takes its notify
socket back from it, so a READY=1 said meanwhile is not lost.
"""

from __future__ import annotations

import logging
import uuid

from modelctl.backends import get_backend
from modelctl.failures import Exit, Failure, classify_exit
from modelctl.host import logfiles
from modelctl.host.process import StopTarget
from modelctl.host.sockets import Listener
from modelctl.state import lifecycle as lc
from modelctl.state.record import Instance
from modelctl.supervisor.instance import InstanceRuntime
from modelctl.supervisor.slot import HealthState, Server
from modelctl.supervisor.verbs import Core

log = logging.getLogger("modelctl.supervisor.replacement")


class Replacement:
    def __init__(self, sup: Core):
        self.sup = sup

    def step(self, srv: Server, now: float) -> bool:
        """Carry a replacement on; False when the running instance is being stopped first."""
        if srv.rec.successor is None and not self.overlaps(srv):
            self.sup.replace_stop_first(srv, now)
            return False
        self.take_over(srv, now)
        return True

    def overlaps(self, srv: Server) -> bool:
        """A successor may start beside the serving instance: it says READY=1 on a held socket, the
        new address (if it changed) can be bound beside the old, and the budget has room for both."""
        rec, spec = srv.rec, srv.spec
        if not (spec.replace == "overlap" and spec.notify and self.sup.uses_socket(srv) and rec.ref in self.sup.held):
            return False
        current = self.sup.held.get(rec.ref)
        assert current is not None
        if (current.host, current.port) != (spec.host, rec.port) and current.port == rec.port:
            return False  # the same port at another host: both cannot be bound at once
        if not self.sup.overlap_fits(srv):
            log.info("%s: the budget has no room for two instances; replacing stop-first", rec.label)
            return False
        return True

    def take_over(self, srv: Server, now: float) -> None:
        """Start a successor beside the serving instance; once it says READY=1, it takes over and the
        old one is stopped. Both accept meanwhile."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        if rec.successor is None:
            self._start_successor(srv, now)
            return
        if slot.successor is None:  # a supervisor died during the overlap: adopt the successor by its token
            ident = self.sup.procs.find_leader(rec.successor.token)
            if ident is None:
                lc.successor_failed(rec, Failure("crash", "the new instance is gone", True), Exit(), now)
                return
            slot.successor = InstanceRuntime.adopt(rec.successor.token, ident, self.sup.held.get(rec.ref), ready=False)
            log.info("%s: adopted the new instance pid %s of a replacement under way", rec.label, ident.pid)
        successor = slot.successor
        exited, exit = successor.exited(self.sup.procs)
        if exited or now - rec.successor.started_at > spec.startup_timeout:
            lines = logfiles.since_last_start(self.sup.store.log_path(rec.ref)) if self.sup.log_to_files else []
            failure = (
                classify_exit(exit, lines)
                if exited
                else Failure("startup-timeout", f"not ready after {spec.startup_timeout:g}s (startup_timeout)", True)
            )
            self.sup.retire_successor(srv, rec, slot, now)
            lc.successor_failed(rec, failure, exit if exited else None, now)
            log.error("%s: %s", rec.label, rec.history.last_error)
            return
        if not successor.ready_said:
            slot.wake_at(rec.successor.started_at + spec.startup_timeout)
            return
        old_runtime = slot.current
        old = lc.successor_took_over(rec, now)
        slot.current, slot.successor = successor, None
        slot.health = HealthState(prepared=True, next_probe_at=now + spec.health.interval)
        log.info("%s: the new instance pid %s took over; stopping the old one (pid %s)", rec.label, rec.pid, old.pid)
        self.retire_old(srv, old, old_runtime)

    def _start_successor(self, srv: Server, now: float) -> None:
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        if not rec.outdated:
            return
        why = "the spec changed" if rec.instance and rec.instance.fingerprint != rec.fingerprint else "restart"
        held = self.sup.hold_socket(srv, keep_old=True)  # a changed address is a new socket
        if isinstance(held, str):
            lc.successor_failed(rec, Failure("address-in-use", held, True), None, now)
            self.sup.held.restore(rec.ref, slot.current.listener if slot.current else None)
            return
        lc.intend_successor(rec, uuid.uuid4().hex, now, why)
        self.sup.save_if_changed(rec, slot, now)
        assert rec.successor is not None
        spawned = self.sup.spawn(srv, rec.successor.token, held, now)
        if isinstance(spawned, Failure):
            lc.successor_failed(rec, spawned, None, now)
            self.sup.held.restore(rec.ref, slot.current.listener if slot.current else None)
            return
        slot.successor = spawned
        lc.successor_spawned(rec, spawned.ident)
        log.info("%s: replacing (%s): new instance pid %s on %s", rec.label, why, spawned.pid, _address(held))
        slot.wake_at(now + spec.startup_timeout)

    def retire_old(self, srv: Server, inst: Instance, runtime: InstanceRuntime | None) -> None:
        """Stop a replaced instance in the background; nothing waits for it."""
        leader_first = get_backend(srv.spec.kind).stops_leader_first(srv.spec)
        target = StopTarget(f"{srv.label} (replaced)", inst.leader, inst.token, inst.member_identities, leader_first=leader_first)
        self.sup.retire(srv.label, srv.slot, target, runtime, srv.spec.stop_timeout)


def _address(listener: Listener) -> str:
    return f"{listener.host}:{listener.port}"
