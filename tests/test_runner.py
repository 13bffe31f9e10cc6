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
from pathlib import Path

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
    background children outlive their parent sees them re-parent to `modelctl run` (not to init),
    which reaps them when they exit: no zombies under the unit.
    Fails if the runner does not make itself a child subreaper."""
    pids = mc.tmp / "orphans"
    script = f'for i in 1 2 3; do sh -c "sleep 3 & echo \\$! >> {pids}"; done; exec {sys.executable} {TOY_SERVER} --port "$1"'
    path = mc.profile({"web": {"kind": "command", "command": ["sh", "-c", script, "sh", "{port}"], "health": {"http": "/health"}}})
    run = subprocess.Popen([sys.executable, "-m", "modelctl", "run", "web", "-p", str(path)], env=mc.env, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: [r.state for r in mc.ctl.status()] == ["ready"], 20, what="the server to be ready")
        orphans = [int(x) for x in wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 3 and pids.read_text().split(), 10)]
        parents = {pid: psutil.Process(pid).ppid() for pid in orphans if psutil.pid_exists(pid)}
        assert parents and set(parents.values()) == {run.pid}, f"the orphans' parents: {parents}; modelctl run is {run.pid}"
        wait_for(lambda: not any(psutil.pid_exists(pid) for pid in orphans), 10, what="the orphans to exit and be reaped")
        assert zombies_of(run.pid) == []
    finally:
        run.terminate()
        run.wait(30)


def edit_in_place(path: Path, old: str, new: str) -> None:
    """Change a file's bytes without changing its inode, size or modification time: what the
    supervisor looks at to notice a write (an operator's edit that it can only learn of by SIGHUP)."""
    st = path.stat()
    text = path.read_text()
    assert len(old) == len(new) and text.count(old) == 1, (old, text)
    with open(path, "r+") as f:
        f.write(text.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)


def test_sighup_reopens_the_supervisor_log_and_reads_the_records_again(mc):
    """After logrotate moved the log, SIGHUP reopens it; and every record is read again: an edit
    that leaves the file's stamp as it was (restarts 0 → 7) is seen, so the next restart counts 8.
    Fails if SIGHUP only reopens the log (the supervisor keeps its copy of the record)."""
    up(mc, {"web": toy_server(restart={"backoff": 0.1})})
    sup = supervisor_info(mc.store)
    assert sup is not None and sup.pid is not None
    record = mc.store.record_path(mc.ref("web"))
    with mc.store.locked():  # the supervisor writes records under this lock
        edit_in_place(record, '"restarts": 0\n', '"restarts": 7\n')
    log = mc.state_dir / "supervisor.log"
    os.replace(log, mc.state_dir / "supervisor.log.1")  # what logrotate does (without copytruncate)
    os.kill(sup.pid, signal.SIGHUP)
    wait_text(log, "reopened", timeout=10)
    assert "SIGHUP" in (mc.state_dir / "supervisor.log.1").read_text()
    assert supervisor_info(mc.store).pid == sup.pid  # still the same supervisor, still working
    before = mc.row("web")
    assert http_get(before["url"] + "/health")[0] == 200
    os.kill(before["pid"], signal.SIGKILL)
    row = wait_for(lambda: (r := mc.row("web"))["state"] == "ready" and r["pid"] != before["pid"] and r, 20, what="the restart")
    assert row["restarts"] == 8, row["restarts"]
