"""Profiles: YAML → validated, typed server specs.

Every error names the file, the server and the key, so a user can fix the profile without
guessing. The `ServerSpec` built here is the one object passed around afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from modelctl.errors import ProfileError

DEFAULT_PROFILE = Path(__file__).resolve().parent.parent / "profiles" / "default.yaml"
DEFAULT_PORT_RANGE = (20000, 29999)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

_REQUIRED = object()


# --- value checks: each returns the clean value or raises ValueError with a short reason ---


def check_str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {value!r}")
    return value


def check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def check_positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"must be a number greater than 0, got {value!r}")
    return float(value)


def check_non_negative_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"must be a number of 0 or more, got {value!r}")
    return float(value)


def check_positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"must be a whole number greater than 0, got {value!r}")
    return value


def check_str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) for v in value):
        raise ValueError(f"must be a list of strings (an argv, never a shell string), got {value!r}")
    return [str(v) for v in value]


def check_str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping of NAME: value, got {value!r}")
    clean = {}
    for k, v in value.items():
        if not isinstance(k, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise ValueError(f"{k!r} is not a valid environment variable name")
        if isinstance(v, bool):
            v = "1" if v else "0"
        if not isinstance(v, (str, int, float)):
            raise ValueError(f"value of {k} must be a string or number, got {v!r}")
        clean[k] = str(v)
    return clean


def check_choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {value!r}")
        return value

    return check


def check_port(value: Any) -> int | None:
    if value == "auto" or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"must be a port number 1-65535 or 'auto', got {value!r}")
    return value


def check_gpus(value: Any) -> int | tuple[int, ...]:
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"must be a count (2) or a list of GPU ids ([0, 3]), got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be 0 or more, got {value}")
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        if len(set(value)) != len(value):
            raise ValueError(f"lists a GPU id twice: {value}")
        return tuple(value)
    raise ValueError(f"must be a count (2) or a list of GPU ids ([0, 3]), got {value!r}")


@dataclass(frozen=True)
class Key:
    """One profile key: how to check it, its default, what it means."""

    check: Callable[[Any], Any]
    default: Any = None
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def required(check: Callable[[Any], Any], doc: str = "") -> Key:
    return Key(check, _REQUIRED, doc)


# --- typed specs ---


@dataclass(frozen=True)
class HealthSpec:
    """How to tell that a server is up: an HTTP path answering 2xx, a TCP connect, or nothing."""

    kind: str = "http"  # http | tcp | none
    path: str = "/health"
    interval: float = 2.0  # seconds between probes once ready
    timeout: float = 2.0  # seconds one probe may take
    grace: float = 30.0  # seconds unhealthy before a ready server is restarted


@dataclass(frozen=True)
class RestartPolicy:
    """When and how fast a server that exits is started again, and when to give up."""

    policy: str = "always"  # always | on-failure | never
    backoff: float = 1.0  # first delay; doubles each consecutive failure
    backoff_max: float = 30.0
    max_failures: int = 5  # this many failures inside `window` → failed
    window: float = 300.0
    stable_after: float = 60.0  # uptime after which the backoff starts again from `backoff`


@dataclass(frozen=True)
class ServerSpec:
    """One server of a profile, validated and with every default filled in."""

    name: str
    kind: str
    source: str
    raw: Mapping[str, Any]
    port: int | None  # None: allocate from the port range
    host: str
    gpus: int | tuple[int, ...]
    gpus_shared: bool
    env: Mapping[str, str]
    startup_timeout: float
    stop_timeout: float
    health: HealthSpec
    restart: RestartPolicy
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Changes whenever what the profile says about this server changes."""
        text = json.dumps({"kind": self.kind, "raw": self.raw}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def gpu_count(self) -> int:
        return len(self.gpus) if isinstance(self.gpus, tuple) else int(self.gpus)


@dataclass(frozen=True)
class Profile:
    path: str
    name: str
    servers: Mapping[str, ServerSpec]
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE


COMMON_KEYS: dict[str, Key] = {
    "kind": required(check_choice("sentence", "ollama", "vllm", "command"), "server kind"),
    "port": Key(check_port, None, "port number, or auto (default) to take a free one from port_range"),
    "host": Key(check_str, "127.0.0.1", "address to bind"),
    "gpus": Key(check_gpus, 0, "count, or list of GPU ids; exported as CUDA_VISIBLE_DEVICES"),
    "gpus_shared": Key(check_bool, False, "let other servers use the same GPUs"),
    "env": Key(check_str_map, None, "extra environment variables"),
    "startup_timeout": Key(check_positive_number, None, "seconds to become healthy"),
    "stop_timeout": Key(check_positive_number, 10.0, "seconds between SIGTERM and SIGKILL"),
    "health": Key(lambda v: v, None, "http: /path | tcp: true | none"),
    "restart": Key(lambda v: v, None, "restart policy"),
    "description": Key(check_str, None, "free text"),
}

_HEALTH_TUNING = {"interval": check_positive_number, "timeout": check_positive_number, "grace": check_non_negative_number}
_RESTART_KEYS: dict[str, Callable[[Any], Any]] = {
    "policy": check_choice("always", "on-failure", "never"),
    "backoff": check_non_negative_number,
    "backoff_max": check_non_negative_number,
    "max_failures": check_positive_int,
    "window": check_positive_number,
    "stable_after": check_non_negative_number,
}


def parse_health(value: Any, default: HealthSpec, err: Callable[[str, str], ProfileError]) -> HealthSpec:
    if value is None:
        return default
    if value == "none" or value is False:
        return HealthSpec(kind="none")
    if not isinstance(value, Mapping):
        raise err("health", f"must be 'none', {{http: /path}} or {{tcp: true}}, got {value!r}")
    kinds = [k for k in ("http", "tcp") if k in value]
    if len(kinds) != 1:
        raise err("health", "give exactly one of http: /path or tcp: true")
    tuning = _check_sub_keys({k: v for k, v in value.items() if k not in ("http", "tcp")}, _HEALTH_TUNING, "health", err, extra=("http", "tcp"))
    if kinds[0] == "http":
        path = value["http"]
        if not isinstance(path, str) or not path.startswith("/"):
            raise err("health.http", f"must be a path starting with '/', got {path!r}")
        return HealthSpec(kind="http", path=path, **{**_tuning_of(default), **tuning})
    if value["tcp"] is not True:
        raise err("health.tcp", "must be true")
    return HealthSpec(kind="tcp", **{**_tuning_of(default), **tuning})


def _tuning_of(h: HealthSpec) -> dict[str, float]:
    return {"interval": h.interval, "timeout": h.timeout, "grace": h.grace}


def parse_restart(value: Any, err: Callable[[str, str], ProfileError]) -> RestartPolicy:
    if value is None:
        return RestartPolicy()
    if isinstance(value, str):
        value = {"policy": value}
    if not isinstance(value, Mapping):
        raise err("restart", f"must be always | on-failure | never or a mapping, got {value!r}")
    return RestartPolicy(**_check_sub_keys(value, _RESTART_KEYS, "restart", err))


def _check_sub_keys(
    value: Mapping[str, Any], checks: Mapping[str, Callable[[Any], Any]], parent: str, err: Callable[[str, str], ProfileError], extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check the keys of a nested mapping (health:, restart:); errors name `parent.key`."""
    clean = {}
    for k, v in value.items():
        if k not in checks:
            raise err(f"{parent}.{k}", f"unknown key; known: {', '.join((*extra, *checks))}")
        try:
            clean[k] = checks[k](v)
        except ValueError as e:
            raise err(f"{parent}.{k}", str(e)) from None
    return clean


def parse_server(name: str, raw: Any, source: str) -> ServerSpec:
    """Validate one server mapping; the registry of kinds supplies kind-specific keys."""
    from modelctl.backends import get_backend

    def err(key: str | None, message: str) -> ProfileError:
        return ProfileError(source, message, server=name, key=key)

    if not NAME_PATTERN.match(str(name)):
        raise err(None, "server names use letters, digits, '.', '_' and '-' (at most 63), starting with a letter or digit")
    if not isinstance(raw, Mapping):
        raise err(None, f"must be a mapping of keys (kind, port, ...), got {raw!r}")
    if "kind" not in raw:
        raise err("kind", "missing; one of sentence, ollama, vllm, command")
    try:
        kind = COMMON_KEYS["kind"].check(raw["kind"])
    except ValueError as e:
        raise err("kind", str(e)) from None
    backend = get_backend(kind)

    for key in raw:
        if key not in COMMON_KEYS and key not in backend.keys:
            known = sorted(set(COMMON_KEYS) | set(backend.keys))
            raise err(str(key), f"unknown key for kind '{kind}'; known keys: {', '.join(known)}")

    common: dict[str, Any] = {}
    for key, spec in COMMON_KEYS.items():
        if key in ("health", "restart", "kind"):
            continue
        value = raw.get(key)
        if value is None:
            common[key] = spec.default
            continue
        try:
            common[key] = spec.check(value)
        except ValueError as e:
            raise err(key, str(e)) from None

    options: dict[str, Any] = {}
    for key, spec in backend.keys.items():
        value = raw.get(key)
        if value is None:
            if spec.required:
                raise err(key, f"missing; required for kind '{kind}' ({spec.doc})")
            options[key] = spec.default
            continue
        try:
            options[key] = spec.check(value)
        except ValueError as e:
            raise err(key, str(e)) from None
    try:
        backend.validate(options, common)
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        raise err(key, message) from None

    return ServerSpec(
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
        health=parse_health(raw.get("health"), backend.default_health(options), err),
        restart=parse_restart(raw.get("restart"), err),
        options=options,
    )


def parse_profile(data: Any, source: str) -> Profile:
    """Validate a loaded YAML document."""
    if not isinstance(data, Mapping):
        raise ProfileError(source, "must be a mapping with a top-level 'servers:' key")
    for key in data:
        if key not in ("servers", "name", "port_range"):
            raise ProfileError(source, "unknown top-level key; known: servers, name, port_range", key=str(key))
    servers_raw = data.get("servers")
    if not isinstance(servers_raw, Mapping) or not servers_raw:
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
            raise ProfileError(source, f"must be [low, high] with 1024 <= low <= high <= 65535, got {pr!r}", key="port_range")
        port_range = (pr[0], pr[1])

    name = data.get("name") or Path(source).stem
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ProfileError(source, f"must be a simple name (letters, digits, '.', '_', '-'), got {name!r}", key="name")

    servers = {str(n): parse_server(str(n), raw, source) for n, raw in servers_raw.items()}
    seen: dict[int, str] = {}
    for spec in servers.values():
        if spec.port is None:
            continue
        if spec.port in seen:
            raise ProfileError(
                source, f"port {spec.port} is already used by server '{seen[spec.port]}'", server=spec.name, key="port"
            )
        seen[spec.port] = spec.name
    return Profile(path=str(source), name=name, servers=servers, port_range=port_range)


def load_profile(path: str | os.PathLike | None = None) -> Profile:
    """Read a profile file: the given path, else $MODELCTL_PROFILE, else the bundled default."""
    path = Path(path or os.environ.get("MODELCTL_PROFILE") or DEFAULT_PROFILE)
    source = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ProfileError(source, "no such file") from None
    except OSError as e:
        raise ProfileError(source, f"cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ProfileError(source, f"invalid YAML{where}: {getattr(e, 'problem', None) or e}") from None
    return parse_profile(data, source)
