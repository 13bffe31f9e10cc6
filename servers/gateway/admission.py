"""Per-server `max_concurrency`: at most that many requests in flight to a server through the
gateway; the next ones wait, first come first served, in a queue of at most `max_queue`; beyond
it the answer is 429 with Retry-After. Servers without the key are not limited here (their own
queues apply)."""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass, field

DEFAULT_QUEUE_PER_SLOT = 4  # max_queue left out: four waiting requests for each one in flight


class Full(Exception):
    """The queue is full: answer 429."""


@dataclass
class Gate:
    limit: int
    queue: int
    in_flight: int = 0
    waiters: collections.deque[asyncio.Future[None]] = field(default_factory=collections.deque)

    async def enter(self) -> None:
        if self.in_flight < self.limit and not self.waiters:
            self.in_flight += 1
            return
        if len(self.waiters) >= self.queue:
            raise Full
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter  # leave() hands its place over: in_flight already counts this request
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.leave()  # handed a place, then cancelled before using it: pass it on
            else:
                self.waiters.remove(waiter)
            raise

    def leave(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.in_flight -= 1


class Admission:
    """The gates of every limited server, made as servers are first seen, resized as profiles change."""

    def __init__(self) -> None:
        self.gates: dict[str, Gate] = {}

    def gate(self, label: str, limit: int | None, queue: int | None) -> Gate | None:
        if limit is None:
            self.gates.pop(label, None)
            return None
        queue = queue if queue is not None else limit * DEFAULT_QUEUE_PER_SLOT
        gate = self.gates.get(label)
        if gate is None:
            gate = self.gates[label] = Gate(limit, queue)
        else:
            gate.limit, gate.queue = limit, queue
        return gate
