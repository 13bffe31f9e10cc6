"""Before any parsing: the API key, the content type, the body size limit — and a client that
goes away takes its work with it.

The whole body is read here against the limit, whatever its framing (a chunked body has no
length). Then, while the request is served, a watcher waits for the client to disconnect; if it
does, the request is cancelled, which cancels its place in the batch queue before the model runs.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from servers.sentence.errors import ApiError
from servers.sentence.settings import ServerSettings

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

OPEN_PATHS = ("/health",)  # what probes call: never behind the API key


class GuardMiddleware:
    def __init__(self, app: Any, settings: ServerSettings):
        self.app = app
        self.limit = settings.max_body_bytes
        self.key = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                return await reject(
                    send,
                    ApiError(
                        401,
                        "missing or wrong API key: send Authorization: Bearer <key>",
                        type="authentication_error",
                        code="invalid_api_key",
                    ),
                )
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if not headers.get(b"content-type", b"").startswith(b"application/json"):
            # curl -d and some clients send no (or a form) content type: the body is JSON all the same
            scope = dict(
                scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"] + [(b"content-type", b"application/json")]
            )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await reject(
                send, ApiError(413, f"request body of {int(length)} bytes is over the limit of {self.limit}", code="body_too_large")
            )
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return await reject(send, ApiError(413, f"request body is over the limit of {self.limit} bytes", code="body_too_large"))
            chunks.append(chunk)
            more = message.get("more_body", False)
        await self._serve(scope, b"".join(chunks), receive, send)

    async def _serve(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        gone = asyncio.Event()
        served = asyncio.current_task()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def watch() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    if served is not None:
                        served.cancel()  # the queued work is cancelled before the model sees it
                    return

        watcher = asyncio.create_task(watch())
        try:
            await self.app(scope, replay, send)
        except asyncio.CancelledError:
            if not gone.is_set():
                raise
            if served is not None and hasattr(served, "uncancel"):
                served.uncancel()
        finally:
            watcher.cancel()


async def reject(send: Send, e: ApiError) -> None:
    body = orjson.dumps(e.body())
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
