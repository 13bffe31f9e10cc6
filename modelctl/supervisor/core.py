"""The supervisor's reconcile logic: it keeps the servers that should run running.

Each tick reconciles the records that need it — desired vs actual — through a few verbs, in the
manner of gunicorn's arbiter: `reap` (notice exits), the health watch (warm-up, preparation,
hung servers: modelctl/supervisor/health_watch.py), `start` (first start, restarts after backoff)
and `begin_stop` (in the background: never under the state lock). On-demand servers and the
budget are modelctl/supervisor/on_demand.py; replacing an instance without a gap is
modelctl/supervisor/replacement.py. A record needs a tick when its file changed, when an event
arrived for it (a child exited, a probe or a stop finished) or when one of its timers is due; an
idle supervisor touches nothing. Time, process control and the executors for slow work are
injected, so the restart logic is tested with a fake clock in milliseconds. One bad record never
stops the loop: each is reconciled under its own guard.

A start saves its intent (state `starting` and the instance's token) before it spawns: a
process is never without a record that names it, so a supervisor that dies right after a spawn
leaves a token by which the next one finds and adopts the process instead of starting another.
Every spawn — a first start, a restart, a successor, a wake — asks the budget first.

The loop around it (signals, the wake-up pipe, exit policies) is modelctl/supervisor/runner.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shlex
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from modelctl.backends import get_backend
from modelctl.failures import EXIT_NO_SOCKET, Exit, Failure, classify_exit, explaining_line
from modelctl.host import logfiles
from modelctl.host.files import DiskError
from modelctl.host.gpus import gpu_memory_by_pid, group_gpu_memory
from modelctl.host.identity import ProcessIdentity, identity_of
from modelctl.host.process import StopResult, StopTarget, usage_by_leader
from modelctl.host.sockets import Listener, NotifySocket, activation_argv, activation_env, take_from_process
from modelctl.names import ServerRef
from modelctl.profile import record_spec
from modelctl.sanitize import one_line
from modelctl.spec import ServerSpec
from modelctl.state import lifecycle as lc
from modelctl.state import restart
from modelctl.state.record import HELD, HELD_BY_INSTANCE, NO_SOCKET, NotHeld, ServerRecord
from modelctl.state.store import BrokenRecord, LockTimeout, StateStore
from modelctl.supervisor.health_watch import HealthWatch
from modelctl.supervisor.held import HeldSockets
from modelctl.supervisor.instance import InstanceRuntime, server_environment
from modelctl.supervisor.on_demand import OnDemand
from modelctl.supervisor.procs import (
    Handle,
    InlineExecutor,
    ProcessControl,
    RealProcesses,
    ThreadPerJob,
    activity_of,
    close_pidfd,
    open_pidfd,
)
from modelctl.supervisor.replacement import Replacement
from modelctl.supervisor.slot import AfterStop, HealthState, Server, Slot, StopJob
from modelctl.supervisor.stopping import DEFAULT_STOP_TIMEOUT, finish_stop, stop_owner_alive, successor_target, target_of

__all__ = [
    "Handle",
    "InlineExecutor",
    "ProcessControl",
    "RealProcesses",
    "Server",
    "Slot",
    "Supervisor",
    "ThreadPerJob",
    "activity_of",
    "close_pidfd",
    "open_pidfd",
    "server_environment",
]

log = logging.getLogger("modelctl.supervisor")

MEMBERS_SECONDS = 5.0  # how often a server's descendants are looked at (one /proc scan for all)
MEMBERS_KEPT = 256
ADOPTED_POLL_SECONDS = 0.5  # a process that is not our child, where no pidfd tells of its exit
CRASH_CLEANUP_SECONDS = 3.0  # the leader is gone; what is left of it gets little grace


class Supervisor:
    def __init__(
        self,
        store: StateStore,
        clock: Callable[[], float] = time.time,
        procs: ProcessControl | None = None,
        executor: Any = None,
        stop_executor: Any = None,
        managed_by: lc.ManagedBy = lc.SUPERVISOR,
        only: set[ServerRef] | None = None,
        log_to_files: bool = True,
    ):
        self.store = store
        self.clock = clock
        self.procs: ProcessControl = procs or RealProcesses()
        # probes and preparations share a pool; stops run apart, so a slow stop never delays a probe
        self.executor = executor or ThreadPoolExecutor(max_workers=8, thread_name_prefix="modelctl-work")
        self.stop_executor = stop_executor or (executor if isinstance(executor, InlineExecutor) else ThreadPerJob())
        self.managed_by = managed_by
        self.only = only
        self.log_to_files = log_to_files  # False: servers write to our stdout (the journal under systemd)
        self.slots: dict[ServerRef, Slot] = {}
        self.refs: list[ServerRef] | None = None
        self.me = identity_of(os.getpid())
        self.on_wake: Callable[[], None] = lambda: None  # the runner's: a finished job wakes the loop
        self.log = log
        self.held = HeldSockets()  # the sockets held across an instance's restarts
        self.health = HealthWatch(self)
        self.demand = OnDemand(self)
        self.replacement = Replacement(self)
        self._descendants_cache: dict[int, list[ProcessIdentity]] = {}
        self._descendants_at: float | None = None

    # ------------------------------------------------------------------ the loop
    def tick(self, now: float | None = None, rescan: bool = True, sweep: bool = False) -> None:
        """One pass over the records that need it, each under its own guard.

        `rescan` lists the records again (new ones, removed ones); `sweep` reconciles every record
        whether or not anything is due (a safety net the runner runs now and then).
        """
        now = self.clock() if now is None else now
        if rescan or self.refs is None:
            self.refs = [ref for ref in self.store.refs() if self.only is None or ref in self.only]
            for ref in list(self.slots):
                if ref not in self.refs and not self.slots[ref].busy():
                    self.forget(ref)
        for ref in self.refs:
            slot = self.slots.setdefault(ref, Slot())
            # commands wake us (SIGUSR1) after they write a record: its file is looked at on a rescan
            if not (sweep or self._needs_tick(ref, slot, now, look_at_file=rescan)):
                continue
            try:
                self._tick_one(ref, slot, now)
            except LockTimeout as e:
                log.warning("%s; trying again next tick", e)
                slot.dirty = True
                break
            except DiskError as e:
                log.error("%s: %s", ref, e)
                slot.forget_record()
                slot.wake_at(now + 1.0)
            except Exception:
                log.exception("%s: error while supervising it; trying again next tick", ref)
                slot.forget_record()
                slot.wake_at(now + 1.0)

    def forget(self, ref: ServerRef) -> None:
        """A record that is gone: whatever we held for it is let go (its sockets are closed)."""
        slot = self.slots.pop(ref, None)
        if slot is not None:
            for inst in slot.instances():
                inst.close()
        self.close_sockets(ref)

    def _needs_tick(self, ref: ServerRef, slot: Slot, now: float, look_at_file: bool) -> bool:
        if slot.dirty or now >= slot.due or slot.rec is None:
            return True
        if any(inst.child_exited() for inst in slot.instances()):
            return True  # our child exited (SIGCHLD woke us)
        return look_at_file and self.store.stamp(ref) != slot.stamp

    def _tick_one(self, ref: ServerRef, slot: Slot, now: float) -> None:
        with self.store.locked():
            stamp = self.store.stamp(ref)
            if slot.rec is None or stamp != slot.stamp:
                loaded = self.store.load(ref)
                if loaded is None:
                    self.forget(ref)
                    return
                if isinstance(loaded, BrokenRecord):
                    if slot.broken_reported != loaded.error:
                        log.error("%s: broken record %s: %s; not supervising it", ref, loaded.path, loaded.error)
                        slot.broken_reported = loaded.error
                    slot.rec, slot.stamp, slot.dirty, slot.due = None, stamp, False, math.inf
                    return
                slot.rec, slot.stamp, slot.saved = loaded, stamp, loaded.to_json()
            rec = slot.rec
            slot.dirty, slot.due = False, math.inf
            if rec.wish.managed_by != self.managed_by:
                return
            self.reconcile(rec, slot, now)
            self.save_if_changed(rec, slot, now)

    def save_if_changed(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        after = rec.to_json()
        if after != slot.saved:
            self.store.save(rec, now)
            slot.saved, slot.stamp = rec.to_json(), self.store.stamp(rec.ref)

    def wants_to_run(self) -> bool:
        """Is there work for a supervisor: a server wanted running, a stop to finish, a job in flight?"""
        for slot in self.slots.values():
            if slot.busy():
                return True
            rec = slot.rec
            if rec is None or rec.wish.managed_by != self.managed_by:
                continue
            # a stop under way: its owner may die (Ctrl-C) and leave it to us
            if rec.wants_running or rec.state in (lc.CRASHED, lc.STOPPING):
                return True
        return False

    def next_due(self) -> float:
        return min((s.due for s in self.slots.values()), default=math.inf)

    def mark_dirty(self, handle_pidfds: set[int] | None = None) -> None:
        """An exit was signalled: every server whose process may have exited gets a tick."""
        for slot in self.slots.values():
            for inst in slot.instances():
                if handle_pidfds is None or (inst.pidfd is not None and inst.pidfd in handle_pidfds):
                    slot.dirty = True

    def pidfds(self) -> list[int]:
        return [inst.pidfd for s in self.slots.values() for inst in s.instances() if inst.pidfd is not None]

    def notify_fds(self) -> list[int]:
        """Where instances say READY=1: the runner waits on them with everything else."""
        return [fd for s in self.slots.values() for inst in s.instances() if (fd := inst.notify_fd) is not None]

    def on_notify(self, fds: set[int]) -> None:
        """Read what instances said on their notify sockets; a READY=1 gets its server a tick."""
        for slot in self.slots.values():
            for inst in slot.instances():
                if inst.hear(fds):
                    slot.dirty = True

    def url_of(self, srv: Server) -> str:
        return self.health.url(srv)

    def overlap_fits(self, srv: Server) -> bool:
        return self.demand.overlap_fits(srv)

    def watch_fds(self) -> list[int]:
        return self.demand.watch_fds()

    def on_pending(self, fds: set[int]) -> None:
        self.demand.on_pending(fds)

    def reconcile(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        self._collect_retired(slot)
        if not rec.wants_running:
            self.close_sockets(rec.ref)  # down: new connections are refused from now on
        if slot.stop is not None:
            if not slot.stop.future.done():
                return
            self._stop_done(rec, slot, now)
        if rec.state == lc.STOPPING:
            self._take_over_stop(rec, slot, now)
            return
        if not rec.wants_running:
            self._collect_child(slot)  # the stopper stops the process; we only collect our child
            return
        if rec.state == lc.FAILED:
            self.close_sockets(rec.ref)  # nothing will serve: clients are refused, not left waiting
            return
        spec = self._spec(rec, slot)
        if spec is None:
            return
        srv = Server(rec, slot, spec)
        on_demand = spec.start == "on-demand"
        if rec.state in lc.ALIVE:
            if not self._reap_or_adopt(srv, now):
                return
            if (rec.outdated or rec.successor is not None) and not self.replacement.step(srv, now):
                return
            self._record_members(srv, now)
            self.health.check(srv, now)
            if on_demand and rec.state in (lc.READY, lc.UNHEALTHY):
                self.demand.watch_idleness(srv, now)
        elif rec.state == lc.STOPPED:
            if on_demand and rec.wish.warm <= rec.usage.warmed:
                self.demand.arm(srv, now)
            else:
                self.start(srv, now)
        elif rec.state == lc.IDLE:
            if on_demand:
                self.demand.idle(srv, now)
            else:
                self.start(srv, now)  # its profile says `start: always` now
        elif rec.state == lc.BACKOFF:
            self._start_if_due(srv, now)
        elif rec.state == lc.CRASHED:
            # a supervisor died while cleaning up after a crash: finish that first
            self.begin_stop(srv.rec, srv.slot, srv.spec, AfterStop.CRASH, now)

    # ------------------------------------------------------------------ verbs: exits
    def _collect_child(self, slot: Slot) -> None:
        if slot.current is not None and self.procs.exit_status(slot.current.handle)[0]:
            slot.current.close()
            slot.current = None

    def _reap_or_adopt(self, srv: Server, now: float) -> bool:
        """Notice an exit (→ crashed); adopt a live server an earlier supervisor started."""
        rec, slot = srv.rec, srv.slot
        if slot.external:
            return True
        if (slot.current is None or slot.current.pid != rec.pid) and not self._adopt(srv):
            failure = Failure("crash", "exited while no supervisor was watching", True)
            if rec.pid is None:
                failure = Failure("crash", "the start was interrupted: no process carries its token", True)
            self.crash(srv, now, Exit(), failure)
            return False
        assert slot.current is not None
        exited, exit = slot.current.exited(self.procs)
        if exited:
            lines = logfiles.since_last_start(self.store.log_path(rec.ref)) if self.log_to_files else []
            if exit.code == EXIT_NO_SOCKET and self.uses_socket(srv):
                self._without_socket(srv, explaining_line(lines) or "the server cannot take a socket")
            self.crash(srv, now, exit, classify_exit(exit, lines))
            return False
        if not slot.current.is_child and slot.current.pidfd is None:
            slot.wake_at(now + ADOPTED_POLL_SECONDS)
        return True

    def _adopt(self, srv: Server) -> bool:
        """Take on a live instance: by its recorded identity, or (never recorded) by its token."""
        rec, slot = srv.rec, srv.slot
        ident = rec.leader
        found_by_token = False
        if ident is None and rec.token:
            ident, found_by_token = self.procs.find_leader(rec.token), True
        if ident is None or not self.procs.is_alive(ident) or rec.token is None:
            return False
        if slot.current is not None:
            slot.current.close()
        self._take_socket_back(srv, ident)
        serving = rec.state in (lc.READY, lc.UNHEALTHY)
        slot.current = InstanceRuntime.adopt(rec.token, ident, self.held.get(rec.ref) if self.uses_socket(srv) else None, ready=serving)
        slot.health = HealthState(prepared=serving)
        if found_by_token:
            lc.spawned(rec, ident, "adopted: started by a supervisor that died before recording it")
        log.info("%s: adopted running pid %s (%s)", rec.label, ident.pid, rec.state)
        return True

    def _take_socket_back(self, srv: Server, ident: ProcessIdentity) -> None:
        rec = srv.rec
        if not self.uses_socket(srv) or rec.ref in self.held or not rec.port:
            return
        held = take_from_process(ident.pid, rec.port, srv.spec.host)
        if held is not None:
            self.held.adopt(rec.ref, held)
            rec.set_socket(HELD)
            log.info("%s: took its listening socket back from pid %s", rec.label, ident.pid)
        else:
            rec.set_socket(HELD_BY_INSTANCE)

    def crash(self, srv: Server, now: float, exit: Exit | None, failure: Failure) -> None:
        """A failure: count it, remember it, and stop what is left of the instance first (and a
        successor that was starting beside it: the crash path starts a fresh one)."""
        lc.crashed(srv.rec, now, exit, failure, srv.spec.restart)
        self.begin_stop(srv.rec, srv.slot, srv.spec, AfterStop.CRASH, now, failure=failure, exit=exit)

    def _after_crash(self, srv: Server, now: float, failure: Failure | None, exit: Exit | None) -> None:
        """The failed instance is gone: back off, give up (failed) or stay down per the policy."""
        rec, slot = srv.rec, srv.slot
        if failure is None:
            failure, exit = Failure("crash", rec.history.last_error or "", True), rec.history.last_exit
        decision = restart.decide(srv.spec.restart, rec.history, failure, exit)
        lc.settle_crash(rec, decision, now)
        if isinstance(decision, restart.Backoff):
            log.warning("%s: %s", rec.label, decision.reason)
            slot.wake_at(rec.history.next_start_at)
        elif isinstance(decision, restart.GiveUp):
            log.error("%s: %s", rec.label, decision.reason)
        else:
            log.info("%s: %s", rec.label, decision.reason)

    # ------------------------------------------------------------------ verbs: start
    def _start_if_due(self, srv: Server, now: float) -> None:
        due = srv.rec.history.next_start_at or 0
        if now >= due:
            self.start(srv, now)
        else:
            srv.slot.wake_at(due)

    def start(self, srv: Server, now: float, wake: str | None = None) -> None:
        """Save the intent, then spawn: the token names the process before it exists. Within the
        budget: servers that must make room are stopped first, and the start waits for them.

        `wake`: an idle on-demand server starts ("client": one waits; "warm": `up --now`)."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        if not self.demand.admitted(srv, now):
            return
        if wake is not None:
            lc.woke(rec, uuid.uuid4().hex, now, warm=wake == "warm")
        else:
            lc.intend_start(rec, uuid.uuid4().hex, now)
        slot.health = HealthState(next_probe_at=now)
        slot.demand.served = slot.demand.in_flight = False
        slot.demand.woke_for_client = wake == "client"
        if slot.current is not None:
            slot.current.close()
            slot.current = None
        slot.wake_at(now)
        if get_backend(spec.kind).is_external(spec):  # lives elsewhere: nothing to spawn, only to probe and prepare
            lc.external_start(rec)
            return
        listener: Listener | None = None
        problem = None
        if self.uses_socket(srv):
            held = self.hold_socket(srv, keep_old=False)
            if isinstance(held, str):
                problem = held
            else:
                listener = held
        else:
            holder = self.procs.port_holder(rec.port, spec.host) if rec.port else None
            problem = f"cannot start: {holder}" if holder else None
        if problem:
            self.crash(srv, now, None, Failure("address-in-use", problem, True))
            return
        self.save_if_changed(rec, slot, now)  # the intent: a DiskError here means nothing is spawned
        assert rec.instance is not None
        spawned = self.spawn(srv, rec.instance.token, listener, now)
        if isinstance(spawned, Failure):
            lc.failed_to_start(rec, spawned, now)
            log.error("%s: %s", rec.label, rec.history.last_error)
            return
        slot.current = spawned
        slot.health.next_probe_at = now + self.health.startup_probe_seconds
        slot.wake_at(slot.health.next_probe_at)
        lc.spawned(rec, spawned.ident)
        log.info("%s: started pid %s on port %s%s", rec.label, spawned.pid, rec.port, " (held socket)" if listener is not None else "")

    def spawn(self, srv: Server, token: str, listener: Listener | None, now: float) -> InstanceRuntime | Failure:
        """One instance's process: its log, its environment and token, the held socket as fd 3
        and a notify socket for its READY=1 where the server takes them."""
        rec, spec = srv.rec, srv.spec
        launch = get_backend(spec.kind).launch(spec, rec.port, rec.gpus, socket=listener is not None)
        assert launch is not None
        env = server_environment(spec, launch, rec.port, rec.gpus, token, self.store.root / "cache", self.store.root)
        program = launch.argv[0]
        mark = f"starting {rec.label}: {one_line(shlex.join(launch.argv))}" + (
            " (on the held socket, as fd 3)" if listener is not None else ""
        )
        notify: NotifySocket | None = None
        pass_fds: tuple[int, ...] = ()
        if listener is not None:
            env.update(activation_env(), MODELCTL_BACKLOG=str(spec.backlog))
            launch = dataclasses.replace(launch, argv=activation_argv(launch.argv, listener.fileno()))
            pass_fds = (listener.fileno(),)
            if spec.notify:
                notify = NotifySocket(token)
                env["NOTIFY_SOCKET"] = notify.address
                # the instance keeps a copy: a READY=1 said while no supervisor runs waits in it
                pass_fds = (*pass_fds, notify.pass_fd)
        log_fd = None
        try:
            if self.log_to_files:
                path = self.store.log_path(rec.ref)
                self.store.ensure(path.parent)
                log_fd = logfiles.open_for_append(path)
                logfiles.write_mark(log_fd, mark, now)
            handle = self.procs.spawn(launch, env, log_fd, pass_fds)
            return InstanceRuntime(token, handle, notify, listener)
        except OSError as e:
            if notify is not None:
                notify.close()
            what = "missing-executable" if isinstance(e, FileNotFoundError) and e.filename == program else "cannot-start"
            return Failure(what, f"cannot run {program!r}: {e.strerror or e}", False)
        finally:
            if log_fd is not None:
                os.close(log_fd)

    # ------------------------------------------------------------------ verbs: the held socket
    def uses_socket(self, srv: Server) -> bool:
        refused = srv.slot.no_socket or isinstance(srv.rec.socket_mode, NotHeld)
        return srv.spec.socket and not refused and srv.rec.port is not None

    def hold_socket(self, srv: Server, keep_old: bool) -> Listener | str:
        """The server's socket at its address, bound once for the server's life (a changed address is
        a new socket); why not, if it cannot."""
        rec, spec = srv.rec, srv.spec
        assert rec.port is not None
        try:
            listener = self.held.hold(rec.ref, spec.host, rec.port, spec.backlog, keep_old=keep_old)
        except OSError as e:
            holder = self.procs.port_holder(rec.port, spec.host) or f"port {rec.port}: {e.strerror or e}"
            return f"cannot hold the port: {holder}"
        rec.set_socket(HELD)
        return listener

    def _without_socket(self, srv: Server, why: str) -> None:
        """The server said it cannot serve from a handed socket (a vLLM whose internals differ):
        run it the plain way from now on, and say so in status."""
        srv.slot.no_socket = why
        srv.rec.set_socket(NotHeld(why))
        self.held.close(srv.rec.ref)
        log.warning("%s: runs without a held socket: %s", srv.label, why)

    def close_sockets(self, ref: ServerRef) -> None:
        if self.held.close(ref):
            slot = self.slots.get(ref)
            if slot is not None and slot.rec is not None and slot.rec.socket_mode == HELD:
                slot.rec.set_socket(NO_SOCKET)
            log.info("%s: closed its listening socket", ref)

    # ------------------------------------------------------------------ verbs: members and footprints
    def _record_members(self, srv: Server, now: float) -> None:
        """Remember the leader's descendants: the proof for ones that later clear their environment."""
        slot = srv.slot
        if slot.current is None:
            return
        if now < slot.next_members_at:
            slot.wake_at(slot.next_members_at)
            return
        # on a common grid, so that one scan of the process table serves every server
        slot.next_members_at = (math.floor(now / MEMBERS_SECONDS) + 1) * MEMBERS_SECONDS
        slot.wake_at(slot.next_members_at)
        seen = set(srv.rec.instance.member_identities if srv.rec.instance else ())
        seen.update(self._descendants(now).get(slot.current.pid, []))
        alive = sorted((i.pid, i.create_time) for i in seen if self.procs.is_alive(i))[-MEMBERS_KEPT:]
        lc.saw_members(srv.rec, [[p, c] for p, c in alive])

    def _descendants(self, now: float) -> dict[int, list[ProcessIdentity]]:
        if self._descendants_at is None or abs(now - self._descendants_at) >= 1.0:
            leaders = [s.current.ident for s in self.slots.values() if s.current is not None]
            self._descendants_cache, self._descendants_at = self.procs.descendants(leaders), now
        return self._descendants_cache

    def measure(self) -> None:
        """The footprint of each ready server, as measured now over all of its instance's processes
        (its group, its descendants and its recorded members: a daemon that left the tree counts):
        its largest replaces what is declared."""
        ready = {ref: s for ref, s in self.slots.items() if s.rec is not None and s.rec.state == lc.READY and s.current is not None}
        if not ready:
            return
        members = {
            s.current.pid: list(s.rec.instance.member_identities)
            for s in ready.values()
            if s.current is not None and s.rec is not None and s.rec.instance
        }
        usage = usage_by_leader([s.current.ident for s in ready.values() if s.current is not None], members=members)
        gpu_usage = gpu_memory_by_pid() if any(s.rec is not None and s.rec.gpus for s in ready.values()) else None
        for ref, s in ready.items():
            assert s.current is not None and s.rec is not None
            used = usage.get(s.current.pid)
            if used is None:
                continue
            gpu = group_gpu_memory(list(used.pids), gpu_usage)
            per_gpu = gpu // len(s.rec.gpus) if gpu and s.rec.gpus else None
            self.change(ref, functools.partial(lc.measured, rss=used.rss, gpu=per_gpu))

    def change(self, ref: ServerRef, fn: Callable[[ServerRecord], None]) -> None:
        """Change one record from outside a tick (chores), through the cache, under the lock."""
        slot = self.slots.get(ref)
        if slot is None:
            return
        with self.store.locked():
            if slot.rec is None or self.store.stamp(ref) != slot.stamp:
                loaded = self.store.load(ref)
                if not isinstance(loaded, ServerRecord):
                    return
                slot.rec, slot.stamp, slot.saved = loaded, self.store.stamp(ref), loaded.to_json()
            fn(slot.rec)
            self.save_if_changed(slot.rec, slot, self.clock())

    # ------------------------------------------------------------------ verbs: stop
    def replace_stop_first(self, srv: Server, now: float) -> None:
        """The spec changed (or a restart was asked) and the new instance cannot start beside the old
        one: stop the running instance; the next tick starts the new one (its socket held meanwhile)."""
        log.info("%s: replacing the running instance (stop first)", srv.label)
        inst = srv.rec.instance
        why = "replacing: the spec changed" if inst is not None and inst.fingerprint != srv.rec.fingerprint else "restarting"
        lc.begin_stop(srv.rec, self.me, "running", why)
        self.begin_stop(srv.rec, srv.slot, srv.spec, AfterStop.STOP, now)

    def _take_over_stop(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        """A stop is under way. If whoever began it is gone (Ctrl-C), carry it out ourselves."""
        stopper = rec.instance.stopper if rec.instance else None
        mine = self.me is not None and stopper == self.me
        if stop_owner_alive(rec) and not mine:
            self._collect_child(slot)
            if slot.current is not None:
                slot.wake_at(self.clock() + ADOPTED_POLL_SECONDS)
            return
        log.info("%s: finishing a stop its command left behind", rec.label)
        lc.take_over_stop(rec, self.me)
        self.begin_stop(rec, slot, self._spec(rec, slot), AfterStop.STOP, now)

    def begin_stop(
        self,
        rec: ServerRecord,
        slot: Slot,
        spec: ServerSpec | None,
        after: AfterStop,
        now: float,
        failure: Failure | None = None,
        exit: Exit | None = None,
        evicted_for: str | None = None,
    ) -> None:
        """Stop every instance of the server in the background (a successor that was starting
        beside it too); `after` says what follows.

        No port check here: the next start checks its port and names a holder.
        """
        if slot.successor is not None or rec.successor is not None:
            self.retire_successor(Server(rec, slot, spec) if spec is not None else None, rec, slot, now)
        target = dataclasses.replace(target_of(rec, spec), port=None)
        inst, slot.current = slot.current, None
        if inst is not None and inst.notify is not None:
            inst.notify.close()
            inst.notify = None
        slot.health = HealthState()
        timeout = spec.stop_timeout if spec is not None else DEFAULT_STOP_TIMEOUT
        if after is AfterStop.CRASH:
            timeout = min(timeout, CRASH_CLEANUP_SECONDS)

        def stop() -> StopResult:
            result = self.procs.stop(target, timeout)
            if inst is not None:
                inst.reap()
            return result

        slot.stop = StopJob(self._submit(self.stop_executor, slot, stop), after, rec.token, inst, failure, exit, evicted_for)
        if slot.stop.future.done():  # an inline executor (tests): finish in the same tick
            self._stop_done(rec, slot, now)

    def retire(self, srv_label: str, slot: Slot, target: StopTarget, inst: InstanceRuntime | None, timeout: float) -> None:
        """Stop a replaced (or failed new) instance in the background; nothing waits for it. Its old
        socket, if its address changed, closes once it is gone."""
        if inst is not None and inst.notify is not None:
            inst.notify.close()
            inst.notify = None

        def stop() -> StopResult:
            result = self.procs.stop(target, timeout)
            if inst is not None:
                inst.reap()
            return result

        fut = self._submit(self.stop_executor, slot, stop)
        slot.retiring.append((fut, inst))
        if fut.done():
            self._collect_retired(slot)

    def retire_successor(self, srv: Server | None, rec: ServerRecord, slot: Slot, now: float) -> None:
        """The successor that was starting goes with the instance it was to replace."""
        target = successor_target(rec)
        inst, slot.successor = slot.successor, None
        if target is not None or inst is not None:
            spec = srv.spec if srv is not None else None
            leader_first = spec is not None and get_backend(spec.kind).stops_leader_first(spec)
            if target is None:
                assert inst is not None
                target = StopTarget(f"{rec.label} (new instance)", inst.ident, inst.token, ())
            self.retire(
                rec.label,
                slot,
                dataclasses.replace(target, leader_first=leader_first),
                inst,
                spec.stop_timeout if spec else DEFAULT_STOP_TIMEOUT,
            )
        if inst is not None and inst.listener is not None and slot.current is not None and inst.listener is not slot.current.listener:
            self.held.restore(rec.ref, slot.current.listener)  # the serving instance's address stays the server's
        lc.lost_successor(rec)

    def _collect_retired(self, slot: Slot) -> None:
        for fut, inst in [r for r in slot.retiring if r[0].done()]:
            slot.retiring.remove((fut, inst))
            if inst is not None:
                inst.close()
                self.held.release(inst.listener)

    def _stop_done(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        job, slot.stop = slot.stop, None
        assert job is not None
        try:
            result = job.future.result()
        except Exception as e:
            log.error("%s: stopping failed: %s", rec.label, e)
            result = StopResult("failed")
        if job.instance is not None:
            job.instance.close()
            self.held.release(job.instance.listener)
        if rec.token != job.token:
            return  # someone else has moved the record on since
        slot.wake_at(now)
        if job.after is AfterStop.CRASH and rec.state == lc.CRASHED:
            spec = self._spec(rec, slot)
            if spec is not None:
                self._after_crash(Server(rec, slot, spec), now, job.failure, job.failure_exit)
        elif job.after is AfterStop.STOP and rec.state == lc.STOPPING:
            finish_stop(rec, job.token, result)
        elif job.after is AfterStop.REST and rec.state == lc.STOPPING:
            lc.rested(rec, job.token, now, job.evicted_for)
            slot.demand.last_requests = None

    def _spec(self, rec: ServerRecord, slot: Slot) -> ServerSpec | None:
        """The record's spec, parsed once per change of the record's spec (its fingerprint)."""
        if slot.spec is None or slot.spec_key != rec.fingerprint:
            spec = record_spec(rec)
            if spec is None:
                lc.spec_unreadable(rec)
                return None
            slot.spec, slot.spec_key = spec, rec.fingerprint
            slot.external = get_backend(spec.kind).is_external(spec)
        return slot.spec

    # ------------------------------------------------------------------ plumbing
    def submit(self, slot: Slot, fn: Callable[..., Any], *args: Any, quiet: Callable[[Any], bool] | None = None) -> Future[Any]:
        """Slow work (a probe, a preparation) off the loop; its completion wakes the loop at once,
        unless `quiet` says the result changes nothing (a passing probe of a ready server): then the
        loop collects it on its next wake-up, so that idle servers cost no wake-ups of their own."""
        return self._submit(self.executor, slot, fn, *args, quiet=quiet)

    def _submit(
        self, executor: Any, slot: Slot, fn: Callable[..., Any], *args: Any, quiet: Callable[[Any], bool] | None = None
    ) -> Future[Any]:
        fut: Future[Any] = executor.submit(fn, *args)

        def done(f: Future[Any]) -> None:
            slot.dirty = True
            if quiet is not None and not f.cancelled() and f.exception() is None and quiet(f.result()):
                return
            self.on_wake()

        fut.add_done_callback(done)
        return fut

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False)
        for slot in self.slots.values():
            for inst in slot.instances():
                close_pidfd(inst.handle)
        # the held sockets close with us: running instances keep their own copies and serve on;
        # the next supervisor takes them back from the instances (pidfd_getfd)
        self.held.shutdown()
