"""What the CLI commands do: up, down, restart, status, logs. The CLI only parses and renders.

Servers are named `profile/server`. A `Scope` says which ones a command acts on: one profile's
(`-p`), named ones (`lab/embed`, or a bare `embed` when only one profile has it), or all.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelctl import lifecycle as lc
from modelctl import logfiles
from modelctl.backends import get_backend
from modelctl.daemon import ensure_supervisor, supervisor_info, wake_supervisor
from modelctl.errors import ModelctlError, UnknownServerError
from modelctl.gpus import allocate_gpus, discover_gpus, gpu_memory_by_pid, group_gpu_memory
from modelctl.names import ServerRef, is_valid_name, unit_name
from modelctl.ports import PortLeases, PortRequest, allocate_ports
from modelctl.process import group_usage, is_alive
from modelctl.profile import Profile, peek_profile_name, record_spec
from modelctl.spec import ServerSpec
from modelctl.state import AnyRecord, BrokenRecord, ServerRecord, StateStore
from modelctl.stopping import Stopped, record_identity, stop_owner_alive, stop_servers, target_of

SUPERVISOR = "supervisor"
SYSTEMD = "systemd"


def profile_name_of(arg: str | os.PathLike[str]) -> str:
    """`-p` takes a profile file or a profile's name; commands other than up need only the name."""
    path = Path(arg)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return peek_profile_name(path)
    if is_valid_name(str(arg)):
        return str(arg)
    raise UnknownServerError(f"{arg}: no such profile file, and not a profile name")


def systemd_unit_of(rec: ServerRecord) -> str:
    return rec.info.get("systemd_unit") or unit_name(rec.profile, rec.name)


@dataclass(frozen=True)
class Scope:
    """Which servers a command acts on: a profile's (or every profile's), or named ones in it."""

    profile: str | None = None
    names: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"profile {self.profile}" if self.profile else "any profile"


def select_specs(profile: Profile, names: Iterable[str]) -> list[ServerSpec]:
    wanted = []
    for text in names:
        try:
            parsed = ServerRef.parse(text, profile.name)
        except ValueError as e:
            raise UnknownServerError(f"{profile.path}: {e}") from None
        wanted.append(parsed.name if isinstance(parsed, ServerRef) else parsed)
    unknown = [n for n in wanted if n not in profile.servers]
    if unknown:
        raise UnknownServerError(
            f"{profile.path}: no server named {', '.join(map(repr, unknown))}; the profile has: {', '.join(profile.servers)}"
        )
    return [profile.servers[n] for n in wanted] if wanted else list(profile.servers.values())


@dataclass
class UpPlan:
    start: list[ServerSpec] = field(default_factory=list)  # new, changed, stopped or failed: (re)start
    unchanged: list[str] = field(default_factory=list)  # already running (or on the way) with this spec
    orphans: list[str] = field(default_factory=list)  # servers of this profile that it no longer lists
    removed: list[Stopped] = field(default_factory=list)  # orphans stopped by --remove-orphans


def _spec_changes(rec: ServerRecord, spec: ServerSpec, managed_by: str, port: int | None, gpus: list[int], url: str) -> None:
    """Write what the profile now says into a record; the supervisor takes it from there."""
    rec.kind, rec.source, rec.spec, rec.fingerprint = spec.kind, spec.source, dict(spec.raw), spec.fingerprint
    rec.managed_by, rec.host, rec.port, rec.gpus, rec.url = managed_by, spec.host, port, gpus, url
    rec.desired = "running"
    rec.failures, rec.consecutive_failures, rec.last_error = [], 0, None
    if rec.state == lc.FAILED:
        lc.move(rec, lc.STOPPED, expect=lc.FAILED)
        rec.detail = None
    elif rec.state == lc.BACKOFF:
        rec.next_start_at = None  # a new spec: try it now


class Controller:
    """The library behind the CLI; tests call it directly."""

    def __init__(self, store: StateStore):
        self.store = store

    # ------------------------------------------------------------------ scopes
    def resolve(self, scope: Scope) -> list[AnyRecord]:
        """The records a scope names; unknown or ambiguous names are an error naming the choices."""
        records = self.store.load_all(scope.profile)
        if not scope.names:
            return records
        found: list[AnyRecord] = []
        for text in scope.names:
            try:
                parsed = ServerRef.parse(text, scope.profile)
            except ValueError as e:
                raise UnknownServerError(str(e)) from None
            if isinstance(parsed, ServerRef):
                matches = [r for r in records if r.ref == parsed]
            else:
                matches = [r for r in records if r.ref.name == parsed]
            if len(matches) > 1:
                choices = ", ".join(r.label for r in matches)
                raise UnknownServerError(f"{text!r} is in more than one profile: {choices}; say which (PROFILE/{text} or -p PROFILE)")
            if not matches:
                known = ", ".join(r.label for r in records) or "none"
                raise UnknownServerError(f"no server {text!r} in {scope.describe()} of {self.store.root} (known: {known})")
            if matches[0] not in found:
                found.append(matches[0])
        return found

    # ------------------------------------------------------------------ up
    def plan_up(
        self, profile: Profile, specs: list[ServerSpec], managed_by: str = SUPERVISOR, force: bool = False
    ) -> tuple[UpPlan, list[ServerRecord]]:
        """Decide what to start and allocate ports and GPUs; raise before anything changes.

        Called with the state lock held. Returns the plan and the records to write. `force`
        starts every spec even if it already runs unchanged (modelctl run).
        """
        everything = self.store.load_all()
        readable = [r for r in everything if isinstance(r, ServerRecord)]
        mine = {r.ref: r for r in everything if r.ref.profile == profile.name}
        plan = UpPlan()
        for spec in specs:
            rec = mine.get(spec.ref)
            if isinstance(rec, BrokenRecord):
                raise ModelctlError(
                    f"{rec.label}: its record {rec.path} cannot be read ({rec.error}); modelctl will not start a second copy "
                    f"of a server it cannot account for. Fix or remove that file (`modelctl down {rec.label}` stops the "
                    "process it names, if it can tell), then run up again"
                )
            if rec is not None and rec.managed_by != managed_by and is_alive(record_identity(rec)):
                raise ModelctlError(
                    f"server {rec.label} is run by systemd (unit {systemd_unit_of(rec)}); use systemctl to manage it"
                    if rec.managed_by == SYSTEMD
                    else f"server {rec.label} runs under the modelctl supervisor; `modelctl down {rec.label}` first"
                )
            same = rec is not None and rec.desired == "running" and rec.fingerprint == spec.fingerprint
            if not force and same and rec is not None and rec.state != lc.FAILED:
                plan.unchanged.append(str(spec.ref))
            else:
                plan.start.append(spec)
        plan.orphans = [
            r.label for r in mine.values() if isinstance(r, ServerRecord) and r.name not in profile.servers and r.desired == "running"
        ]
        starting = {s.ref for s in plan.start}
        others = [r for r in readable if r.ref not in starting]

        requests = []
        for spec in plan.start:
            rec = mine.get(spec.ref)
            old = rec if isinstance(rec, ServerRecord) else None
            alive = old is not None and is_alive(record_identity(old))
            previous = old.port if old else None
            requests.append(PortRequest.of(spec, previous, previous if alive else None, get_backend(spec.kind).is_external(spec)))
        held = {r.port: r.label for r in others if r.port and r.desired == "running"}
        ports = allocate_ports(requests, profile.port_range, held, PortLeases(self.store.root))

        # GPUs: exclusive unless shared; enough for all of them, or nothing starts
        gpu_requests = {str(s.ref): (s.gpus, s.gpus_shared) for s in plan.start if s.gpu_count}
        gpus: dict[str, list[int]] = {}
        if gpu_requests:
            in_use = {}
            for r in others:
                if r.desired == "running" and not r.spec.get("gpus_shared"):
                    for g in r.gpus:
                        in_use[g] = r.label
            gpus = allocate_gpus(gpu_requests, discover_gpus(), in_use)

        new_records = []
        for spec in plan.start:
            existing = mine.get(spec.ref)
            rec = existing if isinstance(existing, ServerRecord) else ServerRecord(profile=spec.profile, name=spec.name)
            port = ports[spec.ref]
            _spec_changes(rec, spec, managed_by, port, gpus.get(str(spec.ref), []), get_backend(spec.kind).base_url(spec, port))
            new_records.append(rec)
        return plan, new_records

    def up(self, profile: Profile, names: Iterable[str] = (), remove_orphans: bool = False) -> UpPlan:
        """Ask for the servers to run; returns at once (see wait_ready). Idempotent.

        A changed spec is written to the record and the supervisor replaces the running instance.
        """
        specs = select_specs(profile, names)
        with self.store.locked():
            plan, new_records = self.plan_up(profile, specs)
            for rec in new_records:
                self.store.save(rec)
        if remove_orphans and plan.orphans:
            plan.removed = self.remove(Scope(profile.name, tuple(plan.orphans)))
            plan.orphans = []
        self.kick()
        return plan

    def kick(self) -> None:
        """Make sure a supervisor runs when there is work for one, and wake it to act now."""
        if self.needs_supervisor(self.store.records()):
            ensure_supervisor(self.store)
        wake_supervisor(self.store)

    @staticmethod
    def needs_supervisor(records: list[ServerRecord]) -> bool:
        for r in records:
            if r.managed_by != SUPERVISOR:
                continue
            if r.desired == "running" or r.state == lc.CRASHED or (r.state == lc.STOPPING and not stop_owner_alive(r)):
                return True
        return False

    def wait_ready(
        self,
        refs: list[ServerRef],
        on_update: Callable[[list[ServerRecord]], None] | None = None,
        poll: float = 0.05,
        timeout: float | None = None,
    ) -> list[ServerRecord]:
        """Wait until every server runs its current spec and is ready, or failed, or timed out."""
        t0 = time.time()
        deadlines = {}
        for ref in refs:
            rec = self.store.load(ref)
            deadlines[ref] = t0 + (timeout if timeout is not None else self._patience(rec if isinstance(rec, ServerRecord) else None))
        while True:
            records = [r for r in (self.store.load(ref) for ref in refs) if isinstance(r, ServerRecord)]
            if on_update:
                on_update(records)
            now = time.time()
            pending = [r for r in records if not self._settled(r) and now < deadlines[r.ref]]
            if not pending:
                return records
            if supervisor_info(self.store) is None:
                self.kick()  # it died under us: a new one re-adopts the servers
            time.sleep(poll)

    @staticmethod
    def _settled(rec: ServerRecord) -> bool:
        if rec.desired != "running" or rec.state == lc.FAILED:
            return True
        return rec.state == lc.READY and rec.running_fingerprint in (None, rec.fingerprint)

    @staticmethod
    def _patience(rec: ServerRecord | None) -> float:
        spec = record_spec(rec) if rec is not None else None
        if spec is None:
            return 60.0
        # room for the backoff waits of a crash loop before it is declared failed, and a replacement's stop
        return spec.startup_timeout + min(spec.restart.crash_loop_wait(), 120.0) + spec.stop_timeout + 5.0

    # ------------------------------------------------------------------ down / restart
    def _stoppable(self, scope: Scope, verb: str) -> tuple[list[AnyRecord], list[str]]:
        """The scope's records minus systemd's (refused if named, skipped with a note if not)."""
        targets = self.resolve(scope)
        skipped = []
        for rec in list(targets):
            if isinstance(rec, ServerRecord) and rec.managed_by == SYSTEMD and is_alive(record_identity(rec)):
                unit = systemd_unit_of(rec)
                how = f"systemctl {'--user ' if os.geteuid() else ''}{'stop' if verb == 'down' else 'restart'} {unit}"
                if scope.names:
                    raise ModelctlError(f"{rec.label} runs under systemd, which would start it again: {how}")
                skipped.append(f"{rec.label}: runs under systemd; not touched ({how})")
                targets.remove(rec)
        return targets, skipped

    def down(self, scope: Scope = Scope()) -> tuple[list[Stopped], list[str]]:
        """Stop servers: SIGTERM their groups, wait, SIGKILL; return when gone and ports are free."""
        targets, skipped = self._stoppable(scope, "down")
        results = stop_servers(self.store, targets, "stopped", before_release=lambda: wake_supervisor(self.store))
        self._release_leases(targets)
        self.kick()
        return results, skipped

    def remove(self, scope: Scope) -> list[Stopped]:
        """Stop servers and forget them (their records go; their logs stay)."""
        results, _ = self.down(scope)
        with self.store.locked():
            for r in self.resolve(scope):
                if isinstance(r, ServerRecord) and r.state == lc.STOPPED:
                    self.store.delete(r.ref)
        return results

    def restart(self, scope: Scope) -> tuple[list[ServerRef], list[Stopped]]:
        """Stop and start again from the recorded spec; clears a failed state."""
        targets, _ = self._stoppable(scope, "restart")
        readable = [r for r in targets if isinstance(r, ServerRecord)]
        results = stop_servers(self.store, readable, "running")

        def reset(r: ServerRecord) -> None:
            r.failures, r.consecutive_failures, r.next_start_at, r.last_error = [], 0, None, None

        with self.store.locked():
            for rec in readable:
                self.store.update(rec.ref, reset)
        self.kick()
        return [r.ref for r in readable], results

    def _release_leases(self, records: list[AnyRecord]) -> None:
        leases = PortLeases(self.store.root)
        for r in records:
            if isinstance(r, ServerRecord) and r.port:
                now = self.store.load(r.ref)
                if isinstance(now, ServerRecord) and now.desired == "stopped":
                    leases.release(r.port, r.ref)

    # ------------------------------------------------------------------ status / logs
    def status(self, scope: Scope = Scope()) -> list[dict[str, Any]]:
        """One row per server, as observed now (read-only, no lock)."""
        rows = []
        now = time.time()
        records = self.resolve(scope)
        gpu_usage = gpu_memory_by_pid() if any(isinstance(r, ServerRecord) and r.gpus for r in records) else None
        for rec in records:
            if isinstance(rec, BrokenRecord):
                rows.append(broken_row(rec))
                continue
            rows.append(self.row(rec, now, gpu_usage))
        return rows

    def row(self, rec: ServerRecord, now: float, gpu_usage: dict[int, int] | None = None) -> dict[str, Any]:
        ident = record_identity(rec)
        alive = is_alive(ident)
        state, detail = rec.state, rec.detail
        if state in lc.ALIVE and ident is not None and not alive:
            # dead, or its pid now belongs to another process: either way not running
            state, detail = lc.STOPPED, f"not running: recorded pid {rec.pid} is gone or is another process"
        pids, rss = group_usage(target_of(rec)) if alive else ([], None)
        return {
            "id": rec.label,
            "profile": rec.profile,
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
            "model": rec.info.get("model") or model_label(rec),
            "uptime": (now - rec.started_at) if alive and rec.started_at else None,
            "restarts": rec.restarts,
            "rss": rss,
            "gpu_memory": group_gpu_memory(pids, gpu_usage) if alive else None,
            "last_exit": rec.last_exit,
            "last_error": rec.last_error,
            "detail": detail,
            "progress": rec.progress,
            "startup": rec.startup or None,
            "exits": rec.exits,
            "log": str(self.store.log_path(rec.ref)),
            "record": str(self.store.record_path(rec.ref)),
        }

    def log_tail(self, ref: ServerRef, lines: int = 20) -> list[str]:
        return logfiles.tail(self.store.log_path(ref), lines)

    def follow_log(self, ref: ServerRef, lines: int = 20) -> Iterator[str]:
        return logfiles.follow(self.store.log_path(ref), lines)


def broken_row(rec: BrokenRecord) -> dict[str, Any]:
    return {
        "id": rec.label,
        "profile": rec.ref.profile,
        "name": rec.ref.name,
        "kind": "",
        "state": "broken",
        "desired": None,
        "managed_by": None,
        "pid": None,
        "url": "",
        "gpus": [],
        "model": "",
        "uptime": None,
        "restarts": 0,
        "rss": None,
        "gpu_memory": None,
        "last_exit": None,
        "last_error": f"broken record {rec.path}: {rec.error}",
        "detail": f"fix or remove {rec.path}",
        "progress": None,
        "startup": None,
        "exits": [],
        "record": str(rec.path),
    }


def model_label(rec: ServerRecord) -> str:
    spec = record_spec(rec)
    return get_backend(spec.kind).model_label(spec) if spec is not None else ""
