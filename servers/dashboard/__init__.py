"""The dashboard: one page at /ui that shows every server modelctl runs (state, memory against the
budget, traffic, recent events, the log) and starts, stops and restarts them.

`make_app(store, auth)` returns it as an aiohttp application that the gateway mounts at /ui
(`mount`); `modelctl ui` serves it alone on 127.0.0.1 (servers/dashboard/standalone.py). It reads
what modelctl already knows (the records, the status rows, the servers' own /metrics, the logs) and
acts through modelctl's Controller, as the CLI does. Only the process that serves it imports aiohttp.
"""

from servers.dashboard.app import make_app, mount
from servers.dashboard.auth import TokenAuth

__all__ = ["TokenAuth", "make_app", "mount"]
