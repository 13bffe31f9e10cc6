"""The `modelctl` command line: parse, call the library, render. No logic of its own.

Kept light: nothing here imports torch, sentence-transformers or FastAPI.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from modelctl import __version__
from modelctl.cli import ui as ui_command
from modelctl.cli.format import styled_state
from modelctl.control import Controller, Scope, profile_name_of, systemd_unit_of
from modelctl.errors import ModelctlError
from modelctl.host.files import DiskError, is_disk_error
from modelctl.names import ServerRef
from modelctl.observe.rows import BROKEN, StatusRow
from modelctl.sanitize import one_line, printable
from modelctl.state import lifecycle as lc
from modelctl.state.record import HELD, HELD_BY_INSTANCE, NO_SOCKET, ServerRecord, socket_mode
from modelctl.state.store import StateStore
from modelctl.units import format_bytes, format_duration, format_startup

app = typer.Typer(
    help="Start, watch and stop model servers from YAML profiles. Servers are named PROFILE/SERVER.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
systemd_app = typer.Typer(help="Run a profile's servers under systemd.", no_args_is_help=True)
app.add_typer(systemd_app, name="systemd")
k8s_app = typer.Typer(help="Run a profile's servers on Kubernetes (which then does the supervising).", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")
slurm_app = typer.Typer(help="Run a profile's servers as Slurm jobs (each job supervises its server).", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")

# wide enough that URLs are not cut when the output is a pipe or a file
_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
# no markup: paths, log lines and errors may hold `[...]`, which must print as it is
console = Console(width=_WIDTH, markup=False)
err_console = Console(stderr=True, width=_WIDTH, markup=False)


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
        None, "--state-dir", envvar="MODELCTL_STATE_DIR", help="State directory (default: $XDG_STATE_HOME/modelctl)."
    ),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    ctx_state.store = StateStore(state_dir)


def controller() -> Controller:
    return Controller(ctx_state.store)


ui_command.register(app, lambda: ctx_state.store)


ProfileFile = typer.Option(
    None, "--profile", "-p", envvar="MODELCTL_PROFILE", help="Profile YAML (default: $MODELCTL_PROFILE, else the bundled default)."
)
ProfileScope = typer.Option(
    None, "--profile", "-p", envvar="MODELCTL_PROFILE", help="Only this profile's servers (a profile file or a profile name)."
)


def _load(profile: Optional[Path]) -> Any:
    from modelctl.profile import load_profile

    return load_profile(profile)


def _scope(profile: Optional[str], names: Optional[list[str]]) -> Scope:
    return Scope(profile_name_of(profile) if profile else None, tuple(names or ()))


# ---------------------------------------------------------------------------- up
class UpDisplay:
    """Live per-server progress for `up`: state, elapsed seconds, what is happening."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.rates: dict[str, tuple[float, int]] = {}
        self.last_lines: dict[str, str] = {}

    def table(self, records: list[ServerRecord]) -> Table:
        from rich.progress_bar import ProgressBar

        t = Table(box=None, pad_edge=False)
        t.add_column("server")
        t.add_column("state")
        t.add_column("time", justify="right")
        t.add_column("")
        for rec in records:
            inst = rec.instance
            started = inst.started_at if inst is not None else self.t0
            elapsed = (inst.ready_at or 0) - started if rec.state == lc.READY and inst is not None else time.time() - started
            cell: Text | Table = Text(rec.detail or "", style="dim")
            if rec.progress and rec.progress.get("total"):
                total, done = int(rec.progress["total"]), int(rec.progress.get("completed") or 0)
                grid = Table.grid(padding=(0, 1))
                grid.add_row(
                    ProgressBar(total=total, completed=done, width=30),
                    Text(
                        f"{rec.progress.get('status', '')} {format_bytes(done)}/{format_bytes(total)} {self._rate(rec.label, done, total)}"
                    ),
                )
                cell = grid
            t.add_row(rec.label, styled_state(rec.state), f"{max(elapsed, 0):.1f}s", cell)
        return t

    def _rate(self, label: str, done: int, total: int) -> str:
        now = time.time()
        if label not in self.rates:
            self.rates[label] = (now, done)
            return ""
        t0, d0 = self.rates[label]
        if now - t0 < 0.5 or done <= d0:
            return ""
        rate = (done - d0) / (now - t0)
        eta = (total - done) / rate if rate > 0 else None
        return f"{format_bytes(int(rate))}/s ETA {format_duration(eta)}"

    def lines(self, records: list[ServerRecord]) -> None:
        """Plain progress lines when the output is not a terminal."""
        for rec in records:
            line = f"{rec.label}: {rec.state}" + (f" ({rec.detail})" if rec.detail else "")
            if self.last_lines.get(rec.label) != line:
                self.last_lines[rec.label] = line
                console.print(f"[{time.time() - self.t0:6.1f}s] {line}", highlight=False)


@app.command()
def up(
    servers: Optional[list[str]] = typer.Argument(None, help="Servers to start (default: all in the profile)."),
    profile: Optional[Path] = ProfileFile,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the servers are ready."),
    remove_orphans: bool = typer.Option(False, "--remove-orphans", help="Stop servers of this profile that it no longer lists."),
    now: bool = typer.Option(False, "--now", help="Start on-demand servers at once too (warm them up ahead of traffic)."),
) -> None:
    """Start the profile's servers (detached) and wait until they are ready; on-demand ones are armed."""
    from rich.live import Live

    from modelctl.control import select_specs

    prof = _load(profile)
    ctl = controller()
    plan = ctl.up(prof, servers or [], remove_orphans=remove_orphans, now=now)
    for label in plan.unchanged:
        console.print(f"{label}: already running with this spec", style="dim", highlight=False)
    for stopped in plan.removed:
        console.print(f"{stopped.label}: orphan removed ({stopped.result.how})", highlight=False)
    for label in plan.orphans:
        err_console.print(
            f"{label} is no longer in {prof.path} but still runs: stop it with `modelctl down {label}`, or run up --remove-orphans",
            highlight=False,
        )
    refs = [s.ref for s in select_specs(prof, servers or [])]
    if not wait:
        _print_summary(ctl, Scope(prof.name, tuple(str(r) for r in refs)))
        return
    display = UpDisplay()
    if console.is_terminal:
        with Live(display.table([]), console=console, refresh_per_second=8, transient=True) as live:
            records = ctl.wait_ready(refs, on_update=lambda recs: live.update(display.table(recs)))
    else:
        records = ctl.wait_ready(refs, on_update=display.lines)
    _print_summary(ctl, Scope(prof.name, tuple(str(r) for r in refs)))
    _report_not_ready(ctl, records)


def _report_not_ready(ctl: Controller, records: list[ServerRecord]) -> None:
    """Each server that is not ready, or whose new instance could not take over, with why and
    the end of its log; exit 1 if there is one."""
    reported = False
    for rec in records:
        armed = rec.state == lc.IDLE and rec.wish.warm <= rec.usage.warmed  # on demand: waits for its first client
        if rec.state != lc.READY and not armed:
            last_error = one_line(rec.history.last_error) if rec.history.last_error else None
            why = one_line(rec.detail or "") or last_error or rec.state
            err_console.print(Text.assemble("\n", (f"{rec.label} is not ready", "bold red"), f": {why}"), highlight=False)
            if last_error and last_error not in why:
                err_console.print(f"  last error: {last_error}", highlight=False)
        elif (abandoned := rec.abandoned_replacement) is not None:
            err_console.print(
                Text.assemble("\n", (f"{rec.label} was not replaced", "bold red"), f": {one_line(abandoned)}"), highlight=False
            )
        else:
            continue
        reported = True
        _print_tail(err_console, ctl, rec.ref, 15, f"  last lines of {ctl.store.log_path(rec.ref)}:")
    if reported:
        raise typer.Exit(1)


def _print_summary(ctl: Controller, scope: Scope) -> None:
    t = Table(box=None, pad_edge=False)
    for col in ("server", "url", "state", "model"):
        t.add_column(col)
    for r in ctl.status(scope):
        t.add_row(r.id, r.url or "-", styled_state(r.state), r.model or "")
    console.print(t)


# ---------------------------------------------------------------------------- down / restart
@app.command()
def down(
    servers: Optional[list[str]] = typer.Argument(None, help="Servers to stop: PROFILE/SERVER, or SERVER within -p."),
    profile: Optional[str] = ProfileScope,
) -> None:
    """Stop servers: SIGTERM the whole process group, then SIGKILL after stop_timeout.

    With no -p and no names, every server in the state directory is stopped. Servers that
    systemd runs are left to systemctl.
    """
    results, skipped = controller().down(_scope(profile, servers))
    if not results and not skipped:
        console.print("no servers to stop")
    for note in skipped:
        console.print(note, highlight=False)
    for stopped in results:
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
    if any(not stopped.ok for stopped in results):
        raise typer.Exit(1)


@app.command()
def restart(
    servers: Optional[list[str]] = typer.Argument(None, help="Servers to restart (default: all in -p's profile)."),
    profile: Optional[str] = ProfileScope,
    wait: bool = typer.Option(True, "--wait/--no-wait"),
) -> None:
    """Stop and start servers again (clears a failed state)."""
    if not servers and not profile:
        raise ModelctlError("name the servers to restart, or -p PROFILE for all of a profile's")
    ctl = controller()
    refs = ctl.restart(_scope(profile, servers))
    if wait:
        records = ctl.wait_ready(refs)
        _print_summary(ctl, Scope(None, tuple(str(r) for r in refs)))
        _report_not_ready(ctl, records)


# ---------------------------------------------------------------------------- status / logs
STATUS_COLUMNS = (
    "server",
    "kind",
    "state",
    "pid",
    "url",
    "socket",
    "gpus",
    "uptime",
    "restarts",
    "memory",
    "gpu mem",
    "started in",
    "model",
)
RIGHT_ALIGNED = {"pid", "restarts", "memory", "gpu mem", "uptime", "started in"}


@app.command()
def status(
    server: Optional[str] = typer.Argument(None, help="One server to show in detail."),
    profile: Optional[str] = ProfileScope,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
) -> None:
    """Show servers, grouped by profile: state, pid, URL, GPUs, uptime, restarts, memory."""
    ctl = controller()
    rows = ctl.status(_scope(profile, [server] if server else None))
    ctl.kick()  # a supervisor that died is replaced; it re-adopts live servers
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    if server:
        _print_detail(ctl, rows[0])
        return
    if not rows:
        console.print(f"no servers in {ctl.store.root}", highlight=False)
    by_profile: dict[str, list[StatusRow]] = {}
    for r in rows:
        by_profile.setdefault(r.profile, []).append(r)
    gpu_column = any(r.gpu_memory is not None for r in rows)
    for name, group in by_profile.items():
        console.print(_status_table(name, group, gpu_column))
        if line := _budget_line(group):
            console.print(line, highlight=False)
        console.print()
    for r in rows:
        _print_notes(ctl, r)
    console.print(f"supervisor: {_supervisor_line(ctl)}   state: {ctl.store.root}", style="dim", highlight=False)


def _status_table(profile_name: str, rows: list[StatusRow], gpu_column: bool) -> Table:
    t = Table(box=None, pad_edge=False, title=f"profile {profile_name}", title_justify="left", title_style="bold")
    columns = [c for c in STATUS_COLUMNS if gpu_column or c != "gpu mem"]
    for col in columns:
        t.add_column(col, justify="right" if col in RIGHT_ALIGNED else "left")
    for r in rows:
        cells: dict[str, str | Text] = {
            "server": r.name,
            "kind": r.kind,
            "state": styled_state(r.state),
            "pid": str(r.pid or "-"),
            "url": r.url or "-",
            "socket": _socket_cell(r),
            "gpus": ",".join(map(str, r.gpus)) or "-",
            "uptime": format_duration(r.uptime),
            "restarts": str(r.restarts),
            "memory": format_bytes(r.rss),
            "gpu mem": format_bytes(r.gpu_memory),
            "started in": format_duration(r.startup["total"], precise=True) if r.startup and "total" in r.startup else "-",
            "model": r.model or "",
        }
        t.add_row(*(cells[c] for c in columns))
    return t


def _footprint(r: StatusRow) -> int | None:
    return r.memory_learned if r.memory_learned is not None else r.memory_declared


def _budget_line(rows: list[StatusRow]) -> str:
    """The profile's budget and what its servers hold of it (their footprints), if it has one."""
    budget = next((r.budget for r in rows if r.budget), None)
    if not budget or budget.get("memory") is None:
        return ""
    holding = [r for r in rows if r.state in (*lc.ALIVE, lc.STOPPING, lc.CRASHED)]
    used = sum(_footprint(r) or 0 for r in holding)
    return f"budget: {format_bytes(used)} of {format_bytes(budget['memory'])} memory held ({len(holding)} running)" + (
        " — shared by every profile" if budget.get("shared") else ""
    )


def _socket_cell(r: StatusRow) -> str:
    """held (by the supervisor, across restarts) / instance (held by the running instance only) / -"""
    mode = socket_mode(r.socket)
    if mode == HELD:
        return f"held, {r.backlog} waiting" if r.backlog else "held"
    if mode == HELD_BY_INSTANCE:
        return "instance"
    return "-" if mode == NO_SOCKET else "no"


def _supervisor_line(ctl: Controller) -> str:
    from modelctl.supervisor.client import supervisor_info

    info = supervisor_info(ctl.store)
    if info is None:
        return "not running"
    if not info.responding:
        age = "never" if info.heartbeat_age is None else f"{info.heartbeat_age:.0f}s ago"
        return f"pid {info.pid} NOT RESPONDING (last heartbeat {age}; stopped or hung? kill -CONT {info.pid})"
    return f"pid {info.pid}"


def _print_notes(ctl: Controller, r: StatusRow) -> None:
    last_exit = r.last_exit and f"last exit: {r.last_exit['description']}"
    notes = [x for x in (r.detail, last_exit, r.last_error) if x]
    progress = r.progress or {}
    if r.state == lc.STARTING and progress.get("total"):
        done, total = int(progress.get("completed") or 0), int(progress["total"])
        notes.insert(
            0, f"{one_line(str(progress.get('status', '')))} {100 * done // total}% ({format_bytes(done)} of {format_bytes(total)})"
        )
    if r.start == "on-demand" and r.last_eviction:
        notes.append(f"last eviction {r.last_eviction}")
    if r.state in (lc.FAILED, lc.BACKOFF, lc.CRASHED, lc.UNHEALTHY, lc.STARTING, BROKEN) and notes:
        console.print(Text.assemble((r.id, "bold"), ": " + "; ".join(dict.fromkeys(notes))), highlight=False)
        if r.state == lc.FAILED:
            _print_tail(console, ctl, ServerRef(r.profile, r.name), 10)


def _print_detail(ctl: Controller, r: StatusRow) -> None:
    t = Table(box=None, show_header=False, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("server", r.id)
    t.add_row("state", styled_state(r.state))
    for key in ("kind", "model", "url", "socket", "backlog", "pid", "managed_by", "desired", "detail", "last_error", "record", "log"):
        value = getattr(r, key)
        if value not in (None, ""):
            t.add_row(key.replace("_", " "), str(value))
    if r.gpus:
        t.add_row("gpus", ",".join(map(str, r.gpus)))
    if r.uptime is not None:
        t.add_row("uptime", format_duration(r.uptime))
    t.add_row("restarts", str(r.restarts))
    if r.rss:
        t.add_row("memory", format_bytes(r.rss))
    if r.gpu_memory is not None:
        t.add_row("gpu memory", format_bytes(r.gpu_memory))
    if r.startup:
        t.add_row("startup", format_startup(r.startup))
    if r.memory_declared is not None or r.memory_learned is not None:
        t.add_row("footprint", f"{format_bytes(r.memory_declared)} declared, {format_bytes(r.memory_learned)} measured")
    if r.start == "on-demand":
        wake = f", last wake {r.last_wake_seconds:.1f}s" if r.last_wake_seconds is not None else ""
        t.add_row("on demand", f"{r.wakes} wakes, {r.idle_stops} idle stops, {r.evictions} evictions{wake}")
        if r.last_eviction:
            t.add_row("last eviction", r.last_eviction)
    console.print(t)
    if r.exits:
        console.print("\nlast exits", style="bold")
        console.print(_exits_table(r.exits))
    if r.state != BROKEN:
        _print_tail(console, ctl, ServerRef(r.profile, r.name), 10, f"\nlast lines of {r.log}", style="bold")


def _exits_table(exits: list[dict[str, Any]]) -> Table:
    e = Table(box=None, pad_edge=False)
    for col in ("when", "exit", "class", "why"):
        e.add_column(col)
    for x in reversed(exits):
        e.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(x["at"])) if x.get("at") else "-",
            x["exit"]["description"] if x.get("exit") else "-",
            x.get("class") or "",
            x.get("line") or "",
        )
    return e


def _print_tail(out: Console, ctl: Controller, ref: ServerRef, lines: int, header: str = "", style: str = "") -> None:
    """The end of a server's log, each line marked `  | `, printed as it is (no markup) and with
    its control characters made visible: a server's output never reaches the terminal raw."""
    tail = ctl.log_tail(ref, lines)
    if tail and header:
        out.print(header, style=style, highlight=False)
    for line in tail:
        out.print(f"  | {printable(line)}", highlight=False)


@app.command()
def logs(
    server: str = typer.Argument(..., help="Server: PROFILE/SERVER, or SERVER within -p (or when only one profile has it)."),
    profile: Optional[str] = ProfileScope,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    lines: int = typer.Option(50, "--lines", "-n", help="How many lines from the end (across rotated parts)."),
    raw: bool = typer.Option(False, "--raw", help="Print control characters as they are, even to a terminal."),
) -> None:
    """Print a server's log (stdout and stderr). On a terminal, control characters are made visible."""
    ctl = controller()
    rec = ctl.resolve(_scope(profile, [server]))[0]
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
            print(printable(line) if clean else line, flush=True)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------- metrics / top
@app.command()
def metrics(profile: Optional[str] = ProfileScope) -> None:
    """The supervisor's view as Prometheus metrics (also in STATE/metrics.prom while it runs)."""
    from modelctl.observe.metrics import exposition

    ctl = controller()
    sys.stdout.write(exposition(lambda: ctl.status(_scope(profile, None))).decode())


@app.command()
def top(
    profile: Optional[str] = ProfileScope,
    interval: float = typer.Option(2.0, "--interval", help="Seconds between frames."),
    once: bool = typer.Option(False, "--once", help="Print one frame (rates over --interval) and exit."),
) -> None:
    """A live view of every server: state, memory, GPU memory, request rate and latency (q quits)."""
    from modelctl.cli import top as top_view

    ctl = controller()
    if once:
        console.print(top_view.once(ctl, _scope(profile, None), interval))
        return
    try:
        top_view.run(ctl, _scope(profile, None), interval, console)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------- supervise / run
@app.command()
def supervise(
    stop: bool = typer.Option(False, "--stop", help="Stop the running supervisor (servers keep running)."),
    stay: bool = typer.Option(False, "--stay", help="Keep running when no server is wanted (for systemd)."),
    timeout: float = typer.Option(10.0, "--timeout", help="With --stop: seconds to wait for it to exit."),
    metrics_port: Optional[int] = typer.Option(None, "--metrics-port", help="Serve Prometheus metrics on 127.0.0.1:PORT."),
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
    server: str = typer.Argument(..., help="Server to run."),
    profile: Optional[Path] = ProfileFile,
    port: Optional[int] = typer.Option(None, "--port", help="Fixed port (units resolve `auto` once)."),
    gpus: Optional[str] = typer.Option(
        None, "--gpus", help="GPU ids, e.g. 0,1 (units resolve counts once), or inherit: the job's CUDA_VISIBLE_DEVICES as it is."
    ),
    host: Optional[str] = typer.Option(None, "--host", help="Bind this address instead of the profile's host."),
    restart_in_place: bool = typer.Option(
        False, "--restart-in-place", help="Restart a crashed server here, by the profile's restart policy (a Slurm job)."
    ),
    report: Optional[Path] = typer.Option(
        None, "--report", help="Write where the server landed (node, port, URL, state) to this JSON file."
    ),
) -> None:
    """Run one server in the foreground (for systemd and Slurm jobs): prepare, start, notify READY=1, wait."""
    from modelctl.foreground import run_foreground

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    gpu_ids: list[int] | str | None = None
    if gpus == "inherit":
        gpu_ids = "inherit"
    elif gpus:
        try:
            gpu_ids = [int(g) for g in gpus.split(",") if g.strip()]
        except ValueError:
            raise ModelctlError(f"--gpus takes GPU ids like 0,1 or inherit, got {gpus!r}") from None
    code = run_foreground(
        ctx_state.store, _load(profile), server, port=port, gpus=gpu_ids, host=host, restart_in_place=restart_in_place, report=report
    )
    raise typer.Exit(code)


# ---------------------------------------------------------------------------- systemd
@systemd_app.command("generate")
def systemd_generate(
    profile: Optional[Path] = ProfileFile,
    user: bool = typer.Option(True, "--user/--system", help="User units (default) or system units."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory to write the units to (default: print them)."),
) -> None:
    """Write one unit per server plus a target that groups them."""
    from modelctl.cluster import systemd

    prof = _load(profile)
    units = systemd.generate_units(prof, ctx_state.store, user=user)
    if out is None:
        for name, text in units.items():
            console.print(f"# {name}", style="bold", highlight=False)
            print(text)
    else:
        for p in systemd.write_units(units, out):
            console.print(f"wrote {p}", highlight=False)
    console.print(systemd.install_hint(prof, user=user, out=out), highlight=False)


@systemd_app.command("install")
def systemd_install(
    profile: Optional[Path] = ProfileFile,
    user: bool = typer.Option(True, "--user/--system"),
) -> None:
    """Write the units to systemd's directory and reload systemd."""
    from modelctl.cluster import systemd

    prof = _load(profile)
    units = systemd.generate_units(prof, ctx_state.store, user=user)
    for p in systemd.write_units(units, systemd.unit_dir(user)):
        console.print(f"wrote {p}", highlight=False)
    console.print(systemd.daemon_reload(user), highlight=False)
    console.print(f"enable and start with: systemctl {'--user ' if user else ''}enable --now {systemd.target_name(prof)}", highlight=False)


# ---------------------------------------------------------------------------- Kubernetes
NamespaceOption = typer.Option(None, "--namespace", "-n", help="Namespace (default: the profile's k8s.namespace).")
ImageOption = typer.Option(None, "--image", help="The bundled server's image (default: modelctl-sentence:VERSION).")


def _generated(profile: Optional[Path], namespace: Optional[str], image: Optional[str], create_namespace: bool = False) -> Any:
    from modelctl.cluster.k8s.manifests import ClusterOptions, generate

    generated = generate(_load(profile), ClusterOptions(namespace=namespace, image=image, create_namespace=create_namespace))
    for note in generated.skipped:
        err_console.print(f"skipped {note}", highlight=False)
    return generated


@k8s_app.command("generate")
def k8s_generate(
    profile: Optional[Path] = ProfileFile,
    out: Optional[Path] = typer.Option(None, "--out", help="Directory to write the manifests to (default: print them)."),
    namespace: Optional[str] = NamespaceOption,
    image: Optional[str] = ImageOption,
    create_namespace: bool = typer.Option(False, "--create-namespace", help="Also write the Namespace object."),
) -> None:
    """Per server a Deployment and a Service (and a model cache PVC), plus kustomization.yaml."""
    generated = _generated(profile, namespace, image, create_namespace)
    if out is None:
        for name, text in generated.render().items():
            print(f"---\n# {name}\n{text}", end="")
        return
    for path in generated.write(out):
        note = " (mode 0600: it holds the API key)" if generated.is_secret(path.name) else ""
        console.print(f"wrote {path}{note}", highlight=False)
    console.print(f"apply with: kubectl apply -k {out}", highlight=False)


@k8s_app.command("apply")
def k8s_apply(
    profile: Optional[Path] = ProfileFile,
    namespace: Optional[str] = NamespaceOption,
    image: Optional[str] = ImageOption,
    out: Optional[Path] = typer.Option(None, "--out", help="Keep the manifests in this directory."),
    create_namespace: bool = typer.Option(False, "--create-namespace"),
) -> None:
    """Generate the manifests and `kubectl apply -k` them."""
    from modelctl.cluster.k8s import kubectl

    print(kubectl.apply(_generated(profile, namespace, image, create_namespace), out), end="")


@k8s_app.command("delete")
def k8s_delete(
    profile: Optional[Path] = ProfileFile,
    namespace: Optional[str] = NamespaceOption,
    image: Optional[str] = ImageOption,
) -> None:
    """`kubectl delete -k` the profile's objects (the model cache volumes too)."""
    from modelctl.cluster.k8s import kubectl

    print(kubectl.delete(_generated(profile, namespace, image)), end="")


@k8s_app.command("status")
def k8s_status(
    profile: Optional[Path] = ProfileFile,
    namespace: Optional[str] = NamespaceOption,
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """The profile's Deployments in the cluster: replicas ready, rollout state."""
    from modelctl.cluster.k8s import kubectl

    prof = _load(profile)
    rows = kubectl.status(prof.name, namespace or prof.k8s.get("namespace"))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"no Deployments of profile {prof.name} in the cluster", highlight=False)
        return
    t = Table(box=None, pad_edge=False)
    for col in ("deployment", "server", "state", "ready", "detail"):
        t.add_column(col)
    for r in rows:
        t.add_row(r["name"], r["server"], styled_state(r["state"]), f"{r['ready']}/{r['replicas']}", r["detail"])
    console.print(t)


# ---------------------------------------------------------------------------- Slurm
ServersArg = typer.Argument(None, help="Servers (default: all of the profile's).")


def _servers_of(prof: Any, servers: Optional[list[str]]) -> Optional[list[str]]:
    for name in servers or []:
        if name not in prof.servers:
            raise ModelctlError(f"no server {name!r} in profile {prof.name} ({prof.path}); servers: {', '.join(prof.servers)}")
    return list(servers) if servers else None


@slurm_app.command("generate")
def slurm_generate(
    profile: Optional[Path] = ProfileFile,
    out: Optional[Path] = typer.Option(None, "--out", help="Directory to write the scripts to (default: print them)."),
    servers: Optional[list[str]] = ServersArg,
) -> None:
    """One sbatch script per server; each job runs `modelctl run SERVER` and reports where it landed."""
    from modelctl.cluster.slurm import scripts

    prof = _load(profile)
    generated = scripts.generate(prof, ctx_state.store.root, _servers_of(prof, servers))
    if out is None:
        for s in generated:
            print(f"# ---- {s.name}\n{s.text}", end="")
        return
    for path in scripts.write(generated, out):
        console.print(f"wrote {path}", highlight=False)
    jobs = scripts.jobs_dir(ctx_state.store.root, prof.name)
    jobs.mkdir(parents=True, exist_ok=True)  # Slurm writes no output to a directory that does not exist
    console.print(
        f"submit with: modelctl slurm submit -p {prof.path}, or sbatch each script (the jobs write to {jobs}, "
        "which must be on a filesystem the nodes share)",
        highlight=False,
    )


@slurm_app.command("submit")
def slurm_submit(profile: Optional[Path] = ProfileFile, servers: Optional[list[str]] = ServersArg) -> None:
    """sbatch each server's job, unless one of its name is already pending or running."""
    from modelctl.cluster.slurm import commands

    prof = _load(profile)
    for s in commands.submit(prof, ctx_state.store.root, _servers_of(prof, servers)):
        what = "submitted" if s.new else f"already {s.state.lower()}, not submitted again:"
        console.print(f"{prof.name}/{s.server}: {what} job {s.job_id}", highlight=False)
    console.print(f"watch with: modelctl slurm status -p {prof.path}", style="dim", highlight=False)


@slurm_app.command("status")
def slurm_status(profile: Optional[Path] = ProfileFile, as_json: bool = typer.Option(False, "--json")) -> None:
    """Each server's job: id, Slurm state, node, URL and health."""
    from modelctl.cluster.slurm import commands

    rows = commands.status(_load(profile), ctx_state.store.root)
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    t = Table(box=None, pad_edge=False)
    for col in ("server", "state", "job", "node", "url", "restarts", "detail"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r.name,
            styled_state(one_line(r.state)),
            f"{r.job_id} ({one_line(r.job_state.lower())})" if r.job_id and r.job_state else (r.job_id or ""),
            printable(r.node),
            printable(r.url),
            str(r.restarts) if r.restarts else "",
            one_line(r.detail),
        )
    console.print(t)


@slurm_app.command("cancel")
def slurm_cancel(profile: Optional[Path] = ProfileFile, servers: Optional[list[str]] = ServersArg) -> None:
    """scancel the servers' jobs and return once they are gone."""
    from modelctl.cluster.slurm import commands

    prof = _load(profile)
    ended = commands.cancel(prof, _servers_of(prof, servers))
    if not ended:
        console.print(f"no pending or running jobs of profile {prof.name}", highlight=False)
    for j in ended:
        console.print(f"{j.name}: job {j.job_id} ended", highlight=False)


def main() -> None:
    try:
        app()
    except ModelctlError as e:
        err_console.print(Text.assemble(("error:", "bold red"), f" {e}"), highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except OSError as e:
        if not is_disk_error(e):
            raise
        error = DiskError(e.filename or ctx_state.store.root, e)
        err_console.print(Text.assemble(("error:", "bold red"), f" {error}"), highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
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
