"""A server's identity: its profile's name and its own name, written `profile/server`.

Two profiles may both have a server `embed`; they are `lab/embed` and `prod/embed` everywhere:
in the state directory, on the command line, in systemd unit and Kubernetes object names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# fullmatch, never match: `$` would accept a trailing newline ("ok\n")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
NAME_RULE = "letters, digits, '.', '_' and '-' (at most 63), starting with a letter or digit"

# profile a record belongs to when nothing else says (records written before profiles were projects)
DEFAULT_PROFILE_NAME = "default"


def unit_name(profile_name: str, server: str) -> str:
    """The systemd unit that runs a server (`modelctl systemd generate`)."""
    return f"modelctl-{profile_name}-{server}.service"


def is_valid_name(name: object) -> bool:
    return isinstance(name, str) and NAME_PATTERN.fullmatch(name) is not None


@dataclass(frozen=True, order=True)
class ServerRef:
    """`profile/server`: how a server is named in the state directory and on the command line."""

    profile: str
    name: str

    def __str__(self) -> str:
        return f"{self.profile}/{self.name}"

    @classmethod
    def parse(cls, text: str, profile: str | None = None) -> ServerRef | str:
        """`p/n` → ServerRef; a bare `n` → ServerRef in `profile`, or the bare name when no profile is given."""
        if "/" in text:
            p, _, n = text.partition("/")
            if not (is_valid_name(p) and is_valid_name(n)):
                raise ValueError(f"{text!r} is not a server name (PROFILE/SERVER, each {NAME_RULE})")
            if profile is not None and p != profile:
                raise ValueError(f"{text!r} is not in profile {profile!r}")
            return cls(p, n)
        if not is_valid_name(text):
            raise ValueError(f"{text!r} is not a server name ({NAME_RULE})")
        return cls(profile, text) if profile is not None else text
