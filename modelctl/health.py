"""Health probes: an HTTP GET that must answer 2xx, a TCP connect, or nothing."""

from __future__ import annotations

import http.client
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from modelctl.profile import HealthSpec


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    detail: str = ""


def probe(health: HealthSpec, base_url: str) -> ProbeResult:
    """Probe a server at base_url (http://host:port) once, within health.timeout seconds."""
    if health.kind == "none":
        return ProbeResult(True, "no probe")
    parts = urlsplit(base_url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if health.kind == "tcp":
        try:
            with socket.create_connection((host, port), timeout=health.timeout):
                return ProbeResult(True, "tcp connect ok")
        except OSError as e:
            return ProbeResult(False, f"tcp connect to {host}:{port}: {e.strerror or e}")
    path = (parts.path.rstrip("/") + health.path) if parts.path else health.path
    conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(host, port, timeout=health.timeout)
    try:
        conn.request("GET", path, headers={"User-Agent": "modelctl-health"})
        resp = conn.getresponse()
        body = resp.read(300).decode("utf-8", "replace")
        if 200 <= resp.status < 300:
            return ProbeResult(True, f"GET {path} → {resp.status}")
        return ProbeResult(False, f"GET {path} → {resp.status} {body.strip()[:120]}")
    except socket.timeout:
        return ProbeResult(False, f"GET {path}: no answer within {health.timeout:g}s")
    except OSError as e:
        return ProbeResult(False, f"GET {path}: {e.strerror or e}")
    except http.client.HTTPException as e:
        return ProbeResult(False, f"GET {path}: {type(e).__name__}: {e}")
    finally:
        conn.close()
