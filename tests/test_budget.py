"""The memory budget as a table (modelctl/supervisor/budget.py), and on real processes: on-demand servers that
cannot all fit are stopped least recently used first, and what modelctl starts never holds more
than the budget (sampled)."""

from __future__ import annotations

import sys
import threading
import time

import psutil
import pytest

from modelctl.errors import ProfileError
from modelctl.profile import load_profile, parse_server
from modelctl.spec import Budget
from modelctl.state import lifecycle as lc
from modelctl.state.record import Instance, ServerRecord, Usage
from modelctl.state.states import State
from modelctl.supervisor.budget import Admit, Evict, Refuse, Wait, admit, budget_json

from .conftest import ROOT, http_post, wait_for

MiB = 1 << 20
LISTEN_SERVER = str(ROOT / "tests" / "servers" / "listen_server.py")


def server(
    name: str, state: State, memory: int, start: str = "on-demand", last_active: float = 0.0, budget: Budget | None = None, gpus=()
) -> tuple:
    raw = {"kind": "command", "command": ["srv", "--fd", "{fd}"], "socket": "inherit", "notify": True, "start": start, "memory": memory}
    if gpus:
        raw["gpus"] = list(gpus)
    spec = parse_server(name, raw, "p.yaml", "p")
    rec = ServerRecord(
        profile="p", name=name, state=state, spec=raw, gpus=list(gpus), budget=budget_json(budget or Budget(memory=1400 * MiB))
    )
    rec.usage = Usage(last_active=last_active)
    if state in lc.ALIVE:
        rec.instance = Instance(token=name, fingerprint="", started_at=0.0, ready_at=1.0)
    return rec, spec


@pytest.mark.parametrize(
    "others, expect",
    [
        ([], Admit),
        ([("a", "ready", 650)], Admit),
        ([("a", "ready", 650), ("b", "ready", 650)], Evict),
        ([("a", "ready", 650), ("b", "ready", 650, "always")], Evict),
        ([("a", "ready", 650, "always"), ("b", "ready", 650, "always")], Refuse),
        ([("a", "stopping", 650), ("b", "ready", 650)], Wait),
        ([("a", "idle", 650), ("b", "ready", 650)], Admit),
    ],
)
def test_the_budget_decision_table(others, expect):
    target = server("t", "idle", 650 * MiB)
    records = [server(o[0], o[1], o[2] * MiB, o[3] if len(o) > 3 else "on-demand") for o in others]
    decision = admit(target[0], target[1], [target, *records])
    assert isinstance(decision, expect), decision


def test_the_least_recently_used_is_evicted_first_and_only_as_many_as_needed():
    target = server("t", "idle", 650 * MiB)
    a = server("a", "ready", 650 * MiB, last_active=50.0)
    b = server("b", "ready", 650 * MiB, last_active=10.0)  # used longest ago
    decision = admit(target[0], target[1], [target, a, b])
    assert isinstance(decision, Evict) and [str(v) for v in decision.victims] == ["p/b"]


def test_a_server_that_fills_the_budget_exactly_is_admitted():
    """750 MiB held, 650 MiB needed, 1400 MiB budget: it fits, to the byte.
    Fails if a deficit of zero counts as short."""
    target = server("t", "idle", 650 * MiB)
    assert isinstance(admit(target[0], target[1], [target, server("a", "ready", 750 * MiB)]), Admit)
    assert isinstance(admit(target[0], target[1], [target, server("a", "ready", 750 * MiB + 1)]), Evict)


def test_a_starting_server_is_never_evicted():
    """a is starting (used longest ago, as far as anyone knows), b is ready: b goes.
    Fails if a starting server counts as evictable."""
    target = server("t", "idle", 650 * MiB)
    a = server("a", "starting", 650 * MiB)
    b = server("b", "ready", 650 * MiB, last_active=10.0)
    decision = admit(target[0], target[1], [target, a, b])
    assert isinstance(decision, Evict) and [str(v) for v in decision.victims] == ["p/b"], decision


def test_only_servers_that_hold_the_short_memory_are_evicted():
    """GPU 0 is short; a (used longest ago) holds GPU 1, b holds GPU 0: only b goes.
    Fails if a victim is taken that frees nothing of what is short."""
    gpu_budget = Budget(gpu_memory={0: 70 << 30, 1: 70 << 30})
    raw = {"kind": "command", "command": ["srv", "--fd", "{fd}"], "socket": "inherit", "notify": True, "start": "on-demand",
           "gpu_memory": "40GiB"}  # fmt: skip

    def rec(name: str, state: State, gpu: int, last_active: float) -> tuple:
        r = ServerRecord(profile="p", name=name, state=state, spec={**raw, "gpus": [gpu]}, gpus=[gpu], budget=budget_json(gpu_budget))
        r.usage = Usage(last_active=last_active)
        if state in lc.ALIVE:
            r.instance = Instance(token=name, fingerprint="", started_at=0.0, ready_at=1.0)
        return r, parse_server(name, {**raw, "gpus": [gpu]}, "p.yaml", "p")

    target = rec("t", "idle", 0, 0.0)
    decision = admit(target[0], target[1], [target, rec("a", "ready", 1, 5.0), rec("b", "ready", 0, 50.0)])
    assert isinstance(decision, Evict) and [str(v) for v in decision.victims] == ["p/b"], decision


def test_no_server_is_evicted_for_a_start_that_would_still_not_fit():
    """a (always) holds 900 MiB, b (on demand) 300 MiB; t needs 650 of 1400: even without b it
    does not fit, so b keeps running and the answer is a refusal (the start waits).
    Fails if servers are evicted for a start that cannot fit anyway."""
    target = server("t", "idle", 650 * MiB)
    a = server("a", "ready", 900 * MiB, start="always")
    b = server("b", "ready", 300 * MiB)
    assert isinstance(admit(target[0], target[1], [target, a, b]), Refuse)


def test_a_busy_server_is_never_evicted():
    """b was used longest ago but has requests in flight: a goes.
    Fails if a server the supervisor says is busy can be evicted."""
    target = server("t", "idle", 650 * MiB)
    a = server("a", "ready", 650 * MiB, last_active=50.0)
    b = server("b", "ready", 650 * MiB, last_active=10.0)
    decision = admit(target[0], target[1], [target, a, b], busy={b[0].ref})
    assert isinstance(decision, Evict) and [str(v) for v in decision.victims] == ["p/a"], decision


def test_a_server_being_replaced_holds_both_of_its_instances():
    """a is replacing its instance (the new one starts beside the old): it holds 2 × 650 MiB, so
    t's 650 MiB does not fit in 1400 without a stop.
    Fails if a successor's memory is not counted."""
    target = server("t", "idle", 650 * MiB)
    a = server("a", "ready", 650 * MiB)
    a[0].successor = Instance(token="a2", fingerprint="", started_at=2.0)
    assert not isinstance(admit(target[0], target[1], [target, a]), Admit)


def test_a_refusal_names_what_holds_the_budget():
    target = server("t", "idle", 650 * MiB)
    a = server("a", "ready", 700 * MiB, start="always")
    b = server("b", "ready", 600 * MiB, start="always")
    decision = admit(target[0], target[1], [target, a, b])
    assert isinstance(decision, Refuse) and "p/a (700.0 MiB, always)" in decision.reason and "p/b" in decision.reason


def test_a_measured_peak_replaces_the_declared_footprint():
    target = server("t", "idle", 650 * MiB)
    a = server("a", "ready", 650 * MiB)
    b = server("b", "ready", 650 * MiB)
    for rec, _ in (a, b):
        rec.usage = Usage(peak_rss=300 * MiB)
    assert isinstance(admit(target[0], target[1], [target, a, b]), Admit)  # 300 + 300 + 650 fits in 1400


def test_gpu_memory_is_budgeted_per_gpu():
    gpu_budget = Budget(gpu_memory={0: 70 << 30})
    raw = {
        "kind": "command",
        "command": ["srv", "--fd", "{fd}"],
        "socket": "inherit",
        "notify": True,
        "start": "on-demand",
        "gpus": [0],
        "gpu_memory": "40GiB",
    }
    spec = parse_server("t", raw, "p.yaml", "p")

    def rec(name: str, state: State, gpu: int) -> tuple:
        r = ServerRecord(profile="p", name=name, state=state, spec=raw, gpus=[gpu], budget=budget_json(gpu_budget))
        if state in lc.ALIVE:
            r.instance = Instance(token=name, fingerprint="", started_at=0.0)
        return r, spec

    target = rec("t", "idle", 0)
    assert isinstance(admit(target[0], spec, [target, rec("a", "ready", 0)]), Evict)  # 40 + 40 > 70 on GPU 0
    assert isinstance(admit(target[0], spec, [target, rec("a", "ready", 1)]), Admit)  # the other GPU


def record(profile: str, name: str, state: State, memory_mib: int, budget: Budget | None) -> tuple:
    raw = {"kind": "command", "command": ["srv", "--fd", "{fd}"], "socket": "inherit", "notify": True, "start": "on-demand",
           "memory": memory_mib * MiB}  # fmt: skip
    rec = ServerRecord(profile=profile, name=name, state=state, spec=raw, budget=budget_json(budget))
    if state in lc.ALIVE:
        rec.instance = Instance(token=f"{profile}-{name}", fingerprint="", started_at=0.0, ready_at=1.0)
    return rec, parse_server(name, raw, f"{profile}.yaml", profile)


@pytest.mark.parametrize("shared, expect", [(True, Evict), (False, Admit)])
def test_a_shared_budget_bounds_the_servers_of_every_profile(shared, expect):
    """p/t needs 650 MiB under 1400 MiB; q's two servers hold 1300 MiB. A shared budget counts
    them (q/a or q/b must go); p's own budget does not.
    Fails if a shared budget bounds its own profile only, or a profile's budget every profile."""
    budget = Budget(memory=1400 * MiB, shared=shared)
    target = record("p", "t", "idle", 650, budget)
    others = [record("q", "a", "ready", 650, None), record("q", "b", "ready", 650, None)]
    decision = admit(target[0], target[1], [target, *others])
    assert isinstance(decision, expect), decision
    if shared:
        assert isinstance(decision, Evict) and {str(v) for v in decision.victims} <= {"q/a", "q/b"} and len(decision.victims) == 1


def test_the_tightest_shared_budget_of_the_state_directory_bounds_everything():
    """p says 2000 MiB shared, q says 1000 MiB shared: 1000 MiB bounds both profiles' servers.
    Fails if the loosest shared budget wins."""
    target = record("p", "t", "idle", 600, Budget(memory=2000 * MiB, shared=True))
    q = record("q", "a", "ready", 600, Budget(memory=1000 * MiB, shared=True))
    decision = admit(target[0], target[1], [target, q])
    assert isinstance(decision, Evict) and [str(v) for v in decision.victims] == ["q/a"], decision


def test_a_shared_budget_evicts_another_profiles_server_on_real_processes(mc):
    """Two profiles, one on-demand server each, a shared budget for one: calling the second
    evicts the first, although it belongs to the other profile."""
    od = {"kind": "command", "command": [sys.executable, LISTEN_SERVER, "--hold", "200", "--load", "0.2"], "socket": "inherit",
          "notify": True, "start": "on-demand", "idle_timeout": 600, "memory": "250MiB", "health": {"http": "/health"}}  # fmt: skip
    for name in ("p", "q"):
        path = mc.profile({"srv": dict(od)}, name=name, budget={"memory": "300MiB", "shared": True})
        assert mc.cli("up", "-p", str(path)).returncode == 0
    urls = {name: mc.row(f"{name}/srv")["url"] for name in ("p", "q")}
    with Sampler(mc) as sampled:
        for name in ("p", "q"):
            assert http_post(urls[name] + "/call", {}, timeout=60)[0] == 200
    assert mc.row("p/srv")["evictions"] == 1 and mc.row("q/srv")["state"] == "ready"
    assert sampled.most_processes == 1 and sampled.peak <= 300 * MiB


def test_every_limit_of_a_budget_must_fit_not_only_one():
    """Memory fits (2 of 10 GiB) but GPU 0 does not (40 + 40 of 70 GiB): the other server must go.
    Fails if a start is admitted when one of the budget's limits fits."""
    both = Budget(memory=10 << 30, gpu_memory={0: 70 << 30})
    raw = {"kind": "command", "command": ["srv", "--fd", "{fd}"], "socket": "inherit", "notify": True, "start": "on-demand",
           "gpus": [0], "gpu_memory": "40GiB", "memory": "1GiB"}  # fmt: skip
    spec = parse_server("t", raw, "p.yaml", "p")

    def rec(name: str, state: State) -> tuple:
        r = ServerRecord(profile="p", name=name, state=state, spec=raw, gpus=[0], budget=budget_json(both))
        if state in lc.ALIVE:
            r.instance = Instance(token=name, fingerprint="", started_at=0.0, ready_at=1.0)
        return r, spec

    target = rec("t", "idle")
    decision = admit(target[0], spec, [target, rec("a", "ready")])
    assert isinstance(decision, Evict) and [str(v) for v in decision.victims] == ["p/a"], decision


@pytest.mark.parametrize(
    "body, key, words",
    [
        ("servers:\n  o: {kind: ollama, model: m, start: on-demand}\n", "start", "on-demand needs"),
        ("servers:\n  c: {kind: command, command: [s, '{port}'], start: on-demand}\n", "start", "READY=1"),
        ("budget: {memory: 1GiB}\nservers:\n  e: {kind: sentence}\n", "memory", "declare"),
        ("budget: {cpu: 2}\nservers:\n  e: {kind: sentence, memory: 1GiB}\n", "budget.cpu", "unknown key"),
        ("servers:\n  e: {kind: sentence, start: on-demand, idle_timeout: soon}\n", "idle_timeout", "duration"),
    ],
)
def test_on_demand_and_budget_keys_are_checked(tmp_path, body, key, words):
    path = tmp_path / "p.yaml"
    path.write_text(body)
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert e.value.key == key and words in str(e.value), str(e.value)


def test_idle_timeout_takes_durations(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("servers:\n  e: {kind: sentence, start: on-demand, idle_timeout: 10m}\n")
    spec = load_profile(path).servers["e"]
    assert spec.start == "on-demand" and spec.idle_timeout == 600


# ---------------------------------------------------------------------- real processes
def server_processes(mc) -> list[psutil.Process]:
    """This test's server processes (the stand-in's or the bundled server's), running or draining."""
    found = []
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        try:
            cmd = p.info["cmdline"] or []
            ours = LISTEN_SERVER in cmd or "servers.sentence" in " ".join(cmd)
            if ours and p.status() != psutil.STATUS_ZOMBIE and p.environ().get("MODELCTL_TEST_TAG") == mc.tag:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def rss_of(procs: list[psutil.Process]) -> int:
    """Their resident memory, summed."""
    return sum(p.info["memory_info"].rss for p in procs)


class Sampler:
    """Samples the servers' resident memory and how many run, every 50 ms, in a thread: by their
    records (starting, ready, unhealthy or stopping) and by their processes (a draining one too)."""

    def __init__(self, mc):
        self.mc, self.peak, self.most_running, self.most_processes, self._stop = mc, 0, 0, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            procs = server_processes(self.mc)
            self.peak = max(self.peak, rss_of(procs))
            self.most_processes = max(self.most_processes, len(procs))
            holding = lc.ALIVE | {lc.STOPPING}
            self.most_running = max(self.most_running, sum(r.state in holding for r in self.mc.ctl.status()))
            time.sleep(0.05)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join(5)


def test_three_on_demand_servers_under_a_budget_for_two_are_called_in_turn(mc):
    """Each holds ~210 MiB and is declared at 250 MiB; the budget (520 MiB) holds two. Called in
    turn, every request is answered, the least recently used is evicted, and the sampled memory
    of what modelctl started never exceeds the budget."""
    od = {"kind": "command", "command": [sys.executable, LISTEN_SERVER, "--hold", "200", "--load", "0.5"], "socket": "inherit",
          "notify": True, "start": "on-demand", "idle_timeout": 600, "memory": "250MiB", "health": {"http": "/health"}}  # fmt: skip
    path = mc.profile({n: dict(od) for n in ("a", "b", "c")}, budget={"memory": "520MiB"})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    urls = {n: mc.row(n)["url"] for n in ("a", "b", "c")}
    with Sampler(mc) as sampled:
        for name in ("a", "b", "c", "a", "b", "c"):
            status, body, _ = http_post(urls[name] + "/call", {}, timeout=60)
            assert status == 200, (name, body)
    assert sampled.peak <= 520 * MiB, sampled.peak
    assert sampled.most_running <= 2
    rows = {r.name: r for r in mc.ctl.status()}
    assert sum(r.evictions for r in rows.values()) >= 3 and rows["a"].last_eviction and "needs the memory" in rows["a"].last_eviction
    res = mc.cli("status")
    assert "budget:" in res.stdout and "of 520.0 MiB" in res.stdout, res.stdout
    metrics = mc.cli("metrics").stdout
    assert 'modelctl_server_evictions_total{server="test/a"}' in metrics and "modelctl_server_wakes_total" in metrics


def test_a_server_starts_only_once_the_server_evicted_for_it_is_gone(mc):
    """The budget holds one; the evicted server takes 1.5 s to drain after SIGTERM, its memory still
    held. The next starts only once it is gone: never two processes, never more than the budget.
    Fails if the supervisor starts the new server right after ordering the eviction."""
    od = {"kind": "command", "command": [sys.executable, LISTEN_SERVER, "--hold", "200", "--load", "0.3", "--drain", "1.5"],
          "socket": "inherit", "notify": True, "start": "on-demand", "idle_timeout": 600, "memory": "250MiB",
          "health": {"http": "/health"}}  # fmt: skip
    path = mc.profile({n: dict(od) for n in ("a", "b")}, budget={"memory": "300MiB"})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    urls = {n: mc.row(n)["url"] for n in ("a", "b")}
    with Sampler(mc) as sampled:
        for name in ("a", "b", "a"):
            status, body, _ = http_post(urls[name] + "/call", {}, timeout=60)
            assert status == 200, (name, body)
    assert sampled.most_processes == 1, f"{sampled.most_processes} server processes at once"
    assert sampled.most_running == 1 and sampled.peak <= 300 * MiB, (sampled.most_running, sampled.peak)
    assert mc.row("b")["evictions"] == 1 and mc.row("a")["evictions"] == 1


# ---------------------------------------------------------------------- the bundled server, real MiniLM
def no_process(mc, name: str) -> bool:
    return mc.row(name)["pid"] is None and not [
        p for p in psutil.process_iter(["cmdline"]) if "servers.sentence" in " ".join(p.info["cmdline"] or []) and _tagged(p, mc)
    ]


def _tagged(p: psutil.Process, mc) -> bool:
    try:
        return p.environ().get("MODELCTL_TEST_TAG") == mc.tag
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def accepts(url: str) -> bool:
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port or 80), timeout=2):
        return True


@pytest.mark.slow
def test_an_on_demand_minilm_server_idles_wakes_idles_and_wakes_again(mc):
    path = mc.profile({"emb": {"kind": "sentence", "start": "on-demand", "idle_timeout": "4s"}})
    t0 = time.monotonic()
    res = mc.cli("up", "-p", str(path))
    assert res.returncode == 0 and time.monotonic() - t0 < 10, res.stdout + res.stderr  # returns at once: nothing loads
    row = mc.row("emb")
    assert row["state"] == "idle" and no_process(mc, "emb") and accepts(row["url"])
    status, body, _ = http_post(row["url"] + "/v1/embeddings", {"input": "wake up"}, timeout=120)
    assert status == 200 and len(body["data"][0]["embedding"]) == 384
    # the server answers from the held socket as it says READY=1; the supervisor records it a moment later
    wait_for(lambda: mc.row("emb")["state"] == "ready", 10, what="the supervisor to record the woken server ready")
    wait_for(lambda: mc.row("emb")["state"] == "idle", 30, what="the idle stop")
    assert no_process(mc, "emb") and accepts(row["url"])
    status, _, _ = http_post(row["url"] + "/v1/embeddings", {"input": "again"}, timeout=120)
    assert status == 200
    row = mc.row("emb")
    assert row["wakes"] == 2 and row["idle_stops"] == 1 and row["last_wake_seconds"] > 0
    assert mc.cli("down").returncode == 0
    with pytest.raises(ConnectionRefusedError):
        accepts(row["url"])


@pytest.mark.slow
def test_an_openai_client_keeps_working_across_an_idle_stop(mc):
    """The openai SDK with its defaults keeps a pooled keep-alive connection; after an idle stop its
    next call (on that closed connection, which it retries) wakes the server and is answered."""
    from openai import OpenAI

    path = mc.profile({"emb": {"kind": "sentence", "start": "on-demand", "idle_timeout": "3s", "model_name": "minilm"}})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    client = OpenAI(base_url=mc.row("emb")["url"] + "/v1", api_key="-")
    assert len(client.embeddings.create(model="minilm", input="first").data[0].embedding) == 384
    wait_for(lambda: mc.row("emb")["state"] == "idle", 30, what="the idle stop")
    assert len(client.embeddings.create(model="minilm", input="after the idle stop").data[0].embedding) == 384


@pytest.mark.slow
def test_three_on_demand_minilm_servers_declared_650_mib_under_a_1400_mib_budget(mc):
    # torch's footprint (the default backend's, ONNX Runtime, is ~250 MiB: three would fit)
    servers = {
        n: {"kind": "sentence", "backend": "torch", "start": "on-demand", "idle_timeout": "10m", "memory": "650MiB"}
        for n in ("a", "b", "c")
    }
    path = mc.profile(servers, budget={"memory": "1400MiB"})
    assert mc.cli("up", "-p", str(path)).returncode == 0
    urls = {n: mc.row(n)["url"] for n in servers}
    with Sampler(mc) as sampled:
        for name in ("a", "b", "c", "a", "b", "c", "a"):
            status, body, _ = http_post(urls[name] + "/v1/embeddings", {"input": f"hello {name}"}, timeout=180)
            assert status == 200, (name, body)
    print(f"\nsampled peak {sampled.peak / MiB:.0f} MiB, at most {sampled.most_running} running")
    assert sampled.peak <= 1400 * MiB and sampled.most_running <= 2
    rows = {r.name: r for r in mc.ctl.status()}
    assert sum(r.evictions for r in rows.values()) >= 4
    assert all(r.memory_learned is not None for r in rows.values())  # measured, it replaced the declared 650 MiB
