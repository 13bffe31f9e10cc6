"""Text Embeddings Inference: `POST /embed`, `/rerank`, `/predict`, the root route `POST /` (and
SageMaker's `POST /invocations`), and `GET /info` — in TEI's shapes, so TEI clients (and
huggingface_hub's InferenceClient) can point here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool

from servers.sentence import __version__
from servers.sentence.encoder import normalize
from servers.sentence.errors import GET_ERRORS, POST_ERRORS, ApiError, error_responses
from servers.sentence.fields import NonEmptyText, OneRerankShape, PositiveInt, TokenIds
from servers.sentence.routes import cohere
from servers.sentence.routes.common import Context, JSONResponse

Direction = Literal["right", "Right", "left", "Left"]


class EmbedParameters(BaseModel):
    """huggingface_hub's InferenceClient sends its options here ({"inputs", "parameters"})."""

    model_config = ConfigDict(extra="ignore")
    normalize: StrictBool | None = None
    truncate: StrictBool | None = None
    truncation_direction: Direction | None = None
    prompt_name: None = Field(None, description="Not supported: this server has no prompts.")
    dimensions: PositiveInt | None = Field(None)


class EmbedRequest(BaseModel):
    """TEI `POST /embed`: answers a bare list of vectors, `[[float]]`."""

    model_config = ConfigDict(extra="ignore")
    inputs: Union[
        NonEmptyText, Annotated[list[NonEmptyText], Field(min_length=1)], TokenIds, Annotated[list[TokenIds], Field(min_length=1)]
    ] = Field(
        ..., description="A string, a list of strings, or token ids of this model's own tokenizer.", examples=["What is Deep Learning?"]
    )
    normalize: StrictBool = Field(True, description="L2-normalise the vectors.")
    truncate: StrictBool | None = Field(None, description="Truncate over-long inputs (default: the server's setting).")
    truncation_direction: Direction = "right"
    prompt_name: None = Field(None, description="Not supported: this server has no prompts (only null is accepted).")
    dimensions: PositiveInt | None = Field(None, description="Keep the first N dimensions.")
    parameters: EmbedParameters | None = Field(None, description="The same options, as huggingface_hub sends them.")


class TeiRerankRequest(OneRerankShape):
    """TEI `POST /rerank`: answers a bare list `[{index, score, text?}]`, best first."""

    other_key = "documents"
    query: NonEmptyText = Field(..., examples=["What is Deep Learning?"])
    texts: list[NonEmptyText] = Field(..., min_length=1, examples=[["Deep Learning is ..."]])
    truncate: StrictBool | None = None
    truncation_direction: Direction = "right"
    raw_scores: StrictBool = Field(False, description="Scores before the activation (logits).")
    return_text: StrictBool = Field(False, description="Include each text.")


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


class PredictRequest(BaseModel):
    """TEI `POST /predict`: scores of (query, document) pairs with the cross-encoder."""

    model_config = ConfigDict(extra="ignore")
    inputs: Union[
        NonEmptyText,
        Annotated[list[NonEmptyText], Field(min_length=1, max_length=2)],
        Annotated[list[Annotated[list[NonEmptyText], Field(min_length=1, max_length=2)]], Field(min_length=1)],
    ] = Field(
        ..., description="A pair [query, document], or a batch of pairs.", examples=[["What is Deep Learning?", "Deep Learning is ..."]]
    )
    truncate: StrictBool | None = None
    truncation_direction: Direction = "right"
    raw_scores: StrictBool = False


class Prediction(BaseModel):
    score: float
    label: str


class ModelTypeEmbedding(BaseModel):
    pooling: str


class ModelTypeReranker(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class ModelType(BaseModel):
    embedding: ModelTypeEmbedding | None = None
    reranker: ModelTypeReranker | None = None


class Info(BaseModel):
    """TEI `GET /info`."""

    model_id: str
    model_sha: str | None = None
    model_dtype: str
    served_model_name: str
    model_type: ModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None = None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None


class RerankBody(RootModel[Union[TeiRerankRequest, cohere.RerankRequest]]):
    """TEI's shape (`texts`) or Cohere's (`documents`)."""


class RootRerankBody(RootModel[Union[TeiRerankRequest, PredictRequest]]):
    """On a rerank server: TEI rerank (`query`, `texts`) or predict (`inputs`)."""


def _options(req: EmbedRequest) -> EmbedRequest:
    p = req.parameters
    if p is None:
        return req
    changes = {k: v for k, v in p.model_dump().items() if v is not None}
    return req.model_copy(update=changes)


def _right_only(direction: str) -> None:
    if direction.lower() != "right":
        raise ApiError(
            400,
            "truncation_direction left is not supported; truncation keeps the start",
            param="truncation_direction",
            code="not_supported",
        )


def embedding_router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["TEI"])

    async def embed(req: EmbedRequest) -> JSONResponse:
        req = _options(req)
        _right_only(req.truncation_direction)
        engine = ctx.engine
        truncate = ctx.settings.truncate if req.truncate is None else req.truncate
        vectors, tokens, n = await engine.embed_input(req.inputs, truncate, "inputs")
        if req.dimensions is not None:
            vectors = vectors[:, : req.dimensions]
        if req.normalize:
            vectors = normalize(vectors)
        ctx.count(n, tokens)
        return JSONResponse(np.ascontiguousarray(vectors, dtype=np.float32))

    @api.post("/embed", response_model=list[list[float]], responses=POST_ERRORS)
    async def embed_route(req: EmbedRequest) -> JSONResponse:
        """Embeddings as a bare list of vectors."""
        return await embed(req)

    @api.post("/", response_model=list[list[float]], responses=POST_ERRORS)
    @api.post("/invocations", response_model=list[list[float]], responses=POST_ERRORS, include_in_schema=False)
    async def root(req: EmbedRequest) -> JSONResponse:
        """TEI's root route (and SageMaker's /invocations): embed, on an embedding server."""
        return await embed(req)

    api.add_api_route("/info", info_route(ctx), methods=["GET"], response_model=Info, responses={**GET_ERRORS, **error_responses(503)})
    return api


async def tei_rerank(ctx: Context, req: TeiRerankRequest) -> JSONResponse:
    """TEI's rerank: a bare list of {index, score, text?}, best first."""
    _right_only(req.truncation_direction)
    truncate = ctx.settings.truncate if req.truncate is None else req.truncate
    scores = await cohere._score(ctx, req.query, list(req.texts), truncate)
    values = scores.raw if req.raw_scores else scores.scores
    out = [{"index": i, "score": float(values[i]), **({"text": req.texts[i]} if req.return_text else {})} for i in scores.order()]
    return JSONResponse(out)


def predict_pairs(req: PredictRequest) -> tuple[list[tuple[str, str]], bool]:
    """The (query, document) pairs of a predict request, and whether it sent a single one."""
    single = isinstance(req.inputs, str) or isinstance(req.inputs[0], str)
    batch = [req.inputs] if single else req.inputs
    pairs = []
    for i, item in enumerate(batch):
        seq = [item] if isinstance(item, str) else item
        if len(seq) != 2:
            raise ApiError(
                400,
                f"inputs[{i}]: a cross-encoder scores a (query, document) pair: send [query, document]",
                param="inputs",
                code="invalid_input",
            )
        pairs.append((str(seq[0]), str(seq[1])))
    return pairs, single


async def predict(ctx: Context, req: PredictRequest) -> JSONResponse:
    """TEI's predict: cross-encoder scores of pairs, as classifier-style predictions."""
    _right_only(req.truncation_direction)
    pairs, single = predict_pairs(req)
    ctx.engine.check_count(len(pairs), "inputs")
    for q, d in pairs:
        ctx.engine.check_texts([q, d], "inputs")
    truncate = ctx.settings.truncate if req.truncate is None else req.truncate
    scores = await ctx.engine.predict_pairs(pairs, truncate)
    ctx.count(len(pairs), scores.tokens)
    values = scores.raw if req.raw_scores else scores.scores
    predictions = [[{"score": float(v), "label": "LABEL_0"}] for v in values]
    return JSONResponse(predictions[0] if single else predictions)


def rerank_router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["TEI"])

    @api.post("/rerank", response_model=Union[list[Rank], cohere.RerankResponse], responses=POST_ERRORS)
    async def rerank(body: RerankBody) -> JSONResponse:
        """TEI's shape (`texts`) answers a bare list; Cohere's (`documents`) answers `{results}`."""
        req = body.root
        if isinstance(req, TeiRerankRequest):
            return await tei_rerank(ctx, req)
        return await cohere.rerank_v1(ctx, req)

    @api.post("/predict", response_model=Union[list[Prediction], list[list[Prediction]]], responses=POST_ERRORS)
    async def predict_route(req: PredictRequest) -> JSONResponse:
        """Cross-encoder scores of one (query, document) pair or a batch of them."""
        return await predict(ctx, req)

    @api.post("/", response_model=Union[list[Rank], list[Prediction], list[list[Prediction]]], responses=POST_ERRORS)
    @api.post(
        "/invocations",
        response_model=Union[list[Rank], list[Prediction], list[list[Prediction]]],
        responses=POST_ERRORS,
        include_in_schema=False,
    )
    async def root(body: RootRerankBody) -> JSONResponse:
        """TEI's root route (and SageMaker's /invocations) on a rerank server: rerank or predict."""
        req = body.root
        if isinstance(req, TeiRerankRequest):
            return await tei_rerank(ctx, req)
        return await predict(ctx, req)

    api.add_api_route("/info", info_route(ctx), methods=["GET"], response_model=Info, responses={**GET_ERRORS, **error_responses(503)})
    return api


def info_route(ctx: Context) -> Any:
    async def info() -> JSONResponse:
        """The model and the server's limits, in TEI's shape."""
        model, _ = ctx.engine.ready_model()
        facts = model.describe()
        s = ctx.settings
        if model.task == "embedding":
            model_type: dict[str, Any] = {"embedding": {"pooling": facts.get("pooling", "mean")}}
        else:
            model_type = {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
        return JSONResponse(
            {
                "model_id": s.model_path,
                "model_sha": None,
                "model_dtype": facts.get("dtype", "float32"),
                "served_model_name": s.model_name,
                "model_type": model_type,
                "max_concurrent_requests": s.max_queue,
                "max_input_length": model.max_length,
                "max_batch_tokens": s.max_batch_tokens,
                "max_batch_requests": s.max_batch_size,
                "max_client_batch_size": s.max_inputs,
                "auto_truncate": s.truncate,
                "tokenization_workers": ctx.engine.workers,
                "version": __version__,
                "sha": None,
                "docker_label": None,
            }
        )

    return info
