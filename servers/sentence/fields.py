"""Field types the request models share, exact where JSON Schema is exact.

JSON Schema counts 12.0 as an integer and "12" as not one; booleans are only true and false.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field, StrictStr


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
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
NonEmptyText = Annotated[StrictStr, Field(min_length=1)]
