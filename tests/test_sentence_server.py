"""The bundled sentence server, as a real process on the real MiniLM model and a tiny cross-encoder:
what needs real numerics (vectors equal to in-process encode, real token counts, cross-encoder
scores, the real tokenizer's limits). The routes' shapes, errors and limits are tested in the quick
suite with a stand-in model (tests/test_sentence_api.py)."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT, TAG_VAR, http_get, http_post
from .mixed_load import send_and_leave
from .mixed_load import sentences as mixed_sentences
from .sentence_fixtures import (
    KEY,
    assert_openai_error,
    build_tiny_cross_encoder,
    free_port,
    minilm_path,
    post,
    said_backend,
    sentence_server,
)

pytestmark = pytest.mark.slow

SENTENCES = [
    "The cat sits on the mat.",
    "A dog barks at the mailman.",
    "Stock markets fell sharply today.",
    "Quantum computers use qubits.",
]


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("sentence-logs")


@pytest.fixture(scope="module")
def embed_url(logs):
    args = [
        "--task-type",
        "embedding",
        "--model-name",
        "minilm",
        "--api-key",
        KEY,
        "--max-inputs",
        "100",
        "--max-body-bytes",
        "200000",
        "--max-queue",
        "300",
    ]
    with sentence_server(logs, minilm_path(), *args) as url:
        yield url


@pytest.fixture(scope="module")
def cross_encoder_path(tmp_path_factory):
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce"))


@pytest.fixture(scope="module")
def rerank_url(logs, cross_encoder_path):
    with sentence_server(logs, cross_encoder_path, "--task-type", "rerank", "--model-name", "tiny-ce", "--max-inputs", "50") as url:
        yield url


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path(), device="cpu")


@pytest.fixture(scope="module")
def ce_model(cross_encoder_path):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(cross_encoder_path, device="cpu")


# ------------------------------------------------------------------ health, models, auth
def test_health_is_503_while_loading_then_200(tmp_path):
    port = free_port()
    env = {**os.environ, TAG_VAR: os.environ.get(TAG_VAR, "sentence-health"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "servers.sentence", "--model-path", minilm_path(), "--port", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and 200 not in seen:
            try:
                status, body = http_get(f"http://127.0.0.1:{port}/health", timeout=2)
                seen.append(status)
                if status == 503:
                    assert body["status"] == "loading"
            except OSError:
                pass
            time.sleep(0.05)
        assert seen[0] == 503 and seen[-1] == 200, seen
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_health_reports_model_task_device_and_queue(embed_url):
    status, body = http_get(embed_url + "/health")  # open without the key
    assert status == 200
    assert body["status"] == "ok" and body["model"] == "minilm" and body["task"] == "embedding"
    assert body["device"] == "cpu" and body["queue_depth"] == 0 and body["dimensions"] == 384


# ------------------------------------------------------------------ embeddings
def test_vectors_equal_in_process_encode(embed_url, st_model):
    status, body, _ = post(embed_url, "/v1/embeddings", {"input": SENTENCES, "model": "minilm"})
    assert status == 200 and body["object"] == "list" and body["model"] == "minilm"
    got = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    want = st_model.encode(SENTENCES, normalize_embeddings=True)
    assert got.shape == (4, 384)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_usage_counts_real_tokens(embed_url, st_model):
    _status, body, _ = post(embed_url, "/v1/embeddings", {"input": SENTENCES})
    want = sum(len(ids) for ids in st_model.tokenizer(SENTENCES)["input_ids"])
    assert body["usage"] == {"prompt_tokens": want, "total_tokens": want}


def test_a_single_string_input(embed_url, st_model):
    status, body, _ = post(embed_url, "/v1/embeddings", {"input": "hello world"})
    assert status == 200 and len(body["data"]) == 1 and body["data"][0]["index"] == 0
    np.testing.assert_allclose(body["data"][0]["embedding"], st_model.encode("hello world", normalize_embeddings=True), atol=1e-5)


def test_token_id_input_equals_text_input(embed_url, st_model):
    ids = st_model.tokenizer(SENTENCES[:2])["input_ids"]
    _, by_text, _ = post(embed_url, "/v1/embeddings", {"input": SENTENCES[:2]})
    _, by_ids, _ = post(embed_url, "/v1/embeddings", {"input": ids})
    _, one, _ = post(embed_url, "/v1/embeddings", {"input": ids[0]})
    np.testing.assert_allclose([d["embedding"] for d in by_ids["data"]], [d["embedding"] for d in by_text["data"]], atol=1e-6)
    np.testing.assert_allclose(one["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-6)


def test_base64_encoding_is_little_endian_float32(embed_url):
    _, floats, _ = post(embed_url, "/v1/embeddings", {"input": SENTENCES})
    _, b64, _ = post(embed_url, "/v1/embeddings", {"input": SENTENCES, "encoding_format": "base64"})
    for f, b in zip(floats["data"], b64["data"], strict=True):
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_allclose(decoded, f["embedding"], atol=1e-7)


def test_dimensions_keep_a_renormalised_prefix(embed_url):
    _, full, _ = post(embed_url, "/v1/embeddings", {"input": "hello"})
    _, short, _ = post(embed_url, "/v1/embeddings", {"input": "hello", "dimensions": 64})
    vec = np.array(short["data"][0]["embedding"])
    prefix = np.array(full["data"][0]["embedding"][:64])
    assert vec.shape == (64,)
    np.testing.assert_allclose(vec, prefix / np.linalg.norm(prefix), atol=1e-5)


def test_the_openai_client_works_with_default_settings(embed_url, st_model):
    from openai import OpenAI

    client = OpenAI(base_url=embed_url + "/v1", api_key=KEY, max_retries=0)
    res = client.embeddings.create(model="minilm", input=SENTENCES)  # asks for base64 by default
    got = np.array([d.embedding for d in res.data])
    np.testing.assert_allclose(got, st_model.encode(SENTENCES, normalize_embeddings=True), atol=1e-5)
    assert res.usage.prompt_tokens > 0


def test_tei_embed_returns_bare_vectors(embed_url, st_model):
    status, body, _ = post(embed_url, "/embed", {"inputs": SENTENCES[:2]})
    assert status == 200 and isinstance(body, list) and len(body) == 2
    np.testing.assert_allclose(body, st_model.encode(SENTENCES[:2], normalize_embeddings=True), atol=1e-5)
    _, raw, _ = post(embed_url, "/embed", {"inputs": "hello", "normalize": False})
    # MiniLM's own pipeline ends in a Normalize module, so "not normalised" means what encode gives
    np.testing.assert_allclose(raw[0], st_model.encode("hello", normalize_embeddings=False), atol=1e-5)


def test_too_long_input_is_a_context_length_error_unless_truncation_is_asked(embed_url, st_model):
    long = "word " * 400
    status, body, _ = post(embed_url, "/v1/embeddings", {"input": long})
    assert status == 400
    assert_openai_error(body, "context_length_exceeded")
    assert "maximum context length is 256 tokens" in body["error"]["message"]
    status, body, _ = post(embed_url, "/embed", {"inputs": long})
    assert status == 413  # as TEI answers it
    assert_openai_error(body, "input_too_long")
    status, body, _ = post(embed_url, "/v1/embeddings", {"input": long, "truncate": True})
    assert status == 200 and body["usage"]["prompt_tokens"] == 256
    np.testing.assert_allclose(body["data"][0]["embedding"], st_model.encode(long, normalize_embeddings=True), atol=1e-5)
    status, body, _ = post(embed_url, "/embed", {"inputs": long, "truncate": True})
    assert status == 200


# ------------------------------------------------------------------ rerank (cross-encoder)
DOCS = [
    "Paris is the capital of France.",
    "The mitochondria is the powerhouse of the cell.",
    "Berlin is in Germany.",
    "Bananas are yellow.",
]
QUERY = "What is the capital of France?"


def test_cohere_rerank_scores_equal_cross_encoder_predict(rerank_url, ce_model):
    status, body, _ = http_post(rerank_url + "/v1/rerank", {"query": QUERY, "documents": DOCS})
    assert status == 200
    want = ce_model.predict([(QUERY, d) for d in DOCS])
    results = body["results"]
    assert [r["index"] for r in results] == list(np.argsort(-want))
    for r in results:
        assert r["relevance_score"] == pytest.approx(float(want[r["index"]]), abs=1e-5)
        assert r["document"] == {"text": DOCS[r["index"]]}
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True) and len(set(np.round(scores, 4))) > 1


def test_rerank_accepts_document_objects_top_n_and_no_documents(rerank_url):
    docs = [{"text": d} for d in DOCS]
    status, body, _ = http_post(rerank_url + "/v1/rerank", {"query": QUERY, "documents": docs, "top_n": 2, "return_documents": False})
    assert status == 200 and len(body["results"]) == 2
    assert all(set(r) == {"index", "relevance_score"} for r in body["results"])
    _, full, _ = http_post(rerank_url + "/v1/rerank", {"query": QUERY, "documents": DOCS})
    assert [r["index"] for r in body["results"]] == [r["index"] for r in full["results"][:2]]


def test_tei_rerank_shape_gets_a_bare_list(rerank_url, ce_model):
    status, body, _ = http_post(rerank_url + "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert status == 200 and isinstance(body, list) and len(body) == len(DOCS)
    want = ce_model.predict([(QUERY, d) for d in DOCS])
    for item in body:
        assert set(item) == {"index", "score", "text"} and item["text"] == DOCS[item["index"]]
        assert item["score"] == pytest.approx(float(want[item["index"]]), abs=1e-5)
    import torch

    raw = ce_model.predict([(QUERY, d) for d in DOCS], activation_fn=torch.nn.Identity())
    _, logits, _ = http_post(rerank_url + "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True})
    # the default backend runs the ONNX export: fp32 sums in another order, within 1e-4 of torch's
    assert {i["index"]: i["score"] for i in logits} == pytest.approx({i: float(s) for i, s in enumerate(raw)}, abs=1e-4)


def test_embeddings_on_a_rerank_server_is_404(rerank_url):
    status, body, _ = http_post(rerank_url + "/v1/embeddings", {"input": "x"})
    assert status == 404
    assert_openai_error(body, "wrong_task")


# ------------------------------------------------------------------ a RAG system's load
# A query's latency beside bulk indexing, and the bulk clients' pace, are a benchmark
# (bench/sentence_throughput.py, its mixed workload), not a test: tests/test_sentence_scheduling.py
# checks the express lane and round-robin batching that give them, deterministically.
def test_a_query_after_eight_abandoned_bulk_requests_is_answered_at_once(logs):
    """Eight clients send 2048 inputs each and leave 0.2 s later, their work queued and running; a
    query 0.5 s after they sent is answered 200 within 1 s (their 16384 inputs would take the
    model ~40 s here; before, every worker ran one whole request to its end)."""
    bulk = mixed_sentences(2048, seed=3)
    with sentence_server(logs, minilm_path(), "--task-type", "embedding") as url:
        assert post(url, "/v1/embeddings", {"input": "warm"})[0] == 200
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: send_and_leave(url, {"input": bulk}, stay=0.2), range(8)))
        time.sleep(0.3)
        t0 = time.monotonic()
        status, body, _ = post(url, "/v1/embeddings", {"input": "what is the capital of France?"})
        took = time.monotonic() - t0
        assert status == 200, body
        assert took < 1.0, f"the query took {took:.2f}s"
        _, health = http_get(url + "/health")
    print(f"\nquery 0.5 s after 8 abandoned 2048-input requests: {took * 1000:.0f} ms; queue then {health.get('queue_depth')}")


# ------------------------------------------------------------------ backend auto, the default
def _listening_pid(url: str) -> int:
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    raise AssertionError(f"nobody listens on {url}")


def test_a_server_from_a_cached_export_imports_neither_torch_nor_sentence_transformers(tmp_path):
    """The default backend on a CPU runs the model's ONNX export; started from a cached export (the
    one install.sh makes, else made here first), the server process maps no file of torch's or of
    sentence-transformers' (sentence-transformers imports torch: its C++ libraries would be there)."""
    cache = tmp_path / "cache"
    export = subprocess.run(
        [sys.executable, "-m", "servers.sentence.export", "--cache-dir", str(cache)],
        cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    with sentence_server(tmp_path, minilm_path(), "--cache-dir", str(cache)) as url:
        assert post(url, "/v1/embeddings", {"input": "hello"})[0] == 200
        maps = Path(f"/proc/{_listening_pid(url)}/maps").read_text()
        _, health = http_get(url + "/health")
    torch_files = sorted({line.split()[-1] for line in maps.splitlines() if "torch" in line or "sentence_transformers" in line})
    assert torch_files == [], torch_files
    assert health["backend"] == "onnx" and health["backend_reason"].startswith("auto: a CPU with ONNX Runtime"), health
    log = next(tmp_path.glob("sentence-*.log")).read_text()
    assert "backend onnx (auto: a CPU with ONNX Runtime" in log and "exported " not in log


def test_a_model_that_does_not_export_runs_on_torch_and_says_why(monkeypatch):
    """backend auto: an export that fails (here: the exporter raises) falls back to torch, with the
    reason in what /health and the log show; an explicit backend onnx fails instead."""
    from servers.sentence import exported
    from servers.sentence.app import encoder_factory
    from servers.sentence.encoder import ConfigurationError
    from servers.sentence.settings import ServerSettings

    def refuse(*args, **kwargs):
        raise RuntimeError("Exporting the operator 'aten::unsupported' to ONNX opset version 17 is not supported")

    monkeypatch.setattr(exported, "ensure_export", refuse)
    model = encoder_factory(ServerSettings(model_path=minilm_path()))(minilm_path(), "embedding", "cpu", 16384, 64)
    described = model.describe()
    assert described["backend"] == "torch"
    assert described["backend_reason"].startswith("auto: the model did not export to ONNX (RuntimeError: Exporting the operator")
    rows = model.tokenize(["hello world"], truncate=True)
    assert model.run(rows).shape == (1, 384)
    with pytest.raises(RuntimeError):
        encoder_factory(ServerSettings(model_path=minilm_path(), backend="onnx"))(minilm_path(), "embedding", "cpu", 16384, 64)
    with pytest.raises(ConfigurationError):  # int8 is never chosen by auto, and never asked of it
        encoder_factory(ServerSettings(model_path=minilm_path(), quantize="int8"))(minilm_path(), "embedding", "cpu", 16384, 64)


def test_a_default_sentence_server_under_modelctl_runs_the_export_and_says_so(mc):
    """The default profile's kind of server, under modelctl: backend auto, on the CPU the export
    made at install time; its /health, its log and `status` say what runs and why. A new spec
    (backend: torch) drops what the old instance said: status names what the new one runs."""

    path = mc.profile({"emb": {"kind": "sentence", "startup_timeout": 300}})
    assert mc.cli("up", "-p", str(path), timeout=400).returncode == 0
    row = said_backend(mc, "emb")  # read from /health off the supervisor's loop, once the server is ready
    assert row["model"] == "all-MiniLM-L6-v2 (bundled) [onnx]", row
    assert row["backend"] == "onnx" and row["backend_reason"] == "auto: a CPU with ONNX Runtime, the model's fp32 ONNX export", row
    _, health = http_get(row["url"] + "/health")
    assert health["backend"] == "onnx" and health["backend_reason"].startswith("auto: a CPU with ONNX Runtime"), health
    assert health["dtype"] == "float32", health
    log = mc.store.log_path(mc.ref("emb")).read_text()
    assert "backend onnx (auto: a CPU with ONNX Runtime, the model's fp32 ONNX export)" in log
    shown = mc.cli("status", "emb").stdout
    assert "backend onnx (auto: a CPU with ONNX Runtime, the model's fp32 ONNX export)" in " ".join(shown.split()), shown

    path = mc.profile({"emb": {"kind": "sentence", "startup_timeout": 300, "backend": "torch"}})
    assert mc.cli("up", "-p", str(path), timeout=400).returncode == 0
    row = said_backend(mc, "emb")
    assert row["model"] == "all-MiniLM-L6-v2 (bundled)" and row["backend"] == "torch", row
    assert row["backend_reason"] == "asked for (backend torch)", row
