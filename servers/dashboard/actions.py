"""Start (wake), stop and restart, on one server or a whole profile, through modelctl's Controller
as the CLI does them: start is `up` of the profile file the server came from (`--now` for one
on-demand server: it wakes), stop is `down`, restart is `restart`."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from modelctl.control import Controller, Scope
from modelctl.errors import ModelctlError, UnknownServerError
from modelctl.names import ServerRef, is_valid_name
from modelctl.state.record import ServerRecord

ACTIONS = ("start", "stop", "restart")


@dataclass(frozen=True)
class Target:
    """One server (`profile/name`) or every server of a profile."""

    profile: str
    name: str | None = None

    @classmethod
    def parse(cls, server: object, profile: object) -> Target:
        if isinstance(server, str) and server:
            try:
                parsed = ServerRef.parse(server, None)
            except ValueError as e:
                raise UnknownServerError(str(e)) from None
            if not isinstance(parsed, ServerRef):
                raise UnknownServerError(f"name the server as PROFILE/SERVER, not {server!r}")
            return cls(parsed.profile, parsed.name)
        if isinstance(profile, str) and is_valid_name(profile):
            return cls(profile)
        raise UnknownServerError("say which server (PROFILE/SERVER) or which profile")

    @property
    def scope(self) -> Scope:
        return Scope(self.profile, (self.name,) if self.name else ())

    def __str__(self) -> str:
        return f"{self.profile}/{self.name}" if self.name else f"profile {self.profile}"


def act(ctl: Controller, action: str, target: Target, profiles: Collection[str] | None = None) -> str:
    """Carry out one action; returns what was done, in a line. Raises ModelctlError as the CLI would."""
    if action not in ACTIONS:
        raise ModelctlError(f"unknown action {action!r}: one of {', '.join(ACTIONS)}")
    if profiles is not None and target.profile not in profiles:
        raise UnknownServerError(f"this dashboard shows only {', '.join(sorted(profiles))}, not {target.profile}")
    records = ctl.resolve(target.scope)  # unknown names are refused here, with the known ones
    if not records:
        raise UnknownServerError(f"{target} has no servers")
    if action == "restart":
        refs = ctl.restart(target.scope)
        return f"restarting {', '.join(map(str, refs))}"
    if action == "stop":
        stopped, notes = ctl.down(target.scope)
        said = [f"{s.label}: {s.result.how}" if not s.unproven else f"{s.label}: {s.unproven}" for s in stopped]
        return "; ".join(said + notes) or "nothing to stop"
    return start(ctl, target, [r for r in records if isinstance(r, ServerRecord)])


def start(ctl: Controller, target: Target, records: list[ServerRecord]) -> str:
    """`up -p FILE NAME...` with the profile file the records came from; one server is woken (--now)."""
    from modelctl.profile import load_profile

    sources = {r.source for r in records if r.source}
    if len(sources) != 1:
        raise ModelctlError(f"{target}: its servers come from {len(sources)} profile files; start them with modelctl up -p FILE")
    source = sources.pop()
    if not Path(source).is_file():
        raise ModelctlError(f"{target}: its profile file {source} is gone; start it with modelctl up -p FILE")
    profile = load_profile(source)
    names = [r.name for r in records if r.name in profile.servers]
    if not names:
        raise ModelctlError(f"{target}: {source} no longer lists {', '.join(r.name for r in records)}")
    one = target.name is not None
    plan = ctl.up(profile, names, now=one)
    started = [str(s.ref) for s in plan.start]
    idle = [r.label for r in records if r.state == "idle" and r.label in plan.unchanged]
    running = [label for label in plan.unchanged if label not in idle]
    said = [f"starting {', '.join(started)}" if started else "", f"waking {', '.join(idle)}" if one and idle else ""]
    said += [
        f"armed (on demand): {', '.join(idle)}" if not one and idle else "",
        f"already running: {', '.join(running)}" if running else "",
    ]
    return "; ".join(x for x in said if x) or "nothing to start"
