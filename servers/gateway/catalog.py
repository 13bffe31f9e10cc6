"""What the gateway knows about the servers: read from the supervisor's records, never from a client.

Records are JSON files, `<state>/servers/PROFILE/SERVER.json` (modelctl/state.py writes them to
a temporary file and renames it), so a reader needs no lock and never sees a torn file. The
catalog keeps each file's stamp (inode, size, mtime) and reads again only the files that
changed. A record that cannot be read is counted and named in /health, never guessed at.

The only addresses the gateway ever forwards to are the `url`s of these records.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from modelctl.served_names import OLLAMA, aliases_of, names_of, served_name, task_of

log = logging.getLogger("gateway")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")  # modelctl/names.py: profile and server names
MAX_RECORD_BYTES = 1 << 20
GATEWAY_KIND = "gateway"


@dataclass(frozen=True)
class Server:
    """One server as a route: where it listens, what it serves, how it is doing."""

    profile: str
    name: str
    kind: str
    url: str  # http://host:port, from the record: the only kind of address requests go to
    state: str
    task: str
    served: str  # the model name the server itself answers to
    names: Mapping[str, str]  # every name that reaches it → the profile key it comes from
    aliases: tuple[str, ...] = ()
    start: str = "always"  # or on-demand
    last_error: str | None = None
    memory: int | None = None  # bytes: the measured peak, else what the profile declares
    api_key: str | None = None  # the server's own key, sent on its behalf when the gateway has one
    max_concurrency: int | None = None
    max_queue: int | None = None
    startup_timeout: float | None = None
    model: str = ""  # what the profile says it runs (a hub name, a path, an Ollama model)
    info: Mapping[str, Any] = field(default_factory=dict)
    instance: str = ""  # the running instance's token: what a server reports holds for it alone
    named_by_profile: bool = True  # False: a command server without model_name, asked what it serves

    @property
    def label(self) -> str:
        return f"{self.profile}/{self.name}"

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) of a plain http:// URL, for the gateway's lean client; None for https."""
        parts = urlsplit(self.url)
        if parts.scheme != "http" or parts.hostname is None:
            return None
        return parts.hostname, parts.port or 80

    def serves(self, family: str) -> bool:
        """Whether requests of an endpoint family (a task, or Ollama's API) may reach it."""
        return self.kind == "ollama" if family == OLLAMA else self.task == family


def server_from_record(data: Mapping[str, Any]) -> Server | None:
    """A route from a record's JSON; None for records the gateway does not route to (itself,
    a server without a port yet, a URL that is not plain http://host:port)."""
    profile, name, kind = data.get("profile"), data.get("name"), data.get("kind")
    if not (isinstance(profile, str) and NAME.fullmatch(profile) and isinstance(name, str) and NAME.fullmatch(name)):
        return None
    if not isinstance(kind, str) or kind == GATEWAY_KIND:
        return None
    url = data.get("url")
    if not isinstance(url, str) or not is_server_url(url):
        return None
    spec = data.get("spec") if isinstance(data.get("spec"), dict) else {}
    assert isinstance(spec, dict)
    history = data.get("history") if isinstance(data.get("history"), dict) else {}
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    assert isinstance(history, dict) and isinstance(usage, dict)
    memory = usage.get("peak_rss") if isinstance(usage.get("peak_rss"), int) else None
    if memory is None:
        memory = _size(spec.get("memory"))
    state = data.get("state") if isinstance(data.get("state"), str) else "stopped"
    assert isinstance(state, str)
    return Server(
        profile=profile,
        name=name,
        kind=kind,
        url=url.rstrip("/"),
        state=state,
        task=task_of(kind, spec),
        served=served_name(kind, name, spec),
        names=names_of(kind, profile, name, spec),
        aliases=tuple(aliases_of(spec)),
        start="on-demand" if spec.get("start") == "on-demand" else "always",
        last_error=history.get("last_error") if isinstance(history.get("last_error"), str) else None,
        memory=memory,
        api_key=spec.get("api_key") if isinstance(spec.get("api_key"), str) else None,
        max_concurrency=_count(spec.get("max_concurrency")),
        max_queue=_count(spec.get("max_queue")),
        startup_timeout=_seconds(spec.get("startup_timeout")),
        model=str(spec.get("model") or ""),
        info=_mapping(data.get("info")),
        instance=str(_mapping(data.get("instance")).get("token") or ""),
        named_by_profile=kind != "command" or isinstance(spec.get("model_name"), str),
    )


class Catalog:
    """The servers of some profiles (or of every profile) in a state directory, kept current by
    `refresh()`, which reads only the record files that changed since it last looked."""

    def __init__(self, state_dir: Path, profiles: Iterable[str] | None = None, home: str | None = None):
        self.servers_dir = Path(state_dir) / "servers"
        self.profiles = None if profiles is None else frozenset(profiles)
        self.home = home  # the gateway's own profile: its names win over another profile's
        self._files: dict[Path, tuple[tuple[int, int, int], Server | None]] = {}
        self.unreadable: dict[str, str] = {}
        self.servers: list[Server] = []
        self._by_name: dict[str, list[Server]] = {}
        # what servers without a name in the profile said they serve (their /v1/models), per instance
        self.reported: dict[str, tuple[str, tuple[str, ...]]] = {}

    def refresh(self) -> bool:
        """Read the records that changed; True when anything did."""
        seen: set[Path] = set()
        changed = False
        for path in self._record_paths():
            seen.add(path)
            try:
                st = path.stat()
            except OSError:
                continue
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            old = self._files.get(path)
            if old is not None and old[0] == stamp:
                continue
            changed = True
            self._files[path] = (stamp, self._read(path, st.st_size))
        for gone in set(self._files) - seen:
            del self._files[gone]
            self.unreadable.pop(str(gone), None)
            changed = True
        if changed:
            self.servers = sorted((s for _, s in self._files.values() if s is not None), key=lambda s: (s.profile, s.name))
            self._index()
        return changed

    def report(self, server: Server, names: Iterable[str]) -> None:
        """The model ids a server said it serves, for its current instance."""
        self.reported[server.label] = (server.instance, tuple(names))
        self._index()

    def reported_names(self, server: Server) -> tuple[str, ...]:
        instance, names = self.reported.get(server.label, ("", ()))
        return names if instance == server.instance else ()

    def _index(self) -> None:
        by_name: dict[str, list[Server]] = {}
        for server in self.servers:
            for name in (*server.names, *self.reported_names(server)):
                found = by_name.setdefault(name, [])
                if not any(s is server for s in found):
                    found.append(server)
        self._by_name = by_name

    def _record_paths(self) -> list[Path]:
        try:
            profiles = [e for e in os.scandir(self.servers_dir) if e.is_dir(follow_symlinks=False) and NAME.fullmatch(e.name)]
        except OSError:
            return []
        paths = []
        for entry in profiles:
            if self.profiles is not None and entry.name not in self.profiles:
                continue
            try:
                files = list(os.scandir(entry.path))
            except OSError:
                continue
            paths += [Path(f.path) for f in files if f.name.endswith(".json") and not f.name.startswith(".")]
        return paths

    def _read(self, path: Path, size: int) -> Server | None:
        try:
            if size > MAX_RECORD_BYTES:
                raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
            # O_NOFOLLOW: a record is never read through a symlink (modelctl never writes one)
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                data = json.loads(f.read(MAX_RECORD_BYTES + 1))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            server = server_from_record(data)
            if server is not None and (server.profile, server.name) != (path.parent.name, path.stem):
                raise ValueError(f"names {server.label}, not {path.parent.name}/{path.stem}")
        except (OSError, ValueError) as e:
            self.unreadable[str(path)] = str(e)[:200]
            log.warning("cannot read the record %s: %s", path, e)
            return None
        self.unreadable.pop(str(path), None)
        return server

    def named(self, name: str) -> list[Server]:
        """Every server a name reaches, whatever its task."""
        return self._by_name.get(name, [])

    def lookup(self, name: str, family: str) -> list[Server]:
        """The servers `name` reaches for an endpoint family; those of the gateway's own profile
        first and alone when it has any."""
        found = [s for s in self._by_name.get(name, []) if s.serves(family)]
        if len(found) > 1 and self.home is not None:
            home = [s for s in found if s.profile == self.home]
            if home:
                return home
        return found

    def of_family(self, family: str) -> list[Server]:
        return [s for s in self.servers if s.serves(family)]

    def known_names(self, family: str | None = None) -> list[str]:
        """The names a client may use (served names and aliases; PROFILE/SERVER always works)."""
        out: list[str] = []
        for s in self.servers:
            if family is None or s.serves(family):
                for name in (s.served, *s.aliases, *self.reported_names(s)):
                    if name not in out:
                        out.append(name)
        return out


def is_server_url(url: str) -> bool:
    """http(s)://host[:port] and nothing more: no credentials, path, query or fragment."""
    try:
        parts = urlsplit(url.rstrip("/"))
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and not (parts.username or parts.password or parts.path or parts.query or parts.fragment)
    )


def _mapping(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else None


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?", re.I)


def _size(value: Any) -> int | None:
    """A declared size (650MiB, 2G, bytes) as modelctl/spec.py reads it."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value.strip())):
        return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))
    return None
