"""Health probes: an HTTP GET that must answer 2xx, a TCP connect, or nothing.

On a socket the supervisor holds, a TCP connect proves nothing: the kernel's backlog completes it
whether or not a server accepts. There the TCP probe sends a request line and passes only when
the server answers a byte or closes the connection itself (`reply=True`): a hung server, or one
that closed the held socket and listens elsewhere, fails it.

The HTTP probe is a plain HTTP/1.0 request over a socket: the supervisor sends dozens a second
when many servers are up, and needs only the status line and the start of the body, not a
client's header parsing. HTTPS goes through http.client.
"""

from __future__ import annotations

import errno
import http.client
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from modelctl.spec import HealthSpec

BODY_SHOWN = 120  # characters of a failing answer kept for `status`
READ_LIMIT = 8192


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str = ""
    connected: bool = False  # the port answered (even if not yet healthy): the "port open" phase


def probe(health: HealthSpec, base_url: str, reply: bool = False) -> ProbeResult:
    """Probe a server at base_url (http://host:port) once, within health.timeout seconds; `reply`:
    the port is a held socket, where a TCP probe must be answered by the server itself."""
    if health.kind == "none":
        return ProbeResult(True, "no probe", connected=True)
    parts = urlsplit(base_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if health.kind == "tcp" and reply:
        return _reply_probe(host, port, health.timeout)
    if health.kind == "tcp":
        try:
            with _connect(host, port, health.timeout):
                return ProbeResult(True, "tcp connect ok", connected=True)
        except OSError as e:
            return ProbeResult(False, f"tcp connect to {host}:{port}: {e.strerror or e}")
    path = (parts.path.rstrip("/") + health.path) if parts.path else health.path
    if parts.scheme == "https":
        return _https_probe(host, port, path, health.timeout)
    return _http_probe(host, port, path, health.timeout)


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    """A connected socket; an address literal skips the resolver."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.create_connection((host, port), timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _reply_probe(host: str, port: int, timeout: float) -> ProbeResult:
    """Connect, send an HTTP request line, and pass on the first byte of an answer or a close by the
    server: either proves that a process accepted the connection (the backlog alone does neither)."""
    try:
        sock = _connect(host, port, timeout)
    except OSError as e:
        return ProbeResult(False, f"tcp connect to {host}:{port}: {e.strerror or e}")
    try:
        sock.sendall(b"GET / HTTP/1.0\r\nUser-Agent: modelctl-health\r\n\r\n")
        sock.settimeout(timeout)
        sock.recv(1)  # b"" is a close by the server: it accepted, too
        return ProbeResult(True, "the server answered on its socket", connected=True)
    except TimeoutError:
        return ProbeResult(
            False,
            f"no answer from a server on {host}:{port} within {timeout:g}s (the connection waits in the held socket's backlog)",
            connected=True,
        )
    except OSError as e:
        if e.errno in (errno.ECONNRESET, errno.EPIPE):
            return ProbeResult(True, "the server closed the connection", connected=True)
        return ProbeResult(False, f"tcp probe of {host}:{port}: {e.strerror or e}", connected=True)
    finally:
        sock.close()


def _http_probe(host: str, port: int, path: str, timeout: float) -> ProbeResult:
    deadline = time.monotonic() + timeout
    try:
        sock = _connect(host, port, timeout)
    except OSError as e:
        return ProbeResult(False, f"GET {path}: {e.strerror or e}")
    try:
        hostname = f"[{host}]" if ":" in host else host
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {hostname}:{port}\r\nUser-Agent: modelctl-health\r\n\r\n".encode())
        data = b""
        while len(data) < READ_LIMIT:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)
            chunk = sock.recv(READ_LIMIT - len(data))
            if not chunk:
                break
            data += chunk
            if _complete(data):
                break
    except TimeoutError:
        return ProbeResult(False, f"GET {path}: no answer within {timeout:g}s", connected=True)
    except OSError as e:
        return ProbeResult(False, f"GET {path}: {e.strerror or e}", connected=True)
    finally:
        sock.close()
    return _judge(path, data)


def _complete(data: bytes) -> bool:
    """Enough read: the headers and the body (by Content-Length), or the headers and what is shown."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return len(body) >= int(value.strip())
            except ValueError:
                break
    return len(body) >= BODY_SHOWN * 4


def _judge(path: str, data: bytes) -> ProbeResult:
    status_line, _, rest = data.partition(b"\r\n")
    fields = status_line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return ProbeResult(False, f"GET {path}: not an HTTP answer: {status_line[:60]!r}", connected=True)
    status = int(fields[1])
    if 200 <= status < 300:
        return ProbeResult(True, f"GET {path} → {status}", connected=True)
    body = rest.partition(b"\r\n\r\n")[2].decode("utf-8", "replace")
    return ProbeResult(False, f"GET {path} → {status} {body.strip()[:BODY_SHOWN]}", connected=True)


def _https_probe(host: str, port: int, path: str, timeout: float) -> ProbeResult:
    conn = http.client.HTTPSConnection(host, port, timeout=timeout)
    try:
        conn.connect()
    except OSError as e:
        conn.close()
        return ProbeResult(False, f"GET {path}: {e.strerror or e}")
    try:
        conn.request("GET", path, headers={"User-Agent": "modelctl-health"})
        resp = conn.getresponse()
        body = resp.read(300).decode("utf-8", "replace")
        if 200 <= resp.status < 300:
            return ProbeResult(True, f"GET {path} → {resp.status}", connected=True)
        return ProbeResult(False, f"GET {path} → {resp.status} {body.strip()[:BODY_SHOWN]}", connected=True)
    except TimeoutError:
        return ProbeResult(False, f"GET {path}: no answer within {timeout:g}s", connected=True)
    except OSError as e:
        return ProbeResult(False, f"GET {path}: {e.strerror or e}", connected=True)
    except http.client.HTTPException as e:
        return ProbeResult(False, f"GET {path}: {type(e).__name__}: {e}", connected=True)
    finally:
        conn.close()
