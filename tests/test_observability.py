"""Where the time, memory and failures go: startup phases, Prometheus metrics of the supervisor's
view (command, .prom file, HTTP), `modelctl top`, and the failure history — real processes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelctl.cli.top import quantile, spark
from modelctl.failures import Exit
from modelctl.observe.metrics import exit_returncode

from .conftest import ROOT, http_get, http_post, wait_for, wait_text
from .sentence_fixtures import free_port

FAKE_SENTENCE = str(ROOT / "tests" / "servers" / "fake_sentence_server.py")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.slow
def test_metrics_carry_the_right_values_after_a_crash_and_a_restart(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "restart": {"backoff": 0.1}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    before = mc.row("web")
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(lambda: (r := mc.row("web"))["state"] == "ready" and r["pid"] != before["pid"], 20, what="the restart")
    res = mc.cli("metrics")
    assert res.returncode == 0
    got = samples(res.stdout)
    web = ("server", "test/web")
    assert got[("modelctl_server_state", (web, ("state", "ready")))] == 1
    assert got[("modelctl_server_state", (web, ("state", "failed")))] == 0
    assert got[("modelctl_server_restarts_total", (web,))] == 1
    assert got[("modelctl_server_up", (web,))] == 1
    assert got[("modelctl_server_last_exit_code", (web,))] == -signal.SIGKILL
    assert got[("modelctl_server_rss_bytes", (web,))] > 5 * 2**20
    assert got[("modelctl_server_startup_seconds", (("phase", "total"), web))] > 0
    assert not any(name == "modelctl_server_gpu_memory_bytes" for name, _ in got)  # no NVIDIA GPU: no value
    # the supervisor writes the same to <state>/metrics.prom (textfile collector), whole and renamed
    prom = mc.state_dir / "metrics.prom"
    wait_for(
        lambda: prom.exists() and samples(prom.read_text()).get(("modelctl_server_restarts_total", (web,))) == 1, 15, what="metrics.prom"
    )


@pytest.mark.slow
def test_supervise_serves_metrics_on_a_port_and_says_where(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    assert mc.cli("supervise", "--stop").returncode == 0
    port = free_port()
    log = mc.tmp / "supervise.err"
    with open(log, "w") as err:
        fg = subprocess.Popen([sys.executable, "-m", "modelctl", "supervise", "--metrics-port", str(port)], env=mc.env, stderr=err)
    try:
        _status, text = wait_for(lambda: _get(f"http://127.0.0.1:{port}/metrics"), 15, what="the metrics endpoint")
        assert samples(text)[("modelctl_server_up", (("server", "test/web"),))] == 1
        wait_text(log, f"metrics on http://127.0.0.1:{port}/metrics")
    finally:
        fg.terminate()
        fg.wait(10)


def _get(url: str):
    try:
        status, body = http_get(url, timeout=2)
    except OSError:
        return None
    return (status, body) if status == 200 else None


def test_startup_phases_add_up_and_are_ordered(mc):
    toy = mc.toy("--startup-delay", "0.6", "--ready-delay", "0.5")
    path = mc.profile({"web": {"kind": "command", "command": toy, "health": {"http": "/health"}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    phases = mc.row("web")["startup"]
    assert set(phases) == {"port_open", "healthy", "prepare", "total"}
    assert phases["port_open"] >= 0.6 and phases["healthy"] >= 0.4 and phases["prepare"] == 0
    assert phases["port_open"] + phases["healthy"] + phases["prepare"] == pytest.approx(phases["total"], abs=0.002)
    out = mc.cli("status", "web").stdout
    assert re.search(r"startup\s+\d+\.\ds = port open \d+\.\ds \+ healthy \d+\.\ds \+ prepare 0\.0s", out), out


@pytest.mark.slow
def test_a_model_pull_is_its_own_phase(mc):
    from .test_ollama import FakeOllama

    fake = FakeOllama(mc)
    path = mc.profile(
        {
            "llm": {
                "kind": "ollama",
                "model": "tiny",
                "executable": fake.wrapper(),
                "models_dir": str(mc.tmp / "models"),
                "env": {k: v for k, v in fake.env.items() if k.startswith("FAKE_")},
            }
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    phases = mc.row("llm")["startup"]
    assert phases["prepare"] > 0 and phases["port_open"] > 0
    assert phases["port_open"] + phases["healthy"] + phases["prepare"] == pytest.approx(phases["total"], abs=0.002)


def test_failures_are_kept_with_their_class_and_the_line_that_explains_them(mc):
    path = mc.profile({"bad": {"kind": "command", "command": mc.toy("--exit-code", "3"), "restart": {"backoff": 0.1, "max_failures": 2}}})
    assert mc.cli("up", "-p", str(path)).returncode == 1
    exits = mc.row("bad")["exits"]
    assert [e["exit"]["description"] for e in exits] == ["exit code 3", "exit code 3"] and exits[0]["exit"]["code"] == 3
    assert all(e["class"] == "crash" and e["line"] == "exiting on purpose" and e["at"] > 0 for e in exits)
    out = mc.cli("status", "bad").stdout
    assert "last exits" in out and out.count("exiting on purpose") >= 2 and "exit code 3" in out


@pytest.mark.slow
def test_top_once_shows_every_server_with_request_rate_and_latency(mc):
    path = mc.profile(
        {
            "emb": {
                "kind": "command",
                "command": [sys.executable, FAKE_SENTENCE, "--model-path", "fake:dims=8,delay=0.01", "--port", "{port}"],
                "health": {"http": "/health"},
            },
            "toy": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}},
        }
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    url = mc.row("emb")["url"]
    stop = threading.Event()

    def load():
        while not stop.is_set():
            http_post(url + "/v1/embeddings", {"input": "hello"})

    worker = threading.Thread(target=load, daemon=True)
    worker.start()
    try:
        res = mc.cli("top", "--once", "--interval", "1.5")
    finally:
        stop.set()
        worker.join(10)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    header = next(line for line in lines if line.startswith("server"))
    assert header.split() == ["server", "state", "uptime", "restarts", "memory", "gpu", "mem", "req/s", "mean", "p95"]
    emb = next(line for line in lines if line.startswith("test/emb"))
    toy = next(line for line in lines if line.startswith("test/toy"))
    m = re.match(r"test/emb\s+ready\s+\S+\s+0\s+[\d.]+ MiB\s+\S+\s+-\s+([\d.]+)\s+\S+\s+(\d+)ms\s+≤(\d+)ms$", emb)
    assert m, emb
    assert float(m.group(1)) > 1 and int(m.group(2)) >= 10 and int(m.group(3)) >= int(m.group(2))
    assert re.match(r"test/toy\s+ready\s+\S+\s+0\s+[\d.]+ MiB\s+\S+\s+-\s+-\s+-\s+-$", toy), toy


@pytest.mark.slow
def test_top_runs_live_until_q(mc):
    path = mc.profile({"toy": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: modelctl top on a terminal
        os.execve(sys.executable, [sys.executable, "-m", "modelctl", "top", "--interval", "0.3"], {**mc.env, "TERM": "xterm"})
    out = b""
    done = 0
    try:
        deadline = time.monotonic() + 20
        while b"test/toy" not in out and time.monotonic() < deadline:
            out += os.read(fd, 4096)
        os.write(fd, b"q")
        deadline = time.monotonic() + 10
        while not done and time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)
        assert done == pid and os.waitstatus_to_exitcode(status) == 0
        assert b"test/toy" in out and b"q quits" in out
    finally:
        if not done:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_exit_codes_sparklines_and_quantiles():
    assert Exit.of(3) == Exit(code=3) and Exit.of(-9).describe() == "killed by SIGKILL" and not Exit.of(None).known
    assert exit_returncode(Exit.of(3).to_json()) == 3 and exit_returncode(Exit.of(-9).to_json()) == -9
    assert exit_returncode(Exit.of(None).to_json()) is None
    # records written before exits were numbers are read back
    assert Exit.from_text("exit code 3") == Exit(code=3) and Exit.from_text("killed by SIGKILL") == Exit(signal=9)
    assert spark([0, 1, 2, 4]) == "▁▃▅█" and spark([0, 0]) == "▁▁"
    assert quantile({0.1: 50.0, 0.5: 95.0, 1.0: 100.0, float("inf"): 100.0}, 0.95) == 0.5
