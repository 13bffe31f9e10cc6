"""The `command` kind: any server, as an argv with placeholders."""

from __future__ import annotations

import string
from typing import Any, Mapping

from modelctl.backends.base import Backend, Launch
from modelctl.profile import HealthSpec, Key, ServerSpec, check_str, check_str_list, required

PLACEHOLDERS = ("port", "host", "gpus", "model", "name")


def check_placeholders(argv: list[str], key: str = "command") -> None:
    for arg in argv:
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
        except ValueError as e:
            raise ValueError(f"{key}: {arg!r}: {e} (write literal braces as {{{{ and }}}})") from None
        for f in fields:
            if f not in PLACEHOLDERS:
                raise ValueError(
                    f"{key}: unknown placeholder {{{f}}} in {arg!r}; known: "
                    + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                )


def fill_placeholders(argv: list[str], spec: ServerSpec, port: int, gpus: list[int]) -> list[str]:
    values = {
        "port": str(port),
        "host": spec.host,
        "gpus": ",".join(map(str, gpus)),
        "model": str(spec.options.get("model") or ""),
        "name": spec.name,
    }
    return [arg.format_map(values) for arg in argv]


class CommandBackend(Backend):
    kind = "command"
    startup_timeout = 60.0
    keys = {
        "command": required(check_str_list, "argv list with {port} {host} {gpus} {model} {name} placeholders"),
        "model": Key(check_str, None, "value of the {model} placeholder"),
        "cwd": Key(check_str, None, "working directory"),
    }

    def default_health(self, options: Mapping[str, Any]) -> HealthSpec:
        return HealthSpec(kind="tcp")

    def validate(self, options: dict[str, Any], common: Mapping[str, Any]) -> None:
        if not options["command"]:
            raise ValueError("command: must not be empty")
        check_placeholders(options["command"])

    def launch(self, spec: ServerSpec, port: int, gpus: list[int]) -> Launch:
        return Launch(argv=fill_placeholders(spec.options["command"], spec, port, gpus), cwd=spec.options.get("cwd"))
