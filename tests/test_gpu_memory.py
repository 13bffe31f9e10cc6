"""A server's GPU memory, measured where CI has no GPU: a stand-in `nvidia-smi` (first on the PATH
of the test's commands and supervisor only) reports GPU memory for the processes the test names.
The memory is summed over the server's processes (vLLM's engine and workers hold it, not its API
process), shown by `status`, and becomes the footprint the budget counts (the measured peak
replaces the declared `gpu_memory`). tests/test_gpu.py measures the same on a real GPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .conftest import wait_for

MiB = 1 << 20

NVIDIA_SMI = """#!{python}
import sys
from pathlib import Path

args = sys.argv[1:]
if "--query-gpu=index" in args:
    print("0")
elif "--query-compute-apps=pid,used_memory" in args:
    listed = Path({pids!r})
    for pid in listed.read_text().split() if listed.exists() else []:
        print(f"{{pid}}, 300")  # MiB, as nvidia-smi's nounits says it
else:
    sys.exit(2)
"""

# a server whose child holds the GPU memory (as vLLM's EngineCore does); the child names itself
SERVER = """
import os, subprocess, sys, time
if len(sys.argv) > 3:
    with open(sys.argv[2], "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(3600)
subprocess.Popen([sys.executable, __file__, sys.argv[1], sys.argv[2], "child"])
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def stand_in_nvidia_smi(where: Path, pids: Path) -> Path:
    bin_dir = where / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "nvidia-smi"
    exe.write_text(NVIDIA_SMI.format(python=sys.executable, pids=str(pids)))
    exe.chmod(0o755)
    return bin_dir


def test_gpu_memory_is_summed_over_a_servers_processes_and_replaces_the_declared_footprint(mc):
    pids = mc.tmp / "gpu-pids"
    bin_dir = stand_in_nvidia_smi(mc.tmp, pids)
    script = mc.tmp / "gpu_server.py"
    script.write_text(SERVER)
    env = {"PATH": f"{bin_dir}:{mc.env['PATH']}", "MODELCTL_GPUS": "0"}
    server = {"kind": "command", "command": [sys.executable, str(script), "{port}", str(pids)], "gpus": [0], "gpu_memory": "1GiB",
              "health": {"http": "/"}}  # fmt: skip
    path = mc.profile({"g": server}, budget={"gpu_memory": {0: "2GiB"}})
    res = mc.cli("up", "-p", str(path), env=env)
    assert res.returncode == 0, res.stdout + res.stderr

    def measured() -> dict | None:
        out = mc.cli("status", "--json", env=env)
        (row,) = json.loads(out.stdout)
        return row if row.get("gpu_memory") else None

    row = wait_for(measured, 30, interval=0.5, what="GPU memory in status")
    leader = row["pid"]
    assert row["gpu_memory"] == 300 * MiB and str(leader) not in pids.read_text().split()  # the child's, not the leader's
    rec = wait_for(lambda: (r := mc.record("g")).usage.peak_gpu and r, 30, what="the measured peak in the record")
    assert rec.usage.peak_gpu == 300 * MiB  # the budget counts this now, not the declared 1 GiB

    from modelctl.supervisor.budget import footprint

    assert footprint(rec, None).gpu == {0: 300 * MiB}
    assert mc.cli("down", env=env).returncode == 0
