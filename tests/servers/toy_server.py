"""A small real HTTP server for supervisor tests; its behaviour is chosen by flags.

GET /health   200, or 503 while --unhealthy-file exists; hangs while --hang-file exists
GET /info     {"pid", "port", "env": {CUDA_VISIBLE_DEVICES, MODELCTL_PORT, ...}, "children": [...]}
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ignore-sigterm", action="store_true", help="keep running on SIGTERM")
    p.add_argument("--spawn-child", action="store_true", help="start a grandchild that also ignores SIGTERM")
    p.add_argument("--startup-delay", type=float, default=0.0, help="seconds before the port opens")
    p.add_argument("--ready-delay", type=float, default=0.0, help="seconds of 503 after the port opens")
    p.add_argument("--unhealthy-file", default=None)
    p.add_argument("--hang-file", default=None, help="once this file is seen, /health hangs for good")
    p.add_argument("--exit-code", type=int, default=None, help="exit at once with this code")
    a = p.parse_args()

    print(f"toy server pid {os.getpid()} starting on {a.host}:{a.port}", flush=True)
    if a.exit_code is not None:
        print("exiting on purpose", flush=True)
        sys.exit(a.exit_code)
    if a.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    children = []
    if a.spawn_child:
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"
        children.append(subprocess.Popen([sys.executable, "-c", code]).pid)
    time.sleep(a.startup_delay)
    opened = time.time()
    hung: list[bool] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                if hung or (a.hang_file and os.path.exists(a.hang_file)):
                    hung.append(True)  # a deadlock: this process never answers /health again
                    time.sleep(3600)
                if a.unhealthy_file and os.path.exists(a.unhealthy_file):
                    return self._send(503, {"status": "unhealthy"})
                if time.time() - opened < a.ready_delay:
                    return self._send(503, {"status": "loading"})
                return self._send(200, {"status": "ok"})
            if self.path == "/info":
                keys = ("CUDA_VISIBLE_DEVICES", "MODELCTL_PORT", "MODELCTL_SERVER", "TOY_VALUE")
                return self._send(200, {"pid": os.getpid(), "port": a.port, "env": {k: os.environ.get(k) for k in keys}, "children": children})
            self._send(404, {"error": "not found"})

    server = ThreadingHTTPServer((a.host, a.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
