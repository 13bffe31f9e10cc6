"""The FastAPI app: one router per API family over one batched model.

An embedding server mounts the OpenAI embeddings and TEI embed routes; a rerank server the
Cohere/Jina, TEI rerank and predict routes; both have /health, /metrics, /info and /v1/models.
The OpenAPI document (/openapi.json, /docs) lists only the server's own routes, each with the
errors it can answer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from servers.sentence import __version__
from servers.sentence.choice import choose
from servers.sentence.contract import openapi_with_model
from servers.sentence.encoder import ConfigurationError, Encoder
from servers.sentence.errors import ApiError
from servers.sentence.guard import GuardMiddleware
from servers.sentence.metrics import Metrics, MetricsMiddleware
from servers.sentence.models import cached_model_dir, is_cross_encoder, resolve_model_path
from servers.sentence.routes import cohere, openai, tei
from servers.sentence.routes.common import Context, JSONResponse, common_router
from servers.sentence.service import Engine, ModelFactory
from servers.sentence.settings import ServerSettings

if TYPE_CHECKING:
    from servers.sentence.exported import ExportedEncoder
    from servers.sentence.model import SentenceTransformerEncoder

log = logging.getLogger("servers.sentence")

EXIT_CONFIG = 78  # sysexits' EX_CONFIG: modelctl fails the server at once instead of retrying
EXIT_LOAD_FAILED = 1  # anything else (CUDA out of memory, ...): may heal, modelctl retries

# routes of the other task, for a 404 that says which server to call instead
OTHER_TASK_ROUTES = {
    "embedding": ("/v1/rerank", "/v2/rerank", "/rerank", "/predict"),
    "rerank": ("/v1/embeddings", "/embeddings", "/embed"),
}
EMPTY_CODES = ("string_too_short", "too_short")  # pydantic's "min_length" errors: answered 400, as OpenAI does


def encoder_factory(settings: ServerSettings) -> ModelFactory:
    """The encoder the settings ask for: the exported graph (ONNX Runtime, OpenVINO) or
    sentence-transformers on torch; with backend auto, the one `choice.choose` names, and torch
    where the model does not export."""
    if settings.quantize is not None and settings.backend != "onnx":
        return _refuse(f"--quantize {settings.quantize} needs --backend onnx")
    chosen = choose(settings.backend, settings.device)
    cache = Path(settings.cache_dir) if settings.cache_dir else None

    def build(model_path: str, task: str, device: str, max_batch_tokens: int, max_batch_size: int) -> Encoder:
        model: SentenceTransformerEncoder | ExportedEncoder
        reason = chosen.reason
        if chosen.backend != "torch":
            from servers.sentence.exported import ExportedEncoder

            try:
                model = ExportedEncoder(
                    model_path,
                    task,
                    device,
                    max_batch_tokens,
                    max_batch_size,
                    backend=chosen.backend,
                    quantize=settings.quantize,
                    cache_dir=cache,
                )
                model.backend_reason = reason
                return model
            except Exception as e:
                if settings.backend != "auto":
                    raise
                reason = f"auto: the model did not export to ONNX ({type(e).__name__}: {str(e)[:200]}), torch"
                log.warning("backend %s", reason)
        from servers.sentence.model import SentenceTransformerEncoder

        model = SentenceTransformerEncoder(model_path, task, device, max_batch_tokens, max_batch_size, half=chosen.half)
        model.backend_reason = (
            reason if model.half or not chosen.half else f"{reason.removesuffix(' in fp16')}, fp32: the model is not finite in fp16"
        )
        return model

    return build


def _refuse(message: str) -> ModelFactory:
    def factory(*args: Any) -> Any:
        raise ConfigurationError(message)

    return factory


def create_app(settings: ServerSettings, model_factory: ModelFactory | None = None) -> FastAPI:
    if model_factory is None:
        model_factory = encoder_factory(settings)
    engine = Engine(settings, model_factory)
    metrics = Metrics(queue_depth=lambda: engine.queue_depth, ready=lambda: 1.0 if engine.ready else 0.0)
    engine.observe_batch = metrics.batches.observe
    engine.observe_wait = metrics.queue_wait.observe
    ctx = Context(settings, engine, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if settings.load_before_serving:
            await asyncio.to_thread(_load, engine, None)  # uvicorn accepts only after this
            engine.start_batcher()
        else:
            threading.Thread(target=_load, args=(engine, loop), name="load-model", daemon=True).start()
        yield
        if engine.batcher is not None:
            await engine.batcher.stop()

    app = FastAPI(
        title="modelctl sentence server",
        version=__version__,
        description=f"{settings.task} with {settings.model_name}: OpenAI, Cohere/Jina and TEI request shapes.",
        lifespan=lifespan,
        default_response_class=JSONResponse,
    )
    app.state.context = ctx
    routers = [common_router(ctx), openai.models_router(ctx)]
    if settings.task == "embedding":
        routers += [openai.embeddings_router(ctx), tei.embedding_router(ctx)]
    else:
        routers += [cohere.router(ctx), tei.rerank_router(ctx, cross_encoder_of(settings, model_factory))]
    for router in routers:
        app.include_router(router)
    _error_handlers(app, settings)
    routes = {getattr(r, "path", "") for router in routers for r in router.routes}
    build = app.openapi

    def build_fresh() -> dict[str, Any]:
        app.openapi_schema = None  # FastAPI's own cache: ours keeps it once the model is loaded
        return build()

    app.openapi = openapi_with_model(build_fresh, lambda: engine.model, settings.allow_token_ids)  # type: ignore[method-assign]
    # what uvicorn serves: the metrics and the guard around the app, outside FastAPI's own layers,
    # and the common embeddings request answered past them (`served`)
    inner: Any = openai.PlainEmbeddings(app, ctx) if settings.task == "embedding" else app
    app.state.served = MetricsMiddleware(GuardMiddleware(inner, settings=settings), metrics=metrics, routes=routes)
    return app


def served(app: FastAPI) -> Any:
    """The ASGI application to serve: `app` with the metrics and the guard around it."""
    return app.state.served


def cross_encoder_of(settings: ServerSettings, model_factory: ModelFactory) -> bool | None:
    """Whether the model is a cross-encoder, known before it loads (None: not known): a bi-encoder
    reranker has no predict routes, and its OpenAPI document says so."""
    told = getattr(model_factory, "cross_encoder_for", None)  # a stand-in model says it itself
    if told is not None:
        return bool(told(settings.model_path, settings.task))
    try:
        path = resolve_model_path(settings.model_path)
    except ConfigurationError:
        return None
    if not Path(path).expanduser().is_dir():
        path = cached_model_dir(path) or ""
    return is_cross_encoder(path) if path else None


def _load(engine: Engine, loop: asyncio.AbstractEventLoop | None) -> None:
    """Load the model; a model that cannot load ends the server with its reason and exit code.
    With a loop, the batcher is started on it once loaded (else the caller starts it)."""
    try:
        engine.load()
    except ConfigurationError as e:
        _die(engine, f"{e}", EXIT_CONFIG)
    except Exception as e:
        traceback.print_exc()
        _die(engine, f"{type(e).__name__}: {e}", EXIT_LOAD_FAILED)
    if loop is not None:
        loop.call_soon_threadsafe(engine.start_batcher)


def _die(engine: Engine, reason: str, code: int) -> None:
    engine.error = reason
    kind = "configuration error" if code == EXIT_CONFIG else "error"
    print(f"sentence server: {kind}: cannot load model {engine.settings.model_path!r}: {reason}", file=sys.stderr, flush=True)
    os._exit(code)


def _error_handlers(app: FastAPI, settings: ServerSettings) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> Response:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> Response:
        errors = e.errors()
        if any(err.get("type") in ("json_invalid", "json_type") for err in errors):
            return ApiError(400, "request body is not valid JSON", code="invalid_json").response()
        if bad_text := next((err for err in errors if err.get("type") == "string_unicode"), None):
            # JSON can carry a lone surrogate ("\ud800"): no tokenizer can read it
            param = next((str(x) for x in bad_text.get("loc", ()) if x != "body"), None)
            return ApiError(400, f"{param}: not valid Unicode text (a lone surrogate?)", param=param, code="invalid_text").response()
        if not errors:
            return ApiError(422, "invalid request", code="invalid_value").response()
        first = min(errors, key=lambda err: err.get("type") not in EMPTY_CODES)  # emptiness first: a 400
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = loc[0] if loc else None  # the top-level field; deeper parts name union members
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else str(first.get("msg", "invalid request"))
        if first.get("type") in EMPTY_CODES and all(err.get("type") in EMPTY_CODES or _union_noise(err) for err in errors):
            return ApiError(400, f"{param or 'the request'} must not be empty", param=param, code="empty_input").response()
        return ApiError(422, message[:500], param=param, code="invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        message = e.detail if isinstance(e.detail, str) else str(e.detail)
        code = None
        if e.status_code == 404:
            path = request.url.path
            if path in OTHER_TASK_ROUTES[settings.task]:
                other = "rerank" if settings.task == "embedding" else "embedding"
                message, code = (
                    f"this server serves the {settings.task} task, not {other}: {path} is served by {'an' if other == 'embedding' else 'a'} {other} server",
                    "wrong_task",
                )
            else:
                message, code = f"no route {request.method} {path}", "not_found"
        elif e.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        return ApiError(e.status_code, message, code=code, headers=dict(e.headers or {})).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> Response:
        log.exception("error serving %s", request.url.path)
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").response()


def _union_noise(err: Any) -> bool:
    """A union's other members failing (a string given where token ids also fit) is no news."""
    return err.get("type") in ("list_type", "string_type", "int_type", "model_type", "dict_type")
