"""Port leases and the one allocation rule for `up`, `run` and unit generation.

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
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelctl.errors import PortInUseError
from modelctl.host.files import LockTimeout, acquire_flock
from modelctl.host.ports import describe_port_in_use, is_port_free
from modelctl.names import ServerRef
from modelctl.state.record import ServerRecord
from modelctl.state.store import StateStore

if TYPE_CHECKING:
    from modelctl.spec import ServerSpec

log = logging.getLogger("modelctl.state.leases")

DEFAULT_LEASE_DIR = "/tmp/modelctl-port-leases"
LEASE_TTL = 600.0  # a lease nobody refreshed for this long is stale (other users' leases)
LEASE_GRACE = 120.0  # a lease younger than this whose record is older (or missing) belongs to an `up` in flight


# ---------------------------------------------------------------------- machine-wide leases
@dataclass(frozen=True)
class Lease:
    """What the lease directory holds for one port: a lease file, or something else."""

    data: dict[str, Any] | None  # the lease's fields; None when the entry is not a lease file
    uid: int
    mtime: float
    odd: str = ""  # why the entry is not a lease: "a FIFO", "a symlink", ...


class PortLeases:
    """Leases of ports across state directories and users on this machine.

    The directory is shared and others can write to it, so nothing in it is trusted: entries are
    opened without following symlinks and without blocking (a FIFO), only regular files count as
    leases, and anything else holds its port (an auto port moves on to the next one). Another
    user's lease counts while it is refreshed; a stale one no longer holds its port.
    """

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
        fd = _open_entry(self.dir / ".lock", os.O_RDWR | os.O_CREAT)
        if not isinstance(fd, int):
            log.warning("port leases: %s/.lock is %s; allocating without it (O_EXCL still guards each lease)", self.dir, fd or "missing")
            yield
            return
        try:
            if os.fstat(fd).st_uid == os.geteuid():
                with contextlib.suppress(OSError):
                    os.fchmod(fd, 0o666)  # every user allocates under it; umask would narrow it
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

    def _read(self, port: int) -> Lease | None:
        """The entry for `port`: None if there is none."""
        path = self._path(port)
        fd = _open_entry(path, os.O_RDONLY)
        if fd is None:
            return None
        if isinstance(fd, str):
            try:
                st = os.lstat(path)
            except OSError:
                return None
            return Lease(None, st.st_uid, st.st_mtime, fd)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            try:
                data = json.loads(f.read(4096))
            except ValueError:
                data = {}
        return Lease(data if isinstance(data, dict) else {}, st.st_uid, st.st_mtime)

    def holder(self, port: int, ref: ServerRef | None = None) -> str | None:
        """Who else holds `port` (None: free to take, or ours already)."""
        if not self.usable:
            return None
        lease = self._read(port)
        if lease is None or self._is_mine(lease, ref):
            return None
        if lease.data is None:
            return f"{self._path(port)}, which is {lease.odd}, not a lease file"
        if not self._is_live(lease, port):
            return None
        return f"server {lease.data.get('server')} of {lease.data.get('state_dir')} (uid {lease.uid})"

    def is_mine(self, port: int, ref: ServerRef) -> bool:
        lease = self._read(port)
        return lease is not None and self._is_mine(lease, ref)

    def _is_mine(self, lease: Lease, ref: ServerRef | None) -> bool:
        data = lease.data
        return (
            ref is not None
            and data is not None
            and lease.uid == os.geteuid()
            and data.get("state_dir") == self.state_dir
            and data.get("server") == str(ref)
        )

    def _is_live(self, lease: Lease, port: int) -> bool:
        data = lease.data or {}
        if lease.uid == os.geteuid() and isinstance(data.get("state_dir"), str) and isinstance(data.get("server"), str):
            taken = data.get("time")
            return _record_wants_port(Path(data["state_dir"]), data["server"], port, taken if isinstance(taken, (int, float)) else None)
        return time.time() - lease.mtime < LEASE_TTL

    def take(self, port: int, ref: ServerRef) -> bool:
        """Lease `port` for `ref`; False if another entry holds it (a live lease, or not a lease file)."""
        if not self.usable:
            return True
        if self.holder(port, ref) is not None:
            return False
        lease = self._read(port)
        if lease is not None and self._is_mine(lease, ref):
            return True
        if lease is not None and lease.uid != os.geteuid():
            # another user's stale lease: the sticky bit keeps the file theirs, but not the port;
            # our own record keeps it for us (other users then see only their stale entry)
            log.info("port %s: %s holds a stale lease of uid %s; taking the port without a shared lease", port, self._path(port), lease.uid)
            return True
        if lease is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(port))  # our own stale lease
        body = json.dumps({"uid": os.geteuid(), "state_dir": self.state_dir, "server": str(ref), "time": time.time()})
        try:
            fd = os.open(self._path(port), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except FileExistsError:
            return False  # taken between our look and our write
        except OSError as e:
            log.warning("port leases: cannot write %s: %s", self._path(port), e.strerror or e)
            return True  # the lease is a courtesy across state directories; our record still holds the port
        with os.fdopen(fd, "w") as f:
            f.write(body)
        return True

    def release(self, port: int, ref: ServerRef) -> None:
        lease = self._read(port)
        if lease is not None and self._is_mine(lease, ref):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(port))

    def refresh(self, held: Iterable[tuple[int, ServerRef]]) -> None:
        """Keep the leases of servers that still want their ports (the supervisor, periodically)."""
        if not self.usable:
            return
        with self.locked():
            for port, ref in held:
                if self.is_mine(port, ref):
                    with contextlib.suppress(OSError):
                        os.utime(self._path(port), follow_symlinks=False)
                else:
                    self.take(port, ref)


def _open_entry(path: Path, flags: int) -> int | str | None:
    """An fd on a regular file in the shared directory; None if nothing is there; else what is
    there instead ("a FIFO", "a directory", "a symlink", ...). Never follows a link, never blocks."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink"
        if e.errno == errno.EISDIR:
            return "a directory"
        if e.errno == errno.ENXIO:
            return "a socket or a FIFO"
        return f"not readable ({e.strerror or e})"
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kinds = {
            stat.S_IFIFO: "a FIFO",
            stat.S_IFDIR: "a directory",
            stat.S_IFSOCK: "a socket",
            stat.S_IFCHR: "a device",
            stat.S_IFBLK: "a device",
        }
        return kinds.get(stat.S_IFMT(st.st_mode), "not a regular file")
    os.set_blocking(fd, True)
    return fd


def _record_wants_port(state_dir: Path, server: str, port: int, leased_at: float | None = None) -> bool:
    """Whether the server's record keeps `port`. A lease is taken before its record is written (an
    `up` allocates, then saves under the state lock), so a lease younger than LEASE_GRACE whose
    record is missing or older than the lease belongs to an `up` in flight, and holds its port."""
    fresh = leased_at if leased_at is not None and time.time() - leased_at < LEASE_GRACE else None
    try:
        ref = ServerRef.parse(server)
    except ValueError:
        return False
    if not isinstance(ref, ServerRef):
        return False
    try:
        rec = StateStore(state_dir).load(ref)
    except OSError:
        return fresh is not None
    if rec is None:
        return fresh is not None
    if not isinstance(rec, ServerRecord):
        return True  # a broken record may still run: do not hand its port out
    if fresh is not None and (rec.updated_at or 0.0) < fresh:
        return True  # the record has not been written since the lease was taken
    return rec.port == port and rec.wants_running


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
) -> PortAllocation:
    """Ports for every request (`.ports`), or PortInUseError with nothing taken; `.undo()`
    gives back the leases it took, for a caller that cannot go on (a disk that refuses the records).

    `held_by_records` maps ports of other servers in this state directory to their names. With
    `leases`, ports are checked against and leased machine-wide (unit generation, which only
    writes files, passes none).
    """
    allocation = PortAllocation(port_range, dict(held_by_records), leases, is_free)
    with leases.locked() if leases is not None else contextlib.nullcontext():
        try:
            for req in sorted(requests, key=lambda r: r.fixed is None):  # fixed ports first
                allocation.ports[req.ref] = allocation.port_for(req)
        except PortInUseError:
            allocation.undo()
            raise
    return allocation


@dataclass
class PortAllocation:
    """One allocation in progress: what is taken so far, and the leases it took."""

    port_range: tuple[int, int]
    taken: dict[int, str]
    leases: PortLeases | None
    is_free: Callable[[int, str], bool]

    def __post_init__(self) -> None:
        self.ports: dict[ServerRef, int | None] = {}
        self.new_leases: list[tuple[int, ServerRef]] = []

    def other_holder(self, port: int, req: PortRequest) -> str | None:
        if self.taken.get(port, str(req.ref)) != str(req.ref):
            return f"server {self.taken[port]} (see modelctl status)"
        if self.leases is not None and (who := self.leases.holder(port, req.ref)):
            return f"{who}, which keeps it while that server is wanted (in backoff, or idle on demand, too)"
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
            if not self.lease(req.fixed, req):
                raise PortInUseError(f"{where}: port {req.fixed} was leased by another server just now; run up again")
            port = req.fixed
        else:
            port = self.auto_port(req)
        self.taken[port] = str(req.ref)
        return port

    def auto_port(self, req: PortRequest) -> int:
        prev = req.previous
        if prev and not self.other_holder(prev, req) and (prev == req.own or self.is_free(prev, req.host)) and self.lease(prev, req):
            return prev
        for candidate in range(self.port_range[0], self.port_range[1] + 1):
            # a candidate someone leases between our look and our lease is skipped like a taken one
            if not self.other_holder(candidate, req) and self.is_free(candidate, req.host) and self.lease(candidate, req):
                return candidate
        low, high = self.port_range
        raise PortInUseError(f"{req.source}: no free port in port_range {low}-{high} for server '{req.ref.name}'")

    def lease(self, port: int, req: PortRequest) -> bool:
        if self.leases is None:
            return True
        was_mine = self.leases.is_mine(port, req.ref)
        if not self.leases.take(port, req.ref):
            return False
        if not was_mine:
            self.new_leases.append((port, req.ref))
        return True

    def undo(self) -> None:
        if self.leases is not None:
            for port, ref in self.new_leases:
                self.leases.release(port, ref)
