"""The restart decision as a table: (policy, history, failure, exit) → backoff | failed | stay down."""

from __future__ import annotations

import pytest

from modelctl.failures import Exit, Failure
from modelctl.spec import RestartPolicy
from modelctl.state.record import History
from modelctl.state.restart import Backoff, GiveUp, StayDown, count_failure, decide

CRASH = Failure("crash", "segfault", True)
CONFIG = Failure("config", "no such model", False)


def history_after(n: int, policy: RestartPolicy, every: float = 1.0, failure: Failure = CRASH) -> History:
    h = History()
    for i in range(n):
        h = count_failure(h, policy, failure, Exit(code=1), now=100.0 + i * every, ready_at=None)
    return h


@pytest.mark.parametrize(
    "policy, failures, failure, exit, expected",
    [
        (RestartPolicy(backoff=1, backoff_max=30), 1, CRASH, Exit(code=1), Backoff(1.0, "")),
        (RestartPolicy(backoff=1, backoff_max=30), 3, CRASH, Exit(code=1), Backoff(4.0, "")),
        (RestartPolicy(backoff=1, backoff_max=3, max_failures=10), 4, CRASH, Exit(code=1), Backoff(3.0, "")),
        (RestartPolicy(max_failures=3), 3, CRASH, Exit(code=1), GiveUp("")),
        (RestartPolicy(), 1, CONFIG, Exit(code=78), GiveUp("")),
        (RestartPolicy(policy="never"), 1, CRASH, Exit(code=1), StayDown("")),
        (RestartPolicy(policy="on-failure"), 1, CRASH, Exit(code=0), StayDown("")),
        (RestartPolicy(policy="on-failure"), 1, CRASH, Exit(code=2), Backoff(1.0, "")),
        (RestartPolicy(policy="on-failure"), 1, CRASH, Exit(signal=9), Backoff(1.0, "")),
        (RestartPolicy(policy="always"), 1, CRASH, Exit(code=0), Backoff(1.0, "")),
    ],
)
def test_the_decision_table(policy, failures, failure, exit, expected):
    decision = decide(policy, history_after(failures, policy, failure=failure), failure, exit)
    assert type(decision) is type(expected)
    if isinstance(expected, Backoff):
        assert decision.delay == expected.delay


def test_failures_outside_the_window_leave_it():
    policy = RestartPolicy(window=10, max_failures=2)
    h = count_failure(History(), policy, CRASH, Exit(code=1), now=0.0, ready_at=None)
    h = count_failure(h, policy, CRASH, Exit(code=1), now=30.0, ready_at=None)
    assert h.failures == [30.0] and isinstance(decide(policy, h, CRASH, Exit(code=1)), Backoff)


def test_a_stable_uptime_starts_the_backoff_over():
    policy = RestartPolicy(backoff=1, stable_after=60, max_failures=10)
    h = history_after(3, policy)
    assert h.consecutive_failures == 3
    h = count_failure(h, policy, CRASH, Exit(code=1), now=500.0, ready_at=400.0)
    assert h.consecutive_failures == 1 and decide(policy, h, CRASH, Exit(code=1)) == Backoff(1.0, "exit code 1; restarting in 1s")


def test_the_history_keeps_the_last_exits_with_numbers():
    policy = RestartPolicy(max_failures=100, window=10_000)
    h = history_after(12, policy)
    assert len(h.exits) == 10 and h.exits[-1].exit == Exit(code=1) and h.last_exit == Exit(code=1)
    assert h.last_error == "crash: segfault"


def test_the_reason_names_the_exit_or_the_failure():
    policy = RestartPolicy(max_failures=1)
    assert decide(policy, history_after(1, policy), CRASH, Exit(signal=9)) == GiveUp(
        "crash loop: 1 failures within 300s; last: killed by SIGKILL"
    )
    timeout = Failure("startup-timeout", "not ready after 5s", True)
    assert "startup-timeout: not ready" in decide(policy, history_after(1, policy), timeout, None).reason
