"""Throughput and latency of the bundled sentence server against in-process encode, as ratios.

    .venv/bin/python bench/sentence_throughput.py [--rounds 3] [--sentences 512]
        [--backends torch,auto,onnx,onnx-int8,openvino] [--corpora template,mixed]
        [--server-args "--model-workers 1"]

Measures, in one run on the same machine and the same model (MiniLM, CPU), for each backend of
the server (auto, the default: the ONNX export on ONNX Runtime where it is installed; torch; onnx
asked for by name, also int8-quantized; OpenVINO), on two corpora of --sentences sentences each:
the template (6 to 14 words) and mixed lengths (3 to 60 words from a fixed vocabulary, seeded):
  1. 32 concurrent clients, one sentence per request  vs  encode(batch_size=32) of the same corpus
  2. requests of 64 sentences (4 concurrent clients)   vs  encode(batch_size=32)
  3. one client, one sentence per request (latency)   vs  encode of one sentence; twice: with
     aiohttp's client, and with the standard library's http.client on a kept-alive connection
     (a lean client: on two cores the client's own CPU is a part of the latency)
  4. a RAG system's mixed load: one-sentence queries beside two clients sending 1024 sentences
     per request, as ratios to each alone (query p90 latency; bulk sentences per second)
and the server's resident memory. The baseline is in-process torch sentence-transformers. Every
backend's server runs at once and they are measured in turn within each round, beside that
round's baseline; each ratio is the median over --rounds rounds of a round's figure over its
baseline, so that a shared machine's drifting load moves every row alike; the servers take turns
at going first in a round (use an even --rounds for two).

    --against REF[,REF]   also measure the server of another commit (e.g. main) in the same run,
                          on that commit's default backend
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTLE_SECONDS = 1.0  # after the in-process baseline, before a server is measured
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.mixed_load import mixed_workload
from tests.sentence_fixtures import WORDS as FIXTURE_WORDS
from tests.sentence_fixtures import accuracy_sentences, minilm_path, sentence_server

WORDS = [*FIXTURE_WORDS, "music", "data"]


def make_sentences(n: int) -> list[str]:
    """The template: short sentences of 6 to 14 words."""
    import random

    rng = random.Random(7)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))).capitalize() + "." for _ in range(n)]


# a fixed vocabulary for text shaped like real text: sentences of 3 to 60 words, so that a batch of
# them pads, where the template's barely does
_MORE_WORDS = """time year people way day man thing woman life child world school state family student group
    country problem hand part place case week company system program question work government number
    night point home water room mother area money story fact month lot right study book eye job word
    business issue side kind head house service friend father power hour game line end member law car
    market price report result change reason research girl guy moment air teacher force education
    because although however therefore which while during before after between against without
    quickly slowly carefully recently often never always usually important different large small new
    old good great high long little own public private early young major local national international"""
MIXED_WORDS = [*WORDS, *_MORE_WORDS.split()]


def make_mixed_sentences(n: int) -> list[str]:
    """Mixed lengths: n sentences of 3 to 60 words from MIXED_WORDS, seeded."""
    import random

    rng = random.Random(30)
    return [" ".join(rng.choice(MIXED_WORDS) for _ in range(rng.randint(3, 60))).capitalize() + "." for _ in range(n)]


CORPORA = {"template": make_sentences, "mixed": make_mixed_sentences}


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


def http_latency_lean(url: str, sentences: list[str]) -> float:
    """As http_latency, with http.client on one kept-alive connection: what the server adds, less
    of the client's own work."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    times = []
    try:
        for s in sentences:
            body = json.dumps({"input": s})
            t0 = time.perf_counter()
            conn.request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            resp.read()
            times.append(time.perf_counter() - t0)
            assert resp.status == 200
    finally:
        conn.close()
    return statistics.median(times)


async def cosine_to(url: str, sentences: list[str], reference: object) -> tuple[float, float]:
    """Min and mean cosine of the server's vectors to in-process torch ones, over the sentence set."""
    import aiohttp
    import numpy as np

    vectors = []
    async with aiohttp.ClientSession() as session:
        for i in range(0, len(sentences), 64):
            async with session.post(url + "/v1/embeddings", json={"input": sentences[i : i + 64]}) as resp:
                vectors += [d["embedding"] for d in (await resp.json())["data"]]
    got, want = np.array(vectors), np.asarray(reference)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    return float(cos.min()), float(cos.mean())


BACKEND_ARGS = {
    "auto": [],
    "torch": ["--backend", "torch"],
    "onnx": ["--backend", "onnx"],
    "onnx-int8": ["--backend", "onnx", "--quantize", "int8"],
    "onnx-1x2": ["--backend", "onnx", "--model-workers", "1"],  # one worker on every core (the default)
    "onnx-2x1": ["--backend", "onnx", "--model-workers", "2"],  # one single-threaded worker per core
    "openvino": ["--backend", "openvino"],
}


def server_rss(url: str) -> int:
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return int(psutil.Process(conn.pid).memory_info().rss)
    return 0


def tree_of(ref: str) -> Path:
    """The servers/ of another commit, unpacked once under bench/results/trees/."""
    import subprocess

    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    target = ROOT / "bench" / "results" / "trees" / sha
    if not (target / "servers").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "archive", sha, "servers"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--sentences", type=int, default=512)
    p.add_argument("--backends", default=None, help="default: torch, auto (the default: onnx on a CPU) and every other installed one")
    p.add_argument("--server-args", default="", help="extra flags for every server, e.g. '--model-workers 1'")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "sentence_throughput.json"))
    p.add_argument("--against", default="", help="git refs whose servers are measured too, each on its own default backend (e.g. main)")
    p.add_argument("--no-mixed", action="store_true", help="skip the mixed workload (query beside bulk)")
    p.add_argument("--corpora", default="template,mixed", help="template (6-14 words), mixed (3-60 words), or both")
    args = p.parse_args()
    if args.backends is None:
        import importlib.util

        needs = {"torch": "torch", "auto": "onnxruntime", "onnx-int8": "onnx", "openvino": "openvino"}
        backends = [b for b, module in needs.items() if importlib.util.find_spec(module) is not None]
        if len(backends) < len(needs):
            print(f"measuring {', '.join(backends)}; ./install.sh --fast adds the others")
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    from sentence_transformers import SentenceTransformer

    corpora = {name: CORPORA[name](args.sentences) for name in args.corpora.split(",")}
    model = SentenceTransformer(minilm_path(), device="cpu")
    for texts in corpora.values():
        model.encode(texts[:64], batch_size=32)  # warm up

    def encode_rate(texts: list[str]) -> float:
        t0 = time.perf_counter()
        model.encode(texts, batch_size=32, normalize_embeddings=True)
        return len(texts) / (time.perf_counter() - t0)

    def encode_latency(texts: list[str]) -> float:
        times = []
        for s in texts[:100]:
            t0 = time.perf_counter()
            model.encode(s, normalize_embeddings=True)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    log_dir = ROOT / "bench" / "results"
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MODELCTL_CACHE_DIR", str(log_dir / "cache"))  # exports are made once, then reused
    # per corpus: in-process encode's rate and one-sentence latency, measured between the servers' rounds
    baseline: dict[str, dict[str, list[float]]] = {c: {"encode_rate": [], "encode_latency": []} for c in corpora}
    per_backend: dict[str, dict[str, dict[str, list[float]]]] = {}
    rss: dict[str, int] = {}
    accuracy_set = accuracy_sentences()  # the short inputs too
    reference = model.encode(accuracy_set, batch_size=32, normalize_embeddings=True)
    accuracy: dict[str, tuple[float, float]] = {}
    runs = [(b, b, ROOT) for b in backends] + [(f"default@{ref}", "torch", tree_of(ref)) for ref in args.against.split(",") if ref]
    mixed: dict[str, list[float]] = {}
    # every server runs at once and they are measured in turn, round by round, each beside the same
    # in-process baseline: a machine whose load drifts (a shared CI runner) moves them all alike
    with contextlib.ExitStack() as stack:
        urls: dict[str, str] = {}
        for name, backend, root in runs:
            if backend not in ("torch", "auto"):  # export first: the servers then start as they do on every restart
                from servers.sentence.exported import ensure_export

                quantize = "int8" if backend.endswith("int8") else None
                ensure_export(minilm_path(), "embedding", Path(os.environ["MODELCTL_CACHE_DIR"]), quantize)
            per_backend[name] = {c: {"http_1x32": [], "http_64x4": [], "http_latency": [], "http_latency_lean": []} for c in corpora}
            own = BACKEND_ARGS[backend] if root == ROOT else []  # another commit's server runs its own default
            server_args = ["--task-type", "embedding", *own, *args.server_args.split()]
            urls[name] = url = stack.enter_context(sentence_server(log_dir, minilm_path(), *server_args, root=root))
            for texts in corpora.values():
                asyncio.run(http_throughput(url, texts[:128], 1, 32))  # warm up the server
            accuracy[name] = asyncio.run(cosine_to(url, accuracy_set, reference))
        for r in range(args.rounds):
            # the servers take turns at going first, and each is warmed again before it is measured:
            # the one measured right after the in-process baseline ran up to 20% slower, so a fixed
            # order favoured the later ones; an even --rounds gives each the first place alike
            shift = r % len(urls)
            order = list(urls.items())[shift:] + list(urls.items())[:shift]
            for corpus, texts in corpora.items():
                baseline[corpus]["encode_rate"].append(encode_rate(texts))
                time.sleep(SETTLE_SECONDS)
                for name, url in order:
                    results = per_backend[name][corpus]
                    asyncio.run(http_throughput(url, texts[:128], 1, 32))  # warm again after the baseline's run
                    results["http_1x32"].append(asyncio.run(http_throughput(url, texts, 1, 32)))
                    results["http_64x4"].append(asyncio.run(http_throughput(url, texts, 64, 4)))
                baseline[corpus]["encode_latency"].append(encode_latency(texts))
                time.sleep(SETTLE_SECONDS)
                for name, url in order:
                    results = per_backend[name][corpus]
                    results["http_latency"].append(asyncio.run(http_latency(url, texts[:100])))
                    results["http_latency_lean"].append(http_latency_lean(url, texts[:100]))
                    print(f"{name} {corpus} round {r + 1}: " + ", ".join(f"{k}={v[-1]:.4g}" for k, v in results.items()), flush=True)
        for name, url in urls.items():
            if not args.no_mixed:
                got = mixed_workload(url)
                print(f"{name} mixed workload: {got.line()}", flush=True)
                mixed[name] = [got.p90_ratio, got.bulk_ratio, got.query_alone_p90, got.query_mixed_p90]
            rss[name] = server_rss(url)

    rate = {c: statistics.median(b["encode_rate"]) for c, b in baseline.items()}
    latency = {c: statistics.median(b["encode_latency"]) for c, b in baseline.items()}
    summary: dict[str, object] = {
        "machine": f"{os.cpu_count()} cores",
        "sentences": args.sentences,
        "rounds": args.rounds,
        **{f"baseline_{c}_in_process_torch_encode_batch32_sentences_per_s": round(rate[c], 1) for c in corpora},
        **{f"baseline_{c}_in_process_torch_encode_one_sentence_ms": round(latency[c] * 1000, 2) for c in corpora},
    }
    table = []
    for backend, by_corpus in per_backend.items():
        row: dict[str, object] = {"backend": backend}
        for c, results in by_corpus.items():
            # each round's figure over the baseline of the same round, then the median of those ratios
            base = baseline[c]
            ratio = {
                k: statistics.median(
                    x / b for x, b in zip(v, base["encode_latency" if k.startswith("http_latency") else "encode_rate"], strict=True)
                )
                for k, v in results.items()
            }
            row[f"{c}_32x1"] = round(ratio["http_1x32"], 3)
            row[f"{c}_64x4"] = round(ratio["http_64x4"], 3)
            row[f"{c}_1_ms"] = round(statistics.median(results["http_latency"]) * 1000, 2)
            row[f"{c}_1_vs_encode"] = round(ratio["http_latency"], 2)
            row[f"{c}_1_lean_ms"] = round(statistics.median(results["http_latency_lean"]) * 1000, 2)
            row[f"{c}_1_lean_vs_encode"] = round(ratio["http_latency_lean"], 2)
            if "torch" in per_backend:  # the torch server of the same round
                torch_1x32 = per_backend["torch"][c]["http_1x32"]
                row[f"{c}_32x1_vs_torch"] = round(
                    statistics.median(x / t for x, t in zip(results["http_1x32"], torch_1x32, strict=True)), 2
                )
        row["server_rss_mib"] = round(rss[backend] / 2**20)
        if backend in mixed:
            row["query_beside_bulk_p90_ratio"] = round(mixed[backend][0], 2)
            row["bulk_beside_queries_ratio"] = round(mixed[backend][1], 2)
            row["query_p90_alone_ms"] = round(mixed[backend][2] * 1000, 1)
            row["query_p90_beside_bulk_ms"] = round(mixed[backend][3] * 1000, 1)
        row["cosine_to_torch_min"] = round(accuracy[backend][0], 5)
        row["cosine_to_torch_mean"] = round(accuracy[backend][1], 6)
        table.append(row)
    Path(args.out).write_text(json.dumps({"summary": summary, "backends": table, "baseline": baseline, "rounds": per_backend}, indent=1))
    for k, v in summary.items():
        print(f"{k}: {v}")
    columns = list(table[0])
    print("  ".join(f"{c:>{max(len(c), 10)}}" for c in columns))
    for row in table:
        print("  ".join(f"{row.get(c, '')!s:>{max(len(c), 10)}}" for c in columns))


if __name__ == "__main__":
    main()
