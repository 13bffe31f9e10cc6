"""Restart, backoff, crash loops and health, replayed against a fake clock and fake processes.

No real process runs here: the supervisor's verbs are driven tick by tick (as honcho's tests do).
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
from concurrent.futures import Future
from typing import Any

import pytest

from modelctl.backends.base import Launch
from modelctl.failures import Exit
from modelctl.host.files import DiskError
from modelctl.host.health import ProbeResult
from modelctl.host.identity import ProcessIdentity, identity_of
from modelctl.host.process import INSTANCE_VAR, StopResult, StopTarget
from modelctl.names import ServerRef
from modelctl.profile import parse_server
from modelctl.spec import ServerSpec
from modelctl.state import lifecycle as lc
from modelctl.state.record import ServerRecord
from modelctl.state.store import StateStore
from modelctl.supervisor.core import Handle, InlineExecutor, ProcessControl, Supervisor


class FakePopen:
    def __init__(self, procs: FakeProcs, pid: int):
        self.procs, self.pid = procs, pid

    def poll(self) -> int | None:
        return self.procs.exit_codes.get(self.pid)


class FakeProcs:
    """Processes that live until a test says they exit; probes that answer what the test says.

    It implements modelctl.supervisor.core.ProcessControl; mypy checks it against that protocol (see
    `world`), so a change of the protocol cannot leave it behind.
    """

    def __init__(self) -> None:
        self.pids = itertools.count(1000)
        self.spawned: list[tuple[int, list[str]]] = []
        self.alive: set[int] = set()
        self.exit_codes: dict[int, int] = {}
        self.stopped: list[int] = []
        self.healthy = True
        self.port_holders: dict[int, str] = {}
        self.tokens: dict[str, int] = {}  # the instance token each process carries
        self.die_after_spawn = False  # the supervisor is killed right after its next spawn
        self.says_ready = True  # a process given NOTIFY_SOCKET says READY=1 on it at once

    def spawn(self, launch: Launch, env: dict[str, str], log_fd: int | None, pass_fds: tuple[int, ...] = ()) -> Handle:
        pid = next(self.pids)
        self.spawned.append((pid, list(launch.argv)))
        self.alive.add(pid)
        self.tokens[env[INSTANCE_VAR]] = pid
        if self.says_ready and "NOTIFY_SOCKET" in env:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(b"READY=1", "\0" + env["NOTIFY_SOCKET"][1:])
        if self.die_after_spawn:
            self.die_after_spawn = False
            raise SupervisorKilled(pid)
        return Handle(ProcessIdentity(pid, float(pid)), FakePopen(self, pid))

    def exit_status(self, handle: Handle) -> tuple[bool, Exit]:
        if handle.popen is not None:
            rc = handle.popen.poll()
            return (rc is not None, Exit.of(rc) if rc is not None else Exit())
        return (handle.ident.pid not in self.alive, Exit())

    def is_alive(self, ident: ProcessIdentity) -> bool:
        return ident.pid in self.alive

    def find_leader(self, token: str) -> ProcessIdentity | None:
        pid = self.tokens.get(token)
        return ProcessIdentity(pid, float(pid)) if pid is not None and pid in self.alive else None

    def stop(self, target: StopTarget, timeout: float) -> StopResult:
        pid = target.leader.pid if target.leader else self.tokens.get(target.token or "")
        if pid is not None and pid in self.alive:
            self.stopped.append(pid)
            self.exit(pid, -15)
            return StopResult("terminated")
        return StopResult("not running")

    def descendants(self, leaders: list[ProcessIdentity]) -> dict[int, list[ProcessIdentity]]:
        return {}

    def port_holder(self, port: int, host: str) -> str | None:
        return self.port_holders.get(port)

    def probe(self, spec: ServerSpec, url: str) -> ProbeResult:
        return ProbeResult(self.healthy, "ok" if self.healthy else "503", connected=True)

    def exit(self, pid: int, code: int) -> None:
        self.alive.discard(pid)
        self.exit_codes[pid] = code


class SupervisorKilled(BaseException):
    """The supervisor process dies (OOM killer, kill -9) at this point."""


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

        def sup(self) -> Supervisor:
            procs: ProcessControl = self.procs  # checked by mypy: the fake keeps up with the protocol
            return Supervisor(self.store, clock=lambda: self.now, procs=procs, executor=InlineExecutor())

        def rec(self, name="s"):
            return self.store.load(ServerRef("test", name))

    return World()


def run_until(world, sup, name, state, step=0.25, limit=200):
    for _ in range(limit):
        sup.on_notify(set(sup.notify_fds()))  # what the runner's wait would hand it
        sup.on_pending(set(select.select(sup.watch_fds(), [], [], 0)[0]))
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
    assert rec.pid == world.procs.spawned[0][0] and rec.instance.ready_at is not None


def test_a_crash_restarts_on_the_same_port_after_a_doubling_backoff(world):
    add_server(world.store, restart={"backoff": 1, "backoff_max": 4, "max_failures": 10})
    sup = world.sup()
    delays = []
    for _ in range(4):
        rec = run_until(world, sup, "s", lc.READY)
        world.procs.exit(rec.pid, 1)
        sup.tick(world.now)
        rec = world.rec("s")
        assert rec.state == lc.BACKOFF and rec.history.last_exit == Exit(code=1)
        delays.append(rec.history.next_start_at - world.now)
    assert delays == [1, 2, 4, 4]  # doubling, capped at backoff_max
    rec = run_until(world, sup, "s", lc.READY)
    assert rec.history.restarts == 4
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
    assert world.rec("s").history.next_start_at - world.now == 4
    rec = run_until(world, sup, "s", lc.READY)
    world.now += 61
    sup.tick(world.now)
    world.procs.exit(rec.pid, 1)
    sup.tick(world.now)
    assert world.rec("s").history.next_start_at - world.now == 1


def test_down_during_backoff_means_no_restart(world):
    add_server(world.store, restart={"backoff": 5})
    sup = world.sup()
    rec = run_until(world, sup, "s", lc.READY)
    world.procs.exit(rec.pid, 1)
    sup.tick(world.now)
    assert world.rec("s").state == lc.BACKOFF

    def down(r):  # what `down` writes for a server in backoff
        lc.begin_stop(r, None, "stopped")

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
        lc.begin_stop(r, me, "stopped")

    world.store.update(ServerRef("test", "s"), down)
    world.procs.exit(rec.pid, -15)
    sup.tick(world.now)
    rec = world.rec("s")
    assert rec.state == lc.STOPPING and rec.history.restarts == 0 and rec.history.failures == []


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
    assert "not ready after 3s" in rec.history.last_error
    assert world.procs.stopped  # the hung process was stopped first


def test_a_taken_port_is_reported_with_its_holder_and_not_spawned(world):
    add_server(world.store, restart={"backoff": 1, "max_failures": 2})
    world.procs.port_holders[9100] = "port 9100 on 127.0.0.1 is in use by pid 4242 (nginx)"
    sup = world.sup()
    sup.tick(world.now)
    rec = world.rec("s")
    assert rec.state == lc.BACKOFF and "pid 4242 (nginx)" in rec.history.last_error
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
    assert rec.state == lc.BACKOFF and "status unknown" in rec.history.last_exit.describe()
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


def change_spec(world, name: str = "s", **extra) -> None:
    """What `up` writes when the profile changes a server's spec."""

    def change(r):
        raw = {**r.spec, **extra}
        r.spec, r.fingerprint = raw, parse_server(name, raw, "test.yaml", "test").fingerprint

    world.store.update(ServerRef("test", name), change)


def test_a_spec_change_replaces_the_instance_and_records_no_error(world):
    add_server(world.store)
    sup = world.sup()
    first = run_until(world, sup, "s", lc.READY).pid
    change_spec(world, env={"NEW": "1"})
    rec = run_until(world, sup, "s", lc.READY)
    assert first in world.procs.stopped and rec.pid != first
    assert rec.history.last_error is None  # the port was free after the stop: nothing to report


def test_a_supervisor_killed_right_after_a_spawn_leaves_a_record_the_next_one_adopts(world):
    """The intent (state starting, the instance's token) is saved before the spawn, so the process
    a dying supervisor started is found by its token, adopted, and never started twice."""
    add_server(world.store)
    world.procs.die_after_spawn = True
    with pytest.raises(SupervisorKilled):
        world.sup().tick(world.now)
    ((pid, _),) = world.procs.spawned
    rec = world.rec("s")
    assert rec.state == lc.STARTING and rec.token is not None and rec.pid is None
    second = world.sup()
    rec = run_until(world, second, "s", lc.READY)
    assert len(world.procs.spawned) == 1 and rec.pid == pid and rec.history.restarts == 0


def test_a_start_whose_process_never_came_is_retried_not_lost(world):
    """A supervisor that died between saving the intent and spawning: no process carries the
    token, so the start counts as interrupted and is tried again."""
    add_server(world.store, restart={"backoff": 0.5})
    world.procs.die_after_spawn = True
    with pytest.raises(SupervisorKilled):
        world.sup().tick(world.now)
    world.procs.alive.clear()  # it died too (or never ran)
    second = world.sup()
    rec = run_until(world, second, "s", lc.READY)
    assert len(world.procs.spawned) == 2 and rec.history.restarts == 1
    assert "interrupted" in rec.history.exits[0].line


def test_a_disk_that_refuses_the_intent_means_nothing_is_spawned(world, monkeypatch):
    add_server(world.store)
    sup = world.sup()

    def full(*args, **kwargs):
        raise DiskError(world.store.record_path(ServerRef("test", "s")), OSError(errno.ENOSPC, "No space left on device"))

    monkeypatch.setattr(world.store, "save", full)
    for _ in range(5):
        sup.tick(world.now)
        world.now += 1
    assert world.procs.spawned == [] and world.rec("s").state == lc.STOPPED
    monkeypatch.undo()
    assert run_until(world, sup, "s", lc.READY).pid == world.procs.spawned[0][0]


class StarvedLooks(InlineExecutor):
    """Runs work at once, except the looks at traffic while `starved`: those wait (a thread that a
    busy CPU does not run) until `catch_up`."""

    def __init__(self, look) -> None:
        self.look, self.starved = look, False
        self.waiting: list[tuple[Future, Any, tuple]] = []

    def submit(self, fn, *args):
        if not (self.starved and fn is self.look):
            return super().submit(fn, *args)
        fut: Future = Future()
        self.waiting.append((fut, fn, args))
        return fut

    def catch_up(self) -> None:
        for fut, fn, args in self.waiting:
            fut.set_result(fn(*args))
        self.waiting.clear()


def test_a_busy_on_demand_server_is_not_stopped_on_a_look_older_than_its_idle_timeout(world, monkeypatch):
    """The server is busy all along (one look fell between two of its client's requests), but the
    supervisor's looks at its traffic come late (a starved CPU): when idle_timeout has passed since
    the last look that saw the client, the look under way has not answered yet. The server must not be stopped for idleness before a look taken after
    the idle deadline says it is idle. Fails if an idle stop is decided on a look older than that."""
    from modelctl.supervisor import on_demand

    connected = [1]

    def look(url, port):
        return (None, connected[0])  # the client's connections open now

    monkeypatch.setattr(on_demand, "activity_of", look)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    add_server(world.store, port=port, start="on-demand", socket="inherit", notify=True, idle_timeout=2)
    executor = StarvedLooks(look)
    sup = Supervisor(world.store, clock=lambda: world.now, procs=world.procs, executor=executor)
    run_until(world, sup, "s", lc.IDLE)
    with socket.create_connection(("127.0.0.1", port)):  # a client wakes it
        run_until(world, sup, "s", lc.READY)
        for _ in range(8):  # looks every 0.5 s see the client
            world.now += 0.5
            sup.tick(world.now)
        connected[0] = 0  # one look falls between two of its requests
        world.now += 0.5
        sup.tick(world.now)
        connected[0] = 1
        executor.starved = True
        for _ in range(8):  # 4 s, twice idle_timeout, in which no look answers
            world.now += 0.5
            sup.tick(world.now)
        executor.starved = False
        executor.catch_up()
        for _ in range(4):
            world.now += 0.5
            sup.tick(world.now)
        rec = world.rec("s")
    assert (rec.state, rec.usage.idle_stops) == (lc.READY, 0), (rec.state, rec.detail)
    assert world.procs.stopped == []
    connected[0] = 0  # the client has gone: the server is stopped once idle_timeout has passed
    rec = run_until(world, sup, "s", lc.IDLE, step=0.5, limit=12)
    assert rec.usage.idle_stops == 1 and world.procs.stopped == [world.procs.spawned[0][0]]
