"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright, against
`modelctl ui` and real servers of two profiles (small stand-ins from tests/servers/).

The page is opened once per test and never reloaded: what it shows must follow the servers live.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from .conftest import ROOT, http_post, wait_for

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LISTEN_SERVER = str(ROOT / "tests" / "servers" / "listen_server.py")
METRICS_SERVER = str(ROOT / "tests" / "servers" / "metrics_server.py")
TOKEN = "browser-test-token-0123"
SECRET = "hf_abcdefghijklmnop0123"
HOSTILE_MODEL = "<img src=x onerror=\"document.title='pwned'\">mini<script>document.title='pwned'</script>"
HOSTILE_LINE = "<script>document.title='pwned'</script> \\x1b]0;title\\x07 \\x1b[31mred\\x1b[0m"
MiB = 2**20
SCREENSHOT_FOR_DOCS = ROOT / "docs" / "dashboard.png"


def held(*flags: str, **keys: Any) -> dict:
    return {
        "kind": "command",
        "command": [sys.executable, LISTEN_SERVER, *flags],
        "socket": "inherit",
        "notify": True,
        "health": {"http": "/health", "interval": 0.5},
        "restart": {"backoff": 0.2},
        **keys,
    }


@pytest.fixture
def stack(mc) -> Iterator[dict]:
    """Two profiles running (one under a budget, with an idle on-demand server), and `modelctl ui`."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("needs Debian's chromium (install.sh --test installs it as root)")
    lab = mc.profile(
        {
            "embed": held("--load", "2", "--hold", "30", model=HOSTILE_MODEL, memory="100MiB"),
            "chat": held(start="on-demand", idle_timeout=600, memory="150MiB"),
        },
        name="lab",
        budget={"memory": "400MiB"},
    )
    ops = mc.profile(
        {
            "toy": {
                "kind": "command",
                "command": [sys.executable, METRICS_SERVER, "--port", "{port}", "--say", f"{HOSTILE_LINE} key={SECRET}"],
                "env": {"HF_TOKEN": SECRET},
                "health": {"http": "/health"},
            }
        },
        name="ops",
    )
    for path in (lab, ops):
        res = mc.cli("up", "-p", str(path))
        assert res.returncode == 0, res.stdout + res.stderr
    ui = subprocess.Popen(
        [sys.executable, "-m", "modelctl", "ui", "--interval", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**mc.env, "MODELCTL_UI_TOKEN": TOKEN},
        cwd=mc.tmp,
    )
    try:
        line = ui.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+/ui/)#token=(\S+)", line)
        assert match, line + ui.stderr.read()
        assert match.group(2) == TOKEN
        yield {"mc": mc, "base": match.group(1), "url": match.group(0)}
    finally:
        ui.send_signal(signal.SIGINT)
        try:
            ui.wait(10)
        except subprocess.TimeoutExpired:
            ui.kill()
            ui.wait()


@pytest.fixture
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, stack) -> Iterator[Any]:
    """The page at 1280×800 opened with the token; every dialog (an alert a script would raise) is recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.dialogs = []
    page.errors = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(stack["url"])
    page.wait_for_selector("tr[data-server='lab/embed'][data-state='ready']")
    page.evaluate("window.openedOnce = true")  # gone if the page ever reloads
    yield page
    assert page.evaluate("window.openedOnce === true"), "the page reloaded"
    assert page.errors == [] and page.dialogs == [] and page.title() == "modelctl"
    context.close()


def until(page, js: str, timeout: float = 20.0) -> Any:
    """Wait until `js` (an expression) is truthy in the page. Polled from here: the page's own
    Content-Security-Policy forbids the string evaluation that Playwright's wait_for_function needs."""
    return wait_for(lambda: page.evaluate(js), timeout, interval=0.1, what=js)


def state_of(page, server: str) -> str:
    return page.get_attribute(f"tr[data-server='{server}']", "data-state") or ""


def test_the_table_lists_the_servers_of_two_profiles_with_their_states(page):
    assert page.locator("section.profile").evaluate_all("els => els.map(e => e.dataset.profile)") == ["lab", "ops"]
    assert state_of(page, "lab/embed") == "ready"
    assert state_of(page, "lab/chat") == "idle"
    page.wait_for_selector("tr[data-server='ops/toy'][data-state='ready']")
    row = page.locator("tr[data-server='lab/embed']")
    assert "http://127.0.0.1:" in row.locator("a").inner_text()
    assert row.locator("a").get_attribute("href").startswith("http://127.0.0.1:")


def test_a_server_killed_from_outside_shows_its_restart_then_ready_without_a_reload(page, stack):
    mc = stack["mc"]
    pid = int(page.get_attribute("tr[data-server='lab/embed']", "data-pid"))
    page.evaluate(
        """() => { window.seen = []; new MutationObserver(() => {
             const s = document.querySelector("tr[data-server='lab/embed']")?.dataset.state;
             if (s && window.seen[window.seen.length - 1] !== s) window.seen.push(s);
           }).observe(document.getElementById('profiles'), {subtree: true, childList: true, attributes: true}); }"""
    )
    os.kill(pid, signal.SIGKILL)
    until(page, "window.seen.some(s => ['crashed', 'backoff', 'starting'].includes(s))", timeout=20)
    until(
        page,
        f"document.querySelector(\"tr[data-server='lab/embed']\").dataset.state === 'ready' && "
        f"document.querySelector(\"tr[data-server='lab/embed']\").dataset.pid !== '{pid}'",
        timeout=30,
    )
    seen = page.evaluate("window.seen")
    assert seen[-1] == "ready" and set(seen[:-1]) & {"crashed", "backoff", "starting"}, seen
    assert mc.row("lab/embed")["restarts"] >= 1
    events = page.locator("#events").inner_text()
    assert "lab/embed" in events and "exit" in events  # the exit, with its line, in the recent events


def test_the_restart_button_restarts_the_server_and_without_the_token_it_is_refused(page, browser, stack):
    mc = stack["mc"]
    pid = mc.row("lab/embed")["pid"]
    page.click("tr[data-server='lab/embed'] button[data-action='restart']")
    until(
        page,
        f"document.querySelector(\"tr[data-server='lab/embed']\").dataset.state === 'ready' && "
        f"document.querySelector(\"tr[data-server='lab/embed']\").dataset.pid !== '{pid}'",
        timeout=30,
    )
    assert "restarting lab/embed" in page.locator("#notice").inner_text()
    assert mc.row("lab/embed")["pid"] != pid

    # a page opened without the token: asked for it, and the server refuses its action (403)
    pid = mc.row("lab/embed")["pid"]
    stranger = browser.new_page()
    stranger.goto(stack["base"])
    stranger.wait_for_selector("#token-form:not([hidden])")
    assert stranger.locator("button[data-action='restart']").count() == 0  # no data without the token
    status = stranger.evaluate(
        """async () => (await fetch('api/action', {method: 'POST', headers: {'Content-Type': 'application/json'},
                         body: JSON.stringify({action: 'restart', server: 'lab/embed'})})).status"""
    )
    assert status == 403
    status, body, _ = http_post(stack["base"] + "api/action", {"action": "restart", "server": "lab/embed"})
    assert status == 403, body
    stranger.close()
    time.sleep(1.0)
    assert mc.row("lab/embed")["pid"] == pid and mc.row("lab/embed")["state"] == "ready"


def test_the_memory_bar_matches_the_budget_in_status_json(page, stack):
    mc = stack["mc"]

    def from_status_json() -> tuple[int, int]:
        rows = [r for r in json.loads(mc.cli("status", "--json").stdout) if r["profile"] == "lab"]
        holding = [r for r in rows if r["state"] in ("starting", "ready", "unhealthy", "stopping", "crashed")]
        used = sum(r["memory_learned"] if r["memory_learned"] is not None else r["memory_declared"] for r in holding)
        return used, rows[0]["budget"]["memory"]

    def shown() -> tuple[int, int]:
        bar = page.locator("section[data-profile='lab'] .budget[data-kind='memory']")
        return int(bar.get_attribute("data-used")), int(bar.get_attribute("data-limit"))

    # the supervisor may learn a larger peak between two reads: the same figures, read close together
    wait_for(lambda: shown() == from_status_json(), 15, interval=0.3, what="the bar to show the figures of status --json")
    used, limit = shown()
    bar = page.locator("section[data-profile='lab'] .budget[data-kind='memory']")
    assert limit == 400 * MiB and f"of 400 MiB ({round(100 * used / limit)}%)" in bar.inner_text()
    assert page.locator("section[data-profile='ops'] .budget").count() == 0  # no budget, no bar
    idle = page.locator("tr[data-server='lab/chat']").inner_text()
    assert "0 B" in idle and "declared 150 MiB" in idle  # an idle server holds nothing; its footprint is shown


def test_the_log_pane_follows_a_line_printed_after_the_page_opened(page, stack):
    mc = stack["mc"]
    page.click("button.log-button[data-server='lab/embed']")
    page.wait_for_selector("#log .line")
    before = page.locator("#log .line").count()
    res = mc.cli("restart", "lab/embed")  # the new instance prints its first line now
    assert res.returncode == 0, res.stdout + res.stderr
    new_pid = mc.row("lab/embed")["pid"]
    until(
        page,
        f"[...document.querySelectorAll('#log .line')].some(l => l.textContent.includes('listen server pid {new_pid} '))",
        timeout=20,
    )
    assert page.locator("#log .line").count() > before


def test_hostile_names_models_and_log_lines_are_shown_as_text_and_secrets_never(page, stack):
    row = page.locator("tr[data-server='lab/embed']")
    assert row.locator(".model").inner_text() == HOSTILE_MODEL
    assert row.locator("img, script").count() == 0
    page.click("button.log-button[data-server='ops/toy']")
    until(page, "[...document.querySelectorAll('#log .line')].some(l => l.textContent.startsWith('<script>'))")
    shown = page.locator("#log").inner_text()
    assert "<script>document.title='pwned'</script> \\x1b]0;title\\x07 \\x1b[31mred\\x1b[0m key=[secret]" in shown
    assert SECRET not in page.content()
    assert page.locator("#log script").count() == 0

    # names the profile loader would refuse, as if a record held them: still text
    def hostile_state(route: Any) -> None:
        response = route.fetch()
        data = response.json()
        server = data["profiles"][0]["servers"][0]
        evil = "<img src=x onerror=\"document.title='pwned'\">"
        server.update(name=evil, id="lab/" + evil, detail=evil, last_error=evil, url="javascript:document.title='pwned'")
        data["profiles"][0]["name"] = evil
        data["events"] = [{"at": data["at"], "server": evil, "kind": "exit", "text": evil}]
        route.fulfill(response=response, json=data)

    page.route("**/api/state", hostile_state)
    until(page, "document.querySelector('section.profile .pname').textContent.startsWith('<img')")
    page.wait_for_timeout(1500)
    assert page.locator("main img").count() == 0
    assert page.locator("main a[href^='javascript']").count() == 0
    page.unroute("**/api/state")


def test_traffic_is_charted_from_the_servers_own_metrics(page, stack):
    url = stack["mc"].row("ops/toy")["url"]
    stop = time.monotonic() + 4
    while time.monotonic() < stop:  # about 20 requests a second for a few polls
        http_post(url + "/v1/embeddings", {"input": "x"})
        time.sleep(0.05)
    cell = "document.querySelector(\"tr[data-server='ops/toy'] .traffic\")"
    until(page, f"{cell} && / req\\/s/.test({cell}.textContent) && /p50 \\d/.test({cell}.textContent)")
    rate = page.locator("tr[data-server='ops/toy'] .traffic .figure").first.inner_text()
    assert float(rate.split()[0]) > 0, rate
    assert page.locator("tr[data-server='ops/toy'] svg polyline.line-rate").get_attribute("points")
    assert page.locator("tr[data-server='lab/embed']").inner_text().count("no metrics") == 1  # a server without metrics


def test_a_screenshot_at_desktop_and_phone_width(page, browser, stack, tmp_path):
    """Saved as the test's artifacts; with MODELCTL_UPDATE_SCREENSHOT=1 also as docs/dashboard.png,
    taken before a log is opened (a log's first line names the machine's paths)."""
    url = stack["mc"].row("ops/toy")["url"]
    done = threading.Event()

    def traffic() -> None:  # some traffic to chart, until the screenshots are taken
        while not done.is_set():
            http_post(url + "/v1/embeddings", {"input": "x"})
            time.sleep(0.03)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    page.click("tr[data-server='lab/chat'] button[data-action='start']")  # wake the idle one: events
    page.wait_for_selector("tr[data-server='lab/chat'][data-state='ready']", timeout=20_000)
    page.wait_for_selector("#events .ev-wake")
    page.wait_for_timeout(3000)
    if os.environ.get("MODELCTL_UPDATE_SCREENSHOT"):
        SCREENSHOT_FOR_DOCS.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT_FOR_DOCS))
    page.click("button.log-button[data-server='ops/toy']")
    page.wait_for_selector("#log .line")
    page.screenshot(path=str(tmp_path / "dashboard.png"))
    assert (tmp_path / "dashboard.png").stat().st_size > 10_000
    phone = browser.new_page(viewport={"width": 390, "height": 844})
    phone.goto(stack["url"])
    phone.wait_for_selector("tr[data-server='ops/toy']")
    assert phone.evaluate("document.scrollingElement.scrollWidth") <= 390  # nothing wider than the screen
    assert phone.locator("tr[data-server='lab/embed'] button[data-action='restart']").is_visible()
    phone.screenshot(path=str(tmp_path / "dashboard-phone.png"), full_page=True)
    phone.close()
    done.set()
    sender.join(5)
    print(f"screenshots: {tmp_path / 'dashboard.png'} {tmp_path / 'dashboard-phone.png'}")
