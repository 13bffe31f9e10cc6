"""A stand-in model for the bundled server's route and error tests: no torch, deterministic.

Words are tokens (framed by [CLS]=101 and [SEP]=102, like MiniLM's tokenizer); an embedding is
a sum of per-token pseudo-random vectors; a pair's score is the overlap of its two sides' words.
Options come in the model path: `fake:dims=16,max_length=32,cross=1,delay=0.2,load=1.5,log=PATH,tlog=PATH,lanes=PATH`.
"""

from __future__ import annotations

import json
import re
import time
import zlib
from typing import Any

import numpy as np

from servers.sentence.encoder import LANE, InputTooLong, Row

CLS, SEP, VOCAB = 101, 102, 30522


def parse_options(model_path: str) -> dict[str, str]:
    _, _, text = model_path.partition(":")
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


class FakeEncoder:
    def __init__(self, model_path: str, task: str, device: str, max_batch_tokens: int, max_batch_size: int):
        o = parse_options(model_path)
        time.sleep(float(o.get("load", "0")))  # a model that takes a while to load
        self.task, self.device = task, device
        self.cross_encoder = task == "rerank" and o.get("cross", "1") == "1"
        self.max_length = int(o.get("max_length", "32"))
        self.dimensions = None if self.cross_encoder else int(o.get("dims", "16"))
        self.vocab_size, self.first_id, self.last_id = VOCAB, CLS, SEP
        self.delay = float(o.get("delay", "0"))
        self.log = o.get("log")
        self.tlog = o.get("tlog")  # the length of every text tokenized, one per line
        self.lanes = o.get("lanes")  # each row run, with the lane of the call: {"ids", "express"} per line

    @staticmethod
    def cross_encoder_for(model_path: str, task: str) -> bool:
        """Known before loading (the app documents /predict only for a cross-encoder)."""
        return task == "rerank" and parse_options(model_path).get("cross", "1") == "1"

    def describe(self) -> dict[str, Any]:
        return {"model_type": "reranker" if self.cross_encoder else "embedding", "dtype": "float32", "backend": "fake", "pooling": "mean"}

    @staticmethod
    def words(text: str) -> list[int]:
        return [1000 + zlib.crc32(w.encode()) % (VOCAB - 1000) for w in re.findall(r"\w+|[^\w\s]", text.lower())]

    def _fit(self, index: int, ids: list[int], truncate: bool, limit: int, direction: str = "right") -> list[int]:
        if len(ids) <= limit:
            return ids
        if not truncate:
            raise InputTooLong(index, len(ids), limit)
        if direction == "left":
            return [CLS, *ids[len(ids) - limit + 1 :]]  # the start is cut: [CLS] kept, the end and [SEP] too
        return [*ids[: limit - 1], SEP]

    def _tokenized(self, texts: list[str]) -> None:
        if self.tlog:
            with open(self.tlog, "a") as f:
                f.writelines(f"{len(t)}\n" for t in texts)

    def tokenize(self, texts: list[str], truncate: bool, max_length: int | None = None, direction: str = "right") -> list[Row]:
        self._tokenized(texts)
        limit = min(self.max_length, max_length or self.max_length)
        return [Row(self._fit(i, [CLS, *self.words(t), SEP], truncate, limit, direction)) for i, t in enumerate(texts)]

    def tokenize_pairs(
        self, query: str, docs: list[str], truncate: bool, max_length: int | None = None, direction: str = "right"
    ) -> list[Row]:
        self._tokenized([query, *docs])
        limit = min(self.max_length, max_length or self.max_length)
        q = [CLS, *self.words(query), SEP]
        rows = []
        for i, d in enumerate(docs):
            ids = self._fit(i, [*q, *self.words(d), SEP], truncate, limit, direction)
            rows.append(Row(ids, [0] * min(len(q), len(ids)) + [1] * max(0, len(ids) - len(q))))
        return rows

    def run(self, rows: list[Row]) -> np.ndarray:
        if self.log:
            with open(self.log, "a") as f:
                for row in rows:
                    f.write(json.dumps(list(row.ids)) + "\n")
        if self.lanes:
            with open(self.lanes, "a") as f:
                for row in rows:
                    f.write(json.dumps({"ids": list(row.ids), "express": LANE.express}) + "\n")
        time.sleep(self.delay)
        if self.cross_encoder:
            out = []
            for row in rows:
                types = row.type_ids or [0] * len(row.ids)
                a = {t for t, s in zip(row.ids, types, strict=True) if s == 0} - {CLS, SEP}
                b = {t for t, s in zip(row.ids, types, strict=True) if s == 1} - {CLS, SEP}
                out.append(float(len(a & b)) - 1.0)
            return np.array(out, dtype=np.float32)
        assert self.dimensions is not None
        vecs = np.zeros((len(rows), self.dimensions), dtype=np.float32)
        for i, row in enumerate(rows):
            for t in row.ids:
                vecs[i] += np.random.default_rng(int(t)).standard_normal(self.dimensions).astype(np.float32)
        return vecs

    def activate(self, scores: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-scores))).astype(np.float32)
