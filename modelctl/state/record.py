"""What modelctl knows about one server, in the parts that change together.

- the **wish** (`desired`, `managed_by`): written by commands;
- the **instance** (token, pid, create_time, members, started_at, ready_at, the fingerprint of
  the spec it runs, the stop owner): exists from the moment a start is intended until its
  processes are gone; `None` otherwise;
- the **history** (restarts, failures in the window, consecutive failures, the next start after
  a backoff, the last exit and error, the last exits): what the restart policy reads.

Only modelctl/state/lifecycle.py changes the state, the instance and the history, through named
transitions that set a state and its fields together. Records on disk are JSON (version 3);
`from_json` checks every field's type and reads versions 1 and 2 (flat fields) as well.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from modelctl.failures import Exit
from modelctl.host.identity import ProcessIdentity
from modelctl.names import ServerRef, is_valid_name
from modelctl.state import states
from modelctl.state.states import Desired, ManagedBy, State

RECORD_VERSION = 3


# ---------------------------------------------------------------------- the socket mode
@dataclass(frozen=True)
class Held:
    """The supervisor holds the server's listening socket and hands it to every instance."""

    text = "held"


@dataclass(frozen=True)
class HeldByInstance:
    """A restarted supervisor could not take the socket back: the running instance holds it."""

    text = "held by the instance: modelctl takes it again when the instance restarts"


@dataclass(frozen=True)
class NotHeld:
    """The server runs without a held socket, and why (a vLLM whose internals differ)."""

    why: str

    @property
    def text(self) -> str:
        return f"not held: {self.why}"


@dataclass(frozen=True)
class NoSocket:
    """No socket is held for the server (it takes none, or nothing is wanted)."""

    text = ""


SocketMode = Union[Held, HeldByInstance, NotHeld, NoSocket]
HELD, HELD_BY_INSTANCE, NO_SOCKET = Held(), HeldByInstance(), NoSocket()


def socket_mode(text: str) -> SocketMode:
    """The mode a record's `socket` text says (on disk it stays the text older versions wrote)."""
    head, sep, rest = text.partition(": ")
    if text == HELD.text:
        return HELD
    if head == "held by the instance":
        return HELD_BY_INSTANCE
    if head == "not held":
        return NotHeld(rest if sep else "")
    return NO_SOCKET


@dataclass
class Wish:
    """What the user asked for, and who carries it out."""

    desired: Desired = "running"
    managed_by: ManagedBy = "supervisor"
    generation: int = 0  # `restart` counts it up: an instance of an older generation is replaced
    warm: int = 0  # `up --now` counts it up: an on-demand server is started without waiting for a client


@dataclass
class Instance:
    """One run of a server, from the intent to start it until its processes are gone."""

    # in the environment of every process of the instance (MODELCTL_INSTANCE): the proof that a
    # process is this instance's, also before its pid is recorded and after its leader is gone
    token: str
    fingerprint: str  # of the spec it was started with
    started_at: float
    generation: int = 0  # the wish's generation it was started for
    pid: int | None = None
    create_time: float | None = None
    ready_at: float | None = None
    members: list[list[float]] = field(default_factory=list)  # [pid, create_time] of descendants seen
    stop_owner: list[float] | None = None  # [pid, create_time] of whoever carries out a stop

    # on disk these are [pid, create_time] pairs; in code they are identities, read only here
    @property
    def leader(self) -> ProcessIdentity | None:
        """The instance's recorded leader, once its spawn is recorded."""
        if self.pid is None or self.create_time is None:
            return None
        return ProcessIdentity(self.pid, self.create_time)

    @property
    def member_identities(self) -> tuple[ProcessIdentity, ...]:
        """The descendants seen while the leader lived: proof for those that clear their environment."""
        return tuple(ProcessIdentity(int(p), float(c)) for p, c in self.members)

    @property
    def stopper(self) -> ProcessIdentity | None:
        """Whoever carries out a stop of this instance."""
        if self.stop_owner is None:
            return None
        pid, created = self.stop_owner
        return ProcessIdentity(int(pid), float(created))


@dataclass
class ExitEntry:
    """One failure in a server's history."""

    at: float | None
    exit: Exit | None  # None: it failed without exiting (a timeout, a start that could not happen)
    cls: str  # the failure's class (modelctl/failures.py)
    line: str
    retry: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "exit": self.exit.to_json() if self.exit else None,
            "class": self.cls,
            "line": self.line,
            "retry": self.retry,
        }


@dataclass
class FailedReplacement:
    """A new instance that could not take over: the old one keeps serving, and this spec and
    generation are not tried again until the profile or a restart asks anew."""

    fingerprint: str
    generation: int
    error: str


@dataclass
class History:
    """What the restart policy reads: failures, their timing, and what they were."""

    restarts: int = 0  # starts after a failure
    failures: list[float] = field(default_factory=list)  # times of failures inside the window
    consecutive_failures: int = 0
    next_start_at: float | None = None  # the end of a backoff
    last_exit: Exit | None = None
    last_error: str | None = None
    exits: list[ExitEntry] = field(default_factory=list)  # the last few, oldest first
    failed_replacement: FailedReplacement | None = None


@dataclass
class Usage:
    """How much a server holds and how it is used: the budget and the on-demand logic read it."""

    peak_rss: int | None = None  # the largest resident memory measured while ready (bytes)
    peak_gpu: int | None = None  # the same for GPU memory, per GPU of the server
    measured_for: str | None = None  # the spec (fingerprint) the peaks were measured with: a new spec starts afresh
    last_active: float | None = None  # when a request was last seen (its counters moved)
    wakes: int = 0  # on-demand starts by a client's connection (or `up --now`)
    warmed: int = 0  # the wish's `warm` requests carried out
    idle_stops: int = 0
    evictions: int = 0
    last_wake_seconds: float | None = None  # from the first waiting connection to ready
    last_eviction: str | None = None  # when, and why (which server needed the memory)
    waiting_since: float | None = None  # a client waits for this on-demand server to start


@dataclass
class ServerRecord:
    """One server: where it came from, where it listens, its state and the three parts above."""

    profile: str
    name: str
    kind: str = ""
    source: str = ""  # the profile file the spec came from
    spec: dict[str, Any] = field(default_factory=dict)  # the server's mapping as written in the profile
    fingerprint: str = ""  # of the spec wanted now
    host: str = "127.0.0.1"
    port: int | None = None
    url: str = ""
    gpus: list[int] = field(default_factory=list)
    state: State = states.STOPPED
    wish: Wish = field(default_factory=Wish)
    instance: Instance | None = None
    # a new instance started beside the serving one, on the same socket, to take over once ready
    successor: Instance | None = None
    history: History = field(default_factory=History)
    usage: Usage = field(default_factory=Usage)
    budget: dict[str, Any] | None = None  # the profile's budget when `up` wrote the record (modelctl/supervisor/budget.py)
    detail: str | None = None  # what is happening now ("pulling model", "unhealthy: ...")
    progress: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # facts from preparation (model digest, ...)
    startup: dict[str, Any] = field(default_factory=dict)  # phases of the last start, in seconds
    socket: str = ""  # the listening socket: "held" by the supervisor, "held by the instance", or why not
    updated_at: float | None = None
    version: int = RECORD_VERSION

    @property
    def ref(self) -> ServerRef:
        return ServerRef(self.profile, self.name)

    @property
    def label(self) -> str:
        return str(self.ref)

    @property
    def token(self) -> str | None:
        return self.instance.token if self.instance else None

    @property
    def pid(self) -> int | None:
        return self.instance.pid if self.instance else None

    @property
    def leader(self) -> ProcessIdentity | None:
        """The recorded leader of the server's instance, if one is recorded."""
        return self.instance.leader if self.instance else None

    @property
    def socket_mode(self) -> SocketMode:
        return socket_mode(self.socket)

    def set_socket(self, mode: SocketMode) -> None:
        self.socket = mode.text

    @property
    def wants_running(self) -> bool:
        return self.wish.desired == "running"

    @property
    def abandoned_replacement(self) -> str | None:
        """Why the new instance that the current wish asks for could not take over (the old one
        still serves), or None."""
        inst, failed = self.instance, self.history.failed_replacement
        if inst is None or failed is None or (failed.fingerprint, failed.generation) != (self.fingerprint, self.wish.generation):
            return None
        return failed.error if (inst.fingerprint, inst.generation) != (self.fingerprint, self.wish.generation) else None

    @property
    def outdated(self) -> bool:
        """The running instance is not what is wanted now (a new spec, a restart), and its
        replacement was not given up."""
        inst = self.instance
        if inst is None or (inst.fingerprint == self.fingerprint and inst.generation == self.wish.generation):
            return False
        failed = self.history.failed_replacement
        return failed is None or (failed.fingerprint, failed.generation) != (self.fingerprint, self.wish.generation)

    def to_json(self) -> dict[str, Any]:
        return plain(self)

    @classmethod
    def from_json(cls, data: Any) -> ServerRecord:
        """Build a record from its JSON (any version), checking every field; ValueError says which is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        version = data.get("version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and version > RECORD_VERSION:
            raise NewerRecordError(version)
        if version in (1, 2):
            data = upgrade_flat_record(data)
        record = _build(cls, data, "")
        for key in ("profile", "name"):
            if not is_valid_name(getattr(record, key)):
                raise ValueError(f"field {key!r} is missing or not a valid name")
        if record.state not in states.STATES:
            raise ValueError(f"field 'state' is not a known state: {record.state!r}")
        record.version = RECORD_VERSION
        return record


class NewerRecordError(ValueError):
    """A record written by a newer modelctl: read as it is, it would lose what this version does not know."""

    def __init__(self, version: int):
        super().__init__(
            f"written by a newer modelctl (record version {version}; this modelctl reads up to version {RECORD_VERSION}): "
            "upgrade modelctl; this one neither changes nor rewrites it"
        )
        self.version = version


# ---------------------------------------------------------------------- versions 1 and 2
_INSTANCE_FIELDS = ("pid", "create_time", "members", "stop_owner", "started_at", "ready_at")
_HISTORY_FIELDS = ("restarts", "failures", "consecutive_failures", "next_start_at", "last_error")


def upgrade_flat_record(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 or 2 record (every field at the top, exits as words) in version 3's shape."""
    out = {k: v for k, v in data.items() if k not in (*_INSTANCE_FIELDS, *_HISTORY_FIELDS)}
    for key in ("instance", "running_fingerprint", "desired", "managed_by", "last_exit", "exits"):
        out.pop(key, None)
    out["wish"] = {k: data[k] for k in ("desired", "managed_by") if k in data}
    token = data.get("instance")
    if (isinstance(token, str) and token) or data.get("pid") is not None:
        out["instance"] = {
            "token": token if isinstance(token, str) and token else "",
            "fingerprint": data.get("running_fingerprint") or data.get("fingerprint") or "",
            "started_at": data.get("started_at") or 0.0,
            **{k: data[k] for k in _INSTANCE_FIELDS if k in data and k != "started_at"},
        }
    last_exit = Exit.from_text(data.get("last_exit")) if isinstance(data.get("last_exit"), str) else None
    exits = []
    for entry in data.get("exits") or []:
        if isinstance(entry, dict):
            text = entry.get("exit")
            exit = Exit.from_text(text) if isinstance(text, str) else None
            exits.append(
                {
                    "at": entry.get("at"),
                    "exit": dataclasses.asdict(exit) if exit else None,
                    "cls": str(entry.get("class") or "crash"),
                    "line": str(entry.get("line") or ""),
                    "retry": bool(entry.get("retry", True)),
                }
            )
    out["history"] = {
        **{k: data[k] for k in _HISTORY_FIELDS if k in data},
        "last_exit": dataclasses.asdict(last_exit) if last_exit else None,
        "exits": exits,
    }
    return out


# ---------------------------------------------------------------------- JSON both ways
def plain(obj: Any) -> Any:
    """A record (or part) as JSON values: like dataclasses.asdict, without its deep copies (the
    supervisor compares records this way after each of its ticks, so it must be cheap)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    return obj


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = get_type_hints(cls)
    return _HINTS[cls]


def _build(cls: Any, data: Any, where: str) -> Any:
    """A dataclass from JSON, every field checked against its annotation; unknown keys are left out
    (a newer version's fields), missing ones take their defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"field {where.rstrip('.') or 'record'!r} must be a JSON object, got {type(data).__name__}")
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"field {where + f.name!r} is missing")
            continue
        values[f.name] = _value(data[f.name], hints[f.name], where + f.name)
    return cls(**values)


def _value(value: Any, hint: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        args = get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _value(value, arg, where)
            except ValueError:
                continue
        raise _wrong(where, value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where + ".")
    if origin is Literal:
        if value not in get_args(hint):
            raise ValueError(f"field {where!r} must be one of {', '.join(map(str, get_args(hint)))}, not {str(value)[:40]!r}")
        return value
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        if not isinstance(value, list):
            raise _wrong(where, value)
        return [_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _wrong(where, value)
        return value
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _wrong(where, value)
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _wrong(where, value)
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise _wrong(where, value)


def _wrong(where: str, value: Any) -> ValueError:
    return ValueError(f"field {where!r} has a wrong type ({type(value).__name__}: {str(value)[:40]!r})")
