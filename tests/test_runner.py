"""The one supervisor loop (modelctl/supervisor/runner.py), for the daemon and for `modelctl run`, with real
processes: it outlives a state lock held by someone else, reaps orphans in both uses, reopens
its log on SIGHUP."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time

import psutil

from modelctl.supervisor.client import supervisor_info

from .conftest import TOY_SERVER, http_get, wait_for, wait_text


def up(mc, servers: dict, env: dict | None = None) -> None:
    res = mc.cli("up", "-p", str(mc.profile(servers)), env=env)
    assert res.returncode == 0, res.stdout + res.stderr


def toy_server(**extra) -> dict:
    return {"kind": "command", "command": [sys.executable, TOY_SERVER, "--port", "{port}"], "health": {"http": "/health"}, **extra}


def test_the_supervisor_outlives_a_state_lock_held_longer_than_its_wait(mc):
    """A slow command (or anything) holding STATE/servers past the lock wait only delays the
    supervisor: it neither exits nor stops restarting crashed servers."""
    up(mc, {"web": toy_server(restart={"backoff": 0.1})}, env={"MODELCTL_LOCK_TIMEOUT": "0.5"})
    sup = supervisor_info(mc.store)
    assert sup is not None and sup.pid is not None
    fd = os.open(mc.state_dir / "servers", os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        time.sleep(3)  # six lock waits of the supervisor's
        assert psutil.pid_exists(sup.pid) and psutil.Process(sup.pid).status() != psutil.STATUS_ZOMBIE
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    before = mc.row("web")
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(lambda: (r := mc.row("web"))["state"] == "ready" and r["pid"] not in (None, before["pid"]), 20, what="the restart")
    assert supervisor_info(mc.store).pid == sup.pid


def zombies_of(pid: int) -> list[int]:
    try:
        return [c.pid for c in psutil.Process(pid).children() if c.status() == psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def test_modelctl_run_reaps_the_orphans_that_reparent_to_it(mc):
    """`modelctl run` is a child subreaper like the daemon, and reaps like it: a server whose
    short-lived background children outlive their parent leaves no zombies under the unit."""
    script = f'for i in 1 2 3 4 5; do sh -c "sleep 0.5 &"; done; exec {sys.executable} {TOY_SERVER} --port "$1"'
    path = mc.profile({"web": {"kind": "command", "command": ["sh", "-c", script, "sh", "{port}"], "health": {"http": "/health"}}})
    run = subprocess.Popen([sys.executable, "-m", "modelctl", "run", "web", "-p", str(path)], env=mc.env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: [r.state for r in mc.ctl.status()] == ["ready"], 20, what="the server to be ready")
        time.sleep(2.0)  # the sleeps have exited by now
        assert zombies_of(run.pid) == []
    finally:
        run.terminate()
        run.wait(30)


def test_sighup_reopens_the_supervisor_log_and_reads_the_records_again(mc):
    up(mc, {"web": toy_server()})
    sup = supervisor_info(mc.store)
    assert sup is not None and sup.pid is not None
    log = mc.state_dir / "supervisor.log"
    os.replace(log, mc.state_dir / "supervisor.log.1")  # what logrotate does (without copytruncate)
    os.kill(sup.pid, signal.SIGHUP)
    wait_text(log, "reopened", timeout=10)
    assert "SIGHUP" in (mc.state_dir / "supervisor.log.1").read_text()
    assert supervisor_info(mc.store).pid == sup.pid  # still the same supervisor, still working
    assert http_get(mc.row("web")["url"] + "/health")[0] == 200
