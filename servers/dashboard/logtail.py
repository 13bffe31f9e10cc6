"""A server's log for the page: its last lines, then whatever was written after a cursor (a byte
offset in the file), so that the page follows it by asking again. Read as `modelctl logs` reads it:
never through a symlink, long lines cut, control characters shown escaped (`\\x1b`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from modelctl.host.files import open_private
from modelctl.host.logfiles import MAX_LINE, cut_line, tail
from modelctl.sanitize import printable

FIRST_LINES = 200  # lines shown when the pane opens
MAX_READ = 256 * 1024  # bytes read after the cursor per request; the rest comes with the next


@dataclass
class Chunk:
    lines: list[str] = field(default_factory=list)
    cursor: int = 0  # where the next read starts
    note: str | None = None  # "the log was rotated", "no log yet"


def read_log(path: Path, cursor: int | None, first_lines: int = FIRST_LINES) -> Chunk:
    """The last `first_lines` lines (cursor None), or the complete lines written after `cursor`."""
    try:
        fd = open_private(path, os.O_RDONLY)
    except FileNotFoundError:
        return Chunk(cursor=0, note="no log yet")
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        note = None
        if cursor is None:
            start = max(0, size - MAX_READ)
            f.seek(start)
            data = f.read(size - start)
        else:
            if size < cursor:
                cursor, note = 0, "the log was rotated: reading it from its start"
            start = cursor
            f.seek(start)
            data = f.read(min(size - start, MAX_READ))
    complete, newline, partial = data.rpartition(b"\n")
    lines = complete.split(b"\n") if newline else []
    advanced = len(complete) + len(newline)  # a line still being written comes whole with the next request
    if not newline and len(partial) > MAX_LINE:  # a line longer than we show: shown cut, not waited for
        lines, advanced = [partial], len(partial)
    if cursor is None:
        if start > 0 and lines:
            lines = lines[1:]  # the first piece is the end of a line that began before what was read
        lines = lines[-first_lines:]
        if start == 0 and len(lines) < first_lines:  # right after a rotation the earlier lines are in NAME.log.1
            lines = [line.encode() for line in tail(path.with_name(path.name + ".1"), first_lines - len(lines))] + lines
    return Chunk([printable(cut_line(line)) for line in lines], start + advanced, note)
