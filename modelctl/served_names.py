"""Which names and which tasks a server answers to through the gateway: one rule, read from a
server's profile mapping alone, so that the profile check and the gateway never disagree.

A server is reachable by its served model name (`model_name`, vLLM's `served_model_name`, an
Ollama model with and without `:latest`), by `PROFILE/SERVER`, and by its `aliases:`. Its task
(`embedding`, `rerank`, `chat`) says which endpoints reach it: the same name may be an embedding
model on one server and a rerank model on another.

Pure: no I/O and no imports beyond the standard library.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

TASKS = ("embedding", "rerank", "chat")
OLLAMA = "ollama"  # Ollama's own API (/api/chat, /api/embed, ...): reaches `ollama` servers only


def served_name(kind: str, server: str, spec: Mapping[str, Any]) -> str:
    """The model name the server itself answers to (what its /v1/models says)."""
    if kind == "vllm":
        return _text(spec.get("served_model_name")) or server
    if kind == "ollama":
        return _text(spec.get("model")) or server
    return _text(spec.get("model_name")) or server


def ollama_full_name(name: str) -> str:
    """An Ollama model name with its tag (`llama3` → `llama3:latest`), as Ollama lists it."""
    last = name.rsplit("/", 1)[-1]
    return name if ":" in last else f"{name}:latest"


def task_of(kind: str, spec: Mapping[str, Any]) -> str:
    """The task the server's endpoints serve: its `task:`, else the kind's (sentence: embedding)."""
    task = spec.get("task")
    if isinstance(task, str) and task in TASKS:
        return task
    return "embedding" if kind == "sentence" else "chat"


def aliases_of(spec: Mapping[str, Any]) -> list[str]:
    value = spec.get("aliases")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v]
    return []


def names_of(kind: str, profile: str, server: str, spec: Mapping[str, Any]) -> dict[str, str]:
    """Every name that reaches the server → where the name comes from (the profile key)."""
    served = served_name(kind, server, spec)
    key = {"vllm": "served_model_name", "ollama": "model"}.get(kind, "model_name")
    names = {f"{profile}/{server}": "server", served: key if served != server else "server"}
    if kind == "ollama":
        names.setdefault(ollama_full_name(served), key)
    for alias in aliases_of(spec):
        names.setdefault(alias, "aliases")
    return names


def clashes(servers: Mapping[str, tuple[str, Mapping[str, Any]]], profile: str) -> list[tuple[str, str, str, str]]:
    """Names that would reach two servers of one profile with the same task: (name, server,
    other server, key of `server` the name comes from). `servers`: name → (kind, mapping)."""
    seen: dict[tuple[str, str], str] = {}
    out = []
    for server, (kind, spec) in servers.items():
        task = task_of(kind, spec)
        for name, key in names_of(kind, profile, server, spec).items():
            other = seen.setdefault((task, name), server)
            if other != server:
                out.append((name, server, other, key))
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
