"""`python -m servers.sentence --model-path PATH --task-type embedding|rerank ...`

Exit code 78 (EX_CONFIG) means "this configuration cannot work": an unknown argument, a model
path that does not exist, a model that cannot be loaded. modelctl fails such a server at once
instead of restarting it in a loop.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys
from pathlib import Path
from typing import Any, NoReturn, get_args

from servers.activation import inherited_socket, notify
from servers.sentence.app import EXIT_CONFIG
from servers.sentence.service import ModelFactory
from servers.sentence.settings import Backend, ServerSettings, Task


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message}\n")


def parse_args(argv: list[str] | None = None) -> tuple[ServerSettings, argparse.Namespace]:
    d = ServerSettings(model_path="")
    p = _Parser(prog="python -m servers.sentence", description="Embeddings and rerank over HTTP.")
    p.add_argument("--model-path", required=True, help="model directory, hub name, or package:MODULE/subdir")
    p.add_argument("--task-type", choices=get_args(Task), default=d.task)
    p.add_argument("--device", default=d.device)
    p.add_argument("--host", default=d.host, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--model-name", default=None, help="name served in /v1/models (default: the model path's last part)")
    p.add_argument("--api-key", default=None, help="require Bearer KEY (or set MODELCTL_API_KEY)")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--chunk-tokens", type=int, default=d.chunk_tokens, help="tokens in one fair batch (default: 512 on CPU, 8192 on GPU)")
    p.add_argument("--max-inputs", type=int, default=d.max_inputs)
    p.add_argument("--max-queue", type=int, default=d.max_queue)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--truncate", action="store_true", help="truncate over-long inputs instead of answering 413")
    p.add_argument("--allow-token-ids", action="store_true", help="accept token ids not framed by this model's special tokens")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--model-workers", type=int, default=None, help="batches run at once (default: cores on CPU, 1 on GPU)")
    p.add_argument("--express-workers", type=int, default=None, help="workers for small requests only (default: 1 on CPU, 0 on GPU)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: cores / model workers on CPU)")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout, help="seconds a client has to send its headers")
    p.add_argument("--body-timeout", type=float, default=d.body_timeout, help="seconds a client has to send its body")
    p.add_argument("--max-connections", type=int, default=None, help="open connections before idle ones are closed")
    p.add_argument(
        "--backend",
        choices=get_args(Backend),
        default=d.backend,
        help="what runs the network (onnx, openvino: an export, cached); auto (default): onnx on a CPU where ONNX Runtime is installed and the model exports, else torch (fp16 on CUDA)",
    )
    p.add_argument("--quantize", choices=["int8"], default=None, help="dynamic int8 weights (backend onnx)")
    p.add_argument("--cache-dir", default=None, help="where exports are kept (default: $MODELCTL_CACHE_DIR, else ~/.cache/modelctl)")
    p.add_argument("--log-level", default="info")
    p.add_argument("--access-log", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return ServerSettings(
        model_path=a.model_path,
        task=a.task_type,
        device=a.device,
        host=a.host,
        port=a.port,
        model_name=a.model_name or a.model_path.rstrip("/").split("/")[-1],
        api_key=a.api_key or ServerSettings.api_key_from_env(),
        max_batch_tokens=a.max_batch_tokens,
        max_batch_size=a.max_batch_size,
        chunk_tokens=a.chunk_tokens,
        max_inputs=a.max_inputs,
        max_queue=a.max_queue,
        max_body_bytes=a.max_body_bytes,
        truncate=a.truncate,
        allow_token_ids=a.allow_token_ids,
        warmup=not a.no_warmup,
        model_workers=a.model_workers,
        torch_threads=a.torch_threads,
        express_workers=a.express_workers,
        header_timeout=a.header_timeout,
        body_timeout=a.body_timeout,
        max_connections=a.max_connections,
        backend=a.backend,
        quantize=a.quantize,
        cache_dir=a.cache_dir,
    ), a


def check_model_path(model_path: str) -> None:
    """A local path that does not exist fails now, before seconds of importing torch."""
    if model_path.startswith(("/", "./", "../", "~")) and not Path(model_path).expanduser().exists():
        print(f"sentence server: configuration error: model path {model_path} does not exist", file=sys.stderr, flush=True)
        sys.exit(EXIT_CONFIG)


BACKLOG = 4096  # the same as the supervisor's: listen() again on an inherited socket must not shrink it


def serve(settings: ServerSettings, log_level: str = "info", access_log: bool = False, model_factory: ModelFactory | None = None) -> None:
    """Serve on settings.port, or on the socket a supervisor handed us (LISTEN_FDS): then load
    the model before accepting anything, and say READY=1 once serving."""
    import uvicorn

    from servers.sentence.app import create_app, served
    from servers.sentence.protocol import connection_cap, guarded_protocol, raise_fd_limit

    sock = inherited_socket()
    if sock is not None:
        settings = dataclasses.replace(settings, load_before_serving=True)
    cap = connection_cap(settings, raise_fd_limit())
    app = create_app(settings, model_factory)
    config = uvicorn.Config(
        served(app),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=5,
        http=guarded_protocol(settings, cap),
        backlog=BACKLOG,
    )

    class NotifyingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                notify(ready_message(app.state.context.engine))

    NotifyingServer(config).run(sockets=[sock] if sock is not None else None)


def ready_message(engine: Any) -> str:
    """READY=1, with what runs the model: STATUS= for people (systemctl status shows it) and the
    X_MODELCTL_ fields for modelctl's status, read from this instance's own notify socket (never
    from the shared port, where another instance may answer during a replacement)."""
    model = engine.model
    if model is None:
        return "READY=1"
    described = model.describe()
    backend, dtype = described.get("backend"), described.get("dtype")
    reason = " ".join(str(described.get("backend_reason") or "").split())
    ran = backend if dtype in (None, "float32", "int8") else f"{backend} {str(dtype).replace('float', 'fp')}"
    lines = ["READY=1", f"STATUS=serving on {ran}" + (f" ({reason})" if reason else ""), f"X_MODELCTL_BACKEND={ran}"]
    if reason:
        lines.append(f"X_MODELCTL_BACKEND_REASON={reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, model_factory: ModelFactory | None = None) -> None:
    settings, args = parse_args(argv)
    if model_factory is None:
        check_model_path(settings.model_path)
    serve(settings, args.log_level, args.access_log, model_factory)


if __name__ == "__main__":
    main()
