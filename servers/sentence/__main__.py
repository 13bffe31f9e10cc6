"""`python -m servers.sentence --model-path PATH --task-type embedding|rerank ...`"""

from __future__ import annotations

import argparse
import logging

from servers.sentence.settings import ServerSettings


def parse_args(argv: list[str] | None = None) -> tuple[ServerSettings, argparse.Namespace]:
    d = ServerSettings(model_path="")
    p = argparse.ArgumentParser(prog="python -m servers.sentence", description="Embeddings and rerank over HTTP.")
    p.add_argument("--model-path", required=True, help="model directory, hub name, or package:MODULE/subdir")
    p.add_argument("--task-type", choices=["embedding", "rerank"], default=d.task)
    p.add_argument("--device", default=d.device)
    p.add_argument("--host", default=d.host, help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=d.port)
    p.add_argument("--model-name", default=None, help="name served in /v1/models (default: the model path's last part)")
    p.add_argument("--api-key", default=None, help="require Bearer KEY (or set MODELCTL_API_KEY)")
    p.add_argument("--max-batch-tokens", type=int, default=d.max_batch_tokens)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size)
    p.add_argument("--max-inputs", type=int, default=d.max_inputs)
    p.add_argument("--max-queue", type=int, default=d.max_queue)
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--truncate", action="store_true", help="truncate over-long inputs instead of answering 422")
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--model-workers", type=int, default=None, help="batches run at once (default: cores on CPU, 1 on GPU)")
    p.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: cores / model workers on CPU)")
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
        max_inputs=a.max_inputs,
        max_queue=a.max_queue,
        max_body_bytes=a.max_body_bytes,
        truncate=a.truncate,
        warmup=not a.no_warmup,
        model_workers=a.model_workers,
        torch_threads=a.torch_threads,
    ), a


def main(argv: list[str] | None = None) -> None:
    settings, args = parse_args(argv)
    import uvicorn

    from servers.sentence.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
