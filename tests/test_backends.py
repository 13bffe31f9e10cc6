"""The bundled server's CPU fast path: the model exported to ONNX, on ONNX Runtime (also int8) and
OpenVINO, against sentence-transformers on torch — same vectors, same rerank order, the export
made once and reused, and no torch in a server that runs a cached export."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from servers.sentence.exported import ExportedEncoder
from servers.sentence.model import SentenceTransformerEncoder

from .conftest import http_post
from .sentence_fixtures import SHORT_INPUTS, accuracy_sentences, build_tiny_cross_encoder, minilm_path, sentence_server
from .test_cli import status_json

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("onnxruntime") is None or importlib.util.find_spec("openvino") is None,
        reason="the fast-path backends are not installed (./install.sh --fast)",
    ),
]

SENTENCES = [
    "The cat sits on the mat.",
    "A dog barks at the mailman every single morning before breakfast.",
    "Stock markets fell sharply today after the central bank raised rates.",
    "Quantum computers use qubits.",
    "naïve café — déjà vu",
    "日本語のテキストも埋め込みます。",
    "word " * 120,
    "Short.",
]
QUERY = "What is the capital of France?"
DOCS = [
    "Paris is the capital of France.",
    "The mitochondria is the powerhouse of the cell.",
    "Berlin is in Germany.",
    "Bananas are yellow.",
]
INT8_MIN_COSINE = 0.99  # measured min 0.991 over tests/sentence_fixtures.accuracy_sentences (short inputs included)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export-cache")


def encoders(path: str, task: str, cache: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"torch": SentenceTransformerEncoder(path, task, "cpu", 16384, 64)}
    for name, backend, quantize in (("onnx", "onnx", None), ("onnx-int8", "onnx", "int8"), ("openvino", "openvino", None)):
        out[name] = ExportedEncoder(path, task, "cpu", 16384, 64, backend=backend, quantize=quantize, cache_dir=cache)
    for enc in out.values():
        enc.set_threads(2, None)
    return out


@pytest.fixture(scope="module")
def own_minilm(tmp_path_factory) -> str:
    """MiniLM copied where install.sh did not export it (it exports the bundled one into the
    environment, which every server reads first): its export is made at its first start."""
    import shutil

    return str(shutil.copytree(minilm_path(), tmp_path_factory.mktemp("own-model") / "minilm"))


@pytest.fixture(scope="module")
def embedders(cache):
    return encoders(minilm_path(), "embedding", cache)


def test_every_backend_gives_the_torch_vectors(embedders):
    rows = embedders["torch"].tokenize(SENTENCES, truncate=True)
    want = embedders["torch"].run(rows)
    for name in ("onnx", "openvino"):
        enc = embedders[name]
        assert [r.ids for r in enc.tokenize(SENTENCES, truncate=True)] == [r.ids for r in rows]
        got = enc.run(rows)
        assert got.shape == want.shape
        assert cosine(got, want).min() > 0.999, name
        # in other batch shapes too (the graph was traced on one)
        for i in range(0, len(rows), 3):
            assert cosine(enc.run(rows[i : i + 3]), want[i : i + 3]).min() > 0.999, name
    int8 = cosine(embedders["onnx-int8"].run(rows), want)
    print(f"\nint8 cosine to fp32: min {int8.min():.4f}, mean {int8.mean():.4f}")
    assert int8.min() > INT8_MIN_COSINE


def test_int8_stays_close_to_fp32_on_a_fixed_set_with_very_short_inputs(embedders):
    """int8 with SmoothQuant calibrated on servers/sentence/calibration.py (another set) and the
    down projections in fp32: every vector of the fixed set within cosine 0.99 of fp32's, in the
    batches the server forms (32), where one short input shares its activation scale with others."""
    texts = accuracy_sentences()
    rows = embedders["torch"].tokenize(texts, truncate=True)
    want = np.concatenate([embedders["onnx"].run(rows[i : i + 32]) for i in range(0, len(rows), 32)])
    got = np.concatenate([embedders["onnx-int8"].run(rows[i : i + 32]) for i in range(0, len(rows), 32)])
    cos = cosine(got, want)
    print(f"\nint8 on the fixed set: min {cos.min():.4f} ({texts[int(cos.argmin())]!r}), mean {cos.mean():.4f}")
    assert cos[: len(SHORT_INPUTS)].min() >= INT8_MIN_COSINE and cos.min() >= INT8_MIN_COSINE


def test_the_rerank_order_is_the_same_on_every_backend(cache, tmp_path_factory):
    ce_path = build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce"))
    for path in (ce_path, minilm_path()):  # a cross-encoder, and a bi-encoder reranking by cosine
        encs = encoders(path, "rerank", cache)
        if encs["torch"].cross_encoder:
            rows = encs["torch"].tokenize_pairs(QUERY, DOCS, truncate=True)
            scores = {name: e.activate(e.run(rows)) for name, e in encs.items()}
        else:
            rows = encs["torch"].tokenize([QUERY, *DOCS], truncate=True)
            scores = {}
            for name, e in encs.items():
                v = e.run(rows)
                scores[name] = cosine(v[1:], np.repeat(v[:1], len(DOCS), axis=0))
        want = list(np.argsort(-scores["torch"]))
        for name in ("onnx", "openvino"):
            assert list(np.argsort(-scores[name])) == want, (path, name, scores[name])
            np.testing.assert_allclose(scores[name], scores["torch"], atol=1e-4)
        assert scores["onnx-int8"].shape == scores["torch"].shape and np.isfinite(scores["onnx-int8"]).all()
        if path == minilm_path():
            # int8 keeps the order on trained weights; the tiny cross-encoder's random wide weights
            # (built so that its scores differ) are no measure of int8's loss, so only its shape counts
            assert list(np.argsort(-scores["onnx-int8"])) == want, (path, scores["onnx-int8"])


def test_a_server_on_onnx_answers_the_torch_vectors_and_reuses_its_export(tmp_path, own_minilm):
    from sentence_transformers import SentenceTransformer

    cache_dir = tmp_path / "cache"
    args = ["--backend", "onnx", "--cache-dir", str(cache_dir)]
    want = SentenceTransformer(minilm_path(), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    with sentence_server(tmp_path, own_minilm, *args) as url:
        status, body, _ = http_post(url + "/v1/embeddings", {"input": SENTENCES, "truncate": True})
        assert status == 200
        np.testing.assert_allclose([d["embedding"] for d in body["data"]], want, atol=1e-5)
    (graph,) = cache_dir.glob("onnx/*/model.onnx")
    made = graph.stat().st_mtime_ns
    first_log = next(tmp_path.glob("sentence-*.log")).read_text()
    assert f"exported {own_minilm} to" in first_log
    for log in tmp_path.glob("sentence-*.log"):
        log.unlink()
    with sentence_server(tmp_path, own_minilm, *args) as url:
        assert http_post(url + "/v1/embeddings", {"input": "x"})[0] == 200
        pid = _pid_of(url)
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps  # a cached export runs without torch
    second_log = next(tmp_path.glob("sentence-*.log")).read_text()
    assert "using the cached export" in second_log and "exported" not in second_log
    assert graph.stat().st_mtime_ns == made


def test_a_server_on_int8_answers_close_vectors_and_keeps_logging(tmp_path):
    from sentence_transformers import SentenceTransformer

    args = ["--backend", "onnx", "--quantize", "int8", "--cache-dir", str(tmp_path / "cache")]
    want = SentenceTransformer(minilm_path(), device="cpu").encode(SENTENCES, normalize_embeddings=True)
    with sentence_server(tmp_path, minilm_path(), *args) as url:
        status, body, _ = http_post(url + "/v1/embeddings", {"input": SENTENCES, "truncate": True})
        assert status == 200
        got = np.array([d["embedding"] for d in body["data"]])
        assert cosine(got, want).min() > INT8_MIN_COSINE
    log = next(tmp_path.glob("sentence-*.log")).read_text()
    # quantizing quiets the root logger for a moment; the server's own lines after it still show
    assert "quantized" in log and log.index("quantized") < log.index("loaded on cpu")


def test_modelctl_runs_a_sentence_server_on_onnx_and_keeps_its_export_in_the_state_dir(mc, own_minilm):
    path = mc.profile({"emb": {"kind": "sentence", "backend": "onnx", "model": own_minilm, "startup_timeout": 300}})
    assert mc.cli("up", "-p", str(path), timeout=400).returncode == 0
    row = status_json(mc)["emb"]
    assert row["model"] == f"{own_minilm} [onnx]"
    (graph,) = (mc.state_dir / "cache").glob("onnx/*/model.onnx")
    made = graph.stat().st_mtime_ns
    assert mc.cli("restart", "emb", timeout=400).returncode == 0
    log = mc.store.log_path(mc.ref("emb")).read_text()
    assert log.count("using the cached export") == 1 and log.count(f"exported {own_minilm}") == 1
    assert graph.stat().st_mtime_ns == made
    status, body, _ = http_post(status_json(mc)["emb"]["url"] + "/v1/embeddings", {"input": "hello"})
    assert status == 200 and len(body["data"][0]["embedding"]) == 384


def _pid_of(url: str) -> int:
    import psutil

    port = int(url.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    raise AssertionError("nobody listens")


def test_a_concurrent_start_exports_once(tmp_path, own_minilm):
    """Two servers of the same model starting at once: one exports, the other waits and reuses it."""
    import subprocess
    import sys

    cache_dir = tmp_path / "cache"
    code = (
        "import sys, logging; logging.basicConfig(level=logging.INFO); from servers.sentence.exported import ensure_export; "
        f"ensure_export({own_minilm!r}, 'embedding', __import__('pathlib').Path({str(cache_dir)!r}), None)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    logs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum("exported" in log for log in logs) == 1 and sum("using the cached export" in log for log in logs) == 1
    assert len(list(cache_dir.glob("onnx/*/model.onnx"))) == 1 and not list(cache_dir.glob("onnx/*/*.tmp"))
