"""The profile's gateway keys: the top-level `gateway:` (a server of kind `gateway`, named
`gateway`), the keys every server may carry for it (`aliases`, `max_concurrency`, `max_queue`),
and the check that no name reaches two servers of the same task."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modelctl.backends.gateway import NAME
from modelctl.errors import ProfileError
from modelctl.served_names import clashes, task_of
from modelctl.spec import MAX_COUNT, Key, ServerSpec, check_count, check_str, describe

MAX_ALIASES = 64
MAX_NAME_LENGTH = 256  # as long as the gateway takes a `model`
GATEWAY_MEMORY = "64MiB"  # declared for a budget until measured: aiohttp and the records, no model


def check_aliases(value: Any) -> list[str]:
    """More names the gateway routes to the server: a name or a list of names."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or len(items) > MAX_ALIASES:
        raise ValueError(f"must be a name or a list of 1 to {MAX_ALIASES} names, got {describe(value)}")
    out = []
    for item in items:
        name = check_str(item)
        if len(name) > MAX_NAME_LENGTH:
            raise ValueError(f"{describe(name)} is longer than {MAX_NAME_LENGTH} characters")
        out.append(name)
    return out


def check_queue(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise ValueError(f"must be a whole number from 0 to {MAX_COUNT}, got {describe(value)}")
    return value


SERVER_KEYS: dict[str, Key] = {
    "aliases": Key(check_aliases, None, "more model names the gateway routes to this server"),
    "max_concurrency": Key(check_count, None, "requests in flight to this server through the gateway; more wait in its queue"),
    "max_queue": Key(check_queue, None, "requests that wait for max_concurrency before the gateway answers 429 (default 4 per slot)"),
}


def gateway_server(value: Any, source: str) -> dict[str, Any]:
    """The top-level `gateway:` as the mapping of a server of kind `gateway`."""
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise ProfileError(source, f"must be a mapping (port, api_key, scope, ...), got {describe(value)}", key="gateway")
    if "kind" in value:
        raise ProfileError(source, "is always kind gateway; leave kind out", key="gateway.kind")
    return {"kind": "gateway", "memory": GATEWAY_MEMORY, **value}


def as_gateway_error(error: ProfileError) -> ProfileError:
    """A problem of the `gateway` server, named as the top-level key the user wrote."""
    key = f"gateway.{error.key}" if error.key else "gateway"
    return ProfileError(error.source, error.detail, key=key)


def check_names(servers: Mapping[str, ServerSpec], source: str, profile: str) -> None:
    """A name (served name, alias, PROFILE/SERVER) that reaches two servers of one task is refused."""
    routed = {n: (s.kind, s.raw) for n, s in servers.items() if s.kind != "gateway"}
    for name, server, other, key in clashes(routed, profile):
        kind, raw = routed[server]
        raise ProfileError(
            source,
            f"the name {describe(name)} also reaches server '{other}', and both serve {task_of(kind, raw)}: "
            "the gateway could not tell them apart; give one another name",
            server=server,
            key=key if key != "server" else None,
        )


__all__ = ["NAME", "SERVER_KEYS", "as_gateway_error", "check_names", "gateway_server"]
