"""Health probes: an HTTP GET that must answer 2xx, a TCP connect, or nothing."""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from modelctl.spec import HealthSpec


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str = ""
    connected: bool = False  # the port answered (even if not yet healthy): the "port open" phase


def probe(health: HealthSpec, base_url: str) -> ProbeResult:
    """Probe a server at base_url (http://host:port) once, within health.timeout seconds."""
    if health.kind == "none":
        return ProbeResult(True, "no probe", connected=True)
    parts = urlsplit(base_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if health.kind == "tcp":
        try:
            with socket.create_connection((host, port), timeout=health.timeout):
                return ProbeResult(True, "tcp connect ok", connected=True)
        except OSError as e:
            return ProbeResult(False, f"tcp connect to {host}:{port}: {e.strerror or e}")
    path = (parts.path.rstrip("/") + health.path) if parts.path else health.path
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(host, port, timeout=health.timeout)
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
        return ProbeResult(False, f"GET {path} → {resp.status} {body.strip()[:120]}", connected=True)
    except TimeoutError:
        return ProbeResult(False, f"GET {path}: no answer within {health.timeout:g}s", connected=True)
    except OSError as e:
        return ProbeResult(False, f"GET {path}: {e.strerror or e}", connected=True)
    except http.client.HTTPException as e:
        return ProbeResult(False, f"GET {path}: {type(e).__name__}: {e}", connected=True)
    finally:
        conn.close()
