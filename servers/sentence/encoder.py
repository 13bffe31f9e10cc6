"""What the server needs of a model: tokenize with limits, run padded batches, activate scores.

The real implementation is servers/sentence/model.py (sentence-transformers on torch); tests
pass a fake that needs no torch, so the routes and their errors are tested in the quick suite.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

Direction = Literal["right", "left"]  # where truncation cuts: the end (right) or the start (left)


class InputTooLong(ValueError):
    def __init__(self, index: int, length: int, limit: int):
        self.index, self.length, self.limit = index, length, limit
        super().__init__(f"input {index} has {length} tokens, more than this model's limit of {limit}; shorten it or send truncate: true")


class ConfigurationError(RuntimeError):
    """The model cannot be loaded with this configuration (missing path, unknown hub model offline)."""


class _Lane(threading.local):
    express = False


LANE = _Lane()  # which lane the calling model thread serves: an engine may keep the express lane apart


@dataclass(frozen=True)
class Row:
    """One model input: token ids, and token type ids for a (query, document) pair."""

    ids: Sequence[int]
    type_ids: Sequence[int] | None = None


class Encoder(Protocol):
    """A bi-encoder (embeddings, or cosine rerank) or a cross-encoder (pair scores)."""

    task: str
    device: str
    max_length: int  # tokens one input may have, special tokens included
    dimensions: int | None  # of an embedding; None for a cross-encoder
    cross_encoder: bool
    vocab_size: int
    # the special ids this tokenizer puts first and last (CLS/BOS, SEP/EOS); None where it puts none
    first_id: int | None
    last_id: int | None

    def tokenize(self, texts: list[str], truncate: bool, max_length: int | None = None, direction: Direction = "right") -> list[Row]:
        """Token ids; over-long inputs are cut (from the end, or with direction left from the start)
        when `truncate`, else refused (InputTooLong)."""
        ...

    def tokenize_pairs(
        self, query: str, docs: list[str], truncate: bool, max_length: int | None = None, direction: Direction = "right"
    ) -> list[Row]: ...

    def run(self, rows: list[Row]) -> np.ndarray:
        """Embeddings (not normalised) or raw scores (logits), in the order of rows."""
        ...

    def activate(self, scores: np.ndarray) -> np.ndarray:
        """Cross-encoder logits → relevance scores, the way CrossEncoder.predict does it."""
        ...

    def describe(self) -> dict[str, Any]:
        """Facts for /info and /health: model type, dtype, pooling, backend."""
        ...


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)
