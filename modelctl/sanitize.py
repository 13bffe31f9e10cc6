"""Text from servers is shown, never obeyed: control characters become visible escapes.

A server (or anything answering on its port) writes its log, its failure lines and its /health
body. Printed as they are, an ESC or C1 sequence could retitle the terminal, clear it, or write
the clipboard (OSC 52) of whoever runs `modelctl status`. Everything modelctl prints from a
server passes through `printable` first: C0 controls but tab and newline, DEL, the C1 range and
ESC are written as `\\xNN`.
"""

from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_ONE_LINE = re.compile("[\x00-\x1f\x7f-\x9f]")


def _escape(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


def printable(text: str) -> str:
    """`text` with every control character but tab and newline made visible."""
    return _CONTROL.sub(_escape, text)


def one_line(text: str) -> str:
    """`text` with every control character made visible, newlines and tabs included."""
    return _CONTROL_ONE_LINE.sub(_escape, text)
