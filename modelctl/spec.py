"""The vocabulary profiles are written in: keys with their checks, and the typed specs built from them.

Server kinds (modelctl/backends) declare their keys with `Key` and the `check_*` functions here;
`modelctl/profile/__init__.py` reads YAML and applies them. A check returns the clean value or raises
`KeyProblem` (or ValueError) with a short reason; the profile loader adds file, server and key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from modelctl.names import ServerRef

MAX_SECONDS = 7 * 24 * 3600  # a week: a timeout or backoff beyond it is a typo, not a plan
MAX_COUNT = 1_000_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", re.I)
_REQUIRED: Any = object()


class KeyProblem(ValueError):
    """A value that fails its check, with the key it belongs to (`health.interval`)."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"{key}: {message}")


def describe(value: Any, limit: int = 60) -> str:
    """repr() for messages, cut short: an error never prints a huge value in full."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}...({len(text)} chars)"


# --- value checks: each returns the clean value or raises ValueError with a short reason ---


def check_str(value: Any) -> str:
    """A non-empty single-line string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty string, got {describe(value)}")
    if _CONTROL.search(value):
        raise ValueError(f"must not contain newlines or control characters, got {describe(value)}")
    return value


def check_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {describe(value)}")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, got {describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value}")
    return float(value)


def check_seconds(value: Any) -> float:
    """A duration in seconds, greater than 0 and at most a week."""
    seconds = _number(value)
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"must be more than 0 and at most {MAX_SECONDS} seconds, got {describe(value)}")
    return seconds


def check_seconds_or_zero(value: Any) -> float:
    seconds = _number(value)
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"must be 0 to {MAX_SECONDS} seconds, got {describe(value)}")
    return seconds


def check_count(value: Any) -> int:
    """A whole number from 1 to a million."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        raise ValueError(f"must be a whole number from 1 to {MAX_COUNT}, got {describe(value)}")
    return value


def check_size(value: Any) -> int:
    """Bytes: a number, or text like 50MB, 512KiB, 2G."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        # binary units whether or not the `i` is written: 50MB = 50 MiB, as docker's log sizes
        size = int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))
    else:
        raise ValueError(f"must be a size in bytes or like 50MB, got {describe(value)}")
    if not 1024 <= size <= 1 << 40:
        raise ValueError(f"must be from 1KiB to 1TiB, got {describe(value)}")
    return size


def check_str_list(value: Any) -> list[str]:
    """An argv: a list of strings (numbers are written as text), never a shell string."""
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        raise ValueError(f"must be a list of strings (an argv, never a shell string), got {describe(value)}")
    args = [str(v) for v in value]
    if any("\0" in a for a in args):
        raise ValueError("must not contain NUL characters")
    return args


def check_env(value: Any) -> dict[str, str]:
    """NAME: value pairs; values are single-line text (they are written into systemd units too)."""
    if not isinstance(value, Mapping):
        raise ValueError(f"must be a mapping of NAME: value, got {describe(value)}")
    clean = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _ENV_NAME.fullmatch(k):
            raise ValueError(f"{describe(k)} is not a valid environment variable name")
        if not isinstance(v, (str, int, float)):
            raise ValueError(f"value of {k} must be a string or number, got {describe(v)}")
        text = ("1" if v else "0") if isinstance(v, bool) else str(v)
        if _CONTROL.search(text):
            raise ValueError(f"value of {k} must not contain newlines or control characters, got {describe(text)}")
        clean[k] = text
    return clean


def check_choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}; got {describe(value)}")
        return str(value)

    return check


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?", re.I)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}


def check_duration(value: Any) -> float:
    """Seconds: a number, or text like 30s, 10m, 2h."""
    if isinstance(value, str) and (m := _DURATION.fullmatch(value.strip())):
        value = float(m.group(1)) * _DURATION_UNITS[(m.group(2) or "").lower() or None]
    elif isinstance(value, str):
        raise ValueError(f"must be seconds or a duration like 30s, 10m, 2h; got {describe(value)}")
    return check_seconds(value)


def check_gpu_sizes(value: Any) -> dict[int, int]:
    """GPU id → bytes ({0: 70GiB}); one size alone applies to every GPU (id -1)."""
    if not isinstance(value, Mapping):
        return {-1: check_size(value)}
    out = {}
    for k, v in value.items():
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= 1024:
            raise ValueError(f"keys are GPU ids (0, 1, ...), got {describe(k)}")
        out[k] = check_size(v)
    return out


def check_backlog(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 16 <= value <= 65535:
        raise ValueError(f"must be a whole number from 16 to 65535, got {describe(value)}")
    return value


def check_port(value: Any) -> int | None:
    if value == "auto" or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"must be a port number 1-65535 or 'auto', got {describe(value)}")
    return value


def check_gpus(value: Any) -> int | tuple[int, ...]:
    if value is None:
        return 0
    if isinstance(value, bool):
        raise ValueError(f"must be a count (2) or a list of GPU ids ([0, 3]), got {describe(value)}")
    if isinstance(value, int):
        if not 0 <= value <= 1024:
            raise ValueError(f"must be 0 to 1024, got {value}")
        return value
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 1024 for v in value):
        if len(set(value)) != len(value):
            raise ValueError(f"lists a GPU id twice: {describe(value)}")
        return tuple(value)
    raise ValueError(f"must be a count (2) or a list of GPU ids ([0, 3]), got {describe(value)}")


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


def unknown_key(key: object, known: Iterable[str]) -> str:
    """What to say of a key that is not known: the likely one it was meant to be, else them all."""
    import difflib

    known = list(known)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return f"unknown key; known: {', '.join(known)}"


def check_section(value: Any, keys: Mapping[str, Key], parent: str, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check a nested mapping (health:, restart:, log:, k8s:); problems name `parent.key`.

    Keys absent from `value` are left out (the caller's defaults apply); `extra` keys are
    accepted as known but left to the caller.
    """
    if not isinstance(value, Mapping):
        raise KeyProblem(parent, f"must be a mapping, got {describe(value)}")
    clean = {}
    for k, v in value.items():
        if k in extra:
            continue
        if k not in keys:
            raise KeyProblem(f"{parent}.{k}", unknown_key(k, (*extra, *keys)))
        try:
            clean[k] = keys[k].check(v)
        except KeyProblem as e:
            raise KeyProblem(f"{parent}.{e.key}", e.message) from None
        except ValueError as e:
            raise KeyProblem(f"{parent}.{k}", str(e)) from None
    missing = [k for k, key in keys.items() if key.required and k not in clean]
    if missing:
        raise KeyProblem(f"{parent}.{missing[0]}", f"missing ({keys[missing[0]].doc})")
    return clean


# --- typed specs ---

StartChoice = Literal["always", "on-demand"]
HealthKind = Literal["http", "tcp", "none"]
RestartChoice = Literal["always", "on-failure", "never"]
ReplaceChoice = Literal["overlap", "stop-first"]


@dataclass(frozen=True)
class HealthSpec:
    """How to tell that a server is up: an HTTP path answering 2xx, a TCP connect, or nothing."""

    kind: HealthKind = "http"
    path: str = "/health"
    interval: float = 2.0  # seconds between probes once ready
    timeout: float = 2.0  # seconds one probe may take
    grace: float = 30.0  # seconds unhealthy before a ready server is restarted


HEALTH_TUNING = {
    "interval": Key(check_seconds, doc="seconds between probes once ready"),
    "timeout": Key(check_seconds, doc="seconds one probe may take"),
    "grace": Key(check_seconds_or_zero, doc="seconds unhealthy before a ready server is restarted"),
}


def parse_health(value: Any, default: HealthSpec) -> HealthSpec:
    """`none` | {http: /path, ...tuning} | {tcp: true, ...tuning}."""
    if value is None:
        return default
    if value == "none" or value is False:
        return HealthSpec(kind="none")
    if not isinstance(value, Mapping):
        raise KeyProblem("health", f"must be 'none', {{http: /path}} or {{tcp: true}}, got {describe(value)}")
    kinds = [k for k in ("http", "tcp") if k in value]
    if len(kinds) != 1:
        raise KeyProblem("health", "give exactly one of http: /path or tcp: true")
    tuning = check_section(value, HEALTH_TUNING, "health", extra=("http", "tcp"))
    base = {"interval": default.interval, "timeout": default.timeout, "grace": default.grace, **tuning}
    if kinds[0] == "http":
        path = value["http"]
        if not isinstance(path, str) or not path.startswith("/") or _CONTROL.search(path) or " " in path:
            raise KeyProblem("health.http", f"must be a path starting with '/', got {describe(path)}")
        return HealthSpec(kind="http", path=path, **base)
    if value["tcp"] is not True:
        raise KeyProblem("health.tcp", "must be true")
    return HealthSpec(kind="tcp", **base)


@dataclass(frozen=True)
class RestartPolicy:
    """When and how fast a server that exits is started again, and when to give up."""

    policy: RestartChoice = "always"
    backoff: float = 1.0  # first delay; doubles each consecutive failure
    backoff_max: float = 30.0
    max_failures: int = 5  # this many failures inside `window` → failed
    window: float = 300.0
    stable_after: float = 60.0  # uptime after which the backoff starts again from `backoff`

    def delay(self, consecutive_failures: int) -> float:
        """Seconds before the next start after this many failures in a row: doubling, capped."""
        exponent = min(max(consecutive_failures - 1, 0), 60)
        return min(self.backoff * 2**exponent, self.backoff_max)

    def crash_loop_wait(self) -> float:
        """The backoff a crash loop sits through before it ends in `failed`."""
        return sum(self.delay(n) for n in range(1, self.max_failures))


RESTART_KEYS = {
    "policy": Key(check_choice("always", "on-failure", "never"), doc="always | on-failure | never"),
    "backoff": Key(check_seconds_or_zero, doc="first delay in seconds"),
    "backoff_max": Key(check_seconds_or_zero, doc="longest delay in seconds"),
    "max_failures": Key(check_count, doc="failures within window that end in failed"),
    "window": Key(check_seconds, doc="seconds over which failures are counted"),
    "stable_after": Key(check_seconds_or_zero, doc="uptime that resets the backoff"),
}


def parse_restart(value: Any) -> RestartPolicy:
    if value is None:
        return RestartPolicy()
    if isinstance(value, str):
        value = {"policy": value}
    if not isinstance(value, Mapping):
        raise KeyProblem("restart", f"must be always | on-failure | never or a mapping, got {describe(value)}")
    return RestartPolicy(**check_section(value, RESTART_KEYS, "restart"))


@dataclass(frozen=True)
class LogSpec:
    """Size-capped rotation of a server's log: NAME.log, NAME.log.1 ... NAME.log.<keep>."""

    max_bytes: int = 50 * 1024 * 1024
    keep: int = 3


LOG_KEYS = {
    "max_bytes": Key(check_size, doc="size at which the log is rotated (bytes, or like 50MB)"),
    "keep": Key(check_count, doc="rotated files kept"),
}


def parse_log(value: Any) -> LogSpec:
    if value is None:
        return LogSpec()
    return LogSpec(**check_section(value, LOG_KEYS, "log"))


@dataclass(frozen=True)
class Budget:
    """What the servers modelctl starts may hold at once: resident memory, and GPU memory per GPU
    (id -1: every GPU). `shared`: it bounds every profile's servers in the state directory."""

    memory: int | None = None
    gpu_memory: Mapping[int, int] = field(default_factory=dict)
    shared: bool = False

    def gpu_limit(self, gpu: int) -> int | None:
        return self.gpu_memory.get(gpu, self.gpu_memory.get(-1))


BUDGET_KEYS = {
    "memory": Key(check_size, doc="resident memory the profile's servers may hold at once (like 8GiB)"),
    "gpu_memory": Key(check_gpu_sizes, doc="GPU memory per GPU id ({0: 70GiB}), or one size for every GPU"),
    "shared": Key(check_bool, doc="the budget bounds the servers of every profile in the state directory"),
}


def parse_budget(value: Any) -> Budget | None:
    if value is None:
        return None
    clean = check_section(value, BUDGET_KEYS, "budget")
    if "memory" not in clean and "gpu_memory" not in clean:
        raise KeyProblem("budget", "give memory: and/or gpu_memory:")
    return Budget(memory=clean.get("memory"), gpu_memory=clean.get("gpu_memory") or {}, shared=clean.get("shared", False))


@dataclass(frozen=True)
class ServerSpec:
    """One server of a profile, validated and with every default filled in."""

    profile: str
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
    log: LogSpec = LogSpec()
    options: Mapping[str, Any] = field(default_factory=dict)
    k8s: Mapping[str, Any] = field(default_factory=dict)  # the server's checked k8s: keys
    slurm: Mapping[str, Any] = field(default_factory=dict)  # the server's checked slurm: keys
    # the supervisor holds the listening socket and hands it to each instance (LISTEN_FDS)
    socket: bool = False
    notify: bool = False  # an instance says READY=1 on NOTIFY_SOCKET once it serves
    replace: ReplaceChoice = "stop-first"  # a restart or a new spec: start the new instance first, or stop the old first
    backlog: int = 4096
    start: StartChoice = "always"  # on-demand: no process until a client connects, stopped after idle_timeout
    idle_timeout: float = 600.0
    memory: int | None = None  # declared resident memory (bytes), until a measured peak replaces it
    gpu_memory: int | None = None  # declared GPU memory per GPU of the server (bytes)

    @property
    def ref(self) -> ServerRef:
        return ServerRef(self.profile, self.name)

    @property
    def fingerprint(self) -> str:
        """Changes whenever what the profile says about this server changes."""
        text = json.dumps({"kind": self.kind, "raw": self.raw}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def gpu_count(self) -> int:
        return len(self.gpus) if isinstance(self.gpus, tuple) else int(self.gpus)
