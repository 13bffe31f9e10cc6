"""Connections that cannot starve the server: the uvicorn HTTP protocol with three guards.

- Slow clients: the request line and headers must arrive within `header_timeout`, the body
  within `body_timeout`; else the connection is closed (a slowloris holds nothing for long).
- Many connections: past `max_connections`, the oldest idle connections (waiting for a request,
  or between keep-alive requests) are closed to make room, so a new one — a health probe — always
  gets in.
- File descriptors: the soft limit is raised to the hard one at start, and `max_connections`
  defaults to that limit less a reserve for the model's own files.

And a drain that loses nothing at shutdown (SIGTERM): the listening socket is closed first (on a
socket a supervisor holds, new connections wait in its backlog for the next instance); requests
under way are answered; a connection accepted just before, whose request is still on its way,
gets DRAIN_FIRST_REQUEST_SECONDS to send it and is answered too, with `Connection: close`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from servers.sentence.settings import ServerSettings

log = logging.getLogger("servers.sentence")

FD_RESERVE = 256  # descriptors kept for model files, threads and the listening socket
DRAIN_FIRST_REQUEST_SECONDS = 2.0


def raise_fd_limit() -> int:
    """Raise the soft fd limit to the hard one; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %s to %s: %s", soft, target, e)
    return soft


def connection_cap(settings: ServerSettings, fd_limit: int) -> int:
    cap = max(32, fd_limit - FD_RESERVE)
    return min(cap, settings.max_connections) if settings.max_connections else min(cap, 10_000)


class _Registry:
    """Open connections, oldest first, and which are idle: no request whose headers are complete."""

    def __init__(self, cap: int):
        self.cap = cap
        self.conns: OrderedDict[Any, bool] = OrderedDict()  # protocol → idle

    def opened(self, conn: Any) -> None:
        self.conns[conn] = True
        if len(self.conns) > self.cap:
            self.evict(len(self.conns) - self.cap, keep=conn)

    def evict(self, n: int, keep: Any) -> None:
        victims = [c for c, idle in self.conns.items() if idle and c is not keep][:n]
        for conn in victims:
            conn.close_idle("too many connections: closing the oldest idle ones")

    def busy(self, conn: Any, busy: bool) -> None:
        if conn in self.conns:
            self.conns[conn] = not busy

    def closed(self, conn: Any) -> None:
        self.conns.pop(conn, None)


def guarded_protocol(settings: ServerSettings, cap: int) -> type:
    registry = _Registry(cap)

    class GuardedProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _served = 0
        _draining = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(settings.header_timeout)
            registry.opened(self)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            registry.closed(self)
            super().connection_lost(exc)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self._timer is None:
                self._arm(settings.header_timeout)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            registry.busy(self, True)  # a whole request line and headers: no longer a candidate to close
            self._arm(settings.body_timeout)
            if self._draining and self.cycle is not None:
                self.cycle.keep_alive = False  # answered, then closed: we are shutting down

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._disarm()  # the request is in: the app's own time is not limited here

        def on_response_complete(self) -> None:
            self._served += 1
            super().on_response_complete()
            registry.busy(self, False)

        def shutdown(self) -> None:
            """Graceful shutdown: a fresh connection whose first request is still on its way is
            given time to send it (it is answered), instead of being closed unanswered."""
            self._draining = True
            if self.cycle is None and self._served == 0 and not self.transport.is_closing():
                self.loop.call_later(DRAIN_FIRST_REQUEST_SECONDS, self._close_if_still_idle)
                return
            super().shutdown()

        def _close_if_still_idle(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def close_idle(self, why: str) -> None:
            self._disarm()
            if not self.transport.is_closing():
                self.transport.close()

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._timed_out)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _timed_out(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()  # too slow to send its request

    return GuardedProtocol
