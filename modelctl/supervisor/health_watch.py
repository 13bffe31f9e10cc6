"""The health watch: warm-up, preparation and hung servers, for one server at a time.

While a server starts, its probe runs every STARTUP_PROBE_SECONDS until it passes; then the
kind's preparation runs (an Ollama pull or import, a preload), and the server is ready. Once
ready, the probe runs every `health.interval`; a server unhealthy for longer than `health.grace`
is restarted (hung, not dead). A start past `startup_timeout` is a failure; the time a probe
waited for a free worker is not held against it, so a busy supervisor never kills a server that
was simply not looked at.
"""

from __future__ import annotations

import math
import time
from typing import Any

from modelctl.backends import get_backend
from modelctl.failures import Failure
from modelctl.host.health import ProbeResult
from modelctl.sanitize import one_line
from modelctl.spec import ServerSpec
from modelctl.state import lifecycle as lc
from modelctl.supervisor.slot import Server
from modelctl.supervisor.verbs import Core

STARTUP_PROBE_SECONDS = 0.1
UNHEALTHY_PROBE_SECONDS = 1.0
PROBE_GRID_SECONDS = 0.25


def on_grid(when: float) -> float:
    """Probes of ready servers fall on a common grid, so that one wake-up of the supervisor
    collects several of them: at most PROBE_GRID_SECONDS later than asked."""
    return math.ceil(when / PROBE_GRID_SECONDS) * PROBE_GRID_SECONDS


class HealthWatch:
    startup_probe_seconds = STARTUP_PROBE_SECONDS

    def __init__(self, sup: Core):
        self.sup = sup  # the supervisor: its procs, log, submit() and crash()

    def check(self, srv: Server, now: float) -> None:
        self.watch(srv, now)
        self.describe(srv)

    def watch(self, srv: Server, now: float) -> None:
        if self.collect_preparation(srv, now):
            return
        current = srv.slot.current
        if srv.rec.state == lc.STARTING and current is not None and current.notify is not None:
            self.await_ready(srv, now)
            return
        self.collect_probe(srv, now)
        if srv.rec.state not in lc.ALIVE or srv.slot.stop is not None:
            return
        if self.enforce_timeouts(srv, now):
            return
        self.schedule_probe(srv, now)

    # ------------------------------------------------------------------ what it runs
    def describe(self, srv: Server) -> None:
        """Once per ready instance (a start or a takeover): what it said beside READY=1 on its own
        notify socket (a backend it chose) goes into the record's facts for status."""
        rec, health, current = srv.rec, srv.slot.health, srv.slot.current
        if health.described or rec.state != lc.READY or current is None or not current.facts:
            return
        health.described = True
        said = get_backend(srv.spec.kind).describe(srv.spec, current.facts)
        if said:
            rec.info = {**rec.info, **said}

    # ------------------------------------------------------------------ preparation
    def collect_preparation(self, srv: Server, now: float) -> bool:
        """True while a preparation (pull, import, preload) runs or just ended."""
        rec, slot, health = srv.rec, srv.slot, srv.slot.health
        if health.prepare is None:
            return False
        if health.progress is not None:
            rec.progress = dict(health.progress)
        if not health.prepare.done():
            self.enforce_timeouts(srv, now)
            slot.wake_at(now + 1.0)  # progress to show
            return True
        fut, health.prepare = health.prepare, None
        rec.progress = None
        try:
            rec.info = fut.result() or {}
        except Exception as e:
            self.sup.log.error("%s: preparation failed: %s", rec.label, e)
            # what a preparation says (no such model, unsupported file) does not heal by retrying
            self.sup.crash(srv, now, None, Failure("prepare", one_line(str(e)), False))
            return True
        health.prepared = True
        rec.startup["prepare"] = round(now - (health.prepare_started or now), 3)
        self.mark_ready(srv, now)
        return True

    # ------------------------------------------------------------------ READY=1
    def await_ready(self, srv: Server, now: float) -> None:
        """A server on a held socket is ready when it says so: a probe through the socket could be
        answered by nobody yet (it waits in the backlog) or by another instance."""
        if srv.slot.current is not None and srv.slot.current.ready_said:
            srv.rec.startup["port_open"] = 0.0  # held all along
            self.apply_startup_probe(srv, ProbeResult(True, "READY=1", connected=True), now)
            return
        srv.rec.detail = "starting: the socket is held; waiting for the server's READY=1"
        self.enforce_timeouts(srv, now)

    # ------------------------------------------------------------------ probes
    def collect_probe(self, srv: Server, now: float) -> None:
        rec, spec, health = srv.rec, srv.spec, srv.slot.health
        if health.probe is None or not health.probe.done():
            return
        fut, health.probe = health.probe, None
        try:
            result, ran_at = fut.result()
        except Exception as e:
            result, ran_at = ProbeResult(False, f"probe error: {e}"), health.probe_submitted
        if rec.state == lc.STARTING:
            health.starved += max(0.0, ran_at - health.probe_submitted)
        if rec.state == lc.STARTING:
            health.next_probe_at = now + STARTUP_PROBE_SECONDS
        else:
            interval = min(spec.health.interval, UNHEALTHY_PROBE_SECONDS) if rec.state == lc.UNHEALTHY else spec.health.interval
            health.next_probe_at = on_grid(now + interval)
        if rec.state == lc.STARTING:
            self.apply_startup_probe(srv, result, now)
        elif result.ok:
            if rec.state == lc.UNHEALTHY:
                self.sup.log.info("%s: healthy again", rec.label)
            lc.became_healthy(rec)
            health.unhealthy_since = None
        else:
            if rec.state == lc.READY:
                self.sup.log.warning("%s: unhealthy: %s", rec.label, result.detail)
                health.unhealthy_since = now
            lc.became_unhealthy(rec, result.detail)

    def apply_startup_probe(self, srv: Server, result: ProbeResult, now: float) -> None:
        rec, slot, spec, health = srv.rec, srv.slot, srv.spec, srv.slot.health
        started = rec.instance.started_at if rec.instance else now
        if result.connected and "port_open" not in rec.startup:
            rec.startup["port_open"] = round(now - started, 3)
        if not result.ok:
            rec.detail = f"warming up: {result.detail}"
            return
        rec.startup.setdefault("port_open", round(now - started, 3))
        backend = get_backend(spec.kind)
        if not health.prepared and backend.has_prepare:
            rec.detail = "preparing"
            health.prepare_started = now

            def report(progress: dict[str, Any]) -> None:
                health.progress = progress

            health.prepare = self.sup.submit(slot, backend.prepare, spec, self.url(srv), report)
            return
        self.mark_ready(srv, now)

    def mark_ready(self, srv: Server, now: float) -> None:
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        started = rec.instance.started_at if rec.instance else now
        # the phases add up to the total: spawn → port open → healthy → prepared
        total = round(now - started, 3)
        port_open = min(rec.startup.get("port_open", total), total)
        prepare = min(rec.startup.get("prepare", 0.0), total - port_open)
        lc.became_ready(
            rec, now, {"port_open": port_open, "healthy": round(total - port_open - prepare, 3), "prepare": prepare, "total": total}
        )
        slot.health.next_probe_at = on_grid(now + spec.health.interval)
        slot.wake_at(slot.health.next_probe_at)
        self.sup.log.info("%s: ready after %.1fs", rec.label, now - started)

    def enforce_timeouts(self, srv: Server, now: float) -> bool:
        """Startup past startup_timeout, or unhealthy past the grace period: a failure."""
        rec, slot, spec = srv.rec, srv.slot, srv.spec
        started = rec.instance.started_at if rec.instance else None
        if rec.state == lc.STARTING and started is not None:
            deadline = started + spec.startup_timeout + slot.health.starved
            if now > deadline:
                reason = f"not ready after {spec.startup_timeout:g}s (startup_timeout): {rec.detail or ''}".rstrip(": ")
                if slot.external:  # nothing of ours to restart: say so and stop trying
                    self.sup.crash(srv, now, None, Failure("unreachable", f"{rec.url} did not answer: {reason}", False))
                else:
                    self.sup.crash(srv, now, None, Failure("startup-timeout", reason, True))
                return True
            slot.wake_at(deadline)
        since = slot.health.unhealthy_since
        if rec.state == lc.UNHEALTHY and since is not None and not slot.external:
            if now - since > spec.health.grace:
                reason = f"unhealthy for {now - since:.0f}s ({rec.detail}); restarting"
                self.sup.crash(srv, now, None, Failure("unhealthy", reason, True))
                return True
            slot.wake_at(since + spec.health.grace + 0.001)
        return False

    def schedule_probe(self, srv: Server, now: float) -> None:
        rec, slot, spec, health = srv.rec, srv.slot, srv.spec, srv.slot.health
        if health.probe is not None or health.prepare is not None:
            return
        if now < health.next_probe_at:
            slot.wake_at(health.next_probe_at)
            return
        health.probe_submitted = time.monotonic()
        ready = rec.state == lc.READY
        health.probe = self.sup.submit(
            slot, self.probe_job, spec, self.url(srv), rec.state != lc.STARTING, quiet=lambda outcome: ready and outcome[0].ok
        )

    def probe_job(self, spec: ServerSpec, url: str, check_model: bool) -> tuple[ProbeResult, float]:
        """One probe, and when it actually ran (a worker may have been busy)."""
        ran_at = time.monotonic()
        result = self.sup.procs.probe(spec, url)
        if result.ok and check_model:
            ok, why = get_backend(spec.kind).is_ready(spec, url)
            if not ok:
                result = ProbeResult(False, why, connected=True)
        return ProbeResult(result.ok, one_line(result.detail), result.connected), ran_at

    def url(self, srv: Server) -> str:
        return srv.rec.url or get_backend(srv.spec.kind).base_url(srv.spec, srv.rec.port)
