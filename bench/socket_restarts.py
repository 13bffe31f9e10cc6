"""What a crash, a restart and a new spec cost the clients of the bundled MiniLM server, with its
listening socket held by modelctl and without (`socket: none`), in one run.

    .venv/bin/python bench/socket_restarts.py [--clients 8]

8 clients (tests/load.py) send a one-sentence embedding request each, in a closed loop, on new
connections, with a 120 s timeout; a connection closed before the whole answer is sent once more (as
HTTP clients do). For each of SIGKILL, `modelctl restart` and a spec change applied by `up`:
requests refused (ECONNREFUSED), failed (no answer, or not 200: a 503 while the model loads
counts), and the outage (the longest time with no 200 answered).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.load import ClosedLoop


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    results = {}
    for mode in ("inherit", "none"):
        results[mode] = run(mode, args.clients)
    print(f"\n{args.clients} clients, MiniLM (requests refused / failed / outage s):")
    print(f"{'':10} {'socket held':>28} {'socket: none':>28}")
    for event in ("kill", "restart", "replace"):
        cells = []
        for mode in ("inherit", "none"):
            t = results[mode][event]
            cells.append(f"{t['refused']:>6} / {t['failed']:>4} / {t['outage_s']:>5.1f} s")
        print(f"{event:10} {cells[0]:>28} {cells[1]:>28}")
    print(json.dumps(results, indent=1))


def run(mode: str, clients: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "MODELCTL_STATE_DIR": str(Path(tmp) / "state"), "HF_HUB_OFFLINE": "1"}
        profile = Path(tmp) / "bench.yaml"

        def cli(*a: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "modelctl", *a], env=env, capture_output=True, text=True, timeout=600)

        def write(model_name: str) -> None:
            server = {"kind": "sentence", "socket": mode, "model_name": model_name, "restart": {"backoff": 0.5}}
            profile.write_text(yaml.safe_dump({"name": "bench", "servers": {"emb": server}}))

        def row() -> dict:
            return json.loads(cli("status", "--json").stdout)[0]

        def new_instance(old: int) -> dict:
            while (r := row())["state"] != "ready" or r["pid"] in (None, old):
                time.sleep(0.1)
            return r

        write("minilm")
        assert cli("up", "-p", str(profile)).returncode == 0
        r = row()
        out = {}
        try:
            with ClosedLoop(r["url"], "/v1/embeddings", {"input": "hello world"}, clients=clients, timeout=120) as load:
                load.wait_answered(100)
                t0 = time.monotonic()
                os.kill(r["pid"], signal.SIGKILL)
                r = new_instance(r["pid"])
                load.wait_answered(100)
                out["kill"] = load.tally.summary(t0, time.monotonic())
                t0 = time.monotonic()
                cli("restart", "bench/emb")
                r = new_instance(r["pid"])
                load.wait_answered(100)
                out["restart"] = load.tally.summary(t0, time.monotonic())
                t0 = time.monotonic()
                write("minilm-2")
                cli("up", "-p", str(profile))
                r = new_instance(r["pid"])
                load.wait_answered(100)
                out["replace"] = load.tally.summary(t0, time.monotonic())
        finally:
            cli("down")
        out["start_time_s"] = r["startup"]["total"]
        return out


if __name__ == "__main__":
    main()
