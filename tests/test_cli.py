"""The core commands against real processes, real ports and real HTTP."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import time

import psutil
import pytest

from modelctl.control import Scope
from modelctl.profile import load_profile
from modelctl.state import lifecycle as lc
from modelctl.state.record import Instance, ServerRecord

from .conftest import http_get, tagged_processes, wait_for, wait_ticks


def toy_pids(mc, name_flag: str | None = None) -> list[int]:
    """Live toy servers started for this test."""
    out = []
    for p in tagged_processes(mc.tag):
        try:
            cmd = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if any(c.endswith("toy_server.py") for c in cmd) and (name_flag is None or name_flag in cmd):
            out.append(p.pid)
    return out


def status_json(mc, key: str = "name") -> dict:
    """Status rows by server name (single-profile tests) or by `id` (profile/server), read in
    process: the rows `status --json` prints (that output is checked in the round-trip test)."""
    rows = [r.to_json() for r in mc.ctl.status()]
    by_key = {r[key]: r for r in rows}
    assert len(by_key) == len(rows), f"{key} is not unique: {[r['id'] for r in rows]}"
    return by_key


def cli_status_json(mc) -> list[dict]:
    res = mc.cli("status", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def listen_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_up_status_down_round_trip(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    printed = cli_status_json(mc)
    assert [r["id"] for r in printed] == ["test/web"]
    rows = status_json(mc)
    assert rows["web"]["pid"] == printed[0]["pid"]
    web = rows["web"]
    assert {"name", "kind", "state", "pid", "port", "url", "gpus", "restarts"} <= set(web)
    assert web["state"] == "ready" and web["kind"] == "command" and web["restarts"] == 0
    assert web["url"] in res.stdout
    assert http_get(web["url"] + "/health")[0] == 200
    assert http_get(web["url"] + "/info")[1]["pid"] == web["pid"]

    human = mc.cli("status")
    assert "web" in human.stdout and "ready" in human.stdout and str(web["port"]) in human.stdout

    res = mc.cli("down")
    assert res.returncode == 0, res.stderr
    assert not psutil.pid_exists(web["pid"]) or psutil.Process(web["pid"]).status() == psutil.STATUS_ZOMBIE
    assert toy_pids(mc) == []
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no holder
    s.bind(("127.0.0.1", web["port"]))  # the port is free again
    s.listen()
    s.close()
    assert status_json(mc)["web"]["state"] == "stopped"
    wait_for(lambda: not (mc.state_dir / "supervisor.json").exists(), 10, what="the supervisor to exit after down")


def test_up_is_idempotent(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    pid = status_json(mc)["web"]["pid"]
    again = mc.cli("up", "-p", str(path))
    assert again.returncode == 0 and "already running" in again.stdout
    assert status_json(mc)["web"]["pid"] == pid
    assert toy_pids(mc) == [pid]


def test_up_with_a_changed_spec_replaces_the_server(mc):
    spec = {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "env": {"TOY_VALUE": "one"}}
    path = mc.profile({"web": spec})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    before = status_json(mc)["web"]
    spec["env"]["TOY_VALUE"] = "two"
    path = mc.profile({"web": spec})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    after = status_json(mc)["web"]
    assert after["pid"] != before["pid"] and after["port"] == before["port"]
    assert http_get(after["url"] + "/info")[1]["env"]["TOY_VALUE"] == "two"
    assert toy_pids(mc) == [after["pid"]]


def test_a_port_in_use_names_its_holder_and_starts_nothing(mc):
    holder = listen_socket()
    port = holder.getsockname()[1]
    try:
        path = mc.profile(
            {
                "ok": {"kind": "command", "command": mc.toy()},
                "web": {"kind": "command", "command": mc.toy(), "port": port},
            }
        )
        res = mc.cli("up", "-p", str(path))
        assert res.returncode != 0
        assert f"port {port}" in res.stderr and f"pid {os.getpid()}" in res.stderr, res.stderr
        assert "server 'web'" in res.stderr and "key 'port'" in res.stderr
        assert toy_pids(mc) == []  # nothing started, not even the server whose port was free
    finally:
        holder.close()


@pytest.mark.slow
def test_auto_ports_are_distinct_in_range_and_kept(mc):
    path = mc.profile(
        {
            "a": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}},
            "b": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}},
        },
        port_range=[23100, 23199],
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    rows = status_json(mc)
    ports = {rows["a"]["port"], rows["b"]["port"]}
    assert len(ports) == 2 and all(23100 <= p <= 23199 for p in ports)
    for name in ("a", "b"):
        assert http_get(rows[name]["url"] + "/info")[1]["port"] == rows[name]["port"]
    assert mc.cli("restart", "a").returncode == 0
    assert mc.cli("down").returncode == 0
    assert mc.cli("up", "-p", str(path)).returncode == 0
    again = status_json(mc)
    assert again["a"]["port"] == rows["a"]["port"] and again["b"]["port"] == rows["b"]["port"]


@pytest.mark.slow
def test_gpus_are_assigned_exclusively_and_exported(mc):
    env = {"MODELCTL_GPUS": "0,1,2"}
    path = mc.profile(
        {
            "two": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "gpus": 2},
            "pinned": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "gpus": [2]},
            "cpu": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}},
        }
    )
    res = mc.cli("up", "-p", str(path), env=env)
    assert res.returncode == 0, res.stderr
    rows = status_json(mc)
    seen = {n: http_get(rows[n]["url"] + "/info")[1]["env"]["CUDA_VISIBLE_DEVICES"] for n in rows}
    assert seen == {"two": "0,1", "pinned": "2", "cpu": ""}
    assert rows["two"]["gpus"] == [0, 1] and rows["pinned"]["gpus"] == [2]

    more = mc.profile({"extra": {"kind": "command", "command": mc.toy(), "gpus": 1}}, name="more")
    res = mc.cli("up", "-p", str(more), env=env)
    assert res.returncode != 0 and "needs 1 GPU(s) but only 0 free" in res.stderr
    assert "extra" not in status_json(mc)


def test_too_few_gpus_fails_before_anything_starts(mc):
    path = mc.profile(
        {
            "a": {"kind": "command", "command": mc.toy(), "gpus": 1},
            "b": {"kind": "command", "command": mc.toy(), "gpus": 1},
        }
    )
    res = mc.cli("up", "-p", str(path), env={"MODELCTL_GPUS": "0"})
    assert res.returncode != 0 and "server 'test/b' needs 1 GPU(s)" in res.stderr
    assert toy_pids(mc) == [] and mc.store.load_all() == []


def test_no_gpus_on_the_machine_fails_for_a_gpu_server_but_not_for_cpu_ones(mc):
    path = mc.profile({"g": {"kind": "command", "command": mc.toy(), "gpus": 1}})
    res = mc.cli("up", "-p", str(path), env={"MODELCTL_GPUS": ""})
    assert res.returncode != 0 and "GPUs: none" in res.stderr
    cpu = mc.profile({"c": {"kind": "command", "command": mc.toy()}}, name="cpu")
    assert mc.cli("up", "-p", str(cpu), env={"MODELCTL_GPUS": ""}).returncode == 0


def test_a_reused_pid_is_reported_stopped_and_never_signalled(mc):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        spec = load_profile(mc.profile({"s": {"kind": "command", "command": mc.toy()}})).servers["s"]
        mc.store.save(
            ServerRecord(
                profile="test", name="s", kind="command", source=spec.source, spec=dict(spec.raw), fingerprint=spec.fingerprint,
                state=lc.READY, port=23999, url="http://127.0.0.1:23999",
                instance=Instance(token="t", fingerprint=spec.fingerprint, started_at=time.time(), pid=bystander.pid,
                                  create_time=psutil.Process(bystander.pid).create_time() - 1000),
            )
        )  # fmt: skip
        row = mc.row("s")
        assert row["state"] == "stopped" and row["pid"] is None
        mc.ctl.down(Scope(names=("s",)))
        assert bystander.poll() is None  # still alive: not ours, not signalled
    finally:
        bystander.kill()
        bystander.wait()


def test_two_concurrent_ups_start_one_server(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy("--startup-delay", "0.5"), "health": {"http": "/health"}}})
    cmd = [sys.executable, "-m", "modelctl", "up", "-p", str(path)]
    procs = [subprocess.Popen(cmd, env=mc.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    wait_ticks(mc.state_dir, 2)  # a duplicate would be started within a tick
    assert len(toy_pids(mc)) == 1
    assert status_json(mc)["web"]["pid"] == toy_pids(mc)[0]


@pytest.mark.slow
def test_down_ends_a_server_that_ignores_sigterm_and_its_grandchild(mc):
    path = mc.profile(
        {
            "stubborn": {
                "kind": "command",
                "command": mc.toy("--ignore-sigterm", "--spawn-child"),
                "health": {"http": "/health"},
                "stop_timeout": 1,
            }
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    info = http_get(status_json(mc)["stubborn"]["url"] + "/info")[1]
    family = [info["pid"], *info["children"]]
    assert all(psutil.pid_exists(p) for p in family)
    res = mc.cli("down", "stubborn")
    assert res.returncode == 0 and "killed" in res.stdout
    for pid in family:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_bad_profile_is_a_clear_error_without_traceback(mc):
    path = mc.tmp / "bad.yaml"
    path.write_text("servers:\n  web:\n    kind: command\n    command: [x]\n    prot: 80\n")
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 2
    assert str(path) in res.stderr and "server 'web'" in res.stderr and "key 'prot'" in res.stderr
    assert "Traceback" not in res.stderr


def test_text_from_paths_and_servers_is_printed_as_it_is_never_as_markup(mc):
    """Paths and server errors may hold `[...]`: printed verbatim, never eaten as style or a traceback."""
    missing = mc.tmp / "[/x] [red]p.yaml"
    res = mc.cli("up", "-p", str(missing))
    assert res.returncode == 2 and "[/x] [red]p.yaml" in res.stderr and "Traceback" not in res.stderr, res.stderr
    exe = str(mc.tmp / "[/bin]" / "[red]server")
    path = mc.profile({"web": {"kind": "command", "command": [exe, "{port}"], "health": {"tcp": True}}})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 1 and "[/bin]/[red]server" in res.stderr and "Traceback" not in res.stderr, res.stderr
    for args in (["status"], ["status", "web"]):
        res = mc.cli(*args)
        assert res.returncode == 0 and "[/bin]/[red]server" in res.stdout.replace("\n", ""), res.stdout + res.stderr


def test_an_unknown_server_name_is_refused(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy()}})
    res = mc.cli("up", "-p", str(path), "nosuch")
    assert res.returncode == 2 and "no server named 'nosuch'" in res.stderr and "web" in res.stderr


def test_up_names_a_server_that_cannot_start_and_shows_its_log(mc):
    path = mc.profile(
        {"broken": {"kind": "command", "command": mc.toy("--exit-code", "3"), "restart": {"backoff": 0.1, "max_failures": 2}}}
    )
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 1
    assert "broken is not ready" in res.stderr and "exit code 3" in res.stderr
    assert "exiting on purpose" in res.stderr  # the server's own last log lines


def test_logs_show_the_server_output(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy()}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    res = mc.cli("logs", "web", "-n", "5")
    assert res.returncode == 0 and "toy server pid" in res.stdout


def test_logs_n_reads_across_a_rotation(mc):
    """Right after a rotation the current log is empty and the newest lines are in NAME.log.1."""
    path = mc.profile({"web": {"kind": "command", "command": mc.toy()}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    log = mc.store.log_path(mc.ref("web"))
    wait_for(lambda: "toy server pid" in log.read_text(), 10, what="the server's first line")
    older = log.with_name(log.name + ".2")
    older.write_text("".join(f"older {i}\n" for i in range(10)))
    newer = log.with_name(log.name + ".1")
    newer.write_text(log.read_text() + "".join(f"newer {i}\n" for i in range(3)))
    os.chmod(older, 0o600)
    os.chmod(newer, 0o600)
    os.truncate(log, 0)  # what copytruncate rotation leaves
    res = mc.cli("logs", "web", "-n", "5")
    assert res.returncode == 0
    assert res.stdout.splitlines()[-3:] == ["newer 0", "newer 1", "newer 2"] and len(res.stdout.splitlines()) == 5
    res = mc.cli("logs", "web", "-n", "1000")
    lines = res.stdout.splitlines()
    assert lines[:10] == [f"older {i}" for i in range(10)] and lines[-1] == "newer 2"  # oldest part first


def test_a_truncated_record_makes_down_say_what_it_cannot_prove(mc):
    """A record cut short names no process: `down` says it cannot prove which process is the
    server, names the file, and fails; it never says "not running" while the server serves."""
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    url = mc.row("web")["url"]
    record = mc.store.record_path(mc.ref("web"))
    text = record.read_text()
    record.write_text(text[: len(text) // 3])
    res = mc.cli("down", "test/web")
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert "not running" not in res.stdout + res.stderr
    assert "cannot read the record, so cannot prove which process is the server" in res.stderr and str(record) in res.stderr
    assert http_get(url + "/health")[0] == 200  # never signalled without proof


def test_state_directory_and_logs_are_private(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy()}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    assert stat.S_IMODE(mc.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(mc.store.log_path(mc.ref("web")).stat().st_mode) == 0o600
    assert stat.S_IMODE(mc.store.record_path(mc.ref("web")).stat().st_mode) == 0o600


@pytest.mark.parametrize("args", [["--help"], ["status"], ["status", "--json"]])
def test_the_cli_does_not_import_model_libraries(mc, args):
    code = (
        "import sys\n"
        "from modelctl.cli import app\n"
        "try:\n"
        f"    app({args!r}, standalone_mode=False)\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'sentence_transformers', 'fastapi', 'transformers', 'numpy'})\n"
        "print('HEAVY', heavy, file=sys.stderr)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=mc.env, timeout=60)
    assert "HEAVY []" in res.stderr, res.stderr


def test_up_discovers_gpus_and_probes_ports_without_holding_the_state_lock(mc, monkeypatch):
    """GPU discovery (nvidia-smi: up to 10 s) and port probing happen before the lock is taken:
    another command waiting for the lock never waits for them."""
    import threading

    from modelctl import control

    discovering = threading.Event()

    def slow_discovery() -> list[int]:
        discovering.set()
        time.sleep(3)
        return [0]

    monkeypatch.setattr(control, "discover_gpus", slow_discovery)
    monkeypatch.setattr(control, "ensure_supervisor", lambda store: 0)  # no supervisor: only the planning is looked at
    path = mc.profile({"g": {"kind": "command", "command": mc.toy(), "gpus": 1}})
    up = threading.Thread(target=mc.ctl.up, args=(load_profile(path),))
    up.start()
    try:
        assert discovering.wait(10)
        t0 = time.monotonic()
        with mc.store.locked(timeout=1.0):
            pass
        assert time.monotonic() - t0 < 1.0
    finally:
        up.join(30)
    assert mc.record("g", "test").gpus == [0]
