"""The model: load, tokenize (with limits), and run padded batches.

Tokenizing happens per request, off the event loop; the batcher then only pads token ids and
runs the network, so each input is tokenized once.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

# a batch is split where its longest row would exceed its shortest by this ratio (padding is
# wasted compute), once the part has at least MIN_SPLIT_ROWS rows
PAD_RATIO = 1.3
MIN_SPLIT_ROWS = 8


class InputTooLong(ValueError):
    def __init__(self, index: int, length: int, limit: int):
        self.index, self.length, self.limit = index, length, limit
        super().__init__(f"input {index} has {length} tokens, more than this model's limit of {limit}; shorten it or send truncate: true")


@dataclass(frozen=True)
class Row:
    """One model input: token ids, and token type ids for a (query, document) pair."""

    ids: Sequence[int]
    type_ids: Sequence[int] | None = None


def resolve_model_path(spec: str) -> str:
    """`package:MODULE/sub/dir` → the directory inside an installed package; anything else as is."""
    if not spec.startswith("package:"):
        return spec
    module, _, sub = spec[len("package:") :].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"model {spec!r}: Python package {module!r} is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / sub
    if not path.exists():
        raise FileNotFoundError(f"model {spec!r}: {path} does not exist")
    return str(path)


def _is_cross_encoder(path: str) -> bool:
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    has_st_modules = (Path(path) / "modules.json").exists()
    return any(a.endswith("ForSequenceClassification") for a in archs) and not has_st_modules


class EncoderModel:
    """A bi-encoder (SentenceTransformer) or a cross-encoder (CrossEncoder) behind one interface."""

    def __init__(self, model_path: str, task: str, device: str, max_batch_tokens: int, max_batch_size: int):
        from sentence_transformers import CrossEncoder, SentenceTransformer

        path = resolve_model_path(model_path)
        self.task = task
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.cross_encoder = task == "rerank" and _is_cross_encoder(path)
        if self.cross_encoder:
            self.model = CrossEncoder(path, device=device)
            self.max_length = int(getattr(self.model, "max_length", None) or self.model.tokenizer.model_max_length)
            self.activation = getattr(self.model, "activation_fn", None) or torch.nn.Sigmoid()
            self.dimensions = None
        else:
            self.model = SentenceTransformer(path, device=device)
            self.max_length = int(self.model.max_seq_length)
            self.activation = None
            self.dimensions = int(self.model.get_sentence_embedding_dimension())
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.vocab_size = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.uses_type_ids = "token_type_ids" in getattr(self.tokenizer, "model_input_names", [])

    # ---------------------------------------------------------------- tokenizing
    def tokenize(self, texts: list[str], truncate: bool) -> list[Row]:
        enc = self.tokenizer(
            texts, add_special_tokens=True, truncation=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
        )
        ids = enc["input_ids"]
        long = [i for i, x in enumerate(ids) if len(x) > self.max_length]
        if long:
            if not truncate:
                raise InputTooLong(long[0], len(ids[long[0]]), self.max_length)
            cut = self.tokenizer(
                [texts[i] for i in long],
                add_special_tokens=True,
                truncation=True,
                max_length=self.max_length,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            for i, x in zip(long, cut, strict=True):
                ids[i] = x
        return [Row(x) for x in ids]

    def rows_from_ids(self, batches: list[list[int]], truncate: bool) -> list[Row]:
        """Token ids sent by the client: checked against the vocabulary and the length limit."""
        rows = []
        for i, ids in enumerate(batches):
            if not ids:
                raise ValueError(f"input {i} is an empty list of token ids")
            bad = [t for t in ids if t < 0 or t >= self.vocab_size]
            if bad:
                raise ValueError(f"input {i} has token id {bad[0]} outside this model's vocabulary (0-{self.vocab_size - 1})")
            if len(ids) > self.max_length:
                if not truncate:
                    raise InputTooLong(i, len(ids), self.max_length)
                rows.append(Row(ids[: self.max_length]))
                continue
            rows.append(Row(ids))
        return rows

    def tokenize_pairs(self, query: str, docs: list[str], truncate: bool) -> list[Row]:
        enc = self.tokenizer(
            [query] * len(docs),
            docs,
            add_special_tokens=True,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=True,
            verbose=False,
        )
        ids, types = enc["input_ids"], enc.get("token_type_ids")
        long = [i for i, x in enumerate(ids) if len(x) > self.max_length]
        if long:
            if not truncate:
                raise InputTooLong(long[0], len(ids[long[0]]), self.max_length)
            cut = self.tokenizer(
                [query] * len(long),
                [docs[i] for i in long],
                add_special_tokens=True,
                truncation=True,
                max_length=self.max_length,
                return_attention_mask=False,
                return_token_type_ids=True,
            )
            for j, i in enumerate(long):
                ids[i] = cut["input_ids"][j]
                if types is not None:
                    types[i] = cut["token_type_ids"][j]
        return [Row(x, types[i] if types is not None else None) for i, x in enumerate(ids)]

    # ---------------------------------------------------------------- running
    def run(self, rows: list[Row]) -> np.ndarray:
        """Embeddings (not normalised) or scores (raw logits) for rows, in their order."""
        order = sorted(range(len(rows)), key=lambda i: len(rows[i].ids))
        out: list[np.ndarray | None] = [None] * len(rows)
        start = 0
        while start < len(order):
            end = start + 1
            shortest = len(rows[order[start]].ids)
            while end < len(order) and end - start < self.max_batch_size:
                width = len(rows[order[end]].ids)
                if width * (end - start + 1) > self.max_batch_tokens:
                    break
                # rows are sorted by length: cut where padding to this row would waste much
                if end - start >= MIN_SPLIT_ROWS and width > shortest * PAD_RATIO:
                    break
                end += 1
            chunk = order[start:end]
            result = self._forward([rows[i] for i in chunk])
            for i, vec in zip(chunk, result, strict=True):
                out[i] = vec
            start = end
        return np.stack(out) if out else np.zeros((0, self.dimensions or 1), dtype=np.float32)

    def _forward(self, rows: list[Row]) -> np.ndarray:
        width = max(len(r.ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        types = torch.zeros((len(rows), width), dtype=torch.long) if self.uses_type_ids else None
        for i, r in enumerate(rows):
            n = len(r.ids)
            ids[i, :n] = torch.as_tensor(r.ids)
            mask[i, :n] = 1
            if types is not None and r.type_ids is not None:
                types[i, :n] = torch.as_tensor(r.type_ids)
        features = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if types is not None:
            features["token_type_ids"] = types.to(self.device)
        with torch.inference_mode():
            output = self.model.forward(features)
        if self.cross_encoder:
            scores = output["scores"] if isinstance(output, dict) else output
            return scores.float().cpu().numpy()[:, 0]
        return output["sentence_embedding"].float().cpu().numpy()

    def activate(self, scores: np.ndarray) -> np.ndarray:
        """Cross-encoder logits → relevance scores, the way CrossEncoder.predict does it."""
        if self.activation is None:
            return scores
        with torch.inference_mode():
            return self.activation(torch.from_numpy(scores)).numpy()


def normalize(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def configure_threads(device: str, workers: int | None, torch_threads: int | None) -> int:
    """Choose model workers and torch threads; returns the number of workers.

    On a CPU the default is one single-threaded worker per core: separate batches on separate
    cores beat one batch whose every op is split across cores (measured in bench/). On a GPU,
    one worker. OMP_NUM_THREADS, when set, is left to rule torch's threads.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    on_cpu = device == "cpu"
    if workers is None:
        workers = min(cores, 8) if on_cpu else 1
    if torch_threads is None and "OMP_NUM_THREADS" not in os.environ:
        torch_threads = max(1, cores // workers) if on_cpu else None
    if torch_threads:
        torch.set_num_threads(torch_threads)
    return workers
