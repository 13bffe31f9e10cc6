"""What the CLI commands do: up, down, restart, status, logs. The CLI only parses and renders."""

from __future__ import annotations

import concurrent.futures
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from modelctl import lifecycle as lc
from modelctl.backends import get_backend
from modelctl.errors import ModelctlError, PortInUseError, UnknownServerError
from modelctl.gpus import allocate_gpus, discover_gpus
from modelctl.ports import describe_port_in_use, is_port_free, pick_free_port
from modelctl.process import ProcessIdentity, group_rss, is_alive, stop_process_group
from modelctl.profile import COMMON_KEYS, Profile, ServerSpec, parse_server
from modelctl.state import ServerRecord, StateStore
from modelctl.supervisor import ensure_supervisor, supervisor_pid, wake_supervisor


def record_identity(rec: ServerRecord) -> ProcessIdentity | None:
    if rec.pid is None or rec.create_time is None:
        return None
    return ProcessIdentity(rec.pid, rec.create_time)


def record_spec(rec: ServerRecord) -> ServerSpec | None:
    """The spec a record was started with, or None if it no longer validates."""
    try:
        return parse_server(rec.name, rec.spec, rec.source)
    except ModelctlError:
        return None


def select_specs(profile: Profile, names: Iterable[str]) -> list[ServerSpec]:
    names = list(names)
    unknown = [n for n in names if n not in profile.servers]
    if unknown:
        raise UnknownServerError(
            f"{profile.path}: no server named {', '.join(map(repr, unknown))}; "
            f"the profile has: {', '.join(profile.servers)}"
        )
    return [profile.servers[n] for n in names] if names else list(profile.servers.values())


@dataclass
class UpPlan:
    start: list[ServerSpec] = field(default_factory=list)  # new, changed or failed: (re)start
    unchanged: list[str] = field(default_factory=list)  # already running (or on the way) with this spec


class Controller:
    """The library behind the CLI; tests call it directly."""

    def __init__(self, store: StateStore):
        self.store = store

    # ------------------------------------------------------------------ up
    def plan_up(
        self, profile: Profile, specs: list[ServerSpec], managed_by: str = "supervisor", force: bool = False
    ) -> tuple[UpPlan, list[ServerRecord]]:
        """Decide what to start and allocate ports and GPUs; raise before anything changes.

        Must be called with the state lock held. Returns the plan and the new records to write.
        `force` starts every spec even if it already runs unchanged (modelctl run).
        """
        records = {r.name: r for r in self.store.load_all()}
        plan = UpPlan()
        for spec in specs:
            rec = records.get(spec.name)
            if rec is not None and rec.managed_by != managed_by and is_alive(record_identity(rec)):
                raise ModelctlError(
                    f"server '{spec.name}' is run by systemd (modelctl run); use systemctl to manage it"
                    if rec.managed_by == "systemd"
                    else f"server '{spec.name}' runs under the modelctl supervisor; `modelctl down {spec.name}` first"
                )
            if not force and rec is not None and rec.desired == "running" and rec.fingerprint == spec.fingerprint and rec.state != lc.FAILED:
                plan.unchanged.append(spec.name)
            else:
                plan.start.append(spec)
        starting = {s.name for s in plan.start}
        others = [r for r in records.values() if r.name not in starting and r.desired == "running"]

        # ports: explicit ones must be free (or held by this server's own process), auto ones reused
        ports: dict[str, int | None] = {}
        taken_by_others = {r.port: r.name for r in others if r.port}
        for spec in plan.start:
            rec = records.get(spec.name)
            own_port = rec.port if rec is not None and is_alive(record_identity(rec)) else None
            if get_backend(spec.kind).is_external(spec):
                ports[spec.name] = None  # nothing to bind
                continue
            if spec.port is not None:
                if spec.port in taken_by_others:
                    raise PortInUseError(
                        f"{spec.source}: server '{spec.name}': key 'port': port {spec.port} belongs to "
                        f"server '{taken_by_others[spec.port]}' (see modelctl status)"
                    )
                if spec.port != own_port and not is_port_free(spec.port, spec.host):
                    raise PortInUseError(f"{spec.source}: server '{spec.name}': key 'port': {describe_port_in_use(spec.port, spec.host)}")
                ports[spec.name] = spec.port
            else:
                previous = rec.port if rec is not None else None
                if previous and previous not in taken_by_others and (previous == own_port or is_port_free(previous, spec.host)):
                    ports[spec.name] = previous
                else:
                    reserved = set(taken_by_others) | {p for p in ports.values() if p}
                    reserved |= {r.port for r in records.values() if r.port and r.name != spec.name}
                    port = pick_free_port(profile.port_range, spec.host, reserved)
                    if port is None:
                        raise PortInUseError(
                            f"{profile.path}: no free port in port_range {profile.port_range[0]}-{profile.port_range[1]} for server '{spec.name}'"
                        )
                    ports[spec.name] = port
            taken_by_others[ports[spec.name]] = spec.name

        # GPUs: exclusive unless shared; enough for all of them, or nothing starts
        requests = {s.name: (s.gpus, s.gpus_shared) for s in plan.start if s.gpu_count}
        gpus: dict[str, list[int]] = {}
        if requests:
            in_use = {}
            for r in others:
                shared = bool(r.spec.get("gpus_shared"))
                for g in r.gpus:
                    if not shared:
                        in_use[g] = r.name
            gpus = allocate_gpus(requests, discover_gpus(), in_use)

        new_records = []
        for spec in plan.start:
            backend = get_backend(spec.kind)
            rec = records.get(spec.name) or ServerRecord(name=spec.name)
            rec.kind, rec.source, rec.spec, rec.fingerprint = spec.kind, spec.source, dict(spec.raw), spec.fingerprint
            rec.managed_by = managed_by
            rec.host, rec.port, rec.gpus = spec.host, ports[spec.name], gpus.get(spec.name, [])
            rec.url = backend.base_url(spec, rec.port)
            rec.failures, rec.consecutive_failures, rec.next_start_at = [], 0, None
            rec.last_error, rec.detail, rec.progress = None, None, None
            new_records.append(rec)
        return plan, new_records

    def up(self, profile: Profile, names: Iterable[str] = ()) -> UpPlan:
        """Ask for the servers to run; returns at once (see wait_ready). Idempotent."""
        specs = select_specs(profile, names)
        with self.store.locked():
            plan, new_records = self.plan_up(profile, specs)
        replace = [r for r in new_records if is_alive(record_identity(r))]
        if replace:
            self.stop([r.name for r in replace])  # changed spec: the old process goes first
        with self.store.locked():
            for rec in new_records:
                current = self.store.load(rec.name)
                if current is not None:
                    rec.restarts, rec.last_exit = current.restarts, current.last_exit
                rec.desired, rec.state = "running", lc.STOPPED
                rec.pid = rec.create_time = rec.started_at = rec.ready_at = None
                self.store.save(rec)
        self.kick()
        return plan

    def kick(self) -> None:
        """Make sure a supervisor runs, and wake it to act now."""
        with self.store.locked():
            wants = any(r.desired == "running" and r.managed_by == "supervisor" for r in self.store.load_all())
        if wants:
            ensure_supervisor(self.store)
        wake_supervisor(self.store)

    def wait_ready(
        self,
        names: list[str],
        on_update: Callable[[list[ServerRecord]], None] | None = None,
        poll: float = 0.2,
        timeout: float | None = None,
    ) -> list[ServerRecord]:
        """Wait until every named server is ready or failed, or its startup_timeout has passed."""
        t0 = time.time()
        deadlines = {}
        for name in names:
            rec = self.store.load(name)
            deadlines[name] = t0 + (timeout if timeout is not None else self._startup_timeout(rec) + 5.0)
        while True:
            records = [self.store.load(n) for n in names]
            records = [r for r in records if r is not None]
            if on_update:
                on_update(records)
            now = time.time()
            pending = [r for r in records if r.state not in (lc.READY, lc.FAILED) and r.desired == "running" and now < deadlines[r.name]]
            if not pending:
                return records
            if supervisor_pid(self.store) is None:
                self.kick()  # it died under us: a new one re-adopts the servers
            time.sleep(poll)

    @staticmethod
    def _startup_timeout(rec: ServerRecord | None) -> float:
        spec = record_spec(rec) if rec is not None else None
        if spec is None:
            return 60.0
        policy = spec.restart
        # room for the backoff waits of a crash loop before it is declared failed
        backoff = sum(min(policy.backoff * 2**i, policy.backoff_max) for i in range(policy.max_failures))
        return spec.startup_timeout + min(backoff, 120.0)

    # ------------------------------------------------------------------ down / restart
    def _records(self, names: Iterable[str]) -> list[ServerRecord]:
        names = list(names)
        records = {r.name: r for r in self.store.load_all()}
        unknown = [n for n in names if n not in records]
        if unknown:
            known = ", ".join(records) or "none"
            raise UnknownServerError(f"no server named {', '.join(map(repr, unknown))} in {self.store.root} (known: {known})")
        return [records[n] for n in names] if names else list(records.values())

    def stop(self, names: Iterable[str] = (), desired_after: str = "stopped") -> list[tuple[str, str]]:
        """Stop servers: SIGTERM their groups, wait, SIGKILL; return when gone and ports are free."""
        targets = self._records(names)
        with self.store.locked():
            for rec in targets:
                current = self.store.load(rec.name) or rec

                def mark(r: ServerRecord) -> None:
                    r.desired = "stopped"  # first, so that the exit is not taken for a crash
                    r.move(lc.STOPPING if r.state in (lc.STARTING, lc.READY, lc.UNHEALTHY) else lc.STOPPED)
                    r.detail = "stopping" if r.state == lc.STOPPING else None

                self.store.update(current.name, mark)
        wake_supervisor(self.store)

        def stop_one(rec: ServerRecord) -> tuple[str, str]:
            spec = record_spec(rec)
            timeout = spec.stop_timeout if spec is not None else COMMON_KEYS["stop_timeout"].default
            ident = record_identity(self.store.load(rec.name) or rec)
            result = stop_process_group(ident, timeout) if ident else "not running"
            if rec.port:
                self._wait_port_free(rec.port, rec.host)
            return rec.name, result

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:
            results = list(pool.map(stop_one, targets))
        with self.store.locked():
            for rec in targets:

                def finish(r: ServerRecord) -> None:
                    if r.state != lc.STOPPED:
                        r.move(lc.STOPPED)
                    r.pid = r.create_time = r.ready_at = None
                    r.detail, r.progress = None, None
                    r.desired = desired_after

                self.store.update(rec.name, finish)
        self.kick()
        return results

    def down(self, names: Iterable[str] = ()) -> list[tuple[str, str]]:
        return self.stop(names)

    def restart(self, names: Iterable[str]) -> list[str]:
        """Stop and start again from the recorded spec; clears a failed state."""
        targets = [r.name for r in self._records(names)]
        self.stop(targets, desired_after="running")
        with self.store.locked():
            for name in targets:

                def reset(r: ServerRecord) -> None:
                    r.failures, r.consecutive_failures, r.next_start_at = [], 0, None
                    r.last_error = None

                self.store.update(name, reset)
        self.kick()
        return targets

    def _wait_port_free(self, port: int, host: str, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_port_free(port, host):
                return
            time.sleep(0.05)

    # ------------------------------------------------------------------ status / logs
    def status(self) -> list[dict[str, Any]]:
        """One row per server, as observed now (read-only)."""
        rows = []
        now = time.time()
        for rec in self.store.load_all():
            ident = record_identity(rec)
            alive = is_alive(ident)
            state = rec.state
            detail = rec.detail
            if state in (lc.STARTING, lc.READY, lc.UNHEALTHY) and ident is not None and not alive:
                # dead, or its pid now belongs to another process: either way not running
                state, detail = lc.STOPPED, f"not running: recorded pid {rec.pid} is gone or is another process"
            rows.append(
                {
                    "name": rec.name,
                    "kind": rec.kind,
                    "state": state,
                    "desired": rec.desired,
                    "managed_by": rec.managed_by,
                    "pid": rec.pid if alive else None,
                    "host": rec.host,
                    "port": rec.port,
                    "url": rec.url,
                    "gpus": rec.gpus,
                    "model": rec.info.get("model") or self._model_label(rec),
                    "uptime": (now - rec.started_at) if alive and rec.started_at else None,
                    "restarts": rec.restarts,
                    "rss": group_rss(ident) if alive and ident else None,
                    "last_exit": rec.last_exit,
                    "last_error": rec.last_error,
                    "detail": detail,
                    "progress": rec.progress,
                    "log": str(self.store.log_path(rec.name)),
                }
            )
        return rows

    @staticmethod
    def _model_label(rec: ServerRecord) -> str:
        spec = record_spec(rec)
        return get_backend(spec.kind).model_label(spec) if spec is not None else ""

    def log_tail(self, name: str, lines: int = 20) -> list[str]:
        path = self.store.log_path(name)
        try:
            with open(path, "rb") as f:
                return [b.decode("utf-8", "replace").rstrip("\n") for b in deque(f, maxlen=lines)]
        except FileNotFoundError:
            return []

    def follow_log(self, name: str, lines: int = 20, poll: float = 0.2) -> Iterator[str]:
        path = self.store.log_path(name)
        yield from self.log_tail(name, lines)
        pos = path.stat().st_size if path.exists() else 0
        while True:
            if path.exists():
                size = path.stat().st_size
                if size < pos:
                    pos = 0  # truncated or replaced
                if size > pos:
                    with open(path, "rb") as f:
                        f.seek(pos)
                        chunk = f.read()
                        pos = f.tell()
                    for line in chunk.decode("utf-8", "replace").splitlines():
                        yield line
            time.sleep(poll)


def format_bytes(n: int | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
