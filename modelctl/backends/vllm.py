"""The `vllm` kind: vLLM's OpenAI-compatible server."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from modelctl import launchers
from modelctl.backends.base import Backend, ClusterContainer, Launch
from modelctl.spec import Key, KeyProblem, ServerSpec, check_choice, check_count, check_str, check_str_list, required

OFFICIAL_IMAGE = "vllm/vllm-openai:latest"  # pin a version with k8s: {image: vllm/vllm-openai:vX.Y.Z}
# flags modelctl sets itself, from the profile's keys
MANAGED_FLAGS = {"--host", "--port", "--served-model-name", "--tensor-parallel-size", "-tp", "--model"}


class VllmBackend(Backend):
    kind = "vllm"
    summary = "vLLM's OpenAI-compatible server, tensor parallel over the server's GPUs"
    startup_timeout = 900.0  # big models take minutes to load and compile
    cluster_port = 8000
    keys: ClassVar[dict[str, Key]] = {
        "model": required(check_str, "model path or hub name"),
        "served_model_name": Key(check_str, None, "name clients use (default: the server name)"),
        "python": Key(check_str, "python3", "interpreter of the environment vLLM is installed in"),
        "executable": Key(check_str, None, "a `vllm` executable to run as `vllm serve` instead of python -m"),
        "tensor_parallel_size": Key(check_count, None, "default: the number of GPUs"),
        "args": Key(check_str_list, None, "extra vLLM flags, passed through unchanged"),
        "task": Key(check_choice("chat", "embedding", "rerank"), "chat", "what the gateway routes to it (give vLLM's own flags in args)"),
    }

    def validate(self, options: dict[str, Any], common: Mapping[str, Any]) -> None:
        for arg in options.get("args") or []:
            if arg.split("=", 1)[0] in MANAGED_FLAGS:
                raise KeyProblem(
                    "args",
                    f"{arg!r} is set by modelctl; use the profile keys (port, host, served_model_name, gpus, tensor_parallel_size, model)",
                )

    def served_name(self, spec: ServerSpec) -> str:
        return str(spec.options.get("served_model_name") or spec.name)

    def tensor_parallel(self, spec: ServerSpec, gpus: int) -> int:
        return int(spec.options.get("tensor_parallel_size") or gpus)

    def cluster(self, spec: ServerSpec, port: int, default_image: str) -> ClusterContainer:
        """vLLM's official image, run as the production-stack chart runs it: `vllm serve MODEL`."""
        o = spec.options
        args = [o["model"], "--host", "0.0.0.0", "--port", str(port), "--served-model-name", self.served_name(spec)]
        tp = self.tensor_parallel(spec, spec.gpu_count)
        if tp:
            args += ["--tensor-parallel-size", str(tp)]
        return ClusterContainer(
            image=spec.k8s.get("image") or OFFICIAL_IMAGE,
            command=["vllm", "serve"],
            args=args + list(o.get("args") or []),
            cache_path="/root/.cache/huggingface",
            downloads=True,
            shm=tp > 1,
        )

    def socket_support(self, options: Mapping[str, Any]) -> str | None:
        if options.get("executable"):
            return "`vllm serve` (executable:) is run as it is; give python: instead, whose launcher hands vLLM the socket"
        return None

    def socket_by_default(self, options: Mapping[str, Any]) -> bool:
        return True

    def says_ready(self, options: Mapping[str, Any]) -> bool:
        return True  # the launcher says READY=1 once uvicorn serves

    def stops_leader_first(self, spec: ServerSpec) -> bool:
        # its engine core would die at once under a group SIGTERM, failing the requests the API
        # server was draining: the API server ends it itself (stop_timeout still bounds the stop)
        return spec.socket

    def overlaps_by_default(self, options: Mapping[str, Any]) -> bool:
        return False  # two engines rarely fit (GPU memory, or every core of a CPU): replace: overlap where they do

    def launch(self, spec: ServerSpec, port: int | None, gpus: list[int], socket: bool = False) -> Launch:
        o = spec.options
        if o.get("executable"):
            argv = [o["executable"], "serve", o["model"]]
        elif socket:
            # modelctl's launcher, run by vLLM's interpreter: vLLM serves on the inherited socket
            argv = [o["python"], str(Path(launchers.__file__).parent / "vllm_socket.py"), "--model", o["model"]]
        else:
            argv = [o["python"], "-m", "vllm.entrypoints.openai.api_server", "--model", o["model"]]
        argv += ["--host", spec.host, "--port", str(port), "--served-model-name", self.served_name(spec)]
        tp = self.tensor_parallel(spec, len(gpus))
        if tp:
            argv += ["--tensor-parallel-size", str(tp)]
        argv += o.get("args") or []
        # on a held socket the launcher lets in-flight requests finish when it is stopped (vLLM's
        # --shutdown-timeout, where this vLLM has it), within the stop timeout, before SIGKILL
        env = {"MODELCTL_DRAIN_SECONDS": str(max(1, int(spec.stop_timeout * 0.8)))} if socket else {}
        return Launch(argv=argv, env=env)
