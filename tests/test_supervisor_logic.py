"""Restart, backoff, crash loops and health, replayed against a fake clock and fake processes.

No real process runs here: the supervisor's verbs are driven tick by tick (as honcho's tests do).
"""

from __future__ import annotations

import itertools
import os

import pytest

from modelctl import lifecycle as lc
from modelctl.health import ProbeResult
from modelctl.names import ServerRef
from modelctl.process import ProcessIdentity, StopResult, identity_of
from modelctl.profile import parse_server
from modelctl.state import ServerRecord, StateStore
from modelctl.supervisor import Handle, InlineExecutor, Supervisor


class FakePopen:
    def __init__(self, procs: FakeProcs, pid: int):
        self.procs, self.pid = procs, pid

    def poll(self):
        return self.procs.exit_codes.get(self.pid)


class FakeProcs:
    """Processes that live until a test says they exit; probes that answer what the test says."""

    def __init__(self):
        self.pids = itertools.count(1000)
        self.spawned: list[tuple[int, list[str]]] = []
        self.alive: set[int] = set()
        self.exit_codes: dict[int, int] = {}
        self.stopped: list[int] = []
        self.healthy = True
        self.port_holders: dict[int, str] = {}

    def spawn(self, launch, env, log_fd):
        pid = next(self.pids)
        self.spawned.append((pid, list(launch.argv)))
        self.alive.add(pid)
        return Handle(ProcessIdentity(pid, float(pid)), FakePopen(self, pid))

    def exit_status(self, handle):
        if handle.popen is not None:
            rc = handle.popen.poll()
            return (rc is not None, rc)
        return (handle.ident.pid not in self.alive, None)

    def is_alive(self, ident):
        return ident.pid in self.alive

    def stop(self, target, timeout):
        pid = target.leader.pid if target.leader else None
        if pid in self.alive:
            self.stopped.append(pid)
            self.exit(pid, -15)
            return StopResult("terminated", [pid])
        return StopResult("not running")

    def descendants(self, ident):
        return []

    def port_holder(self, port, host):
        return self.port_holders.get(port)

    def probe(self, spec, url):
        return ProbeResult(self.healthy, "ok" if self.healthy else "503", connected=True)

    def exit(self, pid: int, code: int) -> None:
        self.alive.discard(pid)
        self.exit_codes[pid] = code


def add_server(store: StateStore, name: str = "s", port: int = 9100, **extra) -> ServerRecord:
    raw = {"kind": "command", "command": ["srv", "{port}"], "health": {"http": "/health", "interval": 1, "grace": 5}, **extra}
    spec = parse_server(name, raw, "test.yaml", "test")
    rec = ServerRecord(
        profile="test",
        name=name,
        kind="command",
        source="test.yaml",
        spec=raw,
        fingerprint=spec.fingerprint,
        port=port,
        url=f"http://127.0.0.1:{port}",
    )
    store.save(rec)
    return rec


@pytest.fixture
def world(tmp_path):
    class World:
        store = StateStore(tmp_path / "state")
        procs = FakeProcs()
        now = 1000.0

        def sup(self):
            return Supervisor(self.store, clock=lambda: self.now, procs=self.procs, executor=InlineExecutor())

        def rec(self, name="s"):
            return self.store.load(ServerRef("test", name))

    return World()


def run_until(world, sup, name, state, step=0.25, limit=200):
    for _ in range(limit):
        sup.tick(world.now)
        if world.rec(name).state == state:
            return world.rec(name)
        world.now += step
    raise AssertionError(f"{name} never became {state}; is {world.rec(name).state}")


def test_a_new_server_starts_and_becomes_ready(world):
    add_server(world.store)
    sup = world.sup()
    rec = run_until(world, sup, "s", lc.READY)
    assert len(world.procs.spawned) == 1
    assert world.procs.spawned[0][1] == ["srv", "9100"]
    assert rec.pid == world.procs.spawned[0][0] and rec.ready_at is not None


def test_a_crash_restarts_on_the_same_port_after_a_doubling_backoff(world):
    add_server(world.store, restart={"backoff": 1, "backoff_max": 4, "max_failures": 10})
    sup = world.sup()
    delays = []
    for _ in range(4):
        rec = run_until(world, sup, "s", lc.READY)
        world.procs.exit(rec.pid, 1)
        sup.tick(world.now)
        rec = world.rec("s")
        assert rec.state == lc.BACKOFF and rec.last_exit == "exit code 1"
        delays.append(rec.next_start_at - world.now)
    assert delays == [1, 2, 4, 4]  # doubling, capped at backoff_max
    rec = run_until(world, sup, "s", lc.READY)
    assert rec.restarts == 4
    assert all(argv == ["srv", "9100"] for _, argv in world.procs.spawned)


def test_backoff_is_not_cut_short(world):
    add_server(world.store, restart={"backoff": 2})
    sup = world.sup()
    rec = run_until(world, sup, "s", lc.READY)
    world.procs.exit(rec.pid, 1)
    sup.tick(world.now)
    world.now += 1.9
    sup.tick(world.now)
    assert world.rec("s").state == lc.BACKOFF and len(world.procs.spawned) == 1
    world.now += 0.2
    sup.tick(world.now)
    assert world.rec("s").state == lc.STARTING and len(world.procs.spawned) == 2


def test_a_crash_loop_ends_in_failed_with_the_exit(world):
    add_server(world.store, restart={"backoff": 0.5, "max_failures": 3, "window": 60})
    sup = world.sup()
    for _ in range(3):
        rec = run_until(world, sup, "s", lc.STARTING)
        world.procs.exit(rec.pid, 7)
        sup.tick(world.now)
    rec = world.rec("s")
    assert rec.state == lc.FAILED
    assert "crash loop: 3 failures" in rec.detail and "exit code 7" in rec.detail
    world.now += 100
    sup.tick(world.now)
    assert len(world.procs.spawned) == 3  # no more attempts once failed


def test_failures_outside_the_window_do_not_count(world):
    add_server(world.store, restart={"backoff": 0.1, "max_failures": 2, "window": 10, "stable_after": 1000})
    sup = world.sup()
    rec = run_until(world, sup, "s", lc.READY)
    world.procs.exit(rec.pid, 1)
    sup.tick(world.now)
    world.now += 30  # the first failure leaves the window
    rec = run_until(world, sup, "s", lc.READY)
    world.procs.exit(rec.pid, 1)
    sup.tick(world.now)
    assert world.rec("s").state == lc.BACKOFF


def test_stable_uptime_resets_the_backoff(world):
    add_server(world.store, restart={"backoff": 1, "stable_after": 60, "max_failures": 10})
    sup = world.sup()
    for _ in range(3):
        rec = run_until(world, sup, "s", lc.READY)
        world.procs.exit(rec.pid, 1)
        sup.tick(world.now)
    assert world.rec("s").next_start_at - world.now == 4
    rec = run_until(world, sup, "s", lc.READY)
    world.now += 61
    sup.tick(world.now)
    world.procs.exit(rec.pid, 1)
    sup.tick(world.now)
    assert world.rec("s").next_start_at - world.now == 1


def test_down_during_backoff_means_no_restart(world):
    add_server(world.store, restart={"backoff": 5})
    sup = world.sup()
    rec = run_until(world, sup, "s", lc.READY)
    world.procs.exit(rec.pid, 1)
    sup.tick(world.now)
    assert world.rec("s").state == lc.BACKOFF

    def down(r):  # what `down` writes for a server in backoff
        r.desired = "stopped"
        lc.move(r, lc.STOPPED)

    world.store.update(ServerRef("test", "s"), down)
    world.now += 60
    sup.tick(world.now)
    assert world.rec("s").state == lc.STOPPED and len(world.procs.spawned) == 1


def test_an_exit_after_down_is_not_a_crash(world):
    add_server(world.store)
    sup = world.sup()
    rec = run_until(world, sup, "s", lc.READY)
    me = identity_of(os.getppid())  # the `down` command marks itself as the stop's owner, and lives

    def down(r):
        r.desired, r.stop_owner = "stopped", [me.pid, me.create_time]
        lc.move(r, lc.STOPPING)

    world.store.update(ServerRef("test", "s"), down)
    world.procs.exit(rec.pid, -15)
    sup.tick(world.now)
    rec = world.rec("s")
    assert rec.state == lc.STOPPING and rec.restarts == 0 and rec.failures == []


def test_a_hung_server_is_restarted_after_the_grace_period(world):
    add_server(world.store)  # grace 5s, interval 1s
    sup = world.sup()
    rec = run_until(world, sup, "s", lc.READY)
    first = rec.pid
    world.procs.healthy = False
    rec = run_until(world, sup, "s", lc.UNHEALTHY)
    t_unhealthy = world.now
    world.now += 4
    sup.tick(world.now)
    assert world.rec("s").state == lc.UNHEALTHY and first in world.procs.alive
    world.now += 1.5
    sup.tick(world.now)
    sup.tick(world.now)
    assert first in world.procs.stopped
    rec = world.rec("s")
    assert rec.state == lc.BACKOFF and "unhealthy for" in rec.detail
    assert world.now - t_unhealthy > 5
    world.procs.healthy = True
    rec = run_until(world, sup, "s", lc.READY)
    assert rec.pid != first and rec.port == 9100


def test_a_server_that_recovers_within_the_grace_period_is_left_alone(world):
    add_server(world.store)
    sup = world.sup()
    run_until(world, sup, "s", lc.READY)
    world.procs.healthy = False
    run_until(world, sup, "s", lc.UNHEALTHY)
    world.procs.healthy = True
    run_until(world, sup, "s", lc.READY)
    assert world.procs.stopped == [] and len(world.procs.spawned) == 1


def test_startup_timeout_counts_as_a_failure(world):
    add_server(world.store, startup_timeout=3)
    world.procs.healthy = False
    sup = world.sup()
    rec = run_until(world, sup, "s", lc.BACKOFF, step=0.5)
    assert "not ready after 3s" in rec.last_error
    assert world.procs.stopped  # the hung process was stopped first


def test_a_taken_port_is_reported_with_its_holder_and_not_spawned(world):
    add_server(world.store, restart={"backoff": 1, "max_failures": 2})
    world.procs.port_holders[9100] = "port 9100 on 127.0.0.1 is in use by pid 4242 (nginx)"
    sup = world.sup()
    sup.tick(world.now)
    rec = world.rec("s")
    assert rec.state == lc.BACKOFF and "pid 4242 (nginx)" in rec.last_error
    rec = run_until(world, sup, "s", lc.FAILED)
    assert world.procs.spawned == [] and "pid 4242" in rec.detail


def test_a_new_supervisor_adopts_a_live_server_instead_of_starting_another(world):
    add_server(world.store)
    first = world.sup()
    rec = run_until(world, first, "s", lc.READY)
    second = world.sup()  # the first one died
    for _ in range(20):
        second.tick(world.now)
        world.now += 0.5
    assert len(world.procs.spawned) == 1 and world.rec("s").state == lc.READY
    world.procs.alive.discard(rec.pid)  # not our child: seen only as gone
    second.tick(world.now)
    rec = world.rec("s")
    assert rec.state == lc.BACKOFF and "status unknown" in rec.last_exit
    assert run_until(world, second, "s", lc.READY).pid != rec.pid


def test_restart_policy_never_leaves_an_exited_server_stopped(world):
    add_server(world.store, restart="never")
    sup = world.sup()
    rec = run_until(world, sup, "s", lc.READY)
    world.procs.exit(rec.pid, 0)
    sup.tick(world.now)
    world.now += 60
    sup.tick(world.now)
    rec = world.rec("s")
    assert rec.state == lc.STOPPED and len(world.procs.spawned) == 1


def test_on_failure_policy_restarts_only_failures(world):
    add_server(world.store, restart={"policy": "on-failure", "backoff": 0.1})
    sup = world.sup()
    rec = run_until(world, sup, "s", lc.READY)
    world.procs.exit(rec.pid, 2)
    rec = run_until(world, sup, "s", lc.READY)
    world.procs.exit(rec.pid, 0)
    sup.tick(world.now)
    assert world.rec("s").state == lc.STOPPED and len(world.procs.spawned) == 2
