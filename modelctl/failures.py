"""Why a server failed, and whether starting it again can help.

A configuration error (a model path that does not exist, a hub model not available offline, an
unknown argument, a missing module or executable) fails the same way every time: the server
ends `failed` after the first attempt, with the cause. What can heal (CUDA memory another
process frees, a port another process gives back, a crash) is retried with backoff.

The bundled server says "configuration" itself with exit code 78 (sysexits' EX_CONFIG); for
other servers the last lines of their log are classified.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass

EXIT_CONFIG = 78  # EX_CONFIG: the bundled sentence server cannot start with this configuration


@dataclass(frozen=True)
class Failure:
    cls: str  # config | model-not-found | import-error | bad-argument | missing-executable | cuda-oom | address-in-use | crash | ...
    line: str  # the log line (or message) that explains it
    retry: bool

    def describe(self) -> str:
        return f"{self.cls}: {self.line}" if self.line else self.cls


# first match wins; (class, retry, pattern)
_PATTERNS: list[tuple[str, bool, re.Pattern[str]]] = [
    (
        "cuda-oom",
        True,
        re.compile(r"CUDA out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED|cudaErrorMemoryAllocation|out of memory", re.I),
    ),
    ("address-in-use", True, re.compile(r"address already in use|EADDRINUSE|\[Errno 98\]", re.I)),
    (
        "model-not-found",
        False,
        re.compile(
            r"Repository Not Found|is not a valid model identifier|is not a local folder|LocalEntryNotFoundError|"
            r"HFValidationError|couldn't connect to 'https://huggingface.co'|outgoing traffic has been disabled|"
            r"does not appear to have a file named|model .{0,80}(not found|does not exist)|"
            r"No such file or directory: .{0,200}(model|config|\.gguf|\.safetensors|\.bin)",
            re.I,
        ),
    ),
    ("import-error", False, re.compile(r"\b(ModuleNotFoundError|ImportError)\b")),
    (
        "bad-argument",
        False,
        re.compile(
            r"error: unrecognized arguments|error: argument |the following arguments are required|No such option|unknown (option|argument|flag)",
            re.I,
        ),
    ),
    ("permission-denied", False, re.compile(r"Permission denied|\[Errno 13\]")),
]


def classify_exit(returncode: int | None, lines: list[str]) -> Failure:
    """Class and explaining line of an exit; `lines` are what this instance wrote last.

    `returncode` is None for a process that was not our child (adopted): its status is unknown.
    """
    if returncode == EXIT_CONFIG:
        return Failure("config", explaining_line(lines) or "the server reports a configuration error (exit code 78)", False)
    for line in reversed(lines):
        for cls, retry, pattern in _PATTERNS:
            if pattern.search(line):
                return Failure(cls, line.strip()[:300], retry)
    if returncode is not None and returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return Failure("signal", f"killed by {name}", True)
    return Failure("crash", explaining_line(lines), True)


def explaining_line(lines: list[str]) -> str:
    """The last line that looks like an error, else the last non-empty line."""
    for line in reversed(lines):
        if re.search(r"error|exception|fatal|cannot|could not|failed", line, re.I):
            return line.strip()[:300]
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:300]
    return ""
