"""A small server that counts its traffic as the bundled server does on its Prometheus /metrics
(`sentence_requests`, `sentence_request_duration_seconds`), so that what reads those (`top`, the
dashboard) can be tested without a model.

POST anything → 200 after --work seconds (±50%); GET /health → 200; GET /metrics → the metrics.
--say LINE: printed first (escapes like \\x1b are decoded).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--work", type=float, default=0.01)
    p.add_argument("--say", default=None)
    a = p.parse_args()
    registry = CollectorRegistry()
    requests = Counter("sentence_requests", "Requests", ["route"], registry=registry)
    latency = Histogram("sentence_request_duration_seconds", "Latency", ["route"], registry=registry)
    if a.say is not None:
        print(a.say.encode().decode("unicode_escape"), flush=True)
    print(f"metrics server on {a.port}", flush=True)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/metrics":
                return self._send(generate_latest(registry), "text/plain; version=0.0.4")
            self._send(b'{"status": "ok"}')

        def do_POST(self):
            t0 = time.perf_counter()
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(a.work * random.uniform(0.5, 1.5))
            requests.labels(self.path).inc()
            latency.labels(self.path).observe(time.perf_counter() - t0)
            self._send(json.dumps({"ok": True}).encode())

    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
