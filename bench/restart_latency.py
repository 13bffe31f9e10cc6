"""Crash-to-ready time of a supervised trivial server, against that server's own cold start.

    .venv/bin/python bench/restart_latency.py [--runs 5]

cold start:      spawn the server directly, poll its URL until it answers (no modelctl)
crash-to-answer: SIGKILL the supervised server, poll the same URL until a new process answers
crash-to-ready:  the same, until `status` says ready (includes the supervisor's health probe)
Measured with restart backoff 0 (the supervisor's own cost) and with the default 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelctl.control import Controller
from modelctl.names import ServerRef
from modelctl.profile import load_profile
from modelctl.state.record import ServerRecord
from modelctl.state.store import StateStore
from tests.sentence_fixtures import free_port

TOY = [sys.executable, str(ROOT / "tests" / "servers" / "toy_server.py")]


def answering_pid(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url + "/info", timeout=0.5) as resp:
            return json.loads(resp.read())["pid"]
    except OSError:
        return None


def cold_start(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        port = free_port()
        t0 = time.perf_counter()
        proc = subprocess.Popen([*TOY, "--port", str(port)], stdout=subprocess.DEVNULL, start_new_session=True)
        while answering_pid(f"http://127.0.0.1:{port}") is None:
            time.sleep(0.002)
        times.append(time.perf_counter() - t0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return times


def record(ctl: Controller, ref: ServerRef) -> ServerRecord:
    rec = ctl.store.load(ref)
    assert isinstance(rec, ServerRecord), rec
    return rec


def crash_to_ready(runs: int, backoff: float) -> tuple[list[float], list[float]]:
    with tempfile.TemporaryDirectory() as tmp:
        profile = Path(tmp) / "bench.yaml"
        profile.write_text(
            json.dumps({"servers": {"toy": {"kind": "command", "command": [*TOY, "--port", "{port}"], "health": {"http": "/health"},
                                            "restart": {"backoff": backoff, "max_failures": runs + 5, "stable_after": 0}}}})
        )  # fmt: skip
        ctl = Controller(StateStore(Path(tmp) / "state"))
        prof = load_profile(profile)
        ref = prof.servers["toy"].ref
        ctl.up(prof)
        ctl.wait_ready([ref])
        answer, ready = [], []
        try:
            for _ in range(runs):
                rec = record(ctl, ref)
                time.sleep(0.3)
                t0 = time.perf_counter()
                assert rec.pid is not None
                os.kill(rec.pid, signal.SIGKILL)
                while (pid := answering_pid(rec.url)) is None or pid == rec.pid:
                    time.sleep(0.002)
                answer.append(time.perf_counter() - t0)
                while (r := record(ctl, ref)).state != "ready" or r.pid == rec.pid:
                    time.sleep(0.002)
                ready.append(time.perf_counter() - t0)
        finally:
            ctl.down()
    return answer, ready


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    cold = statistics.median(cold_start(args.runs))
    print(f"cold start (direct spawn → answers):     {cold * 1000:7.1f} ms")
    for backoff in (0.0, 1.0):
        answer, ready = crash_to_ready(args.runs, backoff)
        a, r = statistics.median(answer), statistics.median(ready)
        print(f"backoff {backoff:g}s: crash → answers again:  {a * 1000:7.1f} ms  ({a / cold:.2f}× cold start)")
        print(f"backoff {backoff:g}s: crash → status ready:   {r * 1000:7.1f} ms  ({r / cold:.2f}× cold start)")


if __name__ == "__main__":
    main()
