"""Profiles: YAML → validated, typed server specs.

Every error names the file, the server and the key, so a user can fix the profile without
guessing; values in messages are cut short. The YAML is read with bounds (file size, nodes after
alias expansion, nesting), so a hostile file fails fast instead of eating memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelctl.backends import KINDS
from modelctl.backends.base import Backend
from modelctl.errors import ProfileError
from modelctl.names import NAME_RULE, is_valid_name
from modelctl.profile import gateway_keys
from modelctl.profile.k8s_keys import check_profile_k8s, check_server_k8s
from modelctl.profile.slurm_keys import check_profile_slurm, check_server_slurm, time_seconds
from modelctl.spec import (
    Budget,
    Key,
    KeyProblem,
    ReplaceChoice,
    ServerSpec,
    check_backlog,
    check_bool,
    check_choice,
    check_duration,
    check_env,
    check_gpus,
    check_port,
    check_seconds,
    check_size,
    check_str,
    describe,
    parse_budget,
    parse_health,
    parse_log,
    parse_restart,
    unknown_key,
)
from modelctl.state.record import ServerRecord
from modelctl.units import format_bytes
from modelctl.yamlfile import read_yaml

DEFAULT_PORT_RANGE = (20000, 29999)


def default_profile_path() -> Path:
    """The embedded default profile: package data of an installed modelctl, or the checkout's."""
    from importlib import resources

    try:
        path = Path(str(resources.files("modelctl.profiles") / "default.yaml"))
        if path.is_file():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / "profiles" / "default.yaml"


@dataclass(frozen=True)
class Profile:
    path: str
    name: str
    servers: Mapping[str, ServerSpec]
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    k8s: Mapping[str, Any] = field(default_factory=dict)  # defaults for every server's k8s: keys
    budget: Budget | None = None
    slurm: Mapping[str, Any] = field(default_factory=dict)  # defaults for every server's slurm: keys


COMMON_KEYS: dict[str, Key] = {
    "kind": Key(check_str, None, f"server kind: {', '.join(KINDS)}"),
    "port": Key(check_port, None, "port number, or auto (default) to take a free one from port_range"),
    "host": Key(check_str, "127.0.0.1", "address to bind"),
    "gpus": Key(check_gpus, 0, "count, or list of GPU ids; exported as CUDA_VISIBLE_DEVICES"),
    "gpus_shared": Key(check_bool, False, "let other servers use the same GPUs"),
    "env": Key(check_env, None, "extra environment variables"),
    "startup_timeout": Key(check_seconds, None, "seconds to become healthy"),
    "stop_timeout": Key(check_seconds, 10.0, "seconds between SIGTERM and SIGKILL"),
    "health": Key(lambda v: v, None, "http: /path | tcp: true | none"),
    "restart": Key(lambda v: v, None, "restart policy"),
    "log": Key(lambda v: v, None, "log rotation: {max_bytes: 50MB, keep: 3}"),
    "k8s": Key(lambda v: v, None, "Kubernetes: image, resources, node_selector, tolerations, cache, ..."),
    "slurm": Key(lambda v: v, None, "Slurm: partition, account, time, qos, constraint, modules, sbatch, ..."),
    "socket": Key(
        check_choice("inherit", "none"), None, "inherit: modelctl holds the listening socket across restarts (default for kinds that can)"
    ),
    "replace": Key(
        check_choice("overlap", "stop-first"), None, "a restart or new spec: start the new instance first (overlap) or stop the old first"
    ),
    "backlog": Key(check_backlog, 4096, "connections the held socket queues while no instance accepts"),
    "start": Key(check_choice("always", "on-demand"), "always", "on-demand: no process until a client connects (needs a held socket)"),
    "idle_timeout": Key(check_duration, 600.0, "an on-demand server is stopped after this long without a request (seconds, or 10m)"),
    "memory": Key(check_size, None, "resident memory the server holds (like 650MiB), for the budget, until one is measured"),
    "gpu_memory": Key(check_size, None, "GPU memory the server holds on each of its GPUs, for the budget, until measured"),
    "description": Key(check_str, None, "free text"),
    **gateway_keys.SERVER_KEYS,
}
_NESTED = ("kind", "health", "restart", "log", "k8s", "slurm")  # checked by their own parsers below
TOP_LEVEL_KEYS = ("servers", "name", "port_range", "k8s", "slurm", "budget", "gateway")


def parse_server(name: str, raw: Any, source: str, profile: str, cluster: bool = True) -> ServerSpec:
    """Validate one server mapping; the registry of kinds supplies kind-specific keys. `cluster`:
    check its `k8s:` and `slurm:` keys too (the supervisor, which runs it here, needs neither)."""

    def err(key: str | None, message: str) -> ProfileError:
        return ProfileError(source, message, server=name, key=key)

    if not is_valid_name(name):
        raise ProfileError(source, f"server names use {NAME_RULE}, got {describe(name)}", key="servers")
    if not isinstance(raw, Mapping):
        raise err(None, f"must be a mapping of keys (kind, port, ...), got {describe(raw)}")
    if "kind" not in raw:
        raise err("kind", f"missing; one of {', '.join(KINDS)}")
    if raw["kind"] not in KINDS:
        raise err("kind", f"must be one of {', '.join(KINDS)}; got {describe(raw['kind'])}")
    kind = str(raw["kind"])
    backend = KINDS[kind]

    for key in raw:
        if key not in COMMON_KEYS and key not in backend.keys:
            known = sorted(set(COMMON_KEYS) | set(backend.keys))
            raise err(str(key)[:60], unknown_key(key, known).replace("unknown key", f"unknown key for kind '{kind}'"))

    try:
        common = _check_keys(raw, {k: v for k, v in COMMON_KEYS.items() if k not in _NESTED})
        options = _check_keys(raw, backend.keys, kind=kind)
        backend.validate(options, common)
        socket, notify, replace = socket_mode(backend, options, common)
        if common["start"] == "on-demand" and not notify:
            raise KeyProblem(
                "start",
                "on-demand needs a server that takes its socket from modelctl and says READY=1 (kinds sentence and vllm, or "
                f"command with socket: inherit and notify: true): {backend.socket_support(options) or 'this one does not say READY=1'}",
            )
        health = parse_health(raw.get("health"), backend.default_health(options))
        restart = parse_restart(raw.get("restart"))
        log = parse_log(raw.get("log"))
        k8s = check_server_k8s(raw["k8s"]) if cluster and raw.get("k8s") is not None else {}
        slurm = check_server_slurm(raw["slurm"]) if cluster and raw.get("slurm") is not None else {}
    except KeyProblem as e:
        raise err(e.key, e.message) from None

    return ServerSpec(
        profile=profile,
        name=name,
        kind=kind,
        source=str(source),
        raw=dict(raw),
        port=common["port"],
        host=common["host"],
        gpus=common["gpus"],
        gpus_shared=common["gpus_shared"],
        env=common["env"] or {},
        startup_timeout=common["startup_timeout"] or backend.startup_timeout,
        stop_timeout=common["stop_timeout"],
        health=health,
        restart=restart,
        log=log,
        options=options,
        k8s=k8s,
        slurm=slurm,
        socket=socket,
        notify=notify,
        replace=replace,
        backlog=common["backlog"],
        start=common["start"],
        idle_timeout=common["idle_timeout"],
        memory=common["memory"],
        gpu_memory=common["gpu_memory"],
    )


def socket_mode(backend: Backend, options: Mapping[str, Any], common: Mapping[str, Any]) -> tuple[bool, bool, ReplaceChoice]:
    """Whether the supervisor holds the server's socket, whether it says READY=1, and how it is replaced.

    A new instance is started beside the old one (overlap) only where it can say when it is
    ready and the socket is held; a server with exclusive GPUs is stopped first unless the profile
    says overlap (two instances would need the GPU memory twice).
    """
    why_not = backend.socket_support(options)
    asked = common.get("socket")
    if asked == "inherit" and why_not:
        raise KeyProblem("socket", f"cannot be inherit: {why_not}")
    socket = bool(why_not is None and (asked == "inherit" or (asked is None and backend.socket_by_default(options))))
    notify = socket and backend.says_ready(options)
    replace: ReplaceChoice | None = common.get("replace")
    if replace == "overlap" and not notify:
        raise KeyProblem("replace", "overlap needs a held socket and a server that says READY=1 (notify): without them use stop-first")
    if replace is None:
        exclusive_gpus = bool(common.get("gpus")) and not common.get("gpus_shared")
        replace = "overlap" if notify and not exclusive_gpus and backend.overlaps_by_default(options) else "stop-first"
    return socket, notify, replace


def _refuse_bigger_than_budget(source: str, spec: ServerSpec, budget: Budget) -> None:
    """A server the whole budget cannot hold would wait for room forever: a profile error."""
    if budget.memory is not None and spec.memory is not None and spec.memory > budget.memory:
        raise ProfileError(
            source,
            f"{format_bytes(spec.memory)} is more than the whole budget ({format_bytes(budget.memory)}, budget.memory): "
            "it could never start; raise the budget or lower what the server holds",
            server=spec.name,
            key="memory",
        )
    if spec.gpu_memory is not None and isinstance(spec.gpus, tuple):
        for gpu in spec.gpus:
            limit = budget.gpu_limit(gpu)
            if limit is not None and spec.gpu_memory > limit:
                raise ProfileError(
                    source,
                    f"{format_bytes(spec.gpu_memory)} is more than the budget of GPU {gpu} ({format_bytes(limit)}, budget.gpu_memory): "
                    "it could never start",
                    server=spec.name,
                    key="gpu_memory",
                )


def record_spec(rec: ServerRecord) -> ServerSpec | None:
    """The spec a record was written with (its cluster keys unchecked: this machine runs it), or None
    if it no longer validates."""
    try:
        return parse_server(rec.name, rec.spec, rec.source, rec.profile, cluster=False)
    except ProfileError:
        return None


def _check_keys(raw: Mapping[str, Any], keys: Mapping[str, Key], kind: str | None = None) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, spec in keys.items():
        value = raw.get(key)
        if value is None:
            if spec.required:
                raise KeyProblem(key, f"missing; required for kind '{kind}' ({spec.doc})")
            clean[key] = spec.default
            continue
        try:
            clean[key] = spec.check(value)
        except KeyProblem:
            raise
        except ValueError as e:
            raise KeyProblem(key, str(e)) from None
    return clean


def parse_profile(data: Any, source: str) -> Profile:
    """Validate a loaded YAML document."""
    if not isinstance(data, Mapping):
        raise ProfileError(source, "must be a mapping with a top-level 'servers:' key")
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ProfileError(source, unknown_key(key, TOP_LEVEL_KEYS).replace("unknown key", "unknown top-level key"), key=str(key)[:60])
    servers_raw = data.get("servers")
    if servers_raw is None and data.get("gateway") is not None:
        servers_raw = {}  # a gateway alone: the front of other profiles' servers (scope: all)
    elif not isinstance(servers_raw, Mapping) or not servers_raw:
        raise ProfileError(source, "must be a non-empty mapping of server name → spec", key="servers")

    port_range = DEFAULT_PORT_RANGE
    if data.get("port_range") is not None:
        pr = data["port_range"]
        if (
            not isinstance(pr, list)
            or len(pr) != 2
            or not all(isinstance(p, int) and not isinstance(p, bool) and 1024 <= p <= 65535 for p in pr)
            or pr[0] > pr[1]
        ):
            raise ProfileError(source, f"must be [low, high] with 1024 <= low <= high <= 65535, got {describe(pr)}", key="port_range")
        port_range = (pr[0], pr[1])

    raw_name = data.get("name") if data.get("name") is not None else Path(source).stem
    if not is_valid_name(raw_name):
        raise ProfileError(source, f"must be a simple name ({NAME_RULE}), got {describe(raw_name)}", key="name")
    name = str(raw_name)
    try:
        k8s = check_profile_k8s(data["k8s"]) if data.get("k8s") is not None else {}
        slurm = check_profile_slurm(data["slurm"]) if data.get("slurm") is not None else {}
        budget = parse_budget(data.get("budget"))
    except KeyProblem as e:
        raise ProfileError(source, e.message, key=e.key) from None

    servers = {str(n): parse_server(str(n), raw, source, name) for n, raw in servers_raw.items()}
    if data.get("gateway") is not None:
        if gateway_keys.NAME in servers:
            raise ProfileError(source, "the name is taken by the profile's gateway: key; rename the server", server=gateway_keys.NAME)
        try:
            servers[gateway_keys.NAME] = parse_server(gateway_keys.NAME, gateway_keys.gateway_server(data["gateway"], source), source, name)
        except ProfileError as e:
            raise gateway_keys.as_gateway_error(e) from None
        if len(servers) == 1 and servers[gateway_keys.NAME].options.get("scope") != "all":
            raise ProfileError(
                source, "a profile without servers has a gateway for other profiles' servers: add scope: all", key="gateway.scope"
            )
    gateway_keys.check_names(servers, source, name)
    if budget is not None:
        for spec in servers.values():
            if budget.memory is not None and spec.memory is None:
                raise ProfileError(
                    source,
                    "declare what the server holds (like 650MiB): the profile has a budget; a measured peak replaces it",
                    server=spec.name,
                    key="memory",
                )
            if budget.gpu_memory and spec.gpu_count and spec.gpu_memory is None:
                raise ProfileError(
                    source, "declare the GPU memory it holds per GPU: the profile has a GPU budget", server=spec.name, key="gpu_memory"
                )
            _refuse_bigger_than_budget(source, spec, budget)
    for spec in servers.values():
        limit = spec.slurm.get("time", slurm.get("time"))
        seconds = time_seconds(limit) if limit is not None else None
        if seconds is not None and seconds <= spec.startup_timeout + spec.stop_timeout:
            where = "slurm.time" if "time" in spec.slurm else "slurm.time (the profile's)"
            raise ProfileError(
                source,
                f"{limit} is too short: the job must outlast startup_timeout ({spec.startup_timeout:g}s) and stop_timeout "
                f"({spec.stop_timeout:g}s)",
                server=spec.name,
                key=where,
            )
    seen: dict[int, str] = {}
    for spec in servers.values():
        if spec.port is None:
            continue
        if spec.port in seen:
            raise ProfileError(source, f"port {spec.port} is already used by server '{seen[spec.port]}'", server=spec.name, key="port")
        seen[spec.port] = spec.name
    return Profile(path=str(source), name=name, servers=servers, port_range=port_range, k8s=k8s, budget=budget, slurm=slurm)


def load_profile(path: str | os.PathLike[str] | None = None) -> Profile:
    """Read a profile file: the given path, else $MODELCTL_PROFILE, else the bundled default."""
    path = Path(path or os.environ.get("MODELCTL_PROFILE") or default_profile_path())
    return parse_profile(read_yaml(path), str(path))
