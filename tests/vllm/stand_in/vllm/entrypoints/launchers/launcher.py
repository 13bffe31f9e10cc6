"""The stand-in's `vllm.entrypoints.launchers.launcher`: where vLLM (0.3x) makes its socket.

As in vLLM, the socket is bound (not yet listening) before the engine loads, so the port
refuses connections until uvicorn serves; modelctl's launcher replaces `create_server_socket`.
With STAND_IN_OLD_VLLM=1 it plays a vLLM whose internals differ (no create_server_socket), for
the test of modelctl's fallback to running vLLM the plain way.
"""

from __future__ import annotations

import os
import socket


def _make_socket(addr: tuple[str, int], *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in addr[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    return sock


OLD = os.environ.get("STAND_IN_OLD_VLLM") == "1"
if not OLD:
    create_server_socket = _make_socket


def setup_server(args, *, reuse_port: bool):
    make = _make_socket if OLD else globals()["create_server_socket"]  # the name modelctl's launcher replaces
    sock = make((args.host or "", args.port), reuse_port=reuse_port)
    return f"http://{args.host}:{args.port}", sock
