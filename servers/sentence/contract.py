"""The OpenAPI document says exactly what the server accepts, including what depends on the model.

The `dimensions` a client may ask for are at most the model's. Token ids are accepted only as the loaded model's own tokenization (unless --allow-token-ids):
the first id is the model's opening special token, the closing one is among them, and every id is
inside its vocabulary. JSON Schema says so with `prefixItems`, `contains` and `maximum`, so a
client (or schemathesis) that follows the document is never refused. Until the model is loaded
the document carries the model-free constraints only, and it is not cached.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from servers.sentence.encoder import Encoder

MARK = "x-token-ids"
DIMENSIONS = "x-dimensions"


def with_model_facts(schema: dict[str, Any], model: Encoder | None, allow_any_ids: bool) -> dict[str, Any]:
    """The schema with every token-id list bound to what this model accepts."""

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.pop(MARK, False) and model is not None:
                bind(node)
            if node.pop(DIMENSIONS, False) and model is not None and model.dimensions is not None:
                node["maximum"] = model.dimensions
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    def bind(ids: dict[str, Any]) -> None:
        assert model is not None
        items = ids.setdefault("items", {})
        items["maximum"] = model.vocab_size - 1
        if allow_any_ids:
            return
        if model.first_id is not None:
            ids["prefixItems"] = [{"type": "integer", "const": model.first_id}]
        if model.last_id is not None:
            ids["contains"] = {"type": "integer", "const": model.last_id}
        ids["minItems"] = max(ids.get("minItems", 1), (model.first_id is not None) + (model.last_id is not None))
        ids["description"] = (
            f"Token ids of this model's own tokenizer: starting with {model.first_id} and holding {model.last_id} "
            "(start the server with --allow-token-ids to embed any ids)"
        )

    visit(schema)
    return schema


def openapi_with_model(
    build: Callable[[], dict[str, Any]], model: Callable[[], Encoder | None], allow_any_ids: bool
) -> Callable[[], dict[str, Any]]:
    """FastAPI's `openapi` builder, made to bind token ids once the model is there."""
    cached: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "schema" in cached:
            return cached["schema"]
        loaded = model()
        schema = with_model_facts(build(), loaded, allow_any_ids)
        if loaded is not None:
            cached["schema"] = schema
        return schema

    return openapi
