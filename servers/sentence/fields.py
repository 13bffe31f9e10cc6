"""Field types the request models share, exact where JSON Schema is exact.

JSON Schema counts 12.0 as an integer and "12" as not one; booleans are only true and false.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictStr, model_validator


def _json_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("must be an integer")
        return int(value)
    return value


# the constraint comes before the validator, or pydantic cannot write it as JSON Schema
JsonInt = Annotated[int, BeforeValidator(_json_int)]
PositiveInt = Annotated[int, Field(gt=0), BeforeValidator(_json_int)]
TokenId = Annotated[int, Field(ge=0), BeforeValidator(_json_int)]
# marked for the OpenAPI document, which says once the model is loaded which ids it takes
# (servers/sentence/contract.py): its own tokenization, framed by its special tokens
TokenIds = Annotated[list[TokenId], Field(min_length=1, json_schema_extra={"x-token-ids": True})]
NonEmptyText = Annotated[StrictStr, Field(min_length=1)]
# marked too: once the model is loaded, the document says how many dimensions it has
Dimensions = Annotated[int, Field(gt=0, json_schema_extra={"x-dimensions": True}), BeforeValidator(_json_int)]


def _refuses_the_other_key(schema: dict[str, Any], cls: type) -> None:
    schema["not"] = {"required": [cls.other_key]}  # type: ignore[attr-defined]


class OneRerankShape(BaseModel):
    """A rerank request in one family's shape: Cohere/Jina carry `documents`, TEI carries `texts`
    (both may come to `POST /rerank`). A body with the other family's key is refused, and the
    schema says so."""

    other_key: ClassVar[str]
    model_config = ConfigDict(extra="ignore", json_schema_extra=_refuses_the_other_key)

    @model_validator(mode="before")
    @classmethod
    def _one_shape(cls, data: Any) -> Any:
        if isinstance(data, dict) and cls.other_key in data:
            raise ValueError("give documents (Cohere/Jina) or texts (TEI), not both")
        return data
