"""Clients calling a server in a closed loop, counting what a restart does to them.

Each client sends one request at a time on a new connection and records how it ended:
answered (with its status), refused (nothing listened: ECONNREFUSED) or failed (reset, closed
before a whole answer, timed out). A request whose connection was closed before the whole answer
is sent once more, as HTTP clients do (the openai SDK retries connection errors twice, and a body
cut short is one: httpx's RemoteProtocolError): a request that a killed process had accepted, or
was answering, dies with it, and no manager can answer it. The tests of graceful restarts check
that no request needed that second send. Refused connections are
not retried; after one, or after an answer other than 200, a client pauses 0.1 s (RETRY_PAUSE).
The outage is the longest time in which no request was answered 200. Used by the
tests of held sockets and by bench/socket_restarts.py.
"""

from __future__ import annotations

import dataclasses
import http.client
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass
class Outcome:
    started: float
    ended: float
    status: int | None  # None: no answer
    error: str = ""  # "refused", or what failed
    retried: bool = False  # sent again after its first connection closed unanswered


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def between(self, since: float, until: float) -> Tally:
        """The requests that ended in [since, until]."""
        return Tally([o for o in self.outcomes if since <= o.ended <= until])

    @property
    def ok(self) -> int:
        return sum(o.status == 200 for o in self.outcomes)

    @property
    def refused(self) -> int:
        return sum(o.error == "refused" for o in self.outcomes)

    @property
    def failed(self) -> int:
        """No answer for another reason than a refused connection, or an answer other than 200."""
        return sum((o.status is None and o.error != "refused") or (o.status is not None and o.status != 200) for o in self.outcomes)

    def statuses(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for o in self.outcomes:
            if o.status is not None:
                out[o.status] = out.get(o.status, 0) + 1
        return out

    def outage(self, since: float, until: float) -> float:
        """The longest stretch in [since, until] with no 200 answered (by answer time)."""
        times = sorted(o.ended for o in self.outcomes if o.status == 200 and since <= o.ended <= until)
        edges = [since, *times, until]
        return max(b - a for a, b in itertools.pairwise(edges))

    def errors(self) -> list[str]:
        return sorted({o.error for o in self.outcomes if o.error})

    @property
    def retried(self) -> int:
        return sum(o.retried for o in self.outcomes)

    def summary(self, since: float, until: float) -> dict[str, Any]:
        """Counts of the requests that ended in [since, until], and the outage in it."""
        t = self.between(since, until)
        return {"requests": len(t.outcomes), "ok": t.ok, "refused": t.refused, "failed": t.failed,
                "retried": t.retried, "outage_s": round(self.outage(since, until), 2), "statuses": t.statuses(), "errors": t.errors()}  # fmt: skip


# the connection was closed before the whole answer: what a client sees when the process that
# accepted it dies (IncompleteRead: it died between writing the answer's head and its body)
RETRIED = ("RemoteDisconnected", "ConnectionResetError", "BrokenPipeError", "IncompleteRead")


RETRY_PAUSE = 0.1  # after a refused connection or an answer other than 200, as an impatient client


class ClosedLoop:
    """`clients` threads, each sending the same POST again as soon as it is answered."""

    def __init__(self, url: str, path: str, payload: Any, clients: int = 8, timeout: float = 120.0, headers: dict | None = None):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path, self.body = path, json.dumps(payload).encode()
        self.headers = {"Content-Type": "application/json", "Connection": "close", **(headers or {})}
        self.clients, self.timeout = clients, timeout
        self.tally = Tally()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def __enter__(self) -> ClosedLoop:
        for _ in range(self.clients):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.timeout + 5)

    def _run(self) -> None:
        while not self._stop.is_set():
            outcome = self.call()
            if outcome.error in RETRIED and not self._stop.is_set():
                outcome = dataclasses.replace(self.call(), retried=True)
            with self._lock:
                self.tally.outcomes.append(outcome)
            if outcome.status != 200:
                time.sleep(RETRY_PAUSE)  # a refused connect or a 503 returns at once: do not spin

    def call(self) -> Outcome:
        t0 = time.monotonic()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request("POST", self.path, body=self.body, headers=self.headers)
            resp = conn.getresponse()
            resp.read()
            return Outcome(t0, time.monotonic(), resp.status)
        except ConnectionRefusedError:
            return Outcome(t0, time.monotonic(), None, "refused")
        except (OSError, http.client.HTTPException) as e:
            return Outcome(t0, time.monotonic(), None, type(e).__name__)
        finally:
            conn.close()

    def wait_answered(self, n: int, timeout: float = 120.0) -> None:
        """Until n more requests have been answered 200."""
        start = self.tally.ok
        deadline = time.monotonic() + timeout
        while self.tally.ok < start + n:
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {n} answers in {timeout}s: {self.tally.summary(0, time.monotonic())}")
            time.sleep(0.02)
