"""Records written before profiles were projects: `servers/<server>.json`, logs `logs/<server>.log*`.

They are read in place (their profile is the one their source file names, else `default`) and
moved into `servers/<profile>/` and `logs/<profile>/` the first time a command takes the lock.
The store (modelctl/state/store.py) asks this module; nothing else knows the old layout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from modelctl.host.files import read_private_file
from modelctl.names import DEFAULT_PROFILE_NAME, ServerRef, is_valid_name
from modelctl.yamlfile import peek_profile_name

MAX_RECORD_BYTES = 1 << 20


class LegacyLayout:
    """The flat layout under one state directory."""

    def __init__(self, servers_dir: Path, logs_dir: Path):
        self.servers_dir, self.logs_dir = servers_dir, logs_dir
        self._profiles: dict[str, str] = {}

    def refs(self) -> Iterator[ServerRef]:
        """Every old record, named with its profile."""
        if not self.servers_dir.is_dir():
            return
        with os.scandir(self.servers_dir) as entries:
            for entry in entries:
                if entry.name.endswith(".json") and is_valid_name(entry.name[:-5]) and not entry.is_dir(follow_symlinks=False):
                    yield ServerRef(self.profile_of(Path(entry.path)), entry.name[:-5])

    def path(self, ref: ServerRef) -> Path | None:
        """The old record of `ref`, if there is one and its profile is ref's."""
        path = self.servers_dir / f"{ref.name}.json"
        return path if path.exists() and self.profile_of(path) == ref.profile else None

    def profile_of(self, path: Path) -> str:
        """The profile of an old record: the `name:` of its source profile, its file stem, or default."""
        key = str(path)
        if key not in self._profiles:
            self._profiles[key] = _profile_of_source(path)
        return self._profiles[key]

    def migrate(self, record_path: Callable[[ServerRef], Path], log_path: Callable[[ServerRef], Path], ensure: Callable[..., None]) -> None:
        """Move old records (and their logs) into the profile layout; called under the lock."""
        if not self.servers_dir.is_dir():
            return
        for path in sorted(self.servers_dir.glob("*.json")):
            ref = ServerRef(self.profile_of(path), path.stem)
            target = record_path(ref)
            ensure(target.parent, log_path(ref).parent)
            if target.exists():
                os.replace(path, path.with_name(path.name + ".conflict"))
                continue
            old_log = self.logs_dir / f"{ref.name}.log"
            new_log = log_path(ref)
            for old in sorted(self.logs_dir.glob(f"{ref.name}.log*")):
                # a running server keeps writing to its open file: rename keeps the inode
                suffix = old.name[len(old_log.name) :]
                if suffix == "" or suffix[1:].isdigit():
                    os.replace(old, new_log.with_name(new_log.name + suffix))
            os.replace(path, target)


def _profile_of_source(record_path: Path) -> str:
    try:
        data = json.loads(read_private_file(record_path, MAX_RECORD_BYTES))
        source = data.get("source") if isinstance(data, dict) else None
    except (OSError, ValueError):
        return DEFAULT_PROFILE_NAME
    if not isinstance(source, str) or not source:
        return DEFAULT_PROFILE_NAME
    return peek_profile_name(Path(source))
