"""Profiles as projects: a server is PROFILE/SERVER; one profile's commands never touch another's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from modelctl import __version__
from modelctl.state.record import ServerRecord

from .conftest import http_get, wait_for
from .test_cli import status_json, toy_pids


def two_profiles(mc, **extra_a):
    web = {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}
    a = mc.profile({"web": {**web, **extra_a}}, name="a")
    b = mc.profile({"web": dict(web)}, name="b")
    return a, b


def test_two_profiles_with_the_same_server_name_run_side_by_side(mc):
    a, b = two_profiles(mc)
    assert mc.cli("up", "-p", str(a)).returncode == 0
    res = mc.cli("up", "-p", str(b))
    assert res.returncode == 0 and "already running" not in res.stdout, res.stdout
    rows = status_json(mc, "id")
    assert set(rows) == {"a/web", "b/web"}
    assert rows["a/web"]["port"] != rows["b/web"]["port"] and rows["a/web"]["pid"] != rows["b/web"]["pid"]
    for row in rows.values():
        assert http_get(row["url"] + "/info")[1]["env"]["MODELCTL_SERVER"] == row["id"]
    human = mc.cli("status").stdout
    assert "profile a" in human and "profile b" in human
    assert sorted(toy_pids(mc)) == sorted(r["pid"] for r in rows.values())


def test_down_and_status_take_a_profile(mc):
    a, b = two_profiles(mc)
    assert mc.cli("up", "-p", str(a)).returncode == 0 and mc.cli("up", "-p", str(b)).returncode == 0
    b_pid = status_json(mc, "id")["b/web"]["pid"]
    res = mc.cli("down", "-p", str(a))
    assert res.returncode == 0 and "a/web" in res.stdout and "b/web" not in res.stdout
    rows = status_json(mc, "id")
    assert rows["a/web"]["state"] == "stopped" and rows["b/web"]["state"] == "ready" and rows["b/web"]["pid"] == b_pid
    only_b = json.loads(mc.cli("status", "--json", "-p", "b").stdout)  # a profile's name works too
    assert [r["id"] for r in only_b] == ["b/web"]
    assert toy_pids(mc) == [b_pid]


@pytest.mark.slow
def test_a_bare_name_in_two_profiles_is_ambiguous_and_a_full_name_is_not(mc):
    a, b = two_profiles(mc)
    assert mc.cli("up", "-p", str(a)).returncode == 0 and mc.cli("up", "-p", str(b)).returncode == 0
    res = mc.cli("down", "web")
    assert res.returncode == 2 and "a/web" in res.stderr and "b/web" in res.stderr
    assert len(toy_pids(mc)) == 2
    assert mc.cli("down", "b/web").returncode == 0
    assert mc.cli("restart", "-p", "a", "web").returncode == 0
    rows = status_json(mc, "id")
    assert rows["a/web"]["state"] == "ready" and rows["b/web"]["state"] == "stopped"


@pytest.mark.slow
def test_up_after_editing_one_profile_replaces_only_its_server(mc):
    a, b = two_profiles(mc, env={"TOY_VALUE": "one"})
    assert mc.cli("up", "-p", str(a)).returncode == 0 and mc.cli("up", "-p", str(b)).returncode == 0
    before = status_json(mc, "id")
    a = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}, "env": {"TOY_VALUE": "two"}}}, name="a")
    assert mc.cli("up", "-p", str(a)).returncode == 0
    after = status_json(mc, "id")
    assert after["a/web"]["pid"] != before["a/web"]["pid"] and after["a/web"]["port"] == before["a/web"]["port"]
    assert http_get(after["a/web"]["url"] + "/info")[1]["env"]["TOY_VALUE"] == "two"
    assert after["b/web"]["pid"] == before["b/web"]["pid"]  # untouched


@pytest.mark.slow
def test_a_server_removed_from_its_profile_is_reported_as_orphaned_and_can_be_removed(mc):
    toy = {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}
    path = mc.profile({"web": toy, "old": dict(toy)}, name="lab")
    assert mc.cli("up", "-p", str(path)).returncode == 0
    old_pid = mc.row("lab/old")["pid"]
    path = mc.profile({"web": toy}, name="lab")
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 0 and "lab/old is no longer in" in res.stderr and "modelctl down lab/old" in res.stderr
    assert mc.row("lab/old")["pid"] == old_pid  # reported, not stopped
    res = mc.cli("up", "-p", str(path), "--remove-orphans")
    assert res.returncode == 0 and "lab/old: orphan removed" in res.stdout
    assert "lab/old" not in status_json(mc, "id")
    wait_for(lambda: old_pid not in toy_pids(mc), 10, what="the orphan to stop")


def as_version_1(data: dict) -> dict:
    """A record as the first version wrote it: every field at the top, no profile, token or exits."""
    inst, hist, wish = data.pop("instance") or {}, data.pop("history"), data.pop("wish")
    for key in ("profile", "version", "startup"):
        data.pop(key)
    data.update(wish)
    data.update({k: inst.get(k) for k in ("pid", "create_time", "started_at", "ready_at")})
    data.update({k: hist[k] for k in ("restarts", "failures", "consecutive_failures", "next_start_at", "last_error")})
    data["last_exit"] = None
    return data


def test_records_written_before_profiles_were_projects_keep_working(mc):
    """An old record sits at servers/NAME.json without a profile; its source file names it."""
    path = mc.profile({"web": {"kind": "command", "command": mc.toy(), "health": {"http": "/health"}}}, name="legacy-file")
    path.write_text("name: lab\n" + path.read_text())
    assert mc.cli("up", "-p", str(path)).returncode == 0
    row = mc.row("lab/web")
    # rewrite it the way the earlier version stored it
    new_path = mc.store.record_path(mc.ref("web", "lab"))
    data = as_version_1(json.loads(new_path.read_text()))
    (mc.state_dir / "servers" / "web.json").write_text(json.dumps(data))
    os.chmod(mc.state_dir / "servers" / "web.json", 0o600)
    new_path.unlink()
    new_path.parent.rmdir()
    old_log = mc.state_dir / "logs" / "web.log"
    os.replace(mc.store.log_path(mc.ref("web", "lab")), old_log)

    rows = status_json(mc, "id")  # read in place
    assert rows["lab/web"]["pid"] == row["pid"] and rows["lab/web"]["state"] == "ready"
    res = mc.cli("down", "-p", "lab")  # takes the lock: the record moves into servers/lab/
    assert res.returncode == 0 and "lab/web" in res.stdout
    assert toy_pids(mc) == []
    assert new_path.exists() and not (mc.state_dir / "servers" / "web.json").exists()
    assert mc.store.log_path(mc.ref("web", "lab")).exists() and not old_log.exists()


def test_an_old_record_without_a_source_is_in_the_default_profile(mc):
    mc.store.ensure()
    legacy = mc.state_dir / "servers" / "ghost.json"
    legacy.write_text(json.dumps({"name": "ghost", "kind": "command", "state": "stopped", "desired": "stopped"}))
    os.chmod(legacy, 0o600)
    assert [r["id"] for r in json.loads(mc.cli("status", "--json").stdout)] == ["default/ghost"]


@pytest.mark.slow
def test_status_name_shows_one_server_in_detail(mc):
    path = mc.profile(
        {"web": {"kind": "command", "command": mc.toy("--ready-delay", "0.3"), "health": {"http": "/health"}, "restart": {"backoff": 0.1}}},
        name="lab",
    )
    assert mc.cli("up", "-p", str(path)).returncode == 0
    pid = mc.row("lab/web")["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: (r := mc.row("lab/web"))["state"] == "ready" and r["pid"] != pid, 20, what="restart")
    res = mc.cli("status", "lab/web")
    assert res.returncode == 0
    out = res.stdout
    row = mc.row("lab/web")
    for text in (row["url"], row["log"], "startup", "port open", "killed by SIGKILL", "last exits", "toy server pid"):
        assert text in out, (text, out)


def test_version_and_shell_completion(mc):
    res = mc.cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"modelctl {__version__}"
    res = subprocess.run(
        [sys.executable, "-m", "modelctl", "--show-completion", "bash"],
        capture_output=True,
        text=True,
        # typer takes the shell's name from its parent processes unless told not to; a test run from a
        # detached job has no shell among them ("Shell  not supported.")
        env={**mc.env, "SHELL": "/bin/bash", "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"},
    )
    assert res.returncode == 0 and "complete" in res.stdout


@pytest.mark.slow
def test_down_without_a_profile_still_stops_everything(mc):
    a, b = two_profiles(mc)
    assert mc.cli("up", "-p", str(a)).returncode == 0 and mc.cli("up", "-p", str(b)).returncode == 0
    assert "every server" in mc.cli("down", "--help").stdout
    res = mc.cli("down")
    assert res.returncode == 0 and "a/web" in res.stdout and "b/web" in res.stdout
    assert toy_pids(mc) == []


@pytest.mark.slow
def test_the_profile_env_var_scopes_commands_too(mc):
    a, b = two_profiles(mc)
    assert mc.cli("up", "-p", str(a)).returncode == 0 and mc.cli("up", "-p", str(b)).returncode == 0
    res = mc.cli("down", env={"MODELCTL_PROFILE": str(b)})
    assert res.returncode == 0 and "b/web" in res.stdout and "a/web" not in res.stdout
    assert status_json(mc, "id")["a/web"]["state"] == "ready"


def test_generated_unit_names_carry_the_profile(mc):
    from modelctl.cluster.systemd import generate_units
    from modelctl.profile import load_profile

    a, b = two_profiles(mc)
    names = set(generate_units(load_profile(a), mc.store)) | set(generate_units(load_profile(b), mc.store))
    assert {"modelctl-a-web.service", "modelctl-b-web.service"} <= names


def test_records_are_per_profile_on_disk(mc):
    a, b = two_profiles(mc)
    assert mc.cli("up", "-p", str(a), "--no-wait").returncode == 0
    assert mc.cli("up", "-p", str(b), "--no-wait").returncode == 0
    assert {p.relative_to(mc.state_dir / "servers").as_posix() for p in (mc.state_dir / "servers").rglob("*.json")} == {
        "a/web.json",
        "b/web.json",
    }
    for rec in mc.store.records():
        assert isinstance(rec, ServerRecord) and rec.profile in ("a", "b")
