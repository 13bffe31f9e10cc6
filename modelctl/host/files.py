"""Files modelctl keeps, written safely: private directories, no symlinks followed, atomic
replacement, bounded locks that name their holder, and one clear error for a disk that refuses.

Below the state store and the port leases, which both build on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import tempfile
import time
from pathlib import Path

from modelctl.errors import ModelctlError
from modelctl.host.identity import describe_process

# errors of a disk that will not take a write: full, read-only, over quota
DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the filesystem is read-only", errno.EDQUOT: "the disk quota is used up"}


class StateDirError(ModelctlError):
    """A state directory modelctl refuses to use (a symlink, writable by others, not ours)."""

    exit_code = 2


class LockTimeout(ModelctlError):
    """The state lock stayed taken past the bounded wait."""


class DiskError(ModelctlError):
    """A write the disk refused (full, read-only, quota): says the path and what to do."""

    def __init__(self, path: Path | str, error: OSError):
        self.path, self.errno = str(path), error.errno
        why = DISK_ERRORS.get(error.errno or 0, error.strerror or str(error))
        super().__init__(
            f"cannot write {path}: {why}; free space on that filesystem or make it writable "
            "(or use another --state-dir), then run the command again"
        )


def is_disk_error(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in DISK_ERRORS


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


def make_private_dir(path: Path, parents: bool = False) -> None:
    """Create (0700) or check a directory of ours."""
    try:
        path.mkdir(mode=0o700, parents=parents)
    except FileExistsError:
        pass
    except OSError as e:
        if is_disk_error(e):
            raise DiskError(path, e) from None
        raise
    check_private_dir(path)


def open_private(path: Path, flags: int, mode: int = 0o600) -> int:
    """open(2) that never follows a symlink, never blocks on a FIFO, and refuses a file others may write."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o022 or st.st_uid != os.geteuid():
        os.close(fd)
        raise OSError(errno.EPERM, f"{path} is not a private regular file of yours (mode {stat.S_IMODE(st.st_mode):04o})")
    os.set_blocking(fd, True)
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

    mkstemp creates with O_EXCL, and rename replaces a symlink rather than following it. A disk
    that refuses the write raises DiskError and leaves the old file as it was.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as e:
        if is_disk_error(e):
            raise DiskError(path, e) from None
        raise
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if is_disk_error(e):
            raise DiskError(path, e) from None  # type: ignore[arg-type]
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
