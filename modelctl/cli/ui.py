"""`modelctl ui`: the web dashboard (servers/dashboard) in the foreground on 127.0.0.1, behind a
token printed with its URL. Registers itself on the CLI's app; aiohttp is imported only when the
command runs, so the CLI starts as fast without it."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Optional

import typer

from modelctl.errors import ModelctlError
from modelctl.state.store import StateStore

TOKEN_VAR = "MODELCTL_UI_TOKEN"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def register(app: typer.Typer, store: Callable[[], StateStore]) -> None:
    """Add `ui` to the CLI's app; `store` gives the state directory the global options chose."""

    @app.command()
    def ui(
        port: int = typer.Option(0, "--port", help="Port to listen on (default: any free one)."),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; anything but loopback needs --public."),
        profile: Optional[list[str]] = typer.Option(None, "--profile", "-p", help="Only this profile's servers (repeat for more)."),
        public: bool = typer.Option(False, "--public", help="Allow a non-loopback --host (plain HTTP: the token crosses the network)."),
        interval: float = typer.Option(2.0, "--interval", help="Seconds between the page's updates.", min=0.2),
    ) -> None:
        """Serve the dashboard in the foreground and print its URL with a token (Ctrl-C stops it).

        The page shows every server live (state, memory against the budget, traffic, events, logs)
        and starts, stops and restarts them; its actions need the token. Set MODELCTL_UI_TOKEN to
        keep one token across runs.
        """
        if host not in LOOPBACK and not public:
            raise ModelctlError(f"--host {host} is not a loopback address; the page would be served over plain HTTP: add --public")
        try:
            import asyncio

            from servers.dashboard.standalone import new_token, serve
        except ImportError as e:
            raise ModelctlError(f"the dashboard needs aiohttp ({e}): pip install 'modelctl[server]'") from None
        from modelctl.control import profile_name_of

        token = os.environ.get(TOKEN_VAR) or new_token()
        profiles = [profile_name_of(p) for p in profile] if profile else None

        def ready(url: str) -> None:
            print(f"dashboard: {url}", flush=True)
            print("open it in a browser on this machine; Ctrl-C stops it", file=sys.stderr, flush=True)

        try:
            asyncio.run(serve(store(), host, port, token, profiles, ready, interval))
        except OSError as e:
            raise ModelctlError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
