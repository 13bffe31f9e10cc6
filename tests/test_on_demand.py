"""On-demand servers' idle decision and eviction order, on real processes: requests keep a server
from its idle stop (seen in its own counters, or in its connections), and the budget evicts the
least recently used server, not the one woken first."""

from __future__ import annotations

import sys
import threading
import time

import pytest

from .conftest import ROOT, http_post, wait_for

LISTEN_SERVER = str(ROOT / "tests" / "servers" / "listen_server.py")
FAKE_SENTENCE = str(ROOT / "tests" / "servers" / "fake_sentence_server.py")
ON_DEMAND = {"socket": "inherit", "notify": True, "start": "on-demand", "health": {"http": "/health"}}

# how each kind of server shows its requests to the supervisor
SERVERS = {
    # the bundled server (stand-in model): its request counter and requests in progress
    "counters": ([sys.executable, FAKE_SENTENCE, "--model-path", "fake:dims=8,delay=0.05", "--port", "{port}"], "/v1/embeddings"),
    # a server without metrics: its established connections (a request takes 0.5 s: the sampled
    # connections see one almost always)
    "connections": ([sys.executable, LISTEN_SERVER, "--load", "0.2", "--work", "0.5"], "/call"),
}


class Caller:
    """Sends one request after another (each on a new connection) from a thread, until stopped."""

    def __init__(self, url: str):
        self.url, self.answers, self._stop = url, 0, threading.Event()
        self.failures: list[tuple[int, object]] = []
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, body, _ = http_post(self.url, {"input": "still here"}, timeout=30)
            if status == 200:
                self.answers += 1
            else:
                self.failures.append((status, body))
            time.sleep(0.02)

    def __enter__(self) -> Caller:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(30)


@pytest.mark.parametrize("seen_in", sorted(SERVERS))
def test_requests_keep_an_on_demand_server_from_its_idle_stop(mc, seen_in):
    """A client calls a server with idle_timeout 2 s for 6 s: the same instance serves it
    throughout, and once the client stops, the server is stopped after 2 s idle.
    Fails if the idle decision does not mark the server active when it sees requests."""
    argv, route = SERVERS[seen_in]
    path = mc.profile({"od": {"kind": "command", "command": argv, "idle_timeout": 2, **ON_DEMAND}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    url = mc.row("od")["url"]
    assert http_post(url + route, {"input": "wake"}, timeout=60)[0] == 200
    pid = mc.row("od")["pid"]
    with Caller(url + route) as caller:
        time.sleep(6.0)  # three idle timeouts
        row = mc.row("od")
    assert caller.failures == [] and caller.answers >= 5, (caller.failures, caller.answers)
    assert (row["state"], row["pid"], row["idle_stops"], row["wakes"]) == ("ready", pid, 0, 1), row
    wait_for(lambda: mc.row("od")["state"] == "idle", 15, what="the idle stop once the requests stopped")
    assert mc.row("od")["idle_stops"] == 1


def test_the_budget_evicts_the_least_recently_used_server_not_the_first_woken(mc):
    """a is woken, then b; a is called again, so a was used last; c's wake must make room: b goes
    (least recently used), a stays, although a was woken first. None of them is busy then (the
    stand-in's counters say so), so only the order decides.
    Fails if eviction picks the server started longest ago, or if requests are not seen."""
    argv = [sys.executable, LISTEN_SERVER, "--hold", "200", "--load", "0.2", "--metrics"]
    od = {"kind": "command", "command": argv, "idle_timeout": 10, "memory": "250MiB", **ON_DEMAND}
    path = mc.profile({n: dict(od) for n in ("a", "b", "c")}, budget={"memory": "520MiB"})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    urls = {n: mc.row(n)["url"] for n in ("a", "b", "c")}
    for name in ("a", "b"):
        assert http_post(urls[name] + "/call", {}, timeout=60)[0] == 200
    # the supervisor looks at each server's counters every 2.5 s (idle_timeout / 4): after two
    # looks it knows that b answered the client it was woken for (until then b is busy, and a busy
    # server is never evicted, whatever the order)
    time.sleep(5.5)
    assert http_post(urls["a"] + "/call", {}, timeout=60)[0] == 200
    woke_a = mc.record("a").instance.started_at
    assert woke_a < mc.record("b").instance.started_at
    wait_for(
        lambda: (mc.record("a").usage.last_active or 0) > (mc.record("b").usage.last_active or 0),
        30,
        what="the supervisor to see a's last request",
    )
    assert http_post(urls["c"] + "/call", {}, timeout=60)[0] == 200
    rows = {n: mc.row(n) for n in ("a", "b", "c")}
    assert rows["b"]["evictions"] == 1 and rows["a"]["evictions"] == 0, {n: (r["state"], r["evictions"]) for n, r in rows.items()}
    assert rows["a"]["state"] == "ready" and mc.record("a").instance.started_at == woke_a  # the same instance
