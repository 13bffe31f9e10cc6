"""The typer app and what every command shares: the global options, the consoles, the profile
options, and how `-p` is read. The command groups (servers.py, observe.py, cluster.py) register
themselves on `app`; nothing here knows them.

Kept light: nothing here imports torch, sentence-transformers or FastAPI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from modelctl import __version__
from modelctl.control import Controller, Scope, profile_name_of
from modelctl.errors import ModelctlError, UnknownProfileError
from modelctl.names import DEFAULT_PROFILE_NAME, is_valid_name
from modelctl.profile import Profile
from modelctl.state.store import StateStore


def _help_types_as_metavars() -> None:
    """typer writes a type after every name in --help (`--json <bool>`, `SERVER <str>`): show a
    flag bare, an option's value by its metavar and an argument by its name, as click does."""
    from typer import core

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        if getattr(self, "is_flag", False) or getattr(self, "count", False) or self.param_type_name == "argument":
            return None
        return str(self.metavar or (self.name or "value").upper())

    for cls in (core.TyperOption, core.TyperArgument):
        cls.display_type_rich = display_type_rich  # type: ignore[method-assign]


_help_types_as_metavars()

app = typer.Typer(
    help="Start, watch and stop model servers from YAML profiles. Servers are named PROFILE/SERVER.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

# no markup: paths, log lines and errors may hold `[...]`, which must print as it is. A pipe or a
# file gets lines as long as they are (no wrapping, no cutting): a URL stays whole for grep.
console = Console(markup=False, soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, markup=False, soft_wrap=not sys.stderr.isatty())


class Context:
    store: StateStore


ctx_state = Context()


def _version(value: bool) -> None:
    if value:
        print(f"modelctl {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    state_dir: Optional[Path] = typer.Option(
        None,
        "--state-dir",
        envvar="MODELCTL_STATE_DIR",
        metavar="DIR",
        help="State directory: records, logs, the supervisor's lock (default: $XDG_STATE_HOME/modelctl). Goes before the command.",
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    ctx_state.store = StateStore(state_dir)


def controller() -> Controller:
    return Controller(ctx_state.store)


ProfileOption = typer.Option(
    None,
    "--profile",
    "-p",
    envvar="MODELCTL_PROFILE",
    metavar="PROFILE",
    help="A profile file, or the name of a profile that has run here (default: $MODELCTL_PROFILE, else the bundled default).",
)
ProfileScope = typer.Option(
    None,
    "--profile",
    "-p",
    envvar="MODELCTL_PROFILE",
    metavar="PROFILE",
    help="Only this profile's servers: a profile file or a profile's name.",
)


def known_profiles(store: StateStore) -> list[str]:
    return sorted({ref.profile for ref in store.refs()})


def _looks_like_a_file(arg: str) -> bool:
    return "/" in arg or Path(arg).suffix in (".yaml", ".yml") or not is_valid_name(arg)


def _unknown_profile(arg: str, store: StateStore) -> UnknownProfileError:
    known = ", ".join(known_profiles(store)) or "none"
    return UnknownProfileError(f"no profile {arg!r} in {store.root} (known: {known}); give a profile file or one of those names")


def profile_path(arg: str | os.PathLike[str] | None, store: StateStore) -> Path | None:
    """The file `-p` names: the file itself, or, for a profile's name, the file its servers were
    last started from. None: no -p, so $MODELCTL_PROFILE or the bundled default."""
    if arg is None or str(arg) == "":
        return None
    text = str(arg)
    path = Path(text)
    if path.is_file():
        return path
    if _looks_like_a_file(text):
        raise UnknownProfileError(f"{text}: no such profile file")
    sources = sorted({r.source for r in store.records(text) if r.source})
    existing = [s for s in sources if Path(s).is_file()]
    if existing:
        return Path(existing[-1])
    if text == DEFAULT_PROFILE_NAME:
        return None  # the bundled default
    if sources:
        raise UnknownProfileError(f"profile {text!r} was started from {sources[-1]}, which is gone; give its file with -p FILE")
    raise _unknown_profile(text, store)


def load(profile: str | os.PathLike[str] | None) -> Profile:
    """The profile `-p` names (a file or a name), validated."""
    from modelctl.profile import load_profile

    path = profile_path(profile, ctx_state.store)
    # recorded as an absolute path: `-p NAME` finds the file again from any directory
    return load_profile(path.absolute() if path is not None else None)


def scope(profile: str | None, names: Optional[list[str]]) -> Scope:
    """What a command acts on. A `-p` that matches no profile here is an error naming the known
    ones; a profile file whose servers never ran here is a scope with nothing in it."""
    if not profile:
        return Scope(None, tuple(names or ()))
    store = ctx_state.store
    path = Path(profile)
    if not path.is_file() and _looks_like_a_file(profile):
        raise UnknownProfileError(f"{profile}: no such profile file")
    name = profile_name_of(profile)
    if not path.is_file() and name not in known_profiles(store):
        raise _unknown_profile(profile, store)
    return Scope(name, tuple(names or ()))


def fail(message: str, code: int = 1) -> ModelctlError:
    """An error the CLI prints in one line, with its exit code."""
    error = ModelctlError(message)
    error.exit_code = code
    return error
