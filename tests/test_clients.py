"""The clients RAG stacks use, unchanged, against the bundled server on the real MiniLM model and
a real cross-encoder — as their users call them — and schemathesis against the server's OpenAPI.

Offline: litellm ships OpenAI's cl100k tokenizer file, which langchain-openai's default path needs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from .conftest import ROOT
from .sentence_fixtures import build_tiny_cross_encoder, minilm_path, sentence_server

pytestmark = pytest.mark.slow

KEY = "client-key"
TEXTS = ["The cat sits on the mat.", "Stock markets fell sharply today.", "Quantum computers use qubits."]
QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "Berlin is in Germany."]

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import


@pytest.fixture(scope="module", autouse=True)
def tiktoken_offline():
    import importlib.util

    spec = importlib.util.find_spec("litellm")
    assert spec is not None and spec.submodule_search_locations
    bundled = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)
    yield
    if old is None:
        os.environ.pop("TIKTOKEN_CACHE_DIR", None)
    else:
        os.environ["TIKTOKEN_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("client-logs")


@pytest.fixture(scope="module")
def embed_url(logs):
    with sentence_server(logs, minilm_path(), "--model-name", "minilm", "--api-key", KEY) as url:
        yield url


@pytest.fixture(scope="module")
def rerank_url(logs, tmp_path_factory):
    model = build_tiny_cross_encoder(tmp_path_factory.mktemp("ce"))
    with sentence_server(logs, model, "--task-type", "rerank", "--model-name", "tiny-ce", "--api-key", KEY) as url:
        yield url, model


@pytest.fixture(scope="module")
def encoded():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path(), device="cpu").encode(TEXTS, normalize_embeddings=True)


@pytest.fixture(scope="module")
def predicted(rerank_url):
    from sentence_transformers import CrossEncoder

    return CrossEncoder(rerank_url[1], device="cpu").predict([(QUERY, d) for d in DOCS])


def assert_ranked(results, predicted, index="index", score="relevance_score"):
    got = [
        (getattr(r, index) if not isinstance(r, dict) else r[index], getattr(r, score) if not isinstance(r, dict) else r[score])
        for r in results
    ]
    assert [i for i, _ in got] == list(np.argsort(-predicted))
    for i, s in got:
        assert s == pytest.approx(float(predicted[i]), abs=1e-5)


# ------------------------------------------------------------------ embeddings
def test_openai_sdk(embed_url, encoded):
    from openai import OpenAI

    client = OpenAI(base_url=embed_url + "/v1", api_key=KEY, max_retries=0)
    res = client.embeddings.create(model="minilm", input=TEXTS)  # base64 by default
    np.testing.assert_allclose([d.embedding for d in res.data], encoded, atol=1e-5)
    assert client.models.retrieve("minilm").id == "minilm"


def test_openai_sdk_raises_bad_request_for_an_over_long_input(embed_url):
    """A context-length error is openai.BadRequestError, as OpenAI and vLLM answer it (the SDK
    raises APIStatusError for a 413, which no client's truncation logic reads)."""
    import openai

    client = openai.OpenAI(base_url=embed_url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="minilm", input="word " * 400)
    assert e.value.code == "context_length_exceeded" and "maximum context length is 256 tokens" in e.value.message


def test_langchain_openai_by_default_gets_a_clear_error_not_wrong_vectors(embed_url):
    import openai
    from langchain_openai import OpenAIEmbeddings
    from pydantic import SecretStr

    emb = OpenAIEmbeddings(model="minilm", base_url=embed_url + "/v1", api_key=SecretStr(KEY), max_retries=0)
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length=False"):
        emb.embed_documents(TEXTS)


def test_langchain_openai_with_text_input(embed_url, encoded):
    from langchain_openai import OpenAIEmbeddings
    from pydantic import SecretStr

    emb = OpenAIEmbeddings(
        model="minilm", base_url=embed_url + "/v1", api_key=SecretStr(KEY), check_embedding_ctx_length=False, max_retries=0
    )
    np.testing.assert_allclose(emb.embed_documents(TEXTS), encoded, atol=1e-5)
    np.testing.assert_allclose(emb.embed_query(TEXTS[0]), encoded[0], atol=1e-5)


def test_llama_index_openai_like_embedding(embed_url, encoded):
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    emb = OpenAILikeEmbedding(model_name="minilm", api_base=embed_url + "/v1", api_key=KEY)
    np.testing.assert_allclose(emb.get_text_embedding_batch(TEXTS), encoded, atol=1e-5)


def test_huggingface_hub_inference_client(embed_url, encoded, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    # the suite runs offline for the models' sake; a client of a self-hosted server is not
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(model=embed_url, token=KEY)  # posts {"inputs": ...} to the root route
    np.testing.assert_allclose(client.feature_extraction(TEXTS[0])[0], encoded[0], atol=1e-5)


def test_huggingface_hub_sentence_similarity(embed_url, encoded, monkeypatch):
    from huggingface_hub import InferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    client = InferenceClient(model=embed_url, token=KEY)  # posts to TEI's /similarity
    scores = client.sentence_similarity(TEXTS[0], other_sentences=TEXTS)
    np.testing.assert_allclose(scores, encoded @ encoded[0], atol=1e-5)


def test_litellm_embedding(embed_url, encoded):
    import litellm

    res = litellm.embedding(model="openai/minilm", api_base=embed_url + "/v1", api_key=KEY, input=TEXTS)
    np.testing.assert_allclose([d["embedding"] for d in res.data], encoded, atol=1e-5)


# ------------------------------------------------------------------ rerank
def test_cohere_v1_client(rerank_url, predicted):
    import cohere

    client = cohere.Client(api_key=KEY, base_url=rerank_url[0])
    res = client.rerank(model="tiny-ce", query=QUERY, documents=DOCS)
    assert_ranked(res.results, predicted)


def test_cohere_v2_client(rerank_url, predicted):
    import cohere

    client = cohere.ClientV2(api_key=KEY, base_url=rerank_url[0])
    res = client.rerank(model="tiny-ce", query=QUERY, documents=DOCS, top_n=3)
    assert_ranked(res.results, predicted)


def test_litellm_rerank(rerank_url, predicted):
    import litellm

    res = litellm.rerank(model="cohere/tiny-ce", api_base=rerank_url[0], api_key=KEY, query=QUERY, documents=DOCS)
    assert_ranked(res.results, predicted)


def test_litellm_infinity_rerank(rerank_url, predicted):
    import litellm

    res = litellm.rerank(model="infinity/tiny-ce", api_base=rerank_url[0], api_key=KEY, query=QUERY, documents=DOCS, return_documents=True)
    assert_ranked(res.results, predicted)
    assert all(r["document"]["text"] == DOCS[r["index"]] for r in res.results)


# ------------------------------------------------------------------ the OpenAPI contract
@pytest.mark.parametrize("which", ["embedding", "rerank"])
def test_schemathesis_all_checks_pass(which, embed_url, rerank_url, tmp_path):
    url = embed_url if which == "embedding" else rerank_url[0]
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(ROOT / "tests" / "schemathesis.toml"),
        "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {KEY}", "--checks", "all",
        "--max-examples", "25", "--seed", "1", "--no-color", "--report-dir", str(tmp_path),
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    counts = re.search(r"\d+ generated, [^\n]*", res.stdout)
    print(f"\nschemathesis ({which} server, --checks all): {counts.group(0) if counts else res.stdout[-300:]}")
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", res.stdout), res.stdout[-2000:]
