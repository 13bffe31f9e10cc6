"""Reading YAML with bounds (file size, nodes after alias expansion, nesting), so that a hostile
file fails fast instead of eating memory; and a profile's name without validating the rest."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from modelctl.errors import ProfileError
from modelctl.names import DEFAULT_PROFILE_NAME, is_valid_name

MAX_PROFILE_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # after alias expansion: a profile is hundreds of nodes, a YAML bomb billions


def read_yaml(path: Path) -> Any:
    """A YAML file read with bounds; ProfileError names the file (and the line) on any problem."""
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PROFILE_BYTES + 1)
    except FileNotFoundError:
        raise ProfileError(source, "no such file") from None
    except IsADirectoryError:
        raise ProfileError(source, "is a directory, not a profile file") from None
    except OSError as e:
        raise ProfileError(source, f"cannot read: {e.strerror}") from None
    if len(data) > MAX_PROFILE_BYTES:
        raise ProfileError(source, f"is larger than {MAX_PROFILE_BYTES} bytes; a profile is a few kilobytes")
    loader = yaml.SafeLoader(data.decode("utf-8", "replace"))
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, source)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ProfileError(source, f"invalid YAML{where}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ProfileError(source, f"invalid YAML: {e}") from None
    except RecursionError:
        raise ProfileError(source, "invalid YAML: nested too deeply") from None
    finally:
        loader.dispose()


def _check_size(root: yaml.Node, source: str) -> None:
    """Count nodes as if every alias were expanded; refuse alias bombs and self-referring aliases."""
    sizes: dict[int, int] = {}
    visiting: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in visiting:
            raise ProfileError(source, "invalid YAML: an alias refers to a node that contains it")
        visiting.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        visiting.discard(key)
        if total > MAX_YAML_NODES:
            raise ProfileError(source, f"invalid YAML: more than {MAX_YAML_NODES} values once aliases are expanded (an alias bomb?)")
        sizes[key] = total
        return total

    size(root)


def peek_profile_name(path: Path) -> str:
    """A profile's name without validating the rest: its `name:`, else its file stem, else default."""
    try:
        data = read_yaml(path)
        if isinstance(data, Mapping) and is_valid_name(data.get("name")):
            return str(data["name"])
    except ProfileError:
        pass
    return path.stem if is_valid_name(path.stem) else DEFAULT_PROFILE_NAME
