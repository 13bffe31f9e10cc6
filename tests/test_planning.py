"""`up` plans without the state lock: what takes time (GPU discovery, port probes) happens before
it, so another command waiting for the lock never waits for them (guarantee 4)."""

from __future__ import annotations

import threading
import time

from modelctl import control
from modelctl.host.ports import is_port_free
from modelctl.profile import load_profile


def test_up_probes_ports_without_holding_the_state_lock(mc, monkeypatch):
    """Each port probe of `up` takes 3 s here; meanwhile the state lock is free within 1 s.
    Fails if the ports are allocated (probed) under the state lock."""
    probing = threading.Event()
    real_allocate = control.allocate_ports

    def slow_allocate(requests, port_range, held_by_records, leases=None, is_free=is_port_free):
        def slow_probe(port: int, host: str) -> bool:
            probing.set()
            time.sleep(3)
            return is_free(port, host)

        return real_allocate(requests, port_range, held_by_records, leases, slow_probe)

    monkeypatch.setattr(control, "allocate_ports", slow_allocate)
    monkeypatch.setattr(control, "ensure_supervisor", lambda store: 0)  # no supervisor: only the planning is looked at
    path = mc.profile({"web": {"kind": "command", "command": mc.toy()}})
    up = threading.Thread(target=mc.ctl.up, args=(load_profile(path),))
    up.start()
    try:
        assert probing.wait(10), "up never probed a port"
        t0 = time.monotonic()
        with mc.store.locked(timeout=1.0):
            pass
        assert time.monotonic() - t0 < 1.0
    finally:
        up.join(30)
    assert mc.record("web").port is not None
