"""Processes: start detached in their own session, know them by pid + create_time, stop whole groups.

modelctl signals a process only with proof that it belongs to the server being stopped:
- the server's leader, alive with the recorded identity (pid + create_time), and, while it
  lives, its process group and its descendants;
- any process carrying the instance's token in its environment (MODELCTL_INSTANCE, set at spawn
  and inherited by every descendant, including ones that left the group or outlived the leader);
- descendants recorded while the leader lived (pid + create_time), for ones that cleared their
  environment.
A pid or process group id alone is never proof: after a reboot or pid reuse it names a stranger.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import psutil

# create_time is rounded differently by different readers; within this it is the same process
_CREATE_TIME_SLACK = 0.05
INSTANCE_VAR = "MODELCTL_INSTANCE"
# how often a stop looks again for processes that carry the token (reading every process's
# environment costs a few ms per hundred processes)
_RESCAN_SECONDS = 0.5


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as modelctl knows it: a pid alone can be reused, pid + create_time cannot."""

    pid: int
    create_time: float


def identity_of(pid: int) -> ProcessIdentity | None:
    try:
        return ProcessIdentity(pid, psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _same(proc: psutil.Process, create_time: float) -> bool:
    return abs(proc.create_time() - create_time) <= _CREATE_TIME_SLACK


def is_alive(ident: ProcessIdentity | None) -> bool:
    """True if this very process (not a reuse of its pid) is alive and not a zombie."""
    if ident is None:
        return False
    try:
        proc = psutil.Process(ident.pid)
        return _same(proc, ident.create_time) and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@dataclass(frozen=True)
class StopTarget:
    """Everything that proves which processes are one server instance's."""

    label: str
    leader: ProcessIdentity | None
    token: str | None = None
    members: tuple[ProcessIdentity, ...] = ()
    port: int | None = None
    host: str = "127.0.0.1"

    @property
    def empty(self) -> bool:
        return self.leader is None and self.token is None and not self.members


@dataclass
class StopResult:
    how: str  # terminated | killed | not running
    port_holder: str | None = None  # the port still answers: who holds it

    @property
    def ok(self) -> bool:
        return self.port_holder is None


def spawn_detached(
    argv: Sequence[str], env: Mapping[str, str], log_fd: int | None, cwd: str | None = None
) -> tuple[subprocess.Popen[bytes], ProcessIdentity]:
    """Start argv in a new session (its own process group) with stdout and stderr on log_fd.

    With no log_fd the output goes where ours goes (the journal, under systemd).
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log_fd,
        stderr=subprocess.STDOUT if log_fd is not None else None,
        env=dict(env),
        cwd=cwd,
        start_new_session=True,
        close_fds=True,
    )
    try:
        created = psutil.Process(proc.pid).create_time()
    except psutil.NoSuchProcess:  # exited (and is a zombie we have not reaped yet): still ours
        created = time.time()
    return proc, ProcessIdentity(proc.pid, created)


def _carries(proc: psutil.Process, token: str) -> bool:
    try:
        return proc.environ().get(INSTANCE_VAR) == token
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return False


def _live(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def live_members(target: StopTarget) -> list[psutil.Process]:
    """The running leader, its group and its descendants (cheap: no environment scan).

    While the leader lives no other process can take its pid, so its pgid is still its group.
    """
    if not is_alive(target.leader):
        return []
    assert target.leader is not None
    members: dict[int, psutil.Process] = {}
    try:
        leader = psutil.Process(target.leader.pid)
        members[leader.pid] = leader
        for child in leader.children(recursive=True):
            members[child.pid] = child
    except psutil.NoSuchProcess:
        return []
    for proc in psutil.process_iter():
        if proc.pid in members:
            continue
        try:
            if os.getpgid(proc.pid) == target.leader.pid:
                members[proc.pid] = proc
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            continue
    return [p for p in members.values() if _live(p)]


def provable_members(target: StopTarget, scan_environments: bool = True) -> list[psutil.Process]:
    """Every live process that is provably this instance's (see the module docstring)."""
    members = {p.pid: p for p in live_members(target)}
    for ident in target.members:
        if ident.pid not in members and is_alive(ident):
            members[ident.pid] = psutil.Process(ident.pid)
    if target.token and scan_environments:
        uid = os.geteuid()
        for proc in psutil.process_iter(["uids"]):
            if proc.pid in members or proc.pid == os.getpid():
                continue
            try:
                if uid != 0 and proc.info["uids"] is not None and proc.info["uids"].real != uid:
                    continue  # another user's: we could not signal it anyway
            except (KeyError, AttributeError):
                continue
            if _carries(proc, target.token):
                members[proc.pid] = proc
    return [p for p in members.values() if _live(p)]


def group_usage(target: StopTarget) -> tuple[list[int], int]:
    """The live members' pids and their resident memory, summed (a model lives in the children too)."""
    pids, total = [], 0
    for proc in live_members(target):
        try:
            total += proc.memory_info().rss
            pids.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids, total


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil checks the create_time before signalling: no reuse race
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def stop_processes(target: StopTarget, timeout: float, poll: float = 0.05, port_wait: float = 3.0) -> StopResult:
    """SIGTERM every provable member, wait up to `timeout`, SIGKILL what is left; return when none
    is alive. Then the port must be free: if it still answers, say who holds it.
    """
    members = provable_members(target)
    result = StopResult("not running")
    if members:
        _signal(members, signal.SIGTERM)
        result.how = "terminated"
        known = {p.pid: p for p in members}
        deadline = time.monotonic() + timeout
        kill_deadline = deadline + 10.0
        next_scan = time.monotonic() + _RESCAN_SECONDS
        while True:
            now = time.monotonic()
            if now >= next_scan:  # children forked while shutting down carry the token too
                for p in provable_members(target):
                    if p.pid not in known:
                        known[p.pid] = p
                        _signal([p], signal.SIGTERM if now < deadline else signal.SIGKILL)
                next_scan = now + _RESCAN_SECONDS
            alive = [p for p in known.values() if _live(p)]
            if not alive:
                break
            if now >= deadline:
                result.how = "killed"
                _signal(alive, signal.SIGKILL)
                if now >= kill_deadline:
                    raise RuntimeError(f"{target.label}: processes survived SIGKILL: {[p.pid for p in alive]}")
            time.sleep(poll)
    if target.port:
        result.port_holder = wait_port_released(target.port, target.host, port_wait)
    return result


def wait_port_released(port: int, host: str, timeout: float) -> str | None:
    """None once host:port can be bound; else, after `timeout`, a description of its holder."""
    from modelctl.ports import describe_port_in_use, is_port_free

    deadline = time.monotonic() + timeout
    while True:
        if is_port_free(port, host):
            return None
        if time.monotonic() >= deadline:
            return describe_port_in_use(port, host)
        time.sleep(0.05)


def descendants(ident: ProcessIdentity) -> list[ProcessIdentity]:
    """The leader's live descendants, as identities (recorded so that escapees can be proven ours)."""
    if not is_alive(ident):
        return []
    out = []
    try:
        for child in psutil.Process(ident.pid).children(recursive=True):
            try:
                out.append(ProcessIdentity(child.pid, child.create_time()))
            except psutil.NoSuchProcess:
                continue
    except psutil.NoSuchProcess:
        return []
    return out


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "exited (status unknown: not a child of this supervisor)"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def describe_process(pid: int) -> str:
    """'pid 123 (nginx: master process)' for messages."""
    try:
        proc = psutil.Process(pid)
        cmd = " ".join(proc.cmdline()) or proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return f"pid {pid}"
    if len(cmd) > 80:
        cmd = cmd[:77] + "..."
    return f"pid {pid} ({cmd})"


def set_child_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init (Linux prctl)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
