"""The restart decision, as pure functions: (policy, history, failure, now) → what happens next.

`count_failure` adds a failure to a server's history (the crash-loop window, the consecutive
count that the backoff doubles on, reset after a stable uptime); `decide` says what follows once
the failed instance is gone: a backoff, giving up (`failed`), or staying down (the policy says
so). Nothing here reads a clock, a file or a process: tests/test_restart.py checks it as a table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from modelctl.failures import Exit, Failure
from modelctl.spec import RestartPolicy
from modelctl.state.record import ExitEntry, History

EXITS_KEPT = 10


@dataclass(frozen=True)
class Backoff:
    """Start again after `delay` seconds."""

    delay: float
    reason: str


@dataclass(frozen=True)
class GiveUp:
    """Do not start again until someone asks (`failed`)."""

    reason: str


@dataclass(frozen=True)
class StayDown:
    """The policy does not restart this exit: stopped, and no longer wanted."""

    reason: str


Decision = Backoff | GiveUp | StayDown


def count_failure(
    history: History, policy: RestartPolicy, failure: Failure, exit: Exit | None, now: float, ready_at: float | None
) -> History:
    """The history with this failure in it."""
    consecutive = history.consecutive_failures
    if ready_at is not None and now - ready_at >= policy.stable_after:
        consecutive = 0  # it ran long enough: the backoff starts over
    entry = ExitEntry(at=now, exit=exit, cls=failure.cls, line=failure.line, retry=failure.retry)
    return dataclasses.replace(
        history,
        failures=[t for t in history.failures if now - t <= policy.window] + [now],
        consecutive_failures=consecutive + 1,
        last_exit=exit if exit is not None else history.last_exit,
        last_error=failure.describe(),
        exits=[*history.exits, entry][-EXITS_KEPT:],
    )


def decide(policy: RestartPolicy, history: History, failure: Failure, exit: Exit | None) -> Decision:
    """What follows a failure already counted in `history`."""
    what = exit.describe() if exit is not None and exit.known else failure.describe()
    if not failure.retry:
        return GiveUp(f"configuration error, not retried: {failure.describe()}")
    clean = exit is not None and exit.clean
    if policy.policy == "never" or (policy.policy == "on-failure" and clean):
        return StayDown(f"exited ({what}); restart policy '{policy.policy}'")
    if len(history.failures) >= policy.max_failures:
        return GiveUp(f"crash loop: {len(history.failures)} failures within {policy.window:g}s; last: {what}")
    delay = policy.delay(history.consecutive_failures)
    return Backoff(delay, f"{what}; restarting in {delay:g}s")
