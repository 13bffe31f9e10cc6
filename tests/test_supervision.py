"""Supervision with real processes: restarts on the same port, crash loops, hung servers,
a supervisor that dies, and down during backoff."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import psutil
import pytest

from modelctl.supervisor.client import supervisor_info

from .conftest import http_get, wait_for, wait_text, wait_ticks
from .test_cli import status_json, toy_pids


def supervisor_pid(mc) -> int | None:
    """The running supervisor's pid (-1 while it has not written it yet), or None."""
    info = supervisor_info(mc.store)
    return None if info is None else (info.pid or -1)


def test_a_killed_server_is_ready_again_on_the_same_port(mc):
    path = mc.profile(
        {"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health", "interval": 0.5}, "restart": {"backoff": 0.2}}}
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    before = status_json(mc)["web"]
    os.kill(before["pid"], signal.SIGKILL)
    row = wait_for(lambda: (r := mc.row("web"))["state"] == "ready" and r["pid"] not in (None, before["pid"]) and r, 20, what="a restart")
    assert row["port"] == before["port"] and row["restarts"] == 1
    assert row["last_exit"] == {"code": None, "signal": signal.SIGKILL, "description": "killed by SIGKILL"}
    status, body = http_get(before["url"] + "/info")  # the client's old URL works again
    assert status == 200 and body["pid"] == row["pid"]
    assert toy_pids(mc) == [row["pid"]]


@pytest.mark.slow
def test_a_server_that_exits_at_once_ends_failed_with_its_log_tail(mc):
    path = mc.profile(
        {"broken": {"kind": "command", "command": mc.toy("--exit-code", "3"), "restart": {"backoff": 0.1, "max_failures": 3}}}
    )
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 1
    row = mc.row("broken")
    assert (
        row["state"] == "failed" and row["restarts"] == 2 and row["last_exit"] == {"code": 3, "signal": None, "description": "exit code 3"}
    )
    out = mc.cli("status").stdout
    assert "failed" in out and "crash loop: 3 failures" in out and "exiting on purpose" in out
    # restart clears the failed state and tries again
    res = mc.cli("restart", "broken")
    assert res.returncode == 1 and mc.row("broken")["state"] == "failed"


@pytest.mark.slow
def test_a_hung_server_is_restarted(mc):
    hang = mc.tmp / "hang"
    path = mc.profile(
        {
            "web": {
                "kind": "command",
                "command": mc.toy("--hang-file", str(hang)),
                "health": {"http": "/health", "interval": 0.3, "timeout": 0.5, "grace": 1.5},
                "restart": {"backoff": 0.2},
            }
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    first = mc.row("web")
    hang.touch()
    wait_for(lambda: mc.row("web")["state"] == "unhealthy", 10, what="unhealthy")
    hang.unlink()  # the next process answers again; the hung one stays hung until killed
    row = wait_for(lambda: (r := mc.row("web"))["state"] == "ready" and r["pid"] != first["pid"] and r, 30, what="a restart")
    assert row["port"] == first["port"] and row["restarts"] == 1
    assert not psutil.pid_exists(first["pid"]) or psutil.Process(first["pid"]).status() == psutil.STATUS_ZOMBIE


@pytest.mark.slow
def test_servers_outlive_a_killed_supervisor_and_are_adopted(mc):
    path = mc.profile(
        {
            "a": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}},
            "b": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}},
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    before = status_json(mc)
    old = supervisor_pid(mc)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(old) or psutil.Process(old).status() == psutil.STATUS_ZOMBIE, 5, what="the supervisor to die")
    for row in before.values():
        assert http_get(row["url"] + "/health")[0] == 200  # still serving

    res = mc.cli("status")  # the next command notices and starts a new supervisor
    assert res.returncode == 0
    new = wait_for(lambda: supervisor_pid(mc), 10, what="a new supervisor")
    assert new != old
    wait_text(mc.state_dir / "supervisor.log", "adopted running pid", count=2)
    wait_ticks(mc.state_dir, 3)  # an adopting supervisor must not start duplicates
    after = status_json(mc)
    assert {n: r["pid"] for n, r in after.items()} == {n: r["pid"] for n, r in before.items()}
    assert sorted(toy_pids(mc)) == sorted(r["pid"] for r in before.values())

    # the adopted servers are still supervised: a crash is noticed and repaired
    os.kill(before["a"]["pid"], signal.SIGKILL)
    row = wait_for(
        lambda: (r := mc.row("a"))["state"] == "ready" and r["pid"] != before["a"]["pid"] and r, 20, what="restart of an adopted server"
    )
    assert row["port"] == before["a"]["port"]


def test_down_during_backoff_leaves_nothing_running(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "restart": {"backoff": 3}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    os.kill(mc.row("web")["pid"], signal.SIGKILL)
    wait_for(lambda: mc.row("web")["state"] == "backoff", 10, what="backoff")
    assert mc.cli("down").returncode == 0
    # with nothing left to supervise the supervisor exits: nothing can start the server again
    wait_for(lambda: supervisor_pid(mc) is None, 10, what="the supervisor to exit")
    assert toy_pids(mc) == [] and mc.row("web")["state"] == "stopped"
    assert mc.record("web").history.next_start_at is None


@pytest.mark.slow
def test_a_restart_onto_a_taken_port_says_who_holds_it(mc):
    path = mc.profile(
        {"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "restart": {"backoff": 1, "max_failures": 3}}}
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    row = mc.row("web")
    os.kill(row["pid"], signal.SIGKILL)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    wait_for(lambda: _try_bind(squatter, row["port"]), 5, what="taking the port")
    squatter.listen()
    try:
        failed = wait_for(lambda: (r := mc.row("web"))["state"] == "failed" and r, 20, what="failed")
        assert f"pid {os.getpid()}" in failed["last_error"] and str(row["port"]) in failed["last_error"]
        assert toy_pids(mc) == []
    finally:
        squatter.close()
    assert mc.cli("restart", "web").returncode == 0  # once the port is free again
    assert mc.row("web")["port"] == row["port"]


def _try_bind(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def test_supervise_stop_ends_the_supervisor_and_a_foreground_one_adopts(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    row = mc.row("web")
    res = mc.cli("supervise", "--stop")
    assert res.returncode == 0 and "stopped" in res.stdout
    assert supervisor_pid(mc) is None
    assert http_get(row["url"] + "/health")[0] == 200  # servers keep serving without it

    stderr = mc.tmp / "supervise.err"
    with open(stderr, "w") as err_file:
        fg = subprocess.Popen([sys.executable, "-m", "modelctl", "supervise"], env=mc.env, stderr=err_file, text=True)
    try:
        wait_for(lambda: supervisor_pid(mc) == fg.pid, 10, what="the foreground supervisor")
        wait_text(stderr, f"test/web: adopted running pid {row['pid']}")  # it logs to stderr
        wait_ticks(mc.state_dir, 2)
        assert toy_pids(mc) == [row["pid"]]  # adopted, not duplicated
        fg.send_signal(signal.SIGTERM)
        assert fg.wait(10) == 0
    finally:
        if fg.poll() is None:
            fg.kill()
            fg.wait()
    assert http_get(row["url"] + "/health")[0] == 200
