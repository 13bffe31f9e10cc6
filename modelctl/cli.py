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
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from modelctl import lifecycle as lc
from modelctl.control import Controller, format_bytes, format_duration
from modelctl.errors import ModelctlError
from modelctl.state import ServerRecord, StateStore

app = typer.Typer(
    help="Start, watch and stop model servers from a YAML profile.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
systemd_app = typer.Typer(help="Run a profile's servers under systemd.", no_args_is_help=True)
app.add_typer(systemd_app, name="systemd")

# wide enough that URLs are not cut when the output is a pipe or a file
_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH)

STATE_STYLE = {
    lc.READY: "green",
    lc.STARTING: "yellow",
    lc.UNHEALTHY: "dark_orange",
    lc.BACKOFF: "dark_orange",
    lc.CRASHED: "red",
    lc.FAILED: "bold red",
    lc.STOPPING: "cyan",
    lc.STOPPED: "dim",
}


class Context:
    store: StateStore


ctx_state = Context()


@app.callback()
def _global(
    state_dir: Optional[Path] = typer.Option(
        None, "--state-dir", envvar="MODELCTL_STATE_DIR", help="State directory (default: $XDG_STATE_HOME/modelctl)."
    ),
) -> None:
    ctx_state.store = StateStore(state_dir)


def controller() -> Controller:
    return Controller(ctx_state.store)


ProfileOption = typer.Option(None, "--profile", "-p", help="Profile YAML (default: $MODELCTL_PROFILE, else the bundled default).")


def _load(profile: Optional[Path]):
    from modelctl.profile import load_profile

    return load_profile(profile)


def _styled(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


# ---------------------------------------------------------------------------- up
class UpDisplay:
    """Live per-server progress for `up`: state, elapsed seconds, what is happening."""

    def __init__(self, names: list[str]):
        self.names = names
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
            elapsed = time.time() - (rec.started_at or self.t0) if rec.state != lc.READY else (rec.ready_at or 0) - (rec.started_at or 0)
            cell: Text | Table = Text(rec.detail or "", style="dim")
            if rec.progress and rec.progress.get("total"):
                total, done = int(rec.progress["total"]), int(rec.progress.get("completed") or 0)
                grid = Table.grid(padding=(0, 1))
                grid.add_row(
                    ProgressBar(total=total, completed=done, width=30),
                    Text(f"{rec.progress.get('status', '')} {format_bytes(done)}/{format_bytes(total)} {self._rate(rec.name, done, total)}"),
                )
                cell = grid
            t.add_row(rec.name, _styled(rec.state), f"{max(elapsed, 0):.1f}s", cell)
        return t

    def _rate(self, name: str, done: int, total: int) -> str:
        now = time.time()
        if name not in self.rates:
            self.rates[name] = (now, done)
            return ""
        t0, d0 = self.rates[name]
        if now - t0 < 0.5 or done <= d0:
            return ""
        rate = (done - d0) / (now - t0)
        eta = (total - done) / rate if rate > 0 else None
        return f"{format_bytes(int(rate))}/s ETA {format_duration(eta)}"

    def lines(self, records: list[ServerRecord]) -> None:
        """Plain progress lines when the output is not a terminal."""
        for rec in records:
            line = f"{rec.name}: {rec.state}" + (f" ({rec.detail})" if rec.detail else "")
            if self.last_lines.get(rec.name) != line:
                self.last_lines[rec.name] = line
                console.print(f"[{time.time() - self.t0:6.1f}s] {line}", highlight=False)


@app.command()
def up(
    servers: Optional[List[str]] = typer.Argument(None, help="Servers to start (default: all in the profile)."),
    profile: Optional[Path] = ProfileOption,
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Wait until the servers are ready."),
) -> None:
    """Start the profile's servers (detached) and wait until they are ready."""
    from rich.live import Live

    prof = _load(profile)
    ctl = controller()
    plan = ctl.up(prof, servers or [])
    for name in plan.unchanged:
        console.print(f"{name}: already running with this spec", style="dim")
    names = list(servers or prof.servers)
    if not wait:
        _print_summary(ctl, names)
        return
    display = UpDisplay(names)
    if console.is_terminal:
        with Live(display.table([]), console=console, refresh_per_second=8, transient=True) as live:
            records = ctl.wait_ready(names, on_update=lambda recs: live.update(display.table(recs)))
    else:
        records = ctl.wait_ready(names, on_update=display.lines)
    _print_summary(ctl, names)
    bad = [r for r in records if r.state != lc.READY]
    for rec in bad:
        why = rec.detail or rec.last_error or rec.state
        err_console.print(f"\n[bold red]{rec.name} is not ready[/]: {why}")
        if rec.last_error and rec.last_error != why:
            err_console.print(f"  last error: {rec.last_error}")
        tail = ctl.log_tail(rec.name, 15)
        if tail:
            err_console.print(f"  last lines of {ctl.store.log_path(rec.name)}:")
            for line in tail:
                err_console.print(f"  | {line}", markup=False, highlight=False)
    if bad:
        raise typer.Exit(1)


def _print_summary(ctl: Controller, names: list[str]) -> None:
    rows = {r["name"]: r for r in ctl.status()}
    t = Table(box=None, pad_edge=False)
    for col in ("server", "url", "state", "model"):
        t.add_column(col)
    for name in names:
        r = rows.get(name)
        if r:
            t.add_row(name, r["url"] or "-", _styled(r["state"]), r["model"] or "")
    console.print(t)


# ---------------------------------------------------------------------------- down / restart
@app.command()
def down(servers: Optional[List[str]] = typer.Argument(None, help="Servers to stop (default: all).")) -> None:
    """Stop servers: SIGTERM the whole process group, then SIGKILL after stop_timeout."""
    results = controller().down(servers or [])
    if not results:
        console.print("no servers to stop")
    for name, how in results:
        console.print(f"{name}: {how}")


@app.command()
def restart(
    servers: List[str] = typer.Argument(..., help="Servers to restart."),
    wait: bool = typer.Option(True, "--wait/--no-wait"),
) -> None:
    """Stop and start servers again (clears a failed state)."""
    ctl = controller()
    names = ctl.restart(servers)
    if wait:
        records = ctl.wait_ready(names)
        _print_summary(ctl, names)
        if any(r.state != lc.READY for r in records):
            raise typer.Exit(1)


# ---------------------------------------------------------------------------- status / logs
@app.command()
def status(as_json: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """Show every server: state, pid, URL, GPUs, uptime, restarts, memory, last exit."""
    from modelctl.supervisor import supervisor_pid

    ctl = controller()
    rows = ctl.status()
    if any(r["desired"] == "running" and r["managed_by"] == "supervisor" for r in rows):
        ctl.kick()  # a supervisor that died is replaced; it re-adopts live servers
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"no servers in {ctl.store.root}")
        return
    t = Table(box=None, pad_edge=False)
    for col in ("name", "kind", "state", "pid", "url", "gpus", "uptime", "restarts", "memory", "model"):
        t.add_column(col, justify="right" if col in ("pid", "restarts", "memory", "uptime") else "left")
    for r in rows:
        t.add_row(
            r["name"],
            r["kind"],
            _styled(r["state"]),
            str(r["pid"] or "-"),
            r["url"] or "-",
            ",".join(map(str, r["gpus"])) or "-",
            format_duration(r["uptime"]),
            str(r["restarts"]),
            format_bytes(r["rss"]),
            r["model"] or "",
        )
    console.print(t)
    for r in rows:
        notes = [x for x in (r["detail"], r["last_exit"] and f"last exit: {r['last_exit']}", r["last_error"]) if x]
        progress = r["progress"] or {}
        if r["state"] == lc.STARTING and progress.get("total"):
            done, total = int(progress.get("completed") or 0), int(progress["total"])
            notes.insert(0, f"{progress.get('status', '')} {100 * done // total}% ({format_bytes(done)} of {format_bytes(total)})")
        if r["state"] in (lc.FAILED, lc.BACKOFF, lc.CRASHED, lc.UNHEALTHY, lc.STARTING) and notes:
            console.print(f"\n[bold]{r['name']}[/]: " + "; ".join(notes), highlight=False)
            if r["state"] == lc.FAILED:
                for line in ctl.log_tail(r["name"], 10):
                    console.print(f"  | {line}", markup=False, highlight=False)
    pid = supervisor_pid(ctl.store)
    console.print(f"\nsupervisor: {'pid ' + str(pid) if pid else 'not running'}   state: {ctl.store.root}", style="dim")


@app.command()
def logs(
    server: str = typer.Argument(..., help="Server name."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    lines: int = typer.Option(50, "--lines", "-n", help="How many lines from the end."),
) -> None:
    """Print a server's log (stdout and stderr)."""
    ctl = controller()
    rec = ctl.store.load(server)
    if rec is None:
        raise ModelctlError(f"no server named '{server}' in {ctl.store.root}")
    if rec.managed_by == "systemd":
        unit = rec.info.get("systemd_unit", f"modelctl-*-{server}.service")
        console.print(f"{server} runs under systemd; its log is in the journal: journalctl -u {unit} -f  (add --user for user units)")
        return
    try:
        source = ctl.follow_log(server, lines) if follow else iter(ctl.log_tail(server, lines))
        for line in source:
            print(line, flush=True)
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------- supervise / run
@app.command()
def supervise(
    stop: bool = typer.Option(False, "--stop", help="Stop the running supervisor (servers keep running)."),
    stay: bool = typer.Option(False, "--stay", help="Keep running when no server is wanted (for systemd)."),
) -> None:
    """Run the supervisor in the foreground, logging to stderr."""
    import signal as _signal

    from modelctl.supervisor import Supervisor, supervisor_pid

    store = ctx_state.store
    if stop:
        pid = supervisor_pid(store)
        if not pid or pid < 0:
            console.print("no supervisor is running")
            return
        os.kill(pid, _signal.SIGTERM)
        for _ in range(100):
            if supervisor_pid(store) is None:
                break
            time.sleep(0.05)
        console.print(f"supervisor pid {pid} stopped")
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    raise typer.Exit(Supervisor(store).serve(exit_when_idle=not stay))


@app.command()
def run(
    server: str = typer.Argument(..., help="Server to run."),
    profile: Optional[Path] = ProfileOption,
    port: Optional[int] = typer.Option(None, "--port", help="Fixed port (units resolve `auto` once)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="GPU ids, e.g. 0,1 (units resolve counts once)."),
) -> None:
    """Run one server in the foreground (for systemd): prepare, start, notify READY=1, wait."""
    from modelctl.foreground import run_foreground

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    gpu_ids = [int(g) for g in gpus.split(",") if g.strip()] if gpus else None
    raise typer.Exit(run_foreground(ctx_state.store, _load(profile), server, port=port, gpus=gpu_ids))


# ---------------------------------------------------------------------------- systemd
@systemd_app.command("generate")
def systemd_generate(
    profile: Optional[Path] = ProfileOption,
    user: bool = typer.Option(True, "--user/--system", help="User units (default) or system units."),
    out: Optional[Path] = typer.Option(None, "--out", help="Directory to write the units to (default: print them)."),
) -> None:
    """Write one unit per server plus a target that groups them."""
    from modelctl import systemd

    prof = _load(profile)
    units = systemd.generate_units(prof, ctx_state.store, user=user)
    if out is None:
        for name, text in units.items():
            console.print(f"# {name}", style="bold", highlight=False)
            print(text)
    else:
        paths = systemd.write_units(units, out)
        for p in paths:
            console.print(f"wrote {p}")
    console.print(systemd.install_hint(prof, user=user, out=out), highlight=False)


@systemd_app.command("install")
def systemd_install(
    profile: Optional[Path] = ProfileOption,
    user: bool = typer.Option(True, "--user/--system"),
) -> None:
    """Write the units to systemd's directory and reload systemd."""
    from modelctl import systemd

    prof = _load(profile)
    units = systemd.generate_units(prof, ctx_state.store, user=user)
    target_dir = systemd.unit_dir(user)
    for p in systemd.write_units(units, target_dir):
        console.print(f"wrote {p}")
    console.print(systemd.daemon_reload(user))
    console.print(f"enable and start with: systemctl {'--user ' if user else ''}enable --now {systemd.target_name(prof)}")


def main() -> None:
    try:
        app()
    except ModelctlError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    main()
