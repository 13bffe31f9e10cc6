"""The state table: allowed moves pass, others are refused; `expect` catches a record moved by someone else."""

from __future__ import annotations

import pytest

from modelctl import lifecycle as lc
from modelctl.state import ServerRecord


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


def test_no_state_is_written_outside_the_lifecycle_module():
    """Every state change goes through lifecycle.move or lifecycle.force."""
    import re
    from pathlib import Path

    root = Path(lc.__file__).parent
    offenders = [
        f"{path.relative_to(root.parent)}:{n}"
        for path in root.rglob("*.py")
        if path.name != "lifecycle.py"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\.state\s*=[^=]", line)
    ]
    assert offenders == []
