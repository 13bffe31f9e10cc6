"""A RAG system's load on an embedding server: bulk indexing while users query.

Shared by tests/test_sentence_server.py (the fairness and abandoned-client tests) and
bench/sentence_throughput.py (the mixed workload, as ratios to each part alone).
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import statistics
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

WORDS = [
    "the",
    "a",
    "model",
    "server",
    "cat",
    "dog",
    "market",
    "energy",
    "river",
    "city",
    "music",
    "data",
    "paper",
    "system",
    "network",
    "query",
    "index",
    "search",
    "document",
    "answer",
    "question",
    "learning",
    "vector",
    "memory",
    "process",
    "socket",
    "budget",
    "engine",
    "kernel",
    "cluster",
    "machine",
]


def sentences(n: int, seed: int = 7, low: int = 6, high: int = 14) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "." for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Mixed:
    query_alone_p50: float  # seconds
    query_alone_p90: float
    query_mixed_p50: float
    query_mixed_p90: float
    bulk_alone_rate: float  # sentences per second
    bulk_mixed_rate: float
    queries_mixed: int

    @property
    def p90_ratio(self) -> float:
        return self.query_mixed_p90 / self.query_alone_p90

    @property
    def p50_ratio(self) -> float:
        return self.query_mixed_p50 / self.query_alone_p50

    @property
    def bulk_ratio(self) -> float:
        return self.bulk_mixed_rate / self.bulk_alone_rate

    def line(self) -> str:
        return (
            f"query alone p50 {self.query_alone_p50 * 1000:.1f} ms p90 {self.query_alone_p90 * 1000:.1f} ms; "
            f"beside bulk p50 {self.query_mixed_p50 * 1000:.1f} ms p90 {self.query_mixed_p90 * 1000:.1f} ms "
            f"({self.p90_ratio:.2f}x at p90, {self.queries_mixed} queries); bulk alone {self.bulk_alone_rate:.0f}/s, "
            f"beside queries {self.bulk_mixed_rate:.0f}/s ({self.bulk_ratio:.2f}x)"
        )


async def _post(session, url: str, payload: dict) -> None:
    async with session.post(url + "/v1/embeddings", json=payload) as resp:
        body = await resp.read()
        assert resp.status == 200, (resp.status, body[:300])


async def _queries(session, url: str, texts: list[str], until: asyncio.Event | None, count: int, pause: float) -> list[float]:
    times = []
    i = 0
    while (until is None and i < count) or (until is not None and not until.is_set()):
        t0 = time.perf_counter()
        await _post(session, url, {"input": texts[i % len(texts)]})
        times.append(time.perf_counter() - t0)
        i += 1
        await asyncio.sleep(pause)
    return times


async def _bulk(session, url: str, batches: list[list[str]], clients: int) -> float:
    queue = list(batches)
    done = 0

    async def client() -> None:
        nonlocal done
        while queue:
            batch = queue.pop()
            await _post(session, url, {"input": batch})
            done += len(batch)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - t0)


async def _mixed(url: str, bulk_size: int, bulk_requests: int, clients: int, queries: int, pause: float) -> Mixed:
    import aiohttp

    texts = sentences(bulk_size * bulk_requests, seed=11)
    batches = [texts[i : i + bulk_size] for i in range(0, len(texts), bulk_size)]
    questions = sentences(64, seed=5, low=5, high=9)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients + 2)) as session:
        await _queries(session, url, questions, None, 8, 0)  # warm
        alone = await _queries(session, url, questions, None, queries, pause)
        before = await _bulk(session, url, batches, clients)
        done = asyncio.Event()

        async def bulk_then_stop() -> float:
            try:
                return await _bulk(session, url, batches, clients)
            finally:
                done.set()

        bulk_mixed, mixed = await asyncio.gather(bulk_then_stop(), _queries(session, url, questions, done, 0, pause))
        after = await _bulk(session, url, batches, clients)  # bulk alone before and after: the machine's drift cancels out
        bulk_alone = (before + after) / 2
    return Mixed(
        statistics.median(alone),
        percentile(alone, 0.9),
        statistics.median(mixed),
        percentile(mixed, 0.9),
        bulk_alone,
        bulk_mixed,
        len(mixed),
    )


def mixed_workload(
    url: str, bulk_size: int = 1024, bulk_requests: int = 6, clients: int = 2, queries: int = 40, pause: float = 0.1
) -> Mixed:
    """One-sentence queries alone (one client, `pause` between them: a user's queries), bulk
    requests alone (`clients` at once), then both at once."""
    return asyncio.run(_mixed(url, bulk_size, bulk_requests, clients, queries, pause))


def send_and_leave(url: str, payload: dict, path: str = "/v1/embeddings", stay: float = 0.0) -> None:
    """A request whose client leaves `stay` seconds after sending it: closed unanswered."""
    parts = urlsplit(url)
    body = json.dumps(payload).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection((parts.hostname, parts.port or 80)) as s:
        s.sendall(head.encode() + body)
        time.sleep(stay)
