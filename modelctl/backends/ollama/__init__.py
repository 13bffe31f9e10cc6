"""The `ollama` kind: a model made present in an Ollama server (managed or external).

The model handling (list, import, pull) is in models.py; it imports the `ollama` client only
when a server is prepared, so importing this module stays cheap.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any, ClassVar

from modelctl.backends.base import Backend, ClusterContainer, Launch, ProgressReport
from modelctl.backends.ollama.models import ensure_model, model_present, normalize_model_name
from modelctl.spec import HealthSpec, Key, KeyProblem, ServerSpec, check_bool, check_choice, check_str, describe, required

OFFICIAL_IMAGE = "ollama/ollama:latest"  # pin a version with k8s: {image: ollama/ollama:X.Y.Z}


def check_keep_alive(value: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"must be a duration like 5m or a number of seconds, got {describe(value)}")
    if isinstance(value, str):
        check_str(value)
    return value


class OllamaBackend(Backend):
    kind = "ollama"
    summary = "a model made present in an Ollama server: listed, else imported from model_path, else pulled"
    startup_timeout = 600.0  # a pull can take a while
    cluster_port = 11434
    keys: ClassVar[dict[str, Key]] = {
        "model": required(check_str, "model name, e.g. qwen2.5:0.5b"),
        "model_path": Key(check_str, None, "a .gguf file or a Safetensors directory to import"),
        "executable": Key(check_str, "ollama", "the ollama binary for a managed server"),
        "models_dir": Key(check_str, None, "OLLAMA_MODELS of a managed server"),
        "keep_alive": Key(check_keep_alive, None, "how long the model stays loaded (5m, -1, 0)"),
        "preload": Key(check_bool, False, "load the model into memory once ready"),
        "task": Key(check_choice("chat", "embedding"), "chat", "what the gateway routes to it on OpenAI's routes: chat or embedding"),
    }

    def default_health(self, options: Mapping[str, Any]) -> HealthSpec:
        return HealthSpec(kind="http", path="/api/version")

    def validate(self, options: dict[str, Any], common: Mapping[str, Any]) -> None:
        host = common.get("host") or ""
        options["external"] = "://" in host
        if options["external"] and common.get("port") is not None:
            raise KeyProblem("port", "an external Ollama (host: URL) has its port in the URL")

    def is_external(self, spec: ServerSpec) -> bool:
        return bool(spec.options["external"])

    def socket_support(self, options: Mapping[str, Any]) -> str | None:
        return "`ollama serve` binds OLLAMA_HOST itself and cannot take a socket from modelctl"

    def launch(self, spec: ServerSpec, port: int | None, gpus: list[int], socket: bool = False) -> Launch | None:
        if self.is_external(spec):
            return None
        o = spec.options
        env = {"OLLAMA_HOST": f"{spec.host}:{port}"}
        if o.get("models_dir"):
            env["OLLAMA_MODELS"] = o["models_dir"]
        if o.get("keep_alive") is not None:
            env["OLLAMA_KEEP_ALIVE"] = str(o["keep_alive"])
        return Launch(argv=[o["executable"], "serve"], env=env)

    def cluster(self, spec: ServerSpec, port: int, default_image: str) -> ClusterContainer | None:
        """The official image; an init container makes the model present in the shared volume
        first (pull, or import from a mounted file), so the probes never race the download."""
        if self.is_external(spec):
            return None
        o = spec.options
        name = shlex.quote(normalize_model_name(o["model"]))
        if o.get("model_path"):
            fetch = f"{{ printf 'FROM %s\\n' {shlex.quote(o['model_path'])} > /tmp/Modelfile && ollama create {name} -f /tmp/Modelfile; }}"
        else:
            fetch = f"ollama pull {name}"
        script = "\n".join(
            [
                "set -e",
                "OLLAMA_HOST=127.0.0.1:11434 ollama serve & server=$!",
                "export OLLAMA_HOST=127.0.0.1:11434",
                "until ollama list >/dev/null 2>&1; do sleep 1; done",
                f"ollama show {name} >/dev/null 2>&1 || {fetch}",
                "kill $server; wait $server || true",
            ]
        )
        env = {"OLLAMA_HOST": f"0.0.0.0:{port}"}
        if o.get("keep_alive") is not None:
            env["OLLAMA_KEEP_ALIVE"] = str(o["keep_alive"])
        return ClusterContainer(
            image=spec.k8s.get("image") or OFFICIAL_IMAGE,
            args=["serve"],
            env=env,
            cache_path="/root/.ollama",
            downloads=True,
            init_script=script,
        )

    def base_url(self, spec: ServerSpec, port: int | None) -> str:
        if self.is_external(spec):
            return spec.host.rstrip("/")
        return super().base_url(spec, port)

    def prepare(self, spec: ServerSpec, base_url: str, report: ProgressReport) -> dict[str, Any]:
        return ensure_model(spec, base_url, report)

    def is_ready(self, spec: ServerSpec, base_url: str) -> tuple[bool, str]:
        return model_present(spec, base_url)

    def model_label(self, spec: ServerSpec) -> str:
        return normalize_model_name(spec.options["model"])
