"""What the page shows, as one JSON snapshot: every server grouped by profile (its status row,
made safe to show), each budget against its limit, recent traffic and recent events.

A snapshot is taken only when a page asks for one and the last is older than the interval: a
dashboard nobody looks at reads nothing. Every string in it has its control characters escaped
(the status rows already do it; the rest here) and every secret of the profiles masked.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from modelctl.control import Controller, Scope
from modelctl.host.engine_metrics import Scrape, scrape
from modelctl.observe.rows import StatusRow
from modelctl.sanitize import one_line
from modelctl.state import states
from modelctl.state.record import HELD, HELD_BY_INSTANCE, NO_SOCKET, NotHeld, socket_mode
from modelctl.state.store import StateStore
from modelctl.supervisor.client import supervisor_info
from servers.dashboard.secrets import Secrets, secrets_in
from servers.dashboard.traffic import RETRY_WITHOUT_METRICS, Series

EVENTS = 200  # recent events kept
HOLDING = (*states.ALIVE, states.STOPPING, states.CRASHED)  # states that count in a budget (as `status` counts)
SERVING = (states.READY, states.UNHEALTHY)


def socket_text(r: StatusRow) -> str:
    """held (by the supervisor across restarts) / instance / no: why / - (as `status` says it)."""
    mode = socket_mode(r.socket)
    if mode == HELD:
        return f"held, {r.backlog} waiting" if r.backlog else "held"
    if mode == HELD_BY_INSTANCE:
        return "instance"
    if isinstance(mode, NotHeld):
        return f"no: {mode.why}" if mode.why else "no"
    return "-" if mode == NO_SOCKET else "no"


def footprint(r: StatusRow) -> int | None:
    """What the server holds of its budget while it runs: measured once it has been, else declared."""
    return r.memory_learned if r.memory_learned is not None else r.memory_declared


def gpu_footprint(r: StatusRow) -> int | None:
    return r.gpu_memory_learned if r.gpu_memory_learned is not None else r.gpu_memory_declared


def row_json(r: StatusRow, traffic: dict[str, Any] | None) -> dict[str, Any]:
    progress = r.progress or {}
    total = progress.get("total")
    return {
        "id": r.id,
        "profile": r.profile,
        "name": r.name,
        "kind": r.kind,
        "state": r.state,
        "detail": r.detail,
        "progress": round(100 * float(progress.get("completed") or 0) / float(total), 1) if total else None,
        "url": r.url,
        "model": one_line(r.model),
        "pid": r.pid,
        "gpus": r.gpus,
        "uptime": r.uptime,
        "restarts": r.restarts,
        "started_in": r.startup.get("total") if r.startup else None,
        "last_exit": r.last_exit.get("description") if r.last_exit else None,
        "last_error": r.last_error,
        "socket": socket_text(r),
        "managed_by": r.managed_by,
        "start": r.start,
        "rss": r.rss if r.rss is not None else (0 if r.state in (states.IDLE, states.STOPPED) else None),
        "gpu_memory": r.gpu_memory,
        "footprint": footprint(r),
        "footprint_learned": r.memory_learned is not None,
        "gpu_footprint": gpu_footprint(r),
        "wakes": r.wakes,
        "idle_stops": r.idle_stops,
        "evictions": r.evictions,
        "last_wake_seconds": r.last_wake_seconds,
        "last_eviction": r.last_eviction,
        "traffic": traffic,
    }


def budgets_of(rows: list[StatusRow]) -> dict[str, dict[str, Any]]:
    """Each profile's budget (CPU memory and each GPU) with what holds it now, as `status` counts:
    the footprints of its servers that may hold memory. A shared budget counts every profile's."""
    out: dict[str, dict[str, Any]] = {}
    for profile in dict.fromkeys(r.profile for r in rows):
        mine = [r for r in rows if r.profile == profile]
        budget = next((r.budget for r in mine if r.budget), None)
        if not budget:
            continue
        counted = [r for r in (rows if budget.get("shared") else mine) if r.state in HOLDING and (not budget.get("shared") or r.budget)]
        entry: dict[str, Any] = {"shared": bool(budget.get("shared")), "gpus": {}}
        if budget.get("memory") is not None:
            entry["memory"] = {
                "limit": int(budget["memory"]),
                "used": sum(footprint(r) or 0 for r in counted),
                "servers": [{"id": r.id, "bytes": footprint(r) or 0} for r in counted],
            }
        for gpu, limit in sorted((budget.get("gpu_memory") or {}).items()):
            holders = [r for r in counted if int(gpu) in r.gpus]
            entry["gpus"][str(gpu)] = {
                "limit": int(limit),
                "used": sum(gpu_footprint(r) or 0 for r in holders),
                "servers": [{"id": r.id, "bytes": gpu_footprint(r) or 0} for r in holders],
            }
        out[profile] = entry
    return out


class Observer:
    """Takes snapshots of one state directory (optionally some profiles only) and remembers the
    traffic and the events between them."""

    def __init__(
        self,
        store: StateStore,
        profiles: Collection[str] | None = None,
        interval: float = 2.0,
        scraper: Callable[[str], Scrape | None] = scrape,
        clock: Callable[[], float] = time.time,
    ):
        self.ctl = Controller(store)
        self.store = store
        self.profiles = frozenset(profiles) if profiles else None
        self.interval = interval
        self.scraper = scraper
        self.clock = clock
        self.secrets = Secrets()
        self.series: dict[str, Series] = {}
        self.events: deque[dict[str, Any]] = deque(maxlen=EVENTS)
        self._seen: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()  # one snapshot at a time
        self._events_lock = threading.Lock()  # actions note events from the event loop while a snapshot reads them
        self._last: dict[str, Any] | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="scrape")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def wants(self, profile: str) -> bool:
        return self.profiles is None or profile in self.profiles

    def rows(self) -> list[StatusRow]:
        return [r for r in self.ctl.status(Scope()) if self.wants(r.profile)]

    def learn_secrets(self) -> None:
        for rec in self.store.records():
            self.secrets.add(secrets_in(rec.spec))

    def snapshot(self) -> dict[str, Any]:
        """The current snapshot: a fresh one unless the last is younger than the interval."""
        with self._lock:
            if self._last is not None and self.clock() - self._last["at"] < self.interval * 0.9:
                return self._last
            self._last = self._take()
            return self._last

    def _take(self) -> dict[str, Any]:
        now = self.clock()
        self.learn_secrets()
        rows = self.rows()
        self._scrape(rows, now)
        self._note_events(rows, now)
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            series = self.series.get(r.id)
            groups.setdefault(r.profile, []).append(row_json(r, series.to_json() if series else None))
        budgets = budgets_of(rows)
        info = supervisor_info(self.store)
        snapshot = {
            "at": now,
            "interval": self.interval,
            "supervisor": None if info is None else {"pid": info.pid, "responding": info.responding},
            "profiles": [{"name": name, "budget": budgets.get(name), "servers": servers} for name, servers in groups.items()],
            "events": self.recent_events(),
        }
        return self.secrets.mask_all(snapshot)

    # ------------------------------------------------------------------ traffic
    def _scrape(self, rows: list[StatusRow], now: float) -> None:
        wanted = [
            r
            for r in rows
            if r.state in SERVING and r.url.startswith("http") and now >= self.series.setdefault(r.id, Series()).no_metrics_until
        ]
        results = list(self._pool.map(lambda r: self.scraper(r.url), wanted))
        for r, got in zip(wanted, results, strict=True):
            series = self.series[r.id]
            if got is None:
                series.no_metrics_until = now + RETRY_WITHOUT_METRICS
                series.last = None
            else:
                series.add(got)
        for gone in set(self.series) - {r.id for r in rows}:
            del self.series[gone]

    # ------------------------------------------------------------------ events
    def note(self, at: float, server: str, kind: str, text: str) -> None:
        with self._events_lock:
            self.events.append({"at": at, "server": server, "kind": kind, "text": one_line(text)})

    def recent_events(self) -> list[dict[str, Any]]:
        """The events kept, the newest first."""
        with self._events_lock:
            return sorted(self.events, key=lambda e: e["at"], reverse=True)

    def _note_events(self, rows: list[StatusRow], now: float) -> None:
        """Wakes, idle stops, evictions and state changes since the last snapshot; exits as recorded."""
        for r in rows:
            seen = self._seen.get(r.id)
            exits = [e for e in r.exits if e.get("at") is not None]
            if seen is None:
                # a server seen for the first time: its recorded exits are history worth showing
                for e in exits:
                    self._note_exit(r.id, e)
            else:
                # noted first, so that among events of one moment it shows above its cause (the newest first)
                if r.state != seen["state"]:
                    why = f": {r.detail}" if r.detail else ""
                    self.note(now, r.id, "state", f"{seen['state']} → {r.state}{why}")
                for e in exits:
                    if e["at"] > seen["last_exit_at"]:
                        self._note_exit(r.id, e)
                if r.wakes > seen["wakes"]:
                    waited = f"; the first client waited {r.last_wake_seconds:.1f}s" if r.last_wake_seconds is not None else ""
                    self.note(now, r.id, "wake", f"started from idle (a client, or a start asked for){waited}")
                if r.idle_stops > seen["idle_stops"]:
                    self.note(now, r.id, "idle stop", "stopped after its idle_timeout")
                if r.evictions > seen["evictions"]:
                    self.note(now, r.id, "eviction", f"evicted {r.last_eviction or ''}".strip())
            self._seen[r.id] = {
                "state": r.state,
                "wakes": r.wakes,
                "idle_stops": r.idle_stops,
                "evictions": r.evictions,
                "last_exit_at": max((e["at"] for e in exits), default=0.0),
            }

    def _note_exit(self, server: str, e: dict[str, Any]) -> None:
        what = (e.get("exit") or {}).get("description") or "failed"
        line = f": {e['line']}" if e.get("line") else ""
        self.note(e["at"], server, "exit", f"{what} ({e.get('class') or 'failure'}){line}")
