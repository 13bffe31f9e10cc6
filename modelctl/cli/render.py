"""How the server commands show servers: the status table (fitted to the terminal), one server in
detail, the notes under a table, the summary `up` and `restart` end with, and a log's last lines.

One cause is said once: a failure's line is cleaned of the layers that wrapped it (`configuration
error, not retried: config: sentence server: configuration error: ...`), said with where to fix it
(the file, the server, the key) and the command to run next, and a log excerpt leaves out the line
that said it already.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

from modelctl.cli.format import styled_state
from modelctl.cli.progress import without_state
from modelctl.cli.tables import Column, render
from modelctl.control import Controller
from modelctl.names import ServerRef
from modelctl.observe.rows import BROKEN, StatusRow
from modelctl.sanitize import printable
from modelctl.state import lifecycle as lc
from modelctl.state.record import HELD, HELD_BY_INSTANCE, NO_SOCKET, ServerRecord, socket_mode
from modelctl.units import format_bytes, format_duration, format_startup

STATUS_COLUMNS = (
    Column("server", keep=True),
    Column("kind", drop=6),
    Column("state", keep=True),
    Column("pid", right=True, drop=8),
    Column("url", keep=True),
    Column("socket", drop=5),
    Column("gpus", drop=9),
    Column("uptime", right=True, drop=4),
    Column("restarts", right=True, drop=7),
    Column("memory", right=True, drop=3),
    Column("gpu mem", right=True, drop=3),
    Column("started in", right=True, drop=10),
    Column("model", drop=2, narrow_to=16),
)

# the wrappers a failure's line gathers on its way from the server to the record
_WRAPPERS = re.compile(r"^(?:configuration error, not retried: |config: |[a-z]+ server: |configuration error: |model-not-found: )+")
_NOT_RETRIED = "configuration error, not retried"
_MODEL_FAILURE = re.compile(r"model path|load model|model-not-found|model '[^']*' (?:does not exist|not found|is not)|no such model", re.I)
_HUB_UNREACHABLE = re.compile(r"couldn't connect to 'https://huggingface\.co'|offline mode|LocalEntryNotFoundError", re.I)


def clean_cause(text: str) -> str:
    """A failure's own words: without the wrappers, and without a clause said twice in a row
    (`cannot load model 'X': cannot load model 'X': ...`)."""
    text = _WRAPPERS.sub("", text.strip())
    text = re.sub(r"(?<=[;:] )[^;:]*\\x0d|^[^;:]*\\x0d", "", text)  # a progress bar redrawn with \r: its last drawing
    parts = text.split(": ")
    kept: list[str] = []
    for part in parts:
        if not kept or kept[-1] != part:
            kept.append(part)
    return ": ".join(kept).strip()


def model_hint(rec: ServerRecord | None, cause: str) -> str:
    """Where a model's failure is fixed, and what to run next; empty when it is not a model's."""
    if rec is None or not _MODEL_FAILURE.search(cause):
        return ""
    model = str(rec.spec.get("model") or "")
    source = rec.source or "the profile"
    fix = f"check `model:` of server '{rec.name}' in {source}, then `modelctl up -p {source}`"
    said = " ".join(t for t in (cause, rec.detail, rec.history.last_error) if t)
    if _HUB_UNREACHABLE.search(said):
        offline = str((rec.spec.get("env") or {}).get("HF_HUB_OFFLINE", "")) not in ("", "0")
        where = "not available offline (HF_HUB_OFFLINE=1) and not in the local cache" if offline else "not found on the hub or offline"
        return f"model '{model}' is {where}: {fix}"
    return fix


def cause_of(detail: str | None, last_error: str | None, state: str) -> str:
    """The one line that says why a server is where it is."""
    texts = [clean_cause(without_state(state, t)) for t in (detail, last_error) if t]
    texts = [t for t in texts if t]
    if not texts:
        return ""
    # what kind of failure it was is said once, before the failure's own words
    kind = "configuration error, not retried: " if any(t and _NOT_RETRIED in t for t in (detail, last_error)) else ""
    if _HUB_UNREACHABLE.search(" ".join(texts)):
        # the hub's own sentence is long; its first clause says which model
        texts = [t.split(": We couldn't")[0].split(". We couldn't")[0] for t in texts]
    best = max(texts, key=len)
    return kind + (best if all(t in best for t in texts) else "; ".join(dict.fromkeys(texts)))


def status_lines(rows: Sequence[StatusRow], gpu_column: bool, width: int | None) -> list[Text]:
    columns = [c for c in STATUS_COLUMNS if gpu_column or c.name != "gpu mem"]
    table = []
    for r in rows:
        cells: dict[str, str | Text] = {
            "server": r.name,
            "kind": r.kind,
            "state": styled_state(r.state),
            "pid": str(r.pid or "-"),
            "url": r.url or "-",
            "socket": socket_cell(r),
            "gpus": ",".join(map(str, r.gpus)) or "-",
            "uptime": format_duration(r.uptime),
            "restarts": str(r.restarts),
            "memory": format_bytes(r.rss),
            "gpu mem": format_bytes(r.gpu_memory),
            "started in": format_duration(r.startup["total"], precise=True) if r.startup and "total" in r.startup else "-",
            "model": r.model or "",
        }
        table.append([cells[c.name] for c in columns])
    return render(columns, table, width)


def summary_lines(ctl: Controller, rows: Sequence[StatusRow], width: int | None) -> list[Text]:
    """What `up` and `restart` end with: each server's URL and state."""
    columns = (Column("server", keep=True), Column("url", keep=True), Column("state", keep=True), Column("model", narrow_to=16, drop=1))
    return render(columns, [[r.id, r.url or "-", styled_state(r.state), r.model or ""] for r in rows], width)


def socket_cell(r: StatusRow) -> str:
    """held (by the supervisor, across restarts) / instance (held by the running instance only) / -"""
    mode = socket_mode(r.socket)
    if mode == HELD:
        return f"held, {r.backlog} waiting" if r.backlog else "held"
    if mode == HELD_BY_INSTANCE:
        return "instance"
    return "-" if mode == NO_SOCKET else "no"


def budget_line(rows: Sequence[StatusRow]) -> str:
    """The profile's budget and what its servers hold of it (their footprints), if it has one."""
    budget = next((r.budget for r in rows if r.budget), None)
    if not budget or budget.get("memory") is None:
        return ""
    holding = [r for r in rows if r.state in (*lc.ALIVE, lc.STOPPING, lc.CRASHED)]
    used = sum(_footprint(r) or 0 for r in holding)
    return f"budget: {format_bytes(used)} of {format_bytes(budget['memory'])} memory held ({len(holding)} running)" + (
        " — shared by every profile" if budget.get("shared") else ""
    )


def _footprint(r: StatusRow) -> int | None:
    return r.memory_learned if r.memory_learned is not None else r.memory_declared


def supervisor_line(ctl: Controller) -> str:
    from modelctl.supervisor.client import supervisor_info

    info = supervisor_info(ctl.store)
    if info is None:
        return "not running"
    if not info.responding:
        age = "never" if info.heartbeat_age is None else f"{info.heartbeat_age:.0f}s ago"
        return f"pid {info.pid} NOT RESPONDING (last heartbeat {age}; stopped or hung? kill -CONT {info.pid})"
    return f"pid {info.pid}"


def record_of(ctl: Controller, r: StatusRow) -> ServerRecord | None:
    rec = ctl.store.load(ServerRef(r.profile, r.name))
    return rec if isinstance(rec, ServerRecord) else None


def print_notes(out: Console, ctl: Controller, r: StatusRow) -> None:
    """Under the table: why a server that is not serving is where it is, once, with the fix."""
    progress = r.progress or {}
    notes: list[str] = []
    if r.state == lc.STARTING and progress.get("total"):
        done, total = int(progress.get("completed") or 0), int(progress["total"])
        notes.append(f"{printable(str(progress.get('status', '')))} {100 * done // total}% ({format_bytes(done)} of {format_bytes(total)})")
    cause = cause_of(r.detail, r.last_error, r.state)
    if cause:
        notes.append(cause)
    if r.last_exit and r.state in (lc.FAILED, lc.BACKOFF, lc.CRASHED):
        notes.append(f"last exit: {r.last_exit['description']}")
    if r.start == "on-demand" and r.last_eviction:
        notes.append(f"last eviction {r.last_eviction}")
    if r.state not in (lc.FAILED, lc.BACKOFF, lc.CRASHED, lc.UNHEALTHY, lc.STARTING, BROKEN) or not notes:
        return
    out.print(Text.assemble((r.id, "bold"), ": " + "; ".join(dict.fromkeys(notes))), highlight=False)
    if r.state == lc.FAILED:
        if hint := model_hint(record_of(ctl, r), cause):
            out.print(f"  {hint}", highlight=False)
        print_tail(out, ctl, ServerRef(r.profile, r.name), 10, said=cause)


def print_detail(out: Console, ctl: Controller, r: StatusRow) -> None:
    lines: list[tuple[str, str | Text]] = [("server", r.id), ("state", styled_state(r.state))]
    for key in ("kind", "model", "url", "socket", "backlog", "pid", "managed_by", "desired", "detail", "last_error", "record", "log"):
        value = getattr(r, key)
        if value not in (None, ""):
            lines.append((key.replace("_", " "), str(value)))
    if r.backend:
        lines.append(("backend", f"{r.backend} ({r.backend_reason})" if r.backend_reason else r.backend))
    if r.gpus:
        lines.append(("gpus", ",".join(map(str, r.gpus))))
    if r.uptime is not None:
        lines.append(("uptime", format_duration(r.uptime)))
    lines.append(("restarts", str(r.restarts)))
    if r.rss:
        lines.append(("memory", format_bytes(r.rss)))
    if r.gpu_memory is not None:
        lines.append(("gpu memory", format_bytes(r.gpu_memory)))
    if r.startup:
        lines.append(("startup", format_startup(r.startup)))
    if r.memory_declared is not None or r.memory_learned is not None:
        lines.append(("footprint", f"{format_bytes(r.memory_declared)} declared, {format_bytes(r.memory_learned)} measured"))
    if r.start == "on-demand":
        wake = f", last wake {r.last_wake_seconds:.1f}s" if r.last_wake_seconds is not None else ""
        lines.append(("on demand", f"{r.wakes} wakes, {r.idle_stops} idle stops, {r.evictions} evictions{wake}"))
        if r.last_eviction:
            lines.append(("last eviction", r.last_eviction))
    for line in render((Column("", keep=True), Column("", keep=True)), [[Text(k, style="bold"), v] for k, v in lines], None, header=False):
        out.print(line, highlight=False)
    if r.state == lc.FAILED and (hint := model_hint(record_of(ctl, r), cause_of(r.detail, r.last_error, r.state))):
        out.print(hint, highlight=False)
    if r.exits:
        out.print("\nlast exits", style="bold")
        for line in exits_lines(r.exits):
            out.print(line, highlight=False)
    if r.state != BROKEN:
        print_tail(out, ctl, ServerRef(r.profile, r.name), 10, f"\nlast lines of {r.log}", style="bold")


def exits_lines(exits: list[dict[str, Any]]) -> list[Text]:
    columns = (Column("when", keep=True), Column("exit", keep=True), Column("class", keep=True), Column("why", keep=True))
    rows = [
        [
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x["at"])) if x.get("at") else "-",
            x["exit"]["description"] if x.get("exit") else "-",
            x.get("class") or "",
            x.get("line") or "",
        ]
        for x in reversed(exits)
    ]
    return render(columns, rows, None)


def as_shown(line: str) -> str:
    """A log line as a terminal showed it: a progress bar that redrew itself with \\r keeps its last
    drawing; control characters are made visible."""
    if "\r" in line.rstrip("\r"):
        line = next((part for part in reversed(line.split("\r")) if part.strip()), "")
    return printable(line.rstrip("\r"))


def print_tail(out: Console, ctl: Controller, ref: ServerRef, lines: int, header: str = "", style: str = "", said: str = "") -> None:
    """The end of a server's log, each line marked `  | `, printed as it is (no markup) and with
    its control characters made visible; a line that only repeats `said` is left out."""
    said = said.removeprefix(f"{_NOT_RETRIED}: ")
    tail = [line for line in ctl.log_tail(ref, lines) if not (said and said in clean_cause(line))]
    if tail and header:
        out.print(header, style=style, highlight=False)
    for line in tail:
        out.print(f"  | {as_shown(line)}", highlight=False)


def hidden_profiles_line(names: Iterable[str]) -> str:
    names = list(names)
    if not names:
        return ""
    return f"not shown, every server stopped: {', '.join(names)} (status --all shows them; `modelctl forget -p NAME` forgets one)"
