"""Text Embeddings Inference: `POST /embed`, `/rerank`, `/predict`, the root route `POST /` (and
SageMaker's `POST /invocations`), and `GET /info` — in TEI's shapes, so TEI clients (and
huggingface_hub's InferenceClient) can point here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, RootModel, StrictBool, StrictStr

from servers.sentence import __version__
from servers.sentence.encoder import Direction, normalize
from servers.sentence.errors import GET_ERRORS, POST_ERRORS, error_responses
from servers.sentence.fields import Dimensions, NonEmptyText, OneRerankShape, TokenIds
from servers.sentence.routes import cohere
from servers.sentence.routes.common import Context, JSONResponse

TeiDirection = Literal["right", "Right", "left", "Left"]


class EmbedParameters(BaseModel):
    """huggingface_hub's InferenceClient sends its options here ({"inputs", "parameters"})."""

    model_config = ConfigDict(extra="ignore")
    normalize: StrictBool | None = None
    truncate: StrictBool | None = None
    truncation_direction: TeiDirection | None = None
    prompt_name: None = Field(None, description="Not supported: this server has no prompts.")
    dimensions: Dimensions | None = Field(None)


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
    truncation_direction: TeiDirection = "right"
    prompt_name: None = Field(None, description="Not supported: this server has no prompts (only null is accepted).")
    dimensions: Dimensions | None = Field(None, description="Keep the first N dimensions.")
    parameters: EmbedParameters | None = Field(None, description="The same options, as huggingface_hub sends them.")


class SimilarityInputs(BaseModel):
    source_sentence: NonEmptyText
    sentences: list[NonEmptyText] = Field(..., min_length=1)


class SimilarityRequest(BaseModel):
    """TEI `POST /similarity`: answers a bare list of cosine similarities, one per sentence."""

    model_config = ConfigDict(extra="ignore")
    inputs: SimilarityInputs = Field(..., examples=[{"source_sentence": "That is a happy person", "sentences": ["That is a happy dog"]}])
    parameters: dict[str, Any] | None = Field(None, description="Accepted and ignored.")


class TeiRerankRequest(OneRerankShape):
    """TEI `POST /rerank`: answers a bare list `[{index, score, text?}]`, best first."""

    other_key = "documents"
    query: NonEmptyText = Field(..., examples=["What is Deep Learning?"])
    texts: list[StrictStr] = Field(
        ..., min_length=1, description="Texts to rank; an empty one is scored like any other.", examples=[["Deep Learning is ..."]]
    )
    truncate: StrictBool | None = None
    truncation_direction: TeiDirection = "right"
    raw_scores: StrictBool = Field(False, description="Scores before the activation (logits).")
    return_text: StrictBool = Field(False, description="Include each text.")


class Rank(BaseModel):
    index: int
    score: float
    text: str | None = None


Pair = Annotated[list[NonEmptyText], Field(min_length=2, max_length=2)]


class PredictRequest(BaseModel):
    """TEI `POST /predict`: scores of (query, document) pairs with the cross-encoder."""

    model_config = ConfigDict(extra="ignore")
    # a cross-encoder scores pairs; TEI's single texts are for classifiers, which this server does not serve
    inputs: Union[Pair, Annotated[list[Pair], Field(min_length=1)]] = Field(
        ..., description="A pair [query, document], or a batch of pairs.", examples=[["What is Deep Learning?", "Deep Learning is ..."]]
    )
    truncate: StrictBool | None = None
    truncation_direction: TeiDirection = "right"
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


class RootEmbedBody(RootModel[Union[EmbedRequest, SimilarityRequest]]):
    """On an embedding server: embed (`inputs`: texts or ids) or similarity (`inputs`: an object)."""


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


def side(direction: str) -> Direction:
    """TEI's truncation_direction: Right cuts the end of an over-long input, Left its start."""
    return "left" if direction.lower() == "left" else "right"


def embedding_router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["TEI"])

    async def embed(req: EmbedRequest) -> JSONResponse:
        req = _options(req)
        engine = ctx.engine
        truncate = ctx.settings.truncate if req.truncate is None else req.truncate
        engine.check_dimensions(engine.model_for("embedding"), req.dimensions)
        vectors, tokens, n = await engine.embed_input(req.inputs, truncate, "inputs", side(req.truncation_direction))
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

    @api.post("/", response_model=Union[list[list[float]], list[float]], responses=POST_ERRORS)
    @api.post("/invocations", response_model=Union[list[list[float]], list[float]], responses=POST_ERRORS, include_in_schema=False)
    async def root(body: RootEmbedBody) -> JSONResponse:
        """TEI's root route (and SageMaker's /invocations) on an embedding server: embed, or with
        `inputs: {source_sentence, sentences}` sentence similarity (huggingface_hub posts both here)."""
        req = body.root
        return await (similarity(req) if isinstance(req, SimilarityRequest) else embed(req))

    @api.post("/similarity", response_model=list[float], responses=POST_ERRORS)
    async def similarity_route(req: SimilarityRequest) -> JSONResponse:
        """TEI's sentence similarity: the cosine of each sentence to the source sentence."""
        return await similarity(req)

    async def similarity(req: SimilarityRequest) -> JSONResponse:
        texts = [req.inputs.source_sentence, *req.inputs.sentences]
        vectors, tokens, n = await ctx.engine.embed_input(texts, ctx.settings.truncate, "inputs")
        vectors = normalize(vectors)
        ctx.count(n, tokens)
        return JSONResponse([float(x) for x in vectors[1:] @ vectors[0]])

    api.add_api_route("/info", info_route(ctx), methods=["GET"], response_model=Info, responses={**GET_ERRORS, **error_responses(503)})
    return api


async def tei_rerank(ctx: Context, req: TeiRerankRequest) -> JSONResponse:
    """TEI's rerank: a bare list of {index, score, text?}, best first."""
    truncate = ctx.settings.truncate if req.truncate is None else req.truncate
    scores = await cohere._score(ctx, req.query, list(req.texts), truncate, direction=side(req.truncation_direction))
    values = scores.raw if req.raw_scores else scores.scores
    out = [{"index": i, "score": float(values[i]), **({"text": req.texts[i]} if req.return_text else {})} for i in scores.order()]
    return JSONResponse(out)


def predict_pairs(req: PredictRequest) -> tuple[list[tuple[str, str]], bool]:
    """The (query, document) pairs of a predict request, and whether it sent a single one."""
    single = isinstance(req.inputs[0], str)
    batch = [req.inputs] if single else req.inputs
    return [(str(pair[0]), str(pair[1])) for pair in batch], single


async def predict(ctx: Context, req: PredictRequest) -> JSONResponse:
    """TEI's predict: cross-encoder scores of pairs, as classifier-style predictions."""
    pairs, single = predict_pairs(req)
    ctx.engine.check_count(len(pairs), "inputs")
    for q, d in pairs:
        ctx.engine.check_texts([q, d], "inputs")
    truncate = ctx.settings.truncate if req.truncate is None else req.truncate
    scores = await ctx.engine.predict_pairs(pairs, truncate, side(req.truncation_direction))
    ctx.count(len(pairs), scores.tokens)
    values = scores.raw if req.raw_scores else scores.scores
    predictions = [[{"score": float(v), "label": "LABEL_0"}] for v in values]
    return JSONResponse(predictions[0] if single else predictions)


def rerank_router(ctx: Context, cross_encoder: bool | None) -> APIRouter:
    """TEI's rerank routes; `/predict` (and predict through `POST /`) only where the model is a
    cross-encoder (None: not known before it loads): a bi-encoder reranks by cosine, it has no pair scores."""
    api = APIRouter(tags=["TEI"])

    @api.post("/rerank", response_model=Union[list[Rank], cohere.InfinityRerankResponse], responses=POST_ERRORS)
    async def rerank(body: RerankBody) -> JSONResponse:
        """TEI's shape (`texts`) answers a bare list; with `documents` it answers as Infinity does
        (`results`, each `document` a string), for Infinity's clients (litellm's infinity/ provider).
        Cohere and Jina clients call `POST /v1/rerank`."""
        req = body.root
        if isinstance(req, TeiRerankRequest):
            return await tei_rerank(ctx, req)
        return await cohere.rerank_infinity(ctx, req)

    if cross_encoder is False:

        @api.post("/", response_model=list[Rank], responses=POST_ERRORS)
        @api.post("/invocations", response_model=list[Rank], responses=POST_ERRORS, include_in_schema=False)
        async def root_rerank(req: TeiRerankRequest) -> JSONResponse:
            """TEI's root route (and SageMaker's /invocations) on a rerank server: rerank."""
            return await tei_rerank(ctx, req)

    else:

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
