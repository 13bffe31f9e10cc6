"""A stand-in for an LLM server's OpenAI chat API: it "generates" N tokens at a fixed rate.

    chat_stream_server.py --port P [--model NAME] [--tokens N] [--interval S] [--load S] [--head-delay S]

POST /v1/chat/completions and /v1/completions: `stream: true` → SSE, one `data:` chunk per token
every --interval seconds, then `data: [DONE]`; else one JSON answer after the same time. A body's
`max_tokens` overrides --tokens. Each chunk carries `sent_at` (time.time() when written), so a
client on the same machine can tell how long a chunk took to reach it. A request naming another
model than --model gets vLLM's 404. GET /v1/models, /health; GET /stats → {"completed",
"cancelled", "open"}: streams that ended because their client left are counted as cancelled.

With LISTEN_FDS (a socket held by modelctl) it serves from fd 3, accepts nothing before --load
seconds have passed, and says READY=1 on $NOTIFY_SOCKET; on SIGTERM it stops accepting and lets
open streams finish.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from servers.activation import inherited_socket, notify


def make_app(a: argparse.Namespace) -> web.Application:
    stats = {"completed": 0, "cancelled": 0, "open": 0}

    def check(body: dict) -> web.Response | None:
        if body.get("model") != a.model:
            error = {"message": f"The model `{body.get('model')}` does not exist.", "type": "NotFoundError", "param": None, "code": 404}
            return web.json_response({"error": error}, status=404)
        return None

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        refused = check(body)
        if refused is not None:
            return refused
        tokens = int(body.get("max_tokens") or a.tokens)
        chat = request.path.endswith("/chat/completions")
        rid = f"cmpl-{time.monotonic_ns()}"
        if not body.get("stream"):
            await asyncio.sleep(a.interval * tokens)
            text = " ".join(f"t{i}" for i in range(tokens))
            choice = {"index": 0, "finish_reason": "length"}
            choice |= {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
            stats["completed"] += 1
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": a.model,
                    "choices": [choice],
                    "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1},
                }
            )
        await asyncio.sleep(a.head_delay)  # a server that takes its time to begin (a long prompt, a wake)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        stats["open"] += 1
        try:
            for i in range(tokens):
                await asyncio.sleep(a.interval)
                delta = {"delta": {"content": f"t{i} "}} if chat else {"text": f"t{i} "}
                chunk = {
                    "id": rid,
                    "object": "chat.completion.chunk" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": a.model,
                    "choices": [{"index": 0, "finish_reason": None, **delta}],
                    "sent_at": time.time(),
                }
                await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            stats["completed"] += 1
        except (asyncio.CancelledError, ConnectionResetError):
            stats["cancelled"] += 1
            raise
        finally:
            stats["open"] -= 1
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": a.model, "object": "model", "created": 0, "owned_by": "stand-in"}]})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def get_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    app = web.Application()
    app.add_routes(
        [
            web.post("/v1/chat/completions", chat),
            web.post("/v1/completions", chat),
            web.get("/v1/models", models),
            web.get("/health", health),
            web.get("/stats", get_stats),
        ]
    )
    return app


async def serve(a: argparse.Namespace) -> None:
    runner = web.AppRunner(make_app(a), handler_cancellation=True, access_log=None, shutdown_timeout=30)
    await runner.setup()
    sock = inherited_socket()
    if sock is not None:
        await asyncio.sleep(a.load)  # "loading the model": connections wait in the backlog
        site: web.BaseSite = web.SockSite(runner, sock, backlog=4096)
    else:
        site = web.TCPSite(runner, a.host, a.port, backlog=4096)
    await site.start()
    notify("READY=1")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="stand-in")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--load", type=float, default=0.0)
    p.add_argument("--head-delay", type=float, default=0.0, help="seconds before a stream's answer head")
    asyncio.run(serve(p.parse_args()))


if __name__ == "__main__":
    main()
