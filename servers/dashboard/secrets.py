"""What the page never shows: a profile's secrets (an `api_key`, env values that are keys or
tokens, the value after a `--api-key` flag), wherever they turn up in what it sends (a status
line, a log line, a command line in a detail)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

MASK = "[secret]"
MIN_LENGTH = 6  # shorter values ("1", "true") would mask ordinary text; no real key is that short
# names whose value is a secret (an env variable, a key of the spec, a command-line flag)
SECRET_NAME = re.compile(r"(?i)(api[_-]?key|token|secret|passw(or)?d|passphrase|credential|private[_-]?key|auth)")
# values that look like keys whatever their name: vendors' prefixes, or a long run of key characters
KEY_SHAPE = re.compile(r"^(sk-|sk_|hf_|ghp_|gho_|ghs_|glpat-|xox[abpr]-|AKIA|AIza)[A-Za-z0-9_\-]{6,}$|^[A-Za-z0-9_\-+/=]{32,}$")


def looks_like_key(value: str) -> bool:
    return KEY_SHAPE.match(value) is not None


def secrets_in(spec: Any, name: str = "") -> set[str]:
    """Every secret value in a server's spec as its profile wrote it (a mapping, walked whole)."""
    found: set[str] = set()
    if isinstance(spec, dict):
        for key, value in spec.items():
            found |= secrets_in(value, str(key))
    elif isinstance(spec, (list, tuple)):
        after_flag = False  # the item before was a flag that names a secret (`--api-key KEY`)
        for item in spec:
            flag = item.split("=", 1)[0] if isinstance(item, str) and item.startswith("-") else None
            if isinstance(item, str) and after_flag and flag is None:
                found.add(item)
            found |= secrets_in(item, name)
            named = flag is not None and SECRET_NAME.search(flag) is not None
            if named and "=" in item:
                found.add(item.split("=", 1)[1])  # `--api-key=KEY`
            after_flag = named and "=" not in item
    elif isinstance(spec, str) and ((name and SECRET_NAME.search(name)) or looks_like_key(spec)):
        found.add(spec)
    return {s for s in found if len(s) >= MIN_LENGTH}


class Secrets:
    """The secrets of every record seen, and the masking of them in any text."""

    def __init__(self, values: Iterable[str] = ()):
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.add(values)

    def add(self, values: Iterable[str]) -> None:
        new = set(values) - self._values
        if new:
            self._values |= new
            # the longest first: a secret that contains another is masked whole
            self._pattern = re.compile("|".join(re.escape(v) for v in sorted(self._values, key=len, reverse=True)))

    def mask(self, text: str) -> str:
        return self._pattern.sub(MASK, text) if self._pattern is not None and text else text

    def mask_all(self, value: Any) -> Any:
        """`value` (JSON-shaped) with every string masked; keys named like secrets lose their value."""
        if isinstance(value, str):
            return self.mask(value)
        if isinstance(value, dict):
            return {k: MASK if isinstance(v, str) and v and SECRET_NAME.search(str(k)) else self.mask_all(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.mask_all(v) for v in value]
        return value
