"""The `command` kind: any server, as an argv with placeholders."""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Mapping
from typing import Any, ClassVar

from modelctl.backends.base import Backend, ClusterContainer, Launch
from modelctl.spec import HealthSpec, Key, KeyProblem, ServerSpec, check_bool, check_choice, check_str, check_str_list, required

PLACEHOLDERS = ("port", "host", "gpus", "model", "name", "fd")


def placeholders_in(argv: list[str], key: str = "command") -> set[str]:
    """The placeholders argv uses; KeyProblem for unknown ones or bad braces."""
    used: set[str] = set()
    for arg in argv:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
        except ValueError as e:
            raise KeyProblem(key, f"{arg!r}: {e} (write literal braces as {{{{ and }}}})") from None
        for f in fields:
            if f not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                raise KeyProblem(key, f"unknown placeholder {{{f}}} in {arg!r}; known: {known}")
            used.add(f)
    return used


def fill_placeholders(argv: list[str], spec: ServerSpec, port: int | None, gpus: list[int]) -> list[str]:
    values = {
        "port": str(port),
        "host": spec.host,
        "gpus": ",".join(map(str, gpus)),
        "model": str(spec.options.get("model") or ""),
        "name": spec.name,
        "fd": "3",  # SD_LISTEN_FDS_START: where an inherited socket is (socket: inherit)
    }
    return [arg.format_map(values) for arg in argv]


class CommandBackend(Backend):
    kind = "command"
    summary = "any server, as an argv with {port} {host} {gpus} {model} {name} placeholders"
    startup_timeout = 60.0
    cluster_port = 8080
    keys: ClassVar[dict[str, Key]] = {
        "command": required(check_str_list, "argv list with {port} {host} {gpus} {model} {name} placeholders"),
        "model": Key(check_str, None, "value of the {model} placeholder"),
        "cwd": Key(check_str, None, "working directory"),
        "port_env": Key(check_str, None, "environment variable the server reads its port from (e.g. PORT), for argvs without {port}"),
        "notify": Key(check_bool, False, "the server says READY=1 on $NOTIFY_SOCKET once it serves (with socket: inherit)"),
        "model_name": Key(check_str, None, "the model name the server answers to, for the gateway (default: the server name)"),
        "task": Key(check_choice("chat", "embedding", "rerank"), "chat", "what the gateway routes to it: chat, embedding or rerank"),
    }

    def default_health(self, options: Mapping[str, Any]) -> HealthSpec:
        return HealthSpec(kind="tcp")

    def validate(self, options: dict[str, Any], common: Mapping[str, Any]) -> None:
        argv = options["command"]
        if not argv:
            raise KeyProblem("command", "must not be empty")
        used = placeholders_in(argv)
        fixed = common.get("port")
        literal = fixed is not None and any(str(fixed) in arg for arg in argv)
        inherits = common.get("socket") == "inherit"
        if "fd" in used and not inherits:
            raise KeyProblem("command", "uses {fd} (an inherited socket) but the server has no socket: inherit")
        if options.get("notify") and not inherits:
            raise KeyProblem("notify", "READY=1 is read from servers that take their socket from modelctl: add socket: inherit")
        if "port" not in used and not options.get("port_env") and not literal and not inherits:
            # the server would listen somewhere else than where modelctl probes and clients call
            raise KeyProblem(
                "command",
                "never uses {port}: add it to the argv (--port {port}), or set port_env: NAME for a server "
                "that reads its port from the environment, or give a fixed port: that the argv already uses",
            )

    def cluster(self, spec: ServerSpec, port: int, default_image: str) -> ClusterContainer:
        image = spec.k8s.get("image")
        if not image:
            raise KeyProblem("k8s.image", "required on Kubernetes for kind 'command': the image that has the program to run")
        cluster_spec = dataclasses.replace(spec, host="0.0.0.0")
        argv_template = spec.k8s.get("command") or spec.options["command"]
        placeholders_in(argv_template, "k8s.command")
        # the device plugin makes the pod's GPUs 0..N-1
        argv = fill_placeholders(argv_template, cluster_spec, port, list(range(spec.gpu_count)))
        env = {spec.options["port_env"]: str(port)} if spec.options.get("port_env") else {}
        return ClusterContainer(image=image, command=argv, args=[], env=env, cache_path="/cache", working_dir=spec.options.get("cwd"))

    def socket_support(self, options: Mapping[str, Any]) -> str | None:
        return None  # any server that reads LISTEN_FDS (gunicorn, uvicorn --fd 3, ...), when the profile says so

    def says_ready(self, options: Mapping[str, Any]) -> bool:
        return bool(options.get("notify"))

    def launch(self, spec: ServerSpec, port: int | None, gpus: list[int], socket: bool = False) -> Launch:
        env = {spec.options["port_env"]: str(port)} if spec.options.get("port_env") else {}
        return Launch(argv=fill_placeholders(spec.options["command"], spec, port, gpus), env=env, cwd=spec.options.get("cwd"))
