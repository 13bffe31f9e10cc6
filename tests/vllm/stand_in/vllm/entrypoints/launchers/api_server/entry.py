"""The stand-in's `vllm.entrypoints.launchers.api_server.entry.main`: vLLM's flags, an EngineCore
with one Worker per tensor-parallel rank (workers ignore SIGTERM, and all of them outlive a
SIGKILL of the parent unless the whole group is killed), the socket made before the "model
loads", then uvicorn serving on it — the same calls real vLLM makes, so modelctl's launcher works
on both. As in vLLM, a request whose engine died meanwhile is answered 500, and on SIGTERM the
server finishes its requests in flight, then ends its engine."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

from vllm.entrypoints.launchers import launcher

REQUESTS = {"success": 0, "running": 0}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--api-key", default=None)
    a, _unknown = p.parse_known_args()
    return a


def engine_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def app_for(a: argparse.Namespace, engine_pid: int):
    name = a.served_model_name or a.model

    async def send(send_, status: int, body: object, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        await send_({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type.encode())]})
        await send_({"type": "http.response.body", "body": data})

    async def app(scope, receive, send_):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send_({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send_({"type": "lifespan.shutdown.complete"})
                    return
        path, method = scope["path"], scope["method"]
        headers = dict(scope["headers"])
        authorized = a.api_key is None or headers.get(b"authorization") == f"Bearer {a.api_key}".encode()
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path == "/health":  # vLLM leaves /health open even with --api-key
            return await send(send_, 200, {})
        if path == "/metrics":
            text = (
                f'# TYPE vllm:request_success counter\nvllm:request_success_total{{model_name="{name}"}} {REQUESTS["success"]}\n'
                f'# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{{model_name="{name}"}} {REQUESTS["running"]}\n'
            )
            return await send(send_, 200, text.encode(), "text/plain")
        if not authorized:
            return await send(send_, 401, {"error": "Unauthorized"})
        if path == "/v1/models":
            return await send(send_, 200, {"object": "list", "data": [{"id": name, "object": "model"}]})
        if path == "/info":
            env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
            return await send(send_, 200, {"pid": os.getpid(), "engine": engine_pid, "args": sys.argv[1:], "env": env})
        if path == "/v1/completions" and method == "POST":
            REQUESTS["running"] += 1
            prompt = json.loads(body or b"{}").get("prompt")
            await asyncio.sleep(float(os.environ.get("STAND_IN_REQUEST_SECONDS", "0")))
            REQUESTS["running"] -= 1
            if not engine_alive(engine_pid):
                return await send(send_, 500, {"error": {"message": "EngineCore died", "type": "EngineDeadError"}})
            REQUESTS["success"] += 1
            choice = {"index": 0, "text": " stand-in", "finish_reason": "length"}
            return await send(
                send_, 200, {"object": "text_completion", "model": name, "choices": [choice], "prompt": prompt, "pid": os.getpid()}
            )
        return await send(send_, 404, {"error": "not found"})

    return app


def main() -> None:
    import uvicorn

    a = parse()
    print(
        f"stand-in vLLM pid {os.getpid()} args {sys.argv[1:]} CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}", flush=True
    )
    _address, sock = launcher.setup_server(a, reuse_port=False)  # bound before the engine, as vLLM does
    engine = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--engine-core", str(a.tensor_parallel_size), "EngineCore"],
        stdout=subprocess.PIPE,
    )
    assert engine.stdout is not None
    engine.stdout.readline()  # the engine and its workers are up
    time.sleep(float(os.environ.get("STAND_IN_LOAD_SECONDS", "0.5")))  # "loading the model": nothing accepts yet
    config = uvicorn.Config(app_for(a, engine.pid), log_level="warning", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])  # on SIGTERM: stops accepting, finishes what is in flight
    engine.terminate()  # then ends the engine, which ends its workers
    engine.wait()
