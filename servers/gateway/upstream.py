"""A lean HTTP/1.1 client to the model servers: kept-alive connections per address, the request
written in one piece, the answer parsed by httptools (uvicorn's parser) and its body handed on
piece by piece. It does only what the gateway needs (plain http, a body of known length), which
makes it several times cheaper per request than a general client; the gateway uses aiohttp's for
everything else (https, methods without a body in the answer)."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import cast

import httptools

HIGH_WATER = 256 * 1024  # bytes of answer held for a slow client before the server is read no more
IDLE_SECONDS = 3.0  # a kept-alive connection unused this long is closed (servers close theirs at ~5 s)


class Refused(Exception):
    """The connection could not be made."""


class Dropped(Exception):
    """The server closed the connection before the whole answer (or before any of it)."""

    def __init__(self, message: str, before_head: bool):
        super().__init__(message)
        self.before_head = before_head


class Silent(Exception):
    """The server said nothing for the read timeout."""


class _Connection(asyncio.Protocol):
    def __init__(self, pool: Pool, key: tuple[str, int]):
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.answer: Answer | None = None
        self.closed = False
        self.idle_since = 0.0
        self.paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass, but is one

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(Dropped(f"an answer that is not HTTP: {e}", before_head=self.answer is None or not self.answer.head.done()))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        answer = self.answer
        if answer is not None and answer.head.done() and not answer.complete and answer.delimited_by_close:
            answer.complete = True  # an answer without a length or chunks ends where its connection does
            answer.wake()
        if self.answer is not None and not self.answer.complete:
            before = not self.answer.head.done()
            self.answer.fail(Dropped("closed the connection without answering" if before else "closed the connection mid-answer", before))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if self.answer is not None:
            self.answer.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self.answer is not None and not self.answer.head.done():
            self.answer.status = self.parser.get_status_code()
            self.answer.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self.answer is not None:
            self.answer.feed(bytes(body))
            if self.answer.buffered > HIGH_WATER and not self.paused and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()

    def on_message_complete(self) -> None:
        answer = self.answer
        if answer is None:
            return
        answer.complete = True
        answer.keep_alive = self.parser.should_keep_alive()
        answer.wake()

    def _fail(self, error: Exception) -> None:
        if self.answer is not None:
            self.answer.fail(error)
        self.close()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Answer:
    """A server's answer: its head once `head` is done, then its body piece by piece."""

    def __init__(self, conn: _Connection, read_timeout: float):
        self.conn, self.read_timeout = conn, read_timeout
        self.head: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.pieces: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._released = False

    @property
    def delimited_by_close(self) -> bool:
        return self.content_length is None and not any(n.lower() == "transfer-encoding" and "chunked" in v.lower() for n, v in self.headers)

    @property
    def content_length(self) -> int | None:
        for name, value in self.headers:
            if name.lower() == "content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    def feed(self, piece: bytes) -> None:
        self.pieces.append(piece)
        self.buffered += len(piece)
        self.wake()

    def fail(self, error: Exception) -> None:
        self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # retrieved: no warning when nobody awaits it any more
        self.wake()

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        """Every piece of the body as it arrives; Dropped or Silent when it does not."""
        while True:
            if self.pieces:
                piece = self.pieces.popleft()
                self.buffered -= len(piece)
                if self.buffered < HIGH_WATER // 2:
                    self.conn.resume()
                yield piece
                continue
            if self.complete:
                self.release()
                return
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self._waiter, self.read_timeout)
            except asyncio.TimeoutError:
                raise Silent from None
            finally:
                self._waiter = None

    async def read(self, limit: int | None = None) -> bytes:
        out = bytearray()
        async for piece in self.chunks():
            out += piece
            if limit is not None and len(out) >= limit:
                break
        return bytes(out)

    def release(self) -> None:
        """Back to the pool when the answer is whole and the connection may be kept; else closed."""
        if self._released:
            return
        self._released = True
        conn = self.conn
        conn.answer = None
        if self.complete and self.keep_alive and not conn.closed:
            conn.pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        if not self._released:
            if not self.complete:
                self.conn.close()  # mid-answer: the server sees the client leave and stops the work
            self.release()


class Pool:
    """Kept-alive connections per (host, port)."""

    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[_Connection]] = {}

    def put(self, conn: _Connection) -> None:
        conn.idle_since = time.monotonic()
        conn.parser = httptools.HttpResponseParser(conn)
        self.idle.setdefault(conn.key, []).append(conn)

    def sweep(self) -> None:
        """Close the connections idle longer than IDLE_SECONDS (oldest first in each list): a server
        without request counters counts open connections as clients."""
        now = time.monotonic()
        for key, conns in list(self.idle.items()):
            while conns and (conns[0].closed or now - conns[0].idle_since >= IDLE_SECONDS):
                conns.pop(0).close()
            if not conns:
                del self.idle[key]

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self.idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS:
                return conn
            conn.close()
        return None

    async def send(
        self, host: str, port: int, head: bytes, body: bytes, connect_timeout: float, read_timeout: float
    ) -> tuple[Answer, bool]:
        """Write the request; the answer once its head has come, and whether the connection was reused."""
        key = (host, port)
        taken = self._take(key)
        reused = taken is not None
        conn = taken if taken is not None else await self._connect(key, connect_timeout)
        assert conn.transport is not None
        answer = conn.answer = Answer(conn, read_timeout)
        conn.transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            conn.transport.write(body)
        try:
            await asyncio.wait_for(asyncio.shield(answer.head), read_timeout)
        except asyncio.TimeoutError:
            answer.close()
            raise Silent from None
        except BaseException:
            answer.close()
            raise
        return answer, reused

    async def _connect(self, key: tuple[str, int], timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: _Connection(self, key), *key), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise Refused(str(e) or type(e).__name__) from None
        return conn

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()
