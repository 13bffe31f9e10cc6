"""Every setting of the gateway, from the command line (modelctl passes them from the profile's
`gateway:` keys) to the app: one object, passed around whole."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class GatewaySettings:
    state_dir: Path
    profiles: tuple[str, ...] | None = None  # None: every profile in the state directory
    home: str | None = None  # the gateway's own profile: its names win where two profiles share one
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # clients send it as a Bearer token; servers then get their own
    defaults: Mapping[str, str] = field(default_factory=dict)  # task → model name, for TEI's routes (no `model`)
    max_body_bytes: int = 64 * 1024 * 1024
    header_timeout: float = 15.0  # a client's request head (and an idle keep-alive connection)
    body_timeout: float = 60.0  # a client's request body
    connect_timeout: float = 10.0  # a TCP connect to a server (a held socket answers at once)
    read_timeout: float = 600.0  # silence from a server before the gateway answers 504 (a wake's model load included)
    keepalive_after: float = 1.0  # a stream with no answer head by then gets its 200 and SSE comments meanwhile
    keepalive_interval: float = 5.0  # between those comments
    refresh_interval: float = 0.5  # between looks at the records
    drain_timeout: float = 8.0  # on SIGTERM: requests in flight (streams too) get this long to finish

    @staticmethod
    def api_key_from_env() -> str | None:
        return os.environ.get("MODELCTL_API_KEY") or None
