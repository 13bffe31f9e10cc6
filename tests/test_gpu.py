"""On a machine with NVIDIA GPUs (skipped elsewhere): discovery through NVML and nvidia-smi, a
sentence server placed on its allocated GPU, and GPU memory released by `down`."""

from __future__ import annotations

import subprocess

import numpy as np
import psutil
import pytest

from modelctl.host.gpus import _nvidia_smi_ids, _nvml_ids

from .conftest import http_get, http_post
from .sentence_fixtures import build_tiny_cross_encoder, build_tiny_sentence_model, minilm_path, said_backend

pytestmark = [pytest.mark.slow, pytest.mark.gpu, pytest.mark.skipif(not _nvidia_smi_ids(), reason="no NVIDIA GPU on this machine")]


def gpu_pids() -> set[int]:
    out = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"], capture_output=True, text=True, check=True
    ).stdout
    return {int(x) for x in out.split() if x.strip().isdigit()}


def test_nvml_and_nvidia_smi_agree(monkeypatch):
    monkeypatch.delenv("MODELCTL_GPUS", raising=False)
    smi = _nvidia_smi_ids()
    nvml = _nvml_ids()
    assert smi and (nvml is None or nvml == smi)


def test_a_sentence_server_runs_on_its_gpu_and_down_frees_it(mc, monkeypatch):
    monkeypatch.delenv("MODELCTL_GPUS", raising=False)
    model = build_tiny_sentence_model(mc.tmp / "tiny-st")
    path = mc.profile({"emb": {"kind": "sentence", "model": model, "gpus": 1, "startup_timeout": 300}})
    env = {k: v for k, v in mc.env.items() if k not in ("MODELCTL_GPUS", "CUDA_VISIBLE_DEVICES")}
    res = subprocess.run(
        ["python3", "-m", "modelctl", "up", "-p", str(path)], capture_output=True, text=True, env=env, cwd=mc.tmp, timeout=600
    )
    assert res.returncode == 0, res.stdout + res.stderr
    row = mc.row("emb")
    assert row["gpus"] == [0]
    health = http_get(row["url"] + "/health")[1]
    assert health["device"] == "cuda" and health["model_workers"] == 1
    assert psutil.Process(row["pid"]).environ()["CUDA_VISIBLE_DEVICES"] == "0"
    assert row["pid"] in gpu_pids()  # the server holds GPU memory

    from sentence_transformers import SentenceTransformer

    texts = ["the cat", "a fast model server"]
    _status, body, _ = http_post(row["url"] + "/v1/embeddings", {"input": texts})
    want = SentenceTransformer(model, device="cpu").encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], want, atol=2e-3)

    assert subprocess.run(["python3", "-m", "modelctl", "down"], env=env, cwd=mc.tmp, timeout=120).returncode == 0
    assert row["pid"] not in gpu_pids()


MIXED = [
    "hi",
    "the cat sat on the mat",
    "a supervisor keeps every model server of the machine on its own port and restarts the ones that crash",
    " ".join(["long inputs are padded to the longest row of their batch"] * 12),
]


def test_backend_auto_on_a_gpu_runs_torch_in_fp16_says_so_and_keeps_the_vectors(mc, monkeypatch):
    """Backend auto (the default) on a CUDA device: torch in fp16. /health, `status` and the log
    say what runs and why; the bundled MiniLM's vectors stay those of fp32 on the CPU (cosine
    > 0.999 on inputs of mixed lengths); a cross-encoder's scores keep their order."""
    from sentence_transformers import CrossEncoder, SentenceTransformer

    monkeypatch.delenv("MODELCTL_GPUS", raising=False)
    env = {k: v for k, v in mc.env.items() if k not in ("MODELCTL_GPUS", "CUDA_VISIBLE_DEVICES")}

    def up(servers: dict) -> None:
        path = mc.profile(servers)
        res = subprocess.run(
            ["python3", "-m", "modelctl", "up", "-p", str(path)], capture_output=True, text=True, env=env, cwd=mc.tmp, timeout=600
        )
        assert res.returncode == 0, res.stdout + res.stderr

    up({"emb": {"kind": "sentence", "gpus": 1, "startup_timeout": 300, "env": {"HF_HUB_OFFLINE": "1"}}})
    row = said_backend(mc, "emb")
    health = http_get(row["url"] + "/health")[1]
    assert health["device"] == "cuda" and health["backend"] == "torch" and health["dtype"] == "float16", health
    assert health["backend_reason"] == "auto: a CUDA device, torch in fp16", health
    assert row["backend"] == "torch fp16" and row["model"] == "all-MiniLM-L6-v2 (bundled) [torch fp16]", row
    shown = subprocess.run(["python3", "-m", "modelctl", "status", "emb"], capture_output=True, text=True, env=env, cwd=mc.tmp).stdout
    assert "backend torch fp16 (auto: a CUDA device, torch in fp16)" in " ".join(shown.split()), shown
    assert "backend torch (auto: a CUDA device, torch in fp16)" in mc.store.log_path(mc.ref("emb")).read_text()
    print("emb startup", row["startup"])
    _status, body, _ = http_post(row["url"] + "/v1/embeddings", {"input": MIXED})
    got = np.array([d["embedding"] for d in body["data"]])
    want = SentenceTransformer(minilm_path(), device="cpu").encode(MIXED, normalize_embeddings=True)
    cosines = (got * want).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    print("fp16 on CUDA against fp32 on the CPU, cosines", cosines.round(6).tolist())
    assert cosines.min() > 0.999, cosines
    assert subprocess.run(["python3", "-m", "modelctl", "down"], env=env, cwd=mc.tmp, timeout=120).returncode == 0

    cross = build_tiny_cross_encoder(mc.tmp / "tiny-ce")
    up({"rr": {"kind": "sentence", "task": "rerank", "model": cross, "gpus": 1, "startup_timeout": 300}})
    row = said_backend(mc, "rr")
    assert row["backend"] in ("torch fp16", "torch"), row  # fp32 where the model is not finite in fp16, and said
    docs = MIXED[1:]
    _status, body, _ = http_post(row["url"] + "/v1/rerank", {"query": "a cat", "documents": docs, "return_documents": False})
    order = [r["index"] for r in body["results"]]
    want_scores = CrossEncoder(cross, device="cpu").predict([("a cat", d) for d in docs])
    print("rerank on CUDA", body["results"], "on the CPU", want_scores.tolist())
    assert order == sorted(range(len(docs)), key=lambda i: -want_scores[i]), (body, want_scores)
    assert subprocess.run(["python3", "-m", "modelctl", "down"], env=env, cwd=mc.tmp, timeout=120).returncode == 0


def test_more_gpus_than_the_machine_has_is_refused_before_starting(mc, monkeypatch):
    monkeypatch.delenv("MODELCTL_GPUS", raising=False)
    n = len(_nvidia_smi_ids() or [])
    path = mc.profile({"big": {"kind": "command", "command": ["sleep", "60"], "gpus": n + 1}})
    mc.env.pop("MODELCTL_GPUS", None)
    res = mc.cli("up", "-p", str(path))
    assert res.returncode != 0 and f"needs {n + 1} GPU(s)" in res.stderr


GPU_CHILD = """
import os, subprocess, sys, time
if len(sys.argv) > 2 and sys.argv[2] == 'child':
    import torch
    held = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device='cuda')  # 256 MiB, like vLLM's workers
    print('allocated', flush=True)
    time.sleep(3600)
subprocess.Popen([sys.executable, __file__, sys.argv[1], 'child'])
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b'ok')
ThreadingHTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"""


def test_gpu_memory_is_summed_over_the_servers_processes(mc, monkeypatch):
    """The API process holds no GPU memory; its child does (as vLLM's EngineCore and workers)."""
    monkeypatch.delenv("MODELCTL_GPUS", raising=False)
    script = mc.tmp / "gpu_child.py"
    script.write_text(GPU_CHILD)
    path = mc.profile({"g": {"kind": "command", "command": ["python3", str(script), "{port}"], "gpus": 1, "health": {"http": "/"}}})
    env = {k: v for k, v in mc.env.items() if k not in ("MODELCTL_GPUS", "CUDA_VISIBLE_DEVICES")}
    res = subprocess.run(
        ["python3", "-m", "modelctl", "up", "-p", str(path)], capture_output=True, text=True, env=env, cwd=mc.tmp, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    row = wait_for_gpu_memory(mc)
    assert row["gpu_memory"] >= 256 * 2**20
    assert row["pid"] not in gpu_pids()  # the leader itself holds none
    out = subprocess.run(["python3", "-m", "modelctl", "status"], capture_output=True, text=True, env=env, cwd=mc.tmp).stdout
    assert "gpu mem" in out
    subprocess.run(["python3", "-m", "modelctl", "down"], env=env, cwd=mc.tmp, timeout=120)


def wait_for_gpu_memory(mc):
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        row = mc.row("g")
        if row.get("gpu_memory"):
            return row
        time.sleep(0.5)
    raise AssertionError(f"no GPU memory seen: {mc.row('g')}")
