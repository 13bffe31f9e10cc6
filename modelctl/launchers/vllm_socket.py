"""Run vLLM's OpenAI API server on the listening socket modelctl hands over (LISTEN_FDS, fd 3).

    PYTHON-OF-VLLM vllm_socket.py --model M --host H --port P ...   (vLLM's own flags)

Run by the interpreter of the environment vLLM is installed in, as a script: it imports nothing
of modelctl. vLLM binds its own socket before it loads the engine; this launcher gives it the
inherited one instead (its `create_server_socket` returns it), keeps the supervisor's backlog,
and says READY=1 on $NOTIFY_SOCKET once uvicorn serves; stopped, it lets the requests in flight
finish (vLLM's --shutdown-timeout) instead of aborting them. Connections that arrive while the
engine loads wait in the backlog. Where the installed vLLM's internals are not the ones this
knows, it exits with 79 and says why: modelctl then runs vLLM the plain way and says so.
"""

from __future__ import annotations

import os
import socket
import sys

EXIT_NO_SOCKET = 79
ACCEPTED_GRACE = 0.5  # seconds between closing the listener and vLLM's drain


def fail(why: str) -> None:
    print(f"modelctl vLLM launcher: socket activation unsupported: {why}", file=sys.stderr, flush=True)
    sys.exit(EXIT_NO_SOCKET)


def inherited() -> socket.socket:
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        fail("no socket was handed over (LISTEN_FDS, LISTEN_PID)")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)  # vLLM's own child processes must not take it for theirs
    sock = socket.socket(fileno=3)
    sock.set_inheritable(False)
    return sock


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        try:
            s.sendto(message.encode(), target)
        except OSError:
            pass


def patch_uvicorn() -> None:
    """READY=1 once serving; the supervisor's backlog kept (uvicorn listens again with its own)."""
    import uvicorn

    startup = uvicorn.Server.startup

    async def startup_then_ready(self, sockets=None):  # type: ignore[no-untyped-def]
        await startup(self, sockets=sockets)
        if self.started:
            stop_accepting_first(self)
            notify("READY=1")

    uvicorn.Server.startup = startup_then_ready  # type: ignore[method-assign]
    init = uvicorn.Config.__init__
    backlog = int(os.environ.get("MODELCTL_BACKLOG", "2048"))

    def init_with_backlog(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs.setdefault("backlog", backlog)
        init(self, *args, **kwargs)

    uvicorn.Config.__init__ = init_with_backlog  # type: ignore[method-assign]


def stop_accepting_first(server) -> None:  # type: ignore[no-untyped-def]
    """On SIGTERM, stop accepting at once, then shut down the way vLLM does.

    vLLM drains its engine first and stops its HTTP server only after: meanwhile it accepts new
    connections and answers them 500 (the engine refuses new requests while draining). Closing
    this process's listening socket leaves those connections in the socket modelctl holds, for
    the next instance; the requests in flight finish on the connections already accepted. vLLM
    handles SIGINT as it handles SIGTERM (one handler for both, on its event loop, which may be
    uvloop's: it cannot be read back), so ours passes the stop on as SIGINT, after a moment
    (ACCEPTED_GRACE) in which the requests just accepted reach the engine: vLLM's drain refuses
    a request that arrives at the engine once the drain has begun.
    """
    import asyncio
    import signal

    loop = asyncio.get_running_loop()

    def stop_accepting() -> None:
        for listener in list(getattr(server, "servers", None) or []):
            listener.close()
        loop.call_later(ACCEPTED_GRACE, os.kill, os.getpid(), signal.SIGINT)

    loop.add_signal_handler(signal.SIGTERM, stop_accepting)


def drain_on_stop() -> None:
    """A stop lets the requests in flight finish (up to MODELCTL_DRAIN_SECONDS) instead of aborting
    them, as vLLM does by default: new connections wait meanwhile in the socket modelctl holds, for
    the next instance. Only where this vLLM has --shutdown-timeout, and the user did not set it."""
    seconds = os.environ.pop("MODELCTL_DRAIN_SECONDS", "")
    if not seconds or any(a == "--shutdown-timeout" or a.startswith("--shutdown-timeout=") for a in sys.argv):
        return
    try:
        from vllm.engine.arg_utils import EngineArgs
    except ImportError:
        return
    if "shutdown_timeout" in getattr(EngineArgs, "__dataclass_fields__", {}):
        sys.argv += ["--shutdown-timeout", seconds]


def main() -> None:
    sock = inherited()
    try:
        from vllm.entrypoints.launchers import launcher
        from vllm.entrypoints.launchers.api_server.entry import main as vllm_main
    except ImportError as e:
        fail(f"this vLLM has no vllm.entrypoints.launchers ({e}); it binds its own port")
    if not callable(getattr(launcher, "create_server_socket", None)):
        fail("this vLLM's launcher has no create_server_socket to hand the socket to")

    def handed_over(addr, *args, **kwargs):  # type: ignore[no-untyped-def]
        return sock

    launcher.create_server_socket = handed_over
    patch_uvicorn()
    drain_on_stop()
    sys.argv[0] = "vllm-serve (modelctl, inherited socket)"
    vllm_main()


if __name__ == "__main__":
    main()
