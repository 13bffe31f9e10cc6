"""The real model: sentence-transformers on torch, behind the Encoder interface (encoder.py).

servers/sentence/exported.py runs the same model exported to ONNX, on ONNX Runtime or OpenVINO.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from servers.sentence.encoder import ConfigurationError, Row
from servers.sentence.models import cached_model_dir, cross_encoder_max_length, is_cross_encoder, resolve_model_path
from servers.sentence.tokenization import FastTokenizer, HFTokenizing, pad, run_sorted, special_ids


class SentenceTransformerEncoder(HFTokenizing):
    """A bi-encoder (SentenceTransformer) or a cross-encoder (CrossEncoder) behind the Encoder interface."""

    backend_reason = "asked for (backend torch)"

    def __init__(self, model_path: str, task: str, device: str, max_batch_tokens: int, max_batch_size: int, half: bool = False):
        path = resolve_model_path(model_path)
        if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
            raise ConfigurationError(f"model path {path} does not exist")
        from sentence_transformers import CrossEncoder, SentenceTransformer

        self.model_path = path
        self.task = task
        self.device = device
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.cross_encoder = task == "rerank" and is_cross_encoder(path)
        self.model: Any
        try:
            if self.cross_encoder:
                self.model = CrossEncoder(path, device=device)
                self.max_length = cross_encoder_max_length(self.model)
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
        self.half = False
        if half and hasattr(self.model, "half"):
            self.model.half()
            self.half = self._finite_in_half()
        hf = self.model.tokenizer
        self.uses_type_ids = "token_type_ids" in getattr(hf, "model_input_names", [])
        # the same tokenizer.json through `tokenizers` directly: transformers' wrapper costs a
        # one-sentence request more CPU than the tokenizing itself
        local = Path(path).expanduser() if Path(path).expanduser().is_dir() else cached_model_dir(path)
        fast = local is not None and getattr(hf, "is_fast", False) and (Path(local) / "tokenizer.json").exists()
        self.tokenizer = FastTokenizer(str(local)) if fast else hf
        self.vocab_size = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.first_id, self.last_id = special_ids(self.tokenizer)

    def _finite_in_half(self) -> bool:
        """Whether the model's outputs stay finite in fp16 (where they do not, it goes back to fp32)."""
        try:
            with torch.inference_mode():
                if self.cross_encoder:
                    out = self.model.predict([("a query", "a document about it")], convert_to_numpy=True)
                else:
                    out = self.model.encode(["a sentence to check fp16 on"], convert_to_numpy=True)
            if np.isfinite(np.asarray(out, dtype=np.float32)).all():
                return True
        except RuntimeError:  # an op without a half kernel on this device
            pass
        self.model.float()
        return False

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
        return {"model_type": kind, "dtype": dtype, "backend": "torch", "backend_reason": self.backend_reason, "path": self.model_path}

    # ---------------------------------------------------------------- running
    def run(self, rows: list[Row]) -> np.ndarray:
        """Embeddings (not normalised) or scores (raw logits) for rows, in their order."""
        return run_sorted(rows, self._forward, self.max_batch_size, self.max_batch_tokens, self.dimensions or 1)

    def _forward(self, rows: list[Row]) -> np.ndarray:
        features = {k: torch.from_numpy(v).to(self.device) for k, v in pad(rows, self.pad_id, self.uses_type_ids).items()}
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
