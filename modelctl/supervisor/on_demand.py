"""On-demand servers and the budget's gate: arming, waking, idle stops and evictions.

An on-demand server is `idle` with its socket held and no process; a connection waiting in the
socket's backlog (noticed, never accepted) or `up --now` starts it. Every spawn of any server
asks `admitted` first: the budget's rule (modelctl/supervisor/budget.py) says start, evict these
first, wait, or that nothing can make room now. A start that must wait keeps its state and its
socket (clients wait in the backlog) and asks again; a refusal is never a permanent `failed`
while the server is wanted. A server with requests in flight, a connection waiting for it, or a
client it was woken for and has not answered yet is never evicted.
"""

from __future__ import annotations

import logging

from modelctl.names import ServerRef
from modelctl.state import lifecycle as lc
from modelctl.supervisor import budget
from modelctl.supervisor.procs import activity_of
from modelctl.supervisor.slot import AfterStop, Server
from modelctl.supervisor.verbs import Core

log = logging.getLogger("modelctl.supervisor.on_demand")

BUDGET_RETRY_SECONDS = 0.25  # a start waiting for memory looks again this often
BUSY_LOOK_SECONDS = 0.5  # how often traffic is read while another server waits for the budget


class OnDemand:
    def __init__(self, sup: Core):
        self.sup = sup

    # ------------------------------------------------------------------ idle servers
    def arm(self, srv: Server, now: float) -> None:
        """An on-demand server waits for its first client: the socket held, no process."""
        held = self.sup.hold_socket(srv, keep_old=False)
        if isinstance(held, str):
            srv.rec.detail = held
            srv.slot.wake_at(now + 2.0)
            return
        lc.armed(srv.rec)
        log.info("%s: armed on %s:%s (on demand)", srv.label, srv.spec.host, srv.rec.port)

    def idle(self, srv: Server, now: float) -> None:
        """An idle on-demand server: start it when a connection waits in its backlog (noticed,
        never accepted: the server accepts it), or when `up --now` asks to warm it up."""
        rec = srv.rec
        held = self.sup.hold_socket(srv, keep_old=False)  # a restarted supervisor binds it again: nothing runs
        if isinstance(held, str):
            rec.detail = held
            srv.slot.wake_at(now + 2.0)
            return
        warm = rec.wish.warm > rec.usage.warmed
        pending = held.pending()
        if not (warm or pending):
            if not srv.slot.demand.waiting_for_budget:
                rec.detail = None
            return
        if pending:
            lc.client_waiting(rec, now)
        self.sup.start(srv, now, wake="warm" if warm and not pending else "client")

    def watch_fds(self) -> list[int]:
        """The sockets of idle on-demand servers: readable when a client's connection waits."""
        out = []
        for ref, listener in self.sup.held.current.items():
            slot = self.sup.slots.get(ref)
            if slot is not None and slot.rec is not None and slot.rec.state == lc.IDLE and not slot.demand.waiting_for_budget:
                out.append(listener.fileno())
        return out

    def on_pending(self, fds: set[int]) -> None:
        for ref, listener in self.sup.held.current.items():
            if listener.fileno() in fds and (slot := self.sup.slots.get(ref)) is not None:
                slot.dirty = True

    # ------------------------------------------------------------------ the budget's gate
    def admitted(self, srv: Server, now: float) -> bool:
        """May the server start now under its budget? If others must make room, stop them and wait;
        if nothing can make room now, wait too (its clients stay in the backlog) and say why."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        decision = budget.admit(rec, spec, self._records(), busy=self.busy_refs(exclude=rec.ref))
        if isinstance(decision, budget.Admit):
            if slot.demand.waiting_for_budget:
                log.info("%s: the budget has room now", rec.label)
            slot.demand.waiting_for_budget = False
            slot.demand.refused_reported = ""
            return True
        if isinstance(decision, budget.Evict):
            for victim in decision.victims:
                self.evict(victim, decision.reason, now)
        if isinstance(decision, budget.Refuse) and slot.demand.refused_reported != decision.reason:
            log.warning("%s: waits for memory: %s", rec.label, decision.reason)
            slot.demand.refused_reported = decision.reason
        rec.detail = f"waiting for memory: {decision.reason}"
        slot.demand.waiting_for_budget = True
        slot.wake_at(now + BUDGET_RETRY_SECONDS)
        return False

    def overlap_fits(self, srv: Server) -> bool:
        """Does a successor fit beside the running instance (both count) without evicting anyone?"""
        decision = budget.admit(srv.rec, srv.spec, self._records(), busy=set(), beside_current=True)
        return isinstance(decision, budget.Admit)

    def _records(self) -> list[tuple[lc.ServerRecord, budget.ServerSpec | None]]:
        return [(s.rec, s.spec) for s in self.sup.slots.values() if s.rec is not None]

    def busy_refs(self, exclude: ServerRef) -> set[ServerRef]:
        """Servers that must not be evicted now: requests in flight, a connection waiting, or a
        client they were woken for that they have not answered yet."""
        out = set()
        for ref, slot in self.sup.slots.items():
            rec = slot.rec
            if ref == exclude or rec is None or rec.state not in budget.EVICTABLE:
                continue
            listener = self.sup.held.get(ref)
            woken_for_a_client = slot.demand.woke_for_client and not slot.demand.served
            if slot.demand.in_flight or (listener is not None and listener.pending()) or woken_for_a_client:
                out.add(ref)
                # look at its traffic soon: it may become evictable
                slot.demand.next_activity_at = min(slot.demand.next_activity_at, self.sup.clock())
                slot.wake_at(self.sup.clock())
        return out

    def evict(self, ref: ServerRef, reason: str, now: float) -> None:
        """Stop an on-demand server to make room (it goes back to idle, its socket held)."""
        vslot = self.sup.slots.get(ref)
        if vslot is None or vslot.rec is None or vslot.spec is None or vslot.rec.state not in budget.EVICTABLE:
            return
        victim = Server(vslot.rec, vslot, vslot.spec)
        log.info("%s: evicted: %s", victim.label, reason)
        self.rest(victim, now, f"evicted: {reason}", evicted_for=reason)
        self.sup.save_if_changed(victim.rec, vslot, now)

    def rest(self, srv: Server, now: float, why: str, evicted_for: str | None = None) -> None:
        lc.begin_rest(srv.rec, self.sup.me, why)
        self.sup.begin_stop(srv.rec, srv.slot, srv.spec, AfterStop.REST, now, evicted_for=evicted_for)

    # ------------------------------------------------------------------ idleness
    def watch_idleness(self, srv: Server, now: float) -> None:
        """A ready on-demand server is stopped after idle_timeout without a request (never while a
        replacement is under way, nor with requests in flight). Only a look at its traffic begun
        after the idle deadline decides: a look that a busy CPU delayed, or the last one before it,
        says nothing of the time since."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        demand = slot.demand
        self.look_at_traffic(srv, now)
        if rec.successor is not None:
            return
        since = rec.usage.last_active or (rec.instance.ready_at if rec.instance else None) or now
        deadline = since + spec.idle_timeout
        if now >= deadline and not demand.in_flight:
            if demand.looked_at is not None and demand.looked_at >= deadline:
                log.info("%s: idle for %.0fs; stopping it until the next client", rec.label, now - since)
                self.rest(srv, now, f"idle for {now - since:.0f}s (idle_timeout)")
                return
            if demand.activity is None:  # look now; its answer wakes the loop
                demand.next_activity_at = now
                self.look_at_traffic(srv, now, deciding=True)
            else:  # the look under way wakes the loop when it answers (if it began too early, another is taken)
                demand.answer_wanted = True
                if demand.activity.done():
                    slot.wake_at(now)
            return
        slot.wake_at(min(demand.next_activity_at, deadline))

    def look_at_traffic(self, srv: Server, now: float, deciding: bool = False) -> None:
        """Requests are seen in the server's own counters (the bundled server, vLLM), else in its
        established connections; more often while another server waits for the budget."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        demand = slot.demand
        if demand.activity is not None and demand.activity.done():
            fut, demand.activity = demand.activity, None
            demand.looked_at = demand.looking_since
            scraped, connections = fut.result() if fut.exception() is None else (None, None)
            if scraped is not None:
                moved = demand.last_requests is not None and scraped.requests != demand.last_requests
                demand.in_flight = scraped.in_progress > 0
                demand.served = demand.served or scraped.requests > 0
                busy = moved or demand.in_flight
                demand.last_requests = scraped.requests
            else:
                demand.in_flight = bool(connections)
                demand.served = demand.served or not connections
                busy = demand.in_flight
            if busy:
                lc.active(rec, now)
        someone_waits = any(s.demand.waiting_for_budget for s in self.sup.slots.values())
        if demand.activity is None and now >= demand.next_activity_at:
            every = max(0.5, min(spec.idle_timeout / 4, 5.0))
            demand.next_activity_at = now + (min(every, BUSY_LOOK_SECONDS) if someone_waits else every)
            demand.looking_since = now
            demand.answer_wanted = deciding or someone_waits
            demand.activity = self.sup.submit(slot, activity_of, self.sup.url_of(srv), rec.port, quiet=lambda _: not demand.answer_wanted)
        slot.wake_at(demand.next_activity_at)
