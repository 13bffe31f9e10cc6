"""The same model exported once to ONNX and run by ONNX Runtime or OpenVINO — no torch at run time.

The export (torch.onnx, from the local model files, offline) covers the whole sentence-transformers
pipeline — transformer, pooling, normalisation — so its vectors are the torch ones. It is cached
under the cache directory, keyed by the model's files: a restart loads the cached graph without
importing torch. `quantize: int8` adds dynamic int8 quantization (onnxruntime.quantization), for
ONNX Runtime, made accurate in two steps measured on MiniLM (README, "The CPU fast path"):
- SmoothQuant: the activations' outlier channels would set the one scale that dynamic quantization
  gives each activation tensor, and crush every other channel. Each channel's range, measured on a
  bundled calibration set (servers/sentence/calibration.py), is divided by a factor that the
  weights' rows are multiplied by: the same product, with ranges that int8 holds well;
- the down projections (MatMuls whose weights narrow, like the feed-forward output 1536 → 384)
  stay fp32: their input, after GELU, has ranges no smoothing evens out.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from servers.sentence.encoder import LANE, ConfigurationError, Row
from servers.sentence.models import cached_model_dir, cross_encoder_max_length, is_cross_encoder, resolve_model_path
from servers.sentence.tokenization import HFTokenizing, load_tokenizer, pad, run_sorted, special_ids

log = logging.getLogger("servers.sentence")

EXPORT_VERSION = 4  # part of the cache key: a change to the export (or its quantization) makes a new one
# SmoothQuant's migration strength: how much of each activation channel's range moves into the weights
SMOOTH_ALPHA = 0.7
OPSET = 17


def default_cache_dir() -> Path:
    return Path(os.environ.get("MODELCTL_CACHE_DIR") or Path.home() / ".cache" / "modelctl")


def install_cache_dir() -> Path:
    """Exports made at install time (install.sh exports the bundled MiniLM), inside the Python
    environment that runs the server: read by every server, whatever its cache directory."""
    return Path(sys.prefix) / "share" / "modelctl" / "cache"


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
        path = cached_model_dir(path) or path  # a hub model in the local Hugging Face cache
    if not Path(path).is_dir():
        raise ConfigurationError(f"backend onnx/openvino exports from a local model directory; {model_path!r} is not one")
    cross = task == "rerank" and is_cross_encoder(path)
    key = cache_key(path, cross)
    wanted = "model.int8.onnx" if quantize == "int8" else "model.onnx"
    installed = install_cache_dir() / "onnx" / key
    if installed != cache_dir / "onnx" / key and (installed / wanted).exists() and (installed / "meta.json").exists():
        log.info("using the export made at install time %s", installed / wanted)
        return installed / wanted, json.loads((installed / "meta.json").read_text())
    directory = cache_dir / "onnx" / key
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
                _quantize(onnx, int8, path, meta)
                log.info("quantized %s to int8 in %.1fs", onnx, time.perf_counter() - t0)
            return int8, meta
    return onnx, meta


def _export(path: str, cross: bool, directory: Path) -> None:
    import torch
    from sentence_transformers import CrossEncoder, SentenceTransformer

    model: Any
    # eager attention: the graph of a plain softmax(QK^T)V, where SDPA's export adds IsNaN and Where
    # around it (ONNX Runtime then runs one sentence 5-10% faster, batches as fast, the same vectors)
    kwargs = {"attn_implementation": "eager"}
    if cross:
        model = _load(CrossEncoder, path, kwargs)
        network, tokenizer = model.model, model.tokenizer
        max_length = cross_encoder_max_length(model)
        activation = type(getattr(model, "activation_fn", None) or torch.nn.Sigmoid()).__name__
        dimensions = None
    else:
        model = _load(SentenceTransformer, path, kwargs)
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


def _load(cls: Any, path: str, model_kwargs: dict[str, Any]) -> Any:
    """The model with these transformers options, or as it loads by default where they do not apply
    (a module that is not a transformers model, an architecture without eager attention)."""
    try:
        return cls(path, device="cpu", model_kwargs=model_kwargs)
    except (TypeError, ValueError) as e:
        log.info("exporting %s without %s: %s", path, model_kwargs, e)
        return cls(path, device="cpu")


def _quantize(onnx_path: Path, out: Path, model_path: str, meta: dict[str, Any]) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(onnx_path))
    keep = _smooth(model, _calibration_feeds(model_path, meta), SMOOTH_ALPHA)
    smoothed = out.with_name(f"{out.name}.{os.getpid()}.smoothed.onnx")
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    onnx.save(model, str(smoothed))
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # quantize_dynamic warns on the root logger to pre-process first
    try:
        # per channel: the same speed as per tensor, and far closer vectors
        quantize_dynamic(str(smoothed), str(tmp), weight_type=QuantType.QInt8, per_channel=True, nodes_to_exclude=keep)
    finally:
        root.setLevel(level)
        smoothed.unlink(missing_ok=True)
    os.replace(tmp, out)


def _calibration_feeds(model_path: str, meta: dict[str, Any]) -> list[dict[str, np.ndarray]]:
    """The calibration set, tokenized and padded in batches of 8: texts, or pairs for a cross-encoder."""
    from servers.sentence import calibration

    tokenizer = load_tokenizer(model_path)
    with_types = "token_type_ids" in meta["inputs"]
    columns: list[list[str]] = list(calibration.pairs()) if meta["cross_encoder"] else [calibration.texts()]
    enc = tokenizer(*columns, truncation=True, max_length=int(meta["max_length"]), return_token_type_ids=True)
    types = enc.get("token_type_ids") if len(columns) == 2 else None
    rows = [Row(ids, types[i] if types is not None else None) for i, ids in enumerate(enc["input_ids"])]
    return [pad(rows[i : i + 8], tokenizer.pad_token_id or 0, with_types) for i in range(0, len(rows), 8)]


def _smooth(model: Any, feeds: list[dict[str, np.ndarray]], alpha: float) -> list[str]:
    """SmoothQuant on the graph's weighted MatMuls, in place; returns the MatMuls to keep fp32.

    MatMuls reading the same activation (query, key and value) share one factor per channel:
    s = max|X|^alpha / max|W|^(1 - alpha). X is multiplied by 1/s (a Mul before them) and W's rows
    by s, so the product is unchanged in exact arithmetic.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    keep: list[str] = []
    groups: dict[str, list[Any]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        shape = list(weights[node.input[1]].dims)
        if len(shape) != 2:
            continue
        if shape[0] > shape[1]:
            keep.append(node.name)  # a down projection: fp32
            continue
        groups.setdefault(node.input[0], []).append(node)
    if not groups:
        return keep
    probe = type(model)()
    probe.CopyFrom(model)
    present = {o.name for o in probe.graph.output}
    for name in groups:
        if name not in present:
            probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the tensors we read
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    ranges: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(outputs, session.run(None, feed), strict=True):
            if name in groups:
                channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
                ranges[name] = np.maximum(ranges[name], channel_max) if name in ranges else channel_max
    order = {node.name: i for i, node in enumerate(model.graph.node)}
    inserts: list[tuple[int, Any]] = []
    for x, nodes in groups.items():
        ws = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        w_max = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
        factor = np.power(np.maximum(ranges[x], 1e-5), alpha) / np.power(np.maximum(w_max, 1e-5), 1 - alpha)
        factor = np.clip(factor, 1e-3, 1e3).astype(np.float32)
        for node, w in zip(nodes, ws, strict=True):
            scaled = numpy_helper.from_array((w * factor[:, None]).astype(np.float32), f"{node.input[1]}.smoothed")
            model.graph.initializer.append(scaled)
            node.input[1] = scaled.name
        inverse = numpy_helper.from_array((1.0 / factor).astype(np.float32), f"{x}.smooth_inverse")
        model.graph.initializer.append(inverse)
        mul = helper.make_node("Mul", [x, inverse.name], [f"{x}.smoothed"], name=f"{x}.smooth")
        for node in nodes:
            node.input[0] = mul.output[0]
        inserts.append((min(order[n.name] for n in nodes), mul))
    for index, mul in sorted(inserts, key=lambda item: item[0], reverse=True):
        model.graph.node.insert(index, mul)
    return keep


class ExportedEncoder(HFTokenizing):
    """The Encoder interface over an exported graph, on ONNX Runtime or OpenVINO (CPU)."""

    backend_reason = "asked for"

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
        path = resolve_model_path(model_path)
        self.tokenizer = load_tokenizer(path if Path(path).is_dir() else cached_model_dir(path) or path)
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
            "backend_reason": self.backend_reason,
            "path": str(self.graph),
        }

    def run(self, rows: list[Row]) -> np.ndarray:
        # a call costs ONNX Runtime little beside its compute: rows of mixed lengths run in groups of
        # like lengths from two rows on, rather than padded to the longest
        return run_sorted(rows, self._forward, self.max_batch_size, self.max_batch_tokens, self.dimensions or 1, min_split_rows=2)

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
    module, extra, script = {"onnx": ("onnxruntime", "server", "./install.sh"), "openvino": ("openvino", "fast", "./install.sh --fast")}[
        backend
    ]
    if importlib.util.find_spec(module) is None:  # found, not imported: the session imports it when it is needed
        raise ConfigurationError(f"backend {backend} needs the {module} package: pip install 'modelctl[{extra}]' (or {script})")


def _onnxruntime(graph: Path, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if threads > 1:
        # threads that spin between ops take the cores from the event loop, the tokenizer and the
        # other workers: on a shared CPU the split ops then wait for a descheduled thread
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    # a session's run is thread-safe: the workers share it

    def infer(features: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(session.run(["output"], features)[0], dtype=np.float32)

    return infer


def _openvino(graph: Path, streams: int, threads: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """OpenVINO runs one request per stream at a time, so the express lane gets a compiled model
    of its own (one stream, latency first): a query never waits for a bulk chunk's stream."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(graph))
    config = {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "NUM_STREAMS": str(streams),
        "INFERENCE_NUM_THREADS": str(streams * threads),
        "INFERENCE_PRECISION_HINT": "f32",
    }
    compiled = core.compile_model(model, "CPU", config)
    express = core.compile_model(
        model, "CPU", {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": str(streams * threads), "INFERENCE_PRECISION_HINT": "f32"}
    )
    local = threading.local()  # an infer request is not thread-safe: one per worker thread and lane

    def infer(features: dict[str, np.ndarray]) -> np.ndarray:
        lane = "express" if LANE.express else "bulk"
        request = getattr(local, lane, None)
        if request is None:
            request = (express if LANE.express else compiled).create_infer_request()
            setattr(local, lane, request)
        request.infer(features)
        return np.array(request.get_output_tensor(0).data, dtype=np.float32)

    return infer
