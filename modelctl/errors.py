"""Errors a user can act on. Each message says what was wrong, where, and what to do."""

from __future__ import annotations


class ModelctlError(Exception):
    """Base class: the CLI prints the message and exits non-zero without a traceback."""

    exit_code = 1


class ProfileError(ModelctlError):
    """A profile that cannot be used; names the file, the server and the key."""

    exit_code = 2

    def __init__(self, source: str, message: str, server: str | None = None, key: str | None = None):
        self.source, self.server, self.key, self.detail = source, server, key, message
        where = [str(source)]
        if server is not None:
            where.append(f"server '{server}'")
        if key is not None:
            where.append(f"key '{key}'")
        super().__init__(f"{': '.join(where)}: {message}")


class PortInUseError(ModelctlError):
    """A port the profile asks for is held by another process."""


class GpuAllocationError(ModelctlError):
    """Not enough GPUs, or GPU ids that do not exist or are taken."""


class UnknownServerError(ModelctlError):
    """A server name that is neither in the profile nor in the state directory."""

    exit_code = 2


class UnknownProfileError(ModelctlError):
    """A `-p` that names no profile file and no profile of the state directory."""

    exit_code = 2
