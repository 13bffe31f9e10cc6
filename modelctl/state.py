"""The state directory: one record per server, a bounded lock, logs.

Layout:  <root>/servers/<profile>/<server>.json   the record (written to a temp file, then renamed)
         <root>/logs/<profile>/<server>.log       the server's stdout and stderr (0600, rotated)
         <root>/supervisor.json                   the supervisor's identity; its mtime is the heartbeat
         <root>/supervisor.log

Records written before profiles were projects lie at <root>/servers/<server>.json; they are read
in place (their profile is the one their source file names, else `default`) and moved into the
layout above the first time a command takes the lock.

Every record on disk is accounted for: one that cannot be read is a `BrokenRecord` that names
its file, never skipped. The lock is a flock on the servers/ directory itself, which cannot be
deleted or replaced under a holder; waits for it are bounded and name the holder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import stat
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin, get_type_hints

from modelctl import lifecycle
from modelctl.errors import ModelctlError
from modelctl.names import DEFAULT_PROFILE_NAME, ServerRef, is_valid_name

LOCK_TIMEOUT = float(os.environ.get("MODELCTL_LOCK_TIMEOUT", "5"))
RECORD_VERSION = 2
MAX_RECORD_BYTES = 1 << 20


def default_state_dir() -> Path:
    if os.environ.get("MODELCTL_STATE_DIR"):
        return Path(os.environ["MODELCTL_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "modelctl"


class StateDirError(ModelctlError):
    """A state directory modelctl refuses to use (a symlink, writable by others, not ours)."""

    exit_code = 2


class LockTimeout(ModelctlError):
    """The state lock stayed taken past the bounded wait."""


@dataclass
class ServerRecord:
    """What modelctl knows about one server; the JSON on disk mirrors these fields."""

    profile: str
    name: str
    kind: str = ""
    source: str = ""  # the profile file the spec came from
    spec: dict[str, Any] = field(default_factory=dict)  # the server's mapping as written in the profile
    fingerprint: str = ""  # of the spec wanted now
    running_fingerprint: str | None = None  # of the spec the running instance was started with
    desired: str = "running"  # running | stopped
    state: str = lifecycle.STOPPED
    managed_by: str = "supervisor"  # supervisor | systemd (modelctl run)
    host: str = "127.0.0.1"
    port: int | None = None
    url: str = ""
    gpus: list[int] = field(default_factory=list)
    pid: int | None = None
    create_time: float | None = None
    # a token in the environment of the instance's processes: the proof that a process whose
    # leader is gone is still this server's (MODELCTL_INSTANCE)
    instance: str | None = None
    members: list[list[float]] = field(default_factory=list)  # [pid, create_time] of descendants seen
    stop_owner: list[float] | None = None  # [pid, create_time] of the command carrying out a stop
    started_at: float | None = None
    ready_at: float | None = None
    restarts: int = 0
    failures: list[float] = field(default_factory=list)  # times of recent failures (crash-loop window)
    consecutive_failures: int = 0
    next_start_at: float | None = None
    last_exit: str | None = None  # "exit code 1", "killed by SIGKILL", ...
    last_error: str | None = None
    detail: str | None = None  # what is happening now ("pulling model", "unhealthy: ...")
    progress: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)  # facts from preparation (model digest, ...)
    startup: dict[str, Any] = field(default_factory=dict)  # phases of the last start, in seconds
    exits: list[dict[str, Any]] = field(default_factory=list)  # the last exits, oldest first
    updated_at: float | None = None
    version: int = RECORD_VERSION

    @property
    def ref(self) -> ServerRef:
        return ServerRef(self.profile, self.name)

    @property
    def label(self) -> str:
        return str(self.ref)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> ServerRecord:
        """Build a record from its JSON, checking every field's type; ValueError says which is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        known = _field_types()
        clean = {}
        for key, value in data.items():
            if key not in known:
                continue  # a field of a newer version: kept out, not an error
            if not _conforms(value, known[key]):
                raise ValueError(f"field {key!r} has a wrong type ({type(value).__name__}: {str(value)[:40]!r})")
            clean[key] = value
        for key in ("profile", "name"):
            if not is_valid_name(clean.get(key)):
                raise ValueError(f"field {key!r} is missing or not a valid name")
        if clean.get("state", lifecycle.STOPPED) not in lifecycle.STATES:
            raise ValueError(f"field 'state' is not a known state: {clean['state']!r}")
        if clean.get("desired", "running") not in ("running", "stopped"):
            raise ValueError(f"field 'desired' must be running or stopped, not {clean['desired']!r}")
        return cls(**clean)


@dataclass(frozen=True)
class BrokenRecord:
    """A record file that cannot be read: shown with its path, never hidden or overwritten."""

    ref: ServerRef
    path: Path
    error: str
    data: dict[str, Any] | None = None  # what could be parsed, for finding the process it names

    @property
    def label(self) -> str:
        return str(self.ref)


AnyRecord = Union[ServerRecord, BrokenRecord]


class StateStore:
    """Records on disk. Writers hold the lock around read-modify-write; readers need no lock."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root) if root is not None else default_state_dir()
        self._local = threading.local()
        self._checked: set[Path] = set()
        self._migrated = False
        self._legacy_profiles: dict[str, str] = {}

    # --- layout ---
    @property
    def servers_dir(self) -> Path:
        return self.root / "servers"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def record_path(self, ref: ServerRef) -> Path:
        return self.servers_dir / ref.profile / f"{ref.name}.json"

    def log_path(self, ref: ServerRef) -> Path:
        return self.logs_dir / ref.profile / f"{ref.name}.log"

    def ensure(self, *subdirs: Path) -> None:
        """Create (0700) or check the state directories; refuse ones another user could tamper with."""
        for d in (self.root, self.servers_dir, self.logs_dir, *subdirs):
            if d in self._checked:
                continue
            try:
                d.mkdir(mode=0o700, parents=d == self.root)
            except FileExistsError:
                pass
            check_private_dir(d)
            self._checked.add(d)

    def exists(self) -> bool:
        return self.servers_dir.is_dir()

    # --- locking ---
    @contextlib.contextmanager
    def locked(self, timeout: float | None = None) -> Iterator[None]:
        """Exclusive lock on the state directory; re-entrant within a thread; waits at most `timeout`."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        self.ensure()
        fd = os.open(self.servers_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            acquire_flock(fd, LOCK_TIMEOUT if timeout is None else timeout, f"the state directory {self.root}")
            self._local.depth = 1
            try:
                if not self._migrated:
                    self._migrate_legacy()
                yield
            finally:
                self._local.depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # --- records ---
    def refs(self, profile: str | None = None) -> list[ServerRef]:
        """Every server with a record (readable or not), without reading the new-layout records."""
        if not self.servers_dir.is_dir():
            return []
        found: set[ServerRef] = set()
        with os.scandir(self.servers_dir) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False) and is_valid_name(entry.name):
                    if profile is not None and entry.name != profile:
                        continue
                    with os.scandir(entry.path) as files:
                        for f in files:
                            stem = f.name[:-5]
                            if f.name.endswith(".json") and is_valid_name(stem):
                                found.add(ServerRef(entry.name, stem))
                elif entry.name.endswith(".json") and is_valid_name(entry.name[:-5]):
                    ref = ServerRef(self._legacy_profile(Path(entry.path)), entry.name[:-5])
                    if profile is None or ref.profile == profile:
                        found.add(ref)
        return sorted(found)

    def load(self, ref: ServerRef) -> AnyRecord | None:
        """The record, a BrokenRecord if it cannot be read, or None if there is none."""
        path = self.record_path(ref)
        if not path.exists() and (legacy := self._legacy_path(ref)) is not None:
            path = legacy
        try:
            text = read_private_file(path, MAX_RECORD_BYTES)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return BrokenRecord(ref, path, f"cannot read: {e}")
        try:
            data = json.loads(text)
        except ValueError as e:
            return BrokenRecord(ref, path, f"not valid JSON ({e})")
        if isinstance(data, dict) and "profile" not in data:
            data = {**data, "profile": ref.profile}  # written before profiles were projects
        try:
            record = ServerRecord.from_dict(data)
        except (ValueError, TypeError) as e:
            return BrokenRecord(ref, path, str(e), data if isinstance(data, dict) else None)
        if record.ref != ref:
            return BrokenRecord(ref, path, f"names server {record.label}, not {ref}", data)
        return record

    def load_all(self, profile: str | None = None) -> list[AnyRecord]:
        records = []
        for ref in self.refs(profile):
            record = self.load(ref)
            if record is not None:
                records.append(record)
        return records

    def records(self, profile: str | None = None) -> list[ServerRecord]:
        """The readable records only: for decisions that need a record's fields."""
        return [r for r in self.load_all(profile) if isinstance(r, ServerRecord)]

    def save(self, record: ServerRecord, now: float | None = None) -> None:
        path = self.record_path(record.ref)
        self.ensure(path.parent)
        record.updated_at = now if now is not None else time.time()
        write_atomic(path, json.dumps(record.to_dict(), indent=1, sort_keys=True))

    def delete(self, ref: ServerRef) -> None:
        """Forget a server (its log stays); called under the lock."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.record_path(ref))

    def update(self, ref: ServerRef, change: Callable[[ServerRecord], None]) -> ServerRecord | None:
        """Read, change and write one record under the lock; None if there is no readable record."""
        with self.locked():
            record = self.load(ref)
            if not isinstance(record, ServerRecord):
                return None
            before = record.to_dict()
            change(record)
            if record.to_dict() != before:
                self.save(record)
            return record

    # --- records from before profiles were projects ---
    def _legacy_path(self, ref: ServerRef) -> Path | None:
        path = self.servers_dir / f"{ref.name}.json"
        return path if path.exists() and self._legacy_profile(path) == ref.profile else None

    def _legacy_profile(self, path: Path) -> str:
        """The profile of an old record: the `name:` of its source profile, its file stem, or default."""
        key = str(path)
        if key not in self._legacy_profiles:
            self._legacy_profiles[key] = _profile_of_source(path)
        return self._legacy_profiles[key]

    def _migrate_legacy(self) -> None:
        """Move old records (and their logs) into servers/<profile>/; called under the lock."""
        self._migrated = True
        if not self.servers_dir.is_dir():
            return
        for path in sorted(self.servers_dir.glob("*.json")):
            ref = ServerRef(self._legacy_profile(path), path.stem)
            target = self.record_path(ref)
            self.ensure(target.parent, self.log_path(ref).parent)
            if target.exists():
                os.replace(path, path.with_name(path.name + ".conflict"))
                continue
            old_log = self.logs_dir / f"{ref.name}.log"
            for old in sorted(self.logs_dir.glob(f"{ref.name}.log*")):
                # a running server keeps writing to its open file: rename keeps the inode
                suffix = old.name[len(old_log.name) :]
                if suffix == "" or suffix[1:].isdigit():
                    os.replace(old, self.log_path(ref).with_name(self.log_path(ref).name + suffix))
            os.replace(path, target)


def _profile_of_source(record_path: Path) -> str:
    try:
        data = json.loads(read_private_file(record_path, MAX_RECORD_BYTES))
        source = data.get("source") if isinstance(data, dict) else None
    except (OSError, ValueError):
        return DEFAULT_PROFILE_NAME
    if not isinstance(source, str) or not source:
        return DEFAULT_PROFILE_NAME
    from modelctl.profile import peek_profile_name

    return peek_profile_name(Path(source))


# ---------------------------------------------------------------------- files, safely
def check_private_dir(path: Path) -> None:
    """Refuse a directory that is a symlink, not ours, or writable by others — never chmod through it."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise StateDirError(f"{path} is a symlink; modelctl does not follow it (use the real directory as --state-dir)")
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"{path} is not a directory")
    if st.st_uid != os.geteuid():
        raise StateDirError(f"{path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}); use a state directory of your own")
    if st.st_mode & 0o022:
        raise StateDirError(
            f"{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}), who could plant records or "
            f"symlinks in it; fix it with: chmod go-w {path}"
        )


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """open(2) that never follows a symlink and refuses a file others may write."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022 or st.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(errno.EPERM, f"{path} is not a private regular file of yours (mode {stat.S_IMODE(st.st_mode):04o})")
    return fd


def read_private_file(path: Path, limit: int) -> str:
    try:
        fd = open_private(path, os.O_RDONLY)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symlink") from None
        raise
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path} is larger than {limit} bytes")
    return data.decode("utf-8", "replace")


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Write to a temporary file in the same directory, fsync, rename: readers never see a torn file.

    mkstemp creates with O_EXCL, and rename replaces a symlink rather than following it.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------- bounded flock
def acquire_flock(fd: int, timeout: float, what: str, shared: bool = False) -> None:
    """flock(fd) waiting at most `timeout` seconds; LockTimeout names the process holding it."""
    op = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        try:
            fcntl.flock(fd, op)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                break
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
    holders = lock_holders(fd)
    from modelctl.process import describe_process

    who = ", ".join(describe_process(pid) for pid in holders) or "a process this user cannot see"
    hint = f"; if it is stopped or hung, resume it (kill -CONT {holders[0]}) or end it" if holders else ""
    raise LockTimeout(f"{what} is locked by {who} for more than {timeout:g}s{hint}")


def lock_holders(fd: int) -> list[int]:
    """Pids holding a flock on fd's file, from /proc/locks (Linux); empty where unknown."""
    st = os.fstat(fd)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
                    continue  # waiters are marked "->"; only holders count
                maj, mino, ino = parts[5].split(":")
                if (int(maj, 16), int(mino, 16), int(ino)) == want and int(parts[4]) > 0:
                    pids.append(int(parts[4]))
    except (OSError, ValueError):
        return []
    return sorted(set(pids) - {os.getpid()})


# ---------------------------------------------------------------------- record field types
_FIELD_TYPES: dict[str, Any] | None = None


def _field_types() -> dict[str, Any]:
    global _FIELD_TYPES
    if _FIELD_TYPES is None:
        hints = get_type_hints(ServerRecord)
        _FIELD_TYPES = {f.name: hints[f.name] for f in dataclasses.fields(ServerRecord)}
    return _FIELD_TYPES


def _conforms(value: Any, hint: Any) -> bool:
    """Does a JSON value fit a field's annotation (str, int, float, list[...], dict[...], unions)?"""
    if hint is Any:
        return True
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)
