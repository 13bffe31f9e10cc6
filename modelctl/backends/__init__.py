"""The server kinds: one registry that profile validation, the CLI and unit/manifest generation read.

Each kind is a stateless `Backend` (modelctl/backends/base.py). Importing this package is cheap:
no model library is imported until a server is prepared.
"""

from __future__ import annotations

from modelctl.backends.base import Backend
from modelctl.backends.command import CommandBackend
from modelctl.backends.gateway import GatewayBackend
from modelctl.backends.ollama import OllamaBackend
from modelctl.backends.sentence import SentenceBackend
from modelctl.backends.vllm import VllmBackend

KINDS: dict[str, Backend] = {b.kind: b for b in (SentenceBackend(), OllamaBackend(), VllmBackend(), CommandBackend(), GatewayBackend())}


def get_backend(kind: str) -> Backend:
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(f"unknown server kind {kind!r}; known: {', '.join(KINDS)}") from None
