"""The states a server moves through, and the table of allowed moves between them.

    idle (on demand, armed) → starting → ready ⇄ unhealthy → (crashed → backoff → starting …) → failed
    stopped → starting;   starting | ready | unhealthy | crashed → stopping → stopped | idle

Pure data: modelctl/state/lifecycle.py owns the moves (and the fields each one sets), and every
other module asks it.
"""

from __future__ import annotations

from typing import Literal

State = Literal["stopped", "idle", "starting", "ready", "unhealthy", "crashed", "backoff", "failed", "stopping"]

STOPPED: State = "stopped"
IDLE: State = "idle"  # an on-demand server: its socket is held, no process runs until a client connects
STARTING: State = "starting"
READY: State = "ready"
UNHEALTHY: State = "unhealthy"
CRASHED: State = "crashed"  # an instance failed; its leftovers are being cleaned up before the next decision
BACKOFF: State = "backoff"
FAILED: State = "failed"
STOPPING: State = "stopping"  # a deliberate stop is under way (down, restart, a changed spec, an idle stop)

STATES: tuple[State, ...] = (STOPPED, IDLE, STARTING, READY, UNHEALTHY, CRASHED, BACKOFF, FAILED, STOPPING)

# a budget that cannot make room makes a start wait, never fail: no move to failed from rest
ALLOWED: dict[State, frozenset[State]] = {
    STOPPED: frozenset({STARTING, IDLE}),
    IDLE: frozenset({STARTING, STOPPED}),
    STARTING: frozenset({READY, CRASHED, FAILED, STOPPING}),
    READY: frozenset({UNHEALTHY, CRASHED, STOPPING}),
    UNHEALTHY: frozenset({READY, CRASHED, STOPPING}),
    CRASHED: frozenset({BACKOFF, FAILED, STOPPED, STOPPING, IDLE}),
    BACKOFF: frozenset({STARTING, STOPPED, FAILED}),
    FAILED: frozenset({STOPPED}),
    STOPPING: frozenset({STOPPED, IDLE}),
}

# the server's process is expected to be running
ALIVE: frozenset[State] = frozenset({STARTING, READY, UNHEALTHY})
# a process of this server may still exist (alive, leftovers being stopped, or a start whose
# process was never recorded: a failed one keeps its token until a stop has looked for it)
MAY_HAVE_PROCESSES: frozenset[State] = ALIVE | {CRASHED, STOPPING}

Desired = Literal["running", "stopped"]
ManagedBy = Literal["supervisor", "systemd"]
DESIRED: tuple[Desired, ...] = ("running", "stopped")
MANAGED_BY: tuple[ManagedBy, ...] = ("supervisor", "systemd")
SUPERVISOR: ManagedBy = "supervisor"
SYSTEMD: ManagedBy = "systemd"
