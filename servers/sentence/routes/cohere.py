"""Cohere rerank: v1 (`POST /v1/rerank`, also Jina's shape) and v2 (`POST /v2/rerank`).

Scores come from a cross-encoder (as CrossEncoder.predict gives them) or, for a bi-encoder
model, cosine similarity. Results are sorted best first.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from servers.sentence.encoder import Direction
from servers.sentence.errors import POST_ERRORS
from servers.sentence.fields import JsonInt, NonEmptyText, OneRerankShape, PositiveInt
from servers.sentence.routes.common import Context, JSONResponse
from servers.sentence.service import Scores, documents_text


class RerankDocument(BaseModel):
    """A document as an object: its `text` is ranked (other fields via rank_fields; an object
    without text is ranked as all its fields, `key: value` lines)."""

    model_config = ConfigDict(extra="allow")
    text: StrictStr | None = Field(None, description="The document's text.")


Document = Union[StrictStr, RerankDocument]  # an empty document (a RAG pipeline's empty chunk) is scored like any other


class _CohereShape(OneRerankShape):
    other_key = "texts"


class RerankRequest(_CohereShape):
    """Cohere v1 and Jina `POST /v1/rerank` (and `POST /rerank` with `documents`)."""

    query: NonEmptyText = Field(..., description="The query the documents are ranked against.", examples=["What is the capital of France?"])
    documents: list[Document] = Field(..., min_length=1, description="Strings or objects with `text`.")
    model: str | None = Field(None, description="Ignored beyond a check: this server serves one model.")
    top_n: PositiveInt | None = Field(None, description="Return only the best N.")
    return_documents: StrictBool = Field(True, description="Include each document in the results.")
    rank_fields: list[str] | None = Field(None, description="Fields of object documents to rank (default: text).")
    max_chunks_per_doc: PositiveInt | None = Field(None, description="Accepted for compatibility; documents are not chunked.")
    truncate: StrictBool | None = Field(None, description="Extension: truncate over-long documents instead of answering 400.")


class ResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(..., description="The document's position in the request.")
    relevance_score: float
    document: ResultDocument | None = Field(None, description="With return_documents.")


class RerankUsage(BaseModel):
    total_tokens: int


class BilledUnits(BaseModel):
    search_units: int


class RerankMeta(BaseModel):
    billed_units: BilledUnits


class RerankResponse(BaseModel):
    """Cohere v1's answer, with Jina's `usage`."""

    id: str
    model: str
    results: list[RerankResult] = Field(..., description="Best first.")
    usage: RerankUsage
    meta: RerankMeta


class V2RerankRequest(_CohereShape):
    """Cohere v2 `POST /v2/rerank` (cohere.ClientV2 and litellm's cohere/ provider)."""

    model: str | None = Field(None, description="Ignored beyond a check: this server serves one model.")
    query: NonEmptyText
    documents: list[Document] = Field(..., min_length=1, description="Strings (objects with `text` are accepted too).")
    top_n: PositiveInt | None = Field(None)
    max_tokens_per_doc: PositiveInt | None = Field(
        None, description="Documents are truncated to this many tokens (Cohere's default: 4096)."
    )
    return_documents: StrictBool = Field(False, description="Include each document in the results (litellm asks for it).")
    rank_fields: list[str] | None = None
    relevant_spans: Any = Field(None, description="Accepted; no spans are returned.")
    priority: JsonInt | None = Field(None, description="Accepted and ignored.")


class V2RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: ResultDocument | None = None


class V2Meta(BaseModel):
    api_version: dict[str, str] = {"version": "2"}
    billed_units: BilledUnits


class V2RerankResponse(BaseModel):
    id: str
    results: list[V2RerankResult] = Field(..., description="Best first.")
    meta: V2Meta


class InfinityRerankResult(BaseModel):
    index: int
    relevance_score: float
    document: str | None = Field(None, description="The document's text, with return_documents.")


class InfinityRerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class InfinityRerankResponse(BaseModel):
    """Infinity's answer on `POST /rerank` (litellm's infinity/ provider reads it)."""

    object: Literal["rerank"] = "rerank"
    id: str
    created: int
    model: str
    results: list[InfinityRerankResult] = Field(..., description="Best first.")
    usage: InfinityRerankUsage


async def rerank_infinity(ctx: Context, req: RerankRequest) -> JSONResponse:
    docs = documents_text(req.documents, req.rank_fields)
    scores = await _score(ctx, req.query, docs, ctx.settings.truncate if req.truncate is None else req.truncate)
    order = scores.order()[: req.top_n] if req.top_n else scores.order()
    results = [
        {"index": i, "relevance_score": float(scores.scores[i]), "document": docs[i] if req.return_documents else None} for i in order
    ]
    usage = {"prompt_tokens": scores.tokens, "total_tokens": scores.tokens}
    body = {"object": "rerank", "id": str(uuid.uuid4()), "created": int(time.time()), "model": ctx.settings.model_name, "results": results}
    return JSONResponse({**body, "usage": usage})


async def rerank_v1(ctx: Context, req: RerankRequest) -> JSONResponse:
    docs = documents_text(req.documents, req.rank_fields)
    scores = await _score(ctx, req.query, docs, ctx.settings.truncate if req.truncate is None else req.truncate)
    order = scores.order()[: req.top_n] if req.top_n else scores.order()
    results = [
        {"index": i, "relevance_score": float(scores.scores[i]), **({"document": {"text": docs[i]}} if req.return_documents else {})}
        for i in order
    ]
    return JSONResponse(
        {
            "id": str(uuid.uuid4()),
            "model": ctx.settings.model_name,
            "results": results,
            "usage": {"total_tokens": scores.tokens},
            "meta": {"billed_units": {"search_units": 1}},
        }
    )


async def _score(
    ctx: Context, query: str, docs: list[str], truncate: bool, max_length: int | None = None, direction: Direction = "right"
) -> Scores:
    ctx.engine.check_texts([query], "query")
    ctx.engine.check_documents(docs, "documents")  # an empty document is scored like any other
    scores = await ctx.engine.score(query, docs, truncate, max_length, direction=direction)
    ctx.count(len(docs), scores.tokens)
    return scores


def router(ctx: Context) -> APIRouter:
    api = APIRouter(tags=["Cohere / Jina"])

    @api.post("/v1/rerank", response_model=RerankResponse, responses=POST_ERRORS)
    async def v1_rerank(req: RerankRequest) -> JSONResponse:
        """Cohere v1 / Jina rerank: results sorted by relevance_score."""
        return await rerank_v1(ctx, req)

    @api.post("/v2/rerank", response_model=V2RerankResponse, responses=POST_ERRORS)
    async def v2_rerank(req: V2RerankRequest) -> JSONResponse:
        """Cohere v2 rerank. Like Cohere, long documents are truncated (to max_tokens_per_doc or the model's limit)."""
        docs = documents_text(req.documents, req.rank_fields)
        scores = await _score(ctx, req.query, docs, True, req.max_tokens_per_doc)
        order = scores.order()[: req.top_n] if req.top_n else scores.order()
        results = [
            {"index": i, "relevance_score": float(scores.scores[i]), **({"document": {"text": docs[i]}} if req.return_documents else {})}
            for i in order
        ]
        meta: dict[str, Any] = {"api_version": {"version": "2"}, "billed_units": {"search_units": 1}}
        return JSONResponse({"id": str(uuid.uuid4()), "results": results, "meta": meta})

    return api
