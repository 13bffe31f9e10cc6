"""The state directory: one record per server, a lock, logs.

Layout:  <root>/servers/<name>.json   the record (written to a temp file, then renamed)
         <root>/logs/<name>.log       the server's stdout and stderr (0600)
         <root>/lock                  flock held briefly by whoever reads-modifies-writes
         <root>/supervisor.json       the supervisor's identity; supervisor.lock is held for its life
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from modelctl import lifecycle


def default_state_dir() -> Path:
    if os.environ.get("MODELCTL_STATE_DIR"):
        return Path(os.environ["MODELCTL_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "modelctl"


@dataclass
class ServerRecord:
    """What modelctl knows about one server; the JSON on disk mirrors these fields."""

    name: str
    kind: str = ""
    source: str = ""  # the profile file the spec came from
    spec: dict[str, Any] = field(default_factory=dict)  # the server's mapping as written in the profile
    fingerprint: str = ""
    desired: str = "running"  # running | stopped
    state: str = lifecycle.STOPPED
    managed_by: str = "supervisor"  # supervisor | systemd (modelctl run)
    host: str = "127.0.0.1"
    port: int | None = None
    url: str = ""
    gpus: list[int] = field(default_factory=list)
    pid: int | None = None
    create_time: float | None = None
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
    updated_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ServerRecord":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def move(self, state: str) -> None:
        """Change state through the lifecycle table."""
        lifecycle.check_move(self.state, state, self.name)
        self.state = state


class StateStore:
    """Records on disk. Writers hold the lock around read-modify-write; readers need no lock."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_state_dir()
        self._local = threading.local()

    # --- layout ---
    @property
    def servers_dir(self) -> Path:
        return self.root / "servers"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    def log_path(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def record_path(self, name: str) -> Path:
        return self.servers_dir / f"{name}.json"

    def ensure(self) -> None:
        for d in (self.root, self.servers_dir, self.logs_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)

    # --- locking ---
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive lock on the state directory; re-entrant within a thread."""
        depth = getattr(self._local, "depth", 0)
        if depth:
            self._local.depth = depth + 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        self.ensure()
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._local.depth = 1
            try:
                yield
            finally:
                self._local.depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # --- records ---
    def load(self, name: str) -> ServerRecord | None:
        try:
            data = json.loads(self.record_path(name).read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, OSError):
            return None
        return ServerRecord.from_dict(data)

    def names(self) -> list[str]:
        """Names of the servers that have a record, without reading the records."""
        if not self.servers_dir.is_dir():
            return []
        return sorted(path.stem for path in self.servers_dir.glob("*.json"))

    def load_all(self) -> list[ServerRecord]:
        records = []
        for name in self.names():
            record = self.load(name)
            if record is not None:
                records.append(record)
        return records

    def save(self, record: ServerRecord, now: float | None = None) -> None:
        import time

        self.ensure()
        record.updated_at = now if now is not None else time.time()
        write_atomic(self.record_path(record.name), json.dumps(record.to_dict(), indent=1, sort_keys=True))

    def update(self, name: str, change: Callable[[ServerRecord], None]) -> ServerRecord | None:
        """Read, change and write one record under the lock; None if there is no record."""
        with self.locked():
            record = self.load(name)
            if record is None:
                return None
            change(record)
            self.save(record)
            return record


def write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    """Write to a temporary file in the same directory, fsync, rename: readers never see a torn file."""
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
