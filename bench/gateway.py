"""What the gateway adds, measured beside calling the servers directly, in one run:

    .venv/bin/python bench/gateway.py [--rounds 5] [--sentences 1024] [--streams 1000] [--phases 1,2,3,4]

modelctl runs a profile of the bundled MiniLM server, a streaming chat stand-in (a `command`
server that sends N tokens at a fixed rate, tests/servers/chat_stream_server.py) and a gateway,
all on held sockets. Then, rounds of direct and gateway calls alternating:
  1. 32 clients, one sentence per request (MiniLM): sentences/s through the gateway / direct;
  2. one client, one sentence per request: p50 latency, and what the gateway adds;
  3. chat streams (one at a time): time to the first chunk, and how late each chunk arrives
     after the server wrote it (`sent_at` in each chunk; same clock), direct and through it;
  4. --streams concurrent open streams, direct and through the gateway: how many completed, how
     late their chunks came, and the gateway's resident memory while they were open;
and the gateway's CPU time per request in 1 (user + system, from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHAT = str(ROOT / "tests" / "servers" / "chat_stream_server.py")
MiB = 1 << 20


class Run:
    def __init__(self, tmp: str):
        self.env = {**os.environ, "MODELCTL_STATE_DIR": str(Path(tmp) / "state"), "HF_HUB_OFFLINE": "1"}
        self.profile = Path(tmp) / "gw.yaml"

    def cli(self, *a: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "modelctl", *a], env=self.env, capture_output=True, text=True, timeout=900)

    def rows(self) -> dict:
        return {r["name"]: r for r in json.loads(self.cli("status", "--json").stdout)}


def raise_fd_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


async def throughput(url: str, model: str, sentences: int, clients: int) -> float:
    import aiohttp

    left = [sentences]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def client() -> None:
            while left[0] > 0:
                left[0] -= 1
                async with session.post(url + "/v1/embeddings", json={"model": model, "input": SENTENCE}) as resp:
                    body = await resp.read()
                    assert resp.status == 200, body[:300]

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return sentences / (time.perf_counter() - t0)


async def paired_latencies(direct: str, gateway: str, model: str, n: int) -> tuple[list[float], list[float]]:
    """n requests each way, direct and through the gateway in turn (pairs seconds apart at most
    see the same load on a shared machine)."""
    import aiohttp

    out: tuple[list[float], list[float]] = ([], [])
    async with aiohttp.ClientSession() as session:
        for i in range(2 * n):
            which = i % 2
            t0 = time.perf_counter()
            async with session.post((direct, gateway)[which] + "/v1/embeddings", json={"model": model, "input": SENTENCE}) as resp:
                await resp.read()
                assert resp.status == 200
            out[which].append(time.perf_counter() - t0)
    return out


async def stream_once(session, url: str, tokens: int) -> tuple[float, list[float]]:
    """(time to the first chunk, each chunk's lateness after the server wrote it)."""
    t0 = time.perf_counter()
    first = None
    late = []
    payload = {"model": "stand-in", "stream": True, "max_tokens": tokens, "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(url + "/v1/chat/completions", json=payload) as resp:
        assert resp.status == 200
        buffer = b""
        async for piece in resp.content.iter_any():
            now = time.time()
            if first is None:
                first = time.perf_counter() - t0
            buffer += piece
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if event.startswith(b"data: {"):
                    late.append(now - json.loads(event[6:])["sent_at"])
    assert first is not None
    return first, late


async def streams_alone(url: str, n: int, tokens: int) -> tuple[list[float], list[float]]:
    import aiohttp

    ttfb, late = [], []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            f, chunk_late = await stream_once(session, url, tokens)
            ttfb.append(f)
            late += chunk_late
    return ttfb, late


async def many_streams(url: str, n: int, tokens: int, gateway: psutil.Process) -> dict:
    import aiohttp

    rss_peak = [gateway.memory_info().rss]
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            rss_peak[0] = max(rss_peak[0], gateway.memory_info().rss)
            await asyncio.sleep(0.2)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=600)) as session:
        watcher = asyncio.create_task(watch())
        t0 = time.perf_counter()
        results = await asyncio.gather(*(stream_once(session, url, tokens) for _ in range(n)), return_exceptions=True)
        took = time.perf_counter() - t0
        done.set()
        await watcher
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = sorted({type(r).__name__ for r in results if isinstance(r, BaseException)})
    late = [x for _, chunk_late in ok for x in chunk_late]
    return {
        "streams": n,
        "completed": len(ok),
        "errors": errors,
        "seconds": round(took, 1),
        "gateway_rss_mib": round(rss_peak[0] / MiB, 1),
        "chunk_late_p50_ms": round(statistics.median(late) * 1000, 2) if late else None,
        "chunk_late_p99_ms": round(statistics.quantiles(late, n=100)[98] * 1000, 2) if len(late) > 100 else None,
    }


def ms(x: float) -> float:
    return round(x * 1000, 3)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sentences", type=int, default=1024, help="per throughput round")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--latency-requests", type=int, default=100, help="per latency round")
    p.add_argument("--stream-requests", type=int, default=20, help="streams per round, one at a time")
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--interval", type=float, default=0.02, help="seconds between the stand-in's tokens")
    p.add_argument("--streams", type=int, default=1000, help="concurrent open streams through the gateway")
    p.add_argument("--stream-tokens", type=int, default=50, help="tokens of each of those streams")
    p.add_argument("--phases", default="1,2,3,4", help="which of the measurements to run (1,2,3,4)")
    a = p.parse_args()
    raise_fd_limit()
    with tempfile.TemporaryDirectory() as tmp:
        run = Run(tmp)
        doc = {
            "name": "gw",
            "gateway": {"port": "auto"},
            "servers": {
                "embed": {"kind": "sentence", "model_name": "minilm", "env": {"HF_HUB_OFFLINE": "1"}},
                "chat": {
                    "kind": "command",
                    "model_name": "stand-in",
                    "command": [sys.executable, CHAT, "--port", "{port}", "--model", "stand-in", "--interval", str(a.interval)],
                    "socket": "inherit",
                    "notify": True,
                    "health": {"http": "/health"},
                },
            },
        }
        run.profile.write_text(yaml.safe_dump(doc))
        up = run.cli("up", "-p", str(run.profile))
        if up.returncode != 0:
            sys.exit(f"up failed:\n{up.stdout}\n{up.stderr}")
        try:
            rows = run.rows()
            direct_embed, direct_chat, gateway = rows["embed"]["url"], rows["chat"]["url"], rows["gateway"]["url"]
            gw_proc = psutil.Process(rows["gateway"]["pid"])
            measure(a, direct_embed, direct_chat, gateway, gw_proc)
        finally:
            run.cli("down", "-p", "gw")


def measure(a: argparse.Namespace, direct_embed: str, direct_chat: str, gateway: str, gw_proc: psutil.Process) -> None:
    phases = set(a.phases.split(","))
    print(f"machine: {os.cpu_count()} cores; rounds of direct and gateway calls alternate", flush=True)
    asyncio.run(throughput(direct_embed, "minilm", 64, a.clients))  # warm both paths
    asyncio.run(throughput(gateway, "minilm", 64, a.clients))

    if "1" in phases:
        direct_rates, gateway_rates, cpu_per_request = [], [], []
        for _ in range(a.rounds):
            direct_rates.append(asyncio.run(throughput(direct_embed, "minilm", a.sentences, a.clients)))
            before = gw_proc.cpu_times()
            gateway_rates.append(asyncio.run(throughput(gateway, "minilm", a.sentences, a.clients)))
            after = gw_proc.cpu_times()
            cpu_per_request.append(((after.user - before.user) + (after.system - before.system)) / a.sentences)
        d, g = statistics.median(direct_rates), statistics.median(gateway_rates)
        print(f"\n1. MiniLM, {a.clients} clients x 1 sentence ({a.rounds} rounds of {a.sentences}; medians)")
        print(f"   direct  {d:7.1f} sentences/s   (rounds: {', '.join(f'{x:.0f}' for x in direct_rates)})")
        print(f"   gateway {g:7.1f} sentences/s   (rounds: {', '.join(f'{x:.0f}' for x in gateway_rates)})")
        print(f"   ratio   {g / d:.3f}x   (target >= 0.9x)")
        print(f"   gateway CPU per request: {statistics.median(cpu_per_request) * 1e6:.0f} us (user + system)")

    if "2" in phases:
        direct_lat, gateway_lat = asyncio.run(paired_latencies(direct_embed, gateway, "minilm", a.rounds * a.latency_requests))
        dp50, gp50 = statistics.median(direct_lat), statistics.median(gateway_lat)
        added = statistics.median(g - d for d, g in zip(direct_lat, gateway_lat, strict=True))
        print(f"\n2. MiniLM, one client, one sentence ({len(direct_lat)} requests each way, in turn)")
        print(f"   p50 direct {ms(dp50)} ms, gateway {ms(gp50)} ms; median of the paired differences {ms(added)} ms (target <= 1 ms)")

    if "3" in phases:
        d_ttfb, g_ttfb, d_late, g_late = [], [], [], []
        for _ in range(a.rounds):
            t, late = asyncio.run(streams_alone(direct_chat, a.stream_requests, a.tokens))
            d_ttfb += t
            d_late += late
            t, late = asyncio.run(streams_alone(gateway, a.stream_requests, a.tokens))
            g_ttfb += t
            g_late += late
        print(
            f"\n3. chat stand-in, {a.tokens} tokens every {a.interval * 1000:g} ms, one stream at a time ({len(d_ttfb)} streams each way)"
        )
        print(
            f"   first chunk p50: direct {ms(statistics.median(d_ttfb))} ms, gateway {ms(statistics.median(g_ttfb))} ms: "
            f"added {ms(statistics.median(g_ttfb) - statistics.median(d_ttfb))} ms (target <= 2 ms)"
        )
        q = statistics.quantiles
        print(
            f"   chunk lateness after the server wrote it: direct p50 {ms(statistics.median(d_late))} / p99 {ms(q(d_late, n=100)[98])} ms, "
            f"gateway p50 {ms(statistics.median(g_late))} / p99 {ms(q(g_late, n=100)[98])} ms "
            f"(added p50 {ms(statistics.median(g_late) - statistics.median(d_late))} ms; target: every chunk within 2 ms)"
        )
        share_within_2ms = sum(x <= statistics.median(d_late) + 0.002 for x in g_late) / len(g_late)
        print(f"   gateway chunks within 2 ms of the direct p50 lateness: {share_within_2ms * 100:.1f}%")

    if "4" in phases:
        idle_rss = gw_proc.memory_info().rss
        alone = asyncio.run(many_streams(direct_chat, a.streams, a.stream_tokens, gw_proc))
        result = asyncio.run(many_streams(gateway, a.streams, a.stream_tokens, gw_proc))
        print(f"\n4. {a.streams} concurrent streams, {a.stream_tokens} tokens each, direct then through the gateway")
        print(f"   direct: completed {alone['completed']}/{alone['streams']} in {alone['seconds']} s; errors: {alone['errors'] or 'none'}")
        print(
            f"   gateway: completed {result['completed']}/{result['streams']} in {result['seconds']} s; errors: {result['errors'] or 'none'}"
        )
        print(f"   gateway RSS: {idle_rss / MiB:.1f} MiB before, {result['gateway_rss_mib']} MiB at most while they were open")
        print(
            f"   chunk lateness: direct p50 {alone['chunk_late_p50_ms']} / p99 {alone['chunk_late_p99_ms']} ms, "
            f"gateway p50 {result['chunk_late_p50_ms']} / p99 {result['chunk_late_p99_ms']} ms"
        )


if __name__ == "__main__":
    main()
