"""The state table: allowed moves pass, others are refused."""

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
        (lc.FAILED, lc.STARTING),
        (lc.READY, lc.STOPPING),
        (lc.STOPPING, lc.STOPPED),
    ],
)
def test_allowed_moves(src, dst):
    rec = ServerRecord(name="s", state=src)
    rec.move(dst)
    assert rec.state == dst


@pytest.mark.parametrize(
    "src, dst",
    [(lc.STOPPED, lc.READY), (lc.FAILED, lc.READY), (lc.STOPPING, lc.STARTING), (lc.BACKOFF, lc.READY), (lc.STARTING, lc.BACKOFF)],
)
def test_refused_moves(src, dst):
    rec = ServerRecord(name="s", state=src)
    with pytest.raises(lc.TransitionError):
        rec.move(dst)
    assert rec.state == src
