"""One instance of a server as the supervisor runs it, the current one and a successor alike.

An `InstanceRuntime` owns what the supervisor holds for one run of a server: its process handle (a
child's Popen, or an adopted process's pidfd), the socket on which it says READY=1 and whether it
said so, and the listener it was started on. A server has a current instance and, while it is
replaced without a gap, a successor: two objects of one class, so nothing is copied between them
by hand; a successor that takes over simply becomes the current one.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from modelctl.backends.base import Launch
from modelctl.failures import Exit
from modelctl.host.identity import ProcessIdentity
from modelctl.host.process import INSTANCE_VAR
from modelctl.host.sockets import Listener, NotifySocket
from modelctl.spec import ServerSpec
from modelctl.supervisor.procs import Handle, ProcessControl, close_pidfd, open_pidfd

log = logging.getLogger("modelctl.supervisor.instance")


class InstanceRuntime:
    """A running instance: its process, its readiness, and the socket it serves from."""

    def __init__(self, token: str, handle: Handle, notify: NotifySocket | None = None, listener: Listener | None = None):
        self.token = token
        self.handle = handle
        self.notify = notify  # where it says READY=1 (None: it does not, or no held socket)
        self.listener = listener  # the held socket it was started on (its address)
        self.ready_said = False
        self.facts: dict[str, str] = {}  # what it said it runs (X_MODELCTL_ fields beside READY=1)

    @classmethod
    def adopt(cls, token: str, ident: ProcessIdentity, listener: Listener | None, ready: bool) -> InstanceRuntime:
        """A live instance that an earlier supervisor started: watched by its pidfd; its notify socket
        is taken back from it, so that a READY=1 it said meanwhile is not lost."""
        notify = None if ready else NotifySocket.take_from_process(ident.pid, token)
        inst = cls(token, Handle(ident, None, open_pidfd(ident)), notify, listener)
        inst.ready_said = ready
        if notify is not None:
            inst.hear({notify.fileno()})
        return inst

    @property
    def ident(self) -> ProcessIdentity:
        return self.handle.ident

    @property
    def pid(self) -> int:
        return self.handle.ident.pid

    @property
    def is_child(self) -> bool:
        return self.handle.popen is not None

    def exited(self, procs: ProcessControl) -> tuple[bool, Exit]:
        return procs.exit_status(self.handle)

    def child_exited(self) -> bool:
        """Our child has exited (SIGCHLD woke us); False for adopted processes (their pidfd tells)."""
        return self.handle.popen is not None and self.handle.popen.poll() is not None

    @property
    def pidfd(self) -> int | None:
        return self.handle.pidfd

    @property
    def notify_fd(self) -> int | None:
        return self.notify.fileno() if self.notify is not None else None

    def hear(self, fds: set[int]) -> bool:
        """Read what it said on its notify socket if `fds` says something waits; True on READY=1."""
        if self.notify is None or self.notify.fileno() not in fds:
            return False
        said = self.notify.read()
        self.facts.update(said.facts)
        if said.ready and not self.ready_said:
            self.ready_said = True
            return True
        return False

    def reap(self) -> None:
        """Collect our child's exit status, if it is our child."""
        if self.handle.popen is not None:
            self.handle.popen.poll()

    def close(self) -> None:
        """Let go of what we hold for it (its pidfd, its notify socket); the process is untouched."""
        close_pidfd(self.handle)
        if self.notify is not None:
            self.notify.close()
            self.notify = None


def server_environment(
    spec: ServerSpec,
    launch: Launch,
    port: int | None,
    gpus: list[int],
    instance: str,
    cache_dir: Path | str = ".",
    state_dir: Path | None = None,
) -> dict[str, str]:
    """The environment a server starts with: ours, the kind's, the profile's, its GPUs and its token."""
    env = dict(os.environ)
    for inherited in (INSTANCE_VAR, "NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(inherited, None)  # ours (under systemd, modelctl run's own) are never the server's
    env.update(launch.env)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    env["MODELCTL_SERVER"] = str(spec.ref)
    env.setdefault("MODELCTL_CACHE_DIR", str(cache_dir))
    if port is not None:
        env["MODELCTL_PORT"] = str(port)
    if state_dir is not None:
        env["MODELCTL_STATE_DIR"] = str(Path(state_dir).resolve())  # where the gateway reads the records
    env.update(spec.env)  # the profile has the last word...
    env[INSTANCE_VAR] = instance  # ...but for the proof that a process is this instance's
    return env
