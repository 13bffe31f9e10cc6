"""The moves a server makes, each setting its state and the fields that go with it.

The states and the table of allowed moves are in modelctl/state/states.py. This module is the only
one that writes a record's state, its instance, its history or its wish (tests/test_lifecycle.py
checks the source for writes elsewhere): every change is a named transition (`intend_start`,
`spawned`, `became_ready`, `crashed`, `settle_crash`, `begin_stop`, `stopped`, ...) that checks
where the record comes from (`move(expect=)`) and sets a state and its data together, the way
llama-swap keeps each state's data beside the state. The few moves outside the table (repairing
a record whose state cannot be trusted) go through `force`, which says why.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Collection, Mapping
from typing import Any

from modelctl.failures import Exit, Failure
from modelctl.host.identity import ProcessIdentity
from modelctl.spec import RestartPolicy
from modelctl.state import restart
from modelctl.state.record import ExitEntry, FailedReplacement, Instance, ServerRecord
from modelctl.state.states import (  # noqa: F401  (re-exported: callers write lc.READY)
    ALIVE,
    ALLOWED,
    BACKOFF,
    CRASHED,
    FAILED,
    IDLE,
    MAY_HAVE_PROCESSES,
    READY,
    STARTING,
    STATES,
    STOPPED,
    STOPPING,
    SUPERVISOR,
    SYSTEMD,
    UNHEALTHY,
    Desired,
    ManagedBy,
    State,
)

log = logging.getLogger("modelctl.state.lifecycle")


class TransitionError(RuntimeError):
    """A move the table does not allow, or a record that is not in the state the mover expected."""


def can_move(src: State, dst: State) -> bool:
    return dst in ALLOWED.get(src, frozenset())


def move(rec: ServerRecord, dst: State, expect: Collection[State] | State | None = None) -> None:
    """Move `rec` to `dst`. With `expect`, only from those states: a mover that read the record
    earlier learns that someone else moved it since, instead of undoing their move."""
    if expect is not None:
        allowed_from = (expect,) if isinstance(expect, str) else expect
        if rec.state not in allowed_from:
            raise TransitionError(f"server {rec.label}: is {rec.state}, expected {' or '.join(sorted(allowed_from))}")
    if not can_move(rec.state, dst):
        raise TransitionError(f"server {rec.label}: {rec.state} → {dst} is not an allowed move")
    rec.state = dst


def force(rec: ServerRecord, dst: State, why: str) -> None:
    """The exceptions to the table, each named by its reason (logged)."""
    if rec.state != dst:
        log.info("server %s: %s → %s forced: %s", rec.label, rec.state, dst, why)
    rec.state = dst


# ---------------------------------------------------------------------- the wish
def wanted(rec: ServerRecord, managed_by: ManagedBy) -> None:
    """`up` (or `modelctl run`) asks for the server with the spec now in the record: a fresh count
    of failures, and a failed or backing-off server tries again at once."""
    rec.wish = dataclasses.replace(rec.wish, desired="running", managed_by=managed_by)
    reset_failures(rec)
    if rec.state == FAILED:
        move(rec, STOPPED, expect=FAILED)
        rec.detail = None


def reset_failures(rec: ServerRecord) -> None:
    """Forget the failures that count towards a crash loop (`up` with a new spec, `restart`)."""
    rec.history = dataclasses.replace(
        rec.history, failures=[], consecutive_failures=0, next_start_at=None, last_error=None, failed_replacement=None
    )


def warm_wanted(rec: ServerRecord) -> None:
    """`up --now`: an on-demand server is started ahead of traffic."""
    rec.wish = dataclasses.replace(rec.wish, warm=max(rec.wish.warm, rec.usage.warmed) + 1)


def restart_wanted(rec: ServerRecord) -> None:
    """`restart`: a new instance of the same spec. The supervisor replaces the running one (the new
    one first where the socket is held), or starts one; a failed server tries again."""
    rec.wish = dataclasses.replace(rec.wish, desired="running", generation=rec.wish.generation + 1)
    reset_failures(rec)
    if rec.state == FAILED:
        move(rec, STOPPED, expect=FAILED)
        rec.detail = None


# ---------------------------------------------------------------------- starting
def intend_start(rec: ServerRecord, token: str, now: float) -> None:
    """A start is decided: the instance exists (its token) before any process does, and the
    record is saved before the spawn, so that a process is never without its record."""
    after_backoff = rec.state == BACKOFF
    move(rec, STARTING, expect=(STOPPED, BACKOFF, IDLE))
    rec.instance = Instance(token=token, fingerprint=rec.fingerprint, started_at=now, generation=rec.wish.generation)
    if rec.usage.warmed != rec.wish.warm:  # any start answers `up --now`: a warm wish is never carried twice
        rec.usage = dataclasses.replace(rec.usage, warmed=rec.wish.warm)
    rec.history = dataclasses.replace(rec.history, next_start_at=None, restarts=rec.history.restarts + (1 if after_backoff else 0))
    rec.startup, rec.progress, rec.detail = {}, None, "starting"


def spawned(rec: ServerRecord, ident: ProcessIdentity, how: str = "waiting for health") -> None:
    """The instance's leader runs (started now, or found by its token after a supervisor died)."""
    assert rec.instance is not None
    rec.instance = dataclasses.replace(rec.instance, pid=ident.pid, create_time=ident.create_time)
    rec.detail = how


def external_start(rec: ServerRecord) -> None:
    """A server that lives elsewhere has no process of ours: only probes and preparation."""
    rec.detail = "waiting for health"


def became_ready(rec: ServerRecord, now: float, startup: Mapping[str, Any]) -> None:
    move(rec, READY, expect=STARTING)
    assert rec.instance is not None
    rec.instance = dataclasses.replace(rec.instance, ready_at=now)
    rec.startup, rec.detail, rec.progress = dict(startup), None, None
    if rec.usage.waiting_since is not None:  # a wake: how long its first client waited
        wait = round(now - rec.usage.waiting_since, 3)
        rec.usage = dataclasses.replace(rec.usage, last_wake_seconds=wait, waiting_since=None, last_active=now)


def became_unhealthy(rec: ServerRecord, why: str) -> None:
    if rec.state == READY:
        move(rec, UNHEALTHY, expect=READY)
    rec.detail = f"unhealthy: {why}"


def became_healthy(rec: ServerRecord) -> None:
    if rec.state == UNHEALTHY:
        move(rec, READY, expect=UNHEALTHY)
    rec.detail = None


# ---------------------------------------------------------------------- replacing without a gap
def intend_successor(rec: ServerRecord, token: str, now: float, why: str) -> None:
    """A new instance starts beside the serving one, on the same socket (saved before the spawn)."""
    if rec.state not in (READY, UNHEALTHY):
        raise TransitionError(f"server {rec.label}: is {rec.state}; a successor starts only beside a serving instance")
    rec.successor = Instance(token=token, fingerprint=rec.fingerprint, started_at=now, generation=rec.wish.generation)
    rec.detail = f"replacing ({why}): a new instance is starting; the old one serves meanwhile"


def successor_spawned(rec: ServerRecord, ident: ProcessIdentity) -> None:
    assert rec.successor is not None
    rec.successor = dataclasses.replace(rec.successor, pid=ident.pid, create_time=ident.create_time)


def successor_took_over(rec: ServerRecord, now: float) -> Instance:
    """The new instance is ready: it is the server's instance now. Returns the old one, to stop."""
    assert rec.successor is not None and rec.instance is not None
    old, new = rec.instance, dataclasses.replace(rec.successor, ready_at=now)
    rec.instance, rec.successor = new, None
    if rec.state == UNHEALTHY:
        move(rec, READY, expect=UNHEALTHY)
    rec.startup = {"port_open": 0.0, "healthy": round(now - new.started_at, 3), "prepare": 0.0, "total": round(now - new.started_at, 3)}
    rec.detail = None
    return old


def successor_failed(rec: ServerRecord, failure: Failure, exit: Exit | None, now: float) -> None:
    """The new instance could not take over: the old one keeps serving; this spec and generation
    are not tried again (the profile or a restart asks anew)."""
    entry = ExitEntry(at=now, exit=exit, cls=failure.cls, line=failure.line, retry=failure.retry)
    error = f"the new instance failed ({failure.describe()}); the previous one still serves"
    rec.history = dataclasses.replace(
        rec.history,
        last_error=error,
        exits=[*rec.history.exits, entry][-restart.EXITS_KEPT :],
        last_exit=exit if exit is not None else rec.history.last_exit,
        failed_replacement=FailedReplacement(rec.fingerprint, rec.wish.generation, error),
    )
    rec.successor, rec.detail = None, error


def lost_successor(rec: ServerRecord) -> None:
    """The serving instance failed while a successor started: both go, the crash path starts anew."""
    rec.successor = None


def saw_members(rec: ServerRecord, members: list[list[float]]) -> None:
    """The leader's descendants seen alive: the proof for ones that later clear their environment."""
    if rec.instance is not None and rec.instance.members != members:
        rec.instance = dataclasses.replace(rec.instance, members=members)


# ---------------------------------------------------------------------- failing
def crashed(rec: ServerRecord, now: float, exit: Exit | None, failure: Failure, policy: RestartPolicy) -> None:
    """An instance failed: counted, remembered, and its leftovers are to be stopped (`crashed`)."""
    ready_at = rec.instance.ready_at if rec.instance else None
    rec.history = restart.count_failure(rec.history, policy, failure, exit, now, ready_at)
    move(rec, CRASHED, expect=ALIVE)
    if rec.instance is not None:
        rec.instance = dataclasses.replace(rec.instance, ready_at=None)
    rec.detail = f"{failure.describe()}; cleaning up"


def settle_crash(rec: ServerRecord, decision: restart.Decision, now: float) -> None:
    """The failed instance is gone: back off, give up, or stay down, as the policy decided."""
    rec.instance = None
    rec.detail = decision.reason
    if isinstance(decision, restart.Backoff):
        move(rec, BACKOFF, expect=CRASHED)
        rec.history = dataclasses.replace(rec.history, next_start_at=now + decision.delay)
    elif isinstance(decision, restart.GiveUp):
        move(rec, FAILED, expect=CRASHED)
    else:
        move(rec, STOPPED, expect=CRASHED)
        rec.wish = dataclasses.replace(rec.wish, desired="stopped")


def failed_to_start(rec: ServerRecord, failure: Failure, now: float) -> None:
    """No process could be started at all (a missing executable): failed, with the cause."""
    move(rec, FAILED, expect=STARTING)
    entry = ExitEntry(at=now, exit=None, cls=failure.cls, line=failure.line, retry=failure.retry)
    rec.history = dataclasses.replace(rec.history, last_error=failure.describe(), exits=[*rec.history.exits, entry][-restart.EXITS_KEPT :])
    rec.instance, rec.detail = None, None


def spec_unreadable(rec: ServerRecord) -> None:
    """A record whose spec no longer validates is reported, not crashed on."""
    force(rec, FAILED, "its spec no longer validates")
    rec.history = dataclasses.replace(rec.history, last_error=f"cannot read this server's spec (from {rec.source}); run up again")


# ---------------------------------------------------------------------- stopping
def begin_stop(rec: ServerRecord, owner: ProcessIdentity | None, desired_after: Desired, why: str = "stopping") -> None:
    """A deliberate stop begins; `desired_after` is what the server should do once stopped.

    The wish is written first, so that the exit is not taken for a crash.
    """
    rec.wish = dataclasses.replace(rec.wish, desired=desired_after)
    if rec.state in MAY_HAVE_PROCESSES:
        if rec.state != STOPPING:
            move(rec, STOPPING)
        if rec.instance is not None:
            rec.instance = dataclasses.replace(rec.instance, stop_owner=[owner.pid, owner.create_time] if owner else None)
        rec.detail = why
    elif rec.state in (BACKOFF, FAILED):
        move(rec, STOPPED)  # nothing runs; leftovers are still looked for by the stop
        rec.detail = None
    elif rec.state == IDLE and desired_after == "stopped":
        move(rec, STOPPED, expect=IDLE)
        rec.detail = None
    rec.history = dataclasses.replace(rec.history, next_start_at=None)
    rec.progress = None


def take_over_stop(rec: ServerRecord, owner: ProcessIdentity | None) -> None:
    """A stop whose owner is gone (Ctrl-C of down) is carried out by whoever takes it over."""
    if rec.instance is not None:
        rec.instance = dataclasses.replace(rec.instance, stop_owner=[owner.pid, owner.create_time] if owner else None)


def stopped(rec: ServerRecord, token: str | None, port_holder: str | None = None, idle: bool = False) -> bool:
    """The instance's processes are gone: stopped (or `idle`, an on-demand server's rest).

    False if the record has moved on since the stop began (another command started it again).
    """
    if rec.token != token:
        return False
    if rec.state == STOPPING:
        move(rec, IDLE if idle else STOPPED, expect=STOPPING)
    elif rec.state not in (STOPPED, IDLE):
        return False
    rec.instance, rec.successor, rec.detail, rec.progress = None, None, None, None
    if port_holder:
        # our processes are gone, but something we cannot prove is ours answers on the port
        rec.history = dataclasses.replace(rec.history, last_error=f"after stopping, the port still answers: {port_holder}")
    return True


# ---------------------------------------------------------------------- on demand
def armed(rec: ServerRecord) -> None:
    """An on-demand server waits for its first client: its socket is held, nothing runs."""
    if rec.state in (STOPPED, CRASHED):
        move(rec, IDLE)
    rec.instance, rec.detail = None, None


def client_waiting(rec: ServerRecord, now: float) -> None:
    """A client's connection waits in the backlog of an idle on-demand server: it will be started."""
    if rec.usage.waiting_since is None:
        rec.usage = dataclasses.replace(rec.usage, waiting_since=now)


def woke(rec: ServerRecord, token: str, now: float, warm: bool) -> None:
    """An idle on-demand server starts: for a waiting client, or asked to warm up (`up --now`)."""
    intend_start(rec, token, now)
    usage = rec.usage
    rec.usage = dataclasses.replace(usage, wakes=usage.wakes + 1, warmed=rec.wish.warm)  # any start answers `up --now`
    rec.detail = "waking: a client is waiting" if not warm else "warming up ahead of traffic"


def active(rec: ServerRecord, now: float) -> None:
    """A request was seen (its counters moved): the server is not idle."""
    rec.usage = dataclasses.replace(rec.usage, last_active=now)


def measured(rec: ServerRecord, rss: int | None, gpu: int | None) -> None:
    """A measured footprint while ready: the largest seen with this spec replaces the declared one;
    a measure of a new spec starts afresh."""
    usage = rec.usage
    spec = rec.instance.fingerprint if rec.instance else rec.fingerprint
    if usage.measured_for not in (None, spec):
        usage = dataclasses.replace(usage, peak_rss=None, peak_gpu=None)
    peak_rss = max(rss, usage.peak_rss or 0) if rss else usage.peak_rss
    peak_gpu = max(gpu, usage.peak_gpu or 0) if gpu else usage.peak_gpu
    if (peak_rss, peak_gpu, spec) != (rec.usage.peak_rss, rec.usage.peak_gpu, rec.usage.measured_for):
        rec.usage = dataclasses.replace(usage, peak_rss=peak_rss, peak_gpu=peak_gpu, measured_for=spec)


def begin_rest(rec: ServerRecord, owner: ProcessIdentity | None, why: str) -> None:
    """An on-demand server is stopped to rest (idle, or evicted for another's memory): it goes back
    to idle, its socket still held."""
    move(rec, STOPPING, expect=ALIVE)
    if rec.instance is not None:
        rec.instance = dataclasses.replace(rec.instance, stop_owner=[owner.pid, owner.create_time] if owner else None)
    rec.detail = why


def rested(rec: ServerRecord, token: str | None, now: float, evicted_for: str | None) -> None:
    """Its processes are gone: idle again, counted as an idle stop or an eviction."""
    if not stopped(rec, token, idle=True):
        return
    usage = rec.usage
    if evicted_for is not None:
        stamp = time.strftime("%H:%M:%S", time.localtime(now))
        rec.usage = dataclasses.replace(usage, evictions=usage.evictions + 1, last_eviction=f"{stamp}: {evicted_for}")
    else:
        rec.usage = dataclasses.replace(usage, idle_stops=usage.idle_stops + 1)


# ---------------------------------------------------------------------- modelctl run (systemd)
def fresh_start(rec: ServerRecord) -> None:
    """`modelctl run` starts the server afresh: whatever the record said is over."""
    if rec.state != STOPPED:
        force(rec, STOPPED, "modelctl run starts the server afresh")
    rec.instance = None


def at_rest(rec: ServerRecord) -> None:
    """`modelctl run` exits and leaves restarting to systemd: not wanted by us any more."""
    rec.wish = dataclasses.replace(rec.wish, desired="stopped")
    if rec.state == BACKOFF:
        move(rec, STOPPED, expect=BACKOFF)
        rec.history = dataclasses.replace(rec.history, next_start_at=None)
