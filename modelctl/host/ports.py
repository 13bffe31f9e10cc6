"""Port probes: is a port free, and who holds it (named, for the user's error)."""

from __future__ import annotations

import errno
import socket

import psutil

from modelctl.host.identity import describe_process


def family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def is_port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True if a server could bind host:port now (a socket in TIME_WAIT does not count)."""
    bind_host = host.strip("[]") or "0.0.0.0"
    with socket.socket(family(bind_host), socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((bind_host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def port_holder(port: int) -> str | None:
    """Describe the process listening on `port`, or None if nobody (visible to us) is."""
    try:
        conns = psutil.net_connections(kind="inet")
    except (psutil.AccessDenied, PermissionError):
        return None
    for conn in conns:
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
            return describe_process(conn.pid) if conn.pid else "another user's process"
    return None


def describe_port_in_use(port: int, host: str) -> str:
    holder = port_holder(port) or "a process modelctl cannot see (another user's?)"
    return f"port {port} on {host} is in use by {holder}"
