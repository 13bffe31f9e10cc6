"""A stand-in for the Ollama server, faithful to its HTTP protocol, for tests.

    fake_ollama.py serve          (like `ollama serve`: OLLAMA_HOST=host:port, OLLAMA_MODELS=dir)

Endpoints as Ollama has them: GET / and /api/version; GET /api/tags; POST /api/show (404 with
{"error"} for a missing model, `model_info` always present); POST /api/pull streaming NDJSON
progress, with errors as an {"error"} line inside a 200 stream, resumable; HEAD and POST
/api/blobs/:digest (the digest is checked, chunked uploads accepted, 201 Created); POST
/api/create with `files` (GGUF magic and Safetensors architecture checked); POST /api/generate
with no prompt loads a model; POST /api/chat (NDJSON, a line per word) and /api/embed; GET
/api/ps; DELETE /api/delete.

State (models, blobs, partial pulls) lives in OLLAMA_MODELS and survives restarts, as Ollama's
does. Test knobs: FAKE_OLLAMA_REGISTRY (a JSON file: name → {"size": bytes}),
FAKE_OLLAMA_FAIL_PULL_AT (break the first pull's stream after this many bytes),
FAKE_OLLAMA_LOG (each request appended as a JSON line), FAKE_OLLAMA_STARTUP_DELAY (seconds).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from aiohttp import web

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GemmaForCausalLM"}


def normalize(name: str) -> str:
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


class Store:
    def __init__(self, root: Path):
        self.root = root
        self.blobs = root / "blobs"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.models_file = root / "fake-models.json"
        self.partial_file = root / "fake-partial.json"

    def _read(self, path: Path) -> dict:
        return json.loads(path.read_text()) if path.exists() else {}

    def models(self) -> dict:
        return self._read(self.models_file)

    def save_model(self, name: str, entry: dict) -> None:
        models = self.models()
        models[name] = entry
        self.models_file.write_text(json.dumps(models))

    def delete_model(self, name: str) -> bool:
        models = self.models()
        found = models.pop(name, None) is not None
        self.models_file.write_text(json.dumps(models))
        return found

    def partial(self) -> dict:
        return self._read(self.partial_file)

    def save_partial(self, data: dict) -> None:
        self.partial_file.write_text(json.dumps(data))

    def blob_path(self, digest: str) -> Path:
        return self.blobs / digest.replace(":", "-")


def make_app() -> web.Application:
    models_dir = Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")
    store = Store(models_dir)
    registry_file = os.environ.get("FAKE_OLLAMA_REGISTRY")
    registry = json.loads(Path(registry_file).read_text()) if registry_file else {}
    fail_at = int(os.environ.get("FAKE_OLLAMA_FAIL_PULL_AT", "0") or 0)
    log_file = os.environ.get("FAKE_OLLAMA_LOG")
    loaded: dict[str, float] = {}
    failed_once: set[str] = set()

    def record(request: web.Request, **extra) -> None:
        if log_file:
            with open(log_file, "a") as f:
                f.write(json.dumps({"method": request.method, "path": request.path, "pid": os.getpid(), **extra}) + "\n")

    def error(status: int, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status)

    async def root(request):
        record(request)
        return web.Response(text="Ollama is running")

    async def version(request):
        record(request)
        return web.json_response({"version": "0.6.0-fake"})

    async def tags(request):
        record(request)
        out = []
        for name, m in store.models().items():
            out.append(
                {
                    "name": name,
                    "model": name,
                    "modified_at": m["modified_at"],
                    "size": m["size"],
                    "digest": m["digest"],
                    "details": m["details"],
                }
            )
        return web.json_response({"models": out})

    async def read_json(request) -> dict | web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "invalid JSON")
        if not isinstance(body, dict):
            return error(400, "invalid request")
        return body

    async def show(request):
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        name = normalize(body.get("model") or body.get("name") or "")
        record(request, model=name)
        m = store.models().get(name)
        if m is None:
            return error(404, f"model '{name}' not found")
        return web.json_response({
            "modelfile": f"FROM {name}\n", "parameters": "", "template": "{{ .Prompt }}",
            "details": m["details"], "model_info": {"general.architecture": m["details"]["family"], "general.parameter_count": m["size"] // 2},
            "capabilities": ["completion"], "modified_at": m["modified_at"],
        })  # fmt: skip

    def new_model(name: str, size: int, family: str, fmt: str) -> dict:
        digest = "sha256:" + hashlib.sha256(f"{name}:{size}:{family}".encode()).hexdigest()
        return {"size": size, "digest": digest, "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "details": {"format": fmt, "family": family, "parameter_size": "1M", "quantization_level": "Q4_K_M"}}  # fmt: skip

    async def stream_lines(request, lines_fn):
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        async for line in lines_fn():
            if line is None:  # break the connection mid-stream, as a dropped download would
                request.transport.close()
                return resp
            await resp.write((json.dumps(line) + "\n").encode())
        await resp.write_eof()
        return resp

    async def pull(request):
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        name = normalize(body.get("model") or body.get("name") or "")
        stream = body.get("stream", True)
        partial = store.partial()
        record(request, model=name, resume_from=partial.get(name, 0))

        async def lines():
            yield {"status": "pulling manifest"}
            if name not in registry:
                yield {"error": "pull model manifest: file does not exist"}
                return
            size = int(registry[name]["size"])
            digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
            done = store.partial().get(name, 0)  # resume where an earlier pull stopped
            step = max(size // 10, 1)
            while done < size:
                if fail_at and name not in failed_once and done >= fail_at:
                    failed_once.add(name)
                    yield None
                    return
                done = min(done + step, size)
                p = store.partial()
                p[name] = done
                store.save_partial(p)
                yield {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size, "completed": done}
                await asyncio.sleep(float(os.environ.get("FAKE_OLLAMA_PULL_DELAY", "0.01")))
            yield {"status": "verifying sha256 digest"}
            yield {"status": "writing manifest"}
            store.save_model(name, new_model(name, size, "llama", "gguf"))
            p = store.partial()
            p.pop(name, None)
            store.save_partial(p)
            yield {"status": "success"}

        if not stream:
            last = {}
            async for line in lines():
                if line is None:
                    return error(500, "connection reset")
                last = line
                if "error" in line:
                    return error(500, line["error"])
            return web.json_response(last)
        return await stream_lines(request, lines)

    async def blob_head(request):
        digest = request.match_info["digest"]
        record(request, digest=digest)
        return web.Response(status=200 if store.blob_path(digest).exists() else 404)

    async def blob_post(request):
        digest = request.match_info["digest"]
        h = hashlib.sha256()
        tmp = store.blob_path(digest).with_suffix(".partial")
        size = 0
        with open(tmp, "wb") as f:
            async for chunk in request.content.iter_chunked(1 << 16):
                h.update(chunk)
                f.write(chunk)
                size += len(chunk)
        record(request, digest=digest, bytes=size, chunked=request.headers.get("Transfer-Encoding") == "chunked")
        got = "sha256:" + h.hexdigest()
        if got != digest:
            tmp.unlink()
            return error(400, f'digest mismatch, expected "{digest}", got "{got}"')
        tmp.rename(store.blob_path(digest))
        return web.Response(status=201)

    async def create(request):
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        name = normalize(body.get("model") or "")
        files = body.get("files") or {}
        record(request, model=name, files=files, has_modelfile="modelfile" in body)
        if "modelfile" in body:
            return error(400, "the modelfile field is no longer supported; use files")
        if not files and not body.get("from"):
            return error(400, "neither 'from' or 'files' was specified")
        for fname, digest in files.items():
            if not store.blob_path(digest).exists():
                return error(400, f"blob {digest} for {fname} not found; upload it first")

        async def lines():
            yield {"status": "parsing model files"}
            ggufs = [f for f in files if f.endswith(".gguf")]
            if ggufs:
                head = store.blob_path(files[ggufs[0]]).read_bytes()[:4]
                if head != b"GGUF":
                    yield {"error": "invalid file magic"}
                    return
                family, fmt = "llama", "gguf"
            else:
                if "config.json" not in files:
                    yield {"error": "no config.json found among the safetensors files"}
                    return
                config = json.loads(store.blob_path(files["config.json"]).read_text())
                arch = (config.get("architectures") or ["?"])[0]
                if arch not in SUPPORTED_ARCHITECTURES:
                    yield {"error": f'unsupported architecture "{arch}"'}
                    return
                yield {"status": "converting model"}
                family, fmt = arch.removesuffix("ForCausalLM").lower(), "safetensors"
            size = sum(store.blob_path(d).stat().st_size for d in files.values())
            yield {"status": "writing manifest"}
            store.save_model(name, new_model(name, size, family, fmt))
            yield {"status": "success"}

        return await stream_lines(request, lines)

    async def generate(request):
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        name = normalize(body.get("model") or "")
        record(request, model=name, prompt=body.get("prompt"), keep_alive=body.get("keep_alive"))
        if name not in store.models():
            return error(404, f"model '{name}' not found")
        loaded[name] = time.time()
        if not body.get("prompt"):
            return web.json_response(
                {"model": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"), "response": "", "done": True, "done_reason": "load"}
            )
        return web.json_response({"model": name, "response": "fake answer", "done": True, "done_reason": "stop"})

    async def chat(request):
        """Ollama's chat: NDJSON, one line per word, unless `stream` is false."""
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        name = normalize(body.get("model") or "")
        record(request, model=name)
        if name not in store.models():
            return error(404, f"model '{name}' not found")
        loaded[name] = time.time()
        words = ["fake", "answer"]
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ")
        if body.get("stream") is False:
            message = {"role": "assistant", "content": " ".join(words)}
            return web.json_response({"model": name, "created_at": now, "message": message, "done": True, "done_reason": "stop"})
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for word in words:
            line = {"model": name, "created_at": now, "message": {"role": "assistant", "content": word + " "}, "done": False}
            await response.write(json.dumps(line).encode() + b"\n")
        await response.write(
            json.dumps({"model": name, "created_at": now, "message": {"role": "assistant", "content": ""}, "done": True}).encode() + b"\n"
        )
        await response.write_eof()
        return response

    async def embed(request):
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        name = normalize(body.get("model") or "")
        record(request, model=name)
        if name not in store.models():
            return error(404, f"model '{name}' not found")
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs or []
        vectors = [[float(len(text)), 1.0, 0.0] for text in inputs]
        return web.json_response({"model": name, "embeddings": vectors})

    async def ps(request):
        record(request)
        models = store.models()
        return web.json_response(
            {
                "models": [
                    {"name": n, "model": n, "size": models[n]["size"], "digest": models[n]["digest"], "size_vram": 0}
                    for n in loaded
                    if n in models
                ]
            }
        )

    async def delete(request):
        body = await read_json(request)
        if isinstance(body, web.Response):
            return body
        name = normalize(body.get("model") or "")
        record(request, model=name)
        return web.Response(status=200) if store.delete_model(name) else error(404, f"model '{name}' not found")

    app = web.Application(client_max_size=1 << 30)
    app.add_routes([
        web.get("/", root), web.get("/api/version", version), web.get("/api/tags", tags),
        web.post("/api/show", show), web.post("/api/pull", pull), web.head("/api/blobs/{digest}", blob_head),
        web.post("/api/blobs/{digest}", blob_post), web.post("/api/create", create), web.post("/api/generate", generate),
        web.get("/api/ps", ps), web.delete("/api/delete", delete), web.post("/api/chat", chat), web.post("/api/embed", embed),
    ])  # fmt: skip
    return app


def main() -> None:
    if sys.argv[1:] != ["serve"]:
        print("usage: fake_ollama.py serve", file=sys.stderr)
        sys.exit(2)
    host, _, port = (os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434").rpartition(":")
    time.sleep(float(os.environ.get("FAKE_OLLAMA_STARTUP_DELAY", "0")))
    print(f"fake ollama pid {os.getpid()} listening on {host}:{port}", flush=True)
    web.run_app(make_app(), host=host or "127.0.0.1", port=int(port), print=None, access_log=None)


if __name__ == "__main__":
    main()
