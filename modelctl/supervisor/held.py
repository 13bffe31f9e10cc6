"""The listening sockets the supervisor holds: one per server, at the server's address.

A listener is keyed by the server *and* owns its address: a changed host or port is a new socket.
The old one stays open while an instance still serves from it (a replacement that overlaps) and
is closed once that instance is gone (`release`), or at once when nothing runs on it.
"""

from __future__ import annotations

import logging

from modelctl.host.sockets import Listener
from modelctl.names import ServerRef

log = logging.getLogger("modelctl.supervisor.held")


class HeldSockets:
    def __init__(self) -> None:
        self.current: dict[ServerRef, Listener] = {}
        self.draining: list[tuple[ServerRef, Listener]] = []  # an old address an instance still serves from

    def get(self, ref: ServerRef) -> Listener | None:
        return self.current.get(ref)

    def __contains__(self, ref: ServerRef) -> bool:
        return ref in self.current

    def hold(self, ref: ServerRef, host: str, port: int, backlog: int, keep_old: bool) -> Listener:
        """The server's socket at host:port, bound now if it is not held there yet. A socket held at
        another address is kept open for the instance that serves from it (`keep_old`), else closed
        first. OSError (EADDRINUSE) if something else holds the address."""
        cur = self.current.get(ref)
        if cur is not None and (cur.host, cur.port) == (host, port):
            return cur
        if cur is not None:
            del self.current[ref]
            if keep_old:
                self.draining.append((ref, cur))
                log.info(
                    "%s: its address changed to %s:%s; %s:%s stays open for the instance serving from it",
                    ref,
                    host,
                    port,
                    cur.host,
                    cur.port,
                )
            else:
                cur.close()
                log.info("%s: its address changed to %s:%s; closed %s:%s", ref, host, port, cur.host, cur.port)
        listener = Listener.bind(host, port, backlog)
        self.current[ref] = listener
        log.info("%s: holding %s:%s (backlog %s)", ref, host, port, backlog)
        return listener

    def adopt(self, ref: ServerRef, listener: Listener) -> None:
        """A socket taken back from a running instance, or handed to us (systemd's)."""
        old = self.current.get(ref)
        if old is not None and old is not listener:
            old.close()
        self.current[ref] = listener

    def restore(self, ref: ServerRef, listener: Listener | None) -> None:
        """A new address was given up (its instance failed): the old socket is the server's again,
        and the new one is closed."""
        if listener is None:
            return
        new = self.current.get(ref)
        if new is listener:
            return
        self.draining = [(r, held) for r, held in self.draining if held is not listener]
        self.current[ref] = listener
        if new is not None:
            new.close()

    def release(self, listener: Listener | None) -> None:
        """The instance that served from `listener` is gone: close it if it is an old address."""
        if listener is None:
            return
        for i, (ref, held) in enumerate(self.draining):
            if held is listener:
                del self.draining[i]
                listener.close()
                log.info("%s: closed its old socket %s:%s", ref, listener.host, listener.port)
                return

    def close(self, ref: ServerRef) -> bool:
        """The server is not wanted any more: every socket held for it is closed. True if one was."""
        closed = False
        listener = self.current.pop(ref, None)
        if listener is not None:
            listener.close()
            closed = True
        for held_ref, held in list(self.draining):
            if held_ref == ref:
                self.draining.remove((held_ref, held))
                held.close()
                closed = True
        return closed

    def shutdown(self) -> None:
        """The supervisor exits: running instances keep their own copies and serve on; the next
        supervisor takes them back (pidfd_getfd)."""
        for listener in self.current.values():
            listener.close()
        for _, listener in self.draining:
            listener.close()
        self.current.clear()
        self.draining.clear()
