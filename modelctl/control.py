"""What the CLI commands do: up, down, restart, status, logs. The CLI only parses and renders.

Servers are named `profile/server`. A `Scope` says which ones a command acts on: one profile's
(`-p`), named ones (`lab/embed`, or a bare `embed` when only one profile has it), or all.

`up` plans without the state lock (reading the records, discovering GPUs, probing and leasing
ports can take seconds) and holds the lock only to check that no record changed meanwhile and
to write its own: the lock others wait for stays short.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from modelctl.backends import get_backend
from modelctl.errors import ModelctlError, UnknownServerError
from modelctl.host import logfiles
from modelctl.host.gpus import allocate_gpus, discover_gpus
from modelctl.host.identity import is_alive
from modelctl.host.sockets import holds_listener
from modelctl.names import ServerRef, is_valid_name, unit_name
from modelctl.observe.rows import StatusRow, status_rows
from modelctl.profile import Profile, record_spec
from modelctl.spec import Budget, ServerSpec
from modelctl.state import lifecycle as lc
from modelctl.state.leases import PortAllocation, PortLeases, PortRequest, allocate_ports
from modelctl.state.record import HELD, NO_SOCKET, NotHeld, ServerRecord
from modelctl.state.store import AnyRecord, BrokenRecord, Stamp, StateStore
from modelctl.supervisor.budget import budget_json
from modelctl.supervisor.client import SupervisorInfo, ensure_supervisor, supervisor_info, wake_supervisor
from modelctl.supervisor.stopping import Stopped, stop_owner_alive, stop_servers
from modelctl.yamlfile import peek_profile_name

SUPERVISOR = lc.SUPERVISOR
SYSTEMD = lc.SYSTEMD
PLAN_ATTEMPTS = 5  # an up whose records changed under it plans again, this many times


def profile_name_of(arg: str | os.PathLike[str]) -> str:
    """`-p` takes a profile file or a profile's name; commands other than up need only the name."""
    path = Path(arg)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return peek_profile_name(path)
    if is_valid_name(str(arg)):
        return str(arg)
    raise UnknownServerError(f"{arg}: no such profile file, and not a profile name")


def systemd_unit_of(rec: ServerRecord) -> str:
    return str(rec.info.get("systemd_unit") or unit_name(rec.profile, rec.name))


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


@dataclass
class Snapshot:
    """The records as read without the lock, with the stamps that tell whether they changed since."""

    records: list[AnyRecord]
    stamps: dict[ServerRef, Stamp | None]

    @classmethod
    def read(cls, store: StateStore) -> Snapshot:
        records, stamps = [], {}
        for ref in store.refs():
            for _ in range(3):  # a record rewritten while we read it: read it again
                before = store.stamp(ref)
                rec = store.load(ref)
                if store.stamp(ref) == before:
                    break
            stamps[ref] = before
            if rec is not None:
                records.append(rec)
        return cls(records, stamps)

    def still_current(self, store: StateStore) -> bool:
        refs = store.refs()
        return set(refs) == set(self.stamps) and all(store.stamp(ref) == self.stamps[ref] for ref in refs)


def _refuse_conflicts(rec: AnyRecord | None, managed_by: lc.ManagedBy) -> None:
    """A server modelctl cannot account for, or one another manager runs: refused before anything changes."""
    if isinstance(rec, BrokenRecord):
        raise ModelctlError(
            f"{rec.label}: its record {rec.path} cannot be read ({rec.error}); modelctl will not start a second copy "
            f"of a server it cannot account for. Fix or remove that file (`modelctl down {rec.label}` stops the "
            "process it names, if it can tell), then run up again"
        )
    if rec is not None and rec.wish.managed_by != managed_by and is_alive(rec.leader):
        raise ModelctlError(
            f"server {rec.label} is run by systemd (unit {systemd_unit_of(rec)}); use systemctl to manage it"
            if rec.wish.managed_by == SYSTEMD
            else f"server {rec.label} runs under the modelctl supervisor; `modelctl down {rec.label}` first"
        )


def holds_own_socket(rec: ServerRecord, supervisor: SupervisorInfo | None) -> bool:
    """Does this state directory's supervisor hold the server's listening socket on its port now?"""
    if supervisor is None or supervisor.pid is None or rec.port is None or rec.socket_mode != HELD:
        return False
    return holds_listener(supervisor.pid, rec.port)


def _write_spec(
    rec: ServerRecord, spec: ServerSpec, managed_by: lc.ManagedBy, port: int | None, gpus: list[int], budget: Budget | None
) -> None:
    """What the profile now says, into a record; the supervisor takes it from there."""
    if rec.fingerprint != spec.fingerprint and isinstance(rec.socket_mode, NotHeld):
        rec.set_socket(NO_SOCKET)  # a new spec (another vLLM, say): try the held socket again
    if rec.fingerprint != spec.fingerprint:
        # what the last instance said it ran (a backend auto chose, an Ollama model) was of the old spec
        rec.info = {k: v for k, v in rec.info.items() if k == "systemd_unit"}
    rec.kind, rec.source, rec.spec, rec.fingerprint = spec.kind, spec.source, dict(spec.raw), spec.fingerprint
    rec.host, rec.port, rec.gpus, rec.url = spec.host, port, gpus, get_backend(spec.kind).base_url(spec, port)
    rec.budget = budget_json(budget)
    lc.wanted(rec, managed_by)


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
    def plan_up(self, profile: Profile, specs: list[ServerSpec], snapshot: Snapshot, managed_by: lc.ManagedBy, force: bool) -> UpPlan:
        """Which servers to start; raises before anything changes. `force` starts every spec even if
        it already runs unchanged (modelctl run)."""
        mine = {r.ref: r for r in snapshot.records if r.ref.profile == profile.name}
        plan = UpPlan()
        for spec in specs:
            rec = mine.get(spec.ref)
            _refuse_conflicts(rec, managed_by)
            same = isinstance(rec, ServerRecord) and rec.wants_running and rec.fingerprint == spec.fingerprint
            if not force and same and isinstance(rec, ServerRecord) and rec.state != lc.FAILED:
                plan.unchanged.append(str(spec.ref))
            else:
                plan.start.append(spec)
        plan.orphans = [r.label for r in mine.values() if isinstance(r, ServerRecord) and r.name not in profile.servers and r.wants_running]
        return plan

    def allocate(
        self, profile: Profile, plan: UpPlan, snapshot: Snapshot, handed: dict[ServerRef, int] | None = None
    ) -> tuple[PortAllocation, dict[str, list[int]]]:
        """Ports (leased machine-wide) and GPUs for the servers to start; nothing is taken on an error.
        `handed`: ports whose listening socket we were handed (systemd's): in use, and ours."""
        readable = [r for r in snapshot.records if isinstance(r, ServerRecord)]
        mine = {r.ref: r for r in readable}
        starting = {s.ref for s in plan.start}
        others = [r for r in readable if r.ref not in starting]
        requests = []
        supervisor = supervisor_info(self.store)
        for spec in plan.start:
            old = mine.get(spec.ref)
            previous = old.port if old else None
            alive = old is not None and is_alive(old.leader)
            # the server's own socket, held by our supervisor (idle, backing off), is free for it
            own_socket = old is not None and previous is not None and holds_own_socket(old, supervisor)
            own = (handed or {}).get(spec.ref) or (previous if alive or own_socket else None)
            requests.append(PortRequest.of(spec, previous, own, get_backend(spec.kind).is_external(spec)))
        held = {r.port: r.label for r in others if r.port and r.wants_running}
        allocation = allocate_ports(requests, profile.port_range, held, PortLeases(self.store.root))
        try:
            # GPUs: exclusive unless shared; enough for all of them, or nothing starts
            gpu_requests = {str(s.ref): (s.gpus, s.gpus_shared) for s in plan.start if s.gpu_count}
            gpus: dict[str, list[int]] = {}
            if gpu_requests:
                in_use = {g: r.label for r in others if r.wants_running and not r.spec.get("gpus_shared") for g in r.gpus}
                gpus = allocate_gpus(gpu_requests, discover_gpus(), in_use)
        except BaseException:
            allocation.undo()
            raise
        return allocation, gpus

    def write_up(
        self,
        profile: Profile,
        specs: list[ServerSpec],
        managed_by: lc.ManagedBy = SUPERVISOR,
        force: bool = False,
        finish: Callable[[ServerRecord], None] | None = None,
        handed: dict[ServerRef, int] | None = None,
    ) -> tuple[UpPlan, list[ServerRecord]]:
        """Plan and allocate without the lock; under it, check that nothing changed and write the records.

        `finish` is applied to each record before it is written (modelctl run's own marks).
        """
        for _ in range(PLAN_ATTEMPTS):
            snapshot = Snapshot.read(self.store)
            plan = self.plan_up(profile, specs, snapshot, managed_by, force)
            allocation, gpus = self.allocate(profile, plan, snapshot, handed)
            current = {r.ref: r for r in snapshot.records if isinstance(r, ServerRecord)}
            records = []
            for spec in plan.start:
                rec = current.get(spec.ref) or ServerRecord(profile=spec.profile, name=spec.name)
                _write_spec(rec, spec, managed_by, allocation.ports[spec.ref], gpus.get(str(spec.ref), []), profile.budget)
                if finish is not None:
                    finish(rec)
                records.append(rec)
            try:
                with self.store.locked():
                    if not snapshot.still_current(self.store):
                        allocation.undo()
                        continue  # another command wrote records meanwhile: plan again from what is there now
                    for rec in records:
                        self.store.save(rec)
                    for spec in specs:  # the wish, said again: a disk that refuses it fails up now
                        if str(spec.ref) in plan.unchanged:
                            self.store.save(current[spec.ref])
            except BaseException:
                allocation.undo()  # a failed up never leaks its port leases
                raise
            return plan, records
        raise ModelctlError(f"the records in {self.store.root} kept changing while up planned; run it again")

    def up(self, profile: Profile, names: Iterable[str] = (), remove_orphans: bool = False, now: bool = False) -> UpPlan:
        """Ask for the servers to run; returns at once (see wait_ready). Idempotent.

        A changed spec is written to the record and the supervisor replaces the running instance.
        On-demand servers are armed (idle, their socket held); `now` starts them at once as well.
        """
        specs = select_specs(profile, names)
        plan, _ = self.write_up(profile, specs)
        if now:
            with self.store.locked():
                for spec in specs:
                    if spec.start == "on-demand":
                        self.store.update(spec.ref, lc.warm_wanted)
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
            if r.wish.managed_by != SUPERVISOR:
                continue
            if r.wants_running or r.state == lc.CRASHED or (r.state == lc.STOPPING and not stop_owner_alive(r)):
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
        if not rec.wants_running or rec.state == lc.FAILED:
            return True
        if rec.state == lc.IDLE and rec.wish.warm <= rec.usage.warmed:
            return True  # an on-demand server, armed: it starts when a client connects
        if rec.state != lc.READY or rec.outdated:
            return False
        ident = rec.leader
        return ident is None or is_alive(ident)  # a record that says ready about a dead process is not

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
            if isinstance(rec, ServerRecord) and rec.wish.managed_by == SYSTEMD and is_alive(rec.leader):
                unit = systemd_unit_of(rec)
                how = f"systemctl {'--user ' if os.geteuid() else ''}{'stop' if verb == 'down' else 'restart'} {unit}"
                if scope.names:
                    raise ModelctlError(f"{rec.label} runs under systemd, which would start it again: {how}")
                skipped.append(f"{rec.label}: runs under systemd; not touched ({how})")
                targets.remove(rec)
        return targets, skipped

    def down(self, scope: Scope = Scope()) -> tuple[list[Stopped], list[str]]:
        """Stop servers: SIGTERM their groups, wait, SIGKILL; return when gone and ports are free.

        What was stopped is returned even if the supervisor cannot be started afterwards (a
        read-only disk): that failure becomes a note, never hides the stops.
        """
        targets, skipped = self._stoppable(scope, "down")
        results = stop_servers(self.store, targets, "stopped", before_release=lambda: wake_supervisor(self.store))
        self._release_leases(targets)
        try:
            self.kick()
        except ModelctlError as e:
            skipped.append(f"the supervisor could not be started to go on: {e}")
        return results, skipped

    def remove(self, scope: Scope) -> list[Stopped]:
        """Stop servers and forget them (their records go; their logs stay)."""
        results, _ = self.down(scope)
        with self.store.locked():
            for r in self.resolve(scope):
                if isinstance(r, ServerRecord) and r.state == lc.STOPPED:
                    self.store.delete(r.ref)
        return results

    def forget(self, scope: Scope = Scope()) -> tuple[list[str], list[tuple[str, str]]]:
        """Remove the records of the scope's servers that are stopped or failed and run nothing
        (their logs stay); the others are kept, each with why. Returns (forgotten, kept)."""
        forgotten: list[str] = []
        kept: list[tuple[str, str]] = []
        leases = PortLeases(self.store.root)
        with self.store.locked():
            for r in self.resolve(scope):
                if isinstance(r, BrokenRecord):
                    kept.append((r.label, f"its record {r.path} cannot be read; `modelctl down {r.label}` first"))
                elif r.state not in (lc.STOPPED, lc.FAILED) or (r.wants_running and r.state != lc.FAILED) or is_alive(r.leader):
                    kept.append((r.label, f"it is {r.state}; `modelctl down --forget {r.label}` stops and forgets it"))
                else:
                    self.store.delete(r.ref)
                    if r.port:
                        leases.release(r.port, r.ref)
                    forgotten.append(r.label)
        return forgotten, kept

    def restart(self, scope: Scope) -> list[ServerRef]:
        """A new instance of each server from its recorded spec; clears a failed state. The
        supervisor replaces the running instance: where it holds the socket and the server says
        READY=1, the new one starts first and the old one is stopped once it serves (no gap)."""
        targets, _ = self._stoppable(scope, "restart")
        readable = [r for r in targets if isinstance(r, ServerRecord)]
        with self.store.locked():
            for rec in readable:
                self.store.update(rec.ref, lc.restart_wanted)
        self.kick()
        return [r.ref for r in readable]

    def _release_leases(self, records: list[AnyRecord]) -> None:
        leases = PortLeases(self.store.root)
        for r in records:
            if isinstance(r, ServerRecord) and r.port:
                now = self.store.load(r.ref)
                if isinstance(now, ServerRecord) and not now.wants_running:
                    leases.release(r.port, r.ref)

    # ------------------------------------------------------------------ status / logs
    def status(self, scope: Scope = Scope()) -> list[StatusRow]:
        """One row per server, as observed now (read-only, no lock)."""
        info = supervisor_info(self.store)
        return status_rows(self.store, self.resolve(scope), supervisor_pid=info.pid if info is not None else None)

    def log_tail(self, ref: ServerRef, lines: int = 20) -> list[str]:
        return logfiles.tail_rotated(self.store.log_path(ref), lines)

    def follow_log(self, ref: ServerRef, lines: int = 20) -> Iterator[str]:
        return logfiles.follow(self.store.log_path(ref), lines)
