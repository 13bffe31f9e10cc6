"""`python -m servers.gateway [--state-dir DIR] [--profile NAME ...] --port 8000`

Serves on --host/--port, or on the socket a supervisor handed it (LISTEN_FDS; modelctl holds it
across restarts) and says READY=1 once serving. On SIGTERM it stops accepting at once (the next
instance, or the held socket's backlog, takes new connections), lets requests in flight finish
within --drain-timeout, and exits. Exit code 78 (EX_CONFIG): a configuration that cannot work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn

from aiohttp import web

from modelctl.served_names import TASKS
from servers.activation import inherited_socket, notify
from servers.gateway.app import Gateway
from servers.gateway.settings import GatewaySettings

EXIT_CONFIG = 78
BACKLOG = 4096  # as the supervisor's: listen() again on an inherited socket must not shrink it
ACCEPT_GRACE = 0.25  # after it stops accepting: requests on connections just accepted still arrive

log = logging.getLogger("gateway")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> tuple[GatewaySettings, argparse.Namespace]:
    d = GatewaySettings(state_dir=Path("."))
    p = _Parser(prog="python -m servers.gateway", description="One URL for every model server modelctl runs.")
    p.add_argument(
        "--state-dir",
        default=os.environ.get("MODELCTL_STATE_DIR"),
        help="modelctl's state directory, whose records say where each server is (default: $MODELCTL_STATE_DIR)",
    )
    p.add_argument("--profile", action="append", default=None, help="serve this profile's servers (repeat; default: every profile)")
    p.add_argument("--home", default=None, help="the gateway's own profile: its names win where two profiles share one")
    p.add_argument("--host", default=d.host)
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--default", action="append", default=[], metavar="TASK=NAME", help="the model of TEI's routes for a task")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--header-timeout", type=float, default=d.header_timeout)
    p.add_argument("--body-timeout", type=float, default=d.body_timeout)
    p.add_argument("--connect-timeout", type=float, default=d.connect_timeout)
    p.add_argument("--read-timeout", type=float, default=d.read_timeout)
    p.add_argument("--keepalive-after", type=float, default=d.keepalive_after)
    p.add_argument("--keepalive-interval", type=float, default=d.keepalive_interval)
    p.add_argument("--refresh-interval", type=float, default=d.refresh_interval)
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout)
    p.add_argument("--log-level", default="info")
    p.add_argument("--access-log", action="store_true")
    a = p.parse_args(argv)
    defaults = {}
    for item in a.default:
        task, sep, name = item.partition("=")
        if not sep or task not in TASKS or not name:
            p.error(f"--default {item!r}: write TASK=NAME with TASK one of {', '.join(TASKS)}")
        defaults[task] = name
    if not a.state_dir:
        p.error("--state-dir is required (or MODELCTL_STATE_DIR)")
    if not Path(a.state_dir).is_dir():
        p.error(f"--state-dir {a.state_dir}: no such directory")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings(
        state_dir=Path(a.state_dir),
        profiles=tuple(a.profile) if a.profile else None,
        home=a.home,
        host=a.host,
        port=a.port,
        api_key=GatewaySettings.api_key_from_env(),
        defaults=defaults,
        max_body_bytes=a.max_body_bytes,
        header_timeout=a.header_timeout,
        body_timeout=a.body_timeout,
        connect_timeout=a.connect_timeout,
        read_timeout=a.read_timeout,
        keepalive_after=a.keepalive_after,
        keepalive_interval=a.keepalive_interval,
        refresh_interval=a.refresh_interval,
        drain_timeout=a.drain_timeout,
    )
    return settings, a


async def serve(settings: GatewaySettings, access_log: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    gateway = Gateway(settings)
    runner = web.AppRunner(
        gateway.app(),
        handle_signals=False,
        access_log=log if access_log else None,
        # the first request's head, and each next one on a kept-alive connection, must come within
        # this: a slow-loris client is closed (aiohttp closes a connection idle in its head)
        keepalive_timeout=settings.header_timeout,
        handler_cancellation=True,  # a client that leaves cancels its request, and so the server's
        shutdown_timeout=settings.drain_timeout,
    )
    await runner.setup()
    sock = inherited_socket()
    site: web.BaseSite
    if sock is not None:
        site = web.SockSite(runner, sock, backlog=BACKLOG)
    else:
        site = web.TCPSite(runner, settings.host, settings.port, backlog=BACKLOG)
    await site.start()
    notify("READY=1")
    log.info("gateway serving %s for %s", site.name, ", ".join(settings.profiles) if settings.profiles else "every profile")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    notify("STOPPING=1")
    await site.stop()  # new connections wait in the held socket's backlog for the next instance
    await asyncio.sleep(ACCEPT_GRACE)
    await runner.cleanup()


def raise_fd_limit() -> None:
    """Every stream holds two connections (the client's, the server's): take the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    settings, args = parse_args(argv)
    raise_fd_limit()
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(serve(settings, args.access_log))


if __name__ == "__main__":
    main()
