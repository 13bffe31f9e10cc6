"""Shared fixtures. Every process a test starts carries a tag in its environment, and the test's
finalizer ends every process with that tag — servers, grandchildren, supervisors — even when the
test fails.

The suite runs in parallel (pytest-xdist, `-n` in pyproject.toml): the workers share one
directory of port leases, so two servers of two workers never take the same `auto` port, and a
test marked `alone` (one that measures time, or loads the machine to its limit) runs while no
other test does."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from modelctl.control import Controller
from modelctl.names import ServerRef
from modelctl.state.record import ServerRecord
from modelctl.state.store import StateStore

ROOT = Path(__file__).resolve().parent.parent
TOY_SERVER = str(ROOT / "tests" / "servers" / "toy_server.py")
TAG_VAR = "MODELCTL_TEST_TAG"
_SESSION_TAGS: set[str] = set()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# the programs the test extra installs into the environment (kubectl) come before the machine's
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the slow integration tests (real models, many processes)")


# tests of other files that measure time or wait on short deadlines: they run alone (the `alone`
# marker, without editing those files)
ALONE = frozenset(
    {
        "tests/test_sockets.py::test_status_counts_the_connections_waiting_in_the_backlog",
        "tests/test_sentence_server.py::test_a_query_after_eight_abandoned_bulk_requests_is_answered_at_once",
        # checks that the port refuses after down: another worker's server may take a freed auto port
        "tests/test_trust.py::test_a_daemon_that_escapes_the_group_reparents_to_the_supervisor_and_is_stopped_with_it",
    }
)
# tests that bind, or check free, the embedded default profile's fixed ports (8700-8702): one at a
# time across xdist workers (the `default_ports` marker)
DEFAULT_PORTS = frozenset(
    {
        "tests/test_packaging.py::test_a_wheel_in_a_fresh_venv_runs_up_and_down_on_the_default_profile_from_outside_the_checkout",
        "tests/test_default_profile.py::test_default_profile_serves_embeddings_and_rerank_then_goes_away",
        "tests/test_readme.py::test_the_readme_first_example_runs_on_a_cpu_machine_and_prints_what_it_shows",
        "tests/test_systemd.py::test_units_for_every_example_profile_pass_systemd_analyze_verify[default]",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid in ALONE:
            item.add_marker(pytest.mark.alone)
        if item.nodeid in DEFAULT_PORTS:
            item.add_marker(pytest.mark.default_ports)
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow integration test: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _session_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory that every xdist worker of this run shares (the run's base temp directory);
    without xdist, the session's own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(autouse=True)
def _alone_or_beside_others(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Across xdist workers, a test marked `alone` runs while no other test runs: the others hold
    a shared lock, it an exclusive one. A turnstile that an `alone` test holds while it waits keeps
    new tests from starting meanwhile, so that it is not starved."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    root = _session_root(tmp_path_factory)
    alone = request.node.get_closest_marker("alone") is not None
    with open(root / "tests.turnstile", "a+") as turnstile, open(root / "tests.running", "a+") as running:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(running, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            if not alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(running, fcntl.LOCK_UN)
            if alone:
                fcntl.flock(turnstile, fcntl.LOCK_UN)


@pytest.fixture(autouse=True)
def _default_ports_one_at_a_time(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests marked `default_ports` take the default profile's fixed ports in turn, across workers."""
    if request.node.get_closest_marker("default_ports") is None or not os.environ.get("PYTEST_XDIST_WORKER"):
        yield
        return
    with open(_session_root(tmp_path_factory) / "tests.default-ports", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tagged_processes(tag: str) -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(TAG_VAR) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def is_gone(proc: psutil.Process) -> bool:
    """Dead: gone, or a zombie (dead, waiting for a parent to reap it; init may take a second)."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def with_their_groups(procs: list[psutil.Process]) -> list[psutil.Process]:
    """The processes, their descendants and the members of the groups they lead: a process that
    rewrote its environment (vLLM's engine core sets its title over it) carries no tag to find."""
    found = {p.pid: p for p in procs}
    for proc in procs:
        try:
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    leaders = set(found)
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid not in found and os.getpgid(proc.pid) in leaders:
                found[proc.pid] = proc
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return list(found.values())


def kill_tagged(tag: str) -> list[int]:
    """SIGKILL every process carrying the tag, with its descendants and group; return their pids."""
    procs = with_their_groups(tagged_processes(tag))
    for proc in procs:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(is_gone(p) for p in procs):
        time.sleep(0.01)
    return [p.pid for p in procs]


def wait_for(check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def http_get(url: str, timeout: float = 5.0, headers: dict | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        body, status = e.read(), e.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode("utf-8", "replace")


def http_post(
    url: str, payload: Any, timeout: float = 30.0, headers: dict | None = None, raw: bytes | None = None
) -> tuple[int, Any, dict]:
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body, status, hdrs = resp.read(), resp.status, {k.lower(): v for k, v in resp.headers.items()}
    except urllib.error.HTTPError as e:
        body, status, hdrs = e.read(), e.code, {k.lower(): v for k, v in e.headers.items()}
    try:
        return status, json.loads(body), hdrs
    except ValueError:
        return status, body.decode("utf-8", "replace"), hdrs


def wait_ticks(state_dir: Path, n: int = 2, timeout: float = 10.0) -> None:
    """Wait until the supervisor has gone round its loop n more times (its heartbeat moved n times)."""
    info = state_dir / "supervisor.json"
    seen = [info.stat().st_mtime_ns]

    def moved_n_times() -> bool:
        mtime = info.stat().st_mtime_ns
        if mtime != seen[-1]:
            seen.append(mtime)
        return len(seen) > n

    wait_for(moved_n_times, timeout, interval=0.02, what=f"{n} supervisor ticks")


def wait_text(path: Path, text: str, count: int = 1, timeout: float = 20.0) -> None:
    """Wait until a (log) file holds `text` at least `count` times."""
    wait_for(lambda: path.exists() and path.read_text(errors="replace").count(text) >= count, timeout, what=f"{text!r} in {path}")


class Harness:
    """A state directory, a controller, the CLI, and profile writing, for one test."""

    def __init__(self, tmp_path: Path, tag: str):
        self.tmp = tmp_path
        self.tag = tag
        self.state_dir = tmp_path / "state"
        self.store = StateStore(self.state_dir)
        self.ctl = Controller(self.store)
        self.env = {**os.environ, "MODELCTL_STATE_DIR": str(self.state_dir), TAG_VAR: tag, "COLUMNS": "200"}

    def profile(self, servers: dict, name: str = "test", **top: Any) -> Path:
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump({"servers": servers, **top}, sort_keys=False))
        return path

    @staticmethod
    def toy(*flags: str) -> list[str]:
        return [sys.executable, TOY_SERVER, "--port", "{port}", "--host", "{host}", *flags]

    def cli(self, *args: str, timeout: float = 180, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "modelctl", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.env, **(env or {})},
            cwd=self.tmp,
        )

    def row(self, name: str) -> dict:
        """A server's status row: `profile/server`, or a bare server name that only one profile has."""
        rows = [r.to_json() for r in self.ctl.status()]
        found = [r for r in rows if r["id"] == name] or [r for r in rows if r["name"] == name]
        assert len(found) == 1, f"{name!r} matches {[r['id'] for r in found]}"
        return found[0]

    @staticmethod
    def ref(name: str, profile: str = "test") -> ServerRef:
        return ServerRef(profile, name)

    def record(self, name: str, profile: str = "test") -> ServerRecord | None:
        rec = self.store.load(ServerRef(profile, name))
        assert rec is None or isinstance(rec, ServerRecord), rec
        return rec

    def wait_state(self, name: str, state: str, timeout: float = 30.0) -> dict:
        return wait_for(lambda: (r := self.row(name))["state"] == state and r, timeout, what=f"{name} to be {state}")


@pytest.fixture
def mc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    tag = uuid.uuid4().hex
    _SESSION_TAGS.add(tag)
    # processes started from this test process (supervisors, servers) inherit the tag too
    monkeypatch.setenv(TAG_VAR, tag)
    h = Harness(tmp_path, tag)
    monkeypatch.setenv("MODELCTL_STATE_DIR", str(h.state_dir))
    yield h
    pid_file = h.state_dir / "supervisor.json"
    if pid_file.exists():
        try:
            info = json.loads(pid_file.read_text())
            proc = psutil.Process(info["pid"])
            if abs(proc.create_time() - info["create_time"]) < 0.05:  # never a stranger with a reused pid
                proc.kill()
        except (psutil.NoSuchProcess, ValueError, KeyError, TypeError, OSError):
            pass
    kill_tagged(tag)


@pytest.fixture(scope="session", autouse=True)
def _port_leases_of_this_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Servers of this session lease their ports in a directory of the session, shared by all its
    tests, not in the machine's. A test's records outlive it (pytest keeps the last runs' temp
    directories), and a record that still wants its server keeps that port leased: in the machine's
    directory, a few hundred such leases would hold the default port range against real servers
    and later test runs."""
    leases = _session_root(tmp_path_factory) / "port-leases"  # one for every xdist worker
    leases.mkdir(exist_ok=True)
    os.chmod(leases, 0o1777)
    patch = pytest.MonkeyPatch()
    patch.setenv("MODELCTL_PORT_LEASES", str(leases))
    yield leases
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def _no_orphans_left():
    """A last sweep: anything still carrying a test tag of this session's tests is ended."""
    yield
    me = os.getpid()
    tagged = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(TAG_VAR) in _SESSION_TAGS:
                tagged.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    for proc in with_their_groups(tagged):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
