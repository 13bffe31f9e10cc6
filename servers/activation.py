"""systemd's socket activation and readiness, from the server's side (no libsystemd, no modelctl).

A supervisor (modelctl, or systemd with a .socket unit) may hand the server its listening socket
as fd 3 (`LISTEN_FDS=1`, `LISTEN_PID`): the server then serves from it, does not accept before
its model is loaded (connections wait in the kernel's backlog meanwhile), and says `READY=1` on
`$NOTIFY_SOCKET` once it serves.
"""

from __future__ import annotations

import contextlib
import os
import socket

LISTEN_FDS_START = 3


def inherited_socket() -> socket.socket | None:
    """The listening socket handed to this very process, if any; the variables are removed so that
    children (which are not this process) never take it for theirs."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    sock = socket.socket(fileno=LISTEN_FDS_START)  # family and type come from the fd itself
    sock.set_inheritable(False)
    return sock


def notify(message: str) -> bool:
    """sd_notify(3): a datagram to $NOTIFY_SOCKET; False when there is none."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    target = "\0" + address[1:] if address.startswith("@") else address
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, contextlib.suppress(OSError):
        sock.sendto(message.encode(), target)
        return True
    return False
