"""OpenAI: `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`.

The openai SDK asks for base64 by default; langchain-openai sends token ids unless it is told
`check_embedding_ctx_length=False` — ids of OpenAI's tokenizer are refused (400), not embedded.
"""

from __future__ import annotations

import base64
import logging
from typing import Annotated, Any, Literal, Union

import numpy as np
import orjson
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from servers.sentence.encoder import normalize
from servers.sentence.errors import GET_ERRORS, POST_ERRORS, ApiError, TooLong, error_responses
from servers.sentence.fields import Dimensions, NonEmptyText, TokenIds
from servers.sentence.routes.common import Context, JSONResponse

log = logging.getLogger("servers.sentence")


class EmbeddingRequest(BaseModel):
    """OpenAI `POST /v1/embeddings`."""

    model_config = ConfigDict(extra="ignore")

    input: Union[
        NonEmptyText,
        Annotated[list[NonEmptyText], Field(min_length=1)],
        TokenIds,
        Annotated[list[TokenIds], Field(min_length=1)],
    ] = Field(
        ...,
        description="A string, a list of strings, or token ids of this model's own tokenizer (framed by its special tokens).",
        examples=["hello world"],
    )
    model: str | None = Field(None, description="Ignored beyond a check: this server serves one model.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: little-endian float32 bytes, base64-encoded (the openai SDK's default)."
    )
    dimensions: Dimensions | None = Field(None, description="Keep the first N dimensions, then re-normalise.")
    user: str | None = Field(None, description="Accepted and ignored.")
    truncate: StrictBool | None = Field(None, description="Extension: truncate over-long inputs instead of answering 400.")


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(..., description="Floats, or a base64 string of little-endian float32.")


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modelctl"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def models_router(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["OpenAI"])

    def card() -> ModelCard:
        return ModelCard(id=ctx.settings.model_name, created=int(ctx.engine.started))

    @router.get("/v1/models", response_model=ModelList, responses=GET_ERRORS)
    async def models() -> ModelList:
        """The one model this server serves."""
        return ModelList(data=[card()])

    @router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={**GET_ERRORS, **error_responses(404)})
    async def model(model_id: str) -> ModelCard:
        """The served model by its name (openai's `models.retrieve`)."""
        if model_id != ctx.settings.model_name:
            raise ApiError(
                404, f"no model {model_id!r}; this server serves {ctx.settings.model_name!r}", param="model", code="model_not_found"
            )
        return card()

    return router


def embeddings_router(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["OpenAI"])

    @router.post("/v1/embeddings", response_model=EmbeddingResponse, responses=POST_ERRORS)
    @router.post("/embeddings", response_model=EmbeddingResponse, responses=POST_ERRORS, include_in_schema=False)
    async def embeddings(req: EmbeddingRequest) -> JSONResponse:
        """Embeddings of strings or token ids; float or base64; optionally fewer dimensions."""
        return JSONResponse(await answer(ctx, req.input, req.encoding_format, req.dimensions, req.truncate))

    return router


async def answer(ctx: Context, inputs: Any, encoding_format: str, dimensions: int | None, truncate: bool | None) -> dict[str, Any]:
    """The embeddings answer, from a request already validated (by pydantic, or by `plain_request`)."""
    engine = ctx.engine
    model = engine.model_for("embedding")
    engine.check_dimensions(model, dimensions)
    try:
        vectors, tokens, n = await engine.embed_input(inputs, ctx.settings.truncate if truncate is None else truncate, "input")
    except TooLong as e:  # OpenAI's and vLLM's status for it; TEI's routes keep 413
        raise e.as_context_length_error() from None
    vectors = normalize(vectors)
    if dimensions is not None:
        vectors = normalize(vectors[:, :dimensions])
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ctx.count(n, tokens)
    if encoding_format == "base64":
        data = [
            {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
            for i, v in enumerate(vectors)
        ]
    else:
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": ctx.settings.model_name, "usage": usage}


_PLAIN_KEYS = frozenset(("input", "model", "encoding_format", "user", "dimensions", "truncate"))


def plain_request(body: bytes, max_inputs: int) -> dict[str, Any] | None:
    """The common request (text, or a list of texts, with the usual options), validated without
    pydantic: exactly what EmbeddingRequest accepts of that shape, or None for anything else,
    which then takes the full path (and its exact error messages)."""
    try:
        req = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if type(req) is not dict or not _PLAIN_KEYS.issuperset(req):
        return None
    texts = req.get("input")
    if type(texts) is str:
        if not texts:
            return None
    elif type(texts) is list:
        if not 0 < len(texts) <= max_inputs or not all(type(t) is str and t for t in texts):
            return None
    else:
        return None
    fmt = req.get("encoding_format", "float")
    dims = req.get("dimensions")
    if fmt not in ("float", "base64") or (dims is not None and (type(dims) is not int or dims <= 0)):
        return None
    if any(req.get(k) is not None and type(req[k]) is not str for k in ("model", "user")):
        return None
    if req.get("truncate") is not None and type(req["truncate"]) is not bool:
        return None
    return req


class PlainEmbeddings:
    """ASGI: `POST /v1/embeddings` with a plain request is answered here, past FastAPI's routing,
    dependency and validation layers (most of a one-sentence request's CPU on the event loop:
    measured in bench/sentence_throughput.py); every other request goes on to the app. Inside
    the guard (key, body limit, disconnects) and the metrics, like every route."""

    PATHS = ("/v1/embeddings", "/embeddings")

    def __init__(self, app: Any, ctx: Context):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.PATHS:
            return await self.app(scope, receive, send)
        message = await receive()  # the guard has read the whole body: one message
        body = message.get("body", b"")
        req = plain_request(body, self.ctx.settings.max_inputs) if not message.get("more_body") else None
        if req is None:
            replayed = False

            async def replay() -> dict[str, Any]:
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return message
                return await receive()

            return await self.app(scope, replay, send)
        try:
            out = await answer(self.ctx, req["input"], req.get("encoding_format", "float"), req.get("dimensions"), req.get("truncate"))
            status, payload, headers = 200, orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY), {}
        except ApiError as e:
            status, payload, headers = e.status, orjson.dumps(e.body()), e.headers or {}
        except Exception as e:  # as the app's own handler answers it
            log.exception("error serving %s", scope["path"])
            err = ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            status, payload, headers = 500, orjson.dumps(err.body()), {}
        head = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        head += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": payload})
