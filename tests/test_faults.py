"""Trust under faults, round 2, with real processes: an instance is never without its record, a
full or read-only disk still stops servers, shared directories are untrusted, nothing hostile
reaches the terminal, and slow stops never starve the supervisor's probes and restarts."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelctl.names import ServerRef
from modelctl.profile import load_profile
from modelctl.state import lifecycle as lc
from modelctl.state.leases import LEASE_GRACE, PortLeases
from modelctl.state.record import ServerRecord
from modelctl.state.store import StateStore

from .conftest import TOY_SERVER, http_get, wait_for
from .test_cli import toy_pids

ESC = "\x1b"
HOSTILE = r"\x1b]0;pwned\x07\x1b[2J\x1b]52;c;cHduZWQ=\x07"  # retitle, clear, write the clipboard


def toy(*flags: str) -> list[str]:
    return [sys.executable, TOY_SERVER, "--port", "{port}", *flags]


# ---------------------------------------------------------------------- never an unrecorded instance
@pytest.mark.slow
def test_a_supervisor_killed_right_after_its_spawn_leaves_one_server_that_down_stops(mc):
    """The spawned process kills the supervisor at once (as the OOM killer might). The intent was
    saved before the spawn, so the next supervisor adopts that process by its token: one server,
    which `down` stops, and its port is free."""
    flag = mc.tmp / "killed-once"
    script = f'if [ ! -e {flag} ]; then : > {flag}; kill -9 $PPID; fi; exec {sys.executable} {TOY_SERVER} --port "$1"'
    path = mc.profile({"web": {"kind": "command", "command": ["sh", "-c", script, "sh", "{port}"], "health": {"http": "/health"}}})
    res = mc.cli("up", "-p", str(path))  # it may report the supervisor's death: it saw it
    assert flag.exists() and "Traceback" not in res.stderr  # the first supervisor did die
    res = mc.cli("up", "-p", str(path))  # the next command's supervisor finds the instance by its token
    assert res.returncode == 0, res.stdout + res.stderr
    row = mc.row("web")
    assert row["state"] == "ready" and toy_pids(mc) == [row["pid"]] and row["restarts"] == 0
    res = mc.cli("down")
    assert res.returncode == 0 and "not running" not in res.stdout, res.stdout + res.stderr
    assert toy_pids(mc) == [] and _refused(row["url"])


def _refused(url: str) -> bool:
    try:
        http_get(url + "/health", timeout=1)
    except OSError:
        return True
    return False


def test_down_checks_the_port_of_a_failed_server_and_names_its_holder(mc):
    """A failed record may have left a process behind: `down` checks its port too."""
    stranger = subprocess.Popen([sys.executable, TOY_SERVER, "--port", "24911"], stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: not _refused("http://127.0.0.1:24911"), 10, what="the stranger to listen")
        path = mc.profile({"web": {"kind": "command", "command": toy(), "port": 24911, "health": {"http": "/health"}}})
        spec = load_profile(path).servers["web"]
        mc.store.save(  # as a start that failed leaves it: failed, the port its own
            ServerRecord(
                profile="test", name="web", kind="command", source=spec.source, spec=dict(spec.raw), fingerprint=spec.fingerprint,
                state=lc.FAILED, port=24911, url="http://127.0.0.1:24911",
            )
        )  # fmt: skip
        res = mc.cli("down", "web")
        assert res.returncode == 1 and f"pid {stranger.pid}" in res.stderr and "port still answers" in res.stderr, res.stdout + res.stderr
        assert stranger.poll() is None  # named, never signalled
    finally:
        stranger.kill()
        stranger.wait()


# ---------------------------------------------------------------------- a full or read-only disk
@contextlib.contextmanager
def small_disk(where: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of its own (root only; the test is skipped elsewhere)."""
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(where)], capture_output=True)
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill(disk: Path) -> None:
    with open(disk / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()


def disk_env(mc, disk: Path, leases: Path) -> dict[str, str]:
    # a wide terminal: the messages name deep temporary paths (deeper under xdist), and a message
    # wrapped by the terminal's width would read as two lines
    return {"MODELCTL_STATE_DIR": str(disk / "state"), "MODELCTL_PORT_LEASES": str(leases), "COLUMNS": "1000"}


def leases_dir(mc) -> Path:
    """A lease directory of this test's own (what it leaves there is checked). Its servers take
    ports from a range no other test uses: other tests, on other xdist workers, lease in the
    session's directory and would not see these leases."""
    d = mc.tmp / "leases"
    d.mkdir(mode=0o1777, exist_ok=True)
    os.chmod(d, 0o1777)
    return d


@pytest.mark.slow
def test_a_full_disk_still_stops_servers_and_says_what_it_could_not_record(mc):
    leases = leases_dir(mc)
    with small_disk(mc.tmp / "disk") as disk:
        env = disk_env(mc, disk, leases)
        path = mc.profile({"web": {"kind": "command", "command": toy(), "health": {"http": "/health"}}}, port_range=[24930, 24935])
        assert mc.cli("up", "-p", str(path), env=env).returncode == 0
        pid = toy_pids(mc)[0]
        record = disk / "state" / "servers" / "test" / "web.json"
        before = record.read_text()
        fill(disk)
        res = mc.cli("down", env=env)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        assert "could not say so" in res.stderr and "disk is full" in res.stderr and str(disk) in res.stderr
        wait_for(lambda: pid not in toy_pids(mc), 10, what="the server to be stopped anyway")
        assert json.loads(record.read_text()) == json.loads(before)  # never torn
        res = mc.cli("up", "-p", str(path), env=env)  # a changed start on a full disk: one line, nothing leaked
        assert (
            res.returncode != 0
            and "Traceback" not in res.stderr
            and "disk is full" in res.stderr
            and len(res.stderr.strip().splitlines()) == 1
        )
        (disk / "filler").unlink()
        res = mc.cli("status", "--json", env=env)
        assert res.returncode == 0 and json.loads(res.stdout)[0]["id"] == "test/web"
        mc.cli("down", env=env)


@pytest.mark.slow
def test_up_on_a_full_disk_fails_in_one_line_and_leaks_no_port_lease(mc):
    leases = leases_dir(mc)
    with small_disk(mc.tmp / "disk") as disk:
        env = disk_env(mc, disk, leases)
        (disk / "state").mkdir(mode=0o700)
        path = mc.profile({"web": {"kind": "command", "command": toy(), "health": {"http": "/health"}}}, port_range=[24920, 24925])
        assert mc.cli("status", env=env).returncode == 0  # lays out the state directory
        fill(disk)
        res = mc.cli("up", "-p", str(path), env=env)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "disk is full" in res.stderr and "free space" in res.stderr
        assert sorted(p.name for p in leases.iterdir() if p.name != ".lock") == []  # no lease left behind
        assert toy_pids(mc) == []


@pytest.mark.slow
def test_a_read_only_state_directory_still_stops_servers(mc):
    """The state directory seen through a read-only bind mount: every write fails with EROFS."""
    leases = leases_dir(mc)
    with small_disk(mc.tmp / "disk") as disk:
        path = mc.profile({"web": {"kind": "command", "command": toy(), "health": {"http": "/health"}}}, port_range=[24950, 24955])
        assert mc.cli("up", "-p", str(path), env=disk_env(mc, disk, leases)).returncode == 0
        pid = toy_pids(mc)[0]
        assert mc.cli("supervise", "--stop", env=disk_env(mc, disk, leases)).returncode == 0
        ro = mc.tmp / "ro"
        ro.mkdir()
        subprocess.run(["mount", "--bind", str(disk), str(ro)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
            res = mc.cli("down", env=disk_env(mc, ro, leases))
            assert res.returncode == 1 and "read-only" in res.stderr and "Traceback" not in res.stderr, res.stdout + res.stderr
            assert "test/web: terminated" in res.stdout  # what was stopped is said
            wait_for(lambda: pid not in toy_pids(mc), 10, what="the server to be stopped anyway")
        finally:
            subprocess.run(["umount", "-l", str(ro)], capture_output=True)


# ---------------------------------------------------------------------- shared directories
ENTRIES = ["fifo", "directory", "dangling-symlink", "stale-lease-of-another-user"]


@pytest.mark.parametrize("entry", ENTRIES)
def test_whatever_another_user_leaves_in_the_lease_directory_never_blocks_up(mc, entry):
    leases = leases_dir(mc)
    low = 25000 + 6 * ENTRIES.index(entry)  # a range of its own: the lease directory is this test's
    target = leases / str(low)
    if entry == "fifo":
        os.mkfifo(target)
    elif entry == "directory":
        target.mkdir()
    elif entry == "dangling-symlink":
        target.symlink_to(mc.tmp / "nowhere")
    else:
        target.write_text(json.dumps({"uid": 4242, "state_dir": "/elsewhere", "server": "x/y", "time": 0}))
        os.utime(target, (0, 0))
        if os.geteuid() == 0:
            os.chown(target, 4242, 4242)
        else:
            pytest.skip("needs root to plant another user's file")
    path = mc.profile({"web": {"kind": "command", "command": toy(), "health": {"http": "/health"}}}, port_range=[low, low + 5])
    res = mc.cli("up", "-p", str(path), env={"MODELCTL_PORT_LEASES": str(leases)}, timeout=60)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stdout + res.stderr
    port = mc.row("web")["port"]
    if entry == "stale-lease-of-another-user":
        assert port == low  # a stale lease holds its port no more
    else:
        assert low < port <= low + 5  # the odd entry holds its port; the next one is taken


def test_a_lease_taken_before_its_record_is_written_holds_its_port(tmp_path):
    """`up` leases its ports, then writes its records (after GPU discovery, under the state lock).
    Another state directory's `up` in between must not take the leased port as stale because no
    record wants it yet: both would start on one port, and one fails (issue 21's concurrent test)."""
    shared = str(tmp_path / "leases")
    first, second = PortLeases(tmp_path / "a", shared), PortLeases(tmp_path / "b", shared)
    web, port = ServerRef("lab", "web"), 25040
    assert first.take(port, web)
    assert second.holder(port, web) is not None and not second.take(port, web)  # in flight: held
    store = StateStore(tmp_path / "a")
    rec = ServerRecord(profile="lab", name="web", port=port)
    rec.wish.desired = "running"
    store.save(rec)
    assert not second.take(port, web)  # its record, written after the lease, wants it
    rec.wish.desired = "stopped"
    store.save(rec)
    assert second.holder(port, web) is None  # its record, written after the lease, says it is free
    # a lease whose `up` died before writing any record holds its port for a while only
    other = ServerRef("lab", "gone")
    assert first.take(port + 1, other)
    lease = Path(shared) / str(port + 1)
    lease.write_text(json.dumps({**json.loads(lease.read_text()), "time": time.time() - LEASE_GRACE - 1}))
    assert second.take(port + 1, other)


# ---------------------------------------------------------------------- nothing hostile reaches the terminal
@pytest.mark.slow
def test_control_sequences_from_a_server_never_reach_the_terminal(mc):
    path = mc.profile(
        {
            "bad": {"kind": "command", "command": toy("--say", HOSTILE, "--exit-code", "3"), "restart": {"max_failures": 1}},
            "sick": {"kind": "command", "command": toy("--say", HOSTILE, "--health-body", HOSTILE), "health": {"http": "/health"}, "startup_timeout": 60},
        }
    )  # fmt: skip
    res = mc.cli("up", "-p", str(path), "bad")
    assert res.returncode == 1 and ESC not in res.stdout + res.stderr and "\\x1b" in res.stderr
    mc.cli("up", "-p", str(path), "sick", "--no-wait")
    wait_for(lambda: "pwned" in (mc.row("sick")["detail"] or ""), 20, what="the hostile health body in the record")
    for args in (("status",), ("status", "test/bad"), ("status", "test/sick"), ("restart", "test/bad")):
        res = mc.cli(*args)
        assert ESC not in res.stdout + res.stderr and "\x07" not in res.stdout + res.stderr, args
        assert "pwned" in res.stdout + res.stderr, args  # shown, made visible: not dropped
    res = mc.cli("logs", "test/bad", "--raw")  # a pipe, and asked for raw: as written
    assert ESC in res.stdout


def test_logs_on_a_terminal_show_control_characters_as_escapes(mc):
    path = mc.profile({"bad": {"kind": "command", "command": toy("--say", HOSTILE)}})
    assert mc.cli("up", "-p", str(path), "--no-wait").returncode == 0
    log = mc.store.log_path(mc.ref("bad"))
    wait_for(lambda: log.exists() and "pwned" in log.read_text(), 10, what="the line in the log")
    for extra, raw in (((), False), (("--raw",), True)):
        out = run_on_a_terminal([sys.executable, "-m", "modelctl", "logs", "test/bad", *extra], mc.env)
        assert "pwned" in out and (ESC in out) == raw, (extra, out)


def run_on_a_terminal(argv: list[str], env: dict) -> str:
    leader, follower = pty.openpty()
    proc = subprocess.Popen(argv, stdout=follower, stderr=follower, env=env)
    os.close(follower)
    out = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(leader, 65536):
            out += chunk
    proc.wait(30)
    os.close(leader)
    return out.decode(errors="replace")


# ---------------------------------------------------------------------- the supervisor's own work
@pytest.mark.slow
def test_slow_stops_never_delay_probes_or_restarts(mc):
    """Eight replacements whose old instances ignore SIGTERM for 12 s run at once: a new server
    still becomes ready in time, and an unrelated crashed server is back within a few seconds."""
    slow = {
        f"slow{i}": {"kind": "command", "command": toy("--ignore-sigterm"), "health": {"http": "/health"}, "stop_timeout": 12}
        for i in range(8)
    }
    other = {"other": {"kind": "command", "command": toy(), "health": {"http": "/health"}, "restart": {"backoff": 0.2}}}
    path = mc.profile({**slow, **other})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    changed = {n: {**s, "env": {"NEW": "1"}} for n, s in slow.items()}
    fresh = {"fresh": {"kind": "command", "command": toy("--ready-delay", "1.5"), "health": {"http": "/health"}, "startup_timeout": 4}}
    path = mc.profile({**changed, **other, **fresh})
    assert mc.cli("up", "-p", str(path), "--no-wait").returncode == 0
    wait_for(lambda: sum(r.state == lc.STOPPING for r in mc.ctl.status()) == 8, 10, what="the eight slow stops")
    before = mc.row("other")
    os.kill(before["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    wait_for(lambda: (r := mc.row("other"))["state"] == "ready" and r["pid"] != before["pid"], 10, what="the crashed server back")
    assert time.monotonic() - t0 < 5
    row = wait_for(lambda: (r := mc.row("fresh"))["state"] in ("ready", "backoff", "failed") and r, 15, what="the new server")
    assert row["state"] == "ready" and row["restarts"] == 0, row
