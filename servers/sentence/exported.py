"""The same model exported once to ONNX and run by ONNX Runtime or OpenVINO — no torch at run time.

The export (torch.onnx, from the local model files, offline) covers the whole sentence-transformers
pipeline — transformer, pooling, normalisation — so its vectors are the torch ones. It is cached
under the cache directory, keyed by the model's files: a restart loads the cached graph without
importing torch. `quantize: int8` adds dynamic int8 quantization of the graph's weights
(onnxruntime.quantization), for ONNX Runtime.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from servers.sentence.encoder import ConfigurationError, Row
from servers.sentence.models import cross_encoder_max_length, is_cross_encoder, resolve_model_path
from servers.sentence.tokenization import HFTokenizing, load_tokenizer, pad, run_sorted, special_ids

log = logging.getLogger("servers.sentence")

EXPORT_VERSION = 2  # part of the cache key: a change to the export (or its quantization) makes a new one
OPSET = 17


def default_cache_dir() -> Path:
    return Path(os.environ.get("MODELCTL_CACHE_DIR") or Path.home() / ".cache" / "modelctl")


def cache_key(path: str, cross_encoder: bool) -> str:
    """Changes when any of the model's files changes (size or modification time)."""
    h = hashlib.sha256(f"{EXPORT_VERSION}:{'ce' if cross_encoder else 'st'}:{Path(path).resolve()}".encode())
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """One export at a time per model: a second server starting meanwhile waits, then reuses it."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_export(model_path: str, task: str, cache_dir: Path, quantize: str | None) -> tuple[Path, dict[str, Any]]:
    """The ONNX file to run (exported now, or from the cache) and the facts the export recorded."""
    path = resolve_model_path(model_path)
    if not Path(path).is_dir():
        raise ConfigurationError(f"backend onnx/openvino exports from a local model directory; {model_path!r} is not one")
    cross = task == "rerank" and is_cross_encoder(path)
    directory = cache_dir / "onnx" / cache_key(path, cross)
    onnx, meta_path = directory / "model.onnx", directory / "meta.json"
    with _locked(directory):
        if onnx.exists() and meta_path.exists():
            log.info("using the cached export %s", onnx)
        else:
            t0 = time.perf_counter()
            _export(path, cross, directory)
            log.info("exported %s to %s in %.1fs", model_path, onnx, time.perf_counter() - t0)
        meta = json.loads(meta_path.read_text())
        if quantize == "int8":
            int8 = directory / "model.int8.onnx"
            if not int8.exists():
                t0 = time.perf_counter()
                _quantize(onnx, int8)
                log.info("quantized %s to int8 in %.1fs", onnx, time.perf_counter() - t0)
            return int8, meta
    return onnx, meta


def _export(path: str, cross: bool, directory: Path) -> None:
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    model: Any
    if cross:
        model = CrossEncoder(path, device="cpu")
        network, tokenizer = model.model, model.tokenizer
        max_length = cross_encoder_max_length(model)
        activation = type(getattr(model, "activation_fn", None) or torch.nn.Sigmoid()).__name__
        dimensions = None
    else:
        model = SentenceTransformer(path, device="cpu")
        network, tokenizer = model, model.tokenizer
        max_length = int(model.max_seq_length)
        activation = "Identity"
        dims = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        dimensions = int(dims())
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in tokenizer.model_input_names else [])

    class Pipeline(torch.nn.Module):
        """The whole forward pass as one graph: tensors in, embeddings (or logits) out."""

        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            features = dict(zip(names, tensors, strict=True))
            if cross:
                return self.network(**features).logits
            return self.network(features)["sentence_embedding"]

    sample = tokenizer(["hello world", "a somewhat longer example sentence"], padding=True, return_tensors="pt")
    axes = {n: {0: "batch", 1: "tokens"} for n in names} | {"output": {0: "batch"}}
    tmp = directory / f"model.onnx.{os.getpid()}.tmp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on branches that are constant for this model
        torch.onnx.export(
            Pipeline().eval(),
            tuple(sample[n] for n in names),
            str(tmp),
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    meta = {"cross_encoder": cross, "max_length": max_length, "dimensions": dimensions, "activation": activation, "inputs": names}
    (directory / "meta.json.tmp").write_text(json.dumps(meta))
    os.replace(tmp, directory / "model.onnx")
    os.replace(directory / "meta.json.tmp", directory / "meta.json")


def _quantize(onnx: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    # per channel: the same speed as per tensor, and on MiniLM a minimum cosine to the fp32 vectors
    # of 0.98 instead of 0.91 (measured over bench/sentence_throughput.py's 512 sentences)
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # quantize_dynamic warns on the root logger to pre-process first
    try:
        quantize_dynamic(str(onnx), str(tmp), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    os.replace(tmp, out)


class ExportedEncoder(HFTokenizing):
    """The Encoder interface over an exported graph, on ONNX Runtime or OpenVINO (CPU)."""

    def __init__(
        self,
        model_path: str,
        task: str,
        device: str,
        max_batch_tokens: int,
        max_batch_size: int,
        backend: str = "onnx",
        quantize: str | None = None,
        cache_dir: Path | None = None,
    ):
        if device != "cpu":
            raise ConfigurationError(f"backend {backend} runs on the CPU; use backend torch for device {device}")
        if quantize is not None and backend != "onnx":
            raise ConfigurationError(f"quantize: {quantize} is for backend onnx, not {backend}")
        _require(backend)
        self.backend, self.quantize, self.task, self.device = backend, quantize, task, device
        self.max_batch_tokens, self.max_batch_size = max_batch_tokens, max_batch_size
        self.graph, meta = ensure_export(model_path, task, cache_dir or default_cache_dir(), quantize)
        self.tokenizer = load_tokenizer(resolve_model_path(model_path))
        self.cross_encoder = bool(meta["cross_encoder"])
        self.max_length = int(meta["max_length"])
        self.dimensions = meta["dimensions"]
        self.activation = meta["activation"]
        self.inputs = list(meta["inputs"])
        self.vocab_size = len(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id or 0
        self.first_id, self.last_id = special_ids(self.tokenizer)
        self._infer: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None

    def set_threads(self, workers: int, threads: int | None) -> None:
        """Load the graph with cores / workers threads each (the batcher runs `workers` at once)."""
        from servers.sentence.service import cores

        per_worker = threads or max(1, cores() // workers)
        self._infer = _onnxruntime(self.graph, per_worker) if self.backend == "onnx" else _openvino(self.graph, workers, per_worker)

    def describe(self) -> dict[str, Any]:
        return {
            "model_type": "reranker" if self.cross_encoder else "embedding",
            "dtype": "int8" if self.quantize == "int8" else "float32",
            "backend": self.backend + ("-int8" if self.quantize else ""),
            "path": str(self.graph),
        }

    def run(self, rows: list[Row]) -> np.ndarray:
        return run_sorted(rows, self._forward, self.max_batch_size, self.max_batch_tokens, self.dimensions or 1)

    def _forward(self, rows: list[Row]) -> np.ndarray:
        if self._infer is None:
            self.set_threads(1, None)
        assert self._infer is not None
        out = self._infer(pad(rows, self.pad_id, "token_type_ids" in self.inputs))
        return out[:, 0] if self.cross_encoder else out

    def activate(self, scores: np.ndarray) -> np.ndarray:
        if self.activation == "Sigmoid":
            return (1.0 / (1.0 + np.exp(-scores))).astype(np.float32)
        return scores


def _require(backend: str) -> None:
    module = {"onnx": "onnxruntime", "openvino": "openvino"}[backend]
    try:
        __import__(module)
    except ImportError:
        raise ConfigurationError(
            f"backend {backend} needs the {module} package: pip install 'modelctl[fast]' (or ./install.sh --fast)"
        ) from None


def _onnxruntime(graph: Path, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    # a session's run is thread-safe: the workers share it

    def infer(features: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(session.run(["output"], features)[0], dtype=np.float32)

    return infer


def _openvino(graph: Path, streams: int, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import openvino as ov

    core = ov.Core()
    config = {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": str(streams),
        "INFERENCE_NUM_THREADS": str(streams * threads),
        "INFERENCE_PRECISION_HINT": "f32",
    }
    compiled = core.compile_model(core.read_model(str(graph)), "CPU", config)
    local = threading.local()  # an infer request is not thread-safe: one per worker thread

    def infer(features: dict[str, np.ndarray]) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        request.infer(features)
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)

    return infer
