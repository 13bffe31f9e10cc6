"""The vllm kind: the argv and environment modelctl builds, the whole-group stop (with a
stand-in that spawns EngineCore and Worker children like vLLM), and an opt-in test against a
real vLLM on the CPU (MODELCTL_TEST_VLLM=1, after tests/vllm/setup_vllm_cpu.sh)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from modelctl.backends import get_backend
from modelctl.profile import parse_server
from modelctl.supervisor.core import server_environment

from .conftest import ROOT, http_get, http_post, tagged_processes, wait_for
from .load import ClosedLoop

STAND_IN = ROOT / "tests" / "vllm" / "stand_in"


def vllm_spec(**keys):
    return parse_server("llm", {"kind": "vllm", "model": "/models/tiny", **keys}, "p.yaml", "p")


def test_argv_uses_the_module_entry_point_and_adds_managed_flags():
    spec = vllm_spec(python="/opt/vllm/bin/python", served_model_name="tiny", args=["--dtype", "float32", "--api-key", "k"])
    launch = get_backend("vllm").launch(spec, 8123, [1, 2])
    assert launch.argv == [
        "/opt/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/models/tiny",
        "--host", "127.0.0.1", "--port", "8123", "--served-model-name", "tiny", "--tensor-parallel-size", "2",
        "--dtype", "float32", "--api-key", "k",
    ]  # fmt: skip
    assert launch is not None
    env = server_environment(spec, launch, 8123, [1, 2], "token")
    assert env["CUDA_VISIBLE_DEVICES"] == "1,2"


def test_an_executable_runs_vllm_serve():
    launch = get_backend("vllm").launch(vllm_spec(executable="/opt/vllm/bin/vllm"), 8000, [])
    assert launch.argv[:3] == ["/opt/vllm/bin/vllm", "serve", "/models/tiny"]
    assert "--tensor-parallel-size" not in launch.argv  # no GPUs: vLLM's own default
    assert launch.argv[launch.argv.index("--served-model-name") + 1] == "llm"


def test_tensor_parallel_size_can_be_set_and_health_is_the_open_route():
    spec = vllm_spec(tensor_parallel_size=4)
    assert (
        "--tensor-parallel-size" in (argv := get_backend("vllm").launch(spec, 1, [0]).argv)
        and argv[argv.index("--tensor-parallel-size") + 1] == "4"
    )
    assert spec.health.kind == "http" and spec.health.path == "/health"
    assert spec.startup_timeout >= 600  # big models take minutes


def vllm_family(mc) -> list[psutil.Process]:
    out = []
    for p in tagged_processes(mc.tag):
        try:
            cmd = " ".join(p.cmdline())
        except psutil.NoSuchProcess:
            continue
        if "vllm.entrypoints" in cmd or "vllm_socket.py" in cmd or "VllmWorker" in cmd:  # vllm_socket.py: modelctl's launcher
            out.append(p)
    return out


@pytest.mark.slow
def test_a_crash_and_a_down_leave_no_engine_or_worker_behind(mc):
    path = mc.profile(
        {
            "llm": {
                "kind": "vllm",
                "model": "/models/tiny",
                "python": sys.executable,
                "gpus": 2,
                "args": ["--api-key", "secret"],
                "env": {"PYTHONPATH": str(STAND_IN)},
                "stop_timeout": 2,
                "restart": {"backoff": 0.2},
            }
        }
    )
    res = mc.cli("up", "-p", str(path), env={"MODELCTL_GPUS": "0,1,2"})
    assert res.returncode == 0, res.stdout + res.stderr
    row = mc.row("llm")
    info = http_get(row["url"] + "/info", headers={"Authorization": "Bearer secret"})[1]
    assert info["env"]["CUDA_VISIBLE_DEVICES"] == "0,1" and "--tensor-parallel-size" in info["args"]
    first = {p.pid for p in vllm_family(mc)}
    assert len(first) == 4  # api server, EngineCore, two workers

    os.kill(row["pid"], signal.SIGKILL)  # the parent alone: its children would hold GPU memory
    again = wait_for(lambda: (r := mc.row("llm"))["state"] == "ready" and r["pid"] != row["pid"] and r, 30, what="restart")
    assert again["port"] == row["port"]
    now = {p.pid for p in vllm_family(mc)}
    assert now.isdisjoint(first) and len(now) == 4  # the orphans were reaped before the restart
    status, body, _ = http_post(
        again["url"] + "/v1/completions", {"model": "llm", "prompt": "hi"}, headers={"Authorization": "Bearer secret"}
    )
    assert status == 200 and body["model"] == "llm"

    assert mc.cli("down").returncode == 0
    assert vllm_family(mc) == []


# ------------------------------------------------------------------ the real thing, opt-in
VLLM_VENV = Path(os.environ.get("MODELCTL_VLLM_VENV", ROOT / ".venv-vllm"))


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.skipif(os.environ.get("MODELCTL_TEST_VLLM") != "1", reason="opt-in: MODELCTL_TEST_VLLM=1 after tests/vllm/setup_vllm_cpu.sh")
@pytest.mark.timeout(1800)
def test_real_vllm_on_cpu_serves_restarts_and_stops_clean(mc):
    python = VLLM_VENV / "bin" / "python"
    assert python.exists(), f"no vLLM environment at {VLLM_VENV}: run tests/vllm/setup_vllm_cpu.sh"
    model_dir = mc.tmp / "tiny-llama"
    subprocess.run([str(python), str(ROOT / "tests" / "vllm" / "make_tiny_llama.py"), str(model_dir)], check=True, timeout=300)
    path = mc.profile(
        {
            "llm": {
                "kind": "vllm",
                "model": str(model_dir),
                "served_model_name": "tiny",
                "python": str(python),
                "args": ["--dtype", "float32", "--max-model-len", "256", "--api-key", "secret"],
                "env": {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_TARGET_DEVICE": "cpu"},
                "startup_timeout": 900,
                "stop_timeout": 20,
                "restart": {"backoff": 0.5},
            }
        }
    )
    t0 = time.monotonic()
    res = mc.cli("up", "-p", str(path), timeout=1000)
    cold = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr + "\n".join(mc.ctl.log_tail("llm", 60))
    row = mc.row("llm")
    assert row["socket"] == "held", row["socket"]  # vLLM serves on the socket modelctl holds (the launcher)
    auth = {"Authorization": "Bearer secret"}
    status, body, _ = http_post(
        row["url"] + "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 5}, headers=auth, timeout=120
    )
    assert status == 200 and body["choices"][0]["text"] is not None

    # a restart under load: the old vLLM stops first (two engines do not fit in this machine's cores;
    # replace: stop-first is vLLM's default) and the requests wait in the held socket's backlog
    with ClosedLoop(
        row["url"], "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2}, clients=2, timeout=600, headers=auth
    ) as load:
        load.wait_answered(5, timeout=300)
        t0 = time.monotonic()
        assert mc.cli("restart", "test/llm", timeout=1000).returncode == 0
        row = wait_for(
            lambda: (r := mc.row("llm"))["state"] == "ready" and r["pid"] != row["pid"] and r, 900, interval=0.5, what="the new vLLM"
        )
        load.wait_answered(5, timeout=300)
        during = load.tally.summary(t0, time.monotonic())
    assert during["refused"] == 0 and during["failed"] == 0, json.dumps(during)

    family = {p.pid for p in tagged_processes(mc.tag) if p.pid != row["pid"] and _in_group(p, row["pid"])}
    t1 = time.monotonic()
    os.kill(row["pid"], signal.SIGKILL)
    again = wait_for(lambda: (r := mc.row("llm"))["state"] == "ready" and r["pid"] != row["pid"] and r, 900, interval=0.5, what="restart")
    crash_to_ready = time.monotonic() - t1
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in family)
    status, _, _ = http_post(
        again["url"] + "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 3}, headers=auth, timeout=120
    )
    assert status == 200

    assert mc.cli("down", timeout=120).returncode == 0
    left = [p for p in tagged_processes(mc.tag) if "vllm" in " ".join(p.cmdline())]
    assert left == []
    print(f"\nvLLM on CPU: cold start to ready {cold:.1f}s, crash to ready {crash_to_ready:.1f}s, restart under load {during}")


def _in_group(proc: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(proc.pid) == pgid
    except ProcessLookupError:
        return False
