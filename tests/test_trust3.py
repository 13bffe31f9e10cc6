"""Trust, round 3: where held sockets, on-demand servers, the budget and replacements meet.

Each test drives the real CLI and real processes (small stand-in servers: tests/servers/), and
names the defect it holds shut; each failed on the code before the fix.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil

from modelctl.names import ServerRef

from .conftest import ROOT, http_post, tagged_processes, wait_for
from .sentence_fixtures import free_port

LISTEN_SERVER = str(ROOT / "tests" / "servers" / "listen_server.py")
MiB = 2**20


def held(*flags: str, **keys) -> dict:
    """A server on a held socket that says READY=1 (gunicorn-like; tests/servers/listen_server.py)."""
    return {
        "kind": "command",
        "command": [sys.executable, LISTEN_SERVER, *flags],
        "socket": "inherit",
        "notify": True,
        "health": {"http": "/health", "interval": 0.5},
        "restart": {"backoff": 0.2},
        **keys,
    }


def on_demand(*flags: str, **keys) -> dict:
    return held(*flags, **{"start": "on-demand", "idle_timeout": 600, **keys})


def up(mc, servers: dict, *args: str, **top) -> subprocess.CompletedProcess:
    res = mc.cli("up", "-p", str(mc.profile(servers, **top)), *args)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def call(url: str, timeout: float = 60) -> tuple[int, dict]:
    status, body, _ = http_post(url.rstrip("/") + "/call", {}, timeout=timeout)
    return status, body


def refuses(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return False
    except OSError:
        return True


def processes_of(mc, server: str) -> list[psutil.Process]:
    """Every live process that carries this server's name (its instances and what they started)."""
    out = []
    for p in tagged_processes(mc.tag):
        try:
            if p.environ().get("MODELCTL_SERVER") == f"test/{server}" and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def supervisor(mc) -> psutil.Process:
    info = json.loads((mc.state_dir / "supervisor.json").read_text())
    return psutil.Process(info["pid"])


def loads(mc, name: str) -> int:
    """How many instances of a listen server have started (each prints one line)."""
    log = mc.store.log_path(ServerRef("test", name))
    return log.read_text().count("listen server pid") if log.exists() else 0


class MemorySampler:
    """The resident memory of every process of this test's servers, sampled every 50 ms."""

    def __init__(self, mc):
        self.mc, self.peak, self._stop = mc, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in tagged_processes(self.mc.tag):
                try:
                    if "MODELCTL_SERVER" in p.environ():
                        total += p.memory_info().rss
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
            self.peak = max(self.peak, total)
            time.sleep(0.05)

    def __enter__(self) -> MemorySampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)


# ---------------------------------------------------------------------- 1. two wakes under a budget for one
def test_two_wakes_under_a_budget_for_one_are_both_answered_in_turn(mc):
    """Item 1. The second client arrives while the first server still loads: it waits in the
    backlog until the first has answered and can be evicted; neither server ends `failed`.
    Before: the second was reset and its server ended failed with its socket closed."""
    servers = {n: on_demand("--load", "2", "--hold", "60", "--value", n, memory="100MiB") for n in ("a", "b")}
    up(mc, servers, budget={"memory": "150MiB"})
    urls = {n: mc.row(n)["url"] for n in ("a", "b")}
    results: dict[str, tuple[int, dict]] = {}

    def client(name: str) -> None:
        results[name] = call(urls[name])

    first = threading.Thread(target=client, args=("a",))
    first.start()
    time.sleep(0.5)
    second = threading.Thread(target=client, args=("b",))
    second.start()
    first.join(90)
    second.join(90)
    assert results["a"][0] == 200 and results["a"][1]["value"] == "a", results
    assert results["b"][0] == 200 and results["b"][1]["value"] == "b", results
    assert mc.row("a")["state"] != "failed" and mc.row("b")["state"] != "failed"
    assert call(urls["a"])[0] == 200  # and the first wakes again in turn


def test_a_budget_refusal_is_never_a_permanent_failed_while_the_server_is_wanted(mc):
    """Item 1: a start that finds no room now waits (saying why), and starts once room frees."""
    up(mc, {"big": held("--hold", "10", memory="100MiB")}, budget={"memory": "150MiB"})
    mc.wait_state("big", "ready")
    up(mc, {"big": held("--hold", "10", memory="100MiB"), "od": on_demand("--value", "od", memory="100MiB")}, budget={"memory": "150MiB"})
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(call(mc.row("od")["url"], timeout=60)[0]))
    t.start()
    row = wait_for(lambda: (r := mc.row("od"))["detail"] and "waiting for memory" in r["detail"] and r, 20, what="od waits for memory")
    assert row["state"] == "idle", row
    assert mc.cli("down", "big").returncode == 0  # room frees: the waiting client is served
    t.join(60)
    assert got == [200]


# ---------------------------------------------------------------------- 2. a new spec for an idle or backing-off server
def test_a_new_spec_for_an_idle_server_on_a_fixed_port_keeps_its_socket(mc):
    """Item 2. Before: up was refused, naming the supervisor itself as the port's holder."""
    port = free_port()
    up(mc, {"od": on_demand(port=port, idle_timeout=600)})
    assert mc.row("od")["state"] == "idle"
    res = mc.cli("up", "-p", str(mc.profile({"od": on_demand(port=port, idle_timeout=900)})))
    assert res.returncode == 0, res.stdout + res.stderr
    assert mc.row("od")["port"] == port and call(f"http://127.0.0.1:{port}")[0] == 200


def test_a_new_spec_for_an_idle_server_on_an_auto_port_keeps_the_port(mc):
    """Item 2. Before: the record moved to a new port while the supervisor held the old one."""
    up(mc, {"od": on_demand(idle_timeout=600)})
    before = mc.row("od")
    up(mc, {"od": on_demand(idle_timeout=900)})
    after = mc.row("od")
    assert after["port"] == before["port"] and after["url"] == before["url"]
    assert call(after["url"])[0] == 200


def test_an_idle_server_switched_to_always_starts(mc):
    """Item 2. Before: it stayed idle with no process."""
    up(mc, {"s": on_demand()})
    assert mc.row("s")["state"] == "idle"
    up(mc, {"s": held()})
    row = mc.wait_state("s", "ready")
    assert row["pid"] is not None


def test_a_crash_looping_server_fixed_during_its_backoff_starts_on_its_port(mc):
    """Item 2: a new spec during the backoff of a server whose socket is held. Before: up was
    refused, naming the supervisor as the port's holder."""
    port = free_port()
    crash = [sys.executable, "-c", "import sys; print('boom', flush=True); sys.exit(1)"]
    broken = {**held(port=port, restart={"backoff": 30, "max_failures": 10}), "command": crash}
    mc.cli("up", "-p", str(mc.profile({"s": broken})), "--no-wait")
    wait_for(lambda: mc.row("s")["state"] == "backoff", 20, what="backoff")
    up(mc, {"s": held(port=port)})
    assert mc.row("s")["state"] == "ready" and call(f"http://127.0.0.1:{port}")[0] == 200


# ---------------------------------------------------------------------- 3. a changed address is a new socket
def test_a_changed_port_is_a_new_socket_and_the_old_one_closes(mc):
    """Item 3. Before: the replacement inherited the old socket; the new URL refused."""
    old, new = free_port(), free_port()
    up(mc, {"s": held("--value", "one", port=old)})
    up(mc, {"s": held("--value", "two", port=new)})
    row = mc.wait_state("s", "ready")
    assert row["port"] == new
    status, body = call(f"http://127.0.0.1:{new}")
    assert status == 200 and body["value"] == "two"
    wait_for(lambda: refuses("127.0.0.1", old), 20, what="the old port to close")


def test_a_changed_host_is_a_new_socket(mc):
    """Item 3: the same port at another address (127.0.0.2 is loopback too)."""
    port = free_port()
    up(mc, {"s": held("--value", "one", port=port, host="127.0.0.1")})
    up(mc, {"s": held("--value", "two", port=port, host="127.0.0.2")})
    row = mc.wait_state("s", "ready")
    assert row["host"] == "127.0.0.2"
    status, body, _ = http_post(f"http://127.0.0.2:{port}/call", {}, timeout=30)
    assert status == 200 and body["value"] == "two"
    wait_for(lambda: refuses("127.0.0.1", port), 20, what="the old address to close")


# ---------------------------------------------------------------------- 4. a supervisor killed during an overlap
def test_a_supervisor_killed_during_an_overlap_restart_still_completes_it(mc):
    """Item 4. Before: the successor's READY=1 was lost with the notify socket; after
    startup_timeout the successor was killed and `restart` exited 1."""
    up(mc, {"s": held("--load", "3", startup_timeout=20)})
    old_pid = mc.wait_state("s", "ready")["pid"]
    restart = subprocess.Popen(
        [sys.executable, "-m", "modelctl", "restart", "test/s"],
        env=mc.env,
        cwd=mc.tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: (r := mc.record("s")) is not None and r.successor is not None and r.successor.pid is not None, 20, what="a successor")
    supervisor(mc).kill()  # while the successor loads
    out, _ = restart.communicate(timeout=60)
    assert restart.returncode == 0, out
    row = mc.row("s")
    assert row["state"] == "ready" and row["pid"] not in (None, old_pid), row
    wait_for(
        lambda: not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE,
        20,
        what="the old instance to stop",
    )


# ---------------------------------------------------------------------- 5. liveness on a held socket
def tcp_held(*flags: str) -> dict:
    return {
        "kind": "command",
        "command": [sys.executable, LISTEN_SERVER, *flags],
        "socket": "inherit",
        "health": {"tcp": True, "interval": 0.5, "timeout": 1, "grace": 2},
        "restart": {"backoff": 0.2},
    }


def test_a_hung_server_on_a_held_socket_with_a_tcp_probe_is_restarted(mc):
    """Item 5. The kernel's backlog completes a connect whether or not a server accepts. Before:
    a stopped (SIGSTOP) server stayed `ready` for good."""
    up(mc, {"s": tcp_held()})
    pid = mc.wait_state("s", "ready")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: (r := mc.row("s"))["state"] == "ready" and r["pid"] not in (None, pid), 30, what="a restart")
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGCONT)


def test_a_slow_starting_server_on_a_held_socket_is_ready_only_once_it_serves(mc):
    """Item 5. Before: it was reported ready about a second after its start although it needed 4."""
    up(mc, {"s": tcp_held("--load", "4")})
    rec = mc.record("s")
    assert rec is not None and rec.instance is not None and rec.instance.ready_at is not None
    assert rec.instance.ready_at - rec.instance.started_at >= 3.5, rec.startup


# ---------------------------------------------------------------------- 6. a warm start runs the model once
def test_up_now_loads_an_on_demand_server_once_per_activation(mc):
    """Item 6. Before: at the first idle stop the still-open warm wish started a second instance."""
    up(mc, {"s": on_demand(idle_timeout=1)}, "--now")
    wait_for(lambda: mc.row("s")["state"] == "idle" and mc.row("s")["idle_stops"] >= 1, 30, what="an idle stop")
    time.sleep(2.5)  # a second start would come at once
    assert mc.row("s")["state"] == "idle" and loads(mc, "s") == 1, (mc.row("s"), loads(mc, "s"))


# ---------------------------------------------------------------------- 7. a replacement inside the budget
def test_a_restart_of_an_overlapping_server_stays_inside_the_budget(mc):
    """Item 7. Two instances do not fit: the restart goes stop-first. Before: the successor started
    without admission (two instances, above the budget)."""
    up(mc, {"s": held("--hold", "150", memory="200MiB")}, budget={"memory": "300MiB"})
    old_pid = mc.wait_state("s", "ready")["pid"]
    with MemorySampler(mc) as sampled:
        res = mc.cli("restart", "test/s")
        assert res.returncode == 0, res.stdout + res.stderr
        time.sleep(0.5)
    assert mc.row("s")["pid"] not in (None, old_pid)
    assert sampled.peak <= 300 * MiB, sampled.peak / MiB


# ---------------------------------------------------------------------- 8. an eviction during a replacement
def test_an_eviction_during_a_replacement_stops_the_successor_too(mc):
    """Item 8. Before: only the old instance stopped; the successor ran untracked, and `down` said
    "not running" while the port answered."""
    servers = {"a": on_demand("--value", "a", "--hold", "100", memory="120MiB"), "b": on_demand("--value", "b", memory="120MiB")}
    up(mc, servers, budget={"memory": "300MiB"})
    assert call(mc.row("a")["url"])[0] == 200
    slow = {**servers, "a": on_demand("--value", "a2", "--load", "20", memory="120MiB")}  # its successor loads for long
    up(mc, slow, "--no-wait", budget={"memory": "300MiB"})
    wait_for(lambda: (r := mc.record("a")) is not None and r.successor is not None and r.successor.pid is not None, 20, what="a successor")
    assert call(mc.row("b")["url"])[0] == 200  # b needs a's memory: a is evicted
    wait_for(lambda: mc.row("a")["state"] == "idle", 30, what="a to be evicted")
    wait_for(lambda: not processes_of(mc, "a"), 20, what="every instance of a to be gone")
    res = mc.cli("down")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not processes_of(mc, "a") and not processes_of(mc, "b")


# ---------------------------------------------------------------------- 9. a footprint belongs to its spec
def test_a_new_spec_starts_from_its_declared_footprint(mc):
    """Item 9. Before: the 250 MiB measured for the old command stayed after it changed to one that
    needs 30 MiB, and the other server was refused."""
    budget = {"memory": "400MiB"}
    up(mc, {"x": held("--hold", "250", memory="300MiB")}, budget=budget)
    wait_for(lambda: (mc.row("x")["memory_learned"] or 0) > 200 * MiB, 30, what="a measured peak")
    servers = {"x": held("--value", "small", memory="30MiB"), "y": on_demand("--value", "y", memory="300MiB")}
    up(mc, servers, budget=budget)
    assert mc.wait_state("x", "ready")["pid"]
    status, body = call(mc.row("y")["url"], timeout=30)
    assert status == 200 and body["value"] == "y"
    assert mc.row("x")["state"] == "ready"  # room was made without evicting an always server


# ---------------------------------------------------------------------- 12. daemons count
def test_a_server_that_daemonizes_is_measured_with_its_daemon(mc):
    """Item 12. Before: a server that double-forks a 200 MiB daemon was measured at its leader's size."""
    toy = mc.toy("--daemonize-after", "0.3", "--hold", "200", "--pid-file", str(mc.tmp / "daemon.pid"))
    up(mc, {"d": {"kind": "command", "command": toy, "health": {"http": "/health"}}})
    wait_for((mc.tmp / "daemon.pid").exists, 20, what="the daemon")
    wait_for(lambda: (mc.row("d")["memory_learned"] or 0) >= 190 * MiB, 30, what="the daemon's memory in the footprint")


# ---------------------------------------------------------------------- 13. a newer record
def test_a_record_from_a_newer_version_is_refused_and_never_rewritten(mc):
    """Item 13. Before: a version-4 record was read as version 3 and rewritten without its new keys."""
    up(mc, {"s": held()})
    assert mc.cli("down").returncode == 0
    path = mc.store.record_path(ServerRef("test", "s"))
    data = json.loads(path.read_text())
    data.update(version=4, a_key_of_version_4={"kept": True})
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    res = mc.cli("status")
    assert "newer modelctl" in res.stdout + res.stderr, res.stdout + res.stderr
    res = mc.cli("up", "-p", str(mc.profile({"s": held()})))
    assert res.returncode != 0 and "newer modelctl" in res.stdout + res.stderr
    assert path.read_bytes() == before


# ---------------------------------------------------------------------- 14. a budget smaller than a server
def test_a_server_bigger_than_its_budget_is_a_profile_error(mc):
    """Item 14. Before: accepted; the first client was reset."""
    path = mc.profile({"s": on_demand(memory="650MiB")}, budget={"memory": "100MiB"})
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 2, res.stdout + res.stderr
    said = res.stdout + res.stderr
    assert str(path.name) in said and "'s'" in said and "memory" in said and "budget" in said, said


# ---------------------------------------------------------------------- 18. status checks who holds the port
def test_status_does_not_say_held_while_a_stranger_holds_the_port(mc):
    """Item 18. Before: `held`, from the record alone."""
    up(mc, {"od": on_demand()})
    port = mc.row("od")["port"]
    sup = supervisor(mc)
    sup.kill()
    sup.wait(10)
    stranger = socket.socket()
    stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    stranger.bind(("127.0.0.1", port))
    stranger.listen()
    try:
        env = {**mc.env}
        row = json.loads(
            subprocess.run(
                [sys.executable, "-m", "modelctl", "status", "--json"], env=env, cwd=mc.tmp, capture_output=True, text=True
            ).stdout
        )
        rows = row if isinstance(row, list) else row.get("servers", row)
        od = next(r for r in rows if r["name"] == "od")
        assert od["socket"] != "held" and str(os.getpid()) in od["socket"], od["socket"]
    finally:
        stranger.close()
