"""Listening sockets the supervisor holds, and systemd's two protocols for handing them over.

- **Socket activation** (`LISTEN_FDS`): the supervisor binds and listens on a server's port
  itself and passes the socket to each instance as fd 3 (`LISTEN_FDS=1`, `LISTEN_PID`,
  `LISTEN_FDNAMES`). The socket outlives crashes, backoff and restarts: a connection that
  arrives while no instance accepts waits in the kernel's backlog and is served by the next one.
  No byte of a request passes through modelctl.
- **Readiness** (`NOTIFY_SOCKET`): an instance says `READY=1` once it serves. A probe through a
  held socket cannot tell a new instance from an old one (or from the backlog), so a server
  that can take a socket is ready when it says so.

`LISTEN_PID` must be the pid of the process that reads it, which is known only after the fork:
instances start through a tiny exec shim that moves the socket to fd 3, sets `LISTEN_PID` to
its own pid and execs the server (same pid). A supervisor that adopts a running instance after a restart of its
own takes a copy of the instance's socket back with pidfd_getfd(2).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger("modelctl.host.sockets")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
DEFAULT_BACKLOG = 4096  # the kernel caps it at net.core.somaxconn
FD_NAME = "http"
_SYS_PIDFD_GETFD = 438  # x86_64, aarch64 and the other generic syscall tables alike
# moves the socket from fd argv[1] to 3, names itself as LISTEN_PID and execs the server (same pid);
# Python rather than /bin/sh, whose redirections take fd numbers up to 9 only (dash)
_SHIM = """import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as e:
    sys.stderr.write(f"cannot run {sys.argv[2]!r}: {e.strerror}\\n")
    os._exit(127 if isinstance(e, FileNotFoundError) else 126)
"""


class Listener:
    """A TCP socket bound and listening for one server, held by the supervisor."""

    def __init__(self, sock: socket.socket, host: str, port: int, inherited: bool = False):
        self.sock, self.host, self.port = sock, host, port
        self.inherited = inherited  # taken from a running instance or from systemd, not bound by us

    @classmethod
    def bind(cls, host: str, port: int, backlog: int = DEFAULT_BACKLOG) -> Listener:
        """Bind and listen; OSError (EADDRINUSE) if another process holds the port."""
        bind_host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((bind_host, port))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        sock.set_inheritable(False)
        return cls(sock, host, sock.getsockname()[1])

    @classmethod
    def from_fd(cls, fd: int, host: str, port: int) -> Listener:
        """A listening socket we were handed (systemd's fd 3, or one taken from an instance)."""
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        return cls(sock, host, port, inherited=True)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def pending(self) -> bool:
        """A connection waits to be accepted (the socket is readable), without accepting it."""
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    def queued(self) -> int | None:
        """Connections waiting in the backlog now (accepted by the kernel, not yet by a server)."""
        return accept_queue(self.port, self.host)


def accept_queue(port: int, host: str = "127.0.0.1") -> int | None:
    """The accept queue of whatever listens on port: for a listening socket, /proc/net/tcp's
    rx_queue is the number of connections the kernel accepted and no process has taken yet."""
    return SocketView().accept_queue(port)


def _tcp_rows() -> Iterator[list[str]]:
    """Every socket's row of /proc/net/tcp and tcp6, split into its fields."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                rows = [line.split() for line in f]
        except (OSError, StopIteration):
            continue
        yield from (parts for parts in rows if len(parts) >= 10)


def _tcp_sockets(port: int, state: str) -> Iterator[list[str]]:
    """The rows of /proc/net/tcp and tcp6 for local `port` in `state` (01 established, 0A listening)."""
    for parts in _tcp_rows():
        try:
            if parts[3] == state and int(parts[1].rsplit(":", 1)[1], 16) == port:
                yield parts
        except ValueError:
            continue


def established(port: int) -> int:
    """Connections established to a local port now (clients of the server on it)."""
    return sum(1 for _ in _tcp_sockets(port, "01"))


def listening_inode(port: int) -> set[int]:
    """The socket inodes listening on `port` (from /proc/net/tcp and tcp6)."""
    return {int(parts[9]) for parts in _tcp_sockets(port, "0A")}


def take_from_process(pid: int, port: int, host: str) -> Listener | None:
    """A copy of the listening socket on `port` that process `pid` holds (pidfd_getfd(2), Linux
    5.6+; the caller must be allowed to ptrace it: the same user, or root). None if it cannot."""
    fd = _take_fd(pid, listening_inode(port))
    return Listener.from_fd(fd, host, port) if fd is not None else None


def holds_listener(pid: int, port: int) -> bool:
    """Does process `pid` hold a socket listening on `port`?"""
    return SocketView().holds_listener(pid, port)


class SocketView:
    """Who listens where, read once: /proc/net/tcp and tcp6 in one pass, and each process's socket
    fds the first time it is asked about. For a status of many servers, where each question read
    the tables (and the supervisor's fds) again."""

    def __init__(self) -> None:
        self._listening: dict[int, tuple[set[int], int]] = {}  # port → (inodes, accept queue)
        for parts in _tcp_rows():
            try:
                if parts[3] != "0A":  # TCP_LISTEN
                    continue
                port = int(parts[1].rsplit(":", 1)[1], 16)
                inodes, queued = self._listening.get(port, (set(), 0))
                inodes.add(int(parts[9]))
                self._listening[port] = (inodes, queued + int(parts[4].split(":")[1], 16))
            except (ValueError, IndexError):
                continue
        self._sockets: dict[int, set[int]] = {}  # pid → the inodes of its socket fds

    def accept_queue(self, port: int) -> int | None:
        """Connections waiting for whatever listens on port; None if nothing does."""
        found = self._listening.get(port)
        return found[1] if found is not None else None

    def holds_listener(self, pid: int, port: int) -> bool:
        """Does process `pid` hold a socket listening on `port`?"""
        inodes = self._listening.get(port, (set(), 0))[0]
        return bool(inodes) and not inodes.isdisjoint(self._socket_inodes(pid))

    def _socket_inodes(self, pid: int) -> set[int]:
        if pid not in self._sockets:
            self._sockets[pid] = set(_socket_fds(pid))
        return self._sockets[pid]


def _socket_fds(pid: int) -> dict[int, int]:
    """`pid`'s socket fds by their inodes."""
    found: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError, ValueError):
                link = os.readlink(f"/proc/{pid}/fd/{name}")
                if link.startswith("socket:["):
                    found.setdefault(int(link[8:-1]), int(name))
    return found


def _fd_of(pid: int, inodes: set[int]) -> int | None:
    """The number of one of `pid`'s fds that is a socket with one of these inodes."""
    if not inodes:
        return None
    return next((fd for inode, fd in _socket_fds(pid).items() if inode in inodes), None)


def _take_fd(pid: int, inodes: set[int]) -> int | None:
    """A copy of `pid`'s socket with one of these inodes (pidfd_getfd), or None."""
    target = _fd_of(pid, inodes)
    pidfd_open = getattr(os, "pidfd_open", None)
    if target is None or pidfd_open is None:
        return None
    try:
        pidfd = pidfd_open(pid)
    except OSError:
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd: int = libc.syscall(_SYS_PIDFD_GETFD, pidfd, target, 0)
        if fd < 0:
            log.info("cannot take a socket of pid %s: %s", pid, os.strerror(ctypes.get_errno()))
            return None
    finally:
        os.close(pidfd)
    return fd


def _unix_inodes(address: str) -> set[int]:
    """The inodes of unix sockets bound to `address` ("@name" for the abstract namespace)."""
    found: set[int] = set()
    with contextlib.suppress(OSError, StopIteration), open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == address:
                with contextlib.suppress(ValueError):
                    found.add(int(parts[6]))
    return found


def activation_argv(argv: list[str], fd: int) -> list[str]:
    """argv run so that it finds the socket now at `fd` as fd 3, with LISTEN_PID set to its own pid
    (a tiny Python exec shim: -I -S, about 15 ms)."""
    return [sys.executable, "-I", "-S", "-c", _SHIM, str(fd), *argv]


def activation_env(name: str = FD_NAME) -> dict[str, str]:
    return {"LISTEN_FDS": "1", "LISTEN_FDNAMES": name}


def inherited_listen_fd() -> int | None:
    """fd 3 if systemd (or a supervisor) handed us a socket by LISTEN_FDS, for this very process."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    return LISTEN_FDS_START


# ---------------------------------------------------------------------- readiness (sd_notify)
@dataclass
class Notification:
    ready: bool = False
    stopping: bool = False
    status: str | None = None
    facts: dict[str, str] = field(default_factory=dict)  # X_MODELCTL_NAME=value: what the instance runs, for status


FACT_PREFIX = "X_MODELCTL_"  # sd_notify's custom fields start with X_; systemd ignores them
MAX_FACTS = 8


class NotifySocket:
    """Where one instance says READY=1: an abstract unix datagram socket named by its token.

    The instance inherits a copy of it too (`pass_fd`), unused by the server: so the socket, and a
    READY=1 queued in it, outlive a supervisor that dies meanwhile, and the next one takes it back
    from the instance (`take_from_process`)."""

    def __init__(self, token: str, sock: socket.socket | None = None):
        self.address = f"@modelctl/{token}"
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
                sock.bind("\0" + self.address[1:])
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self.sock.setblocking(False)
        self.senders: set[int] = set()

    @classmethod
    def take_from_process(cls, pid: int, token: str) -> NotifySocket | None:
        """The notify socket of instance `token`, taken back from its process `pid` (pidfd_getfd)."""
        fd = _take_fd(pid, _unix_inodes(f"@modelctl/{token}"))
        if fd is None:
            return None
        sock = socket.socket(fileno=fd)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        return cls(token, sock)

    @property
    def pass_fd(self) -> int:
        """The fd an instance inherits (made inheritable by the spawn's pass_fds)."""
        return self.sock.fileno()

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> Notification:
        """Every datagram waiting now, folded into one notification."""
        out = Notification()
        while True:
            try:
                data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    log.info("notify socket %s: %s", self.address, e)
                break
            for level, kind, cmsg in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(cmsg) >= 12:
                    self.senders.add(struct.unpack("iII", cmsg[:12])[0])
            for line in data.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                if key == "READY" and value == "1":
                    out.ready = True
                elif key == "STOPPING" and value == "1":
                    out.stopping = True
                elif key == "STATUS":
                    out.status = value[:200]
                elif key.startswith(FACT_PREFIX) and len(out.facts) < MAX_FACTS:
                    out.facts[key.removeprefix(FACT_PREFIX).lower()] = value[:300]
        return out

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def notify(message: str, address: str | None = None) -> bool:
    """sd_notify(3): send `message` to $NOTIFY_SOCKET (or `address`); False when there is none."""
    address = address or os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), target)
        except OSError as e:
            log.warning("cannot notify %s: %s", address, e)
            return False
    return True
