"""Errors as clients expect them: OpenAI's `{"error": {message, type, param, code}}`, and Ollama's
`{"error": "..."}` on Ollama's routes. Every error names what it is about (the model, the server)."""

from __future__ import annotations

import json

from aiohttp import web

# OpenAI's error types for a status
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    408: "timeout",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    502: "server_error",
    503: "server_error",
    504: "timeout",
}


class GatewayError(Exception):
    """An answer the gateway gives itself, instead of the server's."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self, ollama: bool = False) -> dict[str, object]:
        if ollama:
            return {"error": self.message}
        error = {"message": self.message, "type": TYPES.get(self.status, "server_error"), "param": self.param, "code": self.code}
        return {"error": error}

    def response(self, ollama: bool = False) -> web.Response:
        return web.Response(
            status=self.status, body=json.dumps(self.body(ollama)).encode(), content_type="application/json", headers=self.headers
        )

    def sse_event(self) -> bytes:
        """The error as one event of a stream whose 200 was already sent (a wake kept it open)."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def listing(names: list[str], limit: int = 40) -> str:
    """Names for a message, cut short."""
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"
