"""The state directory: one record per server, a bounded lock, logs.

Layout:  <root>/servers/<profile>/<server>.json   the record (written to a temp file, then renamed)
         <root>/logs/<profile>/<server>.log       the server's stdout and stderr (0600, rotated)
         <root>/supervisor.json                   the supervisor's identity; its mtime is the heartbeat
         <root>/supervisor.log

Every record on disk is accounted for: one that cannot be read is a `BrokenRecord` that names
its file, never skipped. The lock is a flock on the servers/ directory itself, which cannot be
deleted or replaced under a holder; waits for it are bounded and name the holder. Records of the
layout before profiles were projects are read through modelctl/state/legacy.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from modelctl.host.files import (  # noqa: F401  (LockTimeout, StateDirError: the store's errors)
    DiskError,
    LockTimeout,
    StateDirError,
    acquire_flock,
    make_private_dir,
    read_private_file,
    write_atomic,
)
from modelctl.names import ServerRef, is_valid_name
from modelctl.state.legacy import LegacyLayout
from modelctl.state.record import ServerRecord

LOCK_TIMEOUT = float(os.environ.get("MODELCTL_LOCK_TIMEOUT", "5"))
MAX_RECORD_BYTES = 1 << 20


def default_state_dir() -> Path:
    if os.environ.get("MODELCTL_STATE_DIR"):
        return Path(os.environ["MODELCTL_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "modelctl"


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
Stamp = tuple[int, int, int]  # inode, size, mtime_ns: a record file changed when its stamp did


class StateStore:
    """Records on disk. Writers hold the lock around read-modify-write; readers need no lock."""

    def __init__(self, root: str | os.PathLike[str] | None = None):
        self.root = Path(root) if root is not None else default_state_dir()
        self._local = threading.local()
        self._checked: set[Path] = set()
        self._migrated = False
        self.legacy = LegacyLayout(self.servers_dir, self.logs_dir)

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
            make_private_dir(d, parents=d == self.root)
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
                    self._migrated = True
                    self.legacy.migrate(self.record_path, self.log_path, self.ensure)
                yield
            finally:
                self._local.depth = 0
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # --- records ---
    def refs(self, profile: str | None = None) -> list[ServerRef]:
        """Every server with a record (readable or not), without reading the records."""
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
        found.update(ref for ref in self.legacy.refs() if profile is None or ref.profile == profile)
        return sorted(found)

    def _path_of(self, ref: ServerRef) -> Path:
        path = self.record_path(ref)
        if not path.exists() and (legacy := self.legacy.path(ref)) is not None:
            return legacy
        return path

    def stamp(self, ref: ServerRef) -> Stamp | None:
        """What changes whenever the record's file is written (a rename gives a new inode)."""
        try:
            st = os.stat(self._path_of(ref), follow_symlinks=False)
        except OSError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def load(self, ref: ServerRef) -> AnyRecord | None:
        """The record, a BrokenRecord if it cannot be read, or None if there is none."""
        path = self._path_of(ref)
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
            record = ServerRecord.from_json(data)
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
        """Write a record whole (temp file, fsync, rename); DiskError leaves the old one as it was."""
        path = self.record_path(record.ref)
        self.ensure(path.parent)
        record.updated_at = now if now is not None else time.time()
        write_atomic(path, json.dumps(record.to_json(), indent=1, sort_keys=True))

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
            before = record.to_json()
            change(record)
            if record.to_json() != before:
                self.save(record)
            return record
