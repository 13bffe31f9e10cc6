"""systemd: units for every example profile pass `systemd-analyze verify`; `modelctl run`
notifies READY=1 only once the server is healthy and takes the whole group down on SIGTERM."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from modelctl.cluster.systemd import generate_units, write_units
from modelctl.profile import load_profile
from modelctl.state.store import StateStore

from .conftest import ROOT, http_get, http_post, wait_for
from .sentence_fixtures import free_port

PROFILES = [*sorted((ROOT / "profiles" / "examples").glob("*.yaml")), ROOT / "profiles" / "default.yaml"]


@contextlib.contextmanager
def run_as_systemd_would(mc, path: Path, env: dict | None = None, capture: bool = False) -> Iterator[subprocess.Popen]:
    """`modelctl run web -p PATH`, the command a generated unit runs; stopped when the test ends, pass or fail."""
    out = subprocess.PIPE if capture else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelctl", "run", "web", "-p", str(path)],
        env=env or mc.env, stdout=out, stderr=subprocess.STDOUT if capture else subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()


def wait_ready(mc) -> dict:
    return wait_for(lambda: (r := mc.row("web") if mc.record("web", "sd") else None) and r["state"] == "ready" and r, 60, what="ready")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_units_for_every_example_profile_pass_systemd_analyze_verify(tmp_path, monkeypatch, path):
    monkeypatch.setenv("MODELCTL_GPUS", "0,1,2,3")
    profile = load_profile(path)
    units = generate_units(profile, StateStore(tmp_path / "state"), user=False)
    files = write_units(units, tmp_path / "units")
    res = subprocess.run(["systemd-analyze", "verify", *map(str, files)], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr
    assert f"modelctl-{profile.name}.target" in units
    for spec in profile.servers.values():
        text = units[f"modelctl-{profile.name}-{spec.name}.service"]
        assert "Type=notify" in text and "KillMode=control-group" in text and "Restart=on-failure" in text
        assert f"TimeoutStartSec={int(spec.startup_timeout) + 30}" in text
        assert f"TimeoutStopSec={int(spec.stop_timeout) + 5}" in text
        assert f"StartLimitBurst={spec.restart.max_failures}" in text
        assert re.search(r"^Environment=\"?CUDA_VISIBLE_DEVICES=", text, re.M)
        if spec.gpu_count:
            assert re.search(r"CUDA_VISIBLE_DEVICES=\d", text)
        for key, value in spec.env.items():
            assert f"{key}={value}" in text
        if spec.port is not None:
            assert f"--port {spec.port}" in text


def test_an_auto_port_is_written_into_the_unit(tmp_path):
    path = tmp_path / "auto.yaml"
    path.write_text("port_range: [24100, 24199]\nservers:\n  web:\n    kind: command\n    command: [x, '{port}']\n")
    text = generate_units(load_profile(path), StateStore(tmp_path / "state"))["modelctl-auto-web.service"]
    port = int(re.search(r"--port (\d+)", text).group(1))
    assert 24100 <= port <= 24199


class NotifySocket:
    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def wait_for(self, text: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, msg in self.messages:
                if text in msg.split("\n"):
                    return when
            try:
                data = self.sock.recv(4096)
                self.messages.append((time.monotonic(), data.decode()))
            except TimeoutError:
                continue
        raise AssertionError(f"no {text!r} within {timeout}s; got {self.messages}")


@pytest.mark.slow
def test_run_notifies_ready_only_once_healthy_and_sigterm_stops_the_group(mc):
    path = mc.profile(
        {
            "web": {
                "kind": "command",
                "command": mc.toy("--ready-delay", "1.5", "--spawn-child"),
                "health": {"http": "/health"},
                "stop_timeout": 3,
            }
        },
        name="sd",
    )
    notify = NotifySocket(mc.tmp / "notify.sock")
    t0 = time.monotonic()
    with run_as_systemd_would(mc, path, env={**mc.env, "NOTIFY_SOCKET": str(mc.tmp / "notify.sock")}, capture=True) as proc:
        ready_at = notify.wait_for("READY=1", 60)
        row = mc.row("web")
        assert http_get(row["url"] + "/health")[0] == 200  # healthy when READY=1 arrived
        assert ready_at - t0 >= 1.5  # not before the server's own warm-up
        assert row["state"] == "ready" and row["managed_by"] == "systemd"
        info = http_get(row["url"] + "/info")[1]
        family = [info["pid"], *info["children"]]
        logs = mc.cli("logs", "web")
        assert "journalctl -u modelctl-sd-web.service" in logs.stdout

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        notify.wait_for("STOPPING=1", 5)
        for pid in family:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert mc.row("web")["state"] == "stopped"


def test_run_exits_with_failure_when_its_server_dies(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}}, name="sd")
    with run_as_systemd_would(mc, path, capture=True) as proc:
        os.kill(wait_ready(mc)["pid"], signal.SIGKILL)
        assert proc.wait(30) == 1  # systemd's Restart=on-failure takes it from here
        assert "killed by SIGKILL" in proc.stdout.read()


def test_up_refuses_a_server_that_systemd_runs(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}}, name="sd")
    with run_as_systemd_would(mc, path):
        wait_ready(mc)
        res = mc.cli("up", "-p", str(path))
        assert res.returncode != 0 and "systemd" in res.stderr


def test_a_path_with_a_newline_cannot_inject_unit_directives(tmp_path):
    evil_dir = tmp_path / "x\nExecStartPre=touch pwned\n[Install]"
    evil_dir.mkdir()
    path = evil_dir / "p.yaml"
    path.write_text("servers:\n  web:\n    kind: command\n    command: [x, '{port}']\n")
    from modelctl.errors import ModelctlError

    with pytest.raises(ModelctlError, match="newline or control character"):
        generate_units(load_profile(path), StateStore(tmp_path / "state"))


def test_down_leaves_a_server_that_systemd_runs_to_systemctl(mc):
    """systemd would start it again at once: down refuses it by name and skips it otherwise."""
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}}, name="sd")
    with run_as_systemd_would(mc, path):
        wait_ready(mc)
        pid = mc.row("web")["pid"]
        res = mc.cli("down", "sd/web")
        assert res.returncode == 1 and "systemctl" in res.stderr and "modelctl-sd-web.service" in res.stderr
        res = mc.cli("down")
        assert res.returncode == 0 and "sd/web: runs under systemd; not touched" in res.stdout
        assert psutil.pid_exists(pid) and mc.row("web")["state"] == "ready"


def test_a_socket_unit_holds_the_socket_that_modelctl_run_hands_to_the_server(mc):
    """What systemd does with the .socket unit, done by the test: it binds the port and starts
    `modelctl run` with the socket at fd 3 (LISTEN_FDS=1, LISTEN_PID); the server serves from it,
    and while the service is down (between systemd's restarts) a client waits in the backlog."""
    from modelctl.host.sockets import Listener, activation_argv, activation_env

    from .test_sockets import listen_server

    path = mc.profile({"web": listen_server()}, port_range=[24960, 24969], name="sd")
    units = generate_units(load_profile(path), mc.store)
    port = int(re.search(r"ListenStream=127.0.0.1:(\d+)", units["modelctl-sd-web.socket"]).group(1))
    assert "Requires=modelctl-sd-web.socket" in units["modelctl-sd-web.service"] and f"--port {port}" in units["modelctl-sd-web.service"]
    held = Listener.bind("127.0.0.1", port)  # what systemd does with the .socket unit
    path = mc.profile({"web": {**listen_server(), "port": port}}, name="sd")  # the port the unit resolved

    log = open(mc.tmp / "run.log", "w")

    def run() -> subprocess.Popen:
        argv = activation_argv([sys.executable, "-m", "modelctl", "run", "web", "-p", str(path)], held.fileno())
        return subprocess.Popen(argv, env={**mc.env, **activation_env()}, pass_fds=(held.fileno(),), stdout=log, stderr=subprocess.STDOUT)

    first = run()
    try:
        row = wait_ready(mc)
        assert row["socket"] == "held" and http_post(f"http://127.0.0.1:{held.port}/call", {})[0] == 200
        os.kill(row["pid"], signal.SIGKILL)  # the server dies: `modelctl run` exits, systemd would restart it
        assert first.wait(30) != 0
        waiting = ThreadPoolExecutor(1).submit(http_post, f"http://127.0.0.1:{held.port}/call", {}, 60)
        time.sleep(1.0)
        assert not waiting.done()  # waits in the backlog: not refused
        second = run()
        try:
            status, body, _ = waiting.result(60)
            assert status == 200 and body["pid"] != row["pid"]
        finally:
            second.terminate()
            second.wait(30)
    finally:
        if first.poll() is None:
            first.terminate()
            first.wait(30)
        held.close()


def test_systemd_starts_an_on_demand_server_at_its_first_connection_and_it_exits_when_idle(mc):
    """The .socket unit has [Install], the service none: systemd starts the service when a client
    connects (here the test does); `modelctl run` starts the server at once, and exits 0 after
    idle_timeout without a request, until systemd sees the next client."""
    from modelctl.host.sockets import Listener, activation_argv, activation_env

    from .test_sockets import listen_server

    server = {**listen_server(), "start": "on-demand", "idle_timeout": 2}
    # a port free now: an earlier run's record (its state directory outlives it) keeps the port it
    # leased while that server is wanted, as an on-demand server under systemd stays
    free = free_port()
    path = mc.profile({"web": server}, port_range=[free, free], name="sd")
    units = generate_units(load_profile(path), mc.store)
    assert "[Install]" not in units["modelctl-sd-web.service"] and "[Install]" in units["modelctl-sd-web.socket"]
    assert "Wants=modelctl-sd-web.socket" in units["modelctl-sd.target"]
    port = int(re.search(r"ListenStream=127.0.0.1:(\d+)", units["modelctl-sd-web.socket"]).group(1))
    held = Listener.bind("127.0.0.1", port)
    path = mc.profile({"web": {**server, "port": port}}, name="sd")
    try:
        waiting = ThreadPoolExecutor(1).submit(http_post, f"http://127.0.0.1:{port}/call", {}, 60)
        wait_for(held.pending, 10, what="the first client")  # systemd sees it, and starts the service:
        argv = activation_argv([sys.executable, "-m", "modelctl", "run", "web", "-p", str(path)], held.fileno())
        run = subprocess.Popen(
            argv, env={**mc.env, **activation_env()}, pass_fds=(held.fileno(),), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            assert waiting.result(60)[0] == 200
            assert run.wait(30) == 0  # idle for 2 s: it exits, and systemd would not restart it
        finally:
            if run.poll() is None:
                run.terminate()
                run.wait(30)
    finally:
        held.close()


def test_generate_prints_units_on_stdout_and_how_to_install_them_on_stderr(mc):
    """The units alone on stdout (to redirect into a file); as root the default is system units,
    in /etc/systemd/system, never /root/.config/systemd/user."""
    path = ROOT / "profiles" / "default.yaml"
    res = mc.cli("systemd", "generate", "-p", str(path))
    assert res.returncode == 0, res.stderr
    assert "To install" not in res.stdout and "systemctl" not in res.stdout and "To install" in res.stderr
    for chunk in res.stdout.split("# modelctl-")[1:]:
        name, _, text = chunk.partition("\n")
        assert text.lstrip().startswith("[Unit]"), name
    if os.geteuid() == 0:
        assert "/etc/systemd/system" in res.stderr and ".config/systemd/user" not in res.stderr
        assert "systemctl --user" not in res.stderr
    else:
        assert "systemctl --user" in res.stderr
