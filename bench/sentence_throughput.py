"""Throughput and latency of the bundled sentence server against in-process encode, as ratios.

    .venv/bin/python bench/sentence_throughput.py [--rounds 3] [--sentences 512]

Measures, in one run on the same machine and the same model (MiniLM, CPU):
  1. 32 concurrent clients, one short sentence per request  vs  encode(batch_size=32)
  2. requests of 64 sentences (4 concurrent clients)         vs  encode(batch_size=32)
  3. one client, one sentence per request (latency)         vs  encode of one sentence
Each figure is the median of --rounds rounds; baseline and server rounds alternate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.sentence_fixtures import minilm_path, sentence_server

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "model",
    "server",
    "fast",
    "slow",
    "batch",
    "token",
    "embed",
    "vector",
    "query",
    "answer",
    "river",
    "stone",
    "light",
    "city",
    "music",
    "data",
]


def make_sentences(n: int) -> list[str]:
    import random

    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(n)]


async def http_throughput(url: str, sentences: list[str], per_request: int, clients: int) -> float:
    import aiohttp

    batches = [sentences[i : i + per_request] for i in range(0, len(sentences), per_request)]
    queue: asyncio.Queue = asyncio.Queue()
    for b in batches:
        queue.put_nowait(b)
    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn) as session:

        async def client() -> None:
            while not queue.empty():
                batch = queue.get_nowait()
                payload = {"input": batch[0] if per_request == 1 else batch}
                async with session.post(url + "/v1/embeddings", json=payload) as resp:
                    body = await resp.read()
                    assert resp.status == 200, body[:200]

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return len(sentences) / (time.perf_counter() - t0)


async def http_latency(url: str, sentences: list[str]) -> float:
    import aiohttp

    times = []
    async with aiohttp.ClientSession() as session:
        for s in sentences:
            t0 = time.perf_counter()
            async with session.post(url + "/v1/embeddings", json={"input": s}) as resp:
                await resp.read()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "sentence_throughput.json"))
    args = p.parse_args()

    from sentence_transformers import SentenceTransformer

    sentences = make_sentences(args.sentences)
    model = SentenceTransformer(minilm_path(), device="cpu")
    model.encode(sentences[:64], batch_size=32)  # warm up

    def encode_rate() -> float:
        t0 = time.perf_counter()
        model.encode(sentences, batch_size=32, normalize_embeddings=True)
        return len(sentences) / (time.perf_counter() - t0)

    def encode_latency() -> float:
        times = []
        for s in sentences[:100]:
            t0 = time.perf_counter()
            model.encode(s, normalize_embeddings=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    results: dict[str, list[float]] = {k: [] for k in ("encode_rate", "encode_latency", "http_1x32", "http_64x4", "http_latency")}
    log_dir = ROOT / "bench" / "results"
    log_dir.mkdir(parents=True, exist_ok=True)
    with sentence_server(log_dir, minilm_path(), "--task-type", "embedding") as url:
        asyncio.run(http_throughput(url, sentences[:128], 1, 32))  # warm up the server
        for r in range(args.rounds):
            results["encode_rate"].append(encode_rate())
            results["http_1x32"].append(asyncio.run(http_throughput(url, sentences, 1, 32)))
            results["http_64x4"].append(asyncio.run(http_throughput(url, sentences, 64, 4)))
            results["encode_latency"].append(encode_latency())
            results["http_latency"].append(asyncio.run(http_latency(url, sentences[:100])))
            print(f"round {r + 1}: " + ", ".join(f"{k}={v[-1]:.4g}" for k, v in results.items()), flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    summary = {
        "machine": f"{os.cpu_count()} cores",
        "sentences": args.sentences,
        "rounds": args.rounds,
        "encode_batch32_sentences_per_s": round(med["encode_rate"], 1),
        "http_32_clients_1_sentence_sentences_per_s": round(med["http_1x32"], 1),
        "ratio_32_clients_1_sentence": round(med["http_1x32"] / med["encode_rate"], 3),
        "http_64_sentence_requests_sentences_per_s": round(med["http_64x4"], 1),
        "ratio_64_sentence_requests": round(med["http_64x4"] / med["encode_rate"], 3),
        "encode_one_sentence_ms": round(med["encode_latency"] * 1000, 2),
        "http_one_sentence_ms": round(med["http_latency"] * 1000, 2),
        "latency_ratio_http_over_encode": round(med["http_latency"] / med["encode_latency"], 2),
    }
    Path(args.out).write_text(json.dumps({"summary": summary, "rounds": results}, indent=1))
    width = max(map(len, summary))
    for k, v in summary.items():
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
