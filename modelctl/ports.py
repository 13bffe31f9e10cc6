"""Ports: is one free, who holds it, and the one allocation rule for `up`, `run` and unit generation.

A port is kept for a server's life, also while nothing listens on it (a server in backoff). So
that another state directory, or another user, does not take it meanwhile, ports are leased
machine-wide: one file per port in a shared sticky directory (like /tmp itself), created with
O_EXCL under a flock. A lease is live while its server's record still wants that port (checked
directly for our own user) or, for other users, while its owner's supervisor refreshes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from modelctl.errors import PortInUseError
from modelctl.names import ServerRef
from modelctl.process import describe_process

if TYPE_CHECKING:
    from modelctl.spec import ServerSpec

log = logging.getLogger("modelctl.ports")

DEFAULT_LEASE_DIR = "/tmp/modelctl-port-leases"
LEASE_TTL = 600.0  # a lease nobody refreshed for this long is stale (other users' leases)


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def is_port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server could bind host:port now (a socket in TIME_WAIT does not count)."""
    bind_host = host.strip("[]") or "0.0.0.0"
    with socket.socket(_family(bind_host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def port_holder(port: int) -> str | None:
    """Describe the process listening on `port`, or None if nobody (visible to us) is."""
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, PermissionError):
        return None
    for conn in conns:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return describe_process(conn.pid) if conn.pid else "another user's process"
    return None


def describe_port_in_use(port: int, host: str) -> str:
    holder = port_holder(port) or "a process modelctl cannot see (another user's?)"
    return f"port {port} on {host} is in use by {holder}"


# ---------------------------------------------------------------------- machine-wide leases
class PortLeases:
    """Leases of ports across state directories and users on this machine."""

    def __init__(self, state_dir: Path, directory: str | None = None):
        self.state_dir = str(Path(state_dir).resolve())
        self.dir = Path(directory or os.environ.get("MODELCTL_PORT_LEASES") or DEFAULT_LEASE_DIR)
        self.usable = self._prepare()

    def _prepare(self) -> bool:
        try:
            self.dir.mkdir(mode=0o1777, exist_ok=True)
            st = os.lstat(self.dir)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o1777:
                os.chmod(self.dir, 0o1777)  # ours, made just now under a umask
                st = os.lstat(self.dir)
        except OSError as e:
            log.warning("port leases disabled: %s: %s", self.dir, e.strerror or e)
            return False
        safe = stat.S_ISDIR(st.st_mode) and st.st_uid in (0, os.geteuid()) and (not st.st_mode & 0o002 or st.st_mode & stat.S_ISVTX)
        if not safe:
            log.warning("port leases disabled: %s is not a sticky directory of root or yours", self.dir)
        return bool(safe)

    @contextlib.contextmanager
    def locked(self, timeout: float = 3.0) -> Iterator[None]:
        """Serialise allocations machine-wide; a lock held too long is waited out, then skipped."""
        if not self.usable:
            yield
            return
        from modelctl.state import LockTimeout, acquire_flock

        try:
            fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
            if os.fstat(fd).st_uid == os.geteuid():
                os.fchmod(fd, 0o666)  # every user allocates under it; umask would narrow it
        except OSError as e:
            log.warning("port leases: cannot open %s/.lock: %s", self.dir, e.strerror or e)
            yield
            return
        try:
            try:
                acquire_flock(fd, timeout, f"the port lease directory {self.dir}")
            except LockTimeout as e:
                log.warning("%s; allocating without it (O_EXCL still guards each lease)", e)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _path(self, port: int) -> Path:
        return self.dir / str(port)

    def _read(self, port: int) -> tuple[dict | None, os.stat_result | None]:
        try:
            fd = os.open(self._path(port), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None, None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            try:
                data = json.loads(f.read(4096))
            except ValueError:
                data = {}
        return (data if isinstance(data, dict) else {}), st

    def holder(self, port: int, ref: ServerRef | None = None) -> str | None:
        """Who else holds a live lease on `port` (None: free to take, or ours already)."""
        if not self.usable:
            return None
        data, st = self._read(port)
        if st is None or data is None:
            return None
        if self._is_mine(data, ref):
            return None
        if not self._is_live(data, st, port):
            return None
        return f"server {data.get('server')} of {data.get('state_dir')} (uid {st.st_uid})"

    def is_mine(self, port: int, ref: ServerRef) -> bool:
        data, _ = self._read(port)
        return data is not None and self._is_mine(data, ref)

    def _is_mine(self, data: dict, ref: ServerRef | None) -> bool:
        return ref is not None and data.get("state_dir") == self.state_dir and data.get("server") == str(ref)

    def _is_live(self, data: dict, st: os.stat_result, port: int) -> bool:
        if st.st_uid == os.geteuid() and isinstance(data.get("state_dir"), str) and isinstance(data.get("server"), str):
            return _record_wants_port(Path(data["state_dir"]), data["server"], port)
        return time.time() - st.st_mtime < LEASE_TTL

    def take(self, port: int, ref: ServerRef) -> bool:
        """Lease `port` for `ref`; False if someone else holds a live lease."""
        if not self.usable:
            return True
        if self.holder(port, ref) is not None:
            return False
        _data, st = self._read(port)
        body = json.dumps({"uid": os.geteuid(), "state_dir": self.state_dir, "server": str(ref), "time": time.time()})
        if st is not None:
            if st.st_uid != os.geteuid():
                return False  # a stale lease of another user: the sticky bit keeps it theirs
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(port))
        try:
            fd = os.open(self._path(port), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            return False  # taken between our look and our write
        with os.fdopen(fd, "w") as f:
            f.write(body)
        return True

    def release(self, port: int, ref: ServerRef) -> None:
        data, st = self._read(port)
        if data is not None and st is not None and st.st_uid == os.geteuid() and self._is_mine(data, ref):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(port))

    def refresh(self, held: Iterable[tuple[int, ServerRef]]) -> None:
        """Keep the leases of servers that still want their ports (the supervisor, periodically)."""
        if not self.usable:
            return
        with self.locked():
            for port, ref in held:
                data, _st = self._read(port)
                if data is not None and self._is_mine(data, ref):
                    with contextlib.suppress(OSError):
                        os.utime(self._path(port))
                else:
                    self.take(port, ref)


def _record_wants_port(state_dir: Path, server: str, port: int) -> bool:
    from modelctl.state import ServerRecord, StateStore

    try:
        ref = ServerRef.parse(server)
    except ValueError:
        return False
    if not isinstance(ref, ServerRef):
        return False
    try:
        rec = StateStore(state_dir).load(ref)
    except OSError:
        return False
    if rec is None:
        return False
    if not isinstance(rec, ServerRecord):
        return True  # a broken record may still run: do not hand its port out
    return rec.port == port and rec.desired == "running"


# ---------------------------------------------------------------------- the allocation rule
@dataclass(frozen=True)
class PortRequest:
    """A server that needs a port: a fixed one, or auto (keep `previous` if still usable)."""

    ref: ServerRef
    host: str
    fixed: int | None
    previous: int | None = None
    own: int | None = None  # a port this server's own live process holds: counts as free for it
    external: bool = False  # lives elsewhere: nothing to bind
    source: str = ""

    @classmethod
    def of(cls, spec: ServerSpec, previous: int | None, own: int | None, external: bool) -> PortRequest:
        return cls(ref=spec.ref, host=spec.host, fixed=spec.port, previous=previous, own=own, external=external, source=spec.source)


def allocate_ports(
    requests: list[PortRequest],
    port_range: tuple[int, int],
    held_by_records: dict[int, str],
    leases: PortLeases | None = None,
    is_free: Callable[[int, str], bool] = is_port_free,
) -> dict[ServerRef, int | None]:
    """Ports for every request, or PortInUseError with nothing taken.

    `held_by_records` maps ports of other servers in this state directory to their names. With
    `leases`, ports are checked against and leased machine-wide (unit generation, which only
    writes files, passes none).
    """
    allocation = _Allocation(port_range, dict(held_by_records), leases, is_free)
    with leases.locked() if leases is not None else contextlib.nullcontext():
        try:
            for req in sorted(requests, key=lambda r: r.fixed is None):  # fixed ports first
                allocation.result[req.ref] = allocation.port_for(req)
        except PortInUseError:
            allocation.undo()
            raise
    return allocation.result


@dataclass
class _Allocation:
    port_range: tuple[int, int]
    taken: dict[int, str]
    leases: PortLeases | None
    is_free: Callable[[int, str], bool]

    def __post_init__(self) -> None:
        self.result: dict[ServerRef, int | None] = {}
        self.new_leases: list[tuple[int, ServerRef]] = []

    def other_holder(self, port: int, req: PortRequest) -> str | None:
        if self.taken.get(port, str(req.ref)) != str(req.ref):
            return f"server {self.taken[port]} (see modelctl status)"
        if self.leases is not None and (who := self.leases.holder(port, req.ref)):
            return f"{who}, which keeps it while in backoff"
        return None

    def port_for(self, req: PortRequest) -> int | None:
        if req.external:
            return None
        if req.fixed is not None:
            where = f"{req.source}: server '{req.ref.name}': key 'port'"
            if who := self.other_holder(req.fixed, req):
                raise PortInUseError(f"{where}: port {req.fixed} belongs to {who}")
            if req.fixed != req.own and not self.is_free(req.fixed, req.host):
                raise PortInUseError(f"{where}: {describe_port_in_use(req.fixed, req.host)}")
            port = req.fixed
        else:
            port = self.auto_port(req)
        self.lease(port, req)
        self.taken[port] = str(req.ref)
        return port

    def auto_port(self, req: PortRequest) -> int:
        prev = req.previous
        if prev and not self.other_holder(prev, req) and (prev == req.own or self.is_free(prev, req.host)):
            return prev
        for candidate in range(self.port_range[0], self.port_range[1] + 1):
            if not self.other_holder(candidate, req) and self.is_free(candidate, req.host):
                return candidate
        low, high = self.port_range
        raise PortInUseError(f"{req.source}: no free port in port_range {low}-{high} for server '{req.ref.name}'")

    def lease(self, port: int, req: PortRequest) -> None:
        if self.leases is None:
            return
        was_mine = self.leases.is_mine(port, req.ref)
        if not self.leases.take(port, req.ref):
            raise PortInUseError(f"{req.source}: server '{req.ref.name}': port {port} was leased by another server just now; run up again")
        if not was_mine:
            self.new_leases.append((port, req.ref))

    def undo(self) -> None:
        if self.leases is not None:
            for port, ref in self.new_leases:
                self.leases.release(port, ref)
