"""The bundled server's scheduling, deterministically: the batcher (servers/sentence/batching.py)
driven with a model whose calls block until the test releases them, so that "a query runs while
a bulk chunk holds the worker" is a fact, not a timing; the lane each model call ran on, seen by
the stand-in model of a real server process; and which path answered `/v1/embeddings`.

The timing of the same behaviours (a query's latency beside bulk indexing, and the bulk clients'
pace) is a benchmark: `bench/sentence_throughput.py` (its mixed workload), not a test."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from servers.sentence.batching import Batcher
from servers.sentence.encoder import LANE

from .conftest import http_post, wait_for
from .fake_encoder import CLS, SEP, FakeEncoder
from .sentence_fixtures import sentence_server


class Model:
    """Records each call's rows and lane; a call with a row that starts with a blocked prefix
    waits until the test releases it."""

    def __init__(self, blocked: tuple[str, ...] = ("bulk",)):
        self.calls: list[tuple[list[str], bool]] = []
        self.blocked = blocked
        self.release = threading.Event()
        self.holding = threading.Event()  # a blocked call has begun

    def run(self, rows: list[str]) -> np.ndarray:
        self.calls.append((list(rows), LANE.express))
        if any(r.startswith(self.blocked) for r in rows):
            self.holding.set()
            assert self.release.wait(30), "the test never released the model"
        return np.zeros((len(rows), 2), dtype=np.float32)

    def lanes_of(self, prefix: str) -> set[bool]:
        return {express for rows, express in self.calls if any(r.startswith(prefix) for r in rows)}


def texts(prefix: str, n: int) -> Callable[[], Sequence[Any]]:
    return lambda: [f"{prefix}{i}" for i in range(n)]


def batcher(model: Model, express: int) -> Batcher:
    # four rows a batch, one row a token: a request of at most four inputs fits one batch (small)
    return Batcher(model.run, max_rows=4, max_queue_inputs=10_000, workers=1, express=express, max_tokens=4)


async def done_within(task: asyncio.Future, seconds: float) -> bool:
    finished, _ = await asyncio.wait({task}, timeout=seconds)
    return bool(finished)


def test_a_query_runs_on_the_express_lane_while_a_bulk_chunk_holds_the_only_worker():
    """A 40-input request runs as chunks of 4 on the one worker; its first chunk is held. A query
    of 4 inputs (one batch's worth) is answered meanwhile, on the express lane, and a second one
    after it too; then the bulk request finishes. Fails if the express worker never runs, takes
    only smaller requests, is not given back, or if the model is not told its lane."""

    async def scenario() -> Model:
        model = Model()
        b = batcher(model, express=1)
        b.start()
        bulk = asyncio.ensure_future(b.submit(texts("bulk", 40), 40))
        assert await asyncio.to_thread(model.holding.wait, 10)
        for name in ("query", "again"):
            query = asyncio.ensure_future(b.submit(texts(name, 4), 4))
            assert await done_within(query, 10), f"the {name} waited for the bulk chunk"
            rows, out = query.result()
            assert list(rows) == [f"{name}{i}" for i in range(4)] and out.shape == (4, 2)
        assert not bulk.done()
        model.release.set()
        rows, out = await asyncio.wait_for(bulk, 10)
        assert len(rows) == 40 and out.shape == (40, 2)
        await b.stop()
        return model

    model = asyncio.run(scenario())
    assert model.lanes_of("query") == {True} and model.lanes_of("again") == {True}
    assert model.lanes_of("bulk") == {False}


def test_the_express_lane_never_takes_bulk_work():
    """While one bulk request's chunk holds the worker, a second bulk request waits for the worker:
    the express worker takes only requests that fit one batch.
    Fails if the express lane gathers bulk rows, or if every request counts as small."""

    async def scenario() -> Model:
        model = Model()
        b = batcher(model, express=1)
        b.start()
        first = asyncio.ensure_future(b.submit(texts("bulk", 12), 12))
        assert await asyncio.to_thread(model.holding.wait, 10)
        second = asyncio.ensure_future(b.submit(texts("more", 12), 12))
        assert not await done_within(second, 0.5)
        model.release.set()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
        await b.stop()
        return model

    model = asyncio.run(scenario())
    assert model.lanes_of("more") == {False} and model.lanes_of("bulk") == {False}


def test_without_bulk_work_the_express_lane_stays_idle():
    """After a bulk request has finished, a query waits for the worker that another query holds:
    more model threads than work would only slow the others.
    Fails if the express worker runs beside small work, or if a finished bulk chunk stays counted."""

    async def scenario() -> Model:
        model = Model(blocked=("hold",))
        b = batcher(model, express=1)
        b.start()
        await asyncio.wait_for(b.submit(texts("bulk", 12), 12), 10)  # bulk work came and went
        held = asyncio.ensure_future(b.submit(texts("hold", 1), 1))
        assert await asyncio.to_thread(model.holding.wait, 10)
        query = asyncio.ensure_future(b.submit(texts("query", 1), 1))
        assert not await done_within(query, 0.5), "the query ran beside another small request"
        model.release.set()
        await asyncio.wait_for(asyncio.gather(held, query), 10)
        await b.stop()
        return model

    model = asyncio.run(scenario())
    assert model.lanes_of("query") == {False}


def test_batches_take_rows_round_robin_from_every_waiting_request():
    """Three requests of 8 inputs wait while the worker is held; the next three batches of 4 rows
    take 4 rows of each request, not 6, 3 and 3: each batch starts with the next request.
    Fails if the first request always goes first, or if one request fills a batch."""

    async def scenario() -> Model:
        model = Model(blocked=("hold",))
        b = batcher(model, express=0)
        b.start()
        held = asyncio.ensure_future(b.submit(texts("hold", 1), 1))
        assert await asyncio.to_thread(model.holding.wait, 10)
        waiting = [asyncio.ensure_future(b.submit(texts(p, 8), 8)) for p in ("a", "b", "c")]
        await asyncio.sleep(0.1)  # all three are queued (prepared inline: they are small enough)
        model.release.set()
        await asyncio.wait_for(asyncio.gather(held, *waiting), 10)
        await b.stop()
        return model

    model = asyncio.run(scenario())
    batches = [rows for rows, _ in model.calls if not rows[0].startswith("hold")]
    first_three = [r for rows in batches[:3] for r in rows]
    assert [sum(r.startswith(p) for r in first_three) for p in "abc"] == [4, 4, 4], batches


def test_a_small_request_queued_behind_a_large_one_shares_the_next_batch():
    """While the worker is held, a request of 8 inputs and then one of 2 are queued; the next batch
    takes rows of both (2 and 2), so the small one is answered after one batch, not two.
    Fails if a request's share of a batch is the whole batch."""

    async def scenario() -> Model:
        model = Model(blocked=("hold",))
        b = batcher(model, express=0)
        b.start()
        held = asyncio.ensure_future(b.submit(texts("hold", 1), 1))
        assert await asyncio.to_thread(model.holding.wait, 10)
        large = asyncio.ensure_future(b.submit(texts("large", 8), 8))
        small = asyncio.ensure_future(b.submit(texts("small", 2), 2))
        await asyncio.sleep(0.1)
        model.release.set()
        await asyncio.wait_for(asyncio.gather(held, large, small), 10)
        await b.stop()
        return model

    model = asyncio.run(scenario())
    batches = [rows for rows, _ in model.calls if not rows[0].startswith("hold")]
    assert sorted(batches[0]) == ["large0", "large1", "small0", "small1"], batches


# ---------------------------------------------------------------------- a real server process
def lanes(path) -> list[tuple[list[int], bool]]:
    if not path.exists():
        return []
    return [(entry["ids"], entry["express"]) for line in path.read_text().splitlines() for entry in [json.loads(line)]]


def test_the_server_runs_a_query_beside_bulk_work_on_its_express_lane(tmp_path):
    """The bundled server (stand-in model, one worker, one express worker): a query sent while a
    40-input request's chunk runs is run on the express lane, and the bulk rows never are.
    Fails if the server does not give its batcher the express workers it was told."""
    seen = tmp_path / "lanes.jsonl"
    args = ["--model-workers", "1", "--express-workers", "1", "--max-batch-size", "4", "--no-warmup"]
    with sentence_server(tmp_path, f"fake:dims=8,delay=0.3,lanes={seen}", *args, fake=True) as url:
        bulk = concurrent.futures.ThreadPoolExecutor(1).submit(
            http_post, url + "/v1/embeddings", {"input": [f"bulk{i}" for i in range(40)]}
        )
        wait_for(lambda: lanes(seen), 10, what="the bulk request's first chunk")
        status, _, _ = http_post(url + "/v1/embeddings", {"input": "query"})
        assert status == 200
        assert bulk.result(timeout=60)[0] == 200
    query = [CLS, *FakeEncoder.words("query"), SEP]
    ran = lanes(seen)
    assert [express for ids, express in ran if ids == query] == [True], ran
    assert not any(express for ids, express in ran if ids != query)


# ---------------------------------------------------------------------- the plain path of /v1/embeddings
@pytest.mark.parametrize(
    "payload, plain",
    [
        ({"input": "one text"}, True),
        ({"input": ["two", "texts"], "encoding_format": "base64"}, True),
        ({"input": "one text", "x-unknown-key": 1}, False),  # pydantic's path: FastAPI's layers
    ],
)
def test_a_plain_embeddings_request_is_answered_past_fastapi(payload, plain, monkeypatch):
    """In process: the served application answers a plain `POST /v1/embeddings` without entering
    FastAPI, and hands anything else to it.
    Fails if the plain path is removed (every request then goes through FastAPI)."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from servers.sentence.app import create_app, served
    from servers.sentence.settings import ServerSettings

    entered: list[str] = []
    real_call = FastAPI.__call__

    async def counting_call(self: FastAPI, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            entered.append(scope["path"])
        await real_call(self, scope, receive, send)

    monkeypatch.setattr(FastAPI, "__call__", counting_call)
    settings = ServerSettings(model_path="fake:dims=8", model_name="fake", warmup=False, load_before_serving=True)
    app = create_app(settings, model_factory=FakeEncoder)  # type: ignore[arg-type]
    with TestClient(served(app)) as client:
        res = client.post("/v1/embeddings", json=payload)
        assert res.status_code == 200, res.text
        assert client.get("/v1/models").status_code == 200  # every other route goes on to FastAPI
    assert entered == ([] if plain else ["/v1/embeddings"]) + ["/v1/models"]
