"""The dashboard's HTTP surface, as an aiohttp application to mount at /ui:

    GET  /                 the page (static/index.html; its script and style under static/)
    GET  /api/state        the snapshot the page polls (servers, budgets, traffic, events)
    GET  /api/logs         ?server=PROFILE/SERVER[&cursor=N]: a log's last lines, then what follows
    POST /api/action       {"action": "start"|"stop"|"restart", "server": "P/S"} or {"action", "profile"}

Reads need the token when the auth says so; actions always need it (servers/dashboard/auth.py).
The page runs no inline script and loads nothing from elsewhere (its Content-Security-Policy says
so to the browser), and it builds everything it shows as text.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from modelctl.errors import ModelctlError, UnknownServerError
from modelctl.host.files import DiskError, is_disk_error
from modelctl.names import ServerRef
from modelctl.state.store import StateStore
from servers.dashboard.actions import Target, act
from servers.dashboard.auth import TokenAuth
from servers.dashboard.logtail import read_log
from servers.dashboard.observer import Observer

STATIC = Path(__file__).resolve().parent / "static"
FILES = {"app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml"}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
OBSERVER = web.AppKey("observer", Observer)
T = TypeVar("T")


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status, headers=HEADERS)


class Dashboard:
    """The routes over one Observer (what is shown) and one TokenAuth (who may see and act)."""

    def __init__(self, store: StateStore, auth: TokenAuth, profiles: Collection[str] | None = None, interval: float = 2.0):
        self.store = store
        self.auth = auth
        self.profiles = frozenset(profiles) if profiles else None
        self.observer = Observer(store, self.profiles, interval)
        self.files = {name: (STATIC / name).read_bytes() for name in (*FILES, "index.html")}

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app[OBSERVER] = self.observer
        app.add_routes(
            [
                web.get("/", self.page),
                web.get("/static/{name}", self.static),
                web.get("/api/state", self.state),
                web.get("/api/logs", self.logs),
                web.post("/api/action", self.action),
            ]
        )
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        self.observer.close()

    @staticmethod
    async def blocking(call: Callable[[], T]) -> T:
        """Reading /proc and the records, and stopping servers, block: off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, call)

    # ------------------------------------------------------------------ the page
    async def page(self, request: web.Request) -> web.Response:
        self.auth.check_page(request)
        return web.Response(body=self.files["index.html"], content_type="text/html", charset="utf-8", headers=HEADERS)

    async def static(self, request: web.Request) -> web.Response:
        self.auth.check_page(request)
        name = request.match_info["name"]
        if name not in FILES:  # a fixed set: no path from the request reaches the file system
            raise web.HTTPNotFound()
        return web.Response(body=self.files[name], content_type=FILES[name], headers=HEADERS)

    # ------------------------------------------------------------------ data
    async def state(self, request: web.Request) -> web.Response:
        self.auth.check_read(request)
        snapshot = await self.blocking(self.observer.snapshot)
        snapshot = {**snapshot, "can_act": self.auth.token is not None}
        return web.json_response(snapshot, headers=HEADERS, dumps=functools.partial(json.dumps, separators=(",", ":")))

    async def logs(self, request: web.Request) -> web.Response:
        self.auth.check_read(request)
        server = request.query.get("server", "")
        try:
            ref = ServerRef.parse(server, None)
        except ValueError as e:
            return error(400, str(e))
        if not isinstance(ref, ServerRef) or (self.profiles is not None and ref.profile not in self.profiles):
            return error(404, f"no server {server!r} here")
        cursor_text = request.query.get("cursor")
        cursor = int(cursor_text) if cursor_text and cursor_text.isdigit() else None
        known = await self.blocking(lambda: ref in self.store.refs(ref.profile))
        if not known:
            return error(404, f"no server {server!r} here")
        chunk = await self.blocking(lambda: read_log(self.store.log_path(ref), cursor))
        secrets = self.observer.secrets
        return web.json_response(
            {"server": str(ref), "lines": [secrets.mask(line) for line in chunk.lines], "cursor": chunk.cursor, "note": chunk.note},
            headers=HEADERS,
        )

    # ------------------------------------------------------------------ actions
    async def action(self, request: web.Request) -> web.Response:
        self.auth.check_action(request)
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the body is not JSON")
        if not isinstance(body, dict):
            return error(400, "send a JSON object")
        try:
            target = Target.parse(body.get("server"), body.get("profile"))
            action = str(body.get("action"))
            said = await self.blocking(lambda: act(self.observer.ctl, action, target, self.profiles))
        except UnknownServerError as e:
            return error(404, str(e))
        except ModelctlError as e:
            return error(409, str(e))
        except OSError as e:
            if not is_disk_error(e):
                raise
            return error(507, str(DiskError(e.filename or self.store.root, e)))
        self.observer.note(self.observer.clock(), str(target), "action", f"{action} from the dashboard: {said}")
        return web.json_response({"ok": True, "message": self.observer.secrets.mask(said)}, headers=HEADERS)


def make_app(store: StateStore, auth: TokenAuth, profiles: Collection[str] | None = None, interval: float = 2.0) -> web.Application:
    """The dashboard as an application to mount at /ui (its page asks for its data relative to it)."""
    return Dashboard(store, auth, profiles, interval).app()


def mount(
    app: web.Application,
    store: StateStore,
    auth: TokenAuth,
    profiles: Collection[str] | None = None,
    at: str = "/ui",
    interval: float = 2.0,
) -> None:
    """Mount the dashboard on `app` at `at` (the gateway's /ui), with `at` itself sent on to `at/`."""

    async def to_page(request: web.Request) -> web.Response:
        raise web.HTTPFound(at + "/")

    app.router.add_get(at, to_page)  # before the sub-application, which would take `at` itself too
    app.add_subapp(at, make_app(store, auth, profiles, interval))


__all__ = ["Dashboard", "make_app", "mount"]
