"""The supervisor's periodic chores, each under its own guard: rotating the servers' logs, keeping
their port leases, and reaping the orphans that re-parent to it (it is a child subreaper, so a
daemon that double-forks out of its server lands here: it is attributed to its server by the
token it carries, and reaped when it exits).
"""

from __future__ import annotations

import contextlib
import logging
import os

import psutil

from modelctl.host import logfiles
from modelctl.host.identity import identity_of
from modelctl.host.process import INSTANCE_VAR
from modelctl.names import ServerRef
from modelctl.state import lifecycle as lc
from modelctl.state.leases import PortLeases
from modelctl.state.record import ServerRecord
from modelctl.supervisor.core import Slot, Supervisor

log = logging.getLogger("modelctl.supervisor.chores")

MEMBERS_KEPT = 256


class Chores:
    def __init__(self, sup: Supervisor):
        self.sup = sup
        self.attributed: set[int] = set()

    def run(self) -> None:
        """Each chore under its own guard; `measure` learns the servers' footprints for the budget."""
        for chore in (self.rotate_logs, self.refresh_leases, self.reap_orphans, self.sup.measure):
            try:
                chore()
            except Exception:
                log.exception("housekeeping: %s failed", chore.__name__)

    def _mine(self) -> list[tuple[ServerRecord, Slot]]:
        sup = self.sup
        return [(slot.rec, slot) for slot in sup.slots.values() if slot.rec is not None and slot.rec.wish.managed_by == sup.managed_by]

    def rotate_logs(self) -> None:
        if not self.sup.log_to_files:
            return
        for rec, slot in self._mine():
            spec = slot.spec
            if spec is not None and logfiles.rotate_if_needed(self.sup.store.log_path(rec.ref), spec.log):
                log.info("%s: log rotated", rec.label)

    def refresh_leases(self) -> None:
        held = [(rec.port, rec.ref) for rec, _ in self._mine() if rec.port and rec.wants_running]
        if held:
            PortLeases(self.sup.store.root).refresh(held)

    def reap_orphans(self) -> None:
        """Reap exited orphans; attribute live ones to their server by the token they carry."""
        ours = {inst.pid for slot in self.sup.slots.values() for inst in slot.instances() if inst.is_child}
        for pid in own_children():
            if pid in ours:
                continue  # our own spawned servers are reaped through their Popen
            try:
                child = psutil.Process(pid)
                if child.status() == psutil.STATUS_ZOMBIE:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                    continue
                if pid in self.attributed:
                    continue
                token = child.environ().get(INSTANCE_VAR)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.attributed.add(pid)
            ref = self.adopt_orphan(pid, token)
            if ref is not None:
                log.info("%s: pid %s left its server's process tree; tracked as the server's", ref, pid)
            else:
                log.warning("pid %s re-parented to the supervisor but carries no server's token; left alone", pid)
        self.attributed &= set(own_children())

    def adopt_orphan(self, pid: int, token: str | None) -> ServerRef | None:
        """A process re-parented to us (we are a subreaper): add it to its server's members."""
        if token is None:
            return None
        owner = next((rec for rec, _ in self._mine() if token in (rec.token, rec.successor.token if rec.successor else None)), None)
        ident = identity_of(pid)
        if owner is None or ident is None:
            return None
        member = ident.as_pair()

        def add(r: ServerRecord) -> None:
            members = r.instance.members if r.instance else []
            if member not in members:
                lc.saw_members(r, [*members, member][-MEMBERS_KEPT:])

        self.sup.change(owner.ref, add)
        return owner.ref


def own_children() -> list[int]:
    """This process's children: from /proc/self/task/*/children where the kernel has it (cheap),
    else from a scan of the process table."""
    pids: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids.extend(int(p) for p in f.read().split())
        return pids
    except (OSError, ValueError):
        pass
    with contextlib.suppress(psutil.NoSuchProcess):
        return [p.pid for p in psutil.Process().children()]
    return []
