"""Every setting of the sentence server, from the command line to the app (uvicorn's Config idea)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

Task = Literal["embedding", "rerank"]
Backend = Literal["auto", "torch", "onnx", "openvino"]


@dataclass(frozen=True)
class ServerSettings:
    model_path: str
    task: Task = "embedding"
    device: str = "cpu"
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "model"
    api_key: str | None = None
    max_batch_tokens: int = 16384  # padded tokens in one model call
    max_batch_size: int = 64  # rows in one model call
    # tokens in one fair batch of the queue: a large request is run in chunks this size,
    # interleaved with the others (default: 512 on a CPU, where 16 rows of a sentence are the
    # fastest batch per row; 8192 on a GPU)
    chunk_tokens: int | None = None
    max_inputs: int = 2048  # inputs (or documents) in one request
    max_queue: int = 8192  # rows waiting for the model before 429
    max_body_bytes: int = 8 * 1024 * 1024
    truncate: bool = False  # truncate over-long inputs instead of answering 413
    allow_token_ids: bool = False  # accept token ids that are not framed by this model's special tokens
    warmup: bool = True
    model_workers: int | None = None  # model threads running batches at once (default: cores on CPU, 1 on GPU)
    # workers that take only small requests (one batch's worth), so that a query never waits
    # behind a chunk of bulk work (default: 1 on a CPU, 0 on a GPU)
    express_workers: int | None = None
    torch_threads: int | None = None  # torch intra-op threads (default: cores / model_workers on CPU)
    # connections: slow clients are cut off, idle ones make room, so /health always gets in
    header_timeout: float = 10.0  # seconds to send the request line and headers
    body_timeout: float = 30.0  # seconds to send the body once the headers are in
    max_connections: int | None = None  # default: the fd limit less a reserve
    # what runs the network: torch, or the model exported to ONNX (onnx, openvino); auto: onnx on a
    # CPU where ONNX Runtime is installed and the model exports, else torch (fp16 on CUDA)
    backend: Backend = "auto"
    quantize: Literal["int8"] | None = None  # dynamic int8 weights (backend onnx)
    cache_dir: str | None = None  # where exports are kept (default: $MODELCTL_CACHE_DIR, else ~/.cache/modelctl)
    # serving from a socket a supervisor holds: accept nothing before the model is loaded (clients
    # wait in the backlog), so that the first request is answered by a ready model, never 503
    load_before_serving: bool = False

    @classmethod
    def api_key_from_env(cls) -> str | None:
        return os.environ.get("MODELCTL_API_KEY") or os.environ.get("SENTENCE_SERVER_API_KEY") or None
