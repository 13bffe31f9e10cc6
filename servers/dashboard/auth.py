"""Who may read the page's data and who may act: a bearer token (the one `modelctl ui` prints, or
the gateway's API key), and checks that keep a request from another site out.

Actions are POSTs with a JSON body and the token in `Authorization`: a cross-site form can send
neither, a GET never acts, and a request whose Origin (or Sec-Fetch-Site) says it came from
another site is refused even with the token. `allowed_hosts` pins the Host header (a loopback
dashboard answers only to its own address: a DNS-rebinding page cannot reach it by name).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

SAME_SITE = frozenset({"same-origin", "none"})  # Sec-Fetch-Site: our page, or a person typing the URL


def refused(status: int, message: str) -> web.HTTPException:
    cls = web.HTTPForbidden if status == 403 else web.HTTPUnsupportedMediaType if status == 415 else web.HTTPBadRequest
    return cls(text=json.dumps({"error": {"message": message}}), content_type="application/json")


@dataclass(frozen=True)
class TokenAuth:
    """`token`: what `Authorization: Bearer` must carry; None: no actions at all (a gateway without an
    API key shows its servers read-only). `reads_need_token`: the data too, not only the actions."""

    token: str | None
    reads_need_token: bool = True
    allowed_hosts: frozenset[str] | None = None  # Host headers answered (None: any)

    def _has_token(self, request: web.Request) -> bool:
        if self.token is None:
            return False
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def _check_host(self, request: web.Request) -> None:
        if self.allowed_hosts is not None and request.host not in self.allowed_hosts:
            raise refused(403, "this dashboard answers only at its own address")

    def check_page(self, request: web.Request) -> None:
        """The page itself (no data in it) is served to anyone who may reach the address."""
        self._check_host(request)

    def check_read(self, request: web.Request) -> None:
        self._check_host(request)
        if self.reads_need_token and not self._has_token(request):
            raise refused(403, "a token is required: open the URL that modelctl ui printed (or give the gateway's API key)")

    def check_action(self, request: web.Request) -> None:
        self._check_host(request)
        if request.method != "POST":
            raise refused(403, "actions are POSTs")
        if self.token is None:
            raise refused(403, "actions are off: the gateway has no api_key")
        if not same_origin(request):
            raise refused(403, "a request from another site is refused")
        if not self._has_token(request):
            raise refused(403, "the token is missing or wrong")
        if request.content_type != "application/json":
            raise refused(415, "send the action as JSON")


def same_origin(request: web.Request) -> bool:
    """No Origin (a client that is not a browser) passes; a browser's Origin must be this host."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site not in SAME_SITE:
        return False
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    if origin == "null":
        return False
    return urlsplit(origin).netloc.lower() == request.host.lower()
