"""Targeted mutation testing: does a test fail when a guarantee's code is broken?

Each mutant is one small change to the code under test (an exact piece of text replaced once),
with the tests that must catch it. For each, the repository is copied to a temporary directory,
the change is made there, and those tests run against the copy (PYTHONPATH points at it, so the
processes the tests start run the mutated code too). A mutant that no test fails "survives".

    .venv/bin/python -m tests.mutations                 # every mutant
    .venv/bin/python -m tests.mutations budget express  # those whose name contains a word
    .venv/bin/python -m tests.mutations --list

The mutants cover the budget's admission and eviction (modelctl/supervisor/budget.py and the
supervisor's use of it), the idle decision of on-demand servers, lifecycle's transitions
(modelctl/state/lifecycle.py, modelctl/state/states.py), the batching scheduler's express lane
(servers/sentence/batching.py), and the one-line changes of issue 34's findings. It exits 1
when a mutant survives or cannot be applied (the code it names changed: update the mutant).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest arguments: files, node ids, -k expressions
    slow: bool = False  # the tests need --slow
    equivalent: str = ""  # why no test can catch it: the change does not change behaviour


BUDGET = "tests/test_budget.py"
LIFECYCLE = "tests/test_lifecycle.py"
SCHEDULING = "tests/test_sentence_scheduling.py"
ON_DEMAND = "tests/test_on_demand.py"

MUTANTS: list[Mutant] = []


def mutant(*args: object, **kwargs: object) -> None:
    MUTANTS.append(Mutant(*args, **kwargs))  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the budget: admission
B = "modelctl/supervisor/budget.py"
mutant(
    "budget: stopping servers hold nothing",
    B,
    "HOLDING = states.ALIVE | {states.STOPPING, states.CRASHED}",
    "HOLDING = states.ALIVE",
    (BUDGET,),
)
mutant("budget: a deficit of zero is short", B, "if all(d <= 0 for d in deficits.values()):\n        return Admit()", "if all(d < 0 for d in deficits.values()):\n        return Admit()", (BUDGET,))  # fmt: skip
mutant("budget: one limit that fits admits", B, "if all(d <= 0 for d in deficits.values()):\n        return Admit()", "if any(d <= 0 for d in deficits.values()):\n        return Admit()", (BUDGET,))  # fmt: skip
mutant("budget: no budget counts as none", B, "    if not limits:\n        return Admit()\n", "    if not limits or len(limits) == 1:\n        return Admit()\n", (BUDGET,))  # fmt: skip
mutant("budget: the target's own need is left out", B, "sum(lim.held_by(m) for m in holders) + lim.need - lim.limit", "sum(lim.held_by(m) for m in holders) - lim.limit", (BUDGET,))  # fmt: skip
mutant("budget: the declared footprint is never replaced by the measured peak", B, "memory = peak_rss if peak_rss is not None else (declared_mem or 0)", "memory = declared_mem or 0", (BUDGET,))  # fmt: skip
mutant("budget: a GPU footprint counts on no GPU", B, "return Footprint(memory, {g: per_gpu for g in rec.gpus} if per_gpu else {}, learned=peak_rss is not None)", "return Footprint(memory, {}, learned=peak_rss is not None)", (BUDGET,))  # fmt: skip
mutant("budget: a GPU limit bounds every GPU", B, "return m.footprint.memory if self.gpu is None else m.footprint.gpu.get(self.gpu, 0)", "return m.footprint.memory if self.gpu is None else sum(m.footprint.gpu.values())", (BUDGET,))  # fmt: skip
mutant("budget: a profile's budget bounds every profile", B, "budgets.append((own, {r.ref for r, _ in others if r.ref.profile == target.ref.profile}))", "budgets.append((own, {r.ref for r, _ in others}))", (BUDGET,))  # fmt: skip
mutant("budget: a shared budget bounds its own profile only", B, "budgets.append((tight, {r.ref for r, _ in others}))", "budgets.append((tight, {r.ref for r, _ in others if r.ref.profile == target.ref.profile}))", (BUDGET,))  # fmt: skip
mutant("budget: the loosest shared budget wins", B, "memory=min((b.memory for b in shared if b.memory is not None), default=None),", "memory=max((b.memory for b in shared if b.memory is not None), default=None),", (BUDGET,))  # fmt: skip
# ---------------------------------------------------------------------- the budget: eviction
mutant("eviction: always servers are evictable", B, "return Member(rec.ref, rec.state, running, on_demand and rec.state in EVICTABLE and not busy, last)", "return Member(rec.ref, rec.state, running, rec.state in EVICTABLE and not busy, last)", (BUDGET,))  # fmt: skip
mutant("eviction: a starting server is evictable", B, "EVICTABLE = frozenset({states.READY, states.UNHEALTHY})", "EVICTABLE = frozenset({states.READY, states.UNHEALTHY, states.STARTING})", (BUDGET,))  # fmt: skip
mutant("eviction: most recently used first", B, "candidates = sorted((m for m in holders if m.evictable), key=lambda m: m.last_used)", "candidates = sorted((m for m in holders if m.evictable), key=lambda m: -m.last_used)", (BUDGET,))  # fmt: skip
mutant("eviction: oldest woken first, not least recently used", B, "last = rec.usage.last_active or (rec.instance.ready_at if rec.instance else None) or 0.0", "last = (rec.instance.started_at if rec.instance else None) or 0.0", (BUDGET, ON_DEMAND))  # fmt: skip
mutant("eviction: every candidate is evicted", B, "        if all(d <= 0 for d in after_stops.values()):\n            break\n", "", (BUDGET,), equivalent="the break is an early exit: the test below it adds no victim once every limit fits")  # fmt: skip
mutant("eviction: a victim that frees nothing of the short limit", B, "if any(after_stops[id(lim)] > 0 and lim.held_by(m) > 0 for lim in limits):", "if True:", (BUDGET,))  # fmt: skip
mutant("eviction: what stopping servers free is not counted", B, "after_stops = {id(lim): deficits[id(lim)] - sum(lim.held_by(m) for m in stopping) for lim in limits}", "after_stops = dict(deficits)", (BUDGET,))  # fmt: skip
mutant("eviction: a start that cannot fit is evicted for anyway", B, "    if short:\n        return Refuse(", "    if short and not victims:\n        return Refuse(", (BUDGET,))  # fmt: skip
mutant("eviction: a busy server is evicted", B, "return Member(rec.ref, rec.state, running, on_demand and rec.state in EVICTABLE and not busy, last)", "return Member(rec.ref, rec.state, running, on_demand and rec.state in EVICTABLE, last)", (BUDGET,))  # fmt: skip
mutant("eviction: a successor's memory is not counted", B, "        running = Footprint(running.memory + new.memory,", "        running = Footprint(running.memory,", (BUDGET,))  # fmt: skip
# the supervisor's use of the decision (finding 1): modelctl/supervisor/on_demand.py
S = "modelctl/supervisor/on_demand.py"
mutant("eviction: the new server starts before the evicted are gone (finding 1)", S, "                self.evict(victim, decision.reason, now)\n", "                self.evict(victim, decision.reason, now)\n            return True\n", (f"{BUDGET}::test_a_server_starts_only_once_the_server_evicted_for_it_is_gone",))  # fmt: skip
mutant("eviction: the evicted are not stopped", S, "                self.evict(victim, decision.reason, now)\n", "                pass\n", (BUDGET,))  # fmt: skip

# ---------------------------------------------------------------------- the idle decision (finding 2)
mutant("idle: requests do not keep a server from its idle stop (finding 2)", S, "            if busy:\n                lc.active(rec, now)\n", "            if busy:\n                pass\n", (ON_DEMAND,))  # fmt: skip
mutant("idle: requests in progress are not activity", S, "busy = moved or demand.in_flight", "busy = moved", (ON_DEMAND,))  # fmt: skip
mutant("idle: a moved request counter is not activity", S, "busy = moved or demand.in_flight", "busy = demand.in_flight", (ON_DEMAND,))  # fmt: skip
mutant("idle: connections are not activity", S, "                demand.in_flight = bool(connections)\n", "                demand.in_flight = False\n", (ON_DEMAND,))  # fmt: skip
mutant("idle: the timeout counts from the start, not the last request", S, "since = rec.usage.last_active or (rec.instance.ready_at if rec.instance else None) or now", "since = (rec.instance.ready_at if rec.instance else None) or now", (ON_DEMAND,))  # fmt: skip
mutant("idle: never stopped", S, "        if now - since >= spec.idle_timeout and not slot.demand.in_flight:\n", "        if False:\n", (ON_DEMAND,))  # fmt: skip
mutant("idle: stopped with requests in flight", S, "        if now - since >= spec.idle_timeout and not slot.demand.in_flight:\n", "        if now - since >= spec.idle_timeout:\n", (ON_DEMAND,), equivalent="a request in flight is seen as activity at every look (idle_timeout / 4 apart), which moves the idle clock on before it could run out")  # fmt: skip

# ---------------------------------------------------------------------- lifecycle
L = "modelctl/state/lifecycle.py"
T = "modelctl/state/states.py"
LQ = (LIFECYCLE, "tests/test_supervisor_logic.py", "tests/test_restart.py")
mutant("lifecycle: expect is ignored", L, "    if expect is not None:\n", "    if False:\n", LQ)  # fmt: skip
mutant("lifecycle: the table is not consulted", L, "def can_move(src: State, dst: State) -> bool:\n    return dst in ALLOWED.get(src, frozenset())", "def can_move(src: State, dst: State) -> bool:\n    return True", LQ)  # fmt: skip
mutant("lifecycle: unhealthy cannot become ready again", T, "UNHEALTHY: frozenset({READY, CRASHED, STOPPING}),", "UNHEALTHY: frozenset({CRASHED, STOPPING}),", LQ)  # fmt: skip
mutant("lifecycle: a stopped server may become ready without starting", T, "STOPPED: frozenset({STARTING, IDLE}),", "STOPPED: frozenset({STARTING, IDLE, READY}),", LQ)  # fmt: skip
mutant("lifecycle: a first start counts as a restart", L, "restarts=rec.history.restarts + (1 if after_backoff else 0))", "restarts=rec.history.restarts + 1)", LQ)  # fmt: skip
mutant("lifecycle: a start never follows a backoff", L, "move(rec, STARTING, expect=(STOPPED, BACKOFF, IDLE))", "move(rec, STARTING, expect=(STOPPED, IDLE))", LQ)  # fmt: skip
mutant("lifecycle: a start keeps the backoff's due time", L, "rec.history = dataclasses.replace(rec.history, next_start_at=None, restarts=", "rec.history = dataclasses.replace(rec.history, restarts=", LQ)  # fmt: skip
mutant("lifecycle: readiness is not timed", L, "    rec.instance = dataclasses.replace(rec.instance, ready_at=now)\n", "", LQ)  # fmt: skip
mutant("lifecycle: a wake's wait is not measured", L, "wait = round(now - rec.usage.waiting_since, 3)", "wait = 0.0", (*LQ, ON_DEMAND))  # fmt: skip
mutant("lifecycle: an unhealthy server stays ready", L, "    if rec.state == READY:\n        move(rec, UNHEALTHY, expect=READY)\n", "", LQ)  # fmt: skip
mutant("lifecycle: a crash keeps the instance's readiness", L, "        rec.instance = dataclasses.replace(rec.instance, ready_at=None)\n", "        pass\n", LQ)  # fmt: skip
mutant("lifecycle: a backoff is not waited for", L, "next_start_at=now + decision.delay)", "next_start_at=now)", LQ)  # fmt: skip
mutant("lifecycle: giving up is a backoff", L, "    elif isinstance(decision, restart.GiveUp):\n        move(rec, FAILED, expect=CRASHED)", "    elif isinstance(decision, restart.GiveUp):\n        move(rec, BACKOFF, expect=CRASHED)", LQ)  # fmt: skip
mutant("lifecycle: staying down still wants to run", L, "        move(rec, STOPPED, expect=CRASHED)\n        rec.wish = dataclasses.replace(rec.wish, desired=\"stopped\")", "        move(rec, STOPPED, expect=CRASHED)", LQ)  # fmt: skip
mutant("lifecycle: a failed start keeps no exit", L, "last_error=failure.describe(), exits=[*rec.history.exits, entry][-restart.EXITS_KEPT :])", "last_error=failure.describe())", LQ)  # fmt: skip
mutant("lifecycle: a stop of another instance counts", L, "    if rec.token != token:\n        return False\n", "", LQ)  # fmt: skip
mutant("lifecycle: a stop keeps the successor", L, "rec.instance, rec.successor, rec.detail, rec.progress = None, None, None, None", "rec.instance, rec.detail, rec.progress = None, None, None", LQ)  # fmt: skip
mutant("lifecycle: a stop does not say what it wants after", L, "    rec.wish = dataclasses.replace(rec.wish, desired=desired_after)\n    if rec.state in MAY_HAVE_PROCESSES:", "    if rec.state in MAY_HAVE_PROCESSES:", LQ)  # fmt: skip
mutant("lifecycle: a stop keeps a backoff's due time", L, "    rec.history = dataclasses.replace(rec.history, next_start_at=None)\n    rec.progress = None", "    rec.progress = None", LQ)  # fmt: skip
mutant("lifecycle: an eviction counts as an idle stop", L, "    if evicted_for is not None:\n        stamp", "    if False:\n        stamp", (*LQ, BUDGET))  # fmt: skip
mutant("lifecycle: a wake is not counted", L, "wakes=usage.wakes + 1, warmed=rec.wish.warm)", "wakes=usage.wakes, warmed=rec.wish.warm)", (*LQ, ON_DEMAND))  # fmt: skip
mutant("lifecycle: the last measurement replaces the peak", L, "peak_rss = max(rss, usage.peak_rss or 0) if rss else usage.peak_rss", "peak_rss = rss if rss else usage.peak_rss", (*LQ, BUDGET))  # fmt: skip
mutant("lifecycle: up keeps the failures of the old spec", L, "    rec.wish = dataclasses.replace(rec.wish, desired=\"running\", managed_by=managed_by)\n    reset_failures(rec)\n", "    rec.wish = dataclasses.replace(rec.wish, desired=\"running\", managed_by=managed_by)\n", LQ)  # fmt: skip
mutant("lifecycle: a successor that takes over keeps the old instance", L, "    rec.instance, rec.successor = new, None\n", "    rec.successor = None\n", LQ)  # fmt: skip
mutant("lifecycle: a failed successor is tried again", L, "        failed_replacement=FailedReplacement(rec.fingerprint, rec.wish.generation, error),\n", "", LQ)  # fmt: skip


# ---------------------------------------------------------------------- the express lane (findings 3, 4)
X = "servers/sentence/batching.py"
mutant("express: no express worker ever runs (finding 4)", X, "while self._express_free > 0 and self._bulk_running > 0:", "while False:", (SCHEDULING,))  # fmt: skip
mutant("express: the express worker runs beside small work too", X, "while self._express_free > 0 and self._bulk_running > 0:", "while self._express_free > 0:", (SCHEDULING,))  # fmt: skip
mutant("express: the express worker takes bulk work", X, "batch = self._gather(small_only=True)", "batch = self._gather(small_only=False)", (SCHEDULING,))  # fmt: skip
mutant("express: a request that fits one batch is not small", X, "req.small = len(req.rows) <= self.max_rows and longest * len(req.rows) <= self.max_tokens", "req.small = len(req.rows) < self.max_rows and longest * len(req.rows) < self.max_tokens // 2", (SCHEDULING,))  # fmt: skip
mutant("express: every request is small", X, "req.small = len(req.rows) <= self.max_rows and longest * len(req.rows) <= self.max_tokens", "req.small = True", (SCHEDULING,))  # fmt: skip
mutant("express: bulk batches are never counted", X, "        self._bulk_running += bulk\n", "", (SCHEDULING,))  # fmt: skip
mutant("express: a finished bulk batch stays counted", X, "            self._bulk_running -= bulk\n", "", (SCHEDULING,))  # fmt: skip
mutant("express: the express worker is never given back", X, "            if express:\n                self._express_free += 1\n", "            if express:\n                pass\n", (SCHEDULING,))  # fmt: skip
mutant("express: the lane is not told to the model", X, "        LANE.express = express\n", "", (SCHEDULING,))  # fmt: skip
mutant("round-robin: the first request always goes first", X, "        self._ready.rotate(-1)", "        pass", (SCHEDULING,))  # fmt: skip
mutant("round-robin: one request fills the batch", X, "longest, share = 0, max(1, self.max_rows // (2 * len(live)))", "longest, share = 0, self.max_rows", (SCHEDULING,))  # fmt: skip


mutant("express: the server gives its batcher no express worker", "servers/sentence/service.py", "express=s.express_workers if s.express_workers is not None else int(cpu),", "express=0,", (SCHEDULING,))  # fmt: skip
mutant("plain path: /v1/embeddings always goes through FastAPI (finding 9)", "servers/sentence/app.py", "inner: Any = openai.PlainEmbeddings(app, ctx) if settings.task == \"embedding\" else app", "inner: Any = app", (SCHEDULING,))  # fmt: skip


# ---------------------------------------------------------------------- the other findings of issue 34
R = "modelctl/supervisor/runner.py"
mutant("runner: not a child subreaper (finding 5)", R, "if not set_child_subreaper():", "if False:", ("tests/test_runner.py::test_modelctl_run_reaps_the_orphans_that_reparent_to_it",))  # fmt: skip
mutant("runner: SIGHUP does not read the records again (finding 6)", R, "        for slot in self.sup.slots.values():\n            slot.rec = slot.stamp = slot.saved = None\n", "        for slot in self.sup.slots.values():\n            pass\n", ("tests/test_runner.py::test_sighup_reopens_the_supervisor_log_and_reads_the_records_again",))  # fmt: skip
mutant("slurm: --gpus inherit is ignored (finding 7)", "modelctl/foreground.py", "        spec = inherit_gpus(spec, os.environ.get(\"CUDA_VISIBLE_DEVICES\"))\n", "        pass\n", ("tests/test_slurm_gres.py",), slow=True)  # fmt: skip
mutant("lifecycle: a history written outside lifecycle (finding 8)", "modelctl/supervisor/core.py", "        lc.settle_crash(rec, decision, now)\n", "        lc.settle_crash(rec, decision, now)\n        rec.history.restarts += 1\n", (f"{LIFECYCLE}::test_no_state_instance_history_or_wish_is_written_outside_the_lifecycle_module",))  # fmt: skip
mutant("up: ports are probed under the state lock (finding 10)", "modelctl/control.py", "        allocation = allocate_ports(requests, profile.port_range, held, PortLeases(self.store.root))\n", "        with self.store.locked():\n            allocation = allocate_ports(requests, profile.port_range, held, PortLeases(self.store.root))\n", ("tests/test_planning.py",))  # fmt: skip


def copy_repository(dest: Path) -> None:
    """The files git knows (tracked, and untracked but not ignored), as they are now."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    for rel in filter(None, listed.decode().split("\0")):
        src = ROOT / rel
        if not src.is_file():
            continue  # deleted in the work tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def run_mutant(m: Mutant, copy: Path, timeout: float) -> tuple[str, float, str]:
    """('killed' | 'survived' | 'not applied' | 'error', seconds, the end of pytest's output)."""
    target = copy / m.path
    original = target.read_text()
    if original.count(m.old) != 1:
        return "not applied", 0.0, f"{m.path}: the text to change occurs {original.count(m.old)} times"
    target.write_text(original.replace(m.old, m.new))
    argv = [sys.executable, "-m", "pytest", "-x", "-q", "-n", "0", "-p", "no:cacheprovider", "--no-header", "--durations=0"]
    argv += ["--slow", *m.tests] if m.slow or any("::" in t for t in m.tests) else list(m.tests)
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    t0 = time.monotonic()
    try:
        res = subprocess.run(argv, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        code, out = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        code, out = -1, f"timed out after {timeout:.0f}s: {(e.stdout or b'')[-2000:]!r}"
    finally:
        target.write_text(original)
    took = time.monotonic() - t0
    tail = "\n".join(out.strip().splitlines()[-3:])
    if code == 0:
        return "survived", took, tail
    if code in (1, -1):  # a test failed (a hang counts as caught too)
        return "killed", took, tail
    return "error", took, tail


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("words", nargs="*", help="run the mutants whose name contains any of these words")
    p.add_argument("--list", action="store_true", help="list the mutants and their tests")
    p.add_argument("--timeout", type=float, default=600, help="seconds for one mutant's tests")
    a = p.parse_args()
    chosen = [m for m in MUTANTS if not a.words or any(w in m.name for w in a.words)]
    if a.list:
        for m in chosen:
            print(f"{m.name}\n    {m.path}; {' '.join(m.tests)}")
        return 0
    results: list[tuple[Mutant, str, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="modelctl-mutants-") as tmp:
        copy = Path(tmp) / "repo"
        copy_repository(copy)
        for m in chosen:
            verdict, took, tail = run_mutant(m, copy, a.timeout)
            results.append((m, verdict, took, tail))
            print(f"{verdict:>11}  {took:6.1f}s  {m.name}", flush=True)
            if verdict in ("error", "not applied"):
                print("             " + tail.replace("\n", "\n             "), flush=True)
    survivors = [r for r in results if r[1] != "killed" and not (r[1] == "survived" and r[0].equivalent)]
    for m, verdict, _, _ in results:
        if verdict == "survived" and m.equivalent:
            print(f"equivalent (not counted): {m.name}: {m.equivalent}")
    print(f"\n{len(results) - len(survivors)} of {len(results)} mutants killed", end="")
    print(f"; not killed: {', '.join(m.name for m, *_ in survivors)}" if survivors else "")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
