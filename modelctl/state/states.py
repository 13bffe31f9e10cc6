"""The states a server moves through, and the table of allowed moves between them.

    idle (on demand, armed) → starting → ready ⇄ unhealthy → (crashed → backoff → starting …) → failed
    stopped → starting;   starting | ready | unhealthy | crashed → stopping → stopped | idle

Pure data: modelctl/state/lifecycle.py owns the moves (and the fields each one sets), and every
other module asks it.
"""

from __future__ import annotations

from typing import Literal

STOPPED = "stopped"
IDLE = "idle"  # an on-demand server: its socket is held, no process runs until a client connects
STARTING = "starting"
READY = "ready"
UNHEALTHY = "unhealthy"
CRASHED = "crashed"  # an instance failed; its leftovers are being cleaned up before the next decision
BACKOFF = "backoff"
FAILED = "failed"
STOPPING = "stopping"  # a deliberate stop is under way (down, restart, a changed spec, an idle stop)

STATES = (STOPPED, IDLE, STARTING, READY, UNHEALTHY, CRASHED, BACKOFF, FAILED, STOPPING)

ALLOWED: dict[str, frozenset[str]] = {
    STOPPED: frozenset({STARTING, IDLE, FAILED}),  # failed: the budget cannot make room
    IDLE: frozenset({STARTING, STOPPED, FAILED}),
    STARTING: frozenset({READY, CRASHED, FAILED, STOPPING}),
    READY: frozenset({UNHEALTHY, CRASHED, STOPPING}),
    UNHEALTHY: frozenset({READY, CRASHED, STOPPING}),
    CRASHED: frozenset({BACKOFF, FAILED, STOPPED, STOPPING, IDLE}),
    BACKOFF: frozenset({STARTING, STOPPED, FAILED}),
    FAILED: frozenset({STOPPED}),
    STOPPING: frozenset({STOPPED, IDLE}),
}

# the server's process is expected to be running
ALIVE = frozenset({STARTING, READY, UNHEALTHY})
# a process of this server may still exist (alive, leftovers being stopped, or a start whose
# process was never recorded: a failed one keeps its token until a stop has looked for it)
MAY_HAVE_PROCESSES = ALIVE | {CRASHED, STOPPING}

Desired = Literal["running", "stopped"]
ManagedBy = Literal["supervisor", "systemd"]
DESIRED: tuple[Desired, ...] = ("running", "stopped")
MANAGED_BY: tuple[ManagedBy, ...] = ("supervisor", "systemd")
SUPERVISOR: ManagedBy = "supervisor"
SYSTEMD: ManagedBy = "systemd"
