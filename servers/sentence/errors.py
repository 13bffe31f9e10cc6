"""Errors: one shape for every failure, `{"error": {"message", "type", "param", "code"}}` (OpenAI's).

Each route documents the statuses it can answer with this model, so the OpenAPI document is the
contract that clients and schemathesis check.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response
from pydantic import BaseModel, Field


class ErrorDetail(BaseModel):
    message: str = Field(..., description="What was wrong and what to do.", examples=["input must not be empty"])
    type: str = Field(..., description="invalid_request_error, authentication_error, rate_limit_error or server_error.")
    param: str | None = Field(None, description="The request field at fault, if one is.", examples=["input"])
    code: str | None = Field(None, description="A stable machine-readable code.", examples=["empty_input"])


class ErrorResponse(BaseModel):
    """The body of every error answer."""

    error: ErrorDetail


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> Response:
        return Response(orjson.dumps(self.body()), status_code=self.status, media_type="application/json", headers=self.headers)


class TooLong(ApiError):
    """An input longer than the model reads: 413 with code input_too_long, as TEI answers it.
    The OpenAI routes answer it as OpenAI and vLLM do (`as_context_length_error`)."""

    def __init__(self, message: str, param: str | None, limit: int):
        super().__init__(413, message, param=param, code="input_too_long")
        self.limit = limit

    def as_context_length_error(self) -> ApiError:
        """400 invalid_request_error, code context_length_exceeded: what openai.BadRequestError and
        the truncation and retry logic of LangChain and LlamaIndex expect."""
        return ApiError(
            400,
            f"This model's maximum context length is {self.limit} tokens; {self.message}",
            param=self.param,
            code="context_length_exceeded",
        )


_DESCRIPTIONS = {
    400: "Bad request: invalid JSON, an empty string, token ids of another tokenizer, invalid text; on the OpenAI routes also an "
    "input longer than the model reads (code context_length_exceeded; send truncate: true).",
    401: "Missing or wrong API key (Authorization: Bearer KEY), when the server has one.",
    404: "No such model.",
    405: "Method not allowed; the Allow header lists the allowed ones.",
    413: "The request body is larger than the server accepts, or (TEI, Cohere and Jina routes) an input is longer than the model "
    "reads (code input_too_long; send truncate: true).",
    422: "A field has the wrong type or an out-of-range value.",
    429: "Too many inputs are queued; retry after Retry-After seconds.",
    503: "The model is still loading; retry after Retry-After seconds.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with the error model it really sends."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorResponse, "description": _DESCRIPTIONS[status]}
        if status in (429, 503):
            entry["headers"] = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
        if status == 405:
            entry["headers"] = {"Allow": {"description": "The methods this route allows.", "schema": {"type": "string"}}}
        out[status] = entry
    return out


# what every POST of the model API can answer besides its 200
POST_ERRORS = error_responses(400, 401, 405, 413, 422, 429, 503)
GET_ERRORS = error_responses(401, 405)
