"""Status rows: what `status`, `status --json`, the metrics and `top` show of each server, as observed now.

One named type (`StatusRow`) for every server, readable or not: a broken record's row has the
same keys, with nulls where nothing can be known. Built here and only here; the CLI, the
supervisor's metrics file and `top` all read it. Text that came from a server (its error lines,
its health answers) is made printable here, so no caller can forget.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from modelctl.backends import get_backend
from modelctl.host.gpus import gpu_memory_by_pid, group_gpu_memory
from modelctl.host.ports import port_holder
from modelctl.host.process import Usage, alive_in, process_table, usage_by_leader
from modelctl.host.sockets import SocketView
from modelctl.profile import record_spec
from modelctl.sanitize import one_line
from modelctl.spec import check_size
from modelctl.state import lifecycle as lc
from modelctl.state.record import HELD, HELD_BY_INSTANCE, NotHeld, ServerRecord, socket_mode
from modelctl.state.states import State
from modelctl.state.store import AnyRecord, BrokenRecord, StateStore

BROKEN: Literal["broken"] = "broken"
RowState = Union[State, Literal["broken"]]


@dataclass
class StatusRow:
    """One server as `status --json` shows it."""

    id: str
    profile: str
    name: str
    kind: str
    state: RowState  # a lifecycle state, or "broken"
    desired: lc.Desired | None
    managed_by: lc.ManagedBy | None
    pid: int | None
    host: str | None
    port: int | None
    url: str
    gpus: list[int]
    model: str
    uptime: float | None
    restarts: int
    rss: int | None  # bytes, the whole process group
    gpu_memory: int | None  # bytes; None without NVIDIA GPUs
    last_exit: dict[str, Any] | None  # {code, signal, description}
    last_error: str | None
    detail: str | None
    progress: dict[str, Any] | None
    startup: dict[str, Any] | None
    exits: list[dict[str, Any]] = field(default_factory=list)  # [{at, exit, class, line, retry}], oldest first
    log: str | None = None
    record: str = ""
    socket: str = ""  # "held" (by the supervisor), "held by the instance", "not held: why"; "" for kinds without
    backlog: int | None = None  # connections waiting in the held socket's backlog for an instance to accept them
    start: str = "always"  # always | on-demand
    memory_declared: int | None = None  # the profile's `memory:` (bytes)
    memory_learned: int | None = None  # the peak measured while ready; it replaces the declared one
    gpu_memory_declared: int | None = None
    gpu_memory_learned: int | None = None
    wakes: int = 0  # starts of an idle on-demand server
    idle_stops: int = 0
    evictions: int = 0
    last_wake_seconds: float | None = None  # its first client's wait at the last wake
    last_eviction: str | None = None
    budget: dict[str, Any] | None = None  # the profile's budget (bytes)
    backend: str | None = None  # what the server said it runs (the bundled server: onnx, torch fp16, ...)
    backend_reason: str | None = None  # and why (backend auto's choice, or asked for)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def status_rows(
    store: StateStore, records: list[AnyRecord], now: float | None = None, supervisor_pid: int | None = None
) -> list[StatusRow]:
    """One row per record, as observed now (read-only, no lock): one scan of the process table for all.
    `supervisor_pid`: this state directory's supervisor, whose held sockets are checked to be its own."""
    now = time.time() if now is None else now
    readable = [r for r in records if isinstance(r, ServerRecord)]
    leaders = [ident for r in readable if (ident := r.leader) is not None]
    table = process_table()
    usage = usage_by_leader(leaders, table)
    gpu_usage = gpu_memory_by_pid() if any(r.gpus for r in readable) else None
    sockets = SocketView() if any(r.socket_mode in (HELD, HELD_BY_INSTANCE) for r in readable) else None
    rows = []
    for rec in records:
        if isinstance(rec, BrokenRecord):
            rows.append(broken_row(rec))
        else:
            rows.append(record_row(store, rec, now, usage, gpu_usage, alive_in(table, rec.leader), supervisor_pid, sockets))
    return rows


def record_row(
    store: StateStore,
    rec: ServerRecord,
    now: float,
    usage: dict[int, Usage],
    gpu_usage: dict[int, int] | None,
    alive: bool,
    supervisor_pid: int | None = None,
    sockets: SocketView | None = None,
) -> StatusRow:
    ident = rec.leader
    state, detail = rec.state, rec.detail
    if state in lc.ALIVE and ident is not None and not alive:
        # dead, or its pid now belongs to another process: either way not running
        state, detail = lc.STOPPED, f"not running: recorded pid {rec.pid} is gone or is another process"
    used = usage.get(ident.pid) if alive and ident is not None else None
    inst, hist = rec.instance, rec.history
    return StatusRow(
        id=rec.label,
        profile=rec.profile,
        name=rec.name,
        kind=rec.kind,
        state=state,
        desired=rec.wish.desired,
        managed_by=rec.wish.managed_by,
        pid=rec.pid if alive else None,
        host=rec.host,
        port=rec.port,
        url=rec.url,
        gpus=list(rec.gpus),
        model=str(rec.info.get("model") or model_label(rec)),
        uptime=(now - inst.started_at) if alive and inst is not None else None,
        restarts=hist.restarts,
        rss=used.rss if used is not None else None,
        gpu_memory=group_gpu_memory(list(used.pids), gpu_usage) if used is not None else None,
        last_exit=hist.last_exit.to_json() if hist.last_exit is not None else None,
        last_error=one_line(hist.last_error) if hist.last_error else None,
        detail=one_line(detail) if detail else None,
        progress=rec.progress,
        startup=rec.startup or None,
        exits=[{**e.to_json(), "line": one_line(e.line)} for e in hist.exits],
        log=str(store.log_path(rec.ref)),
        record=str(store.record_path(rec.ref)),
        socket=(socket := observed_socket(rec, supervisor_pid, alive, sockets)),
        backlog=(sockets or SocketView()).accept_queue(rec.port) if socket_mode(socket) in (HELD, HELD_BY_INSTANCE) and rec.port else None,
        start=str(rec.spec.get("start") or "always"),
        memory_declared=declared_size(rec.spec.get("memory")),
        memory_learned=rec.usage.peak_rss,
        gpu_memory_declared=declared_size(rec.spec.get("gpu_memory")),
        gpu_memory_learned=rec.usage.peak_gpu,
        wakes=rec.usage.wakes,
        idle_stops=rec.usage.idle_stops,
        evictions=rec.usage.evictions,
        last_wake_seconds=rec.usage.last_wake_seconds,
        last_eviction=rec.usage.last_eviction,
        budget=rec.budget,
        backend=_text(rec.info.get("backend")),
        backend_reason=_text(rec.info.get("backend_reason")),
    )


def _text(value: Any) -> str | None:
    return one_line(value) if isinstance(value, str) and value else None


def declared_size(value: Any) -> int | None:
    try:
        return check_size(value) if value is not None else None
    except ValueError:
        return None


def observed_socket(rec: ServerRecord, supervisor_pid: int | None, alive: bool, sockets: SocketView | None = None) -> str:
    """The record's socket mode, checked against who listens on the port now: a socket the record
    says is held, but that neither the supervisor nor the instance holds, is not shown as held.
    `sockets`: the listeners read once for every row (else read here)."""
    mode = rec.socket_mode
    if mode not in (HELD, HELD_BY_INSTANCE) or rec.port is None or rec.wish.managed_by != lc.SUPERVISOR:
        return rec.socket
    sockets = sockets or SocketView()
    if supervisor_pid is not None and sockets.holds_listener(supervisor_pid, rec.port):
        return HELD.text
    if alive and rec.pid is not None and sockets.holds_listener(rec.pid, rec.port):
        return HELD_BY_INSTANCE.text
    holder = port_holder(rec.port)
    return NotHeld(f"port {rec.port} is held by {holder}" if holder else "no supervisor holds it").text


def broken_row(rec: BrokenRecord) -> StatusRow:
    return StatusRow(
        id=rec.label,
        profile=rec.ref.profile,
        name=rec.ref.name,
        kind="",
        state=BROKEN,
        desired=None,
        managed_by=None,
        pid=None,
        host=None,
        port=None,
        url="",
        gpus=[],
        model="",
        uptime=None,
        restarts=0,
        rss=None,
        gpu_memory=None,
        last_exit=None,
        last_error=one_line(f"broken record {rec.path}: {rec.error}"),
        detail=f"fix or remove {rec.path}",
        progress=None,
        startup=None,
        exits=[],
        log=None,
        record=str(rec.path),
    )


_LABELS: dict[tuple[str, str], str] = {}


def model_label(rec: ServerRecord) -> str:
    """The model a server runs, for people (cached by the spec's fingerprint: it parses the spec)."""
    key = (rec.label, rec.fingerprint)
    if key not in _LABELS:
        spec = record_spec(rec)
        _LABELS[key] = get_backend(spec.kind).model_label(spec) if spec is not None else ""
    return _LABELS[key]


def row_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(StatusRow)]
