"""OpenAI: `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`.

The openai SDK asks for base64 by default; langchain-openai sends token ids unless it is told
`check_embedding_ctx_length=False` — ids of OpenAI's tokenizer are refused (400), not embedded.
"""

from __future__ import annotations

import base64
from typing import Annotated, Literal, Union

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from servers.sentence.encoder import normalize
from servers.sentence.errors import GET_ERRORS, POST_ERRORS, ApiError, error_responses
from servers.sentence.fields import Dimensions, NonEmptyText, TokenIds
from servers.sentence.routes.common import Context, JSONResponse


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
        engine = ctx.engine
        model = engine.model_for("embedding")
        truncate = ctx.settings.truncate if req.truncate is None else req.truncate
        engine.check_dimensions(model, req.dimensions)
        vectors, tokens, n = await engine.embed_input(req.input, truncate, "input")
        vectors = normalize(vectors)
        if req.dimensions is not None:
            vectors = normalize(vectors[:, : req.dimensions])
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ctx.count(n, tokens)
        if req.encoding_format == "base64":
            data = [
                {"object": "embedding", "index": i, "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode()}
                for i, v in enumerate(vectors)
            ]
        else:
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"object": "list", "data": data, "model": ctx.settings.model_name, "usage": usage})

    return router
