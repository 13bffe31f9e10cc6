"""Forwarding: a request to a server's own address, its answer streamed back.

Bodies pass as bytes both ways; every piece of an answer is written as it arrives (an SSE chunk is
never held back). A client that leaves cancels its request, and the connection to the server is
dropped with it, so the engine stops. A stream whose server has not begun to answer (an idle
server loading its model) gets its 200 and SSE comments meanwhile. A refused, dropped or silent
connection is answered by the gateway, naming the server, with what its record says now.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Union

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from servers.gateway import upstream
from servers.gateway.admission import Admission, Full
from servers.gateway.catalog import Catalog, Server
from servers.gateway.errors import GatewayError
from servers.gateway.metrics import GatewayMetrics
from servers.gateway.settings import GatewaySettings

log = logging.getLogger("gateway")

# states in which a request waits for the server to (re)start behind its held socket
WAKING = frozenset({"idle", "starting", "backoff", "crashed"})
# request and answer headers that belong to one connection, not to the request
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer", "trailers"}
    | {"transfer-encoding", "upgrade", "host", "content-length", "expect"}
)
ANSWER_DROPPED = HOP_BY_HOP | {"date", "server"}  # aiohttp writes its own
SMALL_ANSWER = 256 * 1024  # an answer of known length up to this size is sent in one write


BROKEN = (aiohttp.ClientError, asyncio.TimeoutError, upstream.Dropped, upstream.Silent)  # an answer that broke off


class AiohttpAnswer:
    """aiohttp's answer, shaped as upstream.Answer (the relay reads either)."""

    def __init__(self, response: aiohttp.ClientResponse):
        self.response = response
        self.status = response.status
        self.headers = list(response.headers.items())
        self.content_length = response.content_length

    def chunks(self) -> AsyncIterator[bytes]:
        return self.response.content.iter_any()

    async def read(self, limit: int | None = None) -> bytes:
        return await (self.response.content.read(limit) if limit is not None else self.response.read())

    def close(self) -> None:
        self.response.close()


Upstream = Union[upstream.Answer, AiohttpAnswer]


class Proxy:
    """The client session to the servers, and what one request through it does."""

    def __init__(
        self,
        settings: GatewaySettings,
        catalog: Catalog,
        metrics: GatewayMetrics,
        refresh_now: Callable[[], bool],
    ):
        self.settings, self.catalog, self.metrics, self.refresh_now = settings, catalog, metrics, refresh_now
        self.admission = Admission()
        self.session: aiohttp.ClientSession | None = None
        self._key = settings.api_key is not None
        self._urls: dict[tuple[str, str], URL] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self.pool = upstream.Pool()

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0, enable_cleanup_closed=True)
        # auto_decompress off: answers pass as the server wrote them, Content-Encoding included
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",), cookie_jar=aiohttp.DummyCookieJar()
        )

    async def close(self) -> None:
        self.pool.close()
        if self.session is not None:
            await self.session.close()

    async def forward(
        self, request: web.Request, server: Server, path: str, body: bytes, endpoint: str, stream: bool = False, lean: bool = True
    ) -> web.StreamResponse:
        """Send the request to the server's own address and stream its answer back (`lean`: `path`
        is the gateway's own, written as it is)."""
        if server.state == "failed":
            why = f": {server.last_error}" if server.last_error else ""
            raise GatewayError(
                503, f"{server.label} has failed{why} (modelctl status {server.label}; modelctl restart {server.label})", "server_failed"
            )
        gate = self.admission.gate(server.label, server.max_concurrency, server.max_queue)
        loop = asyncio.get_running_loop()
        arrived = loop.time()
        if gate is not None:
            try:
                await gate.enter()
            except Full:
                raise GatewayError(
                    429,
                    f"{server.label} has {gate.in_flight} requests in flight and {len(gate.waiters)} waiting (max_concurrency {gate.limit}); retry later",
                    "server_busy",
                    headers={"Retry-After": "1"},
                ) from None
            self.metrics.queue_wait.labels(server.label).observe(loop.time() - arrived)
        in_flight = self.metrics.in_flight.labels(server.label)
        in_flight.inc()
        try:
            return await self._exchange(request, server, path, body, endpoint, stream, arrived, lean)
        finally:
            in_flight.dec()
            if gate is not None:
                gate.leave()

    async def _exchange(
        self, request: web.Request, server: Server, path: str, body: bytes, endpoint: str, stream: bool, arrived: float, lean: bool
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        waking = server.state in WAKING
        if waking:
            self.metrics.wakes.labels(server.label).inc()
        committed: web.StreamResponse | None = None
        if not (stream and self.settings.keepalive_after > 0):
            answer = await self._send(request, server, path, body, lean)
        else:
            head = asyncio.ensure_future(self._send(request, server, path, body, lean))
            try:
                committed = await self._keep_alive_until(request, server, head)
                answer = await head
            except GatewayError as e:
                if committed is None:
                    raise
                await committed.write(e.sse_event())
                await committed.write_eof()
                return committed
            finally:
                if not head.done():
                    head.cancel()  # the client left: so does the request to the server
        took = loop.time() - arrived
        self.metrics.requests.labels(server.served, server.label, endpoint, str(answer.status)).inc()
        self.metrics.latency.labels(server.served, server.label).observe(took)
        if waking:
            self.metrics.wake_wait.labels(server.label).observe(took)
        try:
            return await self._relay(request, server, answer, committed)
        finally:
            answer.close()  # a no-op once read to the end and released; else the server's connection is dropped

    async def _send(self, request: web.Request, server: Server, path: str, body: bytes, lean: bool) -> Upstream:
        """The server's answer head: by the lean client where it can (plain http, a POST to one of
        the gateway's own routes), else by aiohttp's."""
        s = self.settings
        read = max(s.read_timeout, server.startup_timeout or 0.0) if server.state in WAKING else s.read_timeout
        address = server.address
        if lean and address is not None and request.method == "POST":
            return await self._send_lean(request, server, address, path, body, read)
        return AiohttpAnswer(await self._send_aiohttp(request, server, path, body, read))

    async def _send_lean(
        self, request: web.Request, server: Server, address: tuple[str, int], path: str, body: bytes, read: float
    ) -> upstream.Answer:
        host, port = address
        target = path + (f"?{request.query_string}" if request.query_string else "")
        lines = [f"POST {target} HTTP/1.1", f"Host: {host}:{port}"]
        lines += [f"{k}: {v}" for k, v in self._upstream_headers(request, server).items()]
        lines.append(f"Content-Length: {len(body)}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        for attempt in (1, 2):
            try:
                answer, _ = await self.pool.send(host, port, head, body, self.settings.connect_timeout, read)
                return answer
            except upstream.Refused as e:
                raise self._unreachable(server, f"refused the connection ({e})") from None
            except upstream.Dropped as e:
                # a kept-alive connection the server closed as the request went out (an idle timeout,
                # an instance that stops): no answer was begun, so the request is sent once more
                if attempt == 2 or not e.before_head:
                    raise self._unreachable(server, str(e)) from None
            except upstream.Silent:
                raise GatewayError(504, f"{server.label} at {server.url} did not answer within {read:g}s", "server_timeout") from None
        raise AssertionError("unreachable")

    async def _send_aiohttp(self, request: web.Request, server: Server, path: str, body: bytes, read: float) -> aiohttp.ClientResponse:
        """The same with aiohttp's client; one resend when a kept-alive connection turned out closed."""
        assert self.session is not None
        s = self.settings
        url = self._url(server.url, path, request.query_string)
        timeout = self._timeouts.get(read) or self._timeouts.setdefault(
            read, aiohttp.ClientTimeout(sock_connect=s.connect_timeout, sock_read=read)
        )
        headers = self._upstream_headers(request, server)
        for attempt in (1, 2):
            try:
                return await self.session.request(
                    request.method, url, data=body or None, headers=headers, timeout=timeout, allow_redirects=False
                )
            except aiohttp.ClientConnectorError as e:
                raise self._unreachable(server, f"refused the connection ({e.os_error or e})") from None
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as e:
                # a pooled connection the server closed as the request went out (an idle timeout,
                # an instance that stops): no answer was begun, so the request is sent once more
                if attempt == 2:
                    raise self._unreachable(server, f"closed the connection without answering ({type(e).__name__})") from None
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                raise GatewayError(504, f"{server.label} at {server.url} did not answer within {read:g}s", "server_timeout") from None
            except aiohttp.ClientError as e:
                raise GatewayError(502, f"{server.label} at {server.url}: {type(e).__name__}: {e}"[:300], "server_error") from None
        raise AssertionError("unreachable")

    def _url(self, base: str, path: str, query: str) -> URL:
        """The server's own address with the path (parsed once per server and path)."""
        if query:
            return URL(f"{base}{path}?{query}", encoded=True)
        url = self._urls.get((base, path))
        if url is None:
            url = self._urls[(base, path)] = URL(base + path, encoded=True)
            if len(self._urls) > 10_000:  # paths of /servers/... are the client's: keep the cache bounded
                self._urls.clear()
        return url

    def _unreachable(self, server: Server, what: str) -> GatewayError:
        """A refused or dropped connection: what the record says now decides the answer."""
        self.refresh_now()
        now = next((s for s in self.catalog.servers if s.label == server.label), server)
        if now.state == "failed":
            why = f": {now.last_error}" if now.last_error else ""
            return GatewayError(503, f"{now.label} has failed{why} (modelctl status {now.label})", "server_failed")
        if now.state == "stopped":
            return GatewayError(503, f"{now.label} is stopped (modelctl up starts it)", "server_stopped")
        if now.state != "ready":
            return GatewayError(503, f"{now.label} is {now.state}; retry shortly", "server_unavailable", headers={"Retry-After": "2"})
        return GatewayError(502, f"{now.label} at {now.url} {what}"[:300], "server_unreachable")

    def _upstream_headers(self, request: web.Request, server: Server) -> CIMultiDict[str]:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        if self._key:
            # the client's key was the gateway's own; a server with a key of its own gets that one
            headers.popall("Authorization", None)
            if server.api_key:
                headers["Authorization"] = f"Bearer {server.api_key}"
        return headers

    async def _keep_alive_until(self, request: web.Request, server: Server, head: asyncio.Future[Any]) -> web.StreamResponse | None:
        """A stream whose server has not answered after `keepalive_after` (an idle server loading
        its model) gets its 200 now and an SSE comment every `keepalive_interval`, so that a
        client with a read timeout keeps waiting."""
        s = self.settings
        done, _ = await asyncio.wait({head}, timeout=s.keepalive_after)
        if done:
            return None
        committed = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await committed.prepare(request)
        while True:
            await committed.write(f": waiting for {server.label} to answer ({server.state})\n\n".encode())
            done, _ = await asyncio.wait({head}, timeout=s.keepalive_interval)
            if done:
                return committed

    async def _relay(
        self, request: web.Request, server: Server, answer: Upstream, committed: web.StreamResponse | None
    ) -> web.StreamResponse:
        if committed is not None:
            if answer.status >= 400:
                text = (await answer.read(4096)).decode(errors="replace")
                await committed.write(GatewayError(answer.status, f"{server.label}: {text}", "server_error").sse_event())
            else:
                await self._copy(request, answer, committed)
            await committed.write_eof()
            return committed
        headers = CIMultiDict((k, v) for k, v in answer.headers if k.lower() not in ANSWER_DROPPED)
        length = answer.content_length
        if length is not None and length <= SMALL_ANSWER:
            try:
                data = await answer.read()
            except BROKEN as e:
                raise GatewayError(502, f"{server.label}'s answer broke off: {type(e).__name__}", "server_disconnected") from None
            return web.Response(status=answer.status, body=data, headers=headers)
        response = web.StreamResponse(status=answer.status, headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        await self._copy(request, answer, response)
        await response.write_eof()
        return response

    async def _copy(self, request: web.Request, answer: Upstream, response: web.StreamResponse) -> None:
        """Each piece of the answer as it arrives (an SSE chunk is never held back)."""
        try:
            async for chunk in answer.chunks():
                await response.write(chunk)
        except BROKEN as e:
            # the server broke off mid-answer: the client's connection is closed too, so that it
            # sees a cut answer rather than a short one that looks whole
            log.warning("an answer broke off: %s", type(e).__name__)
            if request.transport is not None:
                request.transport.close()
