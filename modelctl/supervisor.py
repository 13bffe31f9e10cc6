"""The supervisor's reconcile logic: it keeps the servers that should run running.

Each tick reconciles the records that need it — desired vs actual — through a few verbs, in the
manner of gunicorn's arbiter: `reap` (notice exits), the health watch (warm-up, preparation,
hung servers: modelctl/warmup.py), `start` (first start, restarts after backoff) and
`begin_stop` (in the background: never under the state lock). A record needs a tick when its
file changed, when an event arrived for it (a child exited, a probe or a stop finished) or when
one of its timers is due; an idle supervisor touches nothing. Time, process control and the
executors for slow work are injected, so the restart logic is tested with a fake clock in
milliseconds. One bad record never stops the loop: each is reconciled under its own guard.

A start saves its intent (state `starting` and the instance's token) before it spawns: a
process is never without a record that names it, so a supervisor that dies right after a spawn
leaves a token by which the next one finds and adopts the process instead of starting another.

The loop around it (signals, the wake-up pipe, exit policies) is modelctl/runner.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from modelctl import lifecycle as lc
from modelctl import logfiles, restart
from modelctl.backends import get_backend
from modelctl.backends.base import Launch
from modelctl.failures import Exit, Failure, classify_exit
from modelctl.files import DiskError
from modelctl.health import ProbeResult, probe
from modelctl.identity import ProcessIdentity, identity_of, is_alive
from modelctl.names import ServerRef
from modelctl.ports import describe_port_in_use, is_port_free
from modelctl.process import (
    INSTANCE_VAR,
    StopResult,
    StopTarget,
    descendants_by_leader,
    leader_by_token,
    spawn_detached,
    stop_processes,
)
from modelctl.profile import record_spec
from modelctl.record import ServerRecord
from modelctl.spec import ServerSpec
from modelctl.state import BrokenRecord, LockTimeout, Stamp, StateStore
from modelctl.stopping import DEFAULT_STOP_TIMEOUT, finish_stop, record_identity, stop_owner_alive, target_of
from modelctl.warmup import HealthWatch

log = logging.getLogger("modelctl.supervisor")

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

    def spawn(self, launch: Launch, env: dict[str, str], log_fd: int | None) -> Handle: ...

    def exit_status(self, handle: Handle) -> tuple[bool, Exit]: ...

    def is_alive(self, ident: ProcessIdentity) -> bool: ...

    def find_leader(self, token: str) -> ProcessIdentity | None: ...

    def stop(self, target: StopTarget, timeout: float) -> StopResult: ...

    def port_holder(self, port: int, host: str) -> str | None: ...

    def probe(self, spec: ServerSpec, url: str) -> ProbeResult: ...

    def descendants(self, leaders: list[ProcessIdentity]) -> dict[int, list[ProcessIdentity]]: ...


class RealProcesses:
    """The real processes, ports and probes."""

    def spawn(self, launch: Launch, env: dict[str, str], log_fd: int | None) -> Handle:
        popen, ident = spawn_detached(launch.argv, env, log_fd, cwd=launch.cwd)
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

    def busy(self) -> bool:
        return any(f is not None and not f.done() for f in (self.probe, self.prepare, self.stop))

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
    spec: ServerSpec, launch: Launch, port: int | None, gpus: list[int], instance: str, cache_dir: Path | str = "."
) -> dict[str, str]:
    """The environment a server starts with: ours, the kind's, the profile's, its GPUs and its token."""
    env = dict(os.environ)
    env.pop(INSTANCE_VAR, None)
    env.update(launch.env)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    env["MODELCTL_SERVER"] = str(spec.ref)
    env.setdefault("MODELCTL_CACHE_DIR", str(cache_dir))
    if port is not None:
        env["MODELCTL_PORT"] = str(port)
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
        slot = self.slots.pop(ref, None)
        if slot is not None and slot.handle is not None:
            close_pidfd(slot.handle)

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

    def reconcile(self, rec: ServerRecord, slot: Slot, now: float) -> None:
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
        spec = self._spec(rec, slot)
        if spec is None:
            return
        srv = Server(rec, slot, spec)
        if rec.state in lc.ALIVE:
            if not self._reap_or_adopt(srv, now):
                return
            if rec.instance is not None and rec.instance.fingerprint != rec.fingerprint:
                self._replace(srv, now)
                return
            self._record_members(srv, now)
            self.health.check(srv, now)
        elif rec.state == lc.STOPPED:
            self._start(srv, now)
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
            self.crash(srv, now, exit, classify_exit(exit, lines))
            return False
        if slot.handle.popen is None and slot.handle.pidfd is None:
            slot.wake_at(now + ADOPTED_POLL_SECONDS)
        return True

    def _adopt(self, srv: Server) -> bool:
        """Take on a live instance: by its recorded identity, or (never recorded) by its token."""
        rec, slot = srv.rec, srv.slot
        ident = record_identity(rec)
        found_by_token = False
        if ident is None and rec.token:
            ident, found_by_token = self.procs.find_leader(rec.token), True
        if ident is None or not self.procs.is_alive(ident):
            return False
        if slot.handle is not None:
            close_pidfd(slot.handle)
        slot.handle = Handle(ident, None, open_pidfd(ident))
        slot.prepared = rec.state in (lc.READY, lc.UNHEALTHY)
        if found_by_token:
            lc.spawned(rec, ident, "adopted: started by a supervisor that died before recording it")
        log.info("%s: adopted running pid %s (%s)", rec.label, ident.pid, rec.state)
        return True

    def crash(self, srv: Server, now: float, exit: Exit | None, failure: Failure) -> None:
        """A failure: count it, remember it, and stop what is left of the instance first."""
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

    def _start(self, srv: Server, now: float) -> None:
        """Save the intent, then spawn: the token names the process before it exists."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        launch = get_backend(spec.kind).launch(spec, rec.port, rec.gpus)
        lc.intend_start(rec, uuid.uuid4().hex, now)
        slot.prepared, slot.unhealthy_since, slot.next_probe_at, slot.starved = False, None, now, 0.0
        slot.probe = slot.prepare = None
        if slot.handle is not None:
            close_pidfd(slot.handle)
        slot.handle = None
        slot.wake_at(now)
        if launch is None:  # lives elsewhere: nothing to spawn, only to probe and prepare
            lc.external_start(rec)
            return
        holder = self.procs.port_holder(rec.port, spec.host) if rec.port else None
        if holder:
            self.crash(srv, now, None, Failure("address-in-use", f"cannot start: {holder}", True))
            return
        self.save_if_changed(rec, slot, now)  # the intent: a DiskError here means nothing is spawned
        assert rec.instance is not None
        log_fd = None
        try:
            if self.log_to_files:
                path = self.store.log_path(rec.ref)
                self.store.ensure(path.parent)
                log_fd = logfiles.open_for_append(path)
                logfiles.write_mark(log_fd, f"starting {rec.label}: {' '.join(launch.argv)}", now)
            env = server_environment(spec, launch, rec.port, rec.gpus, rec.instance.token, self.store.root / "cache")
            handle = self.procs.spawn(launch, env, log_fd)
        except OSError as e:
            what = "missing-executable" if isinstance(e, FileNotFoundError) and e.filename == launch.argv[0] else "cannot-start"
            failure = Failure(what, f"cannot run {launch.argv[0]!r}: {e.strerror or e}", False)
            lc.failed_to_start(rec, failure, now)
            log.error("%s: %s", rec.label, rec.history.last_error)
            return
        finally:
            if log_fd is not None:
                os.close(log_fd)
        slot.handle = handle
        slot.next_probe_at = now + self.health.startup_probe_seconds
        slot.wake_at(slot.next_probe_at)
        lc.spawned(rec, handle.ident)
        log.info("%s: started pid %s on port %s", rec.label, handle.ident.pid, rec.port)

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
