"""The supervisor's reconcile logic: it keeps the servers that should run running.

Each tick reconciles every record — desired vs actual — through a few verbs, in the manner of
gunicorn's arbiter: `reap` (notice exits), `check_health` (warm-up, preparation, hung servers),
`start` (first start, restarts after backoff) and `begin_stop` (in the background: never
under the state lock). Time, process control and the executor for slow work are injected, so
the restart logic is tested with a fake clock in milliseconds. One bad record never stops the
loop: each is reconciled under its own guard.

The daemon around it (the singleton lock, signals, the wake-up pipe) is modelctl/daemon.py.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelctl import lifecycle as lc
from modelctl import logfiles
from modelctl.backends import get_backend
from modelctl.backends.base import Launch
from modelctl.failures import Failure, classify_exit
from modelctl.health import ProbeResult, probe
from modelctl.names import ServerRef
from modelctl.ports import PortLeases, describe_port_in_use, is_port_free
from modelctl.process import (
    INSTANCE_VAR,
    ProcessIdentity,
    StopResult,
    StopTarget,
    descendants,
    describe_exit,
    identity_of,
    is_alive,
    spawn_detached,
    stop_processes,
)
from modelctl.profile import record_spec
from modelctl.spec import ServerSpec
from modelctl.state import BrokenRecord, LockTimeout, ServerRecord, StateStore
from modelctl.stopping import DEFAULT_STOP_TIMEOUT, finish_stop, record_identity, stop_owner_alive, target_of

log = logging.getLogger("modelctl.supervisor")

STARTUP_PROBE_SECONDS = 0.1
UNHEALTHY_PROBE_SECONDS = 1.0
EXITS_KEPT = 10
MEMBERS_KEPT = 256


@dataclass
class Handle:
    """A running server process: our child (popen) or adopted from an earlier supervisor."""

    ident: ProcessIdentity
    popen: Any = None


class ProcessControl:
    """The real processes, ports and probes. Tests pass a fake with the same methods."""

    def spawn(self, launch: Launch, env: dict[str, str], log_fd: int | None) -> Handle:
        popen, ident = spawn_detached(launch.argv, env, log_fd, cwd=launch.cwd)
        return Handle(ident, popen)

    def exit_status(self, handle: Handle) -> tuple[bool, int | None]:
        """(exited, returncode); returncode is None when the process was not our child."""
        if handle.popen is not None:
            rc = handle.popen.poll()
            return (rc is not None, rc)
        return (not is_alive(handle.ident), None)

    def is_alive(self, ident: ProcessIdentity) -> bool:
        return is_alive(ident)

    def stop(self, target: StopTarget, timeout: float) -> StopResult:
        return stop_processes(target, timeout)

    def port_holder(self, port: int, host: str) -> str | None:
        return None if is_port_free(port, host) else describe_port_in_use(port, host)

    def probe(self, spec: ServerSpec, url: str) -> ProbeResult:
        return probe(spec.health, url)

    def descendants(self, ident: ProcessIdentity) -> list[ProcessIdentity]:
        return descendants(ident)


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


# what to do once a background stop is done
AFTER_CRASH = "crash"  # a failed instance's leftovers are gone: back off, fail, or stay down
AFTER_STOP = "stop"  # a deliberate stop (down whose owner died, a replaced spec): stopped


@dataclass
class Slot:
    """The supervisor's in-memory view of one server: what is in flight for it."""

    handle: Handle | None = None
    probe: Future[ProbeResult] | None = None
    prepare: Future[dict[str, Any]] | None = None
    prepare_started: float | None = None
    stop: Future[StopResult] | None = None
    after_stop: str = ""
    stop_instance: str | None = None
    failure: Failure | None = None  # the failure whose leftovers are being stopped
    next_probe_at: float = 0.0
    next_members_at: float = 0.0
    unhealthy_since: float | None = None
    prepared: bool = False
    progress: dict[str, Any] | None = None
    spec: ServerSpec | None = None
    spec_key: str = ""
    external: bool = False  # lives elsewhere (an external Ollama): probed and prepared, never spawned
    broken_reported: str = ""

    def busy(self) -> bool:
        return any(f is not None and not f.done() for f in (self.probe, self.prepare, self.stop))


def remember_exit(rec: ServerRecord, at: float | None, exit_text: str | None, failure: Failure) -> None:
    """A failure in the record's history (the last EXITS_KEPT) and as its last error."""
    entry = {"at": at, "exit": exit_text, "class": failure.cls, "line": failure.line, "retry": failure.retry}
    rec.exits = [*rec.exits, entry][-EXITS_KEPT:]
    rec.last_error = failure.describe()


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
        managed_by: str = "supervisor",
        only: set[ServerRef] | None = None,
        log_to_files: bool = True,
    ):
        self.store = store
        self.clock = clock
        self.procs = procs or ProcessControl()
        self.executor = executor or ThreadPoolExecutor(max_workers=8, thread_name_prefix="modelctl-work")
        self.managed_by = managed_by
        self.only = only
        self.log_to_files = log_to_files  # False: servers write to our stdout (the journal under systemd)
        self.slots: dict[ServerRef, Slot] = {}
        self.me = identity_of(os.getpid())
        self.on_wake: Callable[[], None] = lambda: None  # the daemon's: a finished job wakes the loop
        self.next_wake: float | None = None

    # ------------------------------------------------------------------ the loop
    def tick(self, now: float | None = None) -> None:
        """One pass over every record, each under its own guard."""
        now = self.clock() if now is None else now
        seen = set()
        for ref in self.store.refs():
            if self.only is not None and ref not in self.only:
                continue
            seen.add(ref)
            try:
                self._tick_one(ref, now)
            except LockTimeout as e:
                log.warning("%s; trying again next tick", e)
                break
            except Exception:
                log.exception("%s: error while supervising it; trying again next tick", ref)
        for ref in list(self.slots):
            if ref not in seen and not self.slots[ref].busy():
                del self.slots[ref]

    def _tick_one(self, ref: ServerRef, now: float) -> None:
        with self.store.locked():
            rec = self.store.load(ref)
            if rec is None:
                return
            slot = self.slots.setdefault(ref, Slot())
            if isinstance(rec, BrokenRecord):
                if slot.broken_reported != rec.error:
                    log.error("%s: broken record %s: %s; not supervising it", ref, rec.path, rec.error)
                    slot.broken_reported = rec.error
                return
            if rec.managed_by != self.managed_by:
                return
            before = rec.to_dict()
            self.reconcile(rec, slot, now)
            if rec.to_dict() != before:
                self.store.save(rec, now)

    def wants_to_run(self) -> bool:
        if any(slot.busy() for slot in self.slots.values()):
            return True
        for rec in self.store.records():
            if rec.managed_by == self.managed_by and (rec.desired == "running" or rec.state in (lc.STOPPING, lc.CRASHED)):
                return True
        return False

    def reconcile(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        if slot.stop is not None:
            if not slot.stop.done():
                return
            self._stop_done(rec, slot, now)
        if rec.state == lc.STOPPING:
            self._take_over_stop(rec, slot, now)
            return
        if rec.desired != "running":
            self._reap(rec, slot)  # the stopper stops the process; we only collect our child
            return
        spec = self._spec(rec, slot)
        if spec is None:
            return
        if rec.state in lc.ALIVE:
            if not self._reap_or_adopt(rec, slot, spec, now):
                return
            if rec.running_fingerprint is not None and rec.running_fingerprint != rec.fingerprint:
                self._replace(rec, slot, spec, now)
                return
            self._record_members(rec, slot, spec, now)
            self._check_health(rec, slot, spec, now)
        elif rec.state == lc.STOPPED:
            self._start(rec, slot, spec, now)
        elif rec.state == lc.BACKOFF:
            self._start_if_due(rec, slot, spec, now)
        elif rec.state == lc.CRASHED:
            # a supervisor died while cleaning up after a crash: finish that first
            self._begin_stop(rec, slot, spec, AFTER_CRASH, now)

    # ------------------------------------------------------------------ verbs: exits
    def _reap(self, rec: ServerRecord, slot: Slot) -> tuple[bool, int | None]:
        if slot.handle is None:
            return (False, None)
        exited, rc = self.procs.exit_status(slot.handle)
        if exited and rec.desired != "running":
            slot.handle = None
        return exited, rc

    def _reap_or_adopt(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> bool:
        """Notice an exit (→ crashed); adopt a live server an earlier supervisor started."""
        if slot.external:
            return True
        unknown = slot.handle is None or slot.handle.ident.pid != rec.pid
        if unknown and not self._adopt(rec, slot):
            self._crashed(rec, slot, spec, now, describe_exit(None), Failure("crash", "exited while no supervisor was watching", True))
            return False
        exited, rc = self._reap(rec, slot)
        if exited:
            lines = logfiles.since_last_start(self.store.log_path(rec.ref)) if self.log_to_files else []
            self._crashed(rec, slot, spec, now, describe_exit(rc), classify_exit(rc, lines))
            return False
        return True

    def _adopt(self, rec: ServerRecord, slot: Slot) -> bool:
        ident = record_identity(rec)
        if ident is None or not self.procs.is_alive(ident):
            return False
        slot.handle = Handle(ident, None)
        slot.prepared = rec.state in (lc.READY, lc.UNHEALTHY)
        log.info("%s: adopted running pid %s (%s)", rec.label, rec.pid, rec.state)
        return True

    def _crashed(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float, exit_text: str | None, failure: Failure) -> None:
        """A failure: count it, remember it, and stop what is left of the instance first."""
        if exit_text is not None:
            rec.last_exit = exit_text
        remember_exit(rec, now, exit_text, failure)
        policy = spec.restart
        if rec.ready_at is not None and now - rec.ready_at >= policy.stable_after:
            rec.consecutive_failures = 0
        rec.failures = [t for t in rec.failures if now - t <= policy.window] + [now]
        rec.consecutive_failures += 1
        rec.ready_at = None
        lc.move(rec, lc.CRASHED, expect=lc.ALIVE)
        rec.detail = f"{failure.describe()}; cleaning up"
        slot.failure = failure
        self._begin_stop(rec, slot, spec, AFTER_CRASH, now)

    def _after_crash(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        """The failed instance is gone: back off, give up (failed) or stay down per the policy."""
        failure = slot.failure or Failure("crash", rec.last_error or "", True)
        slot.failure = None
        rec.pid = rec.create_time = None
        rec.members, rec.running_fingerprint = [], None
        policy = spec.restart
        clean_exit = rec.last_exit == "exit code 0"
        what = failure.describe()
        if not failure.retry:
            lc.move(rec, lc.FAILED, expect=lc.CRASHED)
            rec.detail = f"configuration error, not retried: {what}"
            log.error("%s: %s", rec.label, rec.detail)
        elif policy.policy == "never" or (policy.policy == "on-failure" and clean_exit):
            lc.move(rec, lc.STOPPED, expect=lc.CRASHED)
            rec.desired = "stopped"
            rec.detail = f"exited ({rec.last_exit or what}); restart policy '{policy.policy}'"
            log.info("%s: %s", rec.label, rec.detail)
        elif len(rec.failures) >= policy.max_failures:
            lc.move(rec, lc.FAILED, expect=lc.CRASHED)
            rec.detail = f"crash loop: {len(rec.failures)} failures within {policy.window:g}s; last: {rec.last_exit or what}"
            log.error("%s: %s", rec.label, rec.detail)
        else:
            delay = policy.delay(rec.consecutive_failures)
            rec.next_start_at = now + delay
            lc.move(rec, lc.BACKOFF, expect=lc.CRASHED)
            rec.detail = f"{rec.last_exit or what}; restarting in {delay:g}s"
            log.warning("%s: %s", rec.label, rec.detail)
            self._wake_at(rec.next_start_at)

    # ------------------------------------------------------------------ verbs: start
    def _start_if_due(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        if now >= (rec.next_start_at or 0):
            rec.restarts += 1
            self._start(rec, slot, spec, now)
        else:
            self._wake_at(rec.next_start_at)

    def _start(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        launch = get_backend(spec.kind).launch(spec, rec.port, rec.gpus)
        lc.move(rec, lc.STARTING, expect=(lc.STOPPED, lc.BACKOFF))
        rec.instance = uuid.uuid4().hex
        rec.running_fingerprint = rec.fingerprint
        rec.started_at, rec.ready_at, rec.next_start_at = now, None, None
        rec.startup, rec.members, rec.stop_owner = {}, [], None
        rec.progress, rec.detail = None, "waiting for health"
        slot.prepared, slot.unhealthy_since, slot.next_probe_at = False, None, now
        slot.probe = slot.prepare = None
        slot.handle = None
        if launch is None:  # lives elsewhere: nothing to spawn, only to probe and prepare
            rec.pid = rec.create_time = None
            return
        holder = self.procs.port_holder(rec.port, spec.host) if rec.port else None
        if holder:
            self._crashed(rec, slot, spec, now, None, Failure("address-in-use", f"cannot start: {holder}", True))
            return
        log_fd = None
        try:
            if self.log_to_files:
                path = self.store.log_path(rec.ref)
                self.store.ensure(path.parent)
                log_fd = logfiles.open_for_append(path)
                logfiles.write_mark(log_fd, f"starting {rec.label}: {' '.join(launch.argv)}", now)
            env = server_environment(spec, launch, rec.port, rec.gpus, rec.instance, self.store.root / "cache")
            handle = self.procs.spawn(launch, env, log_fd)
        except OSError as e:
            what = "missing-executable" if isinstance(e, FileNotFoundError) and e.filename == launch.argv[0] else "cannot-start"
            self._fail_at_start(rec, Failure(what, f"cannot run {launch.argv[0]!r}: {e.strerror or e}", False))
            return
        finally:
            if log_fd is not None:
                os.close(log_fd)
        slot.handle = handle
        slot.next_probe_at = now + STARTUP_PROBE_SECONDS
        self._wake_at(slot.next_probe_at)
        rec.pid, rec.create_time = handle.ident.pid, handle.ident.create_time
        log.info("%s: started pid %s on port %s", rec.label, rec.pid, rec.port)

    def _fail_at_start(self, rec: ServerRecord, failure: Failure) -> None:
        lc.move(rec, lc.FAILED, expect=lc.STARTING)
        remember_exit(rec, rec.started_at, None, failure)
        rec.detail, rec.running_fingerprint = None, None
        log.error("%s: %s", rec.label, rec.last_error)

    # ------------------------------------------------------------------ verbs: health
    def _check_health(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        if self._collect_preparation(rec, slot, spec, now):
            return
        self._collect_probe(rec, slot, spec, now)
        if rec.state not in lc.ALIVE or slot.stop is not None:
            return
        if self._enforce_timeouts(rec, slot, spec, now):
            return
        self._schedule_probe(rec, slot, spec, now)

    def _collect_preparation(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> bool:
        """True while a preparation (pull, import, preload) runs or just ended."""
        if slot.prepare is None:
            return False
        if slot.progress is not None:
            rec.progress = dict(slot.progress)
        if not slot.prepare.done():
            self._enforce_timeouts(rec, slot, spec, now)
            return True
        fut, slot.prepare = slot.prepare, None
        rec.progress = None
        try:
            rec.info = fut.result() or {}
        except Exception as e:
            log.error("%s: preparation failed: %s", rec.label, e)
            # what a preparation says (no such model, unsupported file) does not heal by retrying
            self._crashed(rec, slot, spec, now, None, Failure("prepare", str(e), False))
            return True
        slot.prepared = True
        rec.startup["prepare"] = round(now - (slot.prepare_started or now), 3)
        self._mark_ready(rec, slot, spec, now)
        return True

    def _collect_probe(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        if slot.probe is None or not slot.probe.done():
            return
        fut, slot.probe = slot.probe, None
        try:
            result = fut.result()
        except Exception as e:
            result = ProbeResult(False, f"probe error: {e}")
        interval = STARTUP_PROBE_SECONDS if rec.state == lc.STARTING else spec.health.interval
        if rec.state == lc.UNHEALTHY:
            interval = min(interval, UNHEALTHY_PROBE_SECONDS)
        slot.next_probe_at = now + interval
        if rec.state == lc.STARTING:
            self._wake_at(slot.next_probe_at)
            self._apply_startup_probe(rec, slot, spec, result, now)
        elif result.ok:
            if rec.state == lc.UNHEALTHY:
                log.info("%s: healthy again", rec.label)
                lc.move(rec, lc.READY, expect=lc.UNHEALTHY)
            rec.detail, slot.unhealthy_since = None, None
        else:
            if rec.state == lc.READY:
                log.warning("%s: unhealthy: %s", rec.label, result.detail)
                lc.move(rec, lc.UNHEALTHY, expect=lc.READY)
                slot.unhealthy_since = now
            rec.detail = f"unhealthy: {result.detail}"

    def _apply_startup_probe(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, result: ProbeResult, now: float) -> None:
        started = rec.started_at or now
        if result.connected and "port_open" not in rec.startup:
            rec.startup["port_open"] = round(now - started, 3)
        if not result.ok:
            rec.detail = f"warming up: {result.detail}"
            return
        rec.startup.setdefault("port_open", round(now - started, 3))
        backend = get_backend(spec.kind)
        if not slot.prepared and backend.has_prepare:
            rec.detail = "preparing"
            slot.prepare_started = now

            def report(progress: dict[str, Any]) -> None:
                slot.progress = progress

            slot.prepare = self._submit(backend.prepare, spec, self._url(rec, spec), report)
            return
        self._mark_ready(rec, slot, spec, now)

    def _mark_ready(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        lc.move(rec, lc.READY, expect=lc.STARTING)
        rec.ready_at, rec.detail = now, None
        # the phases add up to the total: spawn → port open → healthy → prepared
        total = round(now - (rec.started_at or now), 3)
        port_open = min(rec.startup.get("port_open", total), total)
        prepare = min(rec.startup.get("prepare", 0.0), total - port_open)
        rec.startup = {"port_open": port_open, "healthy": round(total - port_open - prepare, 3), "prepare": prepare, "total": total}
        slot.next_probe_at = now + spec.health.interval
        log.info("%s: ready after %.1fs", rec.label, now - (rec.started_at or now))

    def _enforce_timeouts(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> bool:
        """Startup past startup_timeout, or unhealthy past the grace period: a failure."""
        if rec.state == lc.STARTING and rec.started_at is not None and now - rec.started_at > spec.startup_timeout:
            reason = f"not ready after {spec.startup_timeout:g}s (startup_timeout): {rec.detail or ''}".rstrip(": ")
            if slot.external:  # nothing of ours to restart: say so and stop trying
                self._crashed(rec, slot, spec, now, None, Failure("unreachable", f"{rec.url} did not answer: {reason}", False))
            else:
                self._crashed(rec, slot, spec, now, None, Failure("startup-timeout", reason, True))
            return True
        since = slot.unhealthy_since
        if rec.state == lc.UNHEALTHY and since is not None and not slot.external and now - since > spec.health.grace:
            reason = f"unhealthy for {now - since:.0f}s ({rec.detail}); restarting"
            self._crashed(rec, slot, spec, now, None, Failure("unhealthy", reason, True))
            return True
        return False

    def _schedule_probe(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        if slot.probe is None and slot.prepare is None and now >= slot.next_probe_at:
            slot.probe = self._submit(self._probe_job, spec, self._url(rec, spec), rec.state != lc.STARTING)

    def _probe_job(self, spec: ServerSpec, url: str, check_model: bool) -> ProbeResult:
        result = self.procs.probe(spec, url)
        if result.ok and check_model:
            ok, why = get_backend(spec.kind).is_ready(spec, url)
            if not ok:
                return ProbeResult(False, why, connected=True)
        return result

    def _url(self, rec: ServerRecord, spec: ServerSpec) -> str:
        return rec.url or get_backend(spec.kind).base_url(spec, rec.port)

    def _record_members(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        """Remember the leader's descendants: the proof for ones that later clear their environment."""
        if slot.handle is None or now < slot.next_members_at:
            return
        slot.next_members_at = now + max(spec.health.interval, 1.0)
        seen = {(int(p), float(c)) for p, c in rec.members}
        for ident in self.procs.descendants(slot.handle.ident):
            seen.add((ident.pid, ident.create_time))
        alive = sorted((p, c) for p, c in seen if self.procs.is_alive(ProcessIdentity(p, c)))[-MEMBERS_KEPT:]
        rec.members = [[p, c] for p, c in alive]

    # ------------------------------------------------------------------ verbs: stop
    def _replace(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        """The profile changed this server's spec: stop the running instance; the next tick starts the new one."""
        log.info("%s: spec changed; replacing the running instance", rec.label)
        lc.move(rec, lc.STOPPING, expect=lc.ALIVE)
        rec.stop_owner = [self.me.pid, self.me.create_time] if self.me else None
        rec.detail = "replacing: the spec changed"
        self._begin_stop(rec, slot, spec, AFTER_STOP, now)

    def _take_over_stop(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        """A stop is under way. If whoever began it is gone (Ctrl-C), carry it out ourselves."""
        mine = self.me is not None and rec.stop_owner == [self.me.pid, self.me.create_time]
        if stop_owner_alive(rec) and not mine:
            self._reap(rec, slot)
            return
        log.info("%s: finishing a stop its command left behind", rec.label)
        if self.me is not None:
            rec.stop_owner = [self.me.pid, self.me.create_time]
        spec = record_spec(rec)
        self._begin_stop(rec, slot, spec, AFTER_STOP, now)

    def _begin_stop(self, rec: ServerRecord, slot: Slot, spec: ServerSpec | None, after: str, now: float) -> None:
        """Stop the instance's processes in the background; `after` says what follows.

        No port check here: the next start checks its port and names a holder.
        """
        target = dataclasses.replace(target_of(rec), port=None)
        handle, slot.handle = slot.handle, None
        slot.probe = slot.prepare = None
        slot.after_stop, slot.stop_instance = after, rec.instance
        timeout = spec.stop_timeout if spec is not None else DEFAULT_STOP_TIMEOUT
        if after == AFTER_CRASH:
            timeout = min(timeout, 3.0)  # the leader is gone; what is left gets little grace

        def stop() -> StopResult:
            result = self.procs.stop(target, timeout)
            if handle is not None and handle.popen is not None:
                handle.popen.poll()  # reap our child
            return result

        slot.stop = self._submit(stop)
        if slot.stop.done():  # an inline executor (tests): finish in the same tick
            self._stop_done(rec, slot, now)

    def _stop_done(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        fut, slot.stop = slot.stop, None
        after, instance = slot.after_stop, slot.stop_instance
        slot.after_stop, slot.stop_instance = "", None
        try:
            result = fut.result() if fut is not None else StopResult("not running")
        except Exception as e:
            log.error("%s: stopping failed: %s", rec.label, e)
            result = StopResult("failed")
        if rec.instance != instance:
            return  # someone else has moved the record on since
        if after == AFTER_CRASH and rec.state == lc.CRASHED:
            spec = self._spec(rec, slot)
            if spec is not None:
                self._after_crash(rec, slot, spec, now)
        elif after == AFTER_STOP and rec.state == lc.STOPPING:
            finish_stop(rec, instance, result)

    def _spec(self, rec: ServerRecord, slot: Slot) -> ServerSpec | None:
        if slot.spec is None or slot.spec_key != rec.fingerprint:
            spec = record_spec(rec)
            if spec is None:
                # a record we cannot use is reported, not crashed on
                lc.force(rec, lc.FAILED, "its spec no longer validates")
                rec.last_error = f"cannot read this server's spec (from {rec.source}); run up again"
                return None
            slot.spec, slot.spec_key = spec, rec.fingerprint
            slot.external = get_backend(spec.kind).is_external(spec)
        return slot.spec

    # ------------------------------------------------------------------ housekeeping
    def housekeeping(self) -> None:
        """Periodic chores, each under its own guard: log rotation, port leases."""
        records = self.store.records()
        for chore in (self.rotate_logs, self.refresh_leases):
            try:
                chore(records)
            except Exception:
                log.exception("housekeeping: %s failed", chore.__name__)

    def rotate_logs(self, records: list[ServerRecord]) -> None:
        if not self.log_to_files:
            return
        for rec in records:
            spec = record_spec(rec)
            if spec is not None and logfiles.rotate_if_needed(self.store.log_path(rec.ref), spec.log):
                log.info("%s: log rotated", rec.label)

    def refresh_leases(self, records: list[ServerRecord]) -> None:
        held = [(r.port, r.ref) for r in records if r.port and r.desired == "running" and r.managed_by == self.managed_by]
        if held:
            PortLeases(self.store.root).refresh(held)

    def adopt_orphan(self, pid: int, token: str | None) -> ServerRef | None:
        """A process re-parented to us (we are a subreaper): add it to its server's members."""
        if token is None:
            return None
        owner = next((r for r in self.store.records() if r.instance == token), None)
        ident = identity_of(pid)
        if owner is None or ident is None:
            return None
        member = [ident.pid, ident.create_time]

        def add(r: ServerRecord) -> None:
            if member not in r.members:
                r.members = [*r.members, member][-MEMBERS_KEPT:]

        self.store.update(owner.ref, add)
        return owner.ref

    # ------------------------------------------------------------------ plumbing
    def _submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Slow work off the loop; its completion wakes the loop at once."""
        fut: Future[Any] = self.executor.submit(fn, *args)
        fut.add_done_callback(lambda _: self.on_wake())
        return fut

    def _wake_at(self, when: float | None) -> None:
        if when is not None and (self.next_wake is None or when < self.next_wake):
            self.next_wake = when
