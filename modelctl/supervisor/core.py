"""The supervisor's reconcile logic: it keeps the servers that should run running.

Each tick reconciles the records that need it — desired vs actual — through a few verbs, in the
manner of gunicorn's arbiter: `reap` (notice exits), the health watch (warm-up, preparation,
hung servers: modelctl/supervisor/health_watch.py), `start` (first start, restarts after backoff) and
`begin_stop` (in the background: never under the state lock). A record needs a tick when its
file changed, when an event arrived for it (a child exited, a probe or a stop finished) or when
one of its timers is due; an idle supervisor touches nothing. Time, process control and the
executors for slow work are injected, so the restart logic is tested with a fake clock in
milliseconds. One bad record never stops the loop: each is reconciled under its own guard.

A start saves its intent (state `starting` and the instance's token) before it spawns: a
process is never without a record that names it, so a supervisor that dies right after a spawn
leaves a token by which the next one finds and adopts the process instead of starting another.

The loop around it (signals, the wake-up pipe, exit policies) is modelctl/supervisor/runner.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import shlex
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from modelctl.backends import get_backend
from modelctl.backends.base import Launch
from modelctl.failures import EXIT_NO_SOCKET, Exit, Failure, classify_exit, explaining_line
from modelctl.host import logfiles
from modelctl.host.engine_metrics import Scrape, scrape
from modelctl.host.files import DiskError
from modelctl.host.gpus import gpu_memory_by_pid, group_gpu_memory
from modelctl.host.health import ProbeResult, probe
from modelctl.host.identity import ProcessIdentity, identity_of, is_alive
from modelctl.host.ports import describe_port_in_use, is_port_free
from modelctl.host.process import (
    INSTANCE_VAR,
    StopResult,
    StopTarget,
    descendants_by_leader,
    leader_by_token,
    spawn_detached,
    stop_processes,
    usage_by_leader,
)
from modelctl.host.sockets import Listener, NotifySocket, activation_argv, activation_env, established, take_from_process
from modelctl.names import ServerRef
from modelctl.profile import record_spec
from modelctl.sanitize import one_line
from modelctl.spec import ServerSpec
from modelctl.state import lifecycle as lc
from modelctl.state import restart
from modelctl.state.record import Instance, ServerRecord
from modelctl.state.store import BrokenRecord, LockTimeout, Stamp, StateStore
from modelctl.supervisor import budget
from modelctl.supervisor.health_watch import HealthWatch
from modelctl.supervisor.stopping import DEFAULT_STOP_TIMEOUT, finish_stop, stop_owner_alive, target_of

log = logging.getLogger("modelctl.supervisor.core")

MEMBERS_SECONDS = 5.0  # how often a server's descendants are looked at (one /proc scan for all)
MEMBERS_KEPT = 256
ADOPTED_POLL_SECONDS = 0.5  # a process that is not our child, where no pidfd tells of its exit
CRASH_CLEANUP_SECONDS = 3.0  # the leader is gone; what is left of it gets little grace


@dataclass
class Handle:
    """A running server process: our child (popen) or adopted from an earlier supervisor."""

    ident: ProcessIdentity
    popen: Any = None
    pidfd: int | None = None  # readable once an adopted process exits (Linux pidfd_open)


class ProcessControl(Protocol):
    """What the supervisor does to processes, ports and servers; tests pass a fake."""

    def spawn(self, launch: Launch, env: dict[str, str], log_fd: int | None, pass_fds: tuple[int, ...] = ()) -> Handle: ...

    def exit_status(self, handle: Handle) -> tuple[bool, Exit]: ...

    def is_alive(self, ident: ProcessIdentity) -> bool: ...

    def find_leader(self, token: str) -> ProcessIdentity | None: ...

    def stop(self, target: StopTarget, timeout: float) -> StopResult: ...

    def port_holder(self, port: int, host: str) -> str | None: ...

    def probe(self, spec: ServerSpec, url: str) -> ProbeResult: ...

    def descendants(self, leaders: list[ProcessIdentity]) -> dict[int, list[ProcessIdentity]]: ...


class RealProcesses:
    """The real processes, ports and probes."""

    def spawn(self, launch: Launch, env: dict[str, str], log_fd: int | None, pass_fds: tuple[int, ...] = ()) -> Handle:
        popen, ident = spawn_detached(launch.argv, env, log_fd, cwd=launch.cwd, pass_fds=pass_fds)
        return Handle(ident, popen)

    def exit_status(self, handle: Handle) -> tuple[bool, Exit]:
        """(exited, how); the exit is unknown (neither code nor signal) for a process not our child."""
        if handle.popen is not None:
            rc = handle.popen.poll()
            return (rc is not None, Exit.of(rc) if rc is not None else Exit())
        return (not is_alive(handle.ident), Exit())

    def is_alive(self, ident: ProcessIdentity) -> bool:
        return is_alive(ident)

    def find_leader(self, token: str) -> ProcessIdentity | None:
        return leader_by_token(token)

    def stop(self, target: StopTarget, timeout: float) -> StopResult:
        return stop_processes(target, timeout)

    def port_holder(self, port: int, host: str) -> str | None:
        return None if is_port_free(port, host) else describe_port_in_use(port, host)

    def probe(self, spec: ServerSpec, url: str) -> ProbeResult:
        return probe(spec.health, url)

    def descendants(self, leaders: list[ProcessIdentity]) -> dict[int, list[ProcessIdentity]]:
        return descendants_by_leader(leaders)


class InlineExecutor:
    """Runs submitted work at once; for tests that want a deterministic supervisor."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


class ThreadPerJob:
    """Each job in a thread of its own: stops never wait for each other, nor for probes."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        threading.Thread(target=run, name="modelctl-stop", daemon=True).start()
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


# what to do once a background stop is done
AFTER_CRASH = "crash"  # a failed instance's leftovers are gone: back off, fail, or stay down
AFTER_STOP = "stop"  # a deliberate stop (down whose owner died, a replaced spec): stopped
AFTER_REST = "rest"  # an on-demand server stopped when idle, or evicted for another's memory: idle again


EVICTION_LOOK = 0.5  # seconds: how fresh a look at a server's requests in flight must be to evict it
EVICTION_PATIENCE = 120.0  # seconds a start waits for them before it evicts anyway (a connection held open forever)


@dataclass
class Slot:
    """The supervisor's in-memory view of one server: its record as last read, what is in flight."""

    rec: ServerRecord | None = None
    stamp: Stamp | None = None
    saved: dict[str, Any] | None = None  # the record as on disk, to tell whether a tick changed it
    handle: Handle | None = None
    probe: Future[ProbeResult] | None = None
    probe_submitted: float = 0.0
    prepare: Future[dict[str, Any]] | None = None
    prepare_started: float | None = None
    stop: Future[StopResult] | None = None
    after_stop: str = ""
    stop_token: str | None = None
    failure: Failure | None = None  # the failure whose leftovers are being stopped
    failure_exit: Exit | None = None
    next_probe_at: float = 0.0
    next_members_at: float = 0.0
    unhealthy_since: float | None = None
    starved: float = 0.0  # seconds the startup probes waited for a worker: not held against startup_timeout
    prepared: bool = False
    progress: dict[str, Any] | None = None
    spec: ServerSpec | None = None
    spec_key: str = ""
    external: bool = False  # lives elsewhere (an external Ollama): probed and prepared, never spawned
    broken_reported: str = ""
    due: float = 0.0  # the next time a timer of this server fires
    dirty: bool = True  # an event arrived for it since its last tick
    members: list[list[float]] = field(default_factory=list)
    notify: NotifySocket | None = None  # where the current instance says READY=1
    notified: bool = False
    successor_handle: Handle | None = None  # a new instance starting beside the current one
    successor_notify: NotifySocket | None = None
    successor_notified: bool = False
    retiring: list[Future[StopResult]] = field(default_factory=list)  # stops of replaced instances
    no_socket: str = ""  # why this server runs without a held socket (a vLLM whose internals differ)
    # on demand
    waiting_for_budget: bool = False  # a start waits for evicted servers to free their memory
    evicted_for: str | None = None  # the reason of an eviction under way
    activity: Future[tuple[Scrape | None, int | None]] | None = None
    next_activity_at: float = 0.0
    last_requests: float | None = None
    in_flight: int = 0  # requests the server was serving at its last look (or clients connected)
    waiting_for_requests_since: float | None = None  # a start waits for another's requests in flight
    activity_at: float = 0.0  # when that look was taken

    def busy(self) -> bool:
        jobs = (self.probe, self.prepare, self.stop, *self.retiring)
        return any(f is not None and not f.done() for f in jobs) or self.successor_handle is not None

    def wake_at(self, when: float | None) -> None:
        if when is not None and when < self.due:
            self.due = when


@dataclass
class Server:
    """One server in a tick: its record, its slot and its spec, passed to the verbs together."""

    rec: ServerRecord
    slot: Slot
    spec: ServerSpec

    @property
    def label(self) -> str:
        return self.rec.label


def server_environment(
    spec: ServerSpec,
    launch: Launch,
    port: int | None,
    gpus: list[int],
    instance: str,
    cache_dir: Path | str = ".",
    state_dir: Path | None = None,
) -> dict[str, str]:
    """The environment a server starts with: ours, the kind's, the profile's, its GPUs and its token."""
    env = dict(os.environ)
    for inherited in (INSTANCE_VAR, "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(inherited, None)  # ours (under systemd, modelctl run's own) are never the server's
    env.update(launch.env)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    env["MODELCTL_SERVER"] = str(spec.ref)
    env.setdefault("MODELCTL_CACHE_DIR", str(cache_dir))
    if port is not None:
        env["MODELCTL_PORT"] = str(port)
    if state_dir is not None:
        env["MODELCTL_STATE_DIR"] = str(Path(state_dir).resolve())  # where the gateway reads the records
    env.update(spec.env)  # the profile has the last word...
    env[INSTANCE_VAR] = instance  # ...but for the proof that a process is this instance's
    return env


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
        self.health = HealthWatch(self)
        self._descendants_cache: dict[int, list[ProcessIdentity]] = {}
        self._descendants_at: float | None = None
        self.listeners: dict[ServerRef, Listener] = {}  # the sockets held across an instance's restarts

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
                slot.rec = slot.stamp = slot.saved = None  # what is on disk is the truth: read it again
                slot.wake_at(now + 1.0)
            except Exception:
                log.exception("%s: error while supervising it; trying again next tick", ref)
                slot.rec = slot.stamp = slot.saved = None
                slot.wake_at(now + 1.0)

    def forget(self, ref: ServerRef) -> None:
        """A record that is gone: whatever we held for it is let go (its socket is closed)."""
        slot = self.slots.pop(ref, None)
        if slot is not None:
            if slot.handle is not None:
                close_pidfd(slot.handle)
            for notify in (slot.notify, slot.successor_notify):
                if notify is not None:
                    notify.close()
        self.close_listener(ref)

    def _needs_tick(self, ref: ServerRef, slot: Slot, now: float, look_at_file: bool) -> bool:
        if slot.dirty or now >= slot.due or slot.rec is None:
            return True
        if slot.handle is not None and slot.handle.popen is not None and slot.handle.popen.poll() is not None:
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
            h = slot.handle
            if h is None:
                continue
            if handle_pidfds is None or (h.pidfd is not None and h.pidfd in handle_pidfds):
                slot.dirty = True

    def pidfds(self) -> list[int]:
        return [s.handle.pidfd for s in self.slots.values() if s.handle is not None and s.handle.pidfd is not None]

    def notify_fds(self) -> list[int]:
        """Where instances say READY=1: the runner waits on them with everything else."""
        return [n.fileno() for s in self.slots.values() for n in (s.notify, s.successor_notify) if n is not None]

    def on_notify(self, fds: set[int]) -> None:
        """Read what instances said on their notify sockets; a READY=1 gets its server a tick."""
        for slot in self.slots.values():
            for which in ("notify", "successor_notify"):
                sock: NotifySocket | None = getattr(slot, which)
                if sock is None or sock.fileno() not in fds:
                    continue
                said = sock.read()
                if said.ready:
                    if which == "notify":
                        slot.notified = True
                    else:
                        slot.successor_notified = True
                    slot.dirty = True

    def reconcile(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        if not rec.wants_running:
            self.close_listener(rec.ref)  # down: new connections are refused from now on
        if slot.stop is not None:
            if not slot.stop.done():
                return
            self._stop_done(rec, slot, now)
        if rec.state == lc.STOPPING:
            self._take_over_stop(rec, slot, now)
            return
        if not rec.wants_running:
            self._collect_child(slot)  # the stopper stops the process; we only collect our child
            return
        if rec.state == lc.FAILED:
            self.close_listener(rec.ref)  # nothing will serve: clients are refused, not left waiting
            return
        spec = self._spec(rec, slot)
        if spec is None:
            return
        srv = Server(rec, slot, spec)
        on_demand = spec.start == "on-demand"
        if rec.state in lc.ALIVE:
            if not self._reap_or_adopt(srv, now):
                return
            if rec.outdated or rec.successor is not None:
                if not self._overlaps(srv):
                    self._replace(srv, now)
                    return
                self._take_over(srv, now)
            self._record_members(srv, now)
            self.health.check(srv, now)
            if on_demand and rec.state in (lc.READY, lc.UNHEALTHY) and rec.successor is None:
                self._watch_idleness(srv, now)
        elif rec.state == lc.STOPPED:
            if on_demand and rec.wish.warm <= rec.usage.warmed:
                self._arm(srv, now)
            else:
                self._start(srv, now)
        elif rec.state == lc.IDLE:
            self._idle(srv, now)
        elif rec.state == lc.BACKOFF:
            self._start_if_due(srv, now)
        elif rec.state == lc.CRASHED:
            # a supervisor died while cleaning up after a crash: finish that first
            self.begin_stop(srv.rec, srv.slot, srv.spec, AFTER_CRASH, now)

    # ------------------------------------------------------------------ verbs: exits
    def _collect_child(self, slot: Slot) -> None:
        if slot.handle is not None and self.procs.exit_status(slot.handle)[0]:
            close_pidfd(slot.handle)
            slot.handle = None

    def _reap_or_adopt(self, srv: Server, now: float) -> bool:
        """Notice an exit (→ crashed); adopt a live server an earlier supervisor started."""
        rec, slot = srv.rec, srv.slot
        if slot.external:
            return True
        if (slot.handle is None or slot.handle.ident.pid != rec.pid) and not self._adopt(srv):
            failure = Failure("crash", "exited while no supervisor was watching", True)
            if rec.pid is None:
                failure = Failure("crash", "the start was interrupted: no process carries its token", True)
            self.crash(srv, now, Exit(), failure)
            return False
        assert slot.handle is not None
        exited, exit = self.procs.exit_status(slot.handle)
        if exited:
            lines = logfiles.since_last_start(self.store.log_path(rec.ref)) if self.log_to_files else []
            if exit.code == EXIT_NO_SOCKET and self.uses_socket(srv):
                self._without_socket(srv, explaining_line(lines) or "the server cannot take a socket")
            self.crash(srv, now, exit, classify_exit(exit, lines))
            return False
        if slot.handle.popen is None and slot.handle.pidfd is None:
            slot.wake_at(now + ADOPTED_POLL_SECONDS)
        return True

    def _adopt(self, srv: Server) -> bool:
        """Take on a live instance: by its recorded identity, or (never recorded) by its token."""
        rec, slot = srv.rec, srv.slot
        ident = rec.leader
        found_by_token = False
        if ident is None and rec.token:
            ident, found_by_token = self.procs.find_leader(rec.token), True
        if ident is None or not self.procs.is_alive(ident):
            return False
        if slot.handle is not None:
            close_pidfd(slot.handle)
        slot.handle = Handle(ident, None, open_pidfd(ident))
        slot.prepared = rec.state in (lc.READY, lc.UNHEALTHY)
        slot.notified = rec.state in (lc.READY, lc.UNHEALTHY)
        if found_by_token:
            lc.spawned(rec, ident, "adopted: started by a supervisor that died before recording it")
        log.info("%s: adopted running pid %s (%s)", rec.label, ident.pid, rec.state)
        if self.uses_socket(srv) and rec.ref not in self.listeners and rec.port:
            held = take_from_process(ident.pid, rec.port, srv.spec.host)
            if held is not None:
                self.listeners[rec.ref] = held
                rec.socket = "held"
                log.info("%s: took its listening socket back from pid %s", rec.label, ident.pid)
            else:
                rec.socket = "held by the instance: modelctl takes it again when the instance restarts"
        return True

    def crash(self, srv: Server, now: float, exit: Exit | None, failure: Failure) -> None:
        """A failure: count it, remember it, and stop what is left of the instance first (and a
        successor that was starting beside it: the crash path starts a fresh one)."""
        if srv.rec.successor is not None:
            self._retire(srv, srv.rec.successor, srv.slot.successor_handle, srv.slot.successor_notify, now)
            srv.slot.successor_handle, srv.slot.successor_notify, srv.slot.successor_notified = None, None, False
            lc.lost_successor(srv.rec)
        lc.crashed(srv.rec, now, exit, failure, srv.spec.restart)
        srv.slot.failure, srv.slot.failure_exit = failure, exit
        self.begin_stop(srv.rec, srv.slot, srv.spec, AFTER_CRASH, now)

    def _after_crash(self, srv: Server, now: float) -> None:
        """The failed instance is gone: back off, give up (failed) or stay down per the policy."""
        rec, slot = srv.rec, srv.slot
        failure = slot.failure or Failure("crash", rec.history.last_error or "", True)
        exit = slot.failure_exit if slot.failure is not None else rec.history.last_exit
        slot.failure = slot.failure_exit = None
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
            self._start(srv, now)
        else:
            srv.slot.wake_at(due)

    def _start(self, srv: Server, now: float, wake: str | None = None) -> None:
        """Save the intent, then spawn: the token names the process before it exists. Within the
        budget: servers that must make room are stopped first, and the start waits for them.

        `wake`: an idle on-demand server starts ("client": one waits; "warm": `up --now`)."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        if not self._admitted(srv, now):
            return
        if wake is not None:
            lc.woke(rec, uuid.uuid4().hex, now, warm=wake == "warm")
        else:
            lc.intend_start(rec, uuid.uuid4().hex, now)
        slot.prepared, slot.unhealthy_since, slot.next_probe_at, slot.starved = False, None, now, 0.0
        slot.probe = slot.prepare = None
        self._drop_instance_handles(slot)
        slot.wake_at(now)
        if get_backend(spec.kind).is_external(spec):  # lives elsewhere: nothing to spawn, only to probe and prepare
            lc.external_start(rec)
            return
        if self.uses_socket(srv):
            problem = self._hold_socket(srv)
        else:
            holder = self.procs.port_holder(rec.port, spec.host) if rec.port else None
            problem = f"cannot start: {holder}" if holder else None
        if problem:
            self.crash(srv, now, None, Failure("address-in-use", problem, True))
            return
        self.save_if_changed(rec, slot, now)  # the intent: a DiskError here means nothing is spawned
        assert rec.instance is not None
        spawned = self._spawn(srv, rec.instance.token, now)
        if isinstance(spawned, Failure):
            lc.failed_to_start(rec, spawned, now)
            log.error("%s: %s", rec.label, rec.history.last_error)
            return
        slot.handle, slot.notify = spawned
        slot.notified = False
        slot.next_probe_at = now + self.health.startup_probe_seconds
        slot.wake_at(slot.next_probe_at)
        lc.spawned(rec, slot.handle.ident)
        log.info(
            "%s: started pid %s on port %s%s",
            rec.label,
            slot.handle.ident.pid,
            rec.port,
            " (held socket)" if slot.notify or self.uses_socket(srv) else "",
        )

    def _spawn(self, srv: Server, token: str, now: float) -> tuple[Handle, NotifySocket | None] | Failure:
        """One instance's process: its log, its environment and token, the held socket as fd 3
        and a notify socket for its READY=1 where the server takes them."""
        rec, spec = srv.rec, srv.spec
        listener = self.listeners.get(rec.ref) if self.uses_socket(srv) else None
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
        log_fd = None
        try:
            if self.log_to_files:
                path = self.store.log_path(rec.ref)
                self.store.ensure(path.parent)
                log_fd = logfiles.open_for_append(path)
                logfiles.write_mark(log_fd, mark, now)
            return self.procs.spawn(launch, env, log_fd, pass_fds), notify
        except OSError as e:
            if notify is not None:
                notify.close()
            what = "missing-executable" if isinstance(e, FileNotFoundError) and e.filename == program else "cannot-start"
            return Failure(what, f"cannot run {program!r}: {e.strerror or e}", False)
        finally:
            if log_fd is not None:
                os.close(log_fd)

    # ------------------------------------------------------------------ verbs: on demand, and the budget
    def _arm(self, srv: Server, now: float) -> None:
        """An on-demand server waits for its first client: the socket held, no process."""
        problem = self._hold_socket(srv)
        if problem:
            srv.rec.detail = problem
            srv.slot.wake_at(now + 2.0)
            return
        lc.armed(srv.rec)
        srv.rec.detail = "idle: starts when a client connects"
        log.info("%s: armed on %s:%s (on demand)", srv.label, srv.spec.host, srv.rec.port)

    def _idle(self, srv: Server, now: float) -> None:
        """An idle on-demand server: start it when a connection waits in its backlog (noticed,
        never accepted: the server accepts it), or when `up --now` asks to warm it up."""
        rec, slot = srv.rec, srv.slot
        problem = self._hold_socket(srv)  # a restarted supervisor binds it again: nothing runs
        if problem:
            rec.detail = problem
            slot.wake_at(now + 2.0)
            return
        warm = rec.wish.warm > rec.usage.warmed
        listener = self.listeners.get(rec.ref)
        pending = listener is not None and listener.pending()
        if not (warm or pending):
            rec.detail = "idle: starts when a client connects"
            return
        if pending:
            lc.client_waiting(rec, now)
        self._start(srv, now, wake="warm" if warm and not pending else "client")

    def _admitted(self, srv: Server, now: float) -> bool:
        """May the server start now under its budget? If others must make room, stop them and wait."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        records = [(s.rec, s.spec) for s in self.slots.values() if s.rec is not None]
        decision = budget.admit(rec, spec, records)
        if isinstance(decision, budget.Admit):
            slot.waiting_for_budget = False
            slot.waiting_for_requests_since = None
            return True
        if isinstance(decision, budget.Refuse):
            slot.waiting_for_budget = False
            lc.refused_by_budget(rec, decision.reason)
            self.close_listener(rec.ref)
            log.error("%s: %s", rec.label, decision.reason)
            return False
        if isinstance(decision, budget.Evict):
            serving = self._serving_requests(decision.victims, now)
            since = slot.waiting_for_requests_since = slot.waiting_for_requests_since or now
            if serving and now - since < EVICTION_PATIENCE:
                rec.detail = f"waiting for memory: {decision.reason}; {serving} first"
                slot.waiting_for_budget = True
                slot.wake_at(now + 0.25)
                return False
            if serving:  # a client that holds a connection open forever must not keep this one waiting forever
                log.warning("%s: evicting after %.0fs although %s", rec.label, now - since, serving)
            slot.waiting_for_requests_since = None
            for victim in decision.victims:
                self._evict(victim, decision.reason, now)
        rec.detail = f"waiting for memory: {decision.reason}"
        slot.waiting_for_budget = True
        slot.wake_at(now + 0.25)
        return False

    def _serving_requests(self, victims: tuple[ServerRef, ...], now: float) -> str:
        """Which servers to evict are still serving requests (or were not looked at just now: a
        fresh look is taken); empty when all of them may be stopped. A server is never evicted
        with requests in flight: the start that needs its memory waits for them."""
        waiting = []
        for ref in victims:
            vslot = self.slots.get(ref)
            if vslot is None or vslot.rec is None or vslot.spec is None:
                continue
            if now - vslot.activity_at > EVICTION_LOOK:
                if vslot.activity is None:
                    url = self.health.url(Server(vslot.rec, vslot, vslot.spec))
                    vslot.activity = self.submit(vslot, activity_of, url, vslot.rec.port)
                waiting.append(f"looking at {ref}'s requests in flight")
            elif vslot.in_flight > 0:
                waiting.append(f"{ref} finishes its {vslot.in_flight} request(s) in flight")
        return ", ".join(waiting)

    def _evict(self, ref: ServerRef, reason: str, now: float) -> None:
        """Stop an on-demand server to make room (it goes back to idle, its socket held)."""
        vslot = self.slots.get(ref)
        if vslot is None or vslot.rec is None or vslot.spec is None or vslot.rec.state not in budget.EVICTABLE:
            return
        victim = Server(vslot.rec, vslot, vslot.spec)
        log.info("%s: evicted: %s", victim.label, reason)
        vslot.evicted_for = reason
        self._rest(victim, now, f"evicted: {reason}")
        self.save_if_changed(victim.rec, vslot, now)

    def _rest(self, srv: Server, now: float, why: str) -> None:
        lc.begin_rest(srv.rec, self.me, why)
        self.begin_stop(srv.rec, srv.slot, srv.spec, AFTER_REST, now)

    def _watch_idleness(self, srv: Server, now: float) -> None:
        """A ready on-demand server is stopped after idle_timeout without a request. Requests are
        seen in its own counters (the bundled server, vLLM), else in its established connections."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        if slot.activity is not None and slot.activity.done():
            fut, slot.activity = slot.activity, None
            scraped, connections = fut.result() if fut.exception() is None else (None, None)
            slot.in_flight = int(scraped.in_progress) if scraped is not None else (connections or 0)
            slot.activity_at = now
            if scraped is not None:
                moved = slot.last_requests is not None and scraped.requests != slot.last_requests
                busy = moved or scraped.in_progress > 0
                slot.last_requests = scraped.requests
            else:
                busy = bool(connections)
            if busy:
                lc.active(rec, now)
        if slot.activity is None and now >= slot.next_activity_at:
            slot.next_activity_at = now + max(0.5, min(spec.idle_timeout / 4, 5.0))
            slot.activity = self.submit(slot, activity_of, self.health.url(srv), rec.port, quiet=lambda _: True)
        since = rec.usage.last_active or (rec.instance.ready_at if rec.instance else None) or now
        if now - since >= spec.idle_timeout:
            log.info("%s: idle for %.0fs; stopping it until the next client", rec.label, now - since)
            self._rest(srv, now, f"idle for {now - since:.0f}s (idle_timeout)")
            return
        slot.wake_at(min(slot.next_activity_at, since + spec.idle_timeout))

    def watch_fds(self) -> list[int]:
        """The sockets of idle on-demand servers: readable when a client's connection waits."""
        out = []
        for ref, listener in self.listeners.items():
            slot = self.slots.get(ref)
            if slot is not None and slot.rec is not None and slot.rec.state == lc.IDLE and not slot.waiting_for_budget:
                out.append(listener.fileno())
        return out

    def on_pending(self, fds: set[int]) -> None:
        for ref, listener in self.listeners.items():
            if listener.fileno() in fds and (slot := self.slots.get(ref)) is not None:
                slot.dirty = True

    def measure(self) -> None:
        """The footprint of each ready server, as measured now: its largest replaces what is declared."""
        ready = {ref: s for ref, s in self.slots.items() if s.rec is not None and s.rec.state == lc.READY and s.handle is not None}
        if not ready:
            return
        usage = usage_by_leader([s.handle.ident for s in ready.values() if s.handle is not None])
        gpu_usage = gpu_memory_by_pid() if any(s.rec is not None and s.rec.gpus for s in ready.values()) else None
        for ref, s in ready.items():
            assert s.handle is not None and s.rec is not None
            used = usage.get(s.handle.ident.pid)
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

    # ------------------------------------------------------------------ verbs: the held socket
    def uses_socket(self, srv: Server) -> bool:
        refused = srv.slot.no_socket or srv.rec.socket.startswith("not held")
        return srv.spec.socket and not refused and srv.rec.port is not None

    def _hold_socket(self, srv: Server) -> str | None:
        """Bind the server's port and listen, once for the server's life; why not, if it cannot."""
        rec, spec = srv.rec, srv.spec
        if rec.ref in self.listeners:
            rec.socket = "held"
            return None
        assert rec.port is not None
        try:
            self.listeners[rec.ref] = Listener.bind(spec.host, rec.port, spec.backlog)
        except OSError as e:
            holder = self.procs.port_holder(rec.port, spec.host) or f"port {rec.port}: {e.strerror or e}"
            return f"cannot hold the port: {holder}"
        rec.socket = "held"
        log.info("%s: holding %s:%s (backlog %s)", rec.label, spec.host, rec.port, spec.backlog)
        return None

    def _without_socket(self, srv: Server, why: str) -> None:
        """The server said it cannot serve from a handed socket (a vLLM whose internals differ):
        run it the plain way from now on, and say so in status."""
        srv.slot.no_socket = why
        srv.rec.socket = f"not held: {why}"
        self.close_listener(srv.rec.ref)
        log.warning("%s: runs without a held socket: %s", srv.label, why)

    def close_listener(self, ref: ServerRef) -> None:
        listener = self.listeners.pop(ref, None)
        if listener is not None:
            listener.close()
            slot = self.slots.get(ref)
            if slot is not None and slot.rec is not None and slot.rec.socket == "held":
                slot.rec.socket = ""
            log.info("%s: closed its listening socket", ref)

    def _overlaps(self, srv: Server) -> bool:
        """A replacement starts the new instance first where the server says READY=1 on the held socket."""
        return srv.spec.replace == "overlap" and srv.spec.notify and self.uses_socket(srv) and srv.rec.ref in self.listeners

    def _take_over(self, srv: Server, now: float) -> None:
        """Start a successor beside the serving instance; once it says READY=1, it takes over and the
        old one is stopped (SIGTERM: in-flight requests finish). Both accept meanwhile."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        if rec.successor is None:
            if not rec.outdated:
                return
            why = "the spec changed" if rec.instance and rec.instance.fingerprint != rec.fingerprint else "restart"
            lc.intend_successor(rec, uuid.uuid4().hex, now, why)
            self.save_if_changed(rec, slot, now)
            assert rec.successor is not None
            spawned = self._spawn(srv, rec.successor.token, now)
            if isinstance(spawned, Failure):
                lc.successor_failed(rec, spawned, None, now)
                return
            slot.successor_handle, slot.successor_notify = spawned
            slot.successor_notified = False
            lc.successor_spawned(rec, slot.successor_handle.ident)
            log.info("%s: replacing (%s): new instance pid %s on the same socket", rec.label, why, slot.successor_handle.ident.pid)
            slot.wake_at(now + spec.startup_timeout)
            return
        if slot.successor_handle is None:  # a supervisor died during the overlap: the successor is not ours to watch
            ident = self.procs.find_leader(rec.successor.token)
            if ident is None:
                lc.successor_failed(rec, Failure("crash", "the new instance is gone", True), Exit(), now)
                return
            slot.successor_handle = Handle(ident, None, open_pidfd(ident))
        exited, exit = self.procs.exit_status(slot.successor_handle)
        if exited or now - rec.successor.started_at > spec.startup_timeout:
            failure = (
                classify_exit(exit, logfiles.since_last_start(self.store.log_path(rec.ref)) if self.log_to_files else [])
                if exited
                else Failure("startup-timeout", f"not ready after {spec.startup_timeout:g}s (startup_timeout)", True)
            )
            self._retire(srv, rec.successor, slot.successor_handle, slot.successor_notify, now)
            slot.successor_handle, slot.successor_notify, slot.successor_notified = None, None, False
            lc.successor_failed(rec, failure, exit if exited else None, now)
            log.error("%s: %s", rec.label, rec.history.last_error)
            return
        if not slot.successor_notified:
            slot.wake_at(rec.successor.started_at + spec.startup_timeout)
            return
        old_handle, old_notify = slot.handle, slot.notify
        old = lc.successor_took_over(rec, now)
        slot.handle, slot.notify, slot.notified = slot.successor_handle, slot.successor_notify, True
        slot.successor_handle, slot.successor_notify, slot.successor_notified = None, None, False
        slot.unhealthy_since, slot.prepared = None, True
        slot.next_probe_at = now + spec.health.interval
        log.info("%s: the new instance pid %s took over; stopping the old one (pid %s)", rec.label, rec.pid, old.pid)
        self._retire(srv, old, old_handle, old_notify, now)

    def _retire(self, srv: Server, inst: Instance, handle: Handle | None, notify: NotifySocket | None, now: float) -> None:
        """Stop a replaced (or failed new) instance in the background; nothing waits for it."""
        members = inst.member_identities
        leader = ProcessIdentity(inst.pid, inst.create_time) if inst.pid is not None and inst.create_time is not None else None
        leader_first = get_backend(srv.spec.kind).stops_leader_first(srv.spec)
        target = StopTarget(f"{srv.label} (replaced)", leader, inst.token, members, leader_first=leader_first)
        if notify is not None:
            notify.close()

        def stop() -> StopResult:
            result = self.procs.stop(target, srv.spec.stop_timeout)
            if handle is not None:
                if handle.popen is not None:
                    handle.popen.poll()
                close_pidfd(handle)
            return result

        srv.slot.retiring = [f for f in srv.slot.retiring if not f.done()] + [self._submit(self.stop_executor, srv.slot, stop)]

    def _drop_instance_handles(self, slot: Slot) -> None:
        if slot.handle is not None:
            close_pidfd(slot.handle)
        slot.handle = None
        if slot.notify is not None:
            slot.notify.close()
        slot.notify, slot.notified = None, False

    def _record_members(self, srv: Server, now: float) -> None:
        """Remember the leader's descendants: the proof for ones that later clear their environment."""
        slot = srv.slot
        if slot.handle is None:
            return
        if now < slot.next_members_at:
            slot.wake_at(slot.next_members_at)
            return
        # on a common grid, so that one scan of the process table serves every server
        slot.next_members_at = (math.floor(now / MEMBERS_SECONDS) + 1) * MEMBERS_SECONDS
        slot.wake_at(slot.next_members_at)
        seen = {(int(p), float(c)) for p, c in (srv.rec.instance.members if srv.rec.instance else [])}
        for ident in self._descendants(now).get(slot.handle.ident.pid, []):
            seen.add((ident.pid, ident.create_time))
        alive = sorted((p, c) for p, c in seen if self.procs.is_alive(ProcessIdentity(p, c)))[-MEMBERS_KEPT:]
        lc.saw_members(srv.rec, [[p, c] for p, c in alive])

    def _descendants(self, now: float) -> dict[int, list[ProcessIdentity]]:
        if self._descendants_at is None or abs(now - self._descendants_at) >= 1.0:
            leaders = [s.handle.ident for s in self.slots.values() if s.handle is not None]
            self._descendants_cache, self._descendants_at = self.procs.descendants(leaders), now
        return self._descendants_cache

    # ------------------------------------------------------------------ verbs: stop
    def _replace(self, srv: Server, now: float) -> None:
        """The profile changed this server's spec: stop the running instance; the next tick starts the new one."""
        log.info("%s: spec changed; replacing the running instance", srv.label)
        lc.begin_stop(srv.rec, self.me, "running", "replacing: the spec changed")
        self.begin_stop(srv.rec, srv.slot, srv.spec, AFTER_STOP, now)

    def _take_over_stop(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        """A stop is under way. If whoever began it is gone (Ctrl-C), carry it out ourselves."""
        owner = rec.instance.stop_owner if rec.instance else None
        mine = self.me is not None and owner == [self.me.pid, self.me.create_time]
        if stop_owner_alive(rec) and not mine:
            self._collect_child(slot)
            if slot.handle is not None:
                slot.wake_at(self.clock() + ADOPTED_POLL_SECONDS)
            return
        log.info("%s: finishing a stop its command left behind", rec.label)
        lc.take_over_stop(rec, self.me)
        self.begin_stop(rec, slot, record_spec(rec), AFTER_STOP, now)

    def begin_stop(self, rec: ServerRecord, slot: Slot, spec: ServerSpec | None, after: str, now: float) -> None:
        """Stop the instance's processes in the background; `after` says what follows.

        No port check here: the next start checks its port and names a holder.
        """
        target = dataclasses.replace(target_of(rec), port=None)
        handle, slot.handle = slot.handle, None
        if slot.notify is not None:
            slot.notify.close()
        slot.notify, slot.notified = None, False
        slot.probe = slot.prepare = None
        slot.after_stop, slot.stop_token = after, rec.token
        timeout = spec.stop_timeout if spec is not None else DEFAULT_STOP_TIMEOUT
        if after == AFTER_CRASH:
            timeout = min(timeout, CRASH_CLEANUP_SECONDS)

        def stop() -> StopResult:
            result = self.procs.stop(target, timeout)
            if handle is not None:
                if handle.popen is not None:
                    handle.popen.poll()  # reap our child
                close_pidfd(handle)
            return result

        slot.stop = self._submit(self.stop_executor, slot, stop)
        if slot.stop.done():  # an inline executor (tests): finish in the same tick
            self._stop_done(rec, slot, now)

    def _stop_done(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        fut, slot.stop = slot.stop, None
        after, token = slot.after_stop, slot.stop_token
        slot.after_stop, slot.stop_token = "", None
        try:
            result = fut.result() if fut is not None else StopResult("not running")
        except Exception as e:
            log.error("%s: stopping failed: %s", rec.label, e)
            result = StopResult("failed")
        if rec.token != token:
            return  # someone else has moved the record on since
        slot.wake_at(now)
        if after == AFTER_CRASH and rec.state == lc.CRASHED:
            spec = self._spec(rec, slot)
            if spec is not None:
                self._after_crash(Server(rec, slot, spec), now)
        elif after == AFTER_STOP and rec.state == lc.STOPPING:
            finish_stop(rec, token, result)
        elif after == AFTER_REST and rec.state == lc.STOPPING:
            lc.rested(rec, token, now, slot.evicted_for)
            slot.evicted_for = None
            slot.last_requests = None

    def _spec(self, rec: ServerRecord, slot: Slot) -> ServerSpec | None:
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
            if slot.handle is not None:
                close_pidfd(slot.handle)
        # the held sockets close with us: running instances keep their own copies and serve on;
        # the next supervisor takes them back from the instances (pidfd_getfd)
        for listener in self.listeners.values():
            listener.close()


def activity_of(url: str, port: int | None) -> tuple[Scrape | None, int | None]:
    """What a server says of its traffic (its /metrics), else how many clients are connected."""
    scraped = scrape(url)
    if scraped is not None:
        return scraped, None
    return None, established(port) if port else None


def open_pidfd(ident: ProcessIdentity) -> int | None:
    """A pidfd that becomes readable when the process exits (Linux 5.3+), checked against its identity."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(ident.pid)
    except OSError:
        return None
    if not is_alive(ident):  # the pid was reused between our check and the open
        os.close(fd)
        return None
    return fd


def close_pidfd(handle: Handle) -> None:
    if handle.pidfd is not None:
        try:
            os.close(handle.pidfd)
        except OSError:
            pass
        handle.pidfd = None
