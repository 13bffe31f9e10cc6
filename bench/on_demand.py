"""On-demand servers under a memory budget, with the bundled MiniLM server, in one run:

    .venv/bin/python bench/on_demand.py [--servers 3] [--backends torch,auto]

- for each backend (auto, the default: the ONNX export on ONNX Runtime; torch): `up` to ready of
  a plain server (`start: always`), and an idle on-demand server's wake: its first request,
  answered once the model has loaded;
- refused and failed requests while servers wake and are evicted: N on-demand servers on the
  default backend, each declared at 250 MiB, under a budget for two (550 MiB), called in turn by 4 clients
  each;
- memory: N idle on-demand servers (no process) against N running ones (resident memory of the
  servers' processes, and of the supervisor).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.load import ClosedLoop

MiB = 1 << 20


class Run:
    def __init__(self, tmp: str):
        self.env = {**os.environ, "MODELCTL_STATE_DIR": str(Path(tmp) / "state"), "HF_HUB_OFFLINE": "1"}
        self.profile = Path(tmp) / "od.yaml"

    def cli(self, *a: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "modelctl", *a], env=self.env, capture_output=True, text=True, timeout=900)

    def write(self, servers: dict, budget: str | None = None) -> None:
        doc: dict = {"name": "od", "servers": servers}
        if budget:
            doc["budget"] = {"memory": budget}
        self.profile.write_text(yaml.safe_dump(doc))

    def rows(self) -> dict:
        return {r["name"]: r for r in json.loads(self.cli("status", "--json").stdout)}

    def server_rss(self) -> int:
        total = 0
        for p in psutil.process_iter(["cmdline", "memory_info"]):
            try:
                if (
                    "servers.sentence" in " ".join(p.info["cmdline"] or [])
                    and p.environ().get("MODELCTL_STATE_DIR") == self.env["MODELCTL_STATE_DIR"]
                ):
                    total += p.info["memory_info"].rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return total

    def supervisor_rss(self) -> int:
        info = json.loads((Path(self.env["MODELCTL_STATE_DIR"]) / "supervisor.json").read_text())
        return psutil.Process(info["pid"]).memory_info().rss


def post(url: str) -> float:
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/v1/embeddings", data=b'{"input": "hello"}', headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.status == 200
        r.read()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--backends", default="torch,auto", help="backends whose start and wake are measured")
    parser.add_argument("--rounds", type=int, default=2, help="starts and wakes per backend, alternating backends")
    args = parser.parse_args()
    n = args.servers
    names = [f"s{i}" for i in range(n)]
    od = {"kind": "sentence", "start": "on-demand", "idle_timeout": "10m", "memory": "250MiB"}
    backends = [b for b in args.backends.split(",") if b]
    starts: dict[str, list[tuple[float, float, float, float]]] = {b: [] for b in backends}
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(tmp)
        try:
            # per backend: a plain start (up to ready) and a wake (an idle server's first answer)
            for _ in range(args.rounds):
                for backend in backends:
                    run.write({"plain": {"kind": "sentence", "backend": backend}, "lazy": {**od, "backend": backend}})
                    t0 = time.perf_counter()
                    run.cli("up", "-p", str(run.profile), "plain")
                    plain_up = time.perf_counter() - t0
                    plain_start = run.rows()["plain"]["startup"]["total"]
                    run.cli("up", "-p", str(run.profile), "lazy")
                    wake = post(run.rows()["lazy"]["url"])
                    time.sleep(1)  # the peak after a few requests
                    rss = run.server_rss() / 2  # two servers, one model each
                    run.cli("down")
                    starts[backend].append((plain_up, plain_start, wake, rss))

            # memory: N idle against N running
            run.write({name: od for name in names})
            run.cli("up", "-p", str(run.profile))
            time.sleep(2)
            idle_rss, idle_sup = run.server_rss(), run.supervisor_rss()
            rows = run.rows()
            for name in names:
                post(rows[name]["url"])
            time.sleep(2)
            running_rss, running_sup = run.server_rss(), run.supervisor_rss()
            run.cli("down")

            # wakes and evictions under a budget for two, clients calling in turn
            run.write({name: od for name in names}, budget="550MiB")
            run.cli("up", "-p", str(run.profile))
            rows = run.rows()
            before = {name: (rows[name]["wakes"], rows[name]["evictions"]) for name in names}
            totals = {"requests": 0, "ok": 0, "refused": 0, "failed": 0, "retried": 0}
            t_start = time.monotonic()
            for _ in range(2):
                for name in names:
                    with ClosedLoop(rows[name]["url"], "/v1/embeddings", {"input": "hi"}, clients=4, timeout=300) as load:
                        load.wait_answered(20, timeout=300)
                    t = load.tally.summary(0, time.monotonic())
                    for key in totals:
                        totals[key] += t[key]
            rows = run.rows()
            wakes = sum(rows[name]["wakes"] - before[name][0] for name in names)
            evictions = sum(rows[name]["evictions"] - before[name][1] for name in names)
            elapsed = time.monotonic() - t_start
        finally:
            run.cli("down")
    print(f"\nMiniLM, {n} on-demand servers:")
    for backend, got in starts.items():
        up, start, wake, rss = (statistics.median([x[k] for x in got]) for k in range(4))
        print(
            f"{backend}: up to ready {up:.1f}s (the server's start to ready {start:.1f}s); an idle server's first request answered "
            f"after {wake:.1f}s; resident memory per server {rss / MiB:.0f} MiB (medians of {len(got)})"
        )
    print(
        f"memory of the servers: {n} idle {idle_rss / MiB:.0f} MiB, {n} running {running_rss / MiB:.0f} MiB; "
        f"the supervisor {idle_sup / MiB:.0f} / {running_sup / MiB:.0f} MiB"
    )
    print(
        f"budget for two, {n} servers called in turn by 4 clients ({elapsed:.0f}s): {totals['requests']} requests, "
        f"{totals['refused']} refused, {totals['failed']} failed ({totals['retried']} resent); {wakes} wakes, {evictions} evictions"
    )


if __name__ == "__main__":
    main()
