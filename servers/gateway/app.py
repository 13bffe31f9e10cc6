"""The gateway's HTTP surface: one URL in front of every server, routed by `model`.

Routed by the body's `model` (and the endpoint: the same name may be an embedding model on one
server and a rerank model on another):
    POST /v1/embeddings, /v1/chat/completions, /v1/completions, /v1/responses, /v1/rerank,
         /rerank (Cohere/Jina; TEI's shape, with `texts` and no model, goes to the rerank default),
         /embed (TEI: no model, the embedding default)
    POST /api/chat, /api/generate, /api/embed, /api/embeddings, /api/show (Ollama, to `ollama` servers)
Any method on /servers/PROFILE/SERVER/PATH goes to PATH of that server (any client that wants
one server's own base URL, TEI's included).
The gateway's own: GET /v1/models, /v1/models/{name}, /api/tags, /health, /metrics.

Requests and answers pass through as bytes, streamed both ways (servers/gateway/proxy.py); the
gateway answers itself only for what it refuses (errors shaped as OpenAI's, or Ollama's on its
routes).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from modelctl.served_names import OLLAMA, TASKS, ollama_full_name
from servers.gateway.catalog import Catalog, Server
from servers.gateway.errors import GatewayError, listing
from servers.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from servers.gateway.proxy import Proxy
from servers.gateway.settings import GatewaySettings

try:  # orjson parses a request body several times faster; json is the fallback
    from orjson import loads as _loads
except ImportError:  # pragma: no cover
    _loads = json.loads  # type: ignore[assignment]

log = logging.getLogger("gateway")

# endpoint → the task of the servers it reaches
ROUTES = {
    "/v1/embeddings": "embedding",
    "/v1/chat/completions": "chat",
    "/v1/completions": "chat",
    "/v1/responses": "chat",
    "/v1/rerank": "rerank",
}
OLLAMA_ROUTES = ("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show")
ENDPOINT_OF_TASK = {"embedding": "/v1/embeddings", "rerank": "/v1/rerank", "chat": "/v1/chat/completions"}

MAX_NAME = 256
MAX_REPORTED = 32  # model ids taken from one server's /v1/models

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Gateway:
    """The routes, and the catalog of servers they resolve names in."""

    def __init__(self, settings: GatewaySettings, catalog: Catalog | None = None):
        self.settings = settings
        self.catalog = catalog or Catalog(settings.state_dir, settings.profiles, settings.home)
        self.metrics = GatewayMetrics()
        self.proxy = Proxy(settings, self.catalog, self.metrics, self.refresh_now)
        self._refresher: asyncio.Task[None] | None = None
        self._last_refresh = 0.0
        self._key = settings.api_key.encode() if settings.api_key else None
        self._asked: set[tuple[str, str]] = set()
        self._asking: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ the app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        post = [web.post(path, self._routed(path, task)) for path, task in ROUTES.items()]
        post += [web.post(path, self._routed(path, OLLAMA)) for path in OLLAMA_ROUTES]
        app.add_routes(
            [
                *post,
                web.post("/rerank", self._rerank),
                web.post("/embed", self._routed("/embed", "embedding", model_in_body=False)),
                web.get("/v1/models", self._guarded(self.models)),
                web.get("/v1/models/{name:.+}", self._guarded(self.model)),
                web.get("/api/tags", self._guarded(self.tags)),
                web.get("/health", self.health),
                web.get("/metrics", self._guarded(self.metrics_page)),
                web.route("*", r"/servers/{profile}/{server}/{tail:.*}", self._guarded(self.addressed)),
            ]
        )
        self._mount_dashboard(app)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    def _mount_dashboard(self, app: web.Application) -> None:
        """The dashboard at /ui (servers/dashboard): its data and actions behind the gateway's key;
        a gateway without a key shows it read-only (actions off)."""
        from modelctl.state.store import StateStore
        from servers.dashboard import TokenAuth, mount

        key = self.settings.api_key
        mount(app, StateStore(self.settings.state_dir), TokenAuth(key, reads_need_token=key is not None), self.settings.profiles)

    async def _start(self, app: web.Application) -> None:
        await self.proxy.start()
        self.catalog.refresh()
        self._last_refresh = time.monotonic()
        self._refresher = asyncio.create_task(self._refresh_loop())

    async def _stop(self, app: web.Application) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await self.proxy.close()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval)
            try:
                self.catalog.refresh()
                self._last_refresh = time.monotonic()
                self._ask_what_they_serve()
                self.proxy.pool.sweep()
            except Exception:  # a bad moment in the state directory must not end the routing
                log.exception("reading the records failed")

    def _ask_what_they_serve(self) -> None:
        """A ready server whose profile names no model (a command server without model_name) is
        asked once per instance for the model ids it reports (/v1/models), which then reach it."""
        for server in self.catalog.servers:
            key = (server.label, server.instance)
            if server.named_by_profile or server.state != "ready" or key in self._asked:
                continue
            self._asked.add(key)
            task = asyncio.create_task(self._ask(server))
            self._asking.add(task)
            task.add_done_callback(self._asking.discard)

    async def _ask(self, server: Server) -> None:
        assert self.proxy.session is not None
        headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with self.proxy.session.get(server.url + "/v1/models", headers=headers, timeout=timeout) as resp:
                data = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            data = None
        items = data.get("data") if isinstance(data, dict) else None
        ids = [m["id"] for m in items or [] if isinstance(m, dict) and isinstance(m.get("id"), str) and 0 < len(m["id"]) <= MAX_NAME]
        if ids:
            log.info("%s reports %s", server.label, ", ".join(ids[:MAX_REPORTED]))
            self.catalog.report(server, ids[:MAX_REPORTED])

    def refresh_now(self) -> bool:
        """Look at the records again unless that was just done; True when anything changed."""
        now = time.monotonic()
        if now - self._last_refresh < 0.05:
            return False
        self._last_refresh = now
        return self.catalog.refresh()

    # ------------------------------------------------------------------ guards
    def _check_key(self, request: web.Request) -> None:
        if self._key is None:
            return
        given = request.headers.get("Authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._key):
            raise GatewayError(401, "a valid API key is required (Authorization: Bearer KEY)", "invalid_api_key")

    def _guarded(self, handler: Handler, ollama: bool = False) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                self._check_key(request)
                return await handler(request)
            except GatewayError as e:
                return self._refuse(e, ollama)

        return guarded

    def _refuse(self, error: GatewayError, ollama: bool = False) -> web.Response:
        self.metrics.refused.labels(error.code).inc()
        response = error.response(ollama)
        if error.status in (408, 413):
            response.force_close()  # the rest of the body is not read
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise GatewayError(413, f"the body is {request.content_length} bytes; the gateway takes at most {limit}", "body_too_large")
        try:
            return await asyncio.wait_for(request.read(), self.settings.body_timeout)
        except web.HTTPRequestEntityTooLarge:
            raise GatewayError(413, f"the body is larger than the gateway takes ({limit} bytes)", "body_too_large") from None
        except asyncio.TimeoutError:
            raise GatewayError(408, f"the body did not arrive within {self.settings.body_timeout:g}s", "body_timeout") from None

    # ------------------------------------------------------------------ routing by model
    def _routed(self, path: str, family: str, model_in_body: bool = True) -> Handler:
        ollama = family == OLLAMA

        async def handle(request: web.Request) -> web.StreamResponse:
            try:
                self._check_key(request)
                body = await self._read_body(request)
                data = parse_object(body)
                name = model_of(data, ollama) if model_in_body else self.default_name(family, path)
                server = self.resolve(name, family, path)
                stream = not ollama and data.get("stream") is True  # Ollama streams NDJSON: no SSE comments there
                body = with_served_name(body, data, name, server, self.catalog.reported_names(server))
                return await self.proxy.forward(request, server, path, body, endpoint=path, stream=stream)
            except GatewayError as e:
                return self._refuse(e, ollama)

        return handle

    async def _rerank(self, request: web.Request) -> web.StreamResponse:
        """`/rerank`: Cohere's and Jina's shape names its model; TEI's (`texts`) names none."""
        try:
            self._check_key(request)
            body = await self._read_body(request)
            data = parse_object(body)
            name = model_of(data) if "model" in data or "texts" not in data else self.default_name("rerank", "/rerank")
            server = self.resolve(name, "rerank", "/rerank")
            body = with_served_name(body, data, name, server, self.catalog.reported_names(server))
            return await self.proxy.forward(request, server, "/rerank", body, endpoint="/rerank")
        except GatewayError as e:
            return self._refuse(e)

    def resolve(self, name: str, family: str, path: str) -> Server:
        """The server `name` reaches at this endpoint, or the error that says why none."""
        found = self._lookup(name, family)
        if not found and self.refresh_now():
            found = self._lookup(name, family)
        if len(found) == 1:
            return found[0]
        shown = shorten(name)
        if found:
            labels = [s.label for s in found]
            raise GatewayError(
                400, f"model {shown} is served by {listing(labels)}: name one of them as PROFILE/SERVER", "model_ambiguous", "model"
            )
        elsewhere = self.catalog.named(name)
        if elsewhere:
            s = elsewhere[0]
            serves = f"{s.task} ({ENDPOINT_OF_TASK.get(s.task)}{' and /api/...' if s.kind == 'ollama' else ''})"
            raise GatewayError(404, f"model {shown} is {s.label}, which serves {serves}, not {path}", "model_not_found", "model")
        known = self.catalog.known_names(family)
        raise GatewayError(404, f"model {shown} does not exist here; known at {path}: {listing(known)}", "model_not_found", "model")

    def _lookup(self, name: str, family: str) -> list[Server]:
        found = self.catalog.lookup(name, family)
        if not found and family in (OLLAMA, "chat", "embedding") and ":" not in name.rsplit("/", 1)[-1]:
            found = [s for s in self.catalog.lookup(ollama_full_name(name), family) if s.kind == "ollama"]
        return found

    def default_name(self, task: str, path: str) -> str:
        """The model of a TEI route (its body names none): the gateway's default for the task, or
        the only server of the task."""
        if task in self.settings.defaults:
            return self.settings.defaults[task]
        servers = self.catalog.of_family(task)
        if len(servers) == 1:
            return servers[0].label
        labels = [s.label for s in servers]
        raise GatewayError(
            400,
            f"{path} names no model and {len(servers)} servers serve {task} ({listing(labels)}): "
            f"call /servers/PROFILE/SERVER{path}, or set the gateway's defaults: {{{task}: NAME}}",
            "model_missing",
            "model",
        )

    async def addressed(self, request: web.Request) -> web.StreamResponse:
        """/servers/PROFILE/SERVER/PATH → PATH of that server, any method."""
        label = f"{request.match_info['profile']}/{request.match_info['server']}"
        found = [s for s in self.catalog.named(label) if s.label == label]
        if not found and self.refresh_now():
            found = [s for s in self.catalog.named(label) if s.label == label]
        if not found:
            raise GatewayError(
                404, f"no server {shorten(label)} here; servers: {listing([s.label for s in self.catalog.servers])}", "server_not_found"
            )
        body = await self._read_body(request)
        path = "/" + request.match_info["tail"]
        return await self.proxy.forward(request, found[0], path, body, endpoint="/servers", lean=False)

    # ------------------------------------------------------------------ the gateway's own routes
    def model_entry(self, s: Server) -> dict[str, Any]:
        return {
            "id": s.served,
            "object": "model",
            "created": 0,
            "owned_by": s.label,
            "server": s.label,
            "kind": s.kind,
            "task": s.task,
            "state": s.state,
            "url": s.url,
            "memory": s.memory,
            "start": s.start,
            "aliases": list(s.aliases),
            "reported": list(self.catalog.reported_names(s)),
            "endpoint": ENDPOINT_OF_TASK[s.task] if s.task in TASKS else None,
            "last_error": s.last_error if s.state == "failed" else None,
        }

    async def models(self, request: web.Request) -> web.StreamResponse:
        self.refresh_now()
        return json_response({"object": "list", "data": [self.model_entry(s) for s in self.catalog.servers]})

    async def model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.refresh_now()
        found = self.catalog.named(name) or self.catalog.named(ollama_full_name(name))
        if not found:
            raise GatewayError(
                404, f"model {shorten(name)} does not exist here; known: {listing(self.catalog.known_names())}", "model_not_found"
            )
        return json_response({**self.model_entry(found[0]), "servers": [s.label for s in found]})

    async def tags(self, request: web.Request) -> web.StreamResponse:
        """Ollama's model list: the models of the `ollama` servers."""
        self.refresh_now()
        models = []
        for s in self.catalog.of_family(OLLAMA):
            name = ollama_full_name(s.served)
            details = {"format": "", "family": "", "parameter_size": "", "quantization_level": ""}
            models.append({"name": name, "model": name, "modified_at": "", "size": 0, "digest": "", "details": details, "server": s.label})
        return json_response({"models": models})

    async def health(self, request: web.Request) -> web.StreamResponse:
        servers = self.catalog.servers
        body = {
            "status": "ok",
            "servers": len(servers),
            "ready": sum(s.state == "ready" for s in servers),
            "unreadable_records": self.catalog.unreadable,
        }
        return json_response(body)

    async def metrics_page(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


# ---------------------------------------------------------------------- bodies
def parse_object(body: bytes) -> dict[str, Any]:
    try:
        data = _loads(body)
    except ValueError:
        raise GatewayError(400, "the body must be JSON", "invalid_json") from None
    if not isinstance(data, dict):
        raise GatewayError(400, f"the body must be a JSON object, not {type(data).__name__}", "invalid_json")
    return data


def model_of(data: dict[str, Any], ollama: bool = False) -> str:
    name = data.get("model")
    if name is None and ollama:
        name = data.get("name")  # Ollama's older field
    if name is None:
        raise GatewayError(400, "`model` is missing: name the model to call (GET /v1/models lists them)", "model_missing", "model")
    if not isinstance(name, str) or not name:
        raise GatewayError(400, f"`model` must be a non-empty string, not {shorten(name)}", "invalid_model", "model")
    if len(name) > MAX_NAME:
        raise GatewayError(400, f"`model` is longer than {MAX_NAME} characters", "invalid_model", "model")
    return name


def with_served_name(body: bytes, data: dict[str, Any], name: str, server: Server, reported: tuple[str, ...] = ()) -> bytes:
    """The body unchanged, except that a name the engine itself does not know (an alias,
    PROFILE/SERVER) becomes its served name (or the first id it reported): engines other than the
    bundled one check it."""
    own = reported or (server.served,)
    if server.kind == "sentence" or data.get("model") is None or data.get("model") in own:
        return body
    if server.kind == "ollama" and ollama_full_name(name) == ollama_full_name(server.served):
        return body
    return json.dumps({**data, "model": own[0]}).encode()


def shorten(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=json.dumps(data).encode(), content_type="application/json")
