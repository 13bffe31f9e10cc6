"""Request and response shapes. These models are the API documentation (see /docs)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbeddingRequest(_Request):
    """OpenAI `POST /v1/embeddings`."""

    input: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="A string, a list of strings, or token ids of this model's tokenizer.", examples=["hello world"]
    )
    model: Optional[str] = Field(None, description="Ignored beyond a check: this server serves one model.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: little-endian float32 bytes, base64-encoded (the openai client's default)."
    )
    dimensions: Optional[int] = Field(None, gt=0, description="Keep the first N dimensions, then re-normalise.")
    user: Optional[str] = None
    truncate: Optional[bool] = Field(None, description="Extension: truncate over-long inputs instead of 422.")


class TeiEmbedRequest(_Request):
    """Text Embeddings Inference `POST /embed`; answers a bare `[[float]]`."""

    inputs: Union[str, list[str]]
    normalize: bool = True
    truncate: bool = False


class RerankDocument(_Request):
    text: str


class RerankRequest(_Request):
    """Cohere / Jina `POST /v1/rerank` and `POST /rerank`; TEI's shape (`texts`) on `/rerank` too."""

    query: str = Field(..., description="The query the documents are ranked against.")
    documents: Optional[list[Union[str, RerankDocument]]] = Field(None, description="Cohere/Jina: strings or {text}.")
    texts: Optional[list[str]] = Field(None, description="TEI: the documents; selects TEI's bare answer.")
    model: Optional[str] = None
    top_n: Optional[int] = Field(None, gt=0, description="Return only the best N.")
    return_documents: bool = Field(True, description="Include each document in the results.")
    return_text: bool = Field(False, description="TEI: include the text.")
    raw_scores: bool = Field(False, description="TEI: scores before the activation (logits).")
    truncate: Optional[bool] = None
