"""The real model: sentence-transformers on torch, behind the Encoder interface (encoder.py).

Tokenizing happens per request, on a model worker thread; the batcher then only pads token ids
and runs the network, so each input is tokenized once.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from servers.sentence.encoder import ConfigurationError, InputTooLong, Row

# a batch is split where its longest row would exceed its shortest by this ratio (padding is
# wasted compute), once the part has at least MIN_SPLIT_ROWS rows
PAD_RATIO = 1.3
MIN_SPLIT_ROWS = 8


def resolve_model_path(spec: str) -> str:
    """`package:MODULE/sub/dir` → the directory inside an installed package; anything else as is."""
    if not spec.startswith("package:"):
        return spec
    module, _, sub = spec[len("package:") :].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ConfigurationError(f"model {spec!r}: Python package {module!r} is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / sub
    if not path.exists():
        raise ConfigurationError(f"model {spec!r}: {path} does not exist")
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


class SentenceTransformerEncoder:
    """A bi-encoder (SentenceTransformer) or a cross-encoder (CrossEncoder) behind the Encoder interface."""

    def __init__(self, model_path: str, task: str, device: str, max_batch_tokens: int, max_batch_size: int):
        path = resolve_model_path(model_path)
        if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
            raise ConfigurationError(f"model path {path} does not exist")
        from sentence_transformers import CrossEncoder, SentenceTransformer

        self.model_path = path
        self.task = task
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.cross_encoder = task == "rerank" and _is_cross_encoder(path)
        self.model: Any
        try:
            if self.cross_encoder:
                self.model = CrossEncoder(path, device=device)
                self.max_length = int(getattr(self.model, "max_length", None) or self.model.tokenizer.model_max_length)
                self.activation = getattr(self.model, "activation_fn", None) or torch.nn.Sigmoid()
                self.dimensions = None
            else:
                self.model = SentenceTransformer(path, device=device)
                self.max_length = int(self.model.max_seq_length)
                self.activation = None
                dims = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
                self.dimensions = int(dims())
        except torch.cuda.OutOfMemoryError:
            raise  # can heal: another process may free the memory
        except (OSError, ValueError, KeyError) as e:
            # a missing or unreadable model, or a hub name that is not cached with HF_HUB_OFFLINE=1
            raise ConfigurationError(f"cannot load model {model_path!r}: {e}") from e
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.vocab_size = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.uses_type_ids = "token_type_ids" in getattr(self.tokenizer, "model_input_names", [])
        probe = self.tokenizer("a", add_special_tokens=True)["input_ids"]
        bare = self.tokenizer("a", add_special_tokens=False)["input_ids"]
        self.first_id = probe[0] if probe[:1] != bare[:1] else None
        self.last_id = probe[-1] if probe[-1:] != bare[-1:] else None

    def set_threads(self, workers: int, torch_threads: int | None) -> None:
        """Torch intra-op threads: cores / workers on a CPU (OMP_NUM_THREADS, when set, rules)."""
        if torch_threads is None and "OMP_NUM_THREADS" not in os.environ and self.device == "cpu":
            from servers.sentence.service import cores

            torch_threads = max(1, cores() // workers)
        if torch_threads:
            torch.set_num_threads(torch_threads)

    def describe(self) -> dict[str, Any]:
        dtype = str(next(self.model.parameters()).dtype).replace("torch.", "")
        kind = "reranker" if self.cross_encoder else "embedding"
        return {"model_type": kind, "dtype": dtype, "backend": "torch", "path": self.model_path}

    # ---------------------------------------------------------------- tokenizing
    def _limit(self, max_length: int | None) -> int:
        return min(self.max_length, max_length) if max_length else self.max_length

    def tokenize(self, texts: list[str], truncate: bool, max_length: int | None = None) -> list[Row]:
        limit = self._limit(max_length)
        enc = self.tokenizer(
            texts, add_special_tokens=True, truncation=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
        )
        ids = enc["input_ids"]
        long = [i for i, x in enumerate(ids) if len(x) > limit]
        if long:
            if not truncate:
                raise InputTooLong(long[0], len(ids[long[0]]), limit)
            cut = self.tokenizer(
                [texts[i] for i in long],
                add_special_tokens=True,
                truncation=True,
                max_length=limit,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            for i, x in zip(long, cut, strict=True):
                ids[i] = x
        return [Row(x) for x in ids]

    def tokenize_pairs(self, query: str, docs: list[str], truncate: bool, max_length: int | None = None) -> list[Row]:
        limit = self._limit(max_length)
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
        long = [i for i, x in enumerate(ids) if len(x) > limit]
        if long:
            if not truncate:
                raise InputTooLong(long[0], len(ids[long[0]]), limit)
            cut = self.tokenizer(
                [query] * len(long),
                [docs[i] for i in long],
                add_special_tokens=True,
                truncation=True,
                max_length=limit,
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
        return np.stack([v for v in out if v is not None]) if out else np.zeros((0, self.dimensions or 1), dtype=np.float32)

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
