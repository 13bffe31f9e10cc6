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

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import psutil

from modelctl.host.identity import CREATE_TIME_SLACK, ProcessIdentity, is_alive
from modelctl.host.ports import describe_port_in_use, is_port_free

INSTANCE_VAR = "MODELCTL_INSTANCE"
# how often a stop looks again for processes that carry the token (reading every process's
# environment costs a few ms per hundred processes)
_RESCAN_SECONDS = 0.5


@dataclass(frozen=True)
class StopTarget:
    """Everything that proves which processes are one server instance's."""

    label: str
    leader: ProcessIdentity | None
    token: str | None = None
    members: tuple[ProcessIdentity, ...] = ()
    port: int | None = None
    host: str = "127.0.0.1"
    leader_first: bool = False  # SIGTERM the leader alone, the others once it is gone (Backend.stops_leader_first)

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
    argv: Sequence[str], env: Mapping[str, str], log_fd: int | None, cwd: str | None = None, pass_fds: Sequence[int] = ()
) -> tuple[subprocess.Popen[bytes], ProcessIdentity]:
    """Start argv in a new session (its own process group) with stdout and stderr on log_fd, and
    no other fd of ours but `pass_fds` (a held listening socket).

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
        pass_fds=tuple(pass_fds),
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


def leader_by_token(token: str) -> ProcessIdentity | None:
    """The leader of an instance that nobody recorded yet (its supervisor died right after the
    spawn): the process that carries the token and leads its own session, as spawn_detached starts it."""
    uid = os.geteuid()
    for proc in psutil.process_iter(["uids"]):
        try:
            if uid != 0 and proc.info["uids"] is not None and proc.info["uids"].real != uid:
                continue
            if os.getsid(proc.pid) == proc.pid and _carries(proc, token) and _live(proc):
                return ProcessIdentity(proc.pid, proc.create_time())
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess, KeyError, AttributeError):
            continue
    return None


@dataclass(frozen=True)
class Usage:
    """The live processes of one instance (its group and its descendants) and their resident memory."""

    pids: tuple[int, ...]
    rss: int


@dataclass(frozen=True)
class ProcRow:
    """One process as /proc/PID/stat tells it."""

    ppid: int
    pgid: int
    rss: int  # bytes
    create_time: float  # as psutil computes it: boot time + start ticks / ticks per second
    zombie: bool


def process_table() -> dict[int, ProcRow]:
    """Every process, read straight from /proc/*/stat: one cheap pass for all the servers'
    memory and descendants (psutil's per-process objects cost ten times more). psutil elsewhere."""
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
        boot = psutil.boot_time()
    except OSError:
        return _table_from_psutil()
    table = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        # the command name is in parentheses and may hold spaces: fields follow the last ")"
        fields = raw[raw.rfind(b")") + 2 :].split()
        try:
            table[pid] = ProcRow(
                ppid=int(fields[1]),
                pgid=int(fields[2]),
                rss=int(fields[21]) * _PAGE,
                create_time=boot + int(fields[19]) / _TICKS,
                zombie=fields[0] == b"Z",
            )
        except (IndexError, ValueError):
            continue
    return table


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _table_from_psutil() -> dict[int, ProcRow]:
    table = {}
    for proc in psutil.process_iter(["ppid", "memory_info", "status", "create_time"]):
        info = proc.info
        try:
            pgid = os.getpgid(proc.pid)
        except OSError:
            continue
        rss = info["memory_info"].rss if info.get("memory_info") is not None else 0
        table[proc.pid] = ProcRow(
            info.get("ppid") or 0, pgid, rss, info.get("create_time") or 0.0, info.get("status") == psutil.STATUS_ZOMBIE
        )
    return table


def alive_in(table: dict[int, ProcRow], ident: ProcessIdentity | None) -> bool:
    """is_alive, from a table already read."""
    if ident is None:
        return False
    row = table.get(ident.pid)
    return row is not None and not row.zombie and abs(row.create_time - ident.create_time) <= CREATE_TIME_SLACK


def _children_of(table: dict[int, ProcRow]) -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for pid, row in table.items():
        if not row.zombie:
            children.setdefault(row.ppid, []).append(pid)
    return children


def usage_by_leader(
    leaders: list[ProcessIdentity], table: dict[int, ProcRow] | None = None, members: dict[int, list[ProcessIdentity]] | None = None
) -> dict[int, Usage]:
    """Each live leader's group and descendants, and its live recorded `members` (daemons that left
    the tree) with theirs, with their memory, from one read of the process table."""
    table = process_table() if table is None else table
    live = [ident.pid for ident in leaders if alive_in(table, ident)]
    if not live:
        return {}
    children = _children_of(table)
    by_group: dict[int, list[int]] = {}
    for pid, row in table.items():
        if not row.zombie:
            by_group.setdefault(row.pgid, []).append(pid)
    out = {}
    for leader in live:
        group = set(by_group.get(leader, []))
        todo = [leader, *(m.pid for m in (members or {}).get(leader, ()) if alive_in(table, m))]
        while todo:
            pid = todo.pop()
            group.add(pid)
            todo.extend(c for c in children.get(pid, []) if c not in group)
        out[leader] = Usage(tuple(sorted(group)), sum(table[p].rss for p in group if p in table))
    return out


def _signal(procs: Iterable[psutil.Process], sig: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil checks the create_time before signalling: no reuse race
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def stop_processes(target: StopTarget, timeout: float, poll: float = 0.05, port_wait: float = 3.0) -> StopResult:
    """SIGTERM every provable member (or, leader_first, the leader alone until it is gone), wait
    up to `timeout`, SIGKILL what is left; return when none is alive. Then the port must be free:
    if it still answers, say who holds it.
    """
    members = provable_members(target)
    result = StopResult("not running")
    if members:
        leader = next((p for p in members if target.leader is not None and p.pid == target.leader.pid), None)
        first = [leader] if target.leader_first and leader is not None else members
        _signal(first, signal.SIGTERM)
        termed = {p.pid for p in first}
        result.how = "terminated"
        known = {p.pid: p for p in members}
        deadline = time.monotonic() + timeout
        kill_deadline = deadline + 10.0
        next_scan = time.monotonic() + _RESCAN_SECONDS
        while True:
            now = time.monotonic()
            if now >= next_scan:  # children forked while shutting down carry the token too
                for p in provable_members(target):
                    known.setdefault(p.pid, p)
                next_scan = now + _RESCAN_SECONDS
            alive = [p for p in known.values() if _live(p)]
            if not alive:
                break
            if now >= deadline:
                result.how = "killed"
                _signal(alive, signal.SIGKILL)
                if now >= kill_deadline:
                    raise RuntimeError(f"{target.label}: processes survived SIGKILL: {[p.pid for p in alive]}")
            elif leader is None or not target.leader_first or not _live(leader):
                late = [p for p in alive if p.pid not in termed]
                _signal(late, signal.SIGTERM)
                termed.update(p.pid for p in late)
            time.sleep(poll)
    if target.port:
        result.port_holder = wait_port_released(target.port, target.host, port_wait)
    return result


def wait_port_released(port: int, host: str, timeout: float) -> str | None:
    """None once host:port can be bound; else, after `timeout`, a description of its holder."""
    deadline = time.monotonic() + timeout
    while True:
        if is_port_free(port, host):
            return None
        if time.monotonic() >= deadline:
            return describe_port_in_use(port, host)
        time.sleep(0.05)


def descendants_by_leader(leaders: list[ProcessIdentity]) -> dict[int, list[ProcessIdentity]]:
    """Each live leader's live descendants, from one read of the process table for all of them."""
    table = process_table()
    live = [ident.pid for ident in leaders if alive_in(table, ident)]
    if not live:
        return {}
    children = _children_of(table)
    out: dict[int, list[ProcessIdentity]] = {}
    for leader in live:
        found, todo = [], list(children.get(leader, []))
        while todo:
            pid = todo.pop()
            found.append(ProcessIdentity(pid, table[pid].create_time))
            todo.extend(children.get(pid, []))
        out[leader] = found
    return out


def set_child_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_CHILD_SUBREAPER = 36
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False
