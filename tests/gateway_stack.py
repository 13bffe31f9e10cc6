"""Servers and a gateway started for the gateway's tests and bench, without a supervisor: records
written by hand into a state directory, as modelctl writes them, and processes that carry a test
tag (the session's last sweep ends them whatever happens)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .conftest import _SESSION_TAGS, ROOT, TAG_VAR, http_get, kill_tagged

FAKE_SENTENCE = str(ROOT / "tests" / "servers" / "fake_sentence_server.py")
CHAT = str(ROOT / "tests" / "servers" / "chat_stream_server.py")
FAKE_OLLAMA = str(ROOT / "tests" / "fake_ollama.py")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n different free ports (all bound at once while they are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def write_record(state_dir: Path, profile: str, name: str, kind: str, spec: dict, port: int, state: str = "ready", **fields: Any) -> None:
    """A record as modelctl/state/store.py lays it out (written whole, then renamed)."""
    folder = state_dir / "servers" / profile
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "version": 3,
        "profile": profile,
        "name": name,
        "kind": kind,
        "spec": {"kind": kind, **spec},
        "host": "127.0.0.1",
        "port": port,
        "url": f"http://127.0.0.1:{port}",
        "state": state,
        **fields,
    }
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, folder / f"{name}.json")


class Processes:
    """Processes of one test module: started at once, each with its log, all ended together."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.tag = uuid.uuid4().hex
        _SESSION_TAGS.add(self.tag)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.log_dir / f"{name}.log", "wb")
        full_env = {**os.environ, TAG_VAR: self.tag, "PYTHONPATH": str(ROOT), **(env or {})}
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.log_dir / f"{name}.log").read_text(errors="replace")

    def wait_healthy(self, name: str, url: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited {self.procs[name].returncode}:\n{self.log(name)[-3000:]}")
            try:
                if http_get(url + "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{name} not healthy after {timeout}s:\n{self.log(name)[-3000:]}")

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()

    def end(self) -> None:
        kill_tagged(self.tag)


def fake_sentence_argv(port: int, model_name: str, task: str = "embedding", dims: int = 8, *extra: str) -> list[str]:
    return [
        sys.executable,
        FAKE_SENTENCE,
        "--model-path",
        f"fake:dims={dims}",
        "--task-type",
        task,
        "--port",
        str(port),
        "--model-name",
        model_name,
        *extra,
    ]


def chat_argv(port: int, model: str, *extra: str) -> list[str]:
    return [sys.executable, CHAT, "--port", str(port), "--model", model, *extra]


def gateway_argv(state_dir: Path, port: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "servers.gateway", "--state-dir", str(state_dir), "--port", str(port), *extra]
