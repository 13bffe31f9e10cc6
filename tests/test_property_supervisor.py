"""A stateful property test: random operations on three servers under a budget, with real
processes, the real CLI and the real supervisor; after every step the Guarantees are checked.

Operations: `up` with a changed spec (port, host, start, command, memory), `restart`, `down`, a
client's call (a wake, and an eviction of another), the same call through a gateway (a profile of
its own, `scope: all`, reading the records as they change), waiting (idle stops), a SIGKILL of a
server, of the gateway, of the supervisor. Invariants after each step:
- every process of every instance is recorded (a replaced one is gone within its stop_timeout);
- no port that a ready or idle server shows refuses a connection, nor the gateway's;
- the sampled resident memory of what modelctl started never exceeds the budget (the gateway is
  of another profile, outside it);
- `down` leaves nothing (at the end).

CI runs a fixed seed and 30 steps; `MODELCTL_PROPERTY_STEPS` and `MODELCTL_PROPERTY_EXAMPLES`
run more (`MODELCTL_PROPERTY_STEPS=50 MODELCTL_PROPERTY_EXAMPLES=4`: 200 steps, about 9 minutes).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import psutil
import pytest
import yaml
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from modelctl.names import ServerRef
from modelctl.state.record import ServerRecord

from .conftest import _SESSION_TAGS, ROOT, Harness, http_post, kill_tagged, tagged_processes, wait_for
from .sentence_fixtures import free_port

pytestmark = pytest.mark.slow

LISTEN_SERVER = str(ROOT / "tests" / "servers" / "listen_server.py")
MiB = 2**20
BUDGET = 150 * MiB  # two servers fit, three do not: wakes evict
NAMES = ("a", "b", "c")
STOP_TIMEOUT = 3
GATEWAY = "front/gateway"  # the gateway's profile has no servers of its own: scope all
# the test kills servers and the gateway as often as it likes: a crash loop (`failed` after
# max_failures within the window, tests/test_restart.py) would be right, and is not what this explores
RESTART = {"backoff": 0.2, "backoff_max": 2, "max_failures": 100_000}


def spec(name: str, value: int, port: int | None, host: str, on_demand: bool, memory: int) -> dict:
    out: dict = {
        "kind": "command",
        "command": [sys.executable, LISTEN_SERVER, "--hold", "40", "--load", "0.3", "--value", f"{name}{value}"],
        "socket": "inherit",
        "notify": True,
        "health": {"http": "/health", "interval": 0.5},
        "restart": RESTART,
        "memory": f"{memory}MiB",
        "stop_timeout": STOP_TIMEOUT,
        "host": host,
    }
    if port is not None:
        out["port"] = port
    if on_demand:
        out.update(start="on-demand", idle_timeout=2)
    return out


class Sampler:
    """The resident memory of every server process of the test, every 50 ms."""

    def __init__(self, tag: str):
        self.tag, self.peak, self.at_peak = tag, 0, ""
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            total, who = 0, []
            for p in tagged_processes(self.tag):
                try:
                    server = p.environ().get("MODELCTL_SERVER")
                    if server and server != GATEWAY:
                        rss = p.memory_info().rss
                        total += rss
                        who.append(f"{server}:{p.pid}:{rss // MiB}MiB")
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            if total > self.peak:
                self.peak, self.at_peak = total, ", ".join(who)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._t.join(5)


class Servers(RuleBasedStateMachine):
    mc: Harness
    sampler: Sampler

    @initialize()
    def start(self) -> None:
        self.specs: dict[str, dict[str, Any]] = {
            "a": {"value": 0, "port": None, "host": "127.0.0.1", "on_demand": True, "memory": 60},
            "b": {"value": 0, "port": None, "host": "127.0.0.1", "on_demand": True, "memory": 60},
            "c": {"value": 0, "port": None, "host": "127.0.0.1", "on_demand": False, "memory": 60},
        }
        self.wanted = set(NAMES)
        self.up("--no-wait")
        front = self.mc.tmp / "front.yaml"
        front.write_text(yaml.safe_dump({"name": "front", "gateway": {"scope": "all", "stop_timeout": STOP_TIMEOUT, "restart": RESTART}}))
        res = self.mc.cli("up", "-p", str(front), timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr

    def profile(self):
        servers = {n: spec(n, **self.specs[n]) for n in NAMES}
        return self.mc.profile(servers, budget={"memory": f"{BUDGET // MiB}MiB"})

    def up(self, *args: str, names: tuple[str, ...] = ()) -> None:
        res = self.mc.cli("up", "-p", str(self.profile()), *names, *args, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        self.wanted |= set(names or NAMES)

    # ------------------------------------------------------------------ operations
    @rule(name=st.sampled_from(NAMES), change=st.sampled_from(["command", "port", "host", "start", "memory", "auto"]))
    def change_spec(self, name: str, change: str) -> None:
        s = self.specs[name]
        if change == "command":
            s["value"] += 1
        elif change == "port":
            s["port"] = free_port()
        elif change == "auto":
            s["port"] = None
        elif change == "host":
            s["host"] = "127.0.0.2" if s["host"] == "127.0.0.1" else "127.0.0.1"
        elif change == "start":
            s["on_demand"] = not s["on_demand"] if name != "c" else False
        else:
            s["memory"] = 70 if s["memory"] == 60 else 60
        self.up("--no-wait")

    @rule(name=st.sampled_from(NAMES))
    def restart(self, name: str) -> None:
        res = self.mc.cli("restart", f"test/{name}", timeout=120)
        assert res.returncode in (0, 1), res.stdout + res.stderr

    @rule(name=st.sampled_from(NAMES))
    def down(self, name: str) -> None:
        res = self.mc.cli("down", f"test/{name}", timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
        self.wanted.discard(name)

    @rule(name=st.sampled_from(NAMES))
    def bring_back(self, name: str) -> None:
        self.up("--no-wait", names=(name,))

    @rule(name=st.sampled_from(NAMES))
    def call(self, name: str) -> None:
        """A client's request: wakes an idle server (and may evict another); always answered."""
        row = self.row(name)
        if name not in self.wanted or row is None or row["state"] not in ("ready", "idle", "starting") or not row["url"]:
            return
        status, body, _ = http_post(row["url"] + "/call", {}, timeout=60)
        assert status == 200, (name, status, body)

    @rule(name=st.sampled_from(NAMES))
    def call_through_the_gateway(self, name: str) -> None:
        """The same call through the gateway, by PROFILE/SERVER: it finds the server's address in
        the records as they are now (a new port, a wake), and the answer is the server's."""
        row, gateway = self.row(name), self.row(GATEWAY)
        if name not in self.wanted or row is None or row["state"] not in ("ready", "idle", "starting") or not row["url"]:
            return
        assert gateway is not None and gateway["url"], gateway
        status, body, _ = http_post(f"{gateway['url']}/servers/test/{name}/call", {}, timeout=60)
        assert status == 200, (name, status, body)

    @rule()
    def kill_gateway(self) -> None:
        """Restarted on its held socket: the next call through it waits in the backlog, never refused."""
        row = self.row(GATEWAY)
        if row is not None and row["pid"]:
            try:
                os.kill(row["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass

    @rule()
    def two_calls_at_once(self) -> None:
        """Clients of both on-demand servers at once: under the budget they are served in turn."""
        names = [n for n in ("a", "b") if n in self.wanted and self.specs[n]["on_demand"]]
        errors: list[BaseException] = []

        def call(name: str) -> None:
            try:
                self.call(name)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=call, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors

    @rule(seconds=st.sampled_from([0.5, 1.5, 3.0]))
    def wait(self, seconds: float) -> None:
        time.sleep(seconds)

    @rule(name=st.sampled_from(NAMES))
    def kill_server(self, name: str) -> None:
        row = self.row(name)
        if row is not None and row["pid"]:
            try:
                os.kill(row["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass

    @rule()
    def kill_supervisor(self) -> None:
        """The supervisor dies; the next command starts a new one (what that costs an idle server is
        in the README's Guarantees)."""
        path = self.mc.state_dir / "supervisor.json"
        try:
            info = json.loads(path.read_text())
            proc = psutil.Process(info["pid"])
            if abs(proc.create_time() - info["create_time"]) < 0.05:
                proc.kill()
                proc.wait(10)
        except (OSError, ValueError, KeyError, psutil.Error):
            return
        self.up("--no-wait", names=tuple(sorted(self.wanted)) or NAMES)
        # until then an idle server's port refused (the README says so); the new supervisor binds it at once
        wait_for(lambda: not self.refused(), 15, interval=0.1, what="the new supervisor to hold the idle servers' sockets")

    # ------------------------------------------------------------------ invariants
    def row(self, name: str) -> dict | None:
        """A server of the test profile by its name, or the gateway by GATEWAY."""
        rows = [r.to_json() for r in self.mc.ctl.status()]
        return next((r for r in rows if r["id"] in (f"test/{name}", name)), None)

    def recorded_tokens(self) -> set[str]:
        tokens = set()
        for ref in [ServerRef("test", name) for name in NAMES] + [ServerRef(*GATEWAY.split("/"))]:
            rec = self.mc.store.load(ref)
            if isinstance(rec, ServerRecord):
                tokens |= {i.token for i in (rec.instance, rec.successor) if i is not None}
        return tokens

    def unrecorded(self) -> list[str]:
        tokens = self.recorded_tokens()
        out = []
        for p in tagged_processes(self.mc.tag):
            try:
                env = p.environ()
                if "MODELCTL_SERVER" in env and env.get("MODELCTL_INSTANCE") not in tokens and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{env['MODELCTL_SERVER']} pid {p.pid}")
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    @invariant()
    def every_process_is_recorded(self) -> None:
        # a replaced or stopped instance is being stopped: it may drain for its stop_timeout
        wait_for(lambda: not self.unrecorded(), STOP_TIMEOUT + 5, interval=0.2, what="every server process to be recorded")

    def refused(self) -> list[str]:
        out = []
        for name in (*NAMES, GATEWAY):
            row = self.row(name)
            wanted = name in self.wanted or name == GATEWAY
            if row is None or not wanted or row["state"] not in ("ready", "idle") or not row["port"]:
                continue
            try:
                with socket.create_connection((row["host"], row["port"]), timeout=2):
                    pass
            except OSError as e:
                out.append(f"{name} is {row['state']} at {row['url']} but refuses: {e}")
        return out

    @invariant()
    def no_shown_port_refuses(self) -> None:
        assert not self.refused()

    @invariant()
    def no_wanted_server_fails(self) -> None:
        """Every spec here is good and fits the budget alone: `failed` is never right."""
        names = [n for n in NAMES if n in self.wanted] + [GATEWAY]
        failed = [(n, r["last_error"]) for n in names if (r := self.row(n)) is not None and r["state"] == "failed"]
        assert not failed, failed

    @invariant()
    def memory_within_the_budget(self) -> None:
        assert self.sampler.peak <= BUDGET, f"{self.sampler.peak // MiB} MiB > {BUDGET // MiB} MiB: {self.sampler.at_peak}"

    def teardown(self) -> None:
        try:
            res = self.mc.cli("down", timeout=60)
            assert res.returncode == 0, res.stdout + res.stderr
            wait_for(
                lambda: not [p for p in tagged_processes(self.mc.tag) if "MODELCTL_SERVER" in _env(p)], 20, what="down to leave nothing"
            )
        finally:
            self.sampler.stop()
            kill_tagged(self.mc.tag)


def _env(p: psutil.Process) -> dict:
    try:
        return p.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}


@pytest.mark.timeout(3600)
def test_random_operations_keep_the_guarantees(tmp_path_factory, monkeypatch):
    steps = int(os.environ.get("MODELCTL_PROPERTY_STEPS", "30"))
    examples = int(os.environ.get("MODELCTL_PROPERTY_EXAMPLES", "1"))
    counter = iter(range(10**6))

    class Run(Servers):
        def __init__(self) -> None:
            tmp = tmp_path_factory.mktemp(f"run{next(counter)}")
            harness = Harness(tmp, f"property-{os.getpid()}-{tmp.name}")
            _SESSION_TAGS.add(harness.tag)  # the session's last sweep ends whatever a failure leaves
            monkeypatch.setenv("MODELCTL_TEST_TAG", harness.tag)
            monkeypatch.setenv("MODELCTL_STATE_DIR", str(harness.state_dir))
            self.mc = harness
            self.sampler = Sampler(harness.tag)
            super().__init__()

    # one example per run (a replay of real processes is never the same run: no shrinking, no reuse);
    # the first is the fixed one CI runs, the others explore
    for round_ in range(examples):
        run_state_machine_as_test(
            Run,
            settings=settings(
                max_examples=1,
                stateful_step_count=steps,
                deadline=None,
                derandomize=round_ == 0,
                suppress_health_check=list(HealthCheck),
                database=None,
                phases=[Phase.explicit, Phase.generate],  # a failure prints the steps that led to it
            ),
        )
