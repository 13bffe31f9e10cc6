"""The promises a process manager must keep under faults, races and bad input — with real
processes: never signal a stranger, never lose or duplicate a server, never hang, tell a
configuration error from a crash, and refuse files and profiles that would be abused."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import BinaryIO, cast

import psutil
import pytest

from modelctl.host.process import INSTANCE_VAR
from modelctl.profile import load_profile
from modelctl.state import lifecycle as lc
from modelctl.state.record import Instance, ServerRecord
from modelctl.supervisor.client import supervisor_info

from .conftest import http_get, tagged_processes, wait_for, wait_ticks
from .test_cli import status_json, toy_pids


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def sleeper(env: dict | None = None, new_session: bool = True) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], env=env, start_new_session=new_session, stdout=subprocess.DEVNULL
    )


def instance(token: str, pid: int | None = None, create_time: float | None = None) -> Instance:
    return Instance(token=token, fingerprint="", started_at=time.time(), pid=pid, create_time=create_time)


def fake_record(mc, name: str, **fields) -> ServerRecord:
    spec = load_profile(mc.profile({name: {"kind": "command", "command": mc.toy()}})).servers[name]
    rec = ServerRecord(
        profile="test", name=name, kind="command", source=spec.source, spec=dict(spec.raw), fingerprint=spec.fingerprint, **fields
    )
    mc.store.save(rec)
    return rec


# ---------------------------------------------------------------------- never signal a stranger
def test_down_never_signals_a_process_group_whose_leader_is_not_the_recorded_one(mc):
    """After a reboot or pid reuse the recorded pid leads someone else's process group."""
    stranger = sleeper()  # a session (and group) leader, started after the "recorded" time
    try:
        created = psutil.Process(stranger.pid).create_time()
        fake_record(mc, "s", state=lc.READY, port=23999, instance=instance(uuid.uuid4().hex, stranger.pid, created - 1000))
        res = mc.cli("down", "s")
        assert res.returncode == 0, res.stderr
        assert "not running" in res.stdout
        time.sleep(0.3)
        assert stranger.poll() is None  # alive: never signalled
    finally:
        stranger.kill()
        stranger.wait()


def test_a_dead_leaders_leftovers_are_stopped_only_with_proof(mc):
    token = uuid.uuid4().hex
    leftover = sleeper({**os.environ, INSTANCE_VAR: token})  # ours: carries the instance token
    stranger = sleeper({**os.environ, INSTANCE_VAR: uuid.uuid4().hex})  # another instance's
    try:
        fake_record(mc, "s", state=lc.READY, instance=instance(token, 999_999, 1.0))
        assert mc.cli("down", "s").returncode == 0
        wait_for(lambda: leftover.poll() is not None, 10, what="the leftover to be stopped")
        assert stranger.poll() is None
    finally:
        for p in (leftover, stranger):
            p.kill()
            p.wait()


def up_with_an_escaping_daemon(mc) -> int:
    """A server whose child double-forks out of the group (and session) at once; its pid."""
    pid_file = mc.tmp / "daemon.pid"
    path = mc.profile(
        {
            "web": {
                "kind": "command",
                "command": mc.toy("--daemonize-after", "0.3", "--pid-file", str(pid_file)),
                "health": {"http": "/health"},
            }
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    return int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 10, what="the daemon"))


@pytest.mark.slow
def test_a_daemon_that_escapes_the_group_reparents_to_the_supervisor_and_is_stopped_with_it(mc):
    daemon = up_with_an_escaping_daemon(mc)
    try:
        row = mc.row("web")
        assert os.getsid(daemon) != os.getsid(row["pid"])  # it left the server's session
        sup = supervisor_info(mc.store)
        assert sup is not None
        wait_for(lambda: psutil.Process(daemon).ppid() == sup.pid, 10, what="the daemon to re-parent to the supervisor")
        res = mc.cli("down", "web")
        assert res.returncode == 0, res.stdout + res.stderr
        assert gone(daemon)
        assert http_get_fails(row["url"])
    finally:
        if not gone(daemon):
            os.kill(daemon, signal.SIGKILL)


def http_get_fails(url: str) -> bool:
    try:
        http_get(url + "/health", timeout=1)
    except OSError:
        return True
    return False


@pytest.mark.slow
def test_down_fails_and_names_the_holder_when_the_port_still_answers(mc):
    """A daemon that escaped and cleared its environment cannot be proven ours: never signalled,
    and never reported as stopped while it serves the port."""
    pid_file = mc.tmp / "daemon.pid"
    path = mc.profile(
        {
            "web": {
                "kind": "command",
                "command": mc.toy("--daemonize-after", "1", "--scrub-env", "--pid-file", str(pid_file)),
                "health": {"http": "/health", "interval": 600},  # no descendant snapshot after the first
                "startup_timeout": 20,
            }
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    daemon = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), 10, what="the daemon"))
    try:
        res = mc.cli("down", "web")
        assert res.returncode == 1
        assert f"pid {daemon}" in res.stderr and "still answers" in res.stderr, res.stderr
        assert not gone(daemon)  # not provably ours: not signalled
        assert "port still answers" in (mc.row("web")["last_error"] or "")
    finally:
        os.kill(daemon, signal.SIGKILL)


# ---------------------------------------------------------------------- never lose or duplicate
def test_a_broken_record_is_shown_never_hidden_and_up_does_not_start_a_second_copy(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    pid = mc.row("web")["pid"]
    record = mc.store.record_path(mc.ref("web"))
    data = json.loads(record.read_text())
    data["history"]["restarts"] = "many"  # wrong JSON type; pid and create_time still intact
    record.write_text(json.dumps(data))

    res = mc.cli("status")
    assert res.returncode == 0 and "Traceback" not in res.stderr
    assert "broken" in res.stdout and str(record) in res.stdout and "restarts" in res.stdout
    rows = status_json(mc, "id")
    assert rows["test/web"]["state"] == "broken" and rows["test/web"]["record"] == str(record)

    res = mc.cli("up", "-p", str(path))
    assert res.returncode != 0 and str(record) in res.stderr and "Traceback" not in res.stderr
    assert toy_pids(mc) == [pid]  # no second copy

    res = mc.cli("down", "web")  # stops the process the record still identifies
    assert res.returncode == 0 and "broken record" in res.stdout
    wait_for(lambda: gone(pid), 10, what="the server to stop")
    assert record.exists()  # left to fix or remove, never overwritten


@pytest.mark.slow
def test_the_supervisor_keeps_supervising_the_others_past_a_garbage_record(mc):
    path = mc.profile(
        {
            "good": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "restart": {"backoff": 0.1}},
            "bad": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}},
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    bad = mc.store.record_path(mc.ref("bad"))
    data = json.loads(bad.read_text())
    data["instance"]["pid"] = "not-a-pid"  # wrong JSON type where the supervisor adopts from
    bad.write_text(json.dumps(data))
    before = mc.row("good")
    os.kill(before["pid"], signal.SIGKILL)
    row = wait_for(lambda: (r := mc.row("good"))["state"] == "ready" and r["pid"] != before["pid"] and r, 20, what="a restart")
    assert row["restarts"] == 1
    assert status_json(mc, "id")["test/bad"]["state"] == "broken"
    bad.write_bytes(b'{"name": "bad", "state": "rea')  # and truncated
    before = mc.row("good")
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(lambda: (r := mc.row("good"))["state"] == "ready" and r["pid"] != before["pid"], 20, what="another restart")


@pytest.mark.slow
def test_deleting_or_replacing_the_lock_file_never_yields_two_supervisors(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    first = supervisor_info(mc.store)
    assert first is not None
    for name in ("supervisor.lock", "lock"):
        (mc.state_dir / name).unlink(missing_ok=True)
        (mc.state_dir / name).write_text("replaced")
    second = subprocess.Popen([sys.executable, "-m", "modelctl", "supervise"], env=mc.env, stderr=subprocess.PIPE, text=True)
    try:
        assert second.wait(10) == 0
        assert "another supervisor" in second.stderr.read()
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    supervisors = [p for p in tagged_processes(mc.tag) if {"supervise", "modelctl.supervisor.daemon"} & set(p.cmdline())]
    assert [p.pid for p in supervisors] == [first.pid]


def up_from_two_state_directories(mc, tmp_path: Path, path: Path, env: dict[str, str], stagger: float = 0.0) -> None:
    """`up` of one profile from two state directories at once (two users, say): both succeed, on
    two ports. `stagger`: seconds between the two starts."""
    other = {**env, "MODELCTL_STATE_DIR": str(tmp_path / "other-state")}
    cmd = [sys.executable, "-m", "modelctl", "up", "-p", str(path)]
    procs: list[subprocess.Popen[str]] = []
    for each in (env, other):
        if procs:
            time.sleep(stagger)
        procs.append(subprocess.Popen(cmd, env=each, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    try:
        assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs] + [out for out, _ in outs]  # stderr first
        ports = {mc.row("web")["port"], json.loads(mc.cli("status", "--json", env=other).stdout)[0]["port"]}
        assert len(ports) == 2
    finally:
        mc.cli("down", env=other)


@pytest.mark.slow
def test_auto_ports_are_unique_across_state_directories(mc, tmp_path):
    path = mc.profile(
        {"web": {"kind": "command", "command": mc.toy("--startup-delay", "1"), "health": {"http": "/health"}}}, port_range=[24300, 24310]
    )
    up_from_two_state_directories(mc, tmp_path, path, mc.env)


@pytest.mark.slow
def test_auto_ports_stay_unique_while_the_first_up_is_slow_to_write_its_record(mc, tmp_path):
    """The first `up` leases its port, then finds GPUs (a slow nvidia-smi here) before it writes its
    record. The second `up`, from another state directory, must not take that lease as stale."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\nsleep 2\necho 0\n")
    smi.chmod(0o755)
    env = {**mc.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    env.pop("MODELCTL_GPUS", None)
    web = {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "gpus": 1, "gpus_shared": True}
    path = mc.profile({"web": web}, port_range=[24340, 24350])
    up_from_two_state_directories(mc, tmp_path, path, env, stagger=0.7)  # the first has leased its port and waits on nvidia-smi


@pytest.mark.slow
def test_a_port_held_by_a_server_in_backoff_is_not_handed_out(mc, tmp_path):
    other = {**mc.env, "MODELCTL_STATE_DIR": str(tmp_path / "other-state")}
    crashing = mc.profile(
        {"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "restart": {"backoff": 60}}},
        name="crashing",
        port_range=[24320, 24330],
    )
    assert mc.cli("up", "-p", str(crashing)).returncode == 0
    held = mc.row("web")
    os.kill(held["pid"], signal.SIGKILL)
    wait_for(lambda: mc.row("web")["state"] == "backoff", 10, what="backoff")
    newcomer = mc.profile(
        {"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}}, name="newcomer", port_range=[24320, 24330]
    )
    try:
        assert mc.cli("up", "-p", str(newcomer), env=other).returncode == 0
        taken = json.loads(mc.cli("status", "--json", env=other).stdout)[0]["port"]
        assert taken != held["port"]
    finally:
        mc.cli("down", env=other)


@pytest.mark.slow
def test_concurrent_up_down_restart_never_print_a_traceback(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "stop_timeout": 2}})
    outputs = []

    def run(*args: str) -> None:
        res = mc.cli(*args, timeout=120)
        outputs.append((args, res.returncode, res.stdout + res.stderr))

    for _ in range(8):
        threads = [
            threading.Thread(target=run, args=a)
            for a in (("up", "-p", str(path)), ("down",), ("restart", "web", "--no-wait"), ("up", "-p", str(path)))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    bad = [(a, rc, out) for a, rc, out in outputs if "Traceback" in out or "TransitionError" in out]
    assert bad == []
    assert mc.cli("up", "-p", str(path)).returncode == 0
    wait_ticks(mc.state_dir, 3)
    assert len(toy_pids(mc)) == 1  # never duplicated


# ---------------------------------------------------------------------- never hang
@pytest.mark.slow
def test_a_held_state_lock_makes_commands_fail_fast_and_name_the_holder(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}})
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from modelctl.state.store import StateStore; import time; s = StateStore({str(mc.state_dir)!r}); c = s.locked(); c.__enter__(); print('held', flush=True); time.sleep(120)",
        ],
        env=mc.env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        env = {"MODELCTL_LOCK_TIMEOUT": "1"}
        for args in (("up", "-p", str(path)), ("down",)):
            t0 = time.monotonic()
            res = mc.cli(*args, env=env, timeout=30)
            assert time.monotonic() - t0 < 15
            assert res.returncode != 0 and f"pid {holder.pid}" in res.stderr and "locked" in res.stderr, res.stderr
        res = mc.cli("status", env=env, timeout=30)  # reads without the lock
        assert res.returncode == 0
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_status_says_when_the_supervisor_does_not_respond(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    sup = supervisor_info(mc.store)
    assert sup is not None and sup.responding and sup.pid is not None
    os.kill(sup.pid, signal.SIGSTOP)
    try:
        res = wait_for(
            lambda: (r := mc.cli("status", timeout=30)) and "NOT RESPONDING" in r.stdout and r, 20, interval=0.5, what="NOT RESPONDING"
        )
        assert res.returncode == 0 and f"pid {sup.pid} NOT RESPONDING" in res.stdout, res.stdout
        res = mc.cli("supervise", "--stop", "--timeout", "1", timeout=30)
        assert res.returncode != 0 and "did not stop" in res.stderr  # never "stopped" after a timeout
    finally:
        os.kill(sup.pid, signal.SIGCONT)


@pytest.mark.slow
def test_no_stop_runs_under_the_state_lock(mc):
    """The supervisor cleans up after a crash (children that ignore SIGTERM) outside the lock."""
    path = mc.profile(
        {
            "web": {
                "kind": "command",
                "command": mc.toy("--spawn-child"),
                "health": {"http": "/health"},
                "stop_timeout": 3,
                "restart": {"backoff": 0.1},
            }
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    row = mc.row("web")
    os.kill(row["pid"], signal.SIGKILL)
    waits = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        with mc.store.locked(timeout=30):
            pass
        waits.append(time.monotonic() - t0)
        time.sleep(0.05)
    assert max(waits) < 1.0, max(waits)
    wait_for(lambda: (r := mc.row("web"))["state"] == "ready" and r["pid"] != row["pid"], 20, what="the restart")


@pytest.mark.slow
def test_ctrl_c_of_down_acts_at_once_and_the_supervisor_finishes_the_stop(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy("--ignore-sigterm"), "health": {"http": "/health"}, "stop_timeout": 4}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    pid = mc.row("web")["pid"]
    down = subprocess.Popen(
        [sys.executable, "-m", "modelctl", "down"], env=mc.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: mc.record("web").state == lc.STOPPING, 10, what="the stop to begin")
    t0 = time.monotonic()
    down.send_signal(signal.SIGINT)
    _out, err = down.communicate(timeout=10)
    assert time.monotonic() - t0 < 2
    assert down.returncode == 130 and "Traceback" not in err, err
    wait_for(lambda: gone(pid), 20, what="the supervisor to finish the stop")
    wait_for(lambda: mc.row("web")["state"] == "stopped", 10, what="the record to say stopped")


# ---------------------------------------------------------------------- configuration errors
def test_an_import_error_fails_at_once_without_a_crash_loop(mc):
    path = mc.profile(
        {
            "py": {
                "kind": "command",
                "command": [sys.executable, "-c", "import modelctl_no_such_module", "{port}"],
                "restart": {"backoff": 0.2, "max_failures": 5},
            }
        }
    )
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 1
    row = mc.row("py")
    assert row["state"] == "failed" and row["restarts"] == 0 and len(row["exits"]) == 1
    assert row["exits"][0]["class"] == "import-error" and "No module named" in row["last_error"]
    assert "configuration error" in res.stdout + res.stderr and "No module named" in res.stdout + res.stderr


def test_an_unknown_argument_and_a_missing_executable_fail_at_once(mc):
    path = mc.profile(
        {
            "badarg": {"kind": "command", "command": mc.toy("--no-such-flag"), "restart": {"backoff": 0.2}},
            "noexe": {"kind": "command", "command": ["/nonexistent/llama-server", "--port", "{port}"]},
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 1
    badarg, noexe = mc.row("badarg"), mc.row("noexe")
    assert badarg["state"] == "failed" and badarg["restarts"] == 0 and badarg["exits"][0]["class"] == "bad-argument"
    assert noexe["state"] == "failed" and "missing-executable" in noexe["last_error"]


def test_a_crash_that_can_heal_is_still_retried(mc):
    path = mc.profile({"c": {"kind": "command", "command": mc.toy("--exit-code", "1"), "restart": {"backoff": 0.1, "max_failures": 3}}})
    assert mc.cli("up", "-p", str(path)).returncode == 1
    row = mc.row("c")
    assert row["state"] == "failed" and row["restarts"] == 2 and "crash loop" in row["detail"]


# ---------------------------------------------------------------------- files
def test_logs_are_never_written_through_a_symlink(mc):
    target = mc.tmp / "precious.txt"
    target.write_text("do not touch\n")
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "restart": {"backoff": 0.1, "max_failures": 2}}})
    log = mc.store.log_path(mc.ref("web"))
    log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mc.store.ensure(log.parent)
    log.symlink_to(target)
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 1
    assert target.read_text() == "do not touch\n"
    assert "symbolic link" in mc.row("web")["last_error"] or "Too many levels" in mc.row("web")["last_error"]


def test_the_supervisor_log_is_never_written_through_a_symlink(mc):
    target = mc.tmp / "precious.txt"
    target.write_text("do not touch\n")
    mc.store.ensure()
    (mc.state_dir / "supervisor.log").symlink_to(target)
    path = mc.profile({"web": {"kind": "command", "command": mc.toy()}})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert target.read_text() == "do not touch\n"


@pytest.mark.parametrize("problem", ["symlink", "world-writable", "group-writable-subdir"])
def test_a_state_directory_others_could_tamper_with_is_refused_not_fixed(mc, tmp_path, problem):
    real = tmp_path / "real-state"
    real.mkdir(mode=0o700)
    state = real
    if problem == "symlink":
        state = tmp_path / "linked-state"
        state.symlink_to(real)
    elif problem == "world-writable":
        os.chmod(real, 0o777)
    else:
        (real / "servers").mkdir(mode=0o700)
        os.chmod(real / "servers", 0o770)
    path = mc.profile({"web": {"kind": "command", "command": mc.toy()}})
    res = mc.cli("up", "-p", str(path), env={"MODELCTL_STATE_DIR": str(state)})
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert ("symlink" if problem == "symlink" else "writable by other users") in res.stderr
    assert stat.S_IMODE(real.stat().st_mode) == (0o777 if problem == "world-writable" else 0o700)  # never chmod-ed
    assert toy_pids(mc) == []


@pytest.mark.slow
def test_server_logs_are_rotated_at_their_size_cap(mc):
    path = mc.profile(
        {
            "chatty": {
                "kind": "command",
                "command": mc.toy("--spam", "400000"),
                "health": {"http": "/health"},
                "log": {"max_bytes": "64KiB", "keep": 2},
            }
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    log = mc.store.log_path(mc.ref("chatty"))
    wait_for(lambda: log.with_name(log.name + ".2").exists(), 30, what="two rotations")
    time.sleep(1)
    sizes = [p.stat().st_size for p in log.parent.glob(log.name + "*")]
    assert len(sizes) == 3  # NAME.log, .1, .2: never more than keep
    # each part is bounded by the cap plus what a second of output adds before the next check
    assert max(sizes) < 64 * 1024 + 6 * 400_000


def test_logs_n_reads_from_the_end_of_a_big_log_and_cuts_long_lines(mc):
    from modelctl.host.logfiles import MAX_LINE, tail_lines

    big = mc.tmp / "big.log"
    with open(big, "wb") as f:
        f.truncate(150 * 1024 * 1024)  # 150 MB that nobody should read
        f.seek(0, os.SEEK_END)
        f.write(b"\nfirst\n" + b"L" * (5 * 1024 * 1024) + b"\nlast\n")

    class Counting:
        def __init__(self, f):
            self.f, self.read_bytes = f, 0

        def seek(self, *a):
            return self.f.seek(*a)

        def tell(self):
            return self.f.tell()

        def read(self, n=-1):
            data = self.f.read(n)
            self.read_bytes += len(data)
            return data

    with open(big, "rb") as src:
        counting = Counting(src)
        lines = tail_lines(cast(BinaryIO, counting), 2)
    assert lines[-1] == "last" and len(lines[0]) < MAX_LINE + 100 and "more bytes cut" in lines[0]
    assert counting.read_bytes < 1024 * 1024


# ---------------------------------------------------------------------- the supervisor is a subreaper
@pytest.mark.slow
def test_escaped_daemons_are_reaped_by_the_supervisor(mc):
    daemon = up_with_an_escaping_daemon(mc)
    sup = supervisor_info(mc.store)
    assert sup is not None
    wait_for(lambda: psutil.Process(daemon).ppid() == sup.pid, 10, what="re-parenting")
    os.kill(daemon, signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(daemon), 15, what="the supervisor to reap the daemon")  # no zombie left


@pytest.mark.slow
def test_a_supervisor_woken_the_moment_it_starts_keeps_running(mc):
    """Commands wake the supervisor (SIGUSR1) as soon as supervisor.json appears; a wake-up that
    arrives before the supervisor's handlers are in place must not end it."""
    info = mc.state_dir / "supervisor.json"
    for attempt in range(12):
        proc = subprocess.Popen([sys.executable, "-m", "modelctl", "supervise", "--stay"], env=mc.env, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 20
            while not info.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.0005)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            assert proc.poll() is None, f"attempt {attempt}: the supervisor died on an early wake-up ({proc.returncode})"
        finally:
            proc.terminate()
            proc.wait(10)


def test_a_sentence_server_whose_model_is_missing_fails_at_once_with_the_cause(mc):
    """Before: five attempts and 81 s of backoff for a model that will never appear."""
    path = mc.profile({"emb": {"kind": "sentence", "model": str(mc.tmp / "no-such-model"), "restart": {"backoff": 1, "max_failures": 5}}})
    t0 = time.monotonic()
    res = mc.cli("up", "-p", str(path))
    elapsed = time.monotonic() - t0
    assert res.returncode == 1
    row = mc.row("emb")
    assert row["state"] == "failed" and row["restarts"] == 0 and len(row["exits"]) == 1
    assert row["last_exit"] == {"code": 78, "signal": None, "description": "exit code 78"} and row["exits"][0]["class"] == "config"
    assert "does not exist" in row["last_error"] and "configuration error" in res.stdout + res.stderr
    assert elapsed < 20  # one attempt, no backoff


@pytest.mark.slow
def test_a_hub_model_that_is_not_available_offline_fails_at_once(mc):
    path = mc.profile({"emb": {"kind": "sentence", "model": "modelctl-test/no-such-model", "env": {"HF_HUB_OFFLINE": "1"}}})
    res = mc.cli("up", "-p", str(path), timeout=300)
    assert res.returncode == 1
    row = mc.row("emb")
    assert (
        row["state"] == "failed"
        and row["restarts"] == 0
        and row["last_exit"] == {"code": 78, "signal": None, "description": "exit code 78"}
    )
