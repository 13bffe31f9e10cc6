"""Single-request latency of the bundled server against another commit's, interleaved.

    .venv/bin/python bench/latency_ab.py --against f6b7253 [--requests 1200] [--server-args "--backend onnx"]

One-sentence latency differs by a few milliseconds from one server start to the next (where the
threads land), more than a change to the request path does. So both servers run at once, and
one client sends each sentence to one and then the other, alternating which goes first. Both see
the same machine, the same moment and the same sentences. It prints the median, mean and 10th
percentile per server, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.sentence_throughput import make_sentences, tree_of
from tests.sentence_fixtures import minilm_path, sentence_server


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--against", required=True, help="the git ref whose server is compared (e.g. main)")
    p.add_argument("--requests", type=int, default=1200)
    p.add_argument("--server-args", default="", help="extra flags for both servers")
    args = p.parse_args()
    sentences = make_sentences(512)
    log_dir = ROOT / "bench" / "results"
    log_dir.mkdir(parents=True, exist_ok=True)
    roots = {"this tree": ROOT, args.against: tree_of(args.against)}
    with contextlib.ExitStack() as stack:
        conns = {}
        for name, root in roots.items():
            url = stack.enter_context(
                sentence_server(log_dir, minilm_path(), "--task-type", "embedding", *args.server_args.split(), root=root)
            )
            host, port = url.split("//")[1].split(":")
            conns[name] = http.client.HTTPConnection(host, int(port), timeout=60)
        names = list(roots)
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(args.requests):
            body = json.dumps({"input": sentences[i % len(sentences)]})
            for name in names if i % 2 else reversed(names):
                t0 = time.perf_counter()
                conns[name].request("POST", "/v1/embeddings", body, {"Content-Type": "application/json"})
                resp = conns[name].getresponse()
                resp.read()
                assert resp.status == 200, resp.status
                times[name].append(time.perf_counter() - t0)
    medians = {}
    for name, measured in times.items():
        t = sorted(measured[100:])  # the first requests warm up
        medians[name] = statistics.median(t)
        print(f"{name}: median {medians[name] * 1000:.2f} ms, mean {statistics.mean(t) * 1000:.2f} ms, p10 {t[len(t) // 10] * 1000:.2f} ms")
    print(f"ratio of medians (this tree / {args.against}): {medians['this tree'] / medians[args.against]:.3f}")


if __name__ == "__main__":
    main()
