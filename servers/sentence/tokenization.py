"""What every encoder does the same way, whatever runs the network: tokenize with limits, and
split rows into padded batches.

Tokenizing happens per request on a model worker; the batcher then only pads token ids and runs
the network, so each input is tokenized once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from servers.sentence.encoder import Direction, InputTooLong, Row

# a batch is split where its longest row would exceed its shortest by this ratio (padding is
# wasted compute), once the part has at least MIN_SPLIT_ROWS rows
PAD_RATIO = 1.3
MIN_SPLIT_ROWS = 8


def special_ids(tokenizer: Any) -> tuple[int | None, int | None]:
    """The ids this tokenizer puts first and last (CLS/BOS, SEP/EOS); None where it puts none."""
    framed = tokenizer("a", add_special_tokens=True)["input_ids"]
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    first = framed[0] if framed[:1] != bare[:1] else None
    last = framed[-1] if framed[-1:] != bare[-1:] else None
    return first, last


class HFTokenizing:
    """tokenize / tokenize_pairs for an encoder with a Hugging Face `tokenizer` and `max_length`."""

    tokenizer: Any
    max_length: int

    def _limit(self, max_length: int | None) -> int:
        return min(self.max_length, max_length) if max_length else self.max_length

    def tokenize(self, texts: list[str], truncate: bool, max_length: int | None = None, direction: Direction = "right") -> list[Row]:
        ids, _ = self._encode([texts], truncate, self._limit(max_length), direction)
        return [Row(x) for x in ids]

    def tokenize_pairs(
        self, query: str, docs: list[str], truncate: bool, max_length: int | None = None, direction: Direction = "right"
    ) -> list[Row]:
        ids, types = self._encode([[query] * len(docs), docs], truncate, self._limit(max_length), direction)
        return [Row(x, types[i] if types is not None else None) for i, x in enumerate(ids)]

    def _encode(
        self, columns: list[list[str]], truncate: bool, limit: int, direction: Direction = "right"
    ) -> tuple[list[list[int]], list[list[int]] | None]:
        """Token ids (and type ids, for pairs) of texts or text pairs; the rows over `limit` are
        tokenized again with truncation, or refused."""
        pairs = len(columns) == 2
        options: dict[str, Any] = {"add_special_tokens": True, "return_attention_mask": False, "return_token_type_ids": pairs}
        enc = self.tokenizer(*columns, truncation=False, verbose=False, **options)
        ids = enc["input_ids"]
        types = enc.get("token_type_ids") if pairs else None
        long = [i for i, x in enumerate(ids) if len(x) > limit]
        if long:
            if not truncate:
                raise InputTooLong(long[0], len(ids[long[0]]), limit)
            cut = truncating(
                self.tokenizer, *([column[i] for i in long] for column in columns), max_length=limit, direction=direction, **options
            )
            for j, i in enumerate(long):
                ids[i] = cut["input_ids"][j]
                if types is not None:
                    types[i] = cut["token_type_ids"][j]
        return ids, types


_SIDE_LOCK = threading.Lock()  # a transformers tokenizer's truncation side is a setting: one caller at a time


def truncating(tokenizer: Any, *columns: list[str], max_length: int, direction: Direction, **options: Any) -> Any:
    """The tokenizer's own truncation to max_length, from the end (right) or the start (left),
    special tokens kept, for texts and for pairs alike."""
    if isinstance(tokenizer, FastTokenizer):
        pairs = columns[1] if len(columns) > 1 else None
        return tokenizer(columns[0], pairs, truncation=True, max_length=max_length, direction=direction, **options)
    with _SIDE_LOCK:
        side = getattr(tokenizer, "truncation_side", "right")
        tokenizer.truncation_side = direction
        try:
            return tokenizer(*columns, truncation=True, max_length=max_length, **options)
        finally:
            tokenizer.truncation_side = side


def pad(rows: list[Row], pad_id: int, with_types: bool) -> dict[str, np.ndarray]:
    """int64 input_ids, attention_mask (and token_type_ids) for a batch, padded to its longest row."""
    width = max(len(r.ids) for r in rows)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    types = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        n = len(r.ids)
        ids[i, :n] = r.ids
        mask[i, :n] = 1
        if r.type_ids is not None:
            types[i, :n] = r.type_ids
    features = {"input_ids": ids, "attention_mask": mask}
    if with_types:
        features["token_type_ids"] = types
    return features


def run_sorted(
    rows: list[Row],
    forward: Callable[[list[Row]], np.ndarray],
    max_batch_size: int,
    max_batch_tokens: int,
    width: int,
    min_split_rows: int = MIN_SPLIT_ROWS,
) -> np.ndarray:
    """Run rows through `forward` in length-sorted batches (little padding); results in row order.
    A batch is cut where padding would grow past PAD_RATIO, once it holds min_split_rows rows."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
    out: list[np.ndarray | None] = [None] * len(rows)
    start = 0
    while start < len(order):
        end = start + 1
        shortest = len(rows[order[start]].ids)
        while end < len(order) and end - start < max_batch_size:
            length = len(rows[order[end]].ids)
            if length * (end - start + 1) > max_batch_tokens:
                break
            # rows are sorted by length: cut where padding to this row would waste much
            if end - start >= min_split_rows and length > shortest * PAD_RATIO:
                break
            end += 1
        chunk = order[start:end]
        for i, vec in zip(chunk, forward([rows[i] for i in chunk]), strict=True):
            out[i] = vec
        start = end
    return np.stack([v for v in out if v is not None]) if out else np.zeros((0, width), dtype=np.float32)


class FastTokenizer:
    """The model's tokenizer.json through the `tokenizers` library, called the way HFTokenizing
    calls a Hugging Face tokenizer — without importing transformers (which imports torch)."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        self._raw = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
        self._raw.no_padding()
        self._raw.no_truncation()
        self._truncating: dict[tuple[int, str], Any] = {}
        self._lock = threading.Lock()
        config = Path(path) / "tokenizer_config.json"
        pad_token = json.loads(config.read_text()).get("pad_token") if config.exists() else None
        if isinstance(pad_token, dict):
            pad_token = pad_token.get("content")
        self.pad_token_id = self._raw.token_to_id(pad_token) if isinstance(pad_token, str) else None

    def __len__(self) -> int:
        return int(self._raw.get_vocab_size(with_added_tokens=True))

    def _at(self, max_length: int | None, direction: str = "right") -> Any:
        """A copy that truncates at max_length (from the end, or the start): truncation is a
        setting, and settings are not thread-safe."""
        if max_length is None:
            return self._raw
        key = (max_length, direction)
        with self._lock:
            if key not in self._truncating:
                from tokenizers import Tokenizer

                tok = Tokenizer.from_str(self._raw.to_str())
                tok.enable_truncation(max_length, strategy="longest_first", direction=direction)
                self._truncating[key] = tok
            return self._truncating[key]

    def __call__(
        self,
        texts: str | list[str],
        pairs: list[str] | None = None,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
        direction: str = "right",
        **_: Any,
    ) -> dict[str, list[Any]]:
        single = isinstance(texts, str)
        batch = [texts] if isinstance(texts, str) else texts
        inputs = list(zip(batch, pairs, strict=True)) if pairs is not None else batch
        tok = self._at(max_length if truncation else None, direction)
        if len(inputs) == 1:  # encode_batch hands even one text to its thread pool
            one = inputs[0]
            encodings = [
                tok.encode(*one, add_special_tokens=add_special_tokens)
                if pairs is not None
                else tok.encode(one, add_special_tokens=add_special_tokens)
            ]
        else:
            encodings = tok.encode_batch(inputs, add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encodings]
        types = [e.type_ids for e in encodings]
        return {"input_ids": ids[0] if single else ids, "token_type_ids": types[0] if single else types}


def load_tokenizer(path: str) -> Any:
    """The model's fast tokenizer without transformers where it can (tokenizer.json), else transformers'."""
    if (Path(path) / "tokenizer.json").exists():
        return FastTokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
