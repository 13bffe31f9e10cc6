"""A stand-in for `python -m vllm.entrypoints.openai.api_server`, for the fast tests.

It takes vLLM's flags and behaves like vLLM where supervision is concerned: the port refuses
connections while the "model loads", then /health answers 200; the API server spawns an
EngineCore process, which spawns one Worker per tensor-parallel rank, and those children
ignore SIGTERM and outlive a SIGKILL of the parent unless the whole group is killed.
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

CHILD = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); sys.argv[0] = {name!r}; time.sleep(3600)"


def engine_core(tp: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for rank in range(tp):
        subprocess.Popen([sys.executable, "-c", CHILD.format(name=f"VllmWorker-{rank}"), f"VllmWorker-{rank}"])
    time.sleep(3600)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--engine-core":
        return engine_core(int(sys.argv[2]))
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--api-key", default=None)
    a, _unknown = p.parse_known_args()
    print(
        f"stand-in vLLM pid {os.getpid()} args {sys.argv[1:]} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}", flush=True
    )
    engine = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--engine-core", str(a.tensor_parallel_size), "EngineCore"]
    )
    time.sleep(float(os.environ.get("STAND_IN_LOAD_SECONDS", "0.5")))  # "loading the model": nothing listens yet
    name = a.served_model_name or a.model

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self):
            return a.api_key is None or self.headers.get("Authorization") == f"Bearer {a.api_key}"

        def do_GET(self):
            if self.path == "/health":  # vLLM leaves /health open even with --api-key
                return self._send(200, {})
            if not self._authorized():
                return self._send(401, {"error": "Unauthorized"})
            if self.path == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": name, "object": "model"}]})
            if self.path == "/info":
                return self._send(
                    200,
                    {
                        "pid": os.getpid(),
                        "engine": engine.pid,
                        "args": sys.argv[1:],
                        "env": {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")},
                    },
                )
            self._send(404, {"error": "not found"})

        def do_POST(self):
            if not self._authorized():
                return self._send(401, {"error": "Unauthorized"})
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/v1/completions":
                return self._send(
                    200,
                    {
                        "object": "text_completion",
                        "model": name,
                        "choices": [{"index": 0, "text": " stand-in", "finish_reason": "length"}],
                        "prompt": body.get("prompt"),
                    },
                )
            self._send(404, {"error": "not found"})

    ThreadingHTTPServer((a.host, a.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
