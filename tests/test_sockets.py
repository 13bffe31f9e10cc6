"""Held sockets: the supervisor owns each server's listening socket (systemd's LISTEN_FDS), so a
crash, a restart or a new spec refuses and fails no request — with real processes and clients
calling in a closed loop. A small server that reads LISTEN_FDS (tests/servers/listen_server.py),
the vLLM stand-in through modelctl's launcher, and (slow) the bundled server on the real MiniLM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from modelctl.errors import ProfileError
from modelctl.host.sockets import SocketView, accept_queue, holds_listener
from modelctl.profile import load_profile
from modelctl.supervisor.client import supervisor_info

from .conftest import ROOT, http_get, http_post, tagged_processes, wait_for
from .load import ClosedLoop

LISTEN_SERVER = str(ROOT / "tests" / "servers" / "listen_server.py")
STAND_IN = ROOT / "tests" / "vllm" / "stand_in"
# a server that loads this long: a stop-first restart keeps its clients waiting at least that, an
# overlapping one about nothing (a margin wide enough for a loaded CI machine)
SLOW_LOAD = "3"


def listen_server(*flags: str, **keys) -> dict:
    return {
        "kind": "command",
        "command": [sys.executable, LISTEN_SERVER, *flags],
        "socket": "inherit",
        "notify": True,
        "health": {"http": "/health"},
        "restart": {"backoff": 0.2},
        **keys,
    }


def up(mc, servers: dict, *args: str) -> None:
    res = mc.cli("up", "-p", str(mc.profile(servers)), *args)
    assert res.returncode == 0, res.stdout + res.stderr


def ready_again(mc, name: str, old_pid: int, timeout: float = 60) -> dict:
    return wait_for(
        lambda: (r := mc.row(name))["state"] == "ready" and r["pid"] not in (None, old_pid) and r, timeout, what="a new instance"
    )


# ---------------------------------------------------------------------- what a profile may say
@pytest.mark.parametrize(
    "server, key, words",
    [
        ({"kind": "ollama", "model": "m", "socket": "inherit"}, "socket", "binds OLLAMA_HOST itself"),
        ({"kind": "command", "command": ["srv", "{port}"], "notify": True}, "notify", "socket: inherit"),
        ({"kind": "command", "command": ["srv", "--fd", "{fd}"]}, "command", "socket: inherit"),
        ({"kind": "command", "command": ["srv", "{port}"], "replace": "overlap"}, "replace", "READY=1"),
        ({"kind": "vllm", "model": "m", "executable": "/usr/bin/vllm", "socket": "inherit"}, "socket", "give python:"),
    ],
)
def test_a_socket_a_kind_cannot_take_is_refused_with_why(tmp_path, server, key, words):
    path = tmp_path / "p.yaml"
    import yaml

    path.write_text(yaml.safe_dump({"servers": {"s": server}}))
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert e.value.key == key and words in str(e.value), str(e.value)


def test_which_kinds_hold_their_socket_and_how_they_are_replaced(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "servers:\n"
        "  emb: {kind: sentence}\n"
        "  gpu: {kind: sentence, gpus: 1}\n"
        "  llm: {kind: vllm, model: m}\n"
        "  ol: {kind: ollama, model: m}\n"
        "  cmd: {kind: command, command: [srv, '{port}']}\n"
        "  fd: {kind: command, command: [gunicorn, --bind, 'fd://{fd}'], socket: inherit}\n"
    )
    s = load_profile(path).servers
    assert (s["emb"].socket, s["emb"].notify, s["emb"].replace) == (True, True, "overlap")
    assert s["gpu"].replace == "stop-first"  # two instances would need the GPU memory twice
    assert (s["llm"].socket, s["llm"].replace) == (True, "stop-first")  # two engines rarely fit
    assert not s["ol"].socket and not s["cmd"].socket
    assert s["fd"].socket and not s["fd"].notify and s["fd"].replace == "stop-first"


# ---------------------------------------------------------------------- the socket outlives instances
def test_one_read_of_the_listeners_answers_as_each_question_read_alone():
    """status reads /proc/net/tcp and each process's fds once for every row (SocketView): it must
    say what the one-question functions say, of a socket this process holds with two connections
    waiting, of a child that holds none, and of a port nobody listens on."""
    with socket.socket() as listener, socket.socket() as nobody:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        nobody.bind(("127.0.0.1", 0))  # bound, not listening: its port has no listener
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            view = SocketView()
            assert view.accept_queue(port) == accept_queue(port) == 2
            assert view.holds_listener(os.getpid(), port) and holds_listener(os.getpid(), port)
            assert not view.holds_listener(child.pid, port) and not holds_listener(child.pid, port)
            other = nobody.getsockname()[1]
            assert view.accept_queue(other) is None and accept_queue(other) is None
            assert not view.holds_listener(os.getpid(), other)
        finally:
            child.kill()
            child.wait()
            for c in clients:
                c.close()


def test_a_connection_made_while_no_instance_runs_waits_in_the_backlog_and_is_served(mc):
    up(mc, {"web": listen_server(restart={"backoff": 2})})
    row = mc.row("web")
    assert row["socket"] == "held"
    os.kill(row["pid"], signal.SIGKILL)
    wait_for(lambda: mc.row("web")["state"] == "backoff", 10, what="the backoff")
    t0 = time.monotonic()
    status, body, _ = http_post(row["url"] + "/call", {}, timeout=30)  # neither refused nor failed: it waits
    assert status == 200 and body["pid"] != row["pid"]
    assert time.monotonic() - t0 > 1.0  # it did wait out the backoff


def test_status_counts_the_connections_waiting_in_the_backlog(mc):
    up(mc, {"web": listen_server(restart={"backoff": 3})})
    row = mc.row("web")
    os.kill(row["pid"], signal.SIGKILL)
    wait_for(lambda: mc.row("web")["state"] == "backoff", 10, what="the backoff")
    waiting = [socket.create_connection(("127.0.0.1", row["port"]), timeout=5) for _ in range(3)]
    try:
        assert wait_for(lambda: mc.row("web")["backlog"] == 3, 5, what="three waiting")
        res = mc.cli("status")
        assert "held, 3 waiting" in res.stdout
        metrics = mc.cli("metrics").stdout
        assert (
            'modelctl_server_backlog{server="test/web"} 3.0' in metrics and 'modelctl_server_socket_held{server="test/web"} 1.0' in metrics
        )
    finally:
        for s in waiting:
            s.close()


@pytest.mark.parametrize("socket_mode", ["inherit", "none"])
def test_sigkill_restart_and_a_new_spec_refuse_and_fail_no_request_with_the_socket_held(mc, socket_mode):
    """With the socket held: no request refused or failed. Without it (socket: none, the
    baseline), the same restarts refuse connections."""
    keys = (
        {}
        if socket_mode == "inherit"
        else {"socket": "none", "notify": False, "command": [sys.executable, LISTEN_SERVER, "--port", "{port}"]}
    )
    server = {**listen_server("--load", SLOW_LOAD), **keys}
    up(mc, {"web": server})
    row = mc.row("web")
    totals = {}
    with ClosedLoop(row["url"], "/call", {"x": 1}, clients=8, timeout=60) as load:
        load.wait_answered(40)
        t0 = time.monotonic()
        os.kill(row["pid"], signal.SIGKILL)
        row = ready_again(mc, "web", row["pid"])
        load.wait_answered(40)
        totals["kill"] = load.tally.summary(t0, time.monotonic())
        t0 = time.monotonic()
        assert mc.cli("restart", "test/web").returncode == 0
        row = ready_again(mc, "web", row["pid"])
        load.wait_answered(40)
        totals["restart"] = load.tally.summary(t0, time.monotonic())
        t0 = time.monotonic()
        up(mc, {"web": {**server, "command": [*server["command"], "--value", "new"]}})
        row = ready_again(mc, "web", row["pid"])
        load.wait_answered(40)
        totals["replace"] = load.tally.summary(t0, time.monotonic())
    print(f"\n{socket_mode}: {totals}")
    if socket_mode == "inherit":
        for what, t in totals.items():
            assert t["refused"] == 0 and t["failed"] == 0, (what, t)
        # a killed instance takes the requests it was serving with it (each sent once more, as clients
        # do); a restart and a replacement drain theirs, so nothing needs a second send
        assert totals["restart"]["retried"] == 0 and totals["replace"]["retried"] == 0, totals
        # the new one served first: less than its own load
        assert totals["restart"]["outage_s"] < float(SLOW_LOAD) and totals["replace"]["outage_s"] < float(SLOW_LOAD), totals
        assert totals["kill"]["outage_s"] < float(SLOW_LOAD) + 3.0, totals  # its own start, the backoff (0.2 s), and a margin
        assert http_post(row["url"] + "/call", {})[1]["value"] == "new"
    else:
        assert sum(t["refused"] for t in totals.values()) > 0, totals


def test_down_closes_the_held_socket(mc):
    up(mc, {"web": listen_server()})
    row = mc.row("web")
    res = mc.cli("down")
    assert res.returncode == 0, res.stdout + res.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", row["port"]), timeout=2)


def test_a_new_instance_that_cannot_start_leaves_the_old_one_serving(mc):
    up(mc, {"web": listen_server()})
    row = mc.row("web")
    broken = {**listen_server(), "command": [sys.executable, "-c", "import sys; print('boom', flush=True); sys.exit(3)"]}
    res = mc.cli("up", "-p", str(mc.profile({"web": broken})))
    assert res.returncode == 1 and "was not replaced" in res.stderr and "previous one still serves" in res.stderr, res.stderr
    now = mc.row("web")
    assert now["state"] == "ready" and now["pid"] == row["pid"]
    assert http_post(row["url"] + "/call", {})[0] == 200


def test_a_new_supervisor_takes_the_socket_back_from_the_running_instance(mc):
    up(mc, {"web": listen_server(restart={"backoff": 1})})
    row = mc.row("web")
    sup = supervisor_info(mc.store)
    assert sup is not None and sup.pid is not None
    os.kill(sup.pid, signal.SIGKILL)
    assert mc.cli("status").returncode == 0  # starts a new supervisor, which adopts the server
    wait_for(lambda: (s := supervisor_info(mc.store)) is not None and s.pid not in (None, sup.pid), 10, what="a new supervisor")
    wait_for(lambda: mc.row("web")["socket"] == "held", 10, what="the socket taken back")
    with ClosedLoop(row["url"], "/call", {}, clients=4, timeout=60) as load:
        load.wait_answered(20)
        t0 = time.monotonic()
        os.kill(row["pid"], signal.SIGKILL)
        ready_again(mc, "web", row["pid"])
        load.wait_answered(20)
        t = load.tally.summary(t0, time.monotonic())
    assert t["refused"] == 0 and t["failed"] == 0, t


# ---------------------------------------------------------------------- vLLM through modelctl's launcher
def vllm_stand_in(**keys) -> dict:
    return {
        "kind": "vllm",
        "model": "/models/tiny",
        "python": sys.executable,
        "env": {"PYTHONPATH": str(STAND_IN), "STAND_IN_LOAD_SECONDS": "1", **keys.pop("env", {})},
        "stop_timeout": 3,
        "restart": {"backoff": 0.2},
        **keys,
    }


def test_vllm_serves_on_the_held_socket_and_restarts_without_a_gap(mc):
    up(mc, {"llm": vllm_stand_in(replace="overlap", env={"STAND_IN_LOAD_SECONDS": SLOW_LOAD})})
    row = mc.row("llm")
    assert row["socket"] == "held"
    with ClosedLoop(row["url"], "/v1/completions", {"model": "llm", "prompt": "hi"}, clients=4, timeout=60) as load:
        load.wait_answered(20)
        t0 = time.monotonic()
        assert mc.cli("restart", "test/llm").returncode == 0
        ready_again(mc, "llm", row["pid"])
        load.wait_answered(20)
        t = load.tally.summary(t0, time.monotonic())
    assert t["refused"] == 0 and t["failed"] == 0 and t["retried"] == 0, t
    assert t["outage_s"] < float(SLOW_LOAD), t  # the new instance served before the old one stopped


def test_a_vllm_stopped_first_finishes_its_requests_in_flight(mc):
    """vLLM's default replacement is stop-first: the old API server must finish the requests it
    is serving. A SIGTERM to its whole group ended its engine under them (500 EngineDeadError);
    the API server alone gets it now, and ends its engine after draining."""
    up(mc, {"llm": vllm_stand_in(env={"STAND_IN_REQUEST_SECONDS": "1.0"})})
    row = mc.row("llm")
    assert row["socket"] == "held"
    with ClosedLoop(row["url"], "/v1/completions", {"model": "llm", "prompt": "hi"}, clients=3, timeout=60) as load:
        load.wait_answered(3)
        time.sleep(0.5)  # requests are in flight
        t0 = time.monotonic()
        assert mc.cli("restart", "test/llm").returncode == 0
        ready_again(mc, "llm", row["pid"])
        load.wait_answered(6)
        t = load.tally.summary(t0, time.monotonic())
    assert t["refused"] == 0 and t["failed"] == 0 and t["retried"] == 0, t  # drained: none sent twice
    assert vllm_processes(mc.tag, exclude=mc.row("llm")["pid"]) == []  # the old engine and workers are gone


def vllm_processes(tag: str, exclude: int) -> list[int]:
    """The stand-in's engines and workers that are not the running instance's."""
    out = []
    for p in tagged_processes(tag):
        try:
            cmd = " ".join(p.cmdline())
            if ("EngineCore" in cmd or "VllmWorker" in cmd) and os.getpgid(p.pid) != exclude:
                out.append(p.pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
    return out


def test_a_vllm_that_cannot_take_the_socket_runs_the_plain_way_and_status_says_so(mc):
    up(mc, {"llm": vllm_stand_in(env={"STAND_IN_OLD_VLLM": "1"})})
    row = mc.row("llm")
    assert row["state"] == "ready" and row["socket"].startswith("not held") and "create_server_socket" in row["socket"]
    assert http_get(row["url"] + "/health")[0] == 200
    assert "not held" in mc.cli("status", "test/llm").stdout


def test_a_missing_program_on_a_held_socket_fails_at_once(mc):
    path = mc.profile(
        {"web": {**listen_server(), "command": ["/no/such/server", "--fd", "{fd}"], "restart": {"backoff": 0.2, "max_failures": 5}}}
    )
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 1
    row = mc.row("web")
    assert row["state"] == "failed" and row["restarts"] == 0 and row["exits"][0]["class"] == "missing-executable"
    assert "/no/such/server" in row["last_error"]


# ---------------------------------------------------------------------- the bundled server, real MiniLM
@pytest.mark.slow
def test_the_first_request_to_a_fresh_minilm_server_is_answered_by_a_ready_model_never_503(mc):
    path = mc.profile({"emb": {"kind": "sentence"}})
    assert mc.cli("up", "-p", str(path), "--no-wait").returncode == 0
    url = mc.row("emb")["url"]
    status, body, _ = http_post(url + "/v1/embeddings", {"input": "the model is still loading"}, timeout=120)
    assert status == 200 and len(body["data"][0]["embedding"]) == 384
    row = mc.row("emb")
    assert row["state"] == "ready" and row["socket"] == "held"


@pytest.mark.slow
def test_minilm_sigkill_restart_and_a_new_spec_refuse_and_fail_no_request(mc):
    """8 clients call the real MiniLM server in a closed loop (timeouts long enough to wait out a
    model load) while it is SIGKILLed, restarted, and replaced by a new spec."""
    server = {"kind": "sentence", "restart": {"backoff": 0.5}}
    up(mc, {"emb": server})
    row = mc.row("emb")
    totals = {}
    with ClosedLoop(row["url"], "/v1/embeddings", {"input": "hello world"}, clients=8, timeout=120) as load:
        load.wait_answered(50)
        t0 = time.monotonic()
        os.kill(row["pid"], signal.SIGKILL)
        row = ready_again(mc, "emb", row["pid"], timeout=120)
        load.wait_answered(50)
        totals["kill"] = load.tally.summary(t0, time.monotonic())
        start_time = row["startup"]["total"]
        t0 = time.monotonic()
        assert mc.cli("restart", "test/emb").returncode == 0
        row = ready_again(mc, "emb", row["pid"], timeout=120)
        load.wait_answered(50)
        totals["restart"] = load.tally.summary(t0, time.monotonic())
        t0 = time.monotonic()
        up(mc, {"emb": {**server, "model_name": "minilm-2"}})
        row = ready_again(mc, "emb", row["pid"], timeout=120)
        load.wait_answered(50)
        totals["replace"] = load.tally.summary(t0, time.monotonic())
    print(f"\nMiniLM, socket held (start time {start_time:.1f}s): {totals}")
    for what, t in totals.items():
        assert t["refused"] == 0 and t["failed"] == 0, (what, t)
    assert totals["restart"]["retried"] == 0 and totals["replace"]["retried"] == 0, totals  # drained: none sent twice
    assert totals["kill"]["outage_s"] <= start_time + 0.5 + 3.0, totals  # its start, the backoff, a margin
    assert totals["restart"]["outage_s"] < 1.5 and totals["replace"]["outage_s"] < 1.5, totals
    assert http_post(row["url"] + "/v1/embeddings", {"input": "x"})[1]["model"] == "minilm-2"
