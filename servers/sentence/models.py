"""Where a model is and what it is, without importing torch."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from servers.sentence.encoder import ConfigurationError


def resolve_model_path(spec: str) -> str:
    """`package:MODULE/sub/dir` → the directory inside an installed package; anything else as is."""
    if not spec.startswith("package:"):
        return spec
    module, _, sub = spec[len("package:") :].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise ConfigurationError(f"model {spec!r}: Python package {module!r} is not installed")
    path = Path(next(iter(found.submodule_search_locations))) / sub
    if not path.exists():
        raise ConfigurationError(f"model {spec!r}: {path} does not exist")
    return str(path)


def cached_model_dir(repo_id: str) -> str | None:
    """A hub model's directory in the local Hugging Face cache, if it is there (no download)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:
        return None
    return str(Path(found).parent) if isinstance(found, str) else None


def is_cross_encoder(path: str) -> bool:
    """A sequence classifier without sentence-transformers modules: a CrossEncoder."""
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    try:
        archs = json.loads(config.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    has_st_modules = (Path(path) / "modules.json").exists()
    return any(a.endswith("ForSequenceClassification") for a in archs) and not has_st_modules


def cross_encoder_max_length(model: Any) -> int:
    """A CrossEncoder's input limit: `max_seq_length` (sentence-transformers 5), `max_length` before."""
    limit = getattr(model, "max_seq_length", None) if hasattr(type(model), "max_seq_length") else getattr(model, "max_length", None)
    return int(limit or model.tokenizer.model_max_length)
