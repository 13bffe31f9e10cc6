"""The memory budget: one rule, in one place.

A profile may bound what its servers hold at once (`budget: {memory: 8GiB, gpu_memory: {0:
70GiB}}`; `shared: true` bounds every profile's servers in the state directory). Each server's
footprint is its measured peak once it has been measured while ready (resident memory of its
process group; GPU memory of its processes, per GPU), else what its profile declares
(`memory:`, `gpu_memory:`). Servers that may hold memory (starting, ready, unhealthy, stopping,
crashed) count.

Starting a server that would exceed a budget first stops the least recently used on-demand
server(s) whose footprint makes room (`start: always` servers are never evicted, nor is a server
the supervisor says is busy: requests in flight, or a client it was woken for), waits until they
are gone, then starts it. When nothing can make room now, the answer names what holds the budget;
the supervisor waits and asks again (a refusal is never permanent while the server is wanted).
A successor that would start beside its running instance counts both (`beside_current`).
A measured peak belongs to the spec it was measured with: a new spec is counted at its declared
size until it is measured. Pure functions over records: tests/test_budget.py checks them as a
table.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from modelctl.names import ServerRef
from modelctl.spec import Budget, ServerSpec
from modelctl.state import states
from modelctl.state.record import ServerRecord
from modelctl.state.states import State
from modelctl.units import format_bytes

HOLDING = states.ALIVE | {states.STOPPING, states.CRASHED}
EVICTABLE = frozenset({states.READY, states.UNHEALTHY})


def budget_of(rec: ServerRecord) -> Budget | None:
    """The budget `up` wrote into the record (its profile's)."""
    b = rec.budget
    if not b:
        return None
    gpu = {int(k): int(v) for k, v in (b.get("gpu_memory") or {}).items()}
    return Budget(memory=b.get("memory"), gpu_memory=gpu, shared=bool(b.get("shared")))


def budget_json(budget: Budget | None) -> dict[str, Any] | None:
    if budget is None:
        return None
    return {"memory": budget.memory, "gpu_memory": {str(k): v for k, v in budget.gpu_memory.items()}, "shared": budget.shared}


@dataclass(frozen=True)
class Footprint:
    memory: int
    gpu: dict[int, int] = field(default_factory=dict)  # GPU id → bytes
    learned: bool = False  # measured, not declared


def footprint(rec: ServerRecord, spec: ServerSpec | None, fingerprint: str | None = None) -> Footprint:
    """What an instance of a server's spec holds: its measured peak once measured while ready with
    that spec (`fingerprint`, by default the one wanted now), else its declared size."""
    usage = rec.usage
    fingerprint = rec.fingerprint if fingerprint is None else fingerprint
    learned = usage.measured_for in (None, fingerprint)  # None: measured before peaks named their spec
    declared_mem = spec.memory if spec is not None else None
    declared_gpu = spec.gpu_memory if spec is not None else None
    peak_rss = usage.peak_rss if learned else None
    peak_gpu = usage.peak_gpu if learned else None
    memory = peak_rss if peak_rss is not None else (declared_mem or 0)
    per_gpu = peak_gpu if peak_gpu is not None else (declared_gpu or 0)
    return Footprint(memory, {g: per_gpu for g in rec.gpus} if per_gpu else {}, learned=peak_rss is not None)


@dataclass(frozen=True)
class Member:
    ref: ServerRef
    state: State
    footprint: Footprint
    evictable: bool  # start: on-demand, and serving (not starting, not stopping)
    last_used: float

    @property
    def label(self) -> str:
        return str(self.ref)


def member(rec: ServerRecord, spec: ServerSpec | None, busy: bool = False) -> Member:
    on_demand = spec is not None and spec.start == "on-demand"
    last = rec.usage.last_active or (rec.instance.ready_at if rec.instance else None) or 0.0
    running = footprint(rec, spec, rec.instance.fingerprint if rec.instance else None)
    if rec.successor is not None:  # a replacement under way: both instances hold memory
        new = footprint(rec, spec, rec.successor.fingerprint)
        running = Footprint(running.memory + new.memory, {g: running.gpu.get(g, 0) + new.gpu.get(g, 0) for g in {*running.gpu, *new.gpu}})
    return Member(rec.ref, rec.state, running, on_demand and rec.state in EVICTABLE and not busy, last)


@dataclass(frozen=True)
class Admit:
    """It fits: start it."""


@dataclass(frozen=True)
class Evict:
    """Stop these first (least recently used on-demand servers), then start it."""

    victims: tuple[ServerRef, ...]
    reason: str


@dataclass(frozen=True)
class Wait:
    """Servers already stopping will make room: wait for them."""

    reason: str


@dataclass(frozen=True)
class Refuse:
    """Nothing can make room."""

    reason: str


Admission = Admit | Evict | Wait | Refuse


@dataclass
class _Limit:
    name: str  # "memory" or "GPU 0 memory"
    limit: int
    members: set[ServerRef]
    need: int
    gpu: int | None = None

    def held_by(self, m: Member) -> int:
        if m.ref not in self.members:
            return 0
        return m.footprint.memory if self.gpu is None else m.footprint.gpu.get(self.gpu, 0)


def admit(
    target: ServerRecord,
    target_spec: ServerSpec | None,
    records: Iterable[tuple[ServerRecord, ServerSpec | None]],
    busy: Collection[ServerRef] = (),
    beside_current: bool = False,
) -> Admission:
    """May `target` start now under every budget that bounds it? `busy` servers are not evicted;
    `beside_current`: a successor starts while the target's running instance holds its memory."""
    all_records = [(r, s) for r, s in records if r.ref != target.ref]
    limits = _limits(target, target_spec, all_records)
    if not limits:
        return Admit()
    holders = [member(r, s, r.ref in busy) for r, s in all_records if r.state in HOLDING]
    if beside_current and target.instance is not None:
        holders.append(Member(target.ref, target.state, footprint(target, target_spec, target.instance.fingerprint), False, 0.0))
        for lim in limits:
            lim.members.add(target.ref)
    deficits = {id(lim): sum(lim.held_by(m) for m in holders) + lim.need - lim.limit for lim in limits}
    if all(d <= 0 for d in deficits.values()):
        return Admit()
    stopping = [m for m in holders if m.state in (states.STOPPING, states.CRASHED)]
    after_stops = {id(lim): deficits[id(lim)] - sum(lim.held_by(m) for m in stopping) for lim in limits}
    candidates = sorted((m for m in holders if m.evictable), key=lambda m: m.last_used)
    victims: list[Member] = []
    for m in candidates:
        if all(d <= 0 for d in after_stops.values()):
            break
        if any(after_stops[id(lim)] > 0 and lim.held_by(m) > 0 for lim in limits):
            victims.append(m)
            for lim in limits:
                after_stops[id(lim)] -= lim.held_by(m)
    short = [lim for lim in limits if after_stops[id(lim)] > 0]
    if short:
        return Refuse(_refusal(target, short[0], holders, busy))
    if victims:
        names = ", ".join(f"{m.label} ({format_bytes(m.footprint.memory)})" for m in victims)
        return Evict(tuple(m.ref for m in victims), f"{target.label} needs the memory; least recently used: {names}")
    return Wait(f"waiting for {', '.join(m.label for m in stopping)} to stop and free their memory")


def _limits(target: ServerRecord, spec: ServerSpec | None, others: list[tuple[ServerRecord, ServerSpec | None]]) -> list[_Limit]:
    """Every budget line that bounds the target: its profile's, and any shared one."""
    need = footprint(target, spec)
    budgets: list[tuple[Budget, set[ServerRef]]] = []
    own = budget_of(target)
    if own is not None and not own.shared:
        budgets.append((own, {r.ref for r, _ in others if r.ref.profile == target.ref.profile}))
    shared = [b for r, _ in [(target, spec), *others] if (b := budget_of(r)) is not None and b.shared]
    if shared:
        # the tightest shared budget of the state directory bounds everything in it
        gpu_ids = {g for b in shared for g in b.gpu_memory}
        tight = Budget(
            memory=min((b.memory for b in shared if b.memory is not None), default=None),
            gpu_memory={g: min(lim for b in shared if (lim := b.gpu_limit(g)) is not None) for g in gpu_ids},
            shared=True,
        )
        budgets.append((tight, {r.ref for r, _ in others}))
    limits = []
    for budget, members in budgets:
        if budget.memory is not None:
            limits.append(_Limit("memory", budget.memory, members, need.memory))
        for gpu in target.gpus:
            limit = budget.gpu_limit(gpu)
            if limit is not None:
                limits.append(_Limit(f"GPU {gpu} memory", limit, members, need.gpu.get(gpu, 0), gpu=gpu))
    return limits


def _refusal(target: ServerRecord, lim: _Limit, holders: list[Member], busy: Collection[ServerRef]) -> str:
    held = sorted((m for m in holders if lim.held_by(m) > 0), key=lambda m: -lim.held_by(m))

    def why_kept(m: Member) -> str:
        if m.evictable:
            return ""
        if m.ref in busy:
            return ", busy"
        if m.state not in EVICTABLE:
            return f", {m.state}"
        return ", always"

    who = ", ".join(f"{m.label} ({format_bytes(lim.held_by(m))}{why_kept(m)})" for m in held) or "nothing"
    return (
        f"{target.label} needs {format_bytes(lim.need)} of {lim.name} and the budget is {format_bytes(lim.limit)}, held by {who}; "
        "nothing can make room now (start: always servers are never evicted, nor busy or starting ones)"
    )
