"""Make a model present in an Ollama server: listed → use it; model_path → import; else pull.

Uses the official `ollama` client. Errors, whether an HTTP error or an {"error"} line inside a
200 stream, become one `OllamaError` whose message says what failed and where.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modelctl.spec import ServerSpec

log = logging.getLogger("modelctl.ollama")

PULL_ATTEMPTS = 3  # Ollama resumes a pull where it stopped, so a retry continues the download
SAFETENSORS_FILES = (".safetensors", ".json", ".model", ".txt", ".tiktoken", ".jinja")

Report = Callable[[dict[str, Any]], None]


def normalize_model_name(name: str) -> str:
    """Ollama's own rule: a name without a tag means `:latest`."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


class OllamaError(RuntimeError):
    pass


def _client(base_url: str, timeout: float | None = None) -> Any:
    import ollama

    return ollama.Client(host=base_url, timeout=timeout)


def _explain(e: Exception, what: str, base_url: str) -> OllamaError:
    import ollama

    if isinstance(e, ollama.ResponseError):
        hint = ""
        text = str(e.error)
        if "file does not exist" in text or "not found" in text:
            hint = " (is the model name right? it is not in the registry)"
        elif "digest mismatch" in text:
            hint = " (the upload was corrupted; it will be retried)"
        elif "unsupported architecture" in text:
            hint = " (Ollama cannot import this model's architecture)"
        return OllamaError(f"{what}: {text}{hint}")
    if isinstance(e, ConnectionError) or type(e).__name__ in ("ConnectError", "ConnectTimeout", "ReadError", "RemoteProtocolError"):
        return OllamaError(f"{what}: Ollama is not reachable at {base_url} ({type(e).__name__})")
    return OllamaError(f"{what}: {type(e).__name__}: {e}")


def list_models(base_url: str) -> list[str]:
    try:
        return [normalize_model_name(m.model or "") for m in _client(base_url, timeout=10).list().models]
    except Exception as e:
        raise _explain(e, "listing models", base_url) from None


def model_present(spec: ServerSpec, base_url: str) -> tuple[bool, str]:
    name = normalize_model_name(spec.options["model"])
    try:
        names = list_models(base_url)
    except OllamaError as e:
        return False, str(e)
    return (True, "") if name in names else (False, f"model {name} is no longer in the server's list")


def ensure_model(spec: ServerSpec, base_url: str, report: Report) -> dict[str, Any]:
    """Make the spec's model present (and loaded, with preload); return facts for status."""
    o = spec.options
    name = normalize_model_name(o["model"])
    client = _client(base_url)
    if name in list_models(base_url):
        action = "present"
        log.info("%s: model %s is present", spec.name, name)
    elif o.get("model_path"):
        import_model(client, name, Path(o["model_path"]), base_url, report)
        action = "imported"
    else:
        pull_model(client, name, base_url, report)
        action = "pulled"
    if o.get("preload"):
        report({"status": f"loading {name}"})
        try:
            client.generate(model=name, keep_alive=o.get("keep_alive"))
        except Exception as e:
            raise _explain(e, f"loading {name}", base_url) from None
    info: dict[str, Any] = {"model": name, "action": action, "ollama_url": base_url}
    try:
        details = client.show(name).details
        if details is not None:
            info.update({k: v for k, v in {"family": details.family, "parameter_size": details.parameter_size,
                                           "quantization": details.quantization_level}.items() if v})  # fmt: skip
    except Exception as e:
        raise _explain(e, f"showing {name}", base_url) from None
    return info


def pull_model(client: Any, name: str, base_url: str, report: Report) -> None:
    """Pull with progress (bytes summed over layers); retried, and Ollama resumes the download."""
    last: OllamaError | None = None
    for attempt in range(1, PULL_ATTEMPTS + 1):
        layers: dict[str, tuple[int, int]] = {}
        try:
            for part in client.pull(name, stream=True):
                if part.digest and part.total:
                    layers[part.digest] = (part.completed or 0, part.total)
                done = sum(c for c, _ in layers.values())
                total = sum(t for _, t in layers.values())
                report({"status": f"pulling {name}", "completed": done, "total": total or None, "detail": part.status})
            return
        except Exception as e:
            last = _explain(e, f"pulling {name}", base_url)
            import ollama

            if isinstance(e, ollama.ResponseError) and e.status_code in (-1, 400, 404):
                raise last from None  # an error line from the server: retrying will not help
            log.warning("%s (attempt %d/%d)", last, attempt, PULL_ATTEMPTS)
            time.sleep(min(2 ** (attempt - 1), 5))
    assert last is not None
    raise last


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def upload_blob(client: Any, path: Path, base_url: str) -> tuple[str, bool]:
    """Upload one file as a blob unless the server has it; returns (digest, uploaded)."""
    import httpx

    digest = _digest(path)
    head = httpx.head(f"{base_url.rstrip('/')}/api/blobs/{digest}", timeout=30)
    if head.status_code == 200:
        return digest, False
    try:
        got = client.create_blob(path)
    except Exception as e:
        raise _explain(e, f"uploading {path.name}", base_url) from None
    if got != digest:
        raise OllamaError(f"uploading {path.name}: digest mismatch ({got} != {digest}); the file changed while uploading")
    return digest, True


def import_model(client: Any, name: str, path: Path, base_url: str, report: Report) -> None:
    """Import a .gguf file or a Safetensors directory: blobs first, then create(files=...)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(SAFETENSORS_FILES))
        if not any(p.name.endswith(".safetensors") for p in files):
            raise OllamaError(f"model_path {path}: no .safetensors files in this directory")
    elif path.is_file():
        if path.suffix.lower() != ".gguf":
            raise OllamaError(f"model_path {path}: expected a .gguf file or a Safetensors directory")
        files = [path]
    else:
        raise OllamaError(f"model_path {path}: no such file or directory")
    total = sum(p.stat().st_size for p in files)
    done = 0
    mapping: dict[str, str] = {}
    for p in files:
        report({"status": f"uploading {p.name}", "completed": done, "total": total})
        digest, _ = upload_blob(client, p, base_url)
        mapping[p.name] = digest
        done += p.stat().st_size
    report({"status": f"creating {name}", "completed": total, "total": total})
    try:
        for part in client.create(model=name, files=mapping, stream=True):
            report({"status": f"creating {name}: {part.status}", "completed": total, "total": total})
    except Exception as e:
        raise _explain(e, f"creating {name} from {path}", base_url) from None
