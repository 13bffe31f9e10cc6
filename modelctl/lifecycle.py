"""The states a server moves through, and the only moves allowed between them.

    stopped → starting → ready ⇄ unhealthy → (crashed → backoff → starting …) → failed
    any running state → stopping → stopped

One table owns the moves (as llama-swap's process state machine does); everything else asks it.
"""

from __future__ import annotations

STOPPED = "stopped"
STARTING = "starting"
READY = "ready"
UNHEALTHY = "unhealthy"
CRASHED = "crashed"
BACKOFF = "backoff"
FAILED = "failed"
STOPPING = "stopping"

ALLOWED: dict[str, frozenset[str]] = {
    STOPPED: frozenset({STARTING, STOPPING, FAILED}),
    STARTING: frozenset({READY, CRASHED, FAILED, STOPPING}),
    READY: frozenset({UNHEALTHY, CRASHED, STOPPING}),
    UNHEALTHY: frozenset({READY, CRASHED, STOPPING}),
    CRASHED: frozenset({BACKOFF, FAILED, STOPPED, STOPPING}),
    BACKOFF: frozenset({STARTING, FAILED, STOPPING, STOPPED}),
    FAILED: frozenset({STARTING, STOPPING, STOPPED}),
    STOPPING: frozenset({STOPPED}),
}

# States in which a process is expected to be alive.
RUNNING = frozenset({STARTING, READY, UNHEALTHY, STOPPING})


class TransitionError(RuntimeError):
    pass


def can_move(src: str, dst: str) -> bool:
    return src == dst or dst in ALLOWED.get(src, frozenset())


def check_move(src: str, dst: str, name: str = "") -> None:
    if not can_move(src, dst):
        raise TransitionError(f"server {name!r}: {src} → {dst} is not an allowed move")
