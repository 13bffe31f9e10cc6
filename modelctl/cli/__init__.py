"""The `modelctl` command line: parse, call the library, render. No logic of its own.

`app.py` holds the typer app and the options every command shares; each group of commands
registers itself on it when imported here: `servers.py` (up, down, forget, restart, status, logs,
supervise, run), `observe.py` (metrics, top), `cluster.py` (systemd, k8s, slurm) and `ui.py` (the
dashboard). `main` is the
entry point: it turns a ModelctlError into one line on stderr and its exit code.

Kept light: nothing here imports torch, sentence-transformers or FastAPI.
"""

from __future__ import annotations

import sys

from rich.text import Text

from modelctl.cli import cluster, observe, servers
from modelctl.cli import ui as ui_command
from modelctl.cli.app import app, ctx_state, err_console
from modelctl.control import Controller
from modelctl.errors import ModelctlError
from modelctl.host.files import DiskError, is_disk_error

__all__ = ["app", "cluster", "main", "observe", "servers"]

ui_command.register(app, lambda: ctx_state.store)  # `modelctl ui`: the dashboard in the foreground

GLOBAL_OPTIONS = ("--state-dir",)


def misplaced_global_option(argv: list[str]) -> str | None:
    """A global option written after the command (`status --state-dir X`): what to say instead of
    click's `No such option`."""
    command_at = next((i for i, a in enumerate(argv) if not a.startswith("-") and (i == 0 or argv[i - 1] not in GLOBAL_OPTIONS)), None)
    if command_at is None:
        return None
    for i, arg in enumerate(argv[command_at + 1 :], command_at + 1):
        option = arg.split("=", 1)[0]
        if option in GLOBAL_OPTIONS:
            value = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "DIR")
            rest = [a for j, a in enumerate(argv) if j != i and not (j == i + 1 and "=" not in arg)]
            return f"{option} is a global option: put it before the command: modelctl {option} {value} {' '.join(rest)}".rstrip()
    return None


def _say(error: object, code: int) -> None:
    err_console.print(Text.assemble(("error:", "bold red"), f" {error}"), highlight=False, soft_wrap=True)
    sys.exit(code)


def main() -> None:
    if (misplaced := misplaced_global_option(sys.argv[1:])) is not None:
        _say(misplaced, 2)
    try:
        app()
    except ModelctlError as e:
        _say(e, e.exit_code)
    except OSError as e:
        if not is_disk_error(e):
            raise
        error = DiskError(e.filename or ctx_state.store.root, e)
        _say(error, error.exit_code)
    except KeyboardInterrupt:
        # a stop cut short leaves its records `stopping` with a dead owner: the supervisor finishes it
        try:
            Controller(ctx_state.store).kick()
        except (ModelctlError, OSError, AttributeError):
            pass
        err_console.print("interrupted; the supervisor finishes what was under way", style="dim")
        sys.exit(130)


if __name__ == "__main__":
    main()
