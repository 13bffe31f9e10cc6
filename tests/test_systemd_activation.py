"""systemd's own socket activation, not a stand-in: `systemd-socket-activate` (Debian's `systemd`
package, which `install.sh --test` installs) binds the address of the `.socket` unit that
`modelctl systemd generate` writes, waits for a client, and starts `modelctl run` with the socket
as fd 3 (LISTEN_FDS, LISTEN_PID), as systemd does for a unit with `Accept=no`. No systemd runs as
the service manager here (CI has no init system): the unit files themselves are checked by
`systemd-analyze verify` in tests/test_systemd.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from modelctl.cluster.systemd import generate_units
from modelctl.profile import load_profile

from .conftest import ROOT, TAG_VAR, http_post, wait_for
from .sentence_fixtures import free_port

LISTEN_SERVER = str(ROOT / "tests" / "servers" / "listen_server.py")
ACTIVATE = shutil.which("systemd-socket-activate")

pytestmark = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed (Debian: apt-get install systemd)")


def test_systemd_socket_activation_starts_an_on_demand_server_at_its_first_client_and_it_exits_when_idle(mc):
    """The client's request waits in the backlog while systemd starts `modelctl run`, which starts
    the server on the socket and is answered; idle for 2 s, `modelctl run` exits 0, so that systemd
    would wait for the next client."""
    server = {"kind": "command", "command": [sys.executable, LISTEN_SERVER, "--load", "0.3"], "socket": "inherit", "notify": True,
              "health": {"http": "/health"}, "start": "on-demand", "idle_timeout": 2}  # fmt: skip
    port = free_port()
    path = mc.profile({"web": {**server, "port": port}}, name="sd")
    units = generate_units(load_profile(path), mc.store)
    listen = re.search(r"ListenStream=(\S+)", units["modelctl-sd-web.socket"]).group(1)
    assert listen == f"127.0.0.1:{port}"
    passed = ("MODELCTL_STATE_DIR", "MODELCTL_PORT_LEASES", TAG_VAR, "PYTHONPATH", "HF_HUB_OFFLINE")
    env_flags = [f"--setenv={k}={mc.env[k]}" for k in passed if k in mc.env]  # systemd passes a unit's Environment= only
    assert ACTIVATE is not None
    argv = [ACTIVATE, f"--listen={listen}", *env_flags, sys.executable, "-m", "modelctl", "run", "web", "-p", str(path)]
    log = open(mc.tmp / "activate.log", "wb")
    activate = subprocess.Popen(argv, env=mc.env, stdout=log, stderr=subprocess.STDOUT, cwd=mc.tmp)
    try:
        wait_for(lambda: b"Listening on" in (mc.tmp / "activate.log").read_bytes(), 10, what="systemd to listen")
        assert mc.store.records() == []  # nothing runs, nothing is recorded, before the first client
        status, body, _ = ThreadPoolExecutor(1).submit(http_post, f"http://{listen}/call", {}, 60).result(60)
        assert status == 200, body
        rec = mc.record("web", "sd")
        assert rec is not None and rec.wish.managed_by == "systemd" and rec.port == port
        assert activate.wait(30) == 0, (mc.tmp / "activate.log").read_text()  # idle for 2 s: it exits
        assert b"Execing" in (mc.tmp / "activate.log").read_bytes()  # systemd's code handed the socket on
    finally:
        if activate.poll() is None:
            activate.terminate()
            activate.wait(30)
        log.close()
        wait_for(lambda: activate.poll() is not None, 10)
