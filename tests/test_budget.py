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
def rss_of(mc) -> int:
    """The resident memory of every server process of this test, summed."""
    total = 0
    for p in psutil.process_iter(["cmdline", "memory_info"]):
        try:
            cmd = p.info["cmdline"] or []
            ours = LISTEN_SERVER in cmd or "servers.sentence" in " ".join(cmd)
            if ours and p.environ().get("MODELCTL_TEST_TAG") == mc.tag:
                total += p.info["memory_info"].rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


class Sampler:
    """Samples the servers' resident memory and how many run, every 50 ms, in a thread."""

    def __init__(self, mc):
        self.mc, self.peak, self.most_running, self._stop = mc, 0, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_of(self.mc))
            self.most_running = max(self.most_running, sum(r.state in lc.ALIVE for r in self.mc.ctl.status()))
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
    assert mc.row("emb")["state"] == "ready"
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
    servers = {n: {"kind": "sentence", "start": "on-demand", "idle_timeout": "10m", "memory": "650MiB"} for n in ("a", "b", "c")}
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
