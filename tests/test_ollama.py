"""The ollama kind against a stand-in Ollama server (tests/fake_ollama.py) that speaks Ollama's
HTTP protocol, as an external host and as a managed server; and against a real `ollama` binary
when one is on PATH."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from modelctl.backends.ollama.models import OllamaError, ensure_model
from modelctl.profile import parse_server

from .conftest import ROOT, http_get, http_post, wait_for
from .sentence_fixtures import free_port

FAKE = ROOT / "tests" / "fake_ollama.py"


class FakeOllama:
    """A running stand-in: its URL, its request log, its model directory."""

    def __init__(self, mc, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.models_dir = mc.tmp / "ollama-models"
        self.log_path = mc.tmp / "ollama-requests.jsonl"
        registry = mc.tmp / "registry.json"
        registry.write_text(json.dumps({"tiny:latest": {"size": 5_000_000}, "other:7b": {"size": 1_000_000}}))
        self.env = {
            "OLLAMA_MODELS": str(self.models_dir),
            "FAKE_OLLAMA_REGISTRY": str(registry),
            "FAKE_OLLAMA_LOG": str(self.log_path),
            **env,
        }
        self.proc: subprocess.Popen | None = None
        self.mc = mc

    def start(self) -> FakeOllama:
        env = {**self.mc.env, **self.env, "OLLAMA_HOST": f"127.0.0.1:{self.port}"}
        self.proc = subprocess.Popen(
            [sys.executable, str(FAKE), "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(lambda: _answers(self.url), 30, what="the stand-in Ollama")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def requests(self, path: str | None = None, method: str | None = None) -> list[dict]:
        if not self.log_path.exists():
            return []
        entries = [json.loads(line) for line in self.log_path.read_text().splitlines()]
        return [e for e in entries if (path is None or e["path"].startswith(path)) and (method is None or e["method"] == method)]

    def clear_log(self) -> None:
        self.log_path.unlink(missing_ok=True)

    def wrapper(self) -> str:
        """An `ollama`-like executable for a managed server: `<wrapper> serve`."""
        path = self.mc.tmp / "ollama"
        path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE} "$@"\n')
        path.chmod(0o755)
        return str(path)


def _answers(url: str) -> bool:
    try:
        return http_get(url + "/api/version", timeout=1)[0] == 200
    except OSError:
        return False


@pytest.fixture
def fake(mc):
    server = FakeOllama(mc).start()
    yield server
    server.stop()


def spec_for(mc, **keys):
    return parse_server("llm", {"kind": "ollama", **keys}, str(mc.tmp / "p.yaml"), "p")


def collect():
    reports: list[dict] = []
    return reports, reports.append


# ------------------------------------------------------------------ external host
def test_a_present_model_is_used_without_pulling(mc, fake):
    assert http_post(fake.url + "/api/pull", {"model": "tiny", "stream": False})[0] == 200
    fake.clear_log()
    path = mc.profile({"llm": {"kind": "ollama", "model": "tiny", "host": fake.url}})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    assert fake.requests("/api/pull") == [] and fake.requests("/api/create") == []
    row = mc.row("llm")
    assert row["state"] == "ready" and row["model"] == "tiny:latest" and row["url"] == fake.url
    assert row["pid"] is None  # nothing of ours runs for an external server
    assert fake.url in mc.cli("status").stdout and "tiny:latest" in mc.cli("status").stdout
    assert mc.cli("down").returncode == 0
    assert _answers(fake.url)  # an external Ollama is never stopped by modelctl


def test_gguf_import_uploads_the_blob_once_and_creates_with_files(mc, fake):
    gguf = mc.tmp / "my-model.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(300_000))
    spec = spec_for(mc, model="mine:q4", model_path=str(gguf), host=fake.url)
    reports, report = collect()
    info = ensure_model(spec, fake.url, report)
    assert info["model"] == "mine:q4" and info["action"] == "imported"
    uploads = fake.requests("/api/blobs", "POST")
    creates = fake.requests("/api/create")
    assert len(uploads) == 1 and uploads[0]["bytes"] == gguf.stat().st_size
    assert len(creates) == 1 and creates[0]["files"] == {"my-model.gguf": uploads[0]["digest"]}
    assert creates[0]["has_modelfile"] is False
    assert reports and reports[-1]["completed"] == reports[-1]["total"]

    assert http_post(fake.url + "/api/pull", None, raw=b"")[0] == 400  # bad JSON is refused, server fine
    req = __import__("urllib.request").request.Request(fake.url + "/api/delete", data=b'{"model": "mine:q4"}', method="DELETE")
    __import__("urllib.request").request.urlopen(req, timeout=5)
    info = ensure_model(spec, fake.url, report)  # the model is gone, the blob is not
    assert info["action"] == "imported"
    assert len(fake.requests("/api/blobs", "POST")) == 1  # not uploaded again
    assert len(fake.requests("/api/blobs", "HEAD")) == 2 and len(fake.requests("/api/create")) == 2


def test_safetensors_directory_import(mc, fake):
    d = mc.tmp / "hf-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 64}))
    (d / "model.safetensors").write_bytes(os.urandom(200_000))
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (d / "tokenizer_config.json").write_text('{"model_max_length": 2048}')
    (d / "README.md").write_text("not a model file")
    info = ensure_model(spec_for(mc, model="hf-mine", model_path=str(d), host=fake.url), fake.url, lambda r: None)
    assert info["action"] == "imported" and info["model"] == "hf-mine:latest"
    files = fake.requests("/api/create")[0]["files"]
    assert set(files) == {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert len(fake.requests("/api/blobs", "POST")) == 4


def test_an_unsupported_architecture_is_a_clear_error(mc, fake):
    d = mc.tmp / "odd-model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["TimeMachineForCausalLM"]}))
    (d / "model.safetensors").write_bytes(b"\0" * 1000)
    with pytest.raises(OllamaError, match=r'creating odd:latest from .*unsupported architecture "TimeMachineForCausalLM"'):
        ensure_model(spec_for(mc, model="odd", model_path=str(d), host=fake.url), fake.url, lambda r: None)


def test_pull_reports_byte_progress(mc, fake):
    reports, report = collect()
    info = ensure_model(spec_for(mc, model="tiny", host=fake.url), fake.url, report)
    assert info["action"] == "pulled"
    sized = [r for r in reports if r.get("total")]
    assert len(sized) >= 5 and sized[-1]["completed"] == sized[-1]["total"] == 5_000_000
    done = [r["completed"] for r in sized]
    assert done == sorted(done)
    assert "tiny:latest" in [m["name"] for m in http_get(fake.url + "/api/tags")[1]["models"]]


@pytest.mark.slow
def test_a_dropped_pull_is_retried_and_resumes(mc):
    server = FakeOllama(mc, FAKE_OLLAMA_FAIL_PULL_AT="2000000").start()
    try:
        reports, report = collect()
        info = ensure_model(spec_for(mc, model="tiny", host=server.url), server.url, report)
        assert info["action"] == "pulled"
        pulls = server.requests("/api/pull")
        assert len(pulls) == 2 and pulls[0]["resume_from"] == 0 and pulls[1]["resume_from"] >= 2_000_000
        assert reports[-1]["completed"] == 5_000_000
    finally:
        server.stop()


def test_a_pull_error_inside_the_stream_fails_the_server_with_its_message(mc, fake):
    path = mc.profile({"llm": {"kind": "ollama", "model": "nosuch:1b", "host": fake.url}})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 1
    row = mc.row("llm")
    assert row["state"] == "failed"
    assert "pulling nosuch:1b: pull model manifest: file does not exist" in row["last_error"]
    assert "not in the registry" in row["last_error"]
    assert len(fake.requests("/api/pull")) == 1  # an error line is final: no blind retries


@pytest.mark.slow
def test_an_unreachable_ollama_is_reported_with_its_url(mc):
    url = f"http://127.0.0.1:{free_port()}"
    path = mc.profile({"llm": {"kind": "ollama", "model": "tiny", "host": url, "startup_timeout": 2}})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 1
    row = mc.row("llm")
    assert row["state"] == "failed" and url in row["last_error"] and "refused" in row["last_error"].lower()


# ------------------------------------------------------------------ managed server
@pytest.mark.slow
def test_a_managed_server_pulls_serves_restarts_and_stops(mc, fake):
    path = mc.profile(
        {
            "llm": {
                "kind": "ollama",
                "model": "tiny",
                "executable": fake.wrapper(),
                "models_dir": str(mc.tmp / "managed-models"),
                "preload": True,
                "keep_alive": "10m",
                "env": {k: v for k, v in fake.env.items() if k.startswith("FAKE_")},
                "restart": {"backoff": 0.2},
            }
        }
    )
    fake.clear_log()
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    row = mc.row("llm")
    assert row["state"] == "ready" and row["model"] == "tiny:latest" and row["pid"]
    assert http_get(row["url"] + "/api/version")[0] == 200
    pulls = [e for e in fake.requests("/api/pull") if e["pid"] == row["pid"]]
    assert len(pulls) == 1
    loads = [e for e in fake.requests("/api/generate") if e["pid"] == row["pid"]]
    assert loads and loads[0]["prompt"] is None and loads[0]["keep_alive"] == "10m"
    assert (mc.tmp / "managed-models" / "fake-models.json").exists()  # OLLAMA_MODELS was honoured

    os.kill(row["pid"], signal.SIGKILL)
    again = wait_for(lambda: (r := mc.row("llm"))["state"] == "ready" and r["pid"] != row["pid"] and r, 30, what="restart")
    assert again["port"] == row["port"]
    assert [e for e in fake.requests("/api/pull") if e["pid"] == again["pid"]] == []  # present: not pulled again

    assert mc.cli("down").returncode == 0
    assert not _answers(row["url"])


@pytest.mark.skipif(shutil.which("ollama") is None, reason="no ollama binary on PATH")
def test_a_real_managed_ollama_answers_and_reports_a_failed_pull(mc):
    path = mc.profile(
        {"llm": {"kind": "ollama", "model": "modelctl-test-nosuch:0b", "models_dir": str(mc.tmp / "real-models"), "startup_timeout": 120}}
    )
    res = mc.cli("up", "-p", str(path))
    row = mc.row("llm")
    assert res.returncode == 1 and row["state"] == "failed" and "pulling modelctl-test-nosuch:0b" in row["last_error"]
    assert mc.cli("down").returncode == 0


@pytest.mark.skipif(
    shutil.which("ollama") is None or not os.environ.get("MODELCTL_TEST_OLLAMA_GGUF"),
    reason="needs an ollama binary on PATH and MODELCTL_TEST_OLLAMA_GGUF=<a real .gguf file>",
)
def test_a_real_managed_ollama_imports_a_gguf_and_restarts(mc):
    path = mc.profile(
        {
            "llm": {
                "kind": "ollama",
                "model": "modelctl-test-import",
                "model_path": os.environ["MODELCTL_TEST_OLLAMA_GGUF"],
                "models_dir": str(mc.tmp / "real-models"),
                "preload": True,
                "startup_timeout": 600,
                "restart": {"backoff": 0.5},
            }
        }
    )
    res = mc.cli("up", "-p", str(path), timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    row = mc.row("llm")
    assert row["model"] == "modelctl-test-import:latest"
    os.kill(row["pid"], signal.SIGKILL)
    again = wait_for(lambda: (r := mc.row("llm"))["state"] == "ready" and r["pid"] != row["pid"] and r, 300, what="restart")
    assert again["port"] == row["port"]
    assert mc.cli("down").returncode == 0 and not _answers(row["url"])
