"""What `status` pays to check who holds each held socket: the socket tables read per row (the
one-question functions, as rows did before) against one `SocketView` for every row.

    .venv/bin/python bench/status_sockets.py [--servers 3] [--connections 1000] [--rounds 20]

This process listens on --servers ports (the held sockets) and opens --connections connections to
another one of its own (both ends are rows of /proc/net/tcp, as a busy machine's are). Each status
asks, per server, whether the supervisor (here: this process) holds the listener and how many
connections wait in its backlog. CPU time per status, and the ratio, in the same run.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modelctl.host.sockets import SocketView, accept_queue, holds_listener


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    listeners = []
    for _ in range(args.servers):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        listeners.append(s)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(4096)
    clients = [socket.create_connection(busy.getsockname()) for _ in range(args.connections)]
    accepted = [busy.accept()[0] for _ in range(args.connections)]
    ports = [s.getsockname()[1] for s in listeners]
    me = os.getpid()

    def per_row() -> None:
        for port in ports:
            holds_listener(me, port)
            accept_queue(port)

    def one_view() -> None:
        view = SocketView()
        for port in ports:
            view.holds_listener(me, port)
            view.accept_queue(port)

    with open("/proc/net/tcp") as f:
        rows = sum(1 for _ in f) - 1
    print(f"{args.servers} held servers, {rows} rows in /proc/net/tcp, {len(os.listdir('/proc/self/fd'))} fds here")
    times: dict[str, list[float]] = {"per row": [], "one view": []}
    for _ in range(3):  # interleaved, so that a drifting load falls on both
        for name, fn in (("per row", per_row), ("one view", one_view)):
            t0 = time.process_time()
            for _ in range(args.rounds):
                fn()
            times[name].append((time.process_time() - t0) / args.rounds * 1000)
    for name, ms in times.items():
        print(f"{name:>9}: {min(ms):7.1f} ms CPU per status (best of 3)")
    print(f"one view / per row: {min(times['one view']) / min(times['per row']):.2f}x")
    for s in [*clients, *accepted, *listeners, busy]:
        s.close()


if __name__ == "__main__":
    main()
