"""The dashboard's server side without a browser: who may read and act, what it masks and escapes,
how it follows a log, how it counts a budget and traffic, and that the CLI never loads it unasked."""

from __future__ import annotations

import asyncio
import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from modelctl.host.engine_metrics import Scrape
from modelctl.observe.rows import StatusRow
from modelctl.state.store import StateStore
from servers.dashboard.auth import TokenAuth
from servers.dashboard.logtail import read_log
from servers.dashboard.observer import Observer, budgets_of
from servers.dashboard.secrets import MASK, Secrets, secrets_in
from servers.dashboard.standalone import build, host_headers
from servers.dashboard.traffic import histogram_quantile

TOKEN = "t0ken-for-tests-only"
MiB, GiB = 2**20, 2**30


def with_client(app: web.Application, body: Callable[[TestClient], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        async with TestClient(TestServer(app)) as client:
            return await body(client)

    return asyncio.run(run())


def auth_for_any_host() -> TokenAuth:
    return TokenAuth(TOKEN, reads_need_token=True)


BEARER = {"Authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------------- who may read and act
def test_the_page_needs_no_token_but_its_data_does(tmp_path):
    async def body(client: TestClient) -> None:
        page = await client.get("/ui/")
        assert page.status == 200 and "modelctl" in await page.text()
        assert "script-src 'self'" in page.headers["Content-Security-Policy"]
        assert (await client.get("/ui/api/state")).status == 403
        assert (await client.get("/ui/api/state", headers={"Authorization": "Bearer wrong"})).status == 403
        ok = await client.get("/ui/api/state", headers=BEARER)
        assert ok.status == 200 and (await ok.json())["profiles"] == []

    with_client(build(StateStore(tmp_path / "state"), auth_for_any_host()), body)


def test_an_action_needs_the_token_a_post_json_and_the_same_origin(tmp_path):
    async def body(client: TestClient) -> None:
        action = {"action": "restart", "profile": "lab"}
        assert (await client.get("/ui/api/action", headers=BEARER)).status == 405  # never through a GET
        assert (await client.post("/ui/api/action", json=action)).status == 403  # no token
        foreign = {**BEARER, "Origin": "http://evil.example"}
        assert (await client.post("/ui/api/action", json=action, headers=foreign)).status == 403
        cross = {**BEARER, "Sec-Fetch-Site": "cross-site"}
        assert (await client.post("/ui/api/action", json=action, headers=cross)).status == 403
        form = await client.post("/ui/api/action", data="action=restart&profile=lab", headers=BEARER)
        assert form.status == 415  # a form (which a foreign page could send) is no action
        same = {**BEARER, "Origin": f"http://{client.host}:{client.port}"}
        known = await client.post("/ui/api/action", json=action, headers=same)
        assert known.status == 404 and "lab" in (await known.json())["error"]["message"]  # past the guards: no such profile

    with_client(build(StateStore(tmp_path / "state"), auth_for_any_host()), body)


def test_a_loopback_dashboard_answers_only_to_its_own_address(tmp_path):
    """A DNS-rebinding page reaches 127.0.0.1 under its own name: its Host header is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert f"localhost:{port}" in host_headers("127.0.0.1", port)
    auth = TokenAuth(TOKEN, allowed_hosts=host_headers("127.0.0.1", port))

    async def run() -> None:
        async with TestClient(TestServer(build(StateStore(tmp_path / "state"), auth), port=port)) as client:
            assert (await client.get("/ui/api/state", headers={**BEARER, "Host": "evil.example"})).status == 403
            assert (await client.get("/ui/", headers={"Host": f"evil.example:{port}"})).status == 403
            assert (await client.get("/ui/api/state", headers={**BEARER, "Host": f"127.0.0.1:{port}"})).status == 200

    asyncio.run(run())


def test_a_gateway_without_an_api_key_shows_its_servers_but_allows_no_action(tmp_path):
    async def body(client: TestClient) -> None:
        assert (await client.get("/ui/api/state")).status == 200
        state = await (await client.get("/ui/api/state")).json()
        assert state["can_act"] is False
        refused = await client.post("/ui/api/action", json={"action": "stop", "profile": "lab"})
        assert refused.status == 403 and "api_key" in (await refused.json())["error"]["message"]

    with_client(build(StateStore(tmp_path / "state"), TokenAuth(None, reads_need_token=False)), body)


def test_static_files_are_a_fixed_set(tmp_path):
    async def body(client: TestClient) -> None:
        assert (await client.get("/ui/static/app.js")).status == 200
        assert (await client.get("/ui/static/..%2fapp.py")).status == 404
        assert (await client.get("/ui/static/%2e%2e/app.py")).status == 404
        assert (await client.get("/ui")).status == 200  # sent on to /ui/

    with_client(build(StateStore(tmp_path / "state"), auth_for_any_host()), body)


# ---------------------------------------------------------------------- what is never shown
def test_secrets_of_a_spec_are_found_by_name_by_shape_and_after_a_flag():
    spec = {
        "kind": "command",
        "command": ["serve", "--api-key", "abcdef123456", "--token=zyxwvu987654", "--port", "{port}"],
        "api_key": "my-gateway-key",
        "env": {"HF_TOKEN": "hf_secretvalue1", "OPENAI_BASE": "sk-abcdefghijklmnop", "LOG_LEVEL": "debug", "PASSWORD": "x"},
    }
    assert secrets_in(spec) == {"abcdef123456", "zyxwvu987654", "my-gateway-key", "hf_secretvalue1", "sk-abcdefghijklmnop"}


def test_masking_covers_every_string_and_keys_named_like_secrets():
    secrets = Secrets({"hf_secretvalue1"})
    shown = secrets.mask_all({"lines": ["token is hf_secretvalue1!"], "api_key": "anything", "n": 3})
    assert shown == {"lines": [f"token is {MASK}!"], "api_key": MASK, "n": 3}


# ---------------------------------------------------------------------- the log
def test_the_log_is_read_from_its_end_then_followed_from_a_cursor(tmp_path):
    log = tmp_path / "s.log"
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(300)) + b"half")
    first = read_log(log, None)
    assert first.lines[0] == "line 100" and first.lines[-1] == "line 299"  # 200 lines; the half line waits
    with log.open("ab") as f:
        f.write(b" done\n\x1b]52;c;aGk=\x07 <script>x</script>\n")
    more = read_log(log, first.cursor)
    assert more.lines == ["half done", "\\x1b]52;c;aGk=\\x07 <script>x</script>"]
    assert read_log(log, more.cursor).lines == []
    log.write_bytes(b"after rotation\n")  # truncated in place, as the supervisor's rotation does
    rotated = read_log(log, more.cursor)
    assert rotated.lines == ["after rotation"] and rotated.note


def test_a_log_is_never_read_through_a_symlink(tmp_path):
    target = tmp_path / "private"
    target.write_text("secret\n")
    (tmp_path / "s.log").symlink_to(target)
    with pytest.raises(OSError):
        read_log(tmp_path / "s.log", None)


# ---------------------------------------------------------------------- traffic
def test_histogram_quantile_interpolates_within_a_bucket():
    buckets = {0.01: 0.0, 0.1: 50.0, 1.0: 100.0, math.inf: 100.0}
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.1)
    assert histogram_quantile(0.9, buckets) == pytest.approx(0.1 + 0.9 * 0.8)
    assert histogram_quantile(0.5, {math.inf: 0.0}) is None
    assert histogram_quantile(0.99, {0.5: 1.0, math.inf: 10.0}) == 0.5  # in +Inf: the largest finite bound


# ---------------------------------------------------------------------- the CLI stays light
def test_the_cli_never_imports_aiohttp_or_the_dashboard_unless_ui_runs():
    code = "import sys, modelctl.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'servers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ})
    assert json.loads(out.stdout.replace("'", '"')) == []


def test_ui_refuses_an_address_beyond_loopback_without_public(tmp_path):
    env = {**os.environ, "MODELCTL_STATE_DIR": str(tmp_path / "state")}
    res = subprocess.run([sys.executable, "-m", "modelctl", "ui", "--host", "0.0.0.0"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode != 0 and "--public" in res.stderr


def test_static_files_ship_in_the_package():
    static = Path(__file__).resolve().parent.parent / "servers" / "dashboard" / "static"
    pyproject = (static.parent.parent.parent / "pyproject.toml").read_text()
    assert '"servers.dashboard" = ["static/*"]' in pyproject
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "style.css"}
    assert "innerHTML" not in (static / "app.js").read_text()  # the page builds its DOM from text only


# ---------------------------------------------------------------------- budgets, events, traffic
def status_row(name: str, profile: str = "lab", **keys: Any) -> StatusRow:
    base: dict[str, Any] = dict(
        id=f"{profile}/{name}",
        profile=profile,
        name=name,
        kind="command",
        state="ready",
        desired="running",
        managed_by="supervisor",
        pid=1,
        host="127.0.0.1",
        port=1,
        url="http://127.0.0.1:1",
        gpus=[],
        model="",
        uptime=1.0,
        restarts=0,
        rss=None,
        gpu_memory=None,
        last_exit=None,
        last_error=None,
        detail=None,
        progress=None,
        startup=None,
    )
    return StatusRow(**{**base, **keys})


def test_a_budget_counts_the_footprints_of_servers_that_may_hold_memory_as_status_does():
    budget = {"memory": 400 * MiB, "gpu_memory": {"0": 8 * GiB}, "shared": False}
    rows = [
        status_row("a", memory_learned=50 * MiB, memory_declared=100 * MiB, budget=budget, gpus=[0], gpu_memory_learned=2 * GiB),
        status_row("b", state="idle", memory_declared=150 * MiB, budget=budget),  # idle: holds nothing
        status_row("c", state="starting", memory_declared=100 * MiB, budget=budget, gpus=[0], gpu_memory_declared=3 * GiB),
        status_row("d", profile="other", memory_declared=999 * MiB),  # another profile, no budget
    ]
    budgets = budgets_of(rows)
    assert set(budgets) == {"lab"}
    assert budgets["lab"]["memory"]["used"] == 150 * MiB and budgets["lab"]["memory"]["limit"] == 400 * MiB
    assert budgets["lab"]["gpus"]["0"] == {
        "limit": 8 * GiB,
        "used": 5 * GiB,
        "servers": [{"id": "lab/a", "bytes": 2 * GiB}, {"id": "lab/c", "bytes": 3 * GiB}],
    }


class ScriptedObserver(Observer):
    """An observer whose rows come from the test, one list per snapshot."""

    def __init__(self, tmp_path: Path, script: list[list[StatusRow]], scrapes: list[Scrape | None]):
        self.script, self.scrapes, self.now = script, scrapes, 1000.0
        super().__init__(StateStore(tmp_path / "state"), interval=1.0, scraper=lambda url: self.scrapes.pop(0), clock=lambda: self.now)

    def rows(self) -> list[StatusRow]:
        self.now += 2.0
        return self.script.pop(0)


def test_events_are_the_changes_between_snapshots_and_the_recorded_exits(tmp_path):
    exit_entry = {"at": 990.0, "exit": {"description": "killed by SIGKILL"}, "class": "crash", "line": "boom \\x1b[0m", "retry": True}
    script = [
        [status_row("s", state="idle", start="on-demand")],
        [status_row("s", state="ready", start="on-demand", wakes=1, last_wake_seconds=1.5)],
        [status_row("s", state="idle", start="on-demand", wakes=1, evictions=1, last_eviction="12:00:00: lab/big needs 1 GiB")],
        [status_row("s", state="crashed", start="on-demand", wakes=1, evictions=1, exits=[exit_entry])],
    ]
    observer = ScriptedObserver(tmp_path, script, [None])
    for _ in range(4):
        snapshot = observer.snapshot()
    texts = [f"{e['kind']}: {e['text']}" for e in reversed(snapshot["events"])]
    assert texts == [
        "exit: killed by SIGKILL (crash): boom \\x1b[0m",
        "wake: started from idle (a client, or a start asked for); the first client waited 1.5s",
        "state: idle → ready",
        "eviction: evicted 12:00:00: lab/big needs 1 GiB",
        "state: ready → idle",
        "state: idle → crashed",
    ]
    observer.close()


def test_traffic_is_the_rate_and_quantiles_between_two_scrapes(tmp_path):
    buckets1 = {0.01: 0.0, 0.1: 0.0, math.inf: 0.0}
    buckets2 = {0.01: 10.0, 0.1: 20.0, math.inf: 20.0}
    scrapes: list[Scrape | None] = [Scrape(1002.0, 100.0, 0.0, 0.0, buckets1), Scrape(1004.0, 120.0, 1.0, 20.0, buckets2)]
    observer = ScriptedObserver(tmp_path, [[status_row("s")], [status_row("s")]], scrapes)
    assert observer.snapshot()["profiles"][0]["servers"][0]["traffic"] is None  # one scrape: no rate yet
    traffic = observer.snapshot()["profiles"][0]["servers"][0]["traffic"]
    assert traffic["now"] == {"req_s": 10.0, "p50_ms": 10.0, "p90_ms": 82.0}
    observer.close()
