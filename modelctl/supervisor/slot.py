"""The supervisor's view of one server between ticks, in parts that each have one owner.

- the record as last read (`rec`, `stamp`, `saved`) and its parsed spec: the core's;
- `current` and `successor`: the server's instances (modelctl/supervisor/instance.py);
- `health`: warm-up, probes and preparation, owned by the health watch;
- `stop`: a stop in the background and what follows it;
- `demand`: traffic and eviction of an on-demand server, owned by modelctl/supervisor/on_demand.py.
"""

from __future__ import annotations

import enum
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from modelctl.failures import Exit, Failure
from modelctl.host.engine_metrics import Scrape
from modelctl.host.health import ProbeResult
from modelctl.host.process import StopResult
from modelctl.spec import ServerSpec
from modelctl.state.record import ServerRecord
from modelctl.state.store import Stamp
from modelctl.supervisor.instance import InstanceRuntime


class AfterStop(enum.Enum):
    """What follows a background stop."""

    CRASH = "crash"  # a failed instance's leftovers are gone: back off, fail, or stay down
    STOP = "stop"  # a deliberate stop (down whose owner died, a replaced spec): stopped
    REST = "rest"  # an on-demand server stopped when idle, or evicted for another's memory: idle again


@dataclass
class StopJob:
    """A stop running in the background, and what to do once it is done."""

    future: Future[StopResult]
    after: AfterStop
    token: str | None
    instance: InstanceRuntime | None  # what we held for the stopped instance, let go once it is gone
    failure: Failure | None = None  # the failure whose leftovers are being stopped (AFTER CRASH)
    failure_exit: Exit | None = None
    evicted_for: str | None = None  # REST: the reason of an eviction


@dataclass
class HealthState:
    """Warm-up, probes and preparation of the current instance (the health watch's)."""

    probe: Future[tuple[ProbeResult, float]] | None = None
    probe_submitted: float = 0.0
    prepare: Future[dict[str, Any]] | None = None
    prepare_started: float | None = None
    progress: dict[str, Any] | None = None
    prepared: bool = False
    described: bool = False  # what the ready instance said it runs is in the record (Backend.describe)
    next_probe_at: float = 0.0
    unhealthy_since: float | None = None
    starved: float = 0.0  # seconds the startup probes waited for a worker: not held against startup_timeout

    def busy(self) -> bool:
        return any(f is not None and not f.done() for f in (self.probe, self.prepare))


@dataclass
class DemandState:
    """Traffic of an on-demand server, and whether a start waits for the budget (on_demand.py's)."""

    waiting_for_budget: bool = False
    activity: Future[tuple[Scrape | None, int | None]] | None = None
    next_activity_at: float = 0.0
    looking_since: float = 0.0  # when the look under way (`activity`) began
    looked_at: float | None = None  # when the last answered look began: what it saw was true then
    answer_wanted: bool = False  # the look under way wakes the loop when it answers (else collected later)
    last_requests: float | None = None
    in_flight: bool = False  # requests running, or connections open, at the last look
    served: bool = False  # the instance has answered a request (a woken server is not evicted before)
    woke_for_client: bool = False  # the instance was started for a client's connection
    refused_reported: str = ""


@dataclass
class Slot:
    """One server in the supervisor's memory."""

    rec: ServerRecord | None = None
    stamp: Stamp | None = None
    saved: dict[str, Any] | None = None  # the record as on disk, to tell whether a tick changed it
    spec: ServerSpec | None = None
    spec_key: str = ""
    external: bool = False  # lives elsewhere (an external Ollama): probed and prepared, never spawned
    current: InstanceRuntime | None = None
    successor: InstanceRuntime | None = None  # a new instance starting beside the current one
    health: HealthState = field(default_factory=HealthState)
    stop: StopJob | None = None
    # stops of replaced instances, each with what we held for it (let go once it is gone)
    retiring: list[tuple[Future[StopResult], InstanceRuntime | None]] = field(default_factory=list)
    demand: DemandState = field(default_factory=DemandState)
    no_socket: str = ""  # why this server runs without a held socket (a vLLM whose internals differ)
    next_members_at: float = 0.0
    broken_reported: str = ""
    due: float = 0.0  # the next time a timer of this server fires
    dirty: bool = True  # an event arrived for it since its last tick

    def instances(self) -> list[InstanceRuntime]:
        return [i for i in (self.current, self.successor) if i is not None]

    def busy(self) -> bool:
        jobs = (self.stop.future if self.stop else None, *(f for f, _ in self.retiring))
        return self.health.busy() or any(f is not None and not f.done() for f in jobs) or self.successor is not None

    def wake_at(self, when: float | None) -> None:
        if when is not None and when < self.due:
            self.due = when

    def forget_record(self) -> None:
        """What is on disk is the truth: read it (and its spec) again next tick."""
        self.rec = self.stamp = self.saved = None
        self.spec = None


@dataclass
class Server:
    """One server in a tick: its record, its slot and its spec, passed to the verbs together."""

    rec: ServerRecord
    slot: Slot
    spec: ServerSpec

    @property
    def label(self) -> str:
        return self.rec.label
