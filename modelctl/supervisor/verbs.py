"""What the supervisor's parts may ask of its core: the health watch, on-demand servers and
replacements reach it through this protocol, typed, and never import the core itself."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from modelctl.failures import Exit, Failure
from modelctl.host.identity import ProcessIdentity
from modelctl.host.process import StopTarget
from modelctl.host.sockets import Listener
from modelctl.names import ServerRef
from modelctl.spec import ServerSpec
from modelctl.state.record import ServerRecord
from modelctl.state.store import StateStore
from modelctl.supervisor.held import HeldSockets
from modelctl.supervisor.instance import InstanceRuntime
from modelctl.supervisor.procs import ProcessControl
from modelctl.supervisor.slot import AfterStop, Server, Slot


class Core(Protocol):
    store: StateStore
    procs: ProcessControl
    held: HeldSockets
    slots: dict[ServerRef, Slot]
    me: ProcessIdentity | None
    log: logging.Logger
    log_to_files: bool
    clock: Callable[[], float]

    def submit(self, slot: Slot, fn: Callable[..., Any], *args: Any, quiet: Callable[[Any], bool] | None = None) -> Future[Any]: ...

    def crash(self, srv: Server, now: float, exit: Exit | None, failure: Failure) -> None: ...

    def start(self, srv: Server, now: float, wake: str | None = None) -> None: ...

    def spawn(self, srv: Server, token: str, listener: Listener | None, now: float) -> InstanceRuntime | Failure: ...

    def hold_socket(self, srv: Server, keep_old: bool) -> Listener | str: ...

    def uses_socket(self, srv: Server) -> bool: ...

    def save_if_changed(self, rec: ServerRecord, slot: Slot, now: float) -> None: ...

    def begin_stop(
        self,
        rec: ServerRecord,
        slot: Slot,
        spec: ServerSpec | None,
        after: AfterStop,
        now: float,
        failure: Failure | None = None,
        exit: Exit | None = None,
        evicted_for: str | None = None,
    ) -> None: ...

    def replace_stop_first(self, srv: Server, now: float) -> None: ...

    def retire(self, srv_label: str, slot: Slot, target: StopTarget, inst: InstanceRuntime | None, timeout: float) -> None: ...

    def retire_successor(self, srv: Server | None, rec: ServerRecord, slot: Slot, now: float) -> None: ...

    def url_of(self, srv: Server) -> str: ...

    def overlap_fits(self, srv: Server) -> bool: ...
