"""Why a server failed, and whether starting it again can help.

A configuration error (a model path that does not exist, a hub model not available offline, an
unknown argument, a missing module or executable) fails the same way every time: the server
ends `failed` after the first attempt, with the cause. What can heal (CUDA memory another
process frees, a port another process gives back, a crash) is retried with backoff.

The bundled server says "configuration" itself with exit code 78 (sysexits' EX_CONFIG); for
other servers the last lines of their log are classified.
"""

from __future__ import annotations

import contextlib
import re
import signal
from dataclasses import dataclass

from modelctl.sanitize import one_line

EXIT_CONFIG = 78  # EX_CONFIG: the bundled sentence server cannot start with this configuration
EXIT_NO_SOCKET = 79  # modelctl's vLLM launcher: this vLLM cannot serve from a handed socket


@dataclass(frozen=True)
class Exit:
    """How a process ended: an exit code, a signal, or neither (not our child: status unknown)."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def of(cls, returncode: int | None) -> Exit:
        """From a Popen returncode (negative: killed by that signal; None: not our child)."""
        if returncode is None:
            return cls()
        return cls(signal=-returncode) if returncode < 0 else cls(code=returncode)

    @property
    def known(self) -> bool:
        return self.code is not None or self.signal is not None

    @property
    def clean(self) -> bool:
        return self.code == 0

    @property
    def returncode(self) -> int | None:
        """Popen's convention: the code, or minus the signal."""
        return -self.signal if self.signal is not None else self.code

    def describe(self) -> str:
        if self.signal is not None:
            return f"killed by {signal_name(self.signal)}"
        if self.code is not None:
            return f"exit code {self.code}"
        return "exited (status unknown: not a child of this supervisor)"

    def to_json(self) -> dict[str, int | str | None]:
        return {"code": self.code, "signal": self.signal, "description": self.describe()}

    @classmethod
    def from_text(cls, text: str | None) -> Exit | None:
        """The words of records written before exits were numbers ("exit code 1", "killed by SIGKILL")."""
        if not text:
            return None
        if text.startswith("exit code "):
            with contextlib.suppress(ValueError):
                return cls(code=int(text.rsplit(" ", 1)[-1]))
        if text.startswith("killed by SIG"):
            with contextlib.suppress(KeyError):
                return cls(signal=signal.Signals[text.rsplit(" ", 1)[-1]].value)
        if text.startswith("killed by signal "):
            with contextlib.suppress(ValueError):
                return cls(signal=int(text.rsplit(" ", 1)[-1]))
        return cls()


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


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


def classify_exit(exit: Exit, lines: list[str]) -> Failure:
    """Class and explaining line of an exit; `lines` are what this instance wrote last.

    An exit without code or signal is a process that was not our child (adopted): status unknown.
    """
    if exit.code in (126, 127):  # the shell's "cannot execute" and "not found"
        cls = "missing-executable" if exit.code == 127 else "permission-denied"
        return Failure(cls, explaining_line(lines) or f"the program could not be run (exit code {exit.code})", False)
    if exit.code == EXIT_NO_SOCKET:
        return Failure("no-socket", explaining_line(lines) or "cannot serve from a handed socket", True)
    if exit.code == EXIT_CONFIG:
        return Failure("config", explaining_line(lines) or "the server reports a configuration error (exit code 78)", False)
    for line in reversed(lines):
        for cls, retry, pattern in _PATTERNS:
            if pattern.search(line):
                return Failure(cls, one_line(line.strip()[:300]), retry)
    if exit.signal is not None:
        return Failure("signal", f"killed by {signal_name(exit.signal)}", True)
    return Failure("crash", explaining_line(lines), True)


def explaining_line(lines: list[str]) -> str:
    """The last line that looks like an error, else the last non-empty line."""
    for line in reversed(lines):
        if re.search(r"error|exception|fatal|cannot|could not|failed", line, re.I):
            return one_line(line.strip()[:300])
    for line in reversed(lines):
        if line.strip():
            return one_line(line.strip()[:300])
    return ""
