"""Server logs: opened without following symlinks, rotated by size, read from the end.

A server writes to its log file directly (O_APPEND), so that it keeps logging when no
supervisor runs. Rotation therefore copies the file to NAME.log.1 and truncates it in place
(logrotate's copytruncate): lines written during the copy can be lost, which a size cap is worth.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from modelctl.host.files import open_private
from modelctl.spec import LogSpec

BLOCK = 64 * 1024
MAX_LINE = 16 * 1024  # longest line printed by `logs`; the rest is cut with a note
START_MARK = "--- modelctl "  # the supervisor's line before each start: `--- modelctl <time>: starting ...`


def open_for_append(path: Path) -> int:
    """An fd for the server's stdout/stderr: append, never through a symlink, private."""
    return open_private(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)


def write_mark(fd: int, text: str, now: float) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    os.write(fd, f"{START_MARK}{stamp}: {text}\n".encode(errors="replace"))


def rotated(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_if_needed(path: Path, spec: LogSpec) -> bool:
    """Rotate `path` once it is over spec.max_bytes: .1 is the newest old part, .<keep> the oldest."""
    try:
        if os.lstat(path).st_size <= spec.max_bytes:
            return False
    except FileNotFoundError:
        return False
    fd = open_private(path, os.O_RDWR)
    try:
        for n in range(spec.keep - 1, 0, -1):
            if rotated(path, n).exists():
                os.replace(rotated(path, n), rotated(path, n + 1))
        out = open_private(rotated(path, 1), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        with os.fdopen(out, "wb") as dst, os.fdopen(os.dup(fd), "rb") as src:
            shutil.copyfileobj(src, dst, BLOCK * 16)
        os.ftruncate(fd, 0)  # O_APPEND writers carry on at the new end
    finally:
        os.close(fd)
    return True


def tail_lines(f: BinaryIO, n: int, max_line: int = MAX_LINE) -> list[str]:
    """The last `n` lines of an open file, reading backwards from its end (at most about
    n × max_line bytes, however large the file); each line is cut to max_line bytes."""
    if n <= 0:
        return []
    f.seek(0, os.SEEK_END)
    end = pos = f.tell()
    budget = (n + 1) * max_line + BLOCK
    chunks: list[bytes] = []
    newlines = 0
    while pos > 0 and newlines <= n and end - pos < budget:
        step = min(BLOCK, pos)
        pos -= step
        f.seek(pos)
        chunk = f.read(step)
        chunks.append(chunk)
        newlines += chunk.count(b"\n")
    data = b"".join(reversed(chunks))
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if pos > 0 and len(lines) > n:
        lines = lines[-n:]  # the first piece was the tail of an earlier line
    elif pos > 0 and lines:
        lines[0] = b"[...] " + lines[0]  # one line longer than the read budget
    return [cut_line(line, max_line) for line in lines[-n:]]


def cut_line(line: bytes, max_line: int = MAX_LINE) -> str:
    if len(line) <= max_line:
        return line.decode("utf-8", "replace")
    return line[:max_line].decode("utf-8", "replace") + f" [... {len(line) - max_line} more bytes cut]"


def tail(path: Path, n: int) -> list[str]:
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as f:
        return tail_lines(f, n)


def tail_rotated(path: Path, n: int) -> list[str]:
    """The last `n` lines across NAME.log and its rotated parts (.1 is the newest old part), read
    from the end: right after a rotation the newest lines are in NAME.log.1."""
    lines = tail(path, n)
    part = 1
    while len(lines) < n:
        older = rotated(path, part)
        if not older.exists():
            break
        lines = tail(older, n - len(lines)) + lines
        part += 1
    return lines


def since_last_start(path: Path, n: int = 60) -> list[str]:
    """The last lines the current (or last) instance wrote: those after the supervisor's mark."""
    lines = tail(path, n)
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(START_MARK):
            return lines[i + 1 :]
    return lines


def follow(path: Path, n: int, poll: float = 0.2) -> Iterator[str]:
    """The last `n` lines, then each new line as it is written; rotation starts over at 0."""
    yield from tail_rotated(path, n)
    pos = path.stat().st_size if path.exists() else 0
    partial = b""
    while True:
        try:
            fd = open_private(path, os.O_RDONLY)
        except FileNotFoundError:
            time.sleep(poll)
            continue
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < pos:
                pos, partial = 0, b""  # rotated (truncated) under us
            if size > pos:
                f.seek(pos)
                chunk = f.read(min(size - pos, 1 << 20))
                pos += len(chunk)
                *complete, partial = (partial + chunk).split(b"\n")
                for line in complete:
                    yield cut_line(line)
                if len(partial) > MAX_LINE:
                    yield cut_line(partial)
                    partial = b""
                continue
        time.sleep(poll)
