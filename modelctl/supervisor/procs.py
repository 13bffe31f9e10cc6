"""What the supervisor does to processes, and where slow work runs: the `ProcessControl` protocol
(real processes, or a test's fake), a process handle, and the executors for probes and stops."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Protocol

from modelctl.backends.base import Launch
from modelctl.failures import Exit
from modelctl.host.engine_metrics import Scrape, scrape
from modelctl.host.health import ProbeResult, probe
from modelctl.host.identity import ProcessIdentity, is_alive
from modelctl.host.ports import describe_port_in_use, is_port_free
from modelctl.host.process import StopResult, StopTarget, descendants_by_leader, leader_by_token, spawn_detached, stop_processes
from modelctl.host.sockets import established
from modelctl.spec import ServerSpec


@dataclass
class Handle:
    """A running server process: our child (popen) or adopted from an earlier supervisor."""

    ident: ProcessIdentity
    popen: Any = None
    pidfd: int | None = None  # readable once an adopted process exits (Linux pidfd_open)


class ProcessControl(Protocol):
    """What the supervisor does to processes, ports and servers; tests pass a fake."""

    def spawn(self, launch: Launch, env: dict[str, str], log_fd: int | None, pass_fds: tuple[int, ...] = ()) -> Handle: ...

    def exit_status(self, handle: Handle) -> tuple[bool, Exit]: ...

    def is_alive(self, ident: ProcessIdentity) -> bool: ...

    def find_leader(self, token: str) -> ProcessIdentity | None: ...

    def stop(self, target: StopTarget, timeout: float) -> StopResult: ...

    def port_holder(self, port: int, host: str) -> str | None: ...

    def probe(self, spec: ServerSpec, url: str) -> ProbeResult: ...

    def descendants(self, leaders: list[ProcessIdentity]) -> dict[int, list[ProcessIdentity]]: ...


class RealProcesses:
    """The real processes, ports and probes."""

    def spawn(self, launch: Launch, env: dict[str, str], log_fd: int | None, pass_fds: tuple[int, ...] = ()) -> Handle:
        popen, ident = spawn_detached(launch.argv, env, log_fd, cwd=launch.cwd, pass_fds=pass_fds)
        return Handle(ident, popen)

    def exit_status(self, handle: Handle) -> tuple[bool, Exit]:
        """(exited, how); the exit is unknown (neither code nor signal) for a process not our child."""
        if handle.popen is not None:
            rc = handle.popen.poll()
            return (rc is not None, Exit.of(rc) if rc is not None else Exit())
        return (not is_alive(handle.ident), Exit())

    def is_alive(self, ident: ProcessIdentity) -> bool:
        return is_alive(ident)

    def find_leader(self, token: str) -> ProcessIdentity | None:
        return leader_by_token(token)

    def stop(self, target: StopTarget, timeout: float) -> StopResult:
        return stop_processes(target, timeout)

    def port_holder(self, port: int, host: str) -> str | None:
        return None if is_port_free(port, host) else describe_port_in_use(port, host)

    def probe(self, spec: ServerSpec, url: str) -> ProbeResult:
        # on a held socket the kernel's backlog answers a connect: a TCP probe needs the server's reply
        return probe(spec.health, url, reply=spec.socket)

    def descendants(self, leaders: list[ProcessIdentity]) -> dict[int, list[ProcessIdentity]]:
        return descendants_by_leader(leaders)


class InlineExecutor:
    """Runs submitted work at once; for tests that want a deterministic supervisor."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as e:
            fut.set_exception(e)
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


class ThreadPerJob:
    """Each job in a thread of its own: stops never wait for each other, nor for probes."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        fut: Future[Any] = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as e:
                fut.set_exception(e)

        threading.Thread(target=run, name="modelctl-stop", daemon=True).start()
        return fut

    def shutdown(self, wait: bool = True) -> None:
        pass


def activity_of(url: str, port: int | None) -> tuple[Scrape | None, int | None]:
    """What a server says of its traffic (its /metrics), else how many clients are connected."""
    scraped = scrape(url)
    if scraped is not None:
        return scraped, None
    return None, established(port) if port else None


def open_pidfd(ident: ProcessIdentity) -> int | None:
    """A pidfd that becomes readable when the process exits (Linux 5.3+), checked against its identity."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        fd: int = pidfd_open(ident.pid)
    except OSError:
        return None
    if not is_alive(ident):  # the pid was reused between our check and the open
        os.close(fd)
        return None
    return fd


def close_pidfd(handle: Handle) -> None:
    if handle.pidfd is not None:
        try:
            os.close(handle.pidfd)
        except OSError:
            pass
        handle.pidfd = None
