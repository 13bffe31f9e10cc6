"""A small real HTTP server for supervisor tests; its behaviour is chosen by flags.

GET /health   200, or 503 while --unhealthy-file exists; hangs while --hang-file exists
GET /info     {"pid", "port", "env": {CUDA_VISIBLE_DEVICES, MODELCTL_PORT, ...}, "children": [...]}

--hold MiB: the serving process (the daemon, with --daemonize-after) holds this much resident memory.

--daemonize-after S: after S seconds, double-fork a daemon in a session of its own that serves
the port (the "server" keeps running as a bystander leader); with --scrub-env the daemon also
clears its environment. Its pid goes to --pid-file.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def serve(a: argparse.Namespace, children: list[int]) -> None:
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
                if a.health_body is not None:
                    return self._send(503, {"status": a.health_body})
                if time.time() - opened < a.ready_delay:
                    return self._send(503, {"status": "loading"})
                return self._send(200, {"status": "ok"})
            if self.path == "/info":
                keys = ("CUDA_VISIBLE_DEVICES", "MODELCTL_PORT", "MODELCTL_SERVER", "TOY_VALUE", "PORT", "SLURM_JOB_ID")
                return self._send(
                    200, {"pid": os.getpid(), "port": a.port, "env": {k: os.environ.get(k) for k in keys}, "children": children}
                )
            self._send(404, {"error": "not found"})

    server = ThreadingHTTPServer((a.host, a.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


def daemonize(a: argparse.Namespace) -> None:
    """The classic double fork: the grandchild leaves our session and our process tree."""
    if os.fork() > 0:
        return
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    argv = [sys.executable, __file__, "--port", str(a.port), "--host", a.host, "--serve-only", "--pid-file", a.pid_file]
    argv += ["--hold", str(a.hold)]
    os.execve(sys.executable, argv, {} if a.scrub_env else dict(os.environ))


def spam(rate: int) -> None:
    line = "spam " + "x" * 95
    while True:
        for _ in range(max(1, rate // 100) // 10):
            print(line)
        sys.stdout.flush()
        time.sleep(0.1)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--ignore-sigterm", action="store_true", help="keep running on SIGTERM")
    p.add_argument("--spawn-child", action="store_true", help="start a grandchild that also ignores SIGTERM")
    p.add_argument("--startup-delay", type=float, default=0.0, help="seconds before the port opens")
    p.add_argument("--ready-delay", type=float, default=0.0, help="seconds of 503 after the port opens")
    p.add_argument("--unhealthy-file", default=None)
    p.add_argument("--hang-file", default=None, help="once this file is seen, /health hangs for good")
    p.add_argument("--exit-code", type=int, default=None, help="exit at once with this code")
    p.add_argument("--daemonize-after", type=float, default=None)
    p.add_argument("--scrub-env", action="store_true")
    p.add_argument("--pid-file", default=None)
    p.add_argument("--serve-only", action="store_true")
    p.add_argument("--hold", type=int, default=0, help="MiB of memory the serving process holds (touched, so resident)")
    p.add_argument("--spam", type=int, default=0, help="write this many bytes of output per second")
    p.add_argument("--say", default=None, help="print this line first (escapes like \\x1b are decoded)")
    p.add_argument("--health-body", default=None, help="answer /health 503 with this status text")
    p.add_argument(
        "--kill-parent-once", default=None, help="SIGKILL our parent (the supervisor) if this file does not exist yet, then create it"
    )
    a = p.parse_args()
    if a.port is None:
        a.port = int(os.environ["PORT"])  # a server that reads its port from the environment

    held = bytearray(a.hold << 20) if a.serve_only or a.daemonize_after is None else bytearray()
    for i in range(0, len(held), 4096):
        held[i] = 1
    if a.serve_only:
        if a.pid_file:
            with open(a.pid_file, "w") as f:
                f.write(str(os.getpid()))
        serve(a, [])
        return
    if a.kill_parent_once and not os.path.exists(a.kill_parent_once):
        open(a.kill_parent_once, "w").close()
        os.kill(os.getppid(), signal.SIGKILL)  # the supervisor dies right after spawning us
    if a.say is not None:
        print(a.say.encode().decode("unicode_escape"), flush=True)
    if a.health_body is not None:
        a.health_body = a.health_body.encode().decode("unicode_escape")
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
    if a.spam:
        threading.Thread(target=spam, args=(a.spam,), daemon=True).start()
    if a.daemonize_after is not None:
        time.sleep(a.daemonize_after)
        daemonize(a)
        while True:  # the leader stays, serving nothing: the daemon holds the port
            time.sleep(3600)
    time.sleep(a.startup_delay)
    serve(a, children)


if __name__ == "__main__":
    main()
