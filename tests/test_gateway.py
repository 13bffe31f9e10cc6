"""The gateway (servers/gateway): one URL that lists every model and routes each request by its
`model` to the server's own port, streaming both ways; and its place in a profile.

Most tests share one gateway in front of stand-in servers whose records are written by hand (no
supervisor); the tests at the end run it as modelctl runs it, from a profile's `gateway:` key.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from modelctl.errors import ProfileError
from modelctl.profile import parse_profile
from servers.gateway.admission import Full, Gate

from .conftest import http_get, http_post, wait_for
from .gateway_stack import (
    FAKE_OLLAMA,
    Processes,
    chat_argv,
    fake_sentence_argv,
    free_port,
    free_ports,
    gateway_argv,
    write_record,
)
from .load import ClosedLoop

CHAT_TOKENS, CHAT_INTERVAL = 6, 0.15


class Stack:
    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.state = tmp / "state"
        self.procs = Processes(tmp)
        self.ports: dict[str, int] = {}
        self.gateway = ""
        self.keyed_gateway = ""
        self.mute_socket = socket.socket()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    def client(self, base: str | None = None, key: str = "none", **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=(base or self.gateway) + "/v1", api_key=key, max_retries=0, timeout=30, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = Stack(tmp_path_factory.mktemp("gateway"))
    names = [
        "emb_a",
        "emb_b",
        "rerank",
        "secure",
        "chat",
        "slow",
        "limited",
        "ollama",
        "dead",
        "mute",
        "gateway",
        "keyed",
        "anon",
        "broken",
        "other",
    ]
    s.ports = dict(zip(names, free_ports(len(names)), strict=True))
    p, port = s.procs, s.ports
    models = s.tmp / "ollama-models"
    models.mkdir()
    (models / "fake-models.json").write_text(
        json.dumps(
            {"tiny:latest": {"size": 1, "digest": "sha256:00", "modified_at": "2026-01-01T00:00:00Z", "details": {"family": "llama"}}}
        )
    )
    p.start("emb_a", fake_sentence_argv(port["emb_a"], "emb-a", "embedding", 8))
    p.start("emb_b", fake_sentence_argv(port["emb_b"], "emb-b", "embedding", 12))
    p.start("rerank", fake_sentence_argv(port["rerank"], "emb-a", "rerank"))
    p.start("secure", fake_sentence_argv(port["secure"], "secure", "embedding", 4, "--api-key", "server-key"))
    p.start("chat", chat_argv(port["chat"], "stand-in", "--tokens", str(CHAT_TOKENS), "--interval", str(CHAT_INTERVAL)))
    p.start("slow", chat_argv(port["slow"], "slow-head", "--tokens", "2", "--interval", "0.05", "--head-delay", "1.2"))
    p.start("limited", chat_argv(port["limited"], "limited", "--tokens", "1", "--interval", "1.0"))
    p.start("anon", chat_argv(port["anon"], "reported-model", "--tokens", "1", "--interval", "0"))
    p.start(
        "ollama", [sys.executable, FAKE_OLLAMA, "serve"], env={"OLLAMA_HOST": f"127.0.0.1:{port['ollama']}", "OLLAMA_MODELS": str(models)}
    )
    # a socket that listens and never accepts: connections wait in its backlog, unanswered
    s.mute_socket.bind(("127.0.0.1", port["mute"]))
    s.mute_socket.listen(16)

    st = s.state
    write_record(
        st,
        "lab",
        "emb-a",
        "sentence",
        {"model_name": "emb-a", "aliases": ["minilm", "BAAI/bge-small"]},
        port["emb_a"],
        usage={"peak_rss": 123},
    )
    write_record(st, "lab", "emb-b", "sentence", {"model_name": "emb-b", "memory": "650MiB"}, port["emb_b"])
    write_record(st, "lab", "rerank", "sentence", {"task": "rerank", "model_name": "emb-a"}, port["rerank"])
    write_record(st, "lab", "secure", "sentence", {"model_name": "secure", "api_key": "server-key"}, port["secure"])
    write_record(st, "lab", "chat", "command", {"model_name": "stand-in", "aliases": ["gpt-4o-mini"]}, port["chat"])
    write_record(st, "lab", "slow", "command", {"model_name": "slow-head", "start": "on-demand"}, port["slow"], state="idle")
    write_record(st, "lab", "limited", "command", {"model_name": "limited", "max_concurrency": 1, "max_queue": 1}, port["limited"])
    write_record(st, "lab", "ollama", "ollama", {"model": "tiny"}, port["ollama"])
    write_record(st, "lab", "anon", "command", {}, port["anon"], instance={"token": "t1", "fingerprint": "f", "started_at": 0})
    write_record(st, "lab", "dead", "command", {"model_name": "dead"}, port["dead"])
    write_record(st, "lab", "mute", "command", {"model_name": "mute"}, port["mute"])
    write_record(
        st,
        "lab",
        "broken",
        "sentence",
        {"model_name": "broken"},
        port["broken"],
        state="failed",
        history={"last_error": "CUDA out of memory"},
    )
    # another profile: its emb-a loses to the gateway's own profile's; a record that points elsewhere is never used
    write_record(st, "other", "emb-a", "sentence", {"model_name": "emb-a"}, port["other"])
    write_record(st, "other", "sneaky", "command", {"model_name": "sneaky"}, 1, url="http://user:pw@example.com:80/x")
    (st / "servers" / "other" / "garbled.json").write_text("{not json")

    common = ["--home", "lab", "--default", "embedding=emb-a", "--header-timeout", "1", "--body-timeout", "2", "--read-timeout", "2"]
    common += ["--keepalive-after", "0.3", "--keepalive-interval", "0.3", "--refresh-interval", "0.1"]
    p.start("gateway", gateway_argv(st, port["gateway"], *common))
    p.start("keyed", gateway_argv(st, port["keyed"], "--home", "lab"), env={"MODELCTL_API_KEY": "gateway-key"})
    s.gateway, s.keyed_gateway = s.url("gateway"), s.url("keyed")
    try:
        for name in ("emb_a", "emb_b", "rerank", "secure", "chat", "slow", "limited", "anon", "gateway", "keyed"):
            p.wait_healthy(name, s.url(name), timeout=120)
        wait_for(lambda: http_get(s.url("ollama") + "/api/version")[0] == 200, 30, what="the Ollama stand-in")
        yield s
    finally:
        p.end()
        s.mute_socket.close()


# ---------------------------------------------------------------------- the OpenAI SDK, base_url = the gateway
def test_models_list_names_every_server_with_its_state(stack):
    models = {m.owned_by: m for m in stack.client().models.list().data}
    assert {"lab/emb-a", "lab/emb-b", "lab/rerank", "lab/chat", "lab/ollama", "lab/broken", "other/emb-a"} <= set(models)
    assert "other/sneaky" not in models  # a record whose URL is not a plain server address is never routed to
    a = models["lab/emb-a"].model_dump()
    assert (a["id"], a["task"], a["state"], a["url"], a["memory"]) == ("emb-a", "embedding", "ready", stack.url("emb_a"), 123)
    assert a["aliases"] == ["minilm", "BAAI/bge-small"]
    assert models["lab/emb-b"].model_dump()["memory"] == 650 * 1024 * 1024  # declared, not measured yet
    assert models["lab/rerank"].model_dump()["task"] == "rerank"
    assert models["lab/slow"].model_dump()["state"] == "idle"
    broken = models["lab/broken"].model_dump()
    assert (broken["state"], broken["last_error"]) == ("failed", "CUDA out of memory")


def test_embeddings_of_two_models_come_from_their_own_servers_with_the_same_vectors(stack):
    gateway = stack.client()
    for name, server, dims in (("emb-a", "emb_a", 8), ("emb-b", "emb_b", 12)):
        through = gateway.embeddings.create(model=name, input=["hello world", "gateway"])
        direct = stack.client(stack.url(server)).embeddings.create(model=name, input=["hello world", "gateway"])
        assert through.model == name
        assert [len(d.embedding) for d in through.data] == [dims, dims]
        assert [d.embedding for d in through.data] == [d.embedding for d in direct.data]


def test_a_chat_stream_arrives_chunk_by_chunk(stack):
    arrivals = []
    stream = stack.client().chat.completions.create(model="stand-in", messages=[{"role": "user", "content": "hi"}], stream=True)
    for chunk in stream:
        arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    assert [text for _, text in arrivals] == [f"t{i} " for i in range(CHAT_TOKENS)]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    # each chunk came when the server sent it, not all at the end
    assert min(gaps) > CHAT_INTERVAL / 3, gaps
    assert arrivals[-1][0] - arrivals[0][0] > (CHAT_TOKENS - 2) * CHAT_INTERVAL


def test_an_unknown_model_is_a_404_that_lists_the_known_ones(stack):
    with pytest.raises(openai.NotFoundError) as e:
        stack.client().embeddings.create(model="no-such-model", input="x")
    message = e.value.body["message"]  # type: ignore[index]
    assert "'no-such-model'" in message and "emb-a" in message and "emb-b" in message
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_the_servers_still_answer_on_their_own_ports(stack):
    assert http_post(stack.url("emb_a") + "/v1/embeddings", {"input": "x"})[0] == 200
    assert http_post(stack.url("chat") + "/v1/chat/completions", {"model": "stand-in", "max_tokens": 1})[0] == 200


# ---------------------------------------------------------------------- names
def test_a_server_is_reached_by_alias_and_by_profile_and_server_name(stack):
    for name in ("minilm", "BAAI/bge-small", "lab/emb-a"):
        status, body, _ = http_post(stack.gateway + "/v1/embeddings", {"model": name, "input": "x"})
        assert (status, len(body["data"][0]["embedding"])) == (200, 8), name
    # an engine that checks the name gets its own served name in place of the alias
    status, body, _ = http_post(stack.gateway + "/v1/chat/completions", {"model": "gpt-4o-mini", "max_tokens": 1})
    assert (status, body["model"]) == (200, "stand-in")


def test_a_server_without_a_model_name_is_reached_by_the_ids_it_reports(stack):
    def reported() -> list:
        return next(m for m in http_get(stack.gateway + "/v1/models")[1]["data"] if m["server"] == "lab/anon")["reported"]

    assert wait_for(reported, 10, what="the model ids lab/anon reports") == ["reported-model"]
    status, body, _ = http_post(stack.gateway + "/v1/chat/completions", {"model": "reported-model", "max_tokens": 1})
    assert (status, body["model"]) == (200, "reported-model")


def test_one_name_is_embedding_on_one_server_and_rerank_on_another(stack):
    status, body, _ = http_post(stack.gateway + "/v1/rerank", {"model": "emb-a", "query": "cat", "documents": ["a cat", "a dog"]})
    assert status == 200 and {r["index"] for r in body["results"]} == {0, 1}
    status, body, _ = http_post(stack.gateway + "/rerank", {"model": "emb-a", "query": "cat", "documents": ["a cat"]})
    assert status == 200 and "results" in body
    status, body, _ = http_post(stack.gateway + "/v1/embeddings", {"model": "emb-a", "input": "cat"})
    assert status == 200 and len(body["data"][0]["embedding"]) == 8
    # a name that exists, at an endpoint its server does not serve
    status, body, _ = http_post(stack.gateway + "/v1/rerank", {"model": "emb-b", "query": "q", "documents": ["d"]})
    assert status == 404 and "lab/emb-b" in body["error"]["message"] and "/v1/embeddings" in body["error"]["message"]


def test_a_name_two_profiles_share_goes_to_the_gateways_own_profile(stack):
    status, _, _ = http_post(stack.gateway + "/v1/embeddings", {"model": "emb-a", "input": "x"})
    assert status == 200  # other/emb-a listens nowhere: it would have been a 502
    status, body, _ = http_post(stack.gateway + "/v1/embeddings", {"model": "other/emb-a", "input": "x"})
    assert status in (502, 503) and "other/emb-a" in body["error"]["message"], body


def test_teis_routes_use_the_default_or_the_server_named_in_the_path(stack):
    status, body, _ = http_post(stack.gateway + "/embed", {"inputs": "hello"})
    assert status == 200 and len(body[0]) == 8  # the default for embedding: emb-a
    status, body, _ = http_post(stack.gateway + "/servers/lab/emb-b/embed", {"inputs": "hello"})
    assert status == 200 and len(body[0]) == 12
    status, body, _ = http_post(stack.gateway + "/rerank", {"query": "cat", "texts": ["a cat", "dog"]})
    assert status == 200 and {r["index"] for r in body} == {0, 1}  # the only rerank server
    status, body = http_get(stack.gateway + "/servers/lab/nope/health")
    assert status == 404 and "lab/emb-a" in body["error"]["message"]


def test_ollamas_api_reaches_ollama_servers(stack):
    status, body = http_get(stack.gateway + "/api/tags")
    assert status == 200 and [m["name"] for m in body["models"]] == ["tiny:latest"]
    with httpx.stream("POST", stack.gateway + "/api/chat", json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}) as r:
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
    assert "".join(line["message"]["content"] for line in lines).strip() == "fake answer" and lines[-1]["done"]
    status, body, _ = http_post(stack.gateway + "/api/embed", {"model": "tiny:latest", "input": ["ab", "abc"]})
    assert status == 200 and body["embeddings"][1][0] == 3.0
    status, body, _ = http_post(stack.gateway + "/api/chat", {"model": "emb-a", "messages": []})
    assert status == 404 and isinstance(body["error"], str)  # Ollama's error shape on Ollama's routes


# ---------------------------------------------------------------------- errors that name the server
def test_a_failed_server_is_a_503_with_its_last_error(stack):
    status, body, _ = http_post(stack.gateway + "/v1/embeddings", {"model": "broken", "input": "x"})
    assert status == 503 and "lab/broken" in body["error"]["message"] and "CUDA out of memory" in body["error"]["message"]


def test_a_server_that_refuses_is_a_502_naming_it(stack):
    status, body, _ = http_post(stack.gateway + "/v1/chat/completions", {"model": "dead"})
    assert status == 502 and "lab/dead" in body["error"]["message"] and stack.url("dead") in body["error"]["message"]


def test_a_server_that_does_not_answer_is_a_504_naming_it(stack):
    status, body, _ = http_post(stack.gateway + "/v1/chat/completions", {"model": "mute"})
    assert status == 504 and "lab/mute" in body["error"]["message"]


# ---------------------------------------------------------------------- the data path
def test_a_stream_waiting_for_its_server_gets_sse_comments_then_its_chunks(stack):
    with httpx.stream("POST", stack.gateway + "/v1/chat/completions", json={"model": "slow-head", "stream": True}, timeout=10) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    comments = [line for line in lines if line.startswith(":")]
    data = [line for line in lines if line.startswith("data:")]
    assert len(comments) >= 2 and "lab/slow" in comments[0]
    assert lines.index(data[0]) > lines.index(comments[-1]) and data[-1] == "data: [DONE]" and len(data) == 3


def test_a_client_that_leaves_ends_the_servers_stream(stack):
    before = http_get(stack.url("chat") + "/stats")[1]
    with httpx.stream("POST", stack.gateway + "/v1/chat/completions", json={"model": "stand-in", "stream": True, "max_tokens": 200}) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    wait_for(
        lambda: http_get(stack.url("chat") + "/stats")[1]["cancelled"] > before["cancelled"], 5, what="the server's stream to be cancelled"
    )
    assert http_get(stack.url("chat") + "/stats")[1]["open"] == 0


def test_max_concurrency_queues_then_answers_429_with_retry_after(stack):
    results: list[tuple[int, dict]] = []

    def call() -> None:
        status, _, headers = http_post(stack.gateway + "/v1/chat/completions", {"model": "limited"})
        results.append((status, headers))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    for t in threads:
        t.join()
    statuses = sorted(s for s, _ in results)
    assert statuses == [200, 200, 429]  # one in flight, one queued, one refused
    assert next(h for s, h in results if s == 429)["retry-after"] == "1"


def test_the_gateways_key_is_required_and_servers_get_their_own(stack):
    assert http_post(stack.keyed_gateway + "/v1/embeddings", {"model": "secure", "input": "x"})[0] == 401
    assert http_get(stack.keyed_gateway + "/v1/models")[0] == 401
    assert http_get(stack.keyed_gateway + "/health")[0] == 200
    client = stack.client(stack.keyed_gateway, key="gateway-key")
    assert len(client.embeddings.create(model="secure", input="x").data[0].embedding) == 4  # the server's own key was sent
    assert len(client.embeddings.create(model="emb-a", input="x").data[0].embedding) == 8


def test_metrics_count_requests_per_model_and_wake_waits(stack):
    http_post(stack.gateway + "/v1/embeddings", {"model": "emb-b", "input": "x"})
    status, text = http_get(stack.gateway + "/metrics")
    assert status == 200
    assert 'gateway_requests_total{code="200",endpoint="/v1/embeddings",model="emb-b",server="lab/emb-b"}' in text
    assert 'gateway_request_seconds_count{model="emb-b",server="lab/emb-b"}' in text
    assert "gateway_wake_waits_total" in text and "gateway_queue_wait_seconds" in text
    assert "no-such-model" not in text  # names clients make up never become labels


def test_health_names_records_it_cannot_read(stack):
    status, body = http_get(stack.gateway + "/health")
    assert status == 200 and any(path.endswith("garbled.json") for path in body["unreadable_records"])


# ---------------------------------------------------------------------- hostile input
@pytest.mark.parametrize(
    ("payload", "status"),
    [
        ({"input": "x"}, 400),
        ({"model": 3, "input": "x"}, 400),
        ({"model": ["emb-a"], "input": "x"}, 400),
        ({"model": {"$ne": ""}, "input": "x"}, 400),
        ({"model": "", "input": "x"}, 400),
        ({"model": "x" * 10_000, "input": "x"}, 400),
        ({"model": "../emb-a", "input": "x"}, 404),
        ({"model": "lab/../lab/emb-a", "input": "x"}, 404),
        ({"model": "lab%2femb-a", "input": "x"}, 404),
        ({"model": "http://127.0.0.1:1/", "input": "x"}, 404),
        ({"model": "other/sneaky", "input": "x"}, 404),
    ],
)
def test_a_bad_model_gets_a_4xx_and_is_never_forwarded(stack, payload, status):
    got, body, _ = http_post(stack.gateway + "/v1/embeddings", payload)
    assert got == status and body["error"]["param"] == "model"


def test_bodies_that_are_not_json_objects_get_400(stack):
    for raw in (b"not json", b"[1, 2]", b'"emb-a"', b""):
        assert http_post(stack.gateway + "/v1/embeddings", None, raw=raw)[0] == 400


def test_a_path_cannot_reach_another_address(stack):
    for path in ("/servers/lab/emb-a/..%2f..%2fx", "/servers/lab%2f..%2fother/emb-a/health", "/servers/other/sneaky/health"):
        status, _ = http_get(stack.gateway + path)
        assert status in (400, 404), path


def test_a_100mb_body_is_refused_413_and_the_gateway_keeps_serving(stack):
    size = 100 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", stack.ports["gateway"]), timeout=10) as s:
        s.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    # the same without a length given: chunked, refused once past the limit
    chunk = b"x" * (1 << 20)
    with socket.create_connection(("127.0.0.1", stack.ports["gateway"]), timeout=10) as s:
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(100):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # closed once it had seen enough
        answer = s.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413")
    assert http_post(stack.gateway + "/v1/embeddings", {"model": "emb-a", "input": "x"})[0] == 200


def test_a_slow_loris_client_is_cut_off_and_others_are_served(stack):
    with socket.create_connection(("127.0.0.1", stack.ports["gateway"]), timeout=10) as s:
        started = time.monotonic()
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\n")
        closed = False
        for _ in range(40):
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            assert http_post(stack.gateway + "/v1/embeddings", {"model": "emb-a", "input": "x"}, timeout=5)[0] == 200
            s.settimeout(0.1)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
        assert closed and time.monotonic() - started < 3.5  # --header-timeout 1
    with socket.create_connection(("127.0.0.1", stack.ports["gateway"]), timeout=10) as s:
        body = b'{"model": "emb-a", "input": "x"}'
        s.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body[:5]))
        s.settimeout(5)
        assert s.recv(4096).startswith(b"HTTP/1.1 408")  # --body-timeout 2


# ---------------------------------------------------------------------- pieces
def test_the_concurrency_gate_hands_its_place_on_in_order():
    async def scenario() -> list[str]:
        gate, order = Gate(limit=1, queue=2), []
        await gate.enter()

        async def waiter(name: str) -> None:
            await gate.enter()
            order.append(name)
            gate.leave()

        tasks = [asyncio.create_task(waiter(n)) for n in ("a", "b")]
        await asyncio.sleep(0.01)
        with pytest.raises(Full):
            await gate.enter()
        tasks[0].cancel()  # a client that leaves the queue gives up its place
        await asyncio.sleep(0.01)
        gate.leave()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert (gate.in_flight, len(gate.waiters)) == (0, 0)
        return order

    assert asyncio.run(scenario()) == ["b"]


def profile_text(servers: dict, **top: object) -> dict:
    return {"name": "lab", "servers": servers, **top}


def test_a_name_that_reaches_two_servers_of_one_task_is_refused_with_file_servers_and_key():
    servers = {
        "a": {"kind": "sentence", "model_name": "mini"},
        "b": {"kind": "sentence", "model_name": "other", "aliases": ["mini"]},
    }
    with pytest.raises(ProfileError) as e:
        parse_profile(profile_text(servers), "lab.yaml")
    assert (e.value.source, e.value.server, e.value.key) == ("lab.yaml", "b", "aliases")
    assert "'a'" in str(e.value) and "'mini'" in str(e.value)


def test_one_name_may_serve_embeddings_on_one_server_and_rerank_on_another():
    servers = {"embed": {"kind": "sentence", "model_name": "mini"}, "rerank": {"kind": "sentence", "task": "rerank", "model_name": "mini"}}
    assert set(parse_profile(profile_text(servers), "lab.yaml").servers) == {"embed", "rerank"}


def test_the_gateway_key_makes_a_gateway_server():
    profile = parse_profile(profile_text({"a": {"kind": "sentence"}}, gateway={"port": 8000, "api_key": "k", "scope": "all"}), "lab.yaml")
    spec = profile.servers["gateway"]
    assert (spec.kind, spec.port, spec.socket, spec.notify, spec.replace) == ("gateway", 8000, True, True, "overlap")
    from modelctl.backends.gateway import GatewayBackend

    launch = GatewayBackend().launch(spec, 8000, [])
    assert launch.argv[1:3] == ["-m", "servers.gateway"] and "--profile" not in launch.argv  # scope: all
    assert launch.env["MODELCTL_API_KEY"] == "k" and "k" not in launch.argv
    with pytest.raises(ProfileError) as e:
        parse_profile(profile_text({"a": {"kind": "sentence"}}, gateway={"port": 8000, "scope": "everything"}), "lab.yaml")
    assert e.value.key == "gateway.scope"
    with pytest.raises(ProfileError) as e:
        parse_profile(profile_text({"gateway": {"kind": "sentence"}}, gateway={"port": 8000}), "lab.yaml")
    assert e.value.server == "gateway"


def test_a_profile_may_be_a_gateway_alone_for_every_profile_but_not_for_none():
    """A front-door profile: `gateway: {scope: all}` and no servers of its own; without scope: all
    it would route to nothing, which is said with the file and the key."""
    profile = parse_profile({"name": "front", "gateway": {"port": 8000, "scope": "all"}}, "front.yaml")
    assert list(profile.servers) == ["gateway"] and profile.servers["gateway"].options["scope"] == "all"
    with pytest.raises(ProfileError) as e:
        parse_profile({"name": "front", "gateway": {"port": 8000}}, "front.yaml")
    assert e.value.key == "gateway.scope" and "scope: all" in str(e.value) and "front.yaml" in str(e.value)
    with pytest.raises(ProfileError) as e:
        parse_profile({"name": "front"}, "front.yaml")
    assert e.value.key == "servers"


# ---------------------------------------------------------------------- as modelctl runs it
def test_a_profiles_gateway_is_supervised_wakes_idle_servers_and_stops_with_down(mc):
    chat = [sys.executable, str(Path(__file__).parent / "servers" / "chat_stream_server.py"), "--port", "{port}", "--model", "stand-in"]
    embed = [sys.executable, str(Path(__file__).parent / "servers" / "fake_sentence_server.py"), "--model-path", "fake:dims=8"]
    gateway_port = free_port()
    path = mc.profile(
        {
            "emb": {
                "kind": "command",
                "task": "embedding",
                "model_name": "fake-embed",
                "command": [*embed, "--port", "{port}", "--model-name", "fake-embed"],
                "socket": "inherit",
                "notify": True,
                "health": {"http": "/health"},
            },
            "chat": {
                "kind": "command",
                "model_name": "stand-in",
                "command": [*chat, "--load", "1"],
                "socket": "inherit",
                "notify": True,
                "start": "on-demand",
                "health": {"http": "/health"},
            },
        },
        gateway={"port": gateway_port},
    )
    up = mc.cli("up", "-p", str(path))
    assert up.returncode == 0, up.stderr
    row = mc.row("gateway")
    assert (row["kind"], row["state"], row["socket"]) == ("gateway", "ready", "held")
    rows = json.loads(mc.cli("status", "--json").stdout)
    assert any(r["name"] == "gateway" and r["kind"] == "gateway" and r["state"] == "ready" for r in rows)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="none", max_retries=0, timeout=60)
    states = {m.id: m.model_dump()["state"] for m in client.models.list().data}
    assert states == {"fake-embed": "ready", "stand-in": "idle"}
    answer = client.chat.completions.create(model="stand-in", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert answer.choices[0].message.content == "t0 t1"  # 200 after the wake
    assert mc.row("chat")["state"] == "ready"
    assert len(client.embeddings.create(model="fake-embed", input="x").data[0].embedding) == 8
    assert http_post(mc.row("emb")["url"] + "/v1/embeddings", {"input": "x"})[0] == 200  # its own port too
    down = mc.cli("down", "-p", str(path))
    assert down.returncode == 0, down.stderr
    assert mc.row("gateway")["state"] == "stopped"
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{gateway_port}/health")


def test_systemd_units_include_the_gateway(mc):
    path = mc.profile({"a": {"kind": "sentence"}}, gateway={"port": 18999})
    out = mc.tmp / "units"
    assert mc.cli("systemd", "generate", "-p", str(path), "--out", str(out)).returncode == 0
    service = (out / "modelctl-test-gateway.service").read_text()
    assert " run gateway " in service and (out / "modelctl-test-gateway.socket").exists()
    assert "ListenStream=127.0.0.1:18999" in (out / "modelctl-test-gateway.socket").read_text()


def supervised_embedders(mc, count: int, **keys: object) -> dict:
    embed = [sys.executable, str(Path(__file__).parent / "servers" / "fake_sentence_server.py")]
    return {
        f"e{i}": {
            "kind": "command",
            "task": "embedding",
            "model_name": f"e{i}",
            "command": [*embed, "--model-path", "fake:dims=8,delay=0.05", "--port", "{port}", "--model-name", f"e{i}"],
            "socket": "inherit",
            "notify": True,
            "health": {"http": "/health"},
            **keys,
        }
        for i in range(count)
    }


@pytest.mark.slow
def test_a_gateway_restart_under_load_refuses_and_fails_no_request(mc):
    gateway_port = free_port()
    path = mc.profile(supervised_embedders(mc, 1), gateway={"port": gateway_port})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    totals = {}
    with ClosedLoop(f"http://127.0.0.1:{gateway_port}", "/v1/embeddings", {"model": "e0", "input": "hi"}, clients=8, timeout=60) as load:
        load.wait_answered(20)
        for what in ("restart", "restart again"):
            t0 = time.monotonic()
            res = mc.cli("restart", "test/gateway")
            assert res.returncode == 0, res.stdout + res.stderr
            load.wait_answered(20)
            totals[what] = load.tally.summary(t0, time.monotonic())
    for what, t in totals.items():
        assert t["refused"] == 0 and t["failed"] == 0, (what, t)
        assert t["outage_s"] < 1.0, (what, t)
    assert mc.row("gateway")["restarts"] == 0 and mc.row("gateway")["state"] == "ready"


@pytest.mark.slow
def test_on_demand_servers_under_a_budget_called_in_turn_through_the_gateway_all_answer(mc):
    gateway_port = free_port()
    servers = supervised_embedders(mc, 2, start="on-demand", memory="60MiB", idle_timeout="1m")
    path = mc.profile(servers, gateway={"port": gateway_port}, budget={"memory": "160MiB"})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="none", max_retries=0, timeout=120)
    statuses = []
    for turn in range(6):
        name = f"e{turn % 2}"
        for _ in range(3):
            statuses.append(len(client.embeddings.create(model=name, input="hi").data[0].embedding))
        assert mc.row(name)["state"] == "ready"
        assert mc.row(f"e{(turn + 1) % 2}")["state"] in ("idle", "stopping")  # evicted to make room
    assert statuses == [8] * 18
    assert sum(mc.record(f"e{i}").usage.evictions for i in range(2)) >= 4


@pytest.mark.slow
def test_a_server_with_a_request_in_flight_is_not_evicted_for_another(mc):
    gateway_port = free_port()
    servers = supervised_embedders(mc, 2, start="on-demand", memory="60MiB", idle_timeout="1m")
    servers["e0"]["command"][3] = "fake:dims=8,delay=3"  # each of its batches takes 3 s
    path = mc.profile(servers, gateway={"port": gateway_port}, budget={"memory": "160MiB"})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway_port}/v1", api_key="none", max_retries=0, timeout=120)
    assert len(client.embeddings.create(model="e0", input="warm").data[0].embedding) == 8  # e0 is up
    done: dict[str, float] = {}

    def call(name: str) -> None:
        assert len(client.embeddings.create(model=name, input="hi").data[0].embedding) == 8
        done[name] = time.monotonic()

    slow = threading.Thread(target=call, args=("e0",))
    slow.start()
    time.sleep(0.5)  # e0 serves its request...
    other = threading.Thread(target=call, args=("e1",))
    other.start()  # ...when e1, which needs e0's memory, is called
    states = []
    while slow.is_alive():
        states.append(mc.row("e0")["state"])
        time.sleep(0.1)
    slow.join()
    other.join()
    assert set(done) == {"e0", "e1"} and done["e1"] > done["e0"]
    assert set(states) == {"ready"}, states  # never stopped while its request was in flight
    assert mc.record("e0").usage.evictions == 1


def test_the_dashboard_is_served_at_ui_behind_the_gateways_key(stack):
    """The dashboard (servers/dashboard) on the gateway: its page, and its data only with the key;
    without a key on the gateway it is read-only (actions off)."""
    status, page = http_get(stack.keyed_gateway + "/ui/")
    assert status == 200 and "<html" in str(page).lower()
    assert http_get(stack.keyed_gateway + "/ui/api/state")[0] == 403
    status, state = http_get(stack.keyed_gateway + "/ui/api/state", headers={"Authorization": "Bearer gateway-key"})
    assert status == 200 and "lab/emb-a" in [s["id"] for p in state["profiles"] for s in p["servers"]]
    assert http_get(stack.gateway + "/ui/api/state")[0] == 200
    status, _, _ = http_post(stack.gateway + "/ui/api/action", {"action": "stop", "server": "lab/emb-a"})
    assert status == 403
