"""The supervisor: one per state directory, it keeps the servers that should run running.

Each tick reconciles every record — desired vs actual — through three verbs, in the manner of
gunicorn's arbiter: `reap` (notice exits), `probe` (health, warm-up, hung servers) and `start`
(first start, restarts after backoff). Time, process control and the executor for slow work are
injected, so the restart logic is tested with a fake clock in milliseconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from modelctl import lifecycle as lc
from modelctl.backends import get_backend
from modelctl.backends.base import Launch
from modelctl.health import ProbeResult, probe
from modelctl.ports import describe_port_in_use, is_port_free
from modelctl.process import ProcessIdentity, describe_exit, is_alive, spawn_detached, stop_process_group
from modelctl.profile import ServerSpec, parse_server
from modelctl.state import ServerRecord, StateStore, write_atomic

log = logging.getLogger("modelctl.supervisor")

TICK_SECONDS = 0.25
STARTUP_PROBE_SECONDS = 0.1


@dataclass
class Handle:
    """A running server process: our child (popen) or adopted from an earlier supervisor."""

    ident: ProcessIdentity
    popen: Any = None


class ProcessControl:
    """The real processes, ports and probes. Tests pass a fake with the same methods."""

    def spawn(self, launch: Launch, env: dict[str, str], log_path: str | None) -> Handle:
        popen, ident = spawn_detached(launch.argv, env, log_path, cwd=launch.cwd)
        return Handle(ident, popen)

    def exit_status(self, handle: Handle) -> tuple[bool, int | None]:
        """(exited, returncode); returncode is None when the process was not our child."""
        if handle.popen is not None:
            rc = handle.popen.poll()
            return (rc is not None, rc)
        return (not is_alive(handle.ident), None)

    def is_alive(self, ident: ProcessIdentity) -> bool:
        return is_alive(ident)

    def stop(self, ident: ProcessIdentity, timeout: float) -> str:
        return stop_process_group(ident, timeout)

    def port_holder(self, port: int, host: str) -> str | None:
        return None if is_port_free(port, host) else describe_port_in_use(port, host)

    def probe(self, spec: ServerSpec, url: str) -> ProbeResult:
        return probe(spec.health, url)


class InlineExecutor:
    """Runs submitted work at once; for tests that want a deterministic supervisor."""

    def submit(self, fn: Callable, *args: Any) -> Future:
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 — handed to the caller through the future
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


@dataclass
class Slot:
    """The supervisor's in-memory view of one server: what is in flight for it."""

    handle: Handle | None = None
    probe: Future | None = None
    prepare: Future | None = None
    stopping: Future | None = None
    after_stop: Callable[[ServerRecord, float], None] | None = None
    next_probe_at: float = 0.0
    unhealthy_since: float | None = None
    prepared: bool = False
    progress: dict | None = None
    spec: ServerSpec | None = None
    spec_key: str = ""
    external: bool = False  # lives elsewhere (an external Ollama): probed and prepared, never spawned

    def busy(self) -> bool:
        return any(f is not None and not f.done() for f in (self.probe, self.prepare, self.stopping))


def server_environment(spec: ServerSpec, launch: Launch, port: int | None, gpus: list[int]) -> dict[str, str]:
    """The environment a server starts with: ours, the kind's, the profile's, and its GPUs."""
    env = dict(os.environ)
    env.update(launch.env)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    env["MODELCTL_SERVER"] = spec.name
    if port is not None:
        env["MODELCTL_PORT"] = str(port)
    env.update(spec.env)  # the profile has the last word
    return env


class Supervisor:
    def __init__(
        self,
        store: StateStore,
        clock: Callable[[], float] = time.time,
        procs: ProcessControl | None = None,
        executor: Any = None,
        managed_by: str = "supervisor",
        only: set[str] | None = None,
        log_to_files: bool = True,
    ):
        self.store = store
        self.clock = clock
        self.procs = procs or ProcessControl()
        self.executor = executor or ThreadPoolExecutor(max_workers=8, thread_name_prefix="modelctl-work")
        self.managed_by = managed_by
        self.only = only
        self.log_to_files = log_to_files  # False: servers write to our stdout (the journal under systemd)
        self.slots: dict[str, Slot] = {}
        self._signals: list[int] = []
        self._wake_fd: int | None = None
        self._next_wake: float | None = None

    # ------------------------------------------------------------------ the loop
    def tick(self, now: float | None = None) -> None:
        """One pass over every record: reap, probe, start."""
        now = self.clock() if now is None else now
        names = set()
        for name in self.store.names():
            if self.only is not None and name not in self.only:
                continue
            with self.store.locked():
                record = self.store.load(name)
                if record is None or not self._mine(record):
                    continue
                names.add(name)
                before = record.to_dict()
                self.reconcile(record, self.slots.setdefault(name, Slot()), now)
                if record.to_dict() != before:
                    self.store.save(record, now)
        for name in list(self.slots):
            if name not in names and not self.slots[name].busy():
                del self.slots[name]

    def _mine(self, record: ServerRecord) -> bool:
        return record.managed_by == self.managed_by and (self.only is None or record.name in self.only)

    def reconcile(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        if slot.stopping is not None:
            if not slot.stopping.done():
                return
            self._finish_stop(rec, slot, now)
        if rec.desired != "running":
            self._reap(rec, slot)  # `down` stops the process itself; we only collect our child
            if rec.state == lc.STOPPED:
                slot.handle = None
            return
        spec = self._spec(rec, slot)
        if spec is None:
            return
        if rec.state in (lc.STARTING, lc.READY, lc.UNHEALTHY):
            if slot.handle is None and rec.pid is not None and not self._adopt(rec, slot):
                self._crashed(rec, slot, spec, now, None, "exited while no supervisor was watching")
                return
            exited, rc = self._reap(rec, slot)
            if exited:
                self._crashed(rec, slot, spec, now, rc, None)
                self._start_if_due(rec, slot, spec, now)
                return
            self._check_health(rec, slot, spec, now)
        elif rec.state == lc.STOPPED:
            self._start(rec, slot, spec, now)
        elif rec.state == lc.BACKOFF:
            self._start_if_due(rec, slot, spec, now)

    def _start_if_due(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        if rec.state != lc.BACKOFF:
            return
        if now >= (rec.next_start_at or 0):
            rec.restarts += 1
            self._start(rec, slot, spec, now)
        else:
            self._wake_at(rec.next_start_at)

    # ------------------------------------------------------------------ verbs
    def _reap(self, rec: ServerRecord, slot: Slot) -> tuple[bool, int | None]:
        if slot.handle is None:
            return (False, None)
        exited, rc = self.procs.exit_status(slot.handle)
        if exited and rec.desired != "running":
            slot.handle = None
        return exited, rc

    def _adopt(self, rec: ServerRecord, slot: Slot) -> bool:
        ident = ProcessIdentity(rec.pid, rec.create_time or 0.0)
        if not self.procs.is_alive(ident):
            return False
        slot.handle = Handle(ident, None)
        slot.prepared = rec.state in (lc.READY, lc.UNHEALTHY)
        log.info("%s: adopted running pid %s (%s)", rec.name, rec.pid, rec.state)
        return True

    def _start(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        backend = get_backend(spec.kind)
        launch = backend.launch(spec, rec.port, rec.gpus)
        rec.move(lc.STARTING)
        rec.started_at, rec.ready_at, rec.next_start_at = now, None, None
        rec.progress, rec.detail = None, "waiting for health"
        slot.prepared, slot.unhealthy_since, slot.next_probe_at = False, None, now
        slot.probe = slot.prepare = None
        if launch is None:  # lives elsewhere: nothing to spawn, only to probe and prepare
            rec.pid = rec.create_time = None
            return
        holder = self.procs.port_holder(rec.port, spec.host) if rec.port else None
        if holder:
            self._crashed(rec, slot, spec, now, None, f"cannot start: {holder}", exited=False)
            return
        log_path = None
        if self.log_to_files:
            log_path = str(self.store.log_path(rec.name))
            self.store.ensure()
            with open(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as f:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
                f.write(f"--- modelctl {stamp}: starting {rec.name}: {' '.join(launch.argv)}\n")
        try:
            handle = self.procs.spawn(launch, server_environment(spec, launch, rec.port, rec.gpus), log_path)
        except OSError as e:
            rec.move(lc.FAILED)
            rec.last_error = f"cannot run {launch.argv[0]!r}: {e.strerror or e}"
            rec.detail = None
            log.error("%s: %s", rec.name, rec.last_error)
            return
        slot.handle = handle
        slot.next_probe_at = now + STARTUP_PROBE_SECONDS
        self._wake_at(slot.next_probe_at)
        rec.pid, rec.create_time = handle.ident.pid, handle.ident.create_time
        log.info("%s: started pid %s on port %s", rec.name, rec.pid, rec.port)

    def _check_health(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> None:
        backend = get_backend(spec.kind)
        url = rec.url or backend.base_url(spec, rec.port)
        if slot.prepare is not None:
            if slot.progress is not None:
                rec.progress = dict(slot.progress)
            if not slot.prepare.done():
                return self._check_startup_timeout(rec, slot, spec, now)
            fut, slot.prepare = slot.prepare, None
            try:
                rec.info = fut.result() or {}
            except Exception as e:  # noqa: BLE001 — a preparation error becomes the server's error
                rec.last_error = str(e)
                rec.progress = None
                log.error("%s: preparation failed: %s", rec.name, e)
                self._stop_then(rec, slot, spec, lambda r, t: (r.move(lc.FAILED), setattr(r, "detail", None)))
                return
            slot.prepared = True
            rec.progress = None
            self._mark_ready(rec, slot, now)
            return

        if slot.probe is not None and slot.probe.done():
            fut, slot.probe = slot.probe, None
            try:
                result = fut.result()
            except Exception as e:  # noqa: BLE001
                result = ProbeResult(False, f"probe error: {e}")
            self._apply_probe(rec, slot, spec, result, url, now)
            if slot.stopping is not None or rec.state not in (lc.STARTING, lc.READY, lc.UNHEALTHY):
                return
        if rec.state == lc.STARTING and self._check_startup_timeout(rec, slot, spec, now):
            return
        if rec.state == lc.UNHEALTHY and slot.unhealthy_since is not None and not slot.external:
            if now - slot.unhealthy_since > spec.health.grace:
                reason = f"unhealthy for {now - slot.unhealthy_since:.0f}s ({rec.detail}); restarting"
                log.warning("%s: %s", rec.name, reason)
                self._stop_then(rec, slot, spec, lambda r, t: self._crashed(r, slot, spec, t, None, reason, exited=False))
                return
        if slot.probe is None and slot.prepare is None and now >= slot.next_probe_at:
            slot.probe = self._submit(self._probe_job, spec, url, rec.state != lc.STARTING)

    def _probe_job(self, spec: ServerSpec, url: str, check_model: bool) -> ProbeResult:
        result = self.procs.probe(spec, url)
        if result.ok and check_model:
            ok, why = get_backend(spec.kind).is_ready(spec, url)
            if not ok:
                return ProbeResult(False, why)
        return result

    def _apply_probe(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, result: ProbeResult, url: str, now: float) -> None:
        interval = STARTUP_PROBE_SECONDS if rec.state == lc.STARTING else spec.health.interval
        if rec.state == lc.UNHEALTHY:
            interval = min(interval, 1.0)
        slot.next_probe_at = now + interval
        if rec.state == lc.STARTING:
            self._wake_at(slot.next_probe_at)
        if rec.state == lc.STARTING:
            if not result.ok:
                rec.detail = f"warming up: {result.detail}"
                return
            backend = get_backend(spec.kind)
            if not slot.prepared and backend.has_prepare:
                rec.detail = "preparing"

                def report(progress: dict) -> None:
                    slot.progress = progress

                slot.prepare = self._submit(backend.prepare, spec, url, report)
                return
            self._mark_ready(rec, slot, now)
        elif result.ok:
            if rec.state == lc.UNHEALTHY:
                log.info("%s: healthy again", rec.name)
                rec.move(lc.READY)
            rec.detail, slot.unhealthy_since = None, None
        else:
            if rec.state == lc.READY:
                log.warning("%s: unhealthy: %s", rec.name, result.detail)
                rec.move(lc.UNHEALTHY)
                slot.unhealthy_since = now
            rec.detail = f"unhealthy: {result.detail}"

    def _mark_ready(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        rec.move(lc.READY)
        rec.ready_at, rec.detail = now, None
        slot.next_probe_at = now + (slot.spec.health.interval if slot.spec else 2.0)
        log.info("%s: ready after %.1fs", rec.name, now - (rec.started_at or now))

    def _check_startup_timeout(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float) -> bool:
        if rec.started_at is None or now - rec.started_at <= spec.startup_timeout:
            return False
        reason = f"not ready after {spec.startup_timeout:g}s (startup_timeout): {rec.detail or ''}".rstrip(": ")
        log.warning("%s: %s", rec.name, reason)
        if slot.external:  # nothing of ours to restart: say so and stop trying
            slot.probe = slot.prepare = None
            rec.move(lc.FAILED)
            rec.last_error = f"{rec.url} did not answer: {reason}"
            rec.detail = None
            return True
        self._stop_then(rec, slot, spec, lambda r, t: self._crashed(r, slot, spec, t, None, reason, exited=False))
        return True

    def _stop_then(self, rec: ServerRecord, slot: Slot, spec: ServerSpec, then: Callable[[ServerRecord, float], None]) -> None:
        """Stop the process group in the background; `then` updates the record once it is gone."""
        handle, slot.handle = slot.handle, None
        slot.probe = slot.prepare = None
        slot.after_stop = then
        if handle is None:
            slot.stopping = self._submit(lambda: "not running")
            return

        def stop() -> str:
            result = self.procs.stop(handle.ident, spec.stop_timeout)
            if handle.popen is not None:
                handle.popen.poll()  # reap our child
            return result

        slot.stopping = self._submit(stop)

    def _finish_stop(self, rec: ServerRecord, slot: Slot, now: float) -> None:
        fut, slot.stopping = slot.stopping, None
        then, slot.after_stop = slot.after_stop, None
        with contextlib.suppress(Exception):
            fut.result()
        if rec.desired == "running" and then is not None:
            then(rec, now)

    def _crashed(
        self, rec: ServerRecord, slot: Slot, spec: ServerSpec, now: float, rc: int | None, error: str | None, exited: bool = True
    ) -> None:
        """A failure: count it, then back off, give up (failed) or stay down per the policy."""
        if exited:
            rec.last_exit = describe_exit(rc)
        # a leader that died may leave its children (vLLM workers) holding GPU memory and the port
        if slot.handle is not None:
            self.procs.stop(slot.handle.ident, min(spec.stop_timeout, 3.0))
        slot.handle = None
        slot.probe = slot.prepare = None
        rec.last_error = error
        policy = spec.restart
        if rec.ready_at is not None and now - rec.ready_at >= policy.stable_after:
            rec.consecutive_failures = 0
        rec.failures = [t for t in rec.failures if now - t <= policy.window] + [now]
        rec.consecutive_failures += 1
        rec.pid = rec.create_time = None
        rec.ready_at = None
        rec.move(lc.CRASHED)
        clean_exit = rc == 0 and error is None
        what = error or rec.last_exit
        if policy.policy == "never" or (policy.policy == "on-failure" and clean_exit):
            rec.move(lc.STOPPED)
            rec.desired = "stopped"
            rec.detail = f"exited ({what}); restart policy '{policy.policy}'"
            log.info("%s: %s", rec.name, rec.detail)
        elif len(rec.failures) >= policy.max_failures:
            rec.move(lc.FAILED)
            rec.detail = f"crash loop: {len(rec.failures)} failures within {policy.window:g}s; last: {what}"
            log.error("%s: %s", rec.name, rec.detail)
        else:
            delay = min(policy.backoff * (2 ** (rec.consecutive_failures - 1)), policy.backoff_max)
            rec.next_start_at = now + delay
            rec.move(lc.BACKOFF)
            rec.detail = f"{what}; restarting in {delay:g}s"
            log.warning("%s: %s", rec.name, rec.detail)

    def _spec(self, rec: ServerRecord, slot: Slot) -> ServerSpec | None:
        if slot.spec is None or slot.spec_key != rec.fingerprint:
            try:
                slot.spec = parse_server(rec.name, rec.spec, rec.source)
            except Exception as e:  # noqa: BLE001 — a record we cannot use is reported, not crashed on
                if rec.state != lc.FAILED:
                    rec.state = lc.FAILED
                rec.last_error = f"cannot read this server's spec: {e}"
                return None
            slot.spec_key = rec.fingerprint
            slot.external = get_backend(slot.spec.kind).is_external(slot.spec)
        return slot.spec

    def _submit(self, fn: Callable, *args: Any) -> Future:
        """Slow work off the loop; its completion wakes the loop at once."""
        fut = self.executor.submit(fn, *args)
        fut.add_done_callback(lambda _: self._wake())
        return fut

    def _wake(self) -> None:
        if self._wake_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_fd, b"!")

    def _wake_at(self, when: float | None) -> None:
        if when is not None and (self._next_wake is None or when < self._next_wake):
            self._next_wake = when

    # ------------------------------------------------------------------ running as a daemon
    def wants_to_run(self) -> bool:
        if any(slot.busy() for slot in self.slots.values()):
            return True
        return any(r.desired == "running" for r in self.store.load_all() if self._mine(r))

    def serve(self, exit_when_idle: bool = True) -> int:
        """Run until told to stop (SIGTERM/SIGINT) or, if exit_when_idle, until nothing should run."""
        lock_fd = acquire_supervisor_lock(self.store)
        if lock_fd is None:
            log.info("another supervisor is running for %s", self.store.root)
            return 0
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        signal.set_wakeup_fd(wfd)
        self._wake_fd = wfd
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        log.info("supervisor pid %s watching %s", os.getpid(), self.store.root)
        try:
            while True:
                self.tick()
                stop = any(s in (signal.SIGTERM, signal.SIGINT) for s in self._signals)
                self._signals.clear()
                if stop:
                    log.info("supervisor stopping on signal; servers keep running")
                    return 0
                if exit_when_idle and self._exit_if_idle(lock_fd):
                    log.info("nothing left to supervise; exiting")
                    lock_fd = None
                    return 0
                timeout = TICK_SECONDS
                if self._next_wake is not None:
                    timeout = min(timeout, max(0.0, self._next_wake - self.clock()))
                    self._next_wake = None
                with contextlib.suppress(InterruptedError):
                    select.select([rfd], [], [], timeout)
                with contextlib.suppress(BlockingIOError):
                    while os.read(rfd, 512):
                        pass
        finally:
            signal.set_wakeup_fd(-1)
            self._wake_fd = None
            os.close(rfd)
            os.close(wfd)
            self.executor.shutdown(wait=False)
            if lock_fd is not None:
                release_supervisor_lock(self.store, lock_fd)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signals.append(signum)  # handled in the loop, never here

    def _exit_if_idle(self, lock_fd: int) -> bool:
        with self.store.locked():
            if self.wants_to_run():
                return False
            release_supervisor_lock(self.store, lock_fd)
            return True


# ---------------------------------------------------------------------- the singleton
def _supervisor_lock_path(store: StateStore) -> str:
    return str(store.root / "supervisor.lock")


def acquire_supervisor_lock(store: StateStore) -> int | None:
    store.ensure()
    fd = os.open(_supervisor_lock_path(store), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    from modelctl.process import identity_of

    ident = identity_of(os.getpid())
    info = {"pid": os.getpid(), "create_time": ident.create_time if ident else None, "started_at": time.time()}
    write_atomic(store.root / "supervisor.json", json.dumps(info))
    return fd


def release_supervisor_lock(store: StateStore, fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (store.root / "supervisor.json").unlink()
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def supervisor_pid(store: StateStore) -> int | None:
    """The running supervisor's pid, or None if none holds the lock."""
    path = _supervisor_lock_path(store)
    if not os.path.exists(path):
        return None
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return int(json.loads((store.root / "supervisor.json").read_text())["pid"])
            except (OSError, ValueError, KeyError):
                return -1  # running, identity not yet written
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def start_supervisor(store: StateStore) -> int:
    """Start a detached supervisor for this state directory (it exits at once if one runs)."""
    store.ensure()
    argv = [sys.executable, "-m", "modelctl", "--state-dir", str(store.root), "supervise"]
    popen, ident = spawn_detached(argv, dict(os.environ), store.root / "supervisor.log")
    # wait until it holds the lock (or lost the race to another one), so callers that check
    # right after this do not start yet another
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and popen.poll() is None and supervisor_pid(store) is None:
        time.sleep(0.02)
    if popen.poll() not in (None, 0) and supervisor_pid(store) is None:
        from modelctl.errors import ModelctlError

        log_path = store.root / "supervisor.log"
        tail = log_path.read_text(errors="replace").splitlines()[-10:] if log_path.exists() else []
        raise ModelctlError(f"the supervisor exited at once ({describe_exit(popen.returncode)}); {log_path}:\n" + "\n".join(tail))
    return supervisor_pid(store) or ident.pid


def ensure_supervisor(store: StateStore) -> int:
    pid = supervisor_pid(store)
    if pid is None:
        return start_supervisor(store)
    return pid


def wake_supervisor(store: StateStore) -> None:
    pid = supervisor_pid(store)
    if pid and pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGUSR1)
