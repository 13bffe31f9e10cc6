"""Server kinds. Each module is light: no model libraries are imported here."""

from __future__ import annotations

from modelctl.backends.base import Backend


def get_backend(kind: str) -> Backend:
    from modelctl.backends.command import CommandBackend
    from modelctl.backends.ollama import OllamaBackend
    from modelctl.backends.sentence import SentenceBackend
    from modelctl.backends.vllm import VllmBackend

    kinds = {b.kind: b for b in (CommandBackend(), SentenceBackend(), OllamaBackend(), VllmBackend())}
    try:
        return kinds[kind]
    except KeyError:
        raise ValueError(f"unknown server kind {kind!r}; known: {', '.join(sorted(kinds))}") from None
