"""The FastAPI app: OpenAI, Cohere/Jina and TEI request shapes over one batched model."""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from servers.sentence.batching import Batcher, QueueFull
from servers.sentence.model import EncoderModel, InputTooLong, configure_threads, normalize
from servers.sentence.schemas import EmbeddingRequest, RerankRequest, TeiEmbedRequest
from servers.sentence.settings import ServerSettings

log = logging.getLogger("servers.sentence")

try:  # orjson writes float32 arrays an order of magnitude faster than json
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)

except ImportError:  # pragma: no cover - depends on the environment

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, default=lambda o: o.tolist()).encode()


def json_response(content: Any, status: int = 200, headers: dict | None = None) -> Response:
    return Response(dumps(content), status_code=status, media_type="application/json", headers=headers)


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: ApiError) -> Response:
    return json_response(error_body(e.message, e.type, e.param, e.code), e.status, e.headers)


class GuardMiddleware:
    """Before any parsing: the API key (every route but /health) and the body size limit."""

    def __init__(self, app: Any, settings: ServerSettings):
        self.app = app
        self.limit = settings.max_body_bytes
        self.key = f"Bearer {settings.api_key}".encode() if settings.api_key else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key is not None and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                return await self._reject(
                    send, ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", code="invalid_api_key")
                )
        if scope["method"] == "POST" and not headers.get(b"content-type", b"").startswith(b"application/json"):
            # curl -d and some clients send no (or a form) content type: the body is JSON all the same
            scope = dict(
                scope, headers=[(k, v) for k, v in scope["headers"] if k != b"content-type"] + [(b"content-type", b"application/json")]
            )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._reject(
                send, ApiError(413, f"request body of {int(length)} bytes is over the limit of {self.limit}", code="body_too_large")
            )
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # read the body here, against the limit, whatever its framing (chunked bodies have no length)
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return await self._reject(
                    send, ApiError(413, f"request body is over the limit of {self.limit} bytes", code="body_too_large")
                )
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _reject(send: Callable, e: ApiError) -> None:
        body = dumps(error_body(e.message, e.type, e.param, e.code))
        await send(
            {
                "type": "http.response.start",
                "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


class ModelState:
    """The model and batcher, loaded in the background so /health can answer 503 meanwhile."""

    def __init__(self, settings: ServerSettings, model_factory: Callable[..., EncoderModel]):
        self.settings = settings
        self.model_factory = model_factory
        self.model: EncoderModel | None = None
        self.batcher: Batcher | None = None
        self.ready = False
        self.workers = 1
        self.error: str | None = None

    def load(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        self.workers = configure_threads(s.device, s.model_workers, s.torch_threads)
        model = self.model_factory(s.model_path, s.task, s.device, s.max_batch_tokens, s.max_batch_size)
        if s.warmup:
            model.run(model.tokenize(["warm up the model"] * 2, truncate=True))
        self.model = model
        log.info(
            "model %s loaded on %s in %.1fs (%s)",
            s.model_path,
            s.device,
            time.perf_counter() - t0,
            "cross-encoder" if model.cross_encoder else "bi-encoder",
        )


def create_app(settings: ServerSettings, model_factory: Callable[..., EncoderModel] = EncoderModel) -> FastAPI:
    state = ModelState(settings, model_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def load() -> None:
            try:
                state.load()
            except Exception as e:
                state.error = f"{type(e).__name__}: {e}"
                traceback.print_exc()
                print(f"sentence server: cannot load model {settings.model_path!r}: {state.error}", file=sys.stderr, flush=True)
                os._exit(3)
            loop.call_soon_threadsafe(start_batcher)

        def start_batcher() -> None:
            assert state.model is not None
            state.batcher = Batcher(state.model.run, settings.max_batch_size * 4, settings.max_queue, state.workers)
            state.batcher.start()
            state.ready = True

        threading.Thread(target=load, name="load-model", daemon=True).start()
        yield
        if state.batcher is not None:
            await state.batcher.stop()

    app = FastAPI(title="modelctl sentence server", version="0.1.0", lifespan=lifespan)
    app.state.model_state = state

    # --------------------------------------------------------------- errors
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> Response:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> Response:
        errors = e.errors()
        if any(err.get("type") in ("json_invalid", "json_type") for err in errors):
            return error_response(ApiError(400, "request body is not valid JSON", code="invalid_json"))
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None  # the top-level field; deeper parts name union members
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        return error_response(ApiError(422, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> Response:
        message = e.detail if isinstance(e.detail, str) else str(e.detail)
        if e.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(ApiError(e.status_code, message, code=None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> Response:
        log.exception("error serving %s", request.url.path)
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    app.add_middleware(GuardMiddleware, settings=settings)

    # --------------------------------------------------------------- helpers
    def ready_model(task: str) -> tuple[EncoderModel, Batcher]:
        if not state.ready or state.model is None or state.batcher is None:
            raise ApiError(
                503, "the model is still loading; retry shortly", type="server_error", code="model_loading", headers={"Retry-After": "1"}
            )
        if state.model.task != task:
            raise ApiError(404, f"this server serves the {state.model.task} task, not {task}", code="wrong_task")
        return state.model, state.batcher

    def check_count(n: int, param: str) -> None:
        if n == 0:
            raise ApiError(400, f"{param} must not be empty", param=param, code="empty_input")
        if n > settings.max_inputs:
            raise ApiError(422, f"{param} has {n} items, more than the limit of {settings.max_inputs}", param=param, code="too_many_inputs")

    def check_texts(texts: list[str], param: str) -> None:
        check_count(len(texts), param)
        for i, t in enumerate(texts):
            if not t or not t.strip():
                raise ApiError(400, f"{param}[{i}] is an empty string", param=param, code="empty_input")

    async def run(batcher: Batcher, n_inputs: int, prepare: Callable, *args: Any) -> tuple[list, np.ndarray]:
        """Tokenize (prepare) and run on a model worker; map their errors to HTTP errors."""
        try:
            return await batcher.submit(lambda: prepare(*args), n_inputs)
        except QueueFull as e:
            raise ApiError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except InputTooLong as e:
            raise ApiError(422, str(e), param="input", code="input_too_long") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="input", code="invalid_input") from None

    async def embed_texts(texts: list[str], truncate: bool) -> tuple[np.ndarray, int]:
        model, batcher = ready_model("embedding")
        rows, vectors = await run(batcher, len(texts), model.tokenize, texts, truncate)
        return vectors, sum(len(r.ids) for r in rows)

    # --------------------------------------------------------------- routes
    @app.get("/health")
    async def health() -> Response:
        """200 once the model is loaded and warmed up; 503 before."""
        body = {
            "status": "ok" if state.ready else ("error" if state.error else "loading"),
            "model": settings.model_name,
            "task": settings.task,
            "device": settings.device,
            "queue_depth": state.batcher.depth if state.batcher else 0,
        }
        if state.batcher is not None and state.batcher.batches:
            body["batches"] = state.batcher.batches
            body["mean_batch_inputs"] = round(state.batcher.batched_inputs / state.batcher.batches, 2)
        if state.model is not None:
            body["max_input_tokens"] = state.model.max_length
            body["dimensions"] = state.model.dimensions
            body["cross_encoder"] = state.model.cross_encoder
            body["model_workers"] = state.workers
        if state.error:
            body["error"] = state.error
        return json_response(body, 200 if state.ready else 503)

    @app.get("/v1/models")
    async def models() -> Response:
        """The one model this server serves."""
        return json_response(
            {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": int(STARTED), "owned_by": "modelctl"}]}
        )

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> Response:
        """OpenAI embeddings: strings or token ids; float or base64; optional dimensions."""
        model, batcher = ready_model("embedding")
        truncate = settings.truncate if req.truncate is None else req.truncate
        if req.dimensions is not None and model.dimensions is not None and req.dimensions > model.dimensions:
            raise ApiError(
                400,
                f"dimensions is {req.dimensions}, more than this model's {model.dimensions}",
                param="dimensions",
                code="invalid_dimensions",
            )
        raw = req.input
        if isinstance(raw, str):
            raw = [raw]
        if raw and isinstance(raw[0], int):
            raw = [raw]  # one input given as a list of token ids
        check_count(len(raw), "input")
        if isinstance(raw[0], str):
            check_texts(raw, "input")
            vectors, tokens = await embed_texts(raw, truncate)
        else:
            rows, vectors = await run(batcher, len(raw), model.rows_from_ids, raw, truncate)
            tokens = sum(len(r.ids) for r in rows)
        vectors = normalize(vectors)
        if req.dimensions is not None:
            vectors = normalize(vectors[:, : req.dimensions])
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if req.encoding_format == "base64":
            data = [
                {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                for i, v in enumerate(vectors)
            ]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        return json_response(
            {"object": "list", "data": data, "model": settings.model_name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        )

    @app.post("/embed")
    async def tei_embed(req: TeiEmbedRequest) -> Response:
        """Text Embeddings Inference: a bare list of vectors."""
        texts = [req.inputs] if isinstance(req.inputs, str) else req.inputs
        check_texts(texts, "inputs")
        vectors, _ = await embed_texts(texts, req.truncate or settings.truncate)
        if req.normalize:
            vectors = normalize(vectors)
        return json_response(np.ascontiguousarray(vectors, dtype=np.float32))

    async def rerank(req: RerankRequest) -> Response:
        model, batcher = ready_model("rerank")
        truncate = settings.truncate if req.truncate is None else req.truncate
        tei = req.documents is None
        if tei and req.texts is None:
            raise ApiError(422, "documents (Cohere/Jina) or texts (TEI) is required", param="documents", code="missing_documents")
        docs = req.texts if tei else [d if isinstance(d, str) else d.text for d in req.documents]
        param = "texts" if tei else "documents"
        check_texts(docs, param)
        if not req.query.strip():
            raise ApiError(400, "query is an empty string", param="query", code="empty_input")
        if model.cross_encoder:
            rows, raw = await run(batcher, len(docs), model.tokenize_pairs, req.query, docs, truncate)
            scores = model.activate(raw)
        else:
            rows, vectors = await run(batcher, len(docs) + 1, model.tokenize, [req.query, *docs], truncate)
            vectors = normalize(vectors)
            raw = scores = vectors[1:] @ vectors[0]
        tokens = sum(len(r.ids) for r in rows)
        order = sorted(range(len(docs)), key=lambda i: -float(scores[i]))
        if tei:
            values = raw if req.raw_scores else scores
            out = [{"index": i, "score": float(values[i]), **({"text": docs[i]} if req.return_text else {})} for i in order]
            return json_response(out)
        if req.top_n is not None:
            order = order[: req.top_n]
        results = [
            {"index": i, "relevance_score": float(scores[i]), **({"document": {"text": docs[i]}} if req.return_documents else {})}
            for i in order
        ]
        return json_response(
            {
                "id": str(uuid.uuid4()),
                "model": settings.model_name,
                "results": results,
                "usage": {"total_tokens": tokens},
                "meta": {"billed_units": {"search_units": 1}},
            }
        )

    @app.post("/v1/rerank")
    async def rerank_v1(req: RerankRequest) -> Response:
        """Cohere/Jina rerank: results sorted by relevance_score (TEI's shape is accepted too)."""
        return await rerank(req)

    @app.post("/rerank")
    async def rerank_plain(req: RerankRequest) -> Response:
        """Cohere/Jina shape (documents) → {results}; TEI shape (texts) → bare [{index, score}]."""
        return await rerank(req)

    return app


STARTED = time.time()
