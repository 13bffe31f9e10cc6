"""The state table: allowed moves pass, others are refused; `expect` catches a record moved by someone else."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from modelctl.failures import Exit, Failure
from modelctl.host.identity import ProcessIdentity
from modelctl.spec import RestartPolicy
from modelctl.state import lifecycle as lc
from modelctl.state.record import ServerRecord
from modelctl.state.restart import Backoff


@pytest.mark.parametrize(
    "src, dst",
    [
        (lc.STOPPED, lc.STARTING),
        (lc.STARTING, lc.READY),
        (lc.READY, lc.UNHEALTHY),
        (lc.UNHEALTHY, lc.READY),
        (lc.READY, lc.CRASHED),
        (lc.CRASHED, lc.BACKOFF),
        (lc.BACKOFF, lc.STARTING),
        (lc.CRASHED, lc.FAILED),
        (lc.FAILED, lc.STOPPED),
        (lc.READY, lc.STOPPING),
        (lc.CRASHED, lc.STOPPING),
        (lc.STOPPING, lc.STOPPED),
    ],
)
def test_allowed_moves(src, dst):
    rec = ServerRecord(profile="p", name="s", state=src)
    lc.move(rec, dst)
    assert rec.state == dst


@pytest.mark.parametrize(
    "src, dst",
    [
        (lc.STOPPED, lc.READY),
        (lc.FAILED, lc.READY),
        (lc.FAILED, lc.STARTING),
        (lc.STOPPING, lc.STARTING),
        (lc.BACKOFF, lc.READY),
        (lc.STARTING, lc.BACKOFF),
        (lc.READY, lc.STOPPED),
    ],
)
def test_refused_moves(src, dst):
    rec = ServerRecord(profile="p", name="s", state=src)
    with pytest.raises(lc.TransitionError):
        lc.move(rec, dst)
    assert rec.state == src


def test_a_move_from_an_unexpected_state_is_refused_even_if_the_table_allows_it():
    rec = ServerRecord(profile="p", name="s", state=lc.UNHEALTHY)
    with pytest.raises(lc.TransitionError, match="is unhealthy, expected ready"):
        lc.move(rec, lc.STOPPING, expect=lc.READY)
    assert rec.state == lc.UNHEALTHY


def test_force_moves_outside_the_table():
    rec = ServerRecord(profile="p", name="s", state=lc.READY)
    lc.force(rec, lc.FAILED, "its spec no longer validates")
    assert rec.state == lc.FAILED


OWNED = re.compile(r"\.(state|instance|successor|history|wish|usage)(\.\w+)*\s*=[^=]")


def test_no_state_instance_history_or_wish_is_written_outside_the_lifecycle_module():
    """Every change of a record's state, instance, history or wish is a named transition there."""
    root = Path(lc.__file__).parent
    offenders = [
        f"{path.relative_to(root.parent)}:{n}: {line.strip()}"
        for path in root.rglob("*.py")
        if path.name != "lifecycle.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OWNED.search(line)
    ]
    assert offenders == []


def test_the_ownership_check_sees_writes_of_parts_and_their_fields():
    assert OWNED.search("rec.instance = None") and OWNED.search("rec.history.restarts = 3")
    assert OWNED.search("r.wish.desired = 'stopped'") and OWNED.search("rec.state = x")
    assert not OWNED.search("if rec.state == x:") and not OWNED.search("state = rec.state")


def test_a_start_then_a_crash_then_a_backoff_set_their_fields_together():
    rec = ServerRecord(profile="p", name="s", fingerprint="f1")
    lc.intend_start(rec, "token-1", now=10.0)
    assert rec.state == lc.STARTING and rec.instance.token == "token-1" and rec.instance.fingerprint == "f1"
    lc.spawned(rec, ProcessIdentity(123, 5.0))
    lc.became_ready(rec, 12.0, {"total": 2.0})
    assert rec.instance.ready_at == 12.0 and rec.startup == {"total": 2.0}
    lc.crashed(rec, 20.0, Exit(signal=9), Failure("signal", "killed by SIGKILL", True), RestartPolicy())
    assert rec.state == lc.CRASHED and rec.history.last_exit == Exit(signal=9) and rec.history.failures == [20.0]
    lc.settle_crash(rec, Backoff(2.0, "killed by SIGKILL; restarting in 2s"), 21.0)
    assert rec.state == lc.BACKOFF and rec.instance is None and rec.history.next_start_at == 23.0
    lc.intend_start(rec, "token-2", now=23.0)
    assert rec.history.restarts == 1 and rec.history.next_start_at is None and rec.instance.token == "token-2"


def test_a_version_2_record_is_read_into_its_parts():
    old = {
        "version": 2, "profile": "p", "name": "s", "state": "backoff", "desired": "running", "managed_by": "systemd",
        "pid": 42, "create_time": 1.5, "instance": "tok", "members": [[43, 2.0]], "started_at": 9.0, "running_fingerprint": "f0",
        "restarts": 2, "failures": [8.0], "consecutive_failures": 2, "next_start_at": 11.0, "last_exit": "killed by SIGKILL",
        "last_error": "signal: killed by SIGKILL", "exits": [{"at": 8.0, "exit": "exit code 3", "class": "crash", "line": "boom", "retry": True}],
    }  # fmt: skip
    rec = ServerRecord.from_json(old)
    assert rec.version == 3 and rec.wish.managed_by == "systemd" and rec.wish.desired == "running"
    assert (
        rec.instance.token == "tok" and rec.instance.pid == 42 and rec.instance.members == [[43, 2.0]] and rec.instance.fingerprint == "f0"
    )
    assert rec.history.restarts == 2 and rec.history.last_exit == Exit(signal=9) and rec.history.next_start_at == 11.0
    assert rec.history.exits[0].exit == Exit(code=3) and rec.history.exits[0].cls == "crash"
    assert ServerRecord.from_json(rec.to_json()) == rec  # and written back as version 3
