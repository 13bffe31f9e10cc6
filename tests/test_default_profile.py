"""The README's first command: `modelctl up` on the embedded default profile, offline, on the CPU."""

from __future__ import annotations

import re

import numpy as np
import psutil
import pytest

from .conftest import http_get, http_post, wait_for
from .test_cli import status_json, tagged_processes

pytestmark = pytest.mark.slow


def test_default_profile_serves_embeddings_and_rerank_then_goes_away(mc):
    env = {k: v for k, v in mc.env.items() if k != "MODELCTL_PROFILE"}
    res = mc.cli("up", env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    urls = dict(re.findall(r"^default/(embed|rerank|gateway)\s+(http://\S+)", res.stdout, re.M))
    assert set(urls) == {"embed", "rerank", "gateway"}, res.stdout

    status, body, _ = http_post(urls["embed"] + "/v1/embeddings", {"input": ["a real embedding", "another one"]})
    assert status == 200
    vectors = np.array([d["embedding"] for d in body["data"]])
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    docs = ["The stock market fell.", "Cats purr when they are happy.", "Rain is expected tomorrow."]
    status, body, _ = http_post(urls["rerank"] + "/v1/rerank", {"query": "Why do cats purr?", "documents": docs})
    assert status == 200 and body["results"][0]["index"] == 1  # cosine similarity on MiniLM

    # one URL for both: the gateway routes by endpoint and `model` to each server's own port
    status, body = http_get(urls["gateway"] + "/v1/models")
    assert status == 200 and {(m["id"], m["task"], m["state"]) for m in body["data"]} == {
        ("all-MiniLM-L6-v2", "embedding", "ready"),
        ("all-MiniLM-L6-v2", "rerank", "ready"),
    }, body
    status, through, _ = http_post(
        urls["gateway"] + "/v1/embeddings", {"model": "all-MiniLM-L6-v2", "input": ["a real embedding", "another one"]}
    )
    assert status == 200 and [d["embedding"] for d in through["data"]] == vectors.tolist()
    status, through, _ = http_post(
        urls["gateway"] + "/v1/rerank", {"model": "all-MiniLM-L6-v2", "query": "Why do cats purr?", "documents": docs}
    )
    assert status == 200 and through["results"][0]["index"] == 1

    rows = status_json(mc)
    assert {r["state"] for r in rows.values()} == {"ready"}
    models = [r for r in rows.values() if r["kind"] == "sentence"]
    assert len(models) == 2 and all(r["rss"] and r["rss"] > 50 * 2**20 for r in models)  # a loaded model, measured per group
    assert rows["gateway"]["rss"] and rows["gateway"]["rss"] < rows["embed"]["rss"]  # aiohttp and the records, no model

    assert mc.cli("down").returncode == 0
    # every server process is gone when down returns; the supervisor, with nothing left to
    # supervise, exits on its own a moment later
    assert not [p for p in tagged_processes(mc.tag) if "MODELCTL_SERVER" in _environ(p)]
    wait_for(lambda: not tagged_processes(mc.tag), 15, what="the supervisor to exit once nothing is wanted")


def _environ(proc) -> dict:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}
