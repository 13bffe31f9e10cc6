"""A small server that speaks systemd's protocols, as gunicorn or `uvicorn --fd 3` would: it
serves from the socket handed to it (fd 3, LISTEN_FDS=1, LISTEN_PID), accepts nothing until it
has "loaded" (--load seconds), then says READY=1 on $NOTIFY_SOCKET. On SIGTERM it stops
accepting and finishes what it has accepted, then takes --drain seconds more to exit (holding its
memory, as a server that drains a long request would). Without LISTEN_FDS it binds --port itself.

POST anything → 200 {"pid", "value"}; GET /health → 200. With --metrics, GET /metrics says how
many POSTs it answered and has in progress, in the bundled server's Prometheus names (what the
supervisor reads to tell an idle server from a busy one).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(message.encode(), "\0" + address[1:] if address.startswith("@") else address)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--load", type=float, default=0.5)
    p.add_argument("--value", default="")
    p.add_argument("--work", type=float, default=0.02, help="seconds each request takes")
    p.add_argument("--hold", type=int, default=0, help="MiB of memory to hold (touched, so resident)")
    p.add_argument("--drain", type=float, default=0.0, help="seconds from SIGTERM to the exit, memory still held")
    p.add_argument("--metrics", action="store_true", help="answer GET /metrics with request counters")
    a = p.parse_args()
    held = bytearray(a.hold << 20)
    for i in range(0, len(held), 4096):
        held[i] = 1
    handed = os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1"
    print(f"listen server pid {os.getpid()} {'on fd 3' if handed else f'binding {a.port}'} value {a.value!r}", flush=True)

    counts = {"done": 0, "running": 0}
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if a.metrics and self.path == "/metrics":
                text = (
                    "# TYPE sentence_requests_total counter\n"
                    f'sentence_requests_total{{route="/call",status="200"}} {counts["done"]}\n'
                    "# TYPE sentence_requests_in_progress gauge\n"
                    f'sentence_requests_in_progress{{route="/call"}} {counts["running"]}\n'
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
                return
            self._send({"status": "ok", "pid": os.getpid()})

        def do_POST(self):
            with lock:
                counts["running"] += 1
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            time.sleep(a.work)
            with lock:
                counts["running"] -= 1
                counts["done"] += 1
            self._send({"pid": os.getpid(), "value": a.value})

    time.sleep(a.load)  # "loading": with a handed socket, clients wait in its backlog
    if handed:
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = socket.socket(fileno=3)
    else:
        server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.daemon_threads = False
    server.block_on_close = True

    def stop(signum, frame):
        threading.Thread(target=server.shutdown).start()  # stop accepting; finish what was accepted

    signal.signal(signal.SIGTERM, stop)
    notify("READY=1")
    server.serve_forever(poll_interval=0.05)
    server.server_close()
    time.sleep(a.drain)
    sys.exit(0)


if __name__ == "__main__":
    main()
