"""What every bundled server answers: `GET /health` (open, also with an API key) and `GET /metrics`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import orjson
from fastapi import APIRouter
from fastapi.responses import JSONResponse as FastAPIJSONResponse
from fastapi.responses import Response
from pydantic import BaseModel, Field

from servers.sentence.errors import error_responses
from servers.sentence.metrics import Metrics
from servers.sentence.service import Engine
from servers.sentence.settings import ServerSettings


class JSONResponse(FastAPIJSONResponse):
    """JSON through orjson: float32 vectors serialise an order of magnitude faster than with json.

    A JSONResponse to FastAPI, so that the routes' response models are documented.
    """

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


@dataclass
class Context:
    """What the routers share: the settings, the engine, the metrics."""

    settings: ServerSettings
    engine: Engine
    metrics: Metrics

    def count(self, inputs: int, tokens: int) -> None:
        self.metrics.count(inputs, tokens)


class HealthResponse(BaseModel):
    """Whether the model is loaded (200) or still loading (503), and what the server runs."""

    status: Literal["ok", "loading", "error"]
    model: str = Field(..., description="The served model name.")
    task: Literal["embedding", "rerank"]
    device: str
    queue_depth: int = Field(..., description="Inputs waiting for or in the model.")
    backend: str | None = Field(None, description="What runs the network: torch, onnx, onnx-int8 or openvino.")
    backend_reason: str | None = Field(None, description="Why that backend: asked for, or what backend auto found.")
    dtype: str | None = Field(None, description="The weights' type as run: float32, float16 (torch on CUDA) or int8.")
    max_input_tokens: int | None = None
    dimensions: int | None = None
    cross_encoder: bool | None = None
    model_workers: int | None = None
    batches: int | None = Field(None, description="Model batches run so far.")
    mean_batch_inputs: float | None = Field(None, description="Mean inputs per model batch.")
    error: str | None = None


def common_router(ctx: Context) -> APIRouter:
    router = APIRouter(tags=["Server"])

    @router.get(
        "/health", response_model=HealthResponse, responses={503: {"model": HealthResponse, "description": "The model is loading."}}
    )
    async def health() -> JSONResponse:
        """200 once the model is loaded and warmed up; 503 before. Open even when an API key is set."""
        engine = ctx.engine
        body: dict[str, Any] = {
            "status": "ok" if engine.ready else ("error" if engine.error else "loading"),
            "model": ctx.settings.model_name,
            "task": ctx.settings.task,
            "device": ctx.settings.device,
            "queue_depth": engine.queue_depth,
        }
        if engine.batcher is not None and engine.batcher.batches:
            body["batches"] = engine.batcher.batches
            body["mean_batch_inputs"] = round(engine.batcher.batched_inputs / engine.batcher.batches, 2)
        if engine.model is not None:
            body["max_input_tokens"] = engine.model.max_length
            body["dimensions"] = engine.model.dimensions
            body["cross_encoder"] = engine.model.cross_encoder
            body["model_workers"] = engine.workers
            described = engine.model.describe()
            body["backend"] = described.get("backend")
            body["dtype"] = described.get("dtype")
            if described.get("backend_reason"):
                body["backend_reason"] = described["backend_reason"]
        if engine.error:
            body["error"] = engine.error
        return JSONResponse(body, 200 if engine.ready else 503)

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text exposition."},
            **error_responses(401),
        },
    )
    async def metrics() -> Response:
        """Prometheus metrics: requests, latency, inputs, tokens, batch sizes, queue depth."""
        return Response(ctx.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return router
