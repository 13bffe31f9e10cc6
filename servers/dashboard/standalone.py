"""`modelctl ui`: the dashboard alone, in the foreground, on a loopback address, behind a token
printed with its URL. The page is at /ui/ as on the gateway; / sends there."""

from __future__ import annotations

import asyncio
import secrets
import signal
import socket
from collections.abc import Callable, Collection

from aiohttp import web

from modelctl.state.store import StateStore
from servers.dashboard.app import mount
from servers.dashboard.auth import TokenAuth

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def new_token() -> str:
    return secrets.token_urlsafe(24)


def host_headers(host: str, port: int) -> frozenset[str]:
    """The Host headers a browser sends to this address (by number, or as localhost on loopback)."""
    shown = f"[{host}]" if ":" in host else host
    names = {shown, *LOOPBACK_NAMES} if host in ("127.0.0.1", "::1", "localhost") else {shown}
    return frozenset(f"{name}:{port}" for name in names)


def page_url(host: str, port: int, token: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/ui/#token={token}"


def build(store: StateStore, auth: TokenAuth, profiles: Collection[str] | None = None, interval: float = 2.0) -> web.Application:
    app = web.Application()

    async def home(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    app.router.add_get("/", home)
    mount(app, store, auth, profiles, interval=interval)
    return app


async def serve(
    store: StateStore,
    host: str,
    port: int,
    token: str,
    profiles: Collection[str] | None = None,
    on_ready: Callable[[str], None] = print,
    interval: float = 2.0,
) -> None:
    """Serve until SIGINT or SIGTERM; `on_ready` gets the page's URL (with the token) once listening."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    auth = TokenAuth(token, reads_need_token=True, allowed_hosts=host_headers(host, port))
    runner = web.AppRunner(build(store, auth, profiles, interval), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    on_ready(page_url(host, port, token))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
