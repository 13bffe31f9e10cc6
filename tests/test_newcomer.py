"""A newcomer's first hour (issue 31), through the real CLI: every command says what happened, fits
the terminal (80 and 200 columns, on a pseudo-terminal) without cutting a URL or a name, and fails
loudly, in one line with the known names, on a typo."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys

import pytest
import typer

from .conftest import ROOT
from .sentence_fixtures import free_port
from .terminal import run_in_terminal

WIDTHS = (80, 200)
LONG = "an-embedding-server-with-a-long-name"


def term(mc, *args: str, columns: int = 80) -> tuple[int, str]:
    return run_in_terminal([sys.executable, "-m", "modelctl", *args], columns, mc.env, cwd=str(mc.tmp))


def one_line_error(res: subprocess.CompletedProcess, code: int = 2) -> str:
    assert res.returncode == code, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture
def two_running(mc):
    """Two profiles whose servers run (toy servers), one with a long name."""
    # ports free now (this machine's other test sessions lease theirs elsewhere)
    web = mc.profile(
        {"web": {"kind": "command", "command": mc.toy(), "port": free_port(), "health": {"http": "/health"}, "k8s": {"image": "toy:1"}}},
        name="lab",
    )
    other = mc.profile({LONG: {"kind": "command", "command": mc.toy(), "port": free_port(), "health": {"http": "/health"}}}, name="prod")
    for path in (web, other):
        res = mc.cli("up", "-p", str(path))
        assert res.returncode == 0, res.stdout + res.stderr
    yield web, other
    mc.cli("down")


# ------------------------------------------------------------------ 1. tables fit, URLs whole
@pytest.mark.parametrize("columns", WIDTHS)
def test_status_never_cuts_a_url_or_a_name_at_any_width(mc, two_running, columns):
    code, out = term(mc, "status", columns=columns)
    assert code == 0, out
    for row in mc.ctl.status():
        assert row.url in out and row.name in out, out
    assert "…" not in "".join(line for line in out.splitlines() if "http://" in line), out
    assert max(len(line) for line in out.splitlines() if "http://" in line) <= columns, out
    if columns == 80:
        assert "--wide" in out  # says which columns it left out
        code, wide = term(mc, "status", "--wide", columns=columns)
        assert "started in" in wide and "restarts" in wide


@pytest.mark.parametrize("columns", WIDTHS)
def test_top_never_cuts_a_server_name(mc, two_running, columns):
    code, out = term(mc, "top", "--once", "--interval", "0.2", columns=columns)
    assert code == 0 and "lab/web" in out and f"prod/{LONG}" in out, out


def test_piped_output_has_every_column_whole_and_no_trailing_spaces(mc, two_running):
    res = mc.cli("status", env={"COLUMNS": "80"})
    assert res.returncode == 0
    assert all(line == line.rstrip() for line in res.stdout.splitlines()), res.stdout
    for column in ("kind", "pid", "socket", "started in", "model"):
        assert column in res.stdout
    for row in mc.ctl.status():
        assert row.url in res.stdout
    assert json.loads(mc.cli("status", "--json").stdout)[0].keys() >= {"url", "state", "socket", "pid"}  # unchanged


def test_top_in_a_pipe_prints_a_frame_at_once(mc, two_running):
    proc = subprocess.Popen(
        [sys.executable, "-m", "modelctl", "top", "--interval", "30"], stdout=subprocess.PIPE, env=mc.env, cwd=mc.tmp, text=True
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "top | cat printed nothing"
        assert "server" in proc.stdout.readline() + proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------ 2. a name that matches nothing
TYPO_COMMANDS = [
    ["status", "-p", "lba"],
    ["down", "-p", "lba"],
    ["restart", "-p", "lba"],
    ["logs", "web", "-p", "lba"],
    ["forget", "-p", "lba"],
    ["metrics", "-p", "lba"],
    ["top", "--once", "-p", "lba"],
    ["run", "web", "-p", "lba"],
    ["systemd", "generate", "-p", "lba"],
    ["k8s", "generate", "-p", "lba"],
    ["slurm", "generate", "-p", "lba"],
]


def test_a_profile_name_that_matches_nothing_is_an_error_naming_the_known_ones(mc, two_running):
    for args in TYPO_COMMANDS:
        line = one_line_error(mc.cli(*args))
        assert "'lba'" in line and "lab" in line and "prod" in line, (args, line)
    for args in (["status", "-p", "nope.yaml"], ["down", "-p", "nope.yaml"], ["up", "-p", "nope.yaml"]):
        assert "nope.yaml: no such profile file" in one_line_error(mc.cli(*args)), args
    line = one_line_error(mc.cli("status", "wbe"))
    assert "'wbe'" in line and "lab/web" in line
    line = one_line_error(mc.cli("down", "lab/wbe"))
    assert "lab/web" in line
    assert mc.row("web")["state"] == "ready"  # nothing was stopped


def test_a_profile_name_is_taken_wherever_a_profile_file_is(mc, two_running):
    web, _ = two_running
    for args in (["systemd", "generate"], ["slurm", "generate"], ["k8s", "generate"]):
        by_name, by_file = mc.cli(*args, "-p", "lab"), mc.cli(*args, "-p", str(web))
        assert by_name.returncode == 0 and by_name.stdout == by_file.stdout, args
    assert mc.cli("status", "-p", "lab").returncode == 0


# ------------------------------------------------------------------ 5. progress on what takes time
def test_restart_shows_progress_as_up_does(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy("--ready-delay", "1.5"), "health": {"http": "/health"}}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    res = mc.cli("restart", "test/web")
    assert res.returncode == 0, res.stderr
    assert re.search(r"\[\s*\d+\.\d+s\] test/web: starting", res.stdout), res.stdout  # timed lines while it waits
    assert mc.row("web")["url"] in res.stdout
    code, out = term(mc, "restart", "test/web")
    assert code == 0 and "time" in out and mc.row("web")["url"] in out  # the live table, then the URL
    mc.cli("down")


def test_a_slow_down_says_what_it_waits_for(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy("--ignore-sigterm"), "stop_timeout": 2}})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    res = mc.cli("down")
    assert res.returncode == 0 and "stopping test/web" in res.stderr and "test/web: killed" in res.stdout, res.stdout + res.stderr


# ------------------------------------------------------------------ 6. one cause, once, with the fix
def test_a_missing_model_is_said_once_with_the_file_and_key_to_fix(mc):
    path = mc.profile({"embed": {"kind": "sentence", "model": "/nonexistent/model", "port": "auto"}})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 1
    said = res.stdout + res.stderr
    assert said.count("/nonexistent/model does not exist") == 1, said
    assert f"check `model:` of server 'embed' in {path}" in said
    status = mc.cli("status")
    assert status.stdout.count("/nonexistent/model does not exist") == 1, status.stdout
    assert "configuration error, not retried: config:" not in status.stdout + said


@pytest.mark.slow
def test_a_hub_typo_offline_says_not_available_offline_and_where(mc):
    path = mc.profile({"hub": {"kind": "sentence", "model": "BAAI/bge-smal-en-v1.5", "env": {"HF_HUB_OFFLINE": "1"}}})
    res = mc.cli("up", "-p", str(path))
    said = res.stdout + res.stderr
    assert res.returncode == 1 and "not available offline" in said and f"check `model:` of server 'hub' in {path}" in said, said
    assert said.count("cannot load model 'BAAI/bge-smal-en-v1.5': cannot load model") == 0, said


def test_too_few_gpus_says_the_file_and_the_way_out(mc):
    path = mc.profile({"g": {"kind": "command", "command": mc.toy(), "gpus": 1}})
    line = one_line_error(mc.cli("up", "-p", str(path), env={"MODELCTL_GPUS": ""}), 1)
    assert str(path) in line and "gpus: 0" in line, line


# ------------------------------------------------------------------ 8. old records
def test_forget_and_status_hide_what_has_nothing_to_show(mc, two_running):
    assert mc.cli("down", "-p", "prod").returncode == 0
    status = mc.cli("status")
    assert "profile lab" in status.stdout and "profile prod" not in status.stdout and "prod" in status.stdout  # named in one note
    assert "profile prod" in mc.cli("status", "--all").stdout
    assert "lab/web" in one_line_error(mc.cli("forget", "lab/web"), 1)  # running: kept, with why
    res = mc.cli("forget", "-p", "prod")
    assert res.returncode == 0 and f"forgot prod/{LONG}" in res.stdout
    assert "prod" not in mc.cli("status", "--all").stdout
    res = mc.cli("down", "--forget", "-p", "lab")
    assert res.returncode == 0 and "forgot lab/web" in res.stdout
    assert mc.ctl.status() == []


def test_down_does_not_list_every_server_that_was_already_stopped(mc, two_running):
    assert mc.cli("down", "-p", "prod").returncode == 0
    res = mc.cli("down")
    assert res.stdout.count("not running") == 0 and "already stopped" in res.stdout, res.stdout


# ------------------------------------------------------------------ 9. words
def test_up_now_on_an_idle_server_does_not_say_it_already_runs(mc):
    server = [sys.executable, str(ROOT / "tests" / "servers" / "listen_server.py")]
    path = mc.profile({"od": {"kind": "command", "command": server, "socket": "inherit", "notify": True, "start": "on-demand"}})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    again = mc.cli("up", "-p", str(path), "od", "--now", "--no-wait")
    assert "already running" not in again.stdout, again.stdout
    mc.cli("down")


def test_progress_lines_do_not_repeat_the_state(mc):
    server = [sys.executable, str(ROOT / "tests" / "servers" / "listen_server.py"), "--load", "1"]
    path = mc.profile({"web": {"kind": "command", "command": server, "socket": "inherit", "notify": True, "health": {"http": "/health"}}})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 0
    for state in ("starting", "idle", "ready"):
        assert f"{state} ({state}" not in res.stdout, res.stdout
    assert "READY=1" not in res.stdout and "starting (loading; clients that connect wait for it)" in res.stdout, res.stdout
    mc.cli("down")


def test_a_log_excerpt_shows_a_redrawn_line_as_the_terminal_did(mc):
    script = "import sys; sys.stdout.write('Loading 10%\\rLoading 100%\\n'); sys.stdout.flush(); sys.exit(3)"
    path = mc.profile({"bad": {"kind": "command", "command": [sys.executable, "-c", script, "{port}"], "restart": {"max_failures": 1}}})
    mc.cli("up", "-p", str(path))
    status = mc.cli("status")
    shown = [line for line in status.stdout.splitlines() if "--- modelctl" not in line]  # not the command line itself
    assert "  | Loading 100%" in shown and not any("\\x0d" in line or "Loading 10%" in line for line in shown), status.stdout


# ------------------------------------------------------------------ 11. --help
def test_every_option_of_every_command_has_help_and_no_type_placeholder():
    from typing import Any

    from modelctl.cli import app

    root = typer.main.get_command(app)
    missing: list[str] = []
    placeholders: list[str] = []
    seen: list[str] = []

    def walk(cmd: Any, path: list[str]) -> None:
        seen.append(" ".join(path))
        for param in cmd.params:
            if param.param_type_name == "option" and not param.help and param.name != "help":
                missing.append(f"{' '.join(path)} {param.opts[0]}")
        text = cmd.get_help(cmd.context_class(cmd, info_name=" ".join(path)))
        placeholders.extend(f"{' '.join(path)}: {m}" for m in re.findall(r"<(?:bool|str|int|float|list\[[a-z]+\]|path)>", text))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(root, ["modelctl"])
    assert {"modelctl status", "modelctl systemd install", "modelctl slurm generate"} <= set(seen)
    assert missing == [] and placeholders == []


def test_help_of_every_command_at_80_columns_shows_no_placeholder(mc):
    for args in (["--help"], ["status", "--help"], ["up", "--help"], ["restart", "--help"], ["systemd", "install", "--help"]):
        code, out = term(mc, *args)
        assert code == 0 and "<bool>" not in out and "<str>" not in out and "<list" not in out, out


def test_a_global_option_after_the_command_says_where_it_goes(mc):
    line = one_line_error(mc.cli("status", "--state-dir", str(mc.state_dir)))
    assert "global option: put it before the command" in line and f"modelctl --state-dir {mc.state_dir} status" in line


def test_a_key_typo_says_did_you_mean(mc):
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "startup_timout": 3}})
    line = one_line_error(mc.cli("up", "-p", str(path)))
    assert "did you mean 'startup_timeout'?" in line and str(path) in line and "known:" not in line


# ------------------------------------------------------------------ 12. small things
def test_a_sentence_server_without_a_model_is_warned_about(mc):
    path = mc.profile({"emb": {"kind": "sentence", "port": "auto"}})
    res = mc.cli("up", "-p", str(path), "--no-wait")
    mc.cli("down")
    assert "has no `model:`" in res.stderr and "bundled all-MiniLM-L6-v2" in res.stderr, res.stderr


def test_the_on_demand_example_names_its_models_for_what_they_are():
    from modelctl.profile import load_profile

    prof = load_profile(ROOT / "profiles" / "examples" / "on-demand.yaml")
    assert all("model" in s.raw for s in prof.servers.values())
    assert not {"small-en", "large-en"} & set(prof.servers)


def test_the_cli_starts_without_loading_what_it_does_not_need():
    """`modelctl --help` imports no server library and no cluster generator."""
    code = "import sys, modelctl.cli; print(sorted(m for m in sys.modules if m.startswith(('torch', 'fastapi', 'modelctl.cluster.'))))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


def test_modelctl_help_is_quick():
    """CPU time, not wall time: the machine's other work does not count."""
    best = min(_cpu_seconds([sys.executable, "-m", "modelctl", "--help"]) for _ in range(3))
    assert best < 0.8, best  # about 0.35 s


def _cpu_seconds(argv: list[str]) -> float:
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(argv, capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
