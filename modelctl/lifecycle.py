"""The states a server moves through, and the only moves allowed between them.

    stopped → starting → ready ⇄ unhealthy → (crashed → backoff → starting …) → failed
    starting | ready | unhealthy | crashed → stopping → stopped

One table owns the moves (as llama-swap's process state machine does); `move` is the only way
a record changes state, and it checks where the record comes from. The few moves outside the
table (repairing a record whose state cannot be trusted) go through `force`, which says why.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Protocol

STOPPED = "stopped"
STARTING = "starting"
READY = "ready"
UNHEALTHY = "unhealthy"
CRASHED = "crashed"  # an instance failed; its leftovers are being cleaned up before the next decision
BACKOFF = "backoff"
FAILED = "failed"
STOPPING = "stopping"  # a deliberate stop is under way (down, restart, a changed spec)

STATES = (STOPPED, STARTING, READY, UNHEALTHY, CRASHED, BACKOFF, FAILED, STOPPING)

ALLOWED: dict[str, frozenset[str]] = {
    STOPPED: frozenset({STARTING}),
    STARTING: frozenset({READY, CRASHED, FAILED, STOPPING}),
    READY: frozenset({UNHEALTHY, CRASHED, STOPPING}),
    UNHEALTHY: frozenset({READY, CRASHED, STOPPING}),
    CRASHED: frozenset({BACKOFF, FAILED, STOPPED, STOPPING}),
    BACKOFF: frozenset({STARTING, STOPPED}),
    FAILED: frozenset({STOPPED}),
    STOPPING: frozenset({STOPPED}),
}

# the server's process is expected to be running
ALIVE = frozenset({STARTING, READY, UNHEALTHY})
# a process of this server may still exist (alive, or leftovers being stopped)
MAY_HAVE_PROCESSES = ALIVE | {CRASHED, STOPPING}

log = logging.getLogger("modelctl.lifecycle")


class Stateful(Protocol):
    state: str

    @property
    def label(self) -> str: ...


class TransitionError(RuntimeError):
    """A move the table does not allow, or a record that is not in the state the mover expected."""


def can_move(src: str, dst: str) -> bool:
    return dst in ALLOWED.get(src, frozenset())


def move(rec: Stateful, dst: str, expect: Collection[str] | str | None = None) -> None:
    """Move `rec` to `dst`. With `expect`, only from those states: a mover that read the record
    earlier learns that someone else moved it since, instead of undoing their move."""
    if expect is not None:
        allowed_from = (expect,) if isinstance(expect, str) else expect
        if rec.state not in allowed_from:
            raise TransitionError(f"server {rec.label}: is {rec.state}, expected {' or '.join(sorted(allowed_from))}")
    if not can_move(rec.state, dst):
        raise TransitionError(f"server {rec.label}: {rec.state} → {dst} is not an allowed move")
    rec.state = dst


def force(rec: Stateful, dst: str, why: str) -> None:
    """The exceptions to the table, each named by its reason (logged)."""
    if rec.state != dst:
        log.info("server %s: %s → %s forced: %s", rec.label, rec.state, dst, why)
    rec.state = dst
