"""The bundled server's HTTP contract — routes, shapes, errors, limits, abuse — against a real
server process with the stand-in model (tests/fake_encoder.py): no torch, so it runs in the quick
suite. tests/test_sentence_server.py checks the same server on the real MiniLM."""

from __future__ import annotations

import base64
import concurrent.futures
import http.client
import json
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fake_encoder import CLS, SEP, FakeEncoder

from .conftest import http_get, http_post, wait_for
from .sentence_fixtures import AUTH, KEY, assert_openai_error, port_of, post, sentence_server


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    return tmp_path_factory.mktemp("fake-sentence-logs")


@pytest.fixture(scope="module")
def embed_url(logs):
    args = ["--model-name", "fake-embed", "--api-key", KEY, "--max-inputs", "100", "--max-body-bytes", "200000", "--model-workers", "1"]
    with sentence_server(logs, "fake:dims=16,max_length=32", *args, fake=True) as url:
        yield url


@pytest.fixture(scope="module")
def rerank_url(logs):
    with sentence_server(
        logs, "fake:max_length=32", "--task-type", "rerank", "--model-name", "fake-ce", "--max-inputs", "50", fake=True
    ) as url:
        yield url


@pytest.fixture(scope="module")
def model():
    return FakeEncoder("fake:dims=16,max_length=32", "embedding", "cpu", 0, 0)


def want_vectors(model, texts):
    v = model.run(model.tokenize(texts, truncate=False))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ------------------------------------------------------------------ health, models, auth
def test_health_is_503_while_the_model_loads_then_200(logs):
    with sentence_server(logs, "fake:load=1.5", fake=True, wait=False) as url:
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and 200 not in seen:
            try:
                status, body = http_get(url + "/health", timeout=2)
                seen.append(status)
                assert body["status"] == ("ok" if status == 200 else "loading")
            except OSError:
                pass
            time.sleep(0.05)
        assert 503 in seen and seen[-1] == 200, seen


def test_health_is_open_and_says_what_runs(embed_url):
    status, body = http_get(embed_url + "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == "fake-embed" and body["task"] == "embedding"
    assert body["dimensions"] == 16 and body["max_input_tokens"] == 32 and body["backend"] == "fake"


def test_models_list_and_retrieve(embed_url):
    assert [m["id"] for m in http_get(embed_url + "/v1/models", headers=AUTH)[1]["data"]] == ["fake-embed"]
    status, body = http_get(embed_url + "/v1/models/fake-embed", headers=AUTH)
    assert status == 200 and body["id"] == "fake-embed" and body["object"] == "model"
    status, body = http_get(embed_url + "/v1/models/gpt-4", headers=AUTH)
    assert status == 404
    assert_openai_error(body, "model_not_found")


@pytest.mark.parametrize("path", ["/v1/models", "/metrics", "/info", "/openapi.json"])
def test_the_api_key_guards_every_route_but_health(embed_url, path):
    status, body = http_get(embed_url + path, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    assert_openai_error(body, "invalid_api_key")
    assert body["error"]["type"] == "authentication_error"


# ------------------------------------------------------------------ OpenAI embeddings
def test_vectors_and_usage(embed_url, model):
    texts = ["The cat sits on the mat.", "A dog barks."]
    status, body, _ = post(embed_url, "/v1/embeddings", {"input": texts})
    assert status == 200 and body["object"] == "list" and body["model"] == "fake-embed"
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], want_vectors(model, texts), atol=1e-5)
    tokens = sum(len(r.ids) for r in model.tokenize(texts, False))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_base64_and_dimensions(embed_url, model):
    _, floats, _ = post(embed_url, "/v1/embeddings", {"input": ["hello"]})
    _, b64, _ = post(embed_url, "/v1/embeddings", {"input": ["hello"], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, floats["data"][0]["embedding"], atol=1e-7)
    _, short, _ = post(embed_url, "/v1/embeddings", {"input": "hello", "dimensions": 4})
    prefix = np.array(floats["data"][0]["embedding"][:4])
    np.testing.assert_allclose(short["data"][0]["embedding"], prefix / np.linalg.norm(prefix), atol=1e-6)


def test_this_models_own_token_ids_are_embedded_like_the_text(embed_url, model):
    ids = list(model.tokenize(["hello world"], False)[0].ids)
    assert ids[0] == CLS and ids[-1] == SEP
    _, by_ids, _ = post(embed_url, "/v1/embeddings", {"input": [ids]})
    _, by_text, _ = post(embed_url, "/v1/embeddings", {"input": "hello world"})
    np.testing.assert_allclose(by_ids["data"][0]["embedding"], by_text["data"][0]["embedding"], atol=1e-6)


def test_another_tokenizers_ids_are_refused_with_the_langchain_fix(embed_url):
    cl100k_hello_world = [15339, 1917]  # what langchain-openai sends by default
    status, body, _ = post(embed_url, "/v1/embeddings", {"input": [cl100k_hello_world]})
    assert status == 400
    assert_openai_error(body, "foreign_token_ids")
    assert "check_embedding_ctx_length=False" in body["error"]["message"]


def test_unframed_token_ids_are_accepted_when_the_server_allows_them(logs):
    with sentence_server(logs, "fake:dims=8", "--allow-token-ids", fake=True) as url:
        status, body, _ = http_post(url + "/v1/embeddings", {"input": [15339, 1917]})
        assert status == 200 and len(body["data"][0]["embedding"]) == 8


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embeddings"])
@pytest.mark.parametrize("as_ids", [False, True], ids=["text", "token ids"])
def test_over_long_input_on_the_openai_routes_is_a_400_context_length_error(embed_url, path, as_ids):
    """As OpenAI and vLLM answer it: openai.BadRequestError, which LangChain's and LlamaIndex's
    truncation and retry logic read; with the limit, unless truncation is asked."""
    long = " ".join(["word"] * 40)
    given = long if not as_ids else [101, *([7] * 40), 102]
    status, body, _ = post(embed_url, path, {"input": given})
    assert status == 400
    assert_openai_error(body, "context_length_exceeded")
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "input"
    assert "maximum context length is 32 tokens" in body["error"]["message"], body
    status, body, _ = post(embed_url, path, {"input": given, "truncate": True})
    assert status == 200 and body["usage"]["prompt_tokens"] == 32


def test_over_long_input_on_the_tei_routes_stays_413_as_tei_answers(embed_url):
    long = " ".join(["word"] * 40)
    for path in ("/embed", "/", "/invocations"):
        status, body, _ = post(embed_url, path, {"inputs": long})
        assert status == 413, (path, body)
        assert_openai_error(body, "input_too_long")
        assert "limit of 32" in body["error"]["message"]


def test_tei_truncate_false_is_honoured_on_a_server_that_truncates_by_default(logs):
    long = " ".join(["word"] * 40)
    with sentence_server(logs, "fake:max_length=32", "--truncate", fake=True) as url:
        assert http_post(url + "/embed", {"inputs": long})[0] == 200
        status, body, _ = http_post(url + "/embed", {"inputs": long, "truncate": False})
        assert status == 413
        assert_openai_error(body, "input_too_long")


@pytest.mark.parametrize(
    "payload, status, param",
    [
        ({"input": 42}, 422, "input"),
        ({"input": "x", "encoding_format": "hex"}, 422, "encoding_format"),
        ({"input": "x", "dimensions": 0}, 422, "dimensions"),
        ({}, 422, "input"),
        ({"input": ""}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"input": ["ok", ""]}, 422, "input"),  # (whitespace is text, and embedded)
        ({"input": [[CLS, 5, SEP], [999999999]]}, 400, "input"),
        ({"input": "x", "dimensions": 999}, 400, "dimensions"),
        ({"input": ["x"] * 101}, 422, "input"),
        ({"input": "x", "truncate": 0.0}, 422, "truncate"),  # booleans are strict
        ({"input": "\ud800"}, 400, "input"),  # a lone surrogate is not text
        ({"input": ["fine", "bad \udfff"]}, 400, "input"),
    ],
)
def test_bad_requests_get_an_openai_error(embed_url, payload, status, param):
    got, body, _ = post(embed_url, "/v1/embeddings", payload)
    assert got == status, body
    assert_openai_error(body)
    assert body["error"]["param"] == param


def test_malformed_json_is_400(embed_url):
    status, body, _ = http_post(embed_url + "/v1/embeddings", None, headers=AUTH, raw=b'{"input": ')
    assert status == 400
    assert_openai_error(body, "invalid_json")


def test_bodies_over_the_limit_are_413_also_when_chunked(embed_url):
    status, body, _ = post(embed_url, "/v1/embeddings", {"input": ["x" * 1000] * 300})
    assert status == 413
    assert_openai_error(body, "body_too_large")
    parts = urlsplit(embed_url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    chunk = json.dumps({"input": ["y" * 1000] * 300}).encode()
    conn.request(
        "POST",
        "/v1/embeddings",
        body=iter([chunk[i : i + 10000] for i in range(0, len(chunk), 10000)]),
        headers={**AUTH, "Content-Type": "application/json"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"
    conn.close()


def test_a_full_queue_is_429_with_retry_after(logs):
    with sentence_server(logs, "fake:delay=0.3", "--max-queue", "20", "--model-workers", "1", fake=True) as url:

        def one(i):
            return http_post(url + "/v1/embeddings", {"input": [f"text {i}"] * 8}, timeout=60)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
    statuses = [r[0] for r in results]
    assert 429 in statuses and 200 in statuses, statuses
    refused = next(r for r in results if r[0] == 429)
    assert_openai_error(refused[1], "queue_full")
    assert refused[2].get("retry-after") == "1"


def test_wrong_task_unknown_route_and_wrong_method(embed_url):
    status, body, _ = post(embed_url, "/v1/rerank", {"query": "q", "documents": ["a"]})
    assert status == 404
    assert_openai_error(body, "wrong_task")
    status, body = http_get(embed_url + "/v2/nothing", headers=AUTH)
    assert status == 404
    assert_openai_error(body, "not_found")
    conn = http.client.HTTPConnection(urlsplit(embed_url).hostname, urlsplit(embed_url).port, timeout=10)
    conn.request("GET", "/v1/embeddings", headers=AUTH)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 405 and resp.getheader("Allow") == "POST"
    assert_openai_error(body, "method_not_allowed")


def test_the_server_keeps_serving_after_garbage(embed_url):
    for raw in (b"", b"[", b"null", b'{"input": {"a": 1}}', b"\xff\xfe", b'"\\ud800"'):
        status, _, _ = http_post(embed_url + "/v1/embeddings", None, headers=AUTH, raw=raw)
        assert 400 <= status < 500
    assert http_get(embed_url + "/health")[0] == 200
    assert post(embed_url, "/v1/embeddings", {"input": "still here"})[0] == 200


# ------------------------------------------------------------------ TEI on an embedding server
def test_tei_embed_root_and_invocations(embed_url, model):
    want = want_vectors(model, ["a b", "c"])
    for path in ("/embed", "/", "/invocations"):
        status, body, _ = post(embed_url, path, {"inputs": ["a b", "c"]})
        assert status == 200 and isinstance(body, list), (path, body)
        np.testing.assert_allclose(body, want, atol=1e-5)
    # huggingface_hub's InferenceClient sends its options under "parameters"
    _, raw, _ = post(embed_url, "/", {"inputs": "a b", "parameters": {"normalize": False}})
    np.testing.assert_allclose(raw[0], model.run(model.tokenize(["a b"], False))[0], atol=1e-5)


def test_tei_info(embed_url):
    status, info = http_get(embed_url + "/info", headers=AUTH)
    assert status == 200
    assert info["model_type"] == {"embedding": {"pooling": "mean"}} and info["max_input_length"] == 32
    assert info["served_model_name"] == "fake-embed" and info["max_client_batch_size"] == 100 and info["version"]


# ------------------------------------------------------------------ rerank
DOCS = ["paris is the capital of france", "bananas are yellow", "the capital of germany is berlin"]
QUERY = "what is the capital of france"


def test_cohere_v1_and_jina_rerank(rerank_url):
    status, body, _ = http_post(rerank_url + "/v1/rerank", {"query": QUERY, "documents": DOCS, "model": "fake-ce"})
    assert status == 200 and body["model"] == "fake-ce" and body["usage"]["total_tokens"] > 0
    assert [r["index"] for r in body["results"]] == [0, 2, 1]
    assert body["results"][0]["document"] == {"text": DOCS[0]}
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 < s < 1 for s in scores)
    status, top, _ = http_post(
        rerank_url + "/v1/rerank", {"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 1, "return_documents": False}
    )
    assert status == 200 and top["results"] == [{"index": 0, "relevance_score": scores[0]}]


def test_rerank_with_documents_answers_as_infinity_does(rerank_url):
    """`POST /rerank` with `documents` is Infinity's route: its clients (litellm's infinity/) read
    `document` as a string and the usage as prompt_tokens."""
    status, body, _ = http_post(rerank_url + "/rerank", {"query": QUERY, "documents": DOCS, "return_documents": True, "top_n": 2})
    assert status == 200 and body["object"] == "rerank" and body["model"] == "fake-ce" and isinstance(body["created"], int)
    assert [r["index"] for r in body["results"]] == [0, 2] and body["results"][0]["document"] == DOCS[0]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    _, bare, _ = http_post(rerank_url + "/rerank", {"query": QUERY, "documents": DOCS, "return_documents": False})
    assert [r["document"] for r in bare["results"]] == [None] * 3


def test_empty_documents_are_scored_and_objects_without_text_ranked_by_their_fields(rerank_url):
    docs = ["", {"text": ""}, {"title": "france", "body": "paris is its capital"}, DOCS[1]]
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        status, body, _ = http_post(rerank_url + path, {"query": QUERY, "documents": docs, "return_documents": True})
        assert status == 200 and sorted(r["index"] for r in body["results"]) == [0, 1, 2, 3], (path, body)
        text = {r["index"]: r["document"] for r in body["results"]}[2]
        assert (text if isinstance(text, str) else text["text"]) == "title: france\nbody: paris is its capital"
    status, body, _ = http_post(rerank_url + "/rerank", {"query": QUERY, "texts": ["", DOCS[0]]})
    assert status == 200 and [r["index"] for r in body] == [1, 0]


def test_document_objects_without_text_or_with_null_text_are_scored_as_the_schema_allows(rerank_url):
    """The OpenAPI document lets a document object lack `text`, or carry `text: null`, with no
    rank_fields (schemathesis generates them): each is scored (ranked as its other fields, or as
    an empty document), never refused."""
    spec = http_get(rerank_url + "/openapi.json")[1]
    doc_schema = spec["components"]["schemas"]["RerankDocument"]
    assert "text" not in doc_schema.get("required", []) and {"type": "null"} in doc_schema["properties"]["text"]["anyOf"]
    docs = [{}, {"text": None}, {"text": None, "title": "france"}, "Paris is the capital of France."]
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        status, body, _ = http_post(rerank_url + path, {"query": QUERY, "documents": docs, "return_documents": True})
        assert status == 200 and sorted(r["index"] for r in body["results"]) == [0, 1, 2, 3], (path, body)
        text = {r["index"]: r["document"] for r in body["results"]}
        assert [t if isinstance(t, str) else t["text"] for t in (text[0], text[1], text[2])] == ["", "", "title: france"], (path, text)


def test_rank_fields_select_what_is_ranked(rerank_url):
    docs = [{"title": "bananas", "body": "yellow fruit"}, {"title": "france", "body": "paris is its capital"}]
    status, body, _ = http_post(rerank_url + "/v1/rerank", {"query": QUERY, "documents": docs, "rank_fields": ["body"]})
    assert status == 200 and body["results"][0]["index"] == 1


def test_cohere_v2_rerank_truncates_long_documents_like_cohere(rerank_url):
    long_doc = "paris " + " ".join(["filler"] * 100)
    payload = {"model": "fake-ce", "query": QUERY, "documents": [long_doc, DOCS[1]], "max_tokens_per_doc": 16}
    status, body, _ = http_post(rerank_url + "/v2/rerank", payload)
    assert status == 200 and set(body) == {"id", "results", "meta"}
    assert [set(r) for r in body["results"]] == [{"index", "relevance_score"}] * 2 and body["results"][0]["index"] == 0
    status, body, _ = http_post(rerank_url + "/v2/rerank", {**payload, "return_documents": True, "top_n": 1})
    assert body["results"][0]["document"] == {"text": long_doc}


def test_tei_rerank_predict_and_root(rerank_url):
    status, body, _ = http_post(rerank_url + "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert status == 200 and [r["index"] for r in body] == [0, 2, 1] and body[0]["text"] == DOCS[0]
    _, raw, _ = http_post(rerank_url + "/rerank", {"query": QUERY, "texts": DOCS, "raw_scores": True})
    assert raw[0]["score"] > 1  # logits, not probabilities
    _, root, _ = http_post(rerank_url + "/", {"query": QUERY, "texts": DOCS})
    assert [r["index"] for r in root] == [0, 2, 1]
    status, one, _ = http_post(rerank_url + "/predict", {"inputs": [QUERY, DOCS[0]]})
    assert status == 200 and one[0]["score"] == pytest.approx(body[0]["score"], abs=1e-6) and one[0]["label"]
    status, batch, _ = http_post(rerank_url + "/invocations", {"inputs": [[QUERY, DOCS[0]], [QUERY, DOCS[1]]]})
    assert status == 200 and len(batch) == 2 and batch[0][0]["score"] > batch[1][0]["score"]
    status, err, _ = http_post(rerank_url + "/predict", {"inputs": "just one text"})
    assert status == 422  # a cross-encoder scores pairs, and the schema says so
    assert_openai_error(err)


@pytest.mark.parametrize(
    "path, payload, status",
    [
        ("/v1/rerank", {"query": QUERY}, 422),
        ("/v1/rerank", {"query": QUERY, "documents": []}, 400),
        ("/v1/rerank", {"query": "", "documents": ["a"]}, 400),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"] * 51}, 422),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "top_n": 0}, 422),
        ("/v1/rerank", {"query": QUERY, "documents": ["a"], "return_documents": 0}, 422),
        ("/rerank", {"query": QUERY, "documents": ["a"], "texts": ["a"]}, 422),
        ("/v2/rerank", {"query": "\ud800", "documents": ["a"]}, 400),
        ("/rerank", {"query": QUERY, "texts": ["ok", "\udfff"]}, 400),
    ],
)
def test_bad_rerank_requests(rerank_url, path, payload, status):
    got, body, _ = http_post(rerank_url + path, payload)
    assert got == status, body
    assert_openai_error(body)


def test_a_bi_encoder_reranks_by_cosine(logs):
    with sentence_server(logs, "fake:cross=0,dims=16", "--task-type", "rerank", fake=True) as url:
        status, body, _ = http_post(url + "/v1/rerank", {"query": "a b c", "documents": ["a b c", "x y z"]})
        assert status == 200 and body["results"][0]["index"] == 0
        assert body["results"][0]["relevance_score"] == pytest.approx(1.0, abs=1e-5)
        status, body, _ = http_post(url + "/predict", {"inputs": ["a", "b"]})
        assert status == 404  # a bi-encoder scores no pairs: the route is not there, nor in the document
        assert_openai_error(body)
        paths = http_get(url + "/openapi.json")[1]["paths"]
        assert "/predict" not in paths and "/rerank" in paths


# ------------------------------------------------------------------ the OpenAPI document
def test_each_server_documents_only_its_tasks_routes_with_their_errors(embed_url, rerank_url):
    embed_spec = http_get(embed_url + "/openapi.json", headers=AUTH)[1]
    rerank_spec = http_get(rerank_url + "/openapi.json")[1]
    assert "/v1/embeddings" in embed_spec["paths"] and "/v1/rerank" not in embed_spec["paths"]
    assert {"/v1/rerank", "/v2/rerank", "/rerank", "/predict"} <= set(rerank_spec["paths"]) and "/v1/embeddings" not in rerank_spec["paths"]
    op = embed_spec["paths"]["/v1/embeddings"]["post"]
    for status in ("400", "401", "413", "422", "429", "503"):
        ref = op["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse"), (status, ref)
    assert "Retry-After" in op["responses"]["429"]["headers"]
    schemas = embed_spec["components"]["schemas"]
    assert schemas["EmbeddingResponse"]["properties"]["data"]["items"]["$ref"].endswith("/Embedding")
    rerank_schemas = rerank_spec["components"]["schemas"]
    assert {"RerankRequest", "RerankResponse", "V2RerankRequest", "V2RerankResponse", "TeiRerankRequest", "PredictRequest"} <= set(
        rerank_schemas
    )
    assert rerank_schemas["TeiRerankRequest"]["not"] == {"required": ["documents"]}  # documents or texts, never both
    assert rerank_schemas["RerankRequest"]["properties"]["documents"]["minItems"] == 1


def _all_nodes(node):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _all_nodes(v)
    elif isinstance(node, list):
        for v in node:
            yield from _all_nodes(v)


def test_the_document_binds_token_ids_and_dimensions_to_the_loaded_model(embed_url):
    """What the server accepts of token ids (this model's own tokenization) and dimensions (at
    most the model's) is in the schema, so a client following the document is never refused."""
    spec = http_get(embed_url + "/openapi.json", headers=AUTH)[1]
    req = spec["components"]["schemas"]["EmbeddingRequest"]
    ids = [n for n in _all_nodes(req["properties"]["input"]) if "prefixItems" in n]
    assert ids and all(n["prefixItems"] == [{"type": "integer", "const": CLS}] for n in ids)
    assert all(n["contains"] == {"type": "integer", "const": SEP} and n["items"]["maximum"] == 30521 for n in ids)
    assert [n["maximum"] for n in _all_nodes(req["properties"]["dimensions"]) if "maximum" in n] == [16]
    assert not [n for n in _all_nodes(spec) if "x-token-ids" in n or "x-dimensions" in n]  # the marks are gone
    # what the document allows is served; what it refuses is refused
    assert post(embed_url, "/v1/embeddings", {"input": [[CLS, 2000, 2001, SEP, 0]], "dimensions": 16})[0] == 200
    assert post(embed_url, "/v1/embeddings", {"input": [[2000, SEP]]})[0] == 400


def test_left_truncation_keeps_the_end_of_an_over_long_input(embed_url):
    words = [f"w{i}" for i in range(40)]  # 42 tokens with the marks; the model reads 32
    long, end, start = " ".join(words), " ".join(words[-30:]), " ".join(words[:30])
    status, left, _ = post(embed_url, "/embed", {"inputs": long, "truncate": True, "truncation_direction": "Left"})
    assert status == 200
    _, want_end, _ = post(embed_url, "/embed", {"inputs": end})
    _, want_start, _ = post(embed_url, "/embed", {"inputs": start})
    _, right, _ = post(embed_url, "/embed", {"inputs": long, "truncate": True})
    np.testing.assert_allclose(left, want_end, atol=1e-6)
    np.testing.assert_allclose(right, want_start, atol=1e-6)
    _, params, _ = post(embed_url, "/", {"inputs": long, "parameters": {"truncate": True, "truncation_direction": "left"}})
    np.testing.assert_allclose(params, want_end, atol=1e-6)
    status, body, _ = post(embed_url, "/embed", {"inputs": long, "truncation_direction": "Left"})
    assert status == 413 and body["error"]["code"] == "input_too_long"  # direction alone does not truncate


def test_similarity_answers_huggingface_hubs_sentence_similarity(embed_url):
    payload = {"inputs": {"source_sentence": "a b c", "sentences": ["a b c", "x y z", "a b"]}}
    status, scores, _ = post(embed_url, "/similarity", payload)
    assert status == 200 and len(scores) == 3 and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[2] > scores[1]


# ------------------------------------------------------------------ metrics
def test_metrics_count_requests_inputs_and_batches(logs):
    with sentence_server(logs, "fake:dims=8", fake=True) as url:
        for _ in range(3):
            http_post(url + "/v1/embeddings", {"input": ["a", "b c"]})
        http_post(url + "/v1/embeddings", {"input": ""})
        status, text = http_get(url + "/metrics")
        assert status == 200
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}
        route = ("route", "/v1/embeddings")
        assert samples[("sentence_requests_total", (route, ("status", "200")))] == 3
        assert samples[("sentence_requests_total", (route, ("status", "400")))] == 1
        assert samples[("sentence_inputs_total", (route,))] == 6
        assert samples[("sentence_tokens_total", (route,))] == 3 * (3 + 4)
        assert samples[("sentence_request_duration_seconds_count", (route,))] == 4
        assert samples[("sentence_batch_inputs_sum", ())] >= 6 and samples[("sentence_model_ready", ())] == 1
        assert ("sentence_queue_depth", ()) in samples


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    status, text = http_get(url + "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def _send_and_leave(port: int, payload: dict, stay: Callable[[], bool], timeout: float = 10) -> None:
    """A raw request whose client disconnects, without reading an answer, once `stay()` is false."""
    body = json.dumps(payload).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        wait_for(lambda: not stay(), timeout, what="the moment to leave")


def _model_rows(log: Path) -> list[list[int]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize(
    "payload",
    [
        {"input": "one text"},
        {"input": ["two", "texts"], "encoding_format": "base64", "model": "x", "user": "u"},
        {"input": ["a b c"], "dimensions": 4, "truncate": True},
        {"input": " ".join(["word"] * 40)},  # over the limit: 400 context_length_exceeded
        {"input": "x", "dimensions": 999},  # 400
    ],
)
def test_the_plain_request_path_answers_exactly_as_the_full_one(embed_url, payload):
    """The common request is answered past FastAPI's layers; an unknown key sends the same request
    through FastAPI (pydantic ignores it): both answers are the same."""
    fast = post(embed_url, "/v1/embeddings", payload)
    full = post(embed_url, "/v1/embeddings", {**payload, "x-full-path": 1})
    assert fast[0] == full[0] and fast[1] == full[1], (fast[:2], full[:2])
    assert fast[2].get("content-type") == full[2].get("content-type") == "application/json"


# ------------------------------------------------------------------ fairness and clients that leave
@pytest.mark.parametrize("express", ["0", "1"])
def test_a_small_request_runs_between_the_chunks_of_a_large_one(logs, tmp_path, express):
    """40 inputs run as chunks of 4 rows (one model call each); a query sent once the first chunk
    runs goes into the next batch (round-robin), or at once on the express worker, not after the
    other nine."""
    seen = tmp_path / "rows.jsonl"
    args = ["--model-workers", "1", "--max-batch-size", "4", "--no-warmup", "--express-workers", express]
    with sentence_server(logs, f"fake:dims=8,delay=0.15,log={seen}", *args, fake=True) as url:
        bulk = concurrent.futures.ThreadPoolExecutor(1).submit(
            http_post, url + "/v1/embeddings", {"input": [f"bulk{i}" for i in range(40)]}
        )
        wait_for(lambda: len(_model_rows(seen)) >= 1, 10, what="the bulk request's first chunk")
        status, _, _ = http_post(url + "/v1/embeddings", {"input": "query"})
        assert status == 200
        status, body, _ = bulk.result(timeout=30)
        assert status == 200 and len(body["data"]) == 40
    rows = _model_rows(seen)
    query = [CLS, *FakeEncoder.words("query"), SEP]
    at = rows.index(query)
    limit = 12 if express == "0" else 8  # the next chunk, or beside the one in flight
    assert at < limit, f"the query ran after {at} bulk rows (chunks of 4): {len(rows)} rows in all"
    assert len(rows) == 41  # every bulk row ran once


def test_a_client_that_leaves_stops_costing_model_time_and_is_counted_499(logs, tmp_path):
    seen = tmp_path / "rows.jsonl"
    args = ["--model-workers", "1", "--max-batch-size", "4", "--no-warmup", "--max-queue", "48"]
    with sentence_server(logs, f"fake:dims=8,delay=0.5,log={seen}", *args, fake=True) as url:
        _send_and_leave(port_of(url), {"input": [f"gone{i}" for i in range(40)]}, lambda: len(_model_rows(seen)) < 1)
        # abandoned: it leaves the queue once the server sees the client gone, long before its 10
        # chunks could have run (while its 40 of 48 places were held, the next 40 would be refused)
        wait_for(lambda: _samples(url)[("sentence_queue_depth", ())] == 0, 1.5, what="the abandoned inputs to leave the queue")
        status, body, _ = http_post(url + "/v1/embeddings", {"input": [f"live{i}" for i in range(40)]})
        assert status == 200, body
        wait_for(lambda: _samples(url).get(("sentence_requests_in_progress", ())) == 0, 10, what="no request in progress")
        samples = _samples(url)
    gone = {FakeEncoder.words(f"gone{i}")[0] for i in range(40)}
    ran = sum(1 for r in _model_rows(seen) if len(r) == 3 and r[1] in gone)
    assert 1 <= ran <= 8, f"{ran} of the abandoned request's 40 rows ran (at most the chunk in flight and one gathered before it left)"
    route = ("route", "/v1/embeddings")
    assert samples[("sentence_requests_total", (route, ("status", "499")))] == 1
    assert ("sentence_requests_total", (route, ("status", "500"))) not in samples
    assert samples[("sentence_requests_total", (route, ("status", "200")))] == 1
    assert samples[("sentence_queue_wait_seconds_count", ())] == 2  # each request's wait for its first rows in the model
    assert samples[("sentence_queue_depth", ())] == 0


# ------------------------------------------------------------------ abuse
@pytest.mark.slow
def test_work_for_a_client_that_disconnected_never_reaches_the_model(logs, tmp_path):
    seen = tmp_path / "model-rows.jsonl"
    args = ["--model-workers", "1", "--express-workers", "0", "--no-warmup"]  # one worker: the next request waits
    with sentence_server(logs, f"fake:dims=8,delay=1.0,log={seen}", *args, fake=True) as url:
        port = port_of(url)
        busy = concurrent.futures.ThreadPoolExecutor(1).submit(http_post, url + "/v1/embeddings", {"input": "first"})
        wait_for(lambda: seen.exists() and seen.read_text(), 10, what="the first batch to reach the model")
        body = json.dumps({"input": "abandoned request"}).encode()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + b"Content-Length: %d\r\n\r\n" % len(body)
                + body
            )
            time.sleep(0.2)  # queued behind the first batch
        assert busy.result(timeout=30)[0] == 200
        after = http_post(url + "/v1/embeddings", {"input": "after"})  # the worker is free again
        assert after[0] == 200
    abandoned = FakeEncoder.words("abandoned request")
    rows = [json.loads(line) for line in seen.read_text().splitlines()]
    assert not any(r[1:-1] == abandoned for r in rows), rows
    assert any(r[1:-1] == FakeEncoder.words("after") for r in rows)


def _half_open(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        socks.append(s)
    return socks


def _raise_own_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} open files, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))


@pytest.mark.slow
def test_half_open_connections_never_starve_health(logs):
    """Past max_connections the oldest idle connections are closed, so the probe always gets in."""
    _raise_own_fd_limit(2000)
    with sentence_server(logs, "fake:dims=8", "--max-connections", "200", "--header-timeout", "60", fake=True) as url:
        socks = _half_open(port_of(url), 600)
        try:
            t0 = time.monotonic()
            status, body = http_get(url + "/health", timeout=5)
            assert status == 200 and body["status"] == "ok" and time.monotonic() - t0 < 5
            closed = 0
            for s in socks[:100]:
                s.settimeout(2)
                try:
                    closed += s.recv(1) == b""
                except (ConnectionResetError, TimeoutError):
                    closed += 1
            assert closed > 90  # the oldest were made room for
        finally:
            for s in socks:
                s.close()


@pytest.mark.slow
def test_the_fd_soft_limit_is_raised_to_the_hard_one(logs):
    _raise_own_fd_limit(1200)
    with sentence_server(logs, "fake:dims=8", "--header-timeout", "60", fake=True, fd_limit=256) as url:
        assert _soft_fd_limit(_listener_pid(port_of(url))) > 256
        socks = _half_open(port_of(url), 800)  # far more than the 256 it was started with
        try:
            assert http_get(url + "/health", timeout=5)[0] == 200
        finally:
            for s in socks:
                s.close()


def test_a_client_that_never_finishes_its_headers_is_cut_off(logs):
    with sentence_server(logs, "fake:dims=8", "--header-timeout", "1", fake=True) as url:
        (s,) = _half_open(port_of(url), 1)
        s.settimeout(10)
        t0 = time.monotonic()
        assert s.recv(1) == b""
        assert time.monotonic() - t0 < 5
        s.close()


def _listener_pid(port: int) -> int:
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
            return conn.pid
    raise AssertionError(f"nobody listens on {port}")


def _soft_fd_limit(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise AssertionError("no open-files limit")


def test_a_huge_input_is_refused_or_cut_before_it_is_tokenized(logs):
    """A 5 MB string is judged by its length: refused at once without truncate, cut to what the
    model can read with it; the tokenizer never sees more than limit × CHARS_PER_TOKEN characters."""
    from servers.sentence.service import CHARS_PER_TOKEN

    tlog = logs / "tokenized.txt"
    with sentence_server(logs, f"fake:dims=8,max_length=32,tlog={tlog}", "--max-body-bytes", str(8 << 20), fake=True) as url:
        huge = "word " * (1 << 20)  # 5 MB
        status, body, _ = http_post(url + "/v1/embeddings", {"input": huge})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded" and "characters" in body["error"]["message"]
        status, body, _ = http_post(url + "/embed", {"inputs": ["short", huge]})
        assert status == 413 and body["error"]["code"] == "input_too_long" and body["error"]["message"].startswith("inputs[1]")
        status, body, _ = http_post(url + "/embed", {"inputs": huge, "truncate": True})
        assert status == 200 and len(body) == 1
        status, body, _ = http_post(url + "/v1/embeddings", {"input": "hello"})  # and it serves on
        assert status == 200
    lengths = [int(n) for n in tlog.read_text().split()]
    assert max(lengths) <= 32 * CHARS_PER_TOKEN
