"""What an idle supervisor costs: CPU (% of one core) and memory while N healthy servers sit idle.

    .venv/bin/python bench/supervisor_idle.py [--servers 60] [--seconds 30]

Starts N toy servers (tests/servers/toy_server.py, `health: {http: /health}` at the default
2 s interval) with `modelctl up`, waits until all are ready, then reads the supervisor's CPU time
over the window (psutil). For scale, the same window's CPU of one toy server answering its probes
is printed beside it. Uses only the CLI, so any version of modelctl can be measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
TOY = [sys.executable, str(ROOT / "tests" / "servers" / "toy_server.py"), "--port", "{port}", "--host", "{host}"]


def cpu_seconds(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state"
        profile = Path(tmp) / "idle.yaml"
        servers = {f"s{i}": {"kind": "command", "command": TOY, "health": {"http": "/health"}} for i in range(args.servers)}
        profile.write_text(yaml.safe_dump({"servers": servers, "port_range": [31000, 31999]}))
        env = {**os.environ, "MODELCTL_STATE_DIR": str(state)}
        cli = [sys.executable, "-m", "modelctl"]
        t0 = time.monotonic()
        subprocess.run([*cli, "up", "-p", str(profile)], env=env, check=True, capture_output=True, timeout=600)
        print(f"{args.servers} servers ready in {time.monotonic() - t0:.1f}s")
        try:
            info = json.loads((state / "supervisor.json").read_text())
            sup = psutil.Process(info["pid"])
            rows = json.loads(subprocess.run([*cli, "status", "--json"], env=env, capture_output=True, text=True, check=True).stdout)
            toy = psutil.Process(rows[0]["pid"])
            time.sleep(3)  # settle
            s0, y0, w0 = cpu_seconds(sup), cpu_seconds(toy), time.monotonic()
            time.sleep(args.seconds)
            s1, y1, w1 = cpu_seconds(sup), cpu_seconds(toy), time.monotonic()
            wall = w1 - w0
            print(
                f"supervisor: {100 * (s1 - s0) / wall:.2f}% of a core, RSS {sup.memory_info().rss / 2**20:.1f} MiB, {sup.num_threads()} threads"
            )
            print(f"one toy server answering its probes: {100 * (y1 - y0) / wall:.2f}% of a core")
        finally:
            subprocess.run([*cli, "down"], env=env, capture_output=True, timeout=600)


if __name__ == "__main__":
    main()
