"""Run a command as a person would at a terminal of a given width: its stdout and stderr on a
pseudo-terminal of that many columns (and COLUMNS set to match), the output read back with the
terminal's escape sequences removed."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Sequence

ESCAPES = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[=>]")


def run_in_terminal(
    argv: Sequence[str], columns: int, env: dict[str, str], cwd: str | None = None, timeout: float = 120
) -> tuple[int, str]:
    """(exit code, what the terminal showed: lines without escapes and without \\r)."""
    main, child = os.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.DEVNULL, stdout=child, stderr=child, env={**env, "COLUMNS": str(columns), "TERM": "xterm"}, cwd=cwd
    )
    os.close(child)
    chunks = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([main], [], [], 0.1)
        if ready:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the other end is closed
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    else:
        proc.kill()
    code = proc.wait(10)
    os.close(main)
    text = ESCAPES.sub("", b"".join(chunks).decode("utf-8", "replace")).replace("\r\n", "\n")
    return code, "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))
