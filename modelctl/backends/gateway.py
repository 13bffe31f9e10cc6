"""The `gateway` kind: the optional one-URL gateway in `servers/gateway`, routing requests by
`model` to each server's own port.

A profile's `gateway:` key becomes a server of this kind, named `gateway`, so it is supervised,
restarted on its held socket, shown by `status`, stopped by `down` and written into systemd
units like every other server. It finds the servers in the records of the state directory
(`MODELCTL_STATE_DIR`, which the supervisor gives every server).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any, ClassVar

from modelctl.backends.base import Backend, ClusterContainer, Launch
from modelctl.backends.sentence import servers_root
from modelctl.served_names import TASKS
from modelctl.spec import Key, ServerSpec, check_choice, check_seconds, check_size, check_str, describe

NAME = "gateway"  # the server a profile's `gateway:` key becomes


def check_defaults(value: Any) -> dict[str, str]:
    """task → model name: which server TEI's routes (whose bodies name no model) reach."""
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping of task → model name ({', '.join(TASKS)}), got {describe(value)}")
    out = {}
    for task, name in value.items():
        if task not in TASKS:
            raise ValueError(f"{describe(task)} is not a task; tasks: {', '.join(TASKS)}")
        out[str(task)] = check_str(name)
    return out


# gateway key → its flag
FLAGS = {
    "max_body_bytes": "--max-body-bytes",
    "read_timeout": "--read-timeout",
    "header_timeout": "--header-timeout",
    "body_timeout": "--body-timeout",
    "keepalive_interval": "--keepalive-interval",
}


class GatewayBackend(Backend):
    kind = "gateway"
    summary = "the optional one-URL gateway: routes requests by model to every server's own port"
    startup_timeout = 60.0
    keys: ClassVar[dict[str, Key]] = {
        "scope": Key(
            check_choice("profile", "all"), "profile", "profile: this profile's servers; all: every profile in the state directory"
        ),
        "api_key": Key(check_str, None, "clients send this Bearer token; servers with a key of their own then get theirs"),
        "defaults": Key(check_defaults, None, "task → model name for TEI's /embed and /rerank, whose bodies name no model"),
        "max_body_bytes": Key(check_size, None, "largest request body (default 64MB)"),
        "read_timeout": Key(check_seconds, None, "seconds a server may stay silent before 504 (default 600, a model load included)"),
        "header_timeout": Key(check_seconds, None, "seconds a client has to send a request head (default 15)"),
        "body_timeout": Key(check_seconds, None, "seconds a client has to send a request body (default 60)"),
        "keepalive_interval": Key(check_seconds, None, "seconds between SSE comments to a stream waiting for a waking server"),
        "python": Key(check_str, None, "interpreter that runs the gateway (default: modelctl's own)"),
    }

    def socket_support(self, options: Mapping[str, Any]) -> str | None:
        return None

    def socket_by_default(self, options: Mapping[str, Any]) -> bool:
        return True

    def says_ready(self, options: Mapping[str, Any]) -> bool:
        return True

    def gateway_args(self, spec: ServerSpec, port: int | None) -> list[str]:
        o = spec.options
        args = ["--host", spec.host, "--port", str(port), "--home", spec.profile, "--drain-timeout", f"{max(spec.stop_timeout - 1, 1):g}"]
        if o["scope"] == "profile":
            args += ["--profile", spec.profile]
        for task, name in (o.get("defaults") or {}).items():
            args += ["--default", f"{task}={name}"]
        for key, flag in FLAGS.items():
            if o.get(key) is not None:
                args += [flag, f"{o[key]:g}" if isinstance(o[key], float) else str(o[key])]
        return args

    def launch(self, spec: ServerSpec, port: int | None, gpus: list[int], socket: bool = False) -> Launch:
        argv = [spec.options.get("python") or sys.executable, "-m", "servers.gateway", *self.gateway_args(spec, port)]
        env = {"PYTHONPATH": os.pathsep.join(p for p in (servers_root(), os.environ.get("PYTHONPATH")) if p)}
        if spec.options.get("api_key"):
            env["MODELCTL_API_KEY"] = spec.options["api_key"]  # by environment, not argv: not in `ps`
        return Launch(argv=argv, env=env)

    def model_label(self, spec: ServerSpec) -> str:
        return "gateway (every profile)" if spec.options["scope"] == "all" else "gateway"

    def not_in_cluster(self, spec: ServerSpec) -> str:
        return "the gateway reads modelctl's records on its machine; on Kubernetes each server has its Service"

    def cluster(self, spec: ServerSpec, port: int, default_image: str) -> ClusterContainer | None:
        """Not on Kubernetes: there each server has its Service, and a gateway of the cluster's own
        (an Ingress, vLLM's router) fronts them."""
        return None
