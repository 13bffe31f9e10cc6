"""What every server kind provides: its profile keys, how to launch it, how to probe it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from modelctl.spec import HealthSpec, Key, KeyProblem, ServerSpec

# A callback through which a long preparation (an Ollama pull) reports progress:
# {"status": str, "completed": int | None, "total": int | None}
ProgressReport = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Launch:
    """The process to start: argv, extra environment, working directory."""

    argv: list[str]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None


@dataclass(frozen=True)
class ClusterContainer:
    """How a server runs in a Kubernetes pod; modelctl/cluster/k8s/manifests.py builds the objects around it."""

    image: str
    args: list[str]
    command: list[str] | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    secret_env: Mapping[str, str] = field(default_factory=dict)  # put in a Secret, never in the pod spec
    cache_path: str | None = None  # where the engine keeps models: the cache volume's mount
    downloads: bool = False  # fetches models at start: gets a cache volume unless told otherwise
    init_script: str | None = None  # run first, in the same image with the same volumes (an Ollama pull)
    shm: bool = False  # tensor parallelism: /dev/shm as a memory volume
    working_dir: str | None = None


class Backend:
    """A server kind. Subclasses are stateless; the `ServerSpec` carries everything."""

    kind = ""
    summary = ""
    keys: ClassVar[dict[str, Key]] = {}
    startup_timeout = 120.0
    cluster_port = 8000  # the container port when the profile says `port: auto` (Kubernetes)

    def default_health(self, options: Mapping[str, Any]) -> HealthSpec:
        return HealthSpec(kind="http", path="/health")

    def validate(self, options: dict[str, Any], common: Mapping[str, Any]) -> None:
        """Checks across keys; raise KeyProblem(key, reason). May fill derived options."""

    def is_external(self, spec: ServerSpec) -> bool:
        """True when the server lives elsewhere: nothing to spawn or bind, only to probe and prepare."""
        return False

    def socket_support(self, options: Mapping[str, Any]) -> str | None:
        """None if servers of this kind (with these keys) can serve from an inherited listening
        socket (LISTEN_FDS); else why not, for the error that refuses `socket: inherit`."""
        return f"kind '{self.kind}' binds its own port and cannot take a socket from modelctl"

    def socket_by_default(self, options: Mapping[str, Any]) -> bool:
        """Whether `socket:` left out means inherit."""
        return False

    def says_ready(self, options: Mapping[str, Any]) -> bool:
        """Whether an instance sends READY=1 to NOTIFY_SOCKET once it serves (when it has a socket)."""
        return False

    def stops_leader_first(self, spec: ServerSpec) -> bool:
        """Whether a stop sends SIGTERM to the instance's leader alone first, which then stops its
        own children (vLLM's API server drains its requests, then ends its engine); the rest get
        SIGTERM once the leader is gone, and SIGKILL at the stop timeout either way."""
        return False

    def overlaps_by_default(self, options: Mapping[str, Any]) -> bool:
        """Whether a restart starts the new instance beside the old one unless the profile says
        otherwise (it must fit twice in memory)."""
        return True

    def launch(self, spec: ServerSpec, port: int | None, gpus: list[int], socket: bool = False) -> Launch | None:
        """The process to run, or None when the server lives elsewhere (an external host).
        With `socket`, the process finds its listening socket at fd 3 (LISTEN_FDS)."""
        raise NotImplementedError

    def base_url(self, spec: ServerSpec, port: int | None) -> str:
        """The URL clients (and the health probe) use."""
        return f"http://{connect_host(spec.host)}:{port}"

    @property
    def has_prepare(self) -> bool:
        return type(self).prepare is not Backend.prepare

    def prepare(self, spec: ServerSpec, base_url: str, report: ProgressReport) -> dict[str, Any]:
        """Work to do once the process answers its probe (load or pull a model). Returns facts for status."""
        return {}

    def describe(self, spec: ServerSpec, said: Mapping[str, str]) -> dict[str, Any]:
        """Facts for status from what a ready instance said beside READY=1 (its X_MODELCTL_ fields,
        lower-cased without the prefix): the backend it runs and why."""
        return {key: said[key] for key in ("backend", "backend_reason") if said.get(key)}

    def is_ready(self, spec: ServerSpec, base_url: str) -> tuple[bool, str]:
        """A check beyond the probe that must hold while ready (the model is still present)."""
        return True, ""

    def model_label(self, spec: ServerSpec) -> str:
        return str(spec.options.get("model") or "")

    def not_in_cluster(self, spec: ServerSpec) -> str:
        """Why `cluster()` gave None: said when the server is left out of the manifests."""
        return f"lives outside the cluster (host: {spec.host})"

    def cluster(self, spec: ServerSpec, port: int, default_image: str) -> ClusterContainer | None:
        """How the server runs on Kubernetes, listening on 0.0.0.0:port; None if it lives outside."""
        raise KeyProblem("k8s.image", f"kind '{self.kind}' cannot run on Kubernetes")


def connect_host(bind_host: str) -> str:
    """The address a local client uses to reach a server bound to `bind_host`."""
    if bind_host in ("0.0.0.0", "", "*"):
        return "127.0.0.1"
    if bind_host == "::":
        return "[::1]"
    if ":" in bind_host and not bind_host.startswith("["):
        return f"[{bind_host}]"
    return bind_host
