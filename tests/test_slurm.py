"""Slurm: the scripts a profile compiles to (golden files for every shipped profile, valid bash),
the `slurm:` keys, and `modelctl slurm submit/status/cancel` against a real one-node Slurm
(munged, slurmctld and slurmd started by tests/slurm_cluster.py; skipped without root or
slurm-wlm). Regenerate the golden files with MODELCTL_UPDATE_GOLDEN=1."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from modelctl.cluster.slurm import commands, scripts
from modelctl.errors import ProfileError
from modelctl.foreground import inherit_gpus
from modelctl.profile import load_profile, parse_profile, parse_server
from modelctl.profile.slurm_keys import time_seconds

from .conftest import ROOT, TOY_SERVER, http_get, wait_for
from .slurm_cluster import Cluster, slurm  # noqa: F401 - the fixture

ALL_PROFILES = [ROOT / "profiles" / "default.yaml", *sorted((ROOT / "profiles" / "examples").glob("*.yaml"))]
# a profile with an on-demand server cannot run as Slurm jobs (test below)
PROFILES = [p for p in ALL_PROFILES if not any(s.start == "on-demand" for s in load_profile(p).servers.values())]
GOLDEN = ROOT / "tests" / "golden" / "slurm"
SHARED = Path("/shared/modelctl")  # a state directory on the cluster's shared filesystem, for the golden files
VENV_MODELCTL = "/opt/venv/bin/python -m modelctl"  # the generating modelctl, fixed for the golden files


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.stem)
def test_golden_scripts(path):
    rendered = {s.name: s.text for s in scripts.generate(load_profile(path), SHARED, modelctl=VENV_MODELCTL)}
    golden = GOLDEN / path.stem
    if os.environ.get("MODELCTL_UPDATE_GOLDEN"):
        golden.mkdir(parents=True, exist_ok=True)
        for old in golden.iterdir():
            old.unlink()
        for name, text in rendered.items():
            (golden / name).write_text(text)
    assert sorted(rendered) == sorted(p.name for p in golden.iterdir()), f"regenerate with MODELCTL_UPDATE_GOLDEN=1 ({golden})"
    for name, text in rendered.items():
        assert text == (golden / name).read_text(), f"{golden / name} differs (MODELCTL_UPDATE_GOLDEN=1 to accept)"
        assert subprocess.run(["bash", "-n"], input=text, text=True, capture_output=True).returncode == 0, name
        server = name.removesuffix(".sbatch")
        prof = load_profile(path)
        spec = prof.servers[server]
        lines = [line.removeprefix("#SBATCH ") for line in text.splitlines() if line.startswith("#SBATCH ")]
        assert f"--job-name={prof.name}/{server}" in lines
        assert f"--signal=B:TERM@{int(spec.stop_timeout) + scripts.SIGNAL_MARGIN}" in lines
        assert (f"--gres=gpu:{spec.gpu_count}" in lines) == bool(spec.gpu_count)


def test_the_generated_script_maps_the_profile(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_text(
        """
slurm:
  partition: gpu
  account: lab42
  time: "1-00:00:00"
  modules: [cuda/12.4]
  setup: ["source $HOME/venvs/vllm/bin/activate"]
  sbatch: [--exclusive, --mail-type=END]
servers:
  llm:
    kind: vllm
    model: /models/llama
    gpus: 2
    stop_timeout: 45
    env: {HF_HOME: /scratch/hf}
    slurm: {qos: high, gpu_type: a100, mem: 64G, cpus_per_task: 8, constraint: "a100&nvlink"}
  embed:
    kind: sentence
    model: /models/minilm
"""
    )
    prof = load_profile(path)
    by_name = {s.server: s.text for s in scripts.generate(prof, tmp_path / "state")}
    llm = by_name["llm"]
    for line in (
        "#SBATCH --job-name=lab/llm",
        f"#SBATCH --output={tmp_path / 'state' / 'slurm' / 'lab' / 'llm'}.%j.log",
        "#SBATCH --gres=gpu:a100:2",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=lab42",
        "#SBATCH --qos=high",
        "#SBATCH --time=1-00:00:00",
        "#SBATCH --constraint=a100&nvlink",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64G",
        "#SBATCH --signal=B:TERM@75",
        "#SBATCH --exclusive",
        "#SBATCH --mail-type=END",
        "module load cuda/12.4",
        "source $HOME/venvs/vllm/bin/activate",
        "    env: {HF_HOME: /scratch/hf}",  # the profile passes through as written
    ):
        assert line in llm.splitlines(), line
    assert re.search(r"run llm --profile \"\$job\"/lab.yaml --host 0.0.0.0 --gpus inherit --restart-in-place --report ", llm)
    embed = by_name["embed"]
    assert "--gres" not in embed and "#SBATCH --partition=gpu" in embed and "--qos" not in embed  # per-server keys stay there
    assert scripts.generate(prof, tmp_path / "state") == scripts.generate(load_profile(path), tmp_path / "state")  # deterministic


@pytest.mark.parametrize(
    ("slurm_keys", "key", "words"),
    [
        ({"partition": "gpu; rm -rf ~"}, "slurm.partition", "Slurm name"),
        ({"time": "soon"}, "slurm.time", "Slurm time"),
        ({"mem": "lots"}, "slurm.mem", "Slurm memory"),
        ({"sbatch": ["--gres=gpu:8"]}, "slurm.sbatch", "written by modelctl"),
        ({"sbatch": ["exclusive"]}, "slurm.sbatch", "long sbatch options"),
        ({"nodes": 2}, "slurm.nodes", "unknown key"),
        ({"setup": ["a\nb"]}, "slurm.setup", "newlines"),
    ],
)
def test_a_wrong_slurm_key_names_file_server_and_key(slurm_keys, key, words):
    with pytest.raises(ProfileError) as err:
        parse_profile({"servers": {"web": {"kind": "command", "command": ["x", "{port}"], "slurm": slurm_keys}}}, "lab.yaml")
    text = str(err.value)
    assert "lab.yaml" in text and "web" in text and key in text and words in text, text
    with pytest.raises(ProfileError) as err:
        parse_profile({"slurm": slurm_keys, "servers": {"web": {"kind": "command", "command": ["x", "{port}"]}}}, "lab.yaml")
    assert key in str(err.value) and "lab.yaml" in str(err.value)


def test_a_time_limit_shorter_than_startup_and_stop_is_refused():
    assert time_seconds("90") == 5400 and time_seconds("1:30") == 90 and time_seconds("2:00:00") == 7200
    assert time_seconds("1-02") == 93600 and time_seconds("1-0:0:30") == 86430 and time_seconds("UNLIMITED") is None
    with pytest.raises(ProfileError) as err:
        parse_profile({"slurm": {"time": "5"}, "servers": {"llm": {"kind": "vllm", "model": "/m"}}}, "lab.yaml")
    assert "llm" in str(err.value) and "slurm.time" in str(err.value) and "startup_timeout (900s)" in str(err.value)
    parse_profile({"slurm": {"time": "30"}, "servers": {"llm": {"kind": "vllm", "model": "/m"}}}, "lab.yaml")


def test_the_jobs_run_the_modelctl_that_wrote_them_by_its_absolute_path(tmp_path):
    """A job's shell has no activated venv: a bare `modelctl` is another one, or none (the systemd
    units call the venv's interpreter too)."""
    path = tmp_path / "lab.yaml"
    path.write_text("servers:\n  web: {kind: command, command: [x, '{port}']}\n")
    (job,) = scripts.generate(load_profile(path), tmp_path / "state")
    command = next(line for line in job.text.splitlines() if " run web " in line)
    assert command.startswith(f"{shlex.quote(sys.executable)} -m modelctl --state-dir "), command


def run_script(text: str, cwd: Path) -> subprocess.CompletedProcess:
    """A generated script run by bash as a job would, with `true` for modelctl: what the shell does
    with the words is what is looked at."""
    return subprocess.run(
        ["bash", "-c", text], cwd=cwd, env={**os.environ, "SLURM_JOB_ID": "7", "TMPDIR": str(cwd)}, capture_output=True, text=True
    )


@pytest.mark.parametrize(
    "slurm_keys",
    [
        {"host": '"$job"; touch pwned; #'},
        {"host": "$(touch pwned)"},
        {"host": "a b; touch pwned"},
        {"modelctl": "true; touch pwned"},
    ],
)
def test_every_word_from_the_profile_is_quoted_in_the_script(tmp_path, slurm_keys):
    path = tmp_path / "lab.yaml"
    keys = {"modelctl": "true", **slurm_keys}
    path.write_text(yaml.safe_dump({"servers": {"web": {"kind": "command", "command": ["x", "{port}"], "slurm": keys}}}))
    (job,) = scripts.generate(load_profile(path), tmp_path / "state")
    run_script(job.text, tmp_path)
    assert not (tmp_path / "pwned").exists(), job.text


@pytest.mark.parametrize(
    ("slurm_keys", "key"),
    [
        ({"constraint": "a100 --exclusive"}, "slurm.constraint"),
        ({"constraint": "a100\t--gres=gpu:8"}, "slurm.constraint"),
        ({"sbatch": ["--mail-type=END --gres=gpu:8"]}, "slurm.sbatch"),
        ({"sbatch": ['--comment="a --exclusive"']}, "slurm.sbatch"),
    ],
)
def test_a_value_with_spaces_cannot_put_a_second_option_on_an_sbatch_line(slurm_keys, key):
    with pytest.raises(ProfileError) as err:
        parse_profile({"servers": {"web": {"kind": "command", "command": ["x", "{port}"], "slurm": slurm_keys}}}, "lab.yaml")
    assert key in str(err.value) and "web" in str(err.value) and "lab.yaml" in str(err.value)
    parse_profile(
        {"servers": {"web": {"kind": "command", "command": ["x", "{port}"], "slurm": {"constraint": "[a100*2&nvlink]|h100"}}}}, "l.yaml"
    )


def test_an_on_demand_server_is_refused_for_slurm_with_file_server_and_key(mc):
    """Its job would exit once idle, and nothing would start it again: refused, not generated."""
    path = ROOT / "profiles" / "examples" / "on-demand.yaml"
    prof = load_profile(path)
    server = next(s.name for s in prof.servers.values() if s.start == "on-demand")
    with pytest.raises(ProfileError) as err:
        scripts.generate(prof, mc.state_dir)
    assert str(path) in str(err.value) and server in str(err.value) and "key 'start'" in str(err.value)
    for args in (["generate", "-p", str(path)], ["submit", "-p", str(path)]):
        res = mc.cli("slurm", *args)
        assert res.returncode == 2 and res.stdout == "", res.stdout + res.stderr
        assert len(res.stderr.strip().splitlines()) == 1 and "start: always" in res.stderr, res.stderr


def test_a_gateway_is_no_slurm_job_left_out_with_why_and_refused_by_name(mc, tmp_path):
    """Each job keeps modelctl's state on its node, where a gateway would find no server: the
    default profile (which has one) gives jobs for its two servers and says why the gateway is not
    one; naming the gateway is refused with the file and the key."""
    path = ROOT / "profiles" / "default.yaml"
    prof = load_profile(path)
    assert prof.servers["gateway"].kind == "gateway"
    assert [s.server for s in scripts.generate(prof, mc.state_dir)] == ["embed", "rerank"]
    res = mc.cli("slurm", "generate", "-p", str(path), "--out", str(tmp_path / "jobs"))
    assert res.returncode == 0 and sorted(p.name for p in (tmp_path / "jobs").iterdir()) == ["embed.sbatch", "rerank.sbatch"]
    assert "left out: gateway: the gateway reads modelctl's records on its own machine" in res.stderr, res.stderr
    res = mc.cli("slurm", "generate", "-p", str(path), "gateway")
    assert res.returncode == 2 and res.stdout == "", res.stdout + res.stderr
    assert str(path) in res.stderr and "key 'gateway'" in res.stderr and "cannot run as a Slurm job" in res.stderr, res.stderr


def test_inherited_gpus_are_the_jobs_as_they_are():
    spec = parse_server("llm", {"kind": "vllm", "model": "/m", "gpus": 2, "env": {"CUDA_VISIBLE_DEVICES": "7"}}, "p.yaml", "p")
    inherited = inherit_gpus(spec, "2,3")
    assert inherited.gpus == 0 and inherited.env["CUDA_VISIBLE_DEVICES"] == "2,3"  # Slurm's value, never modelctl's
    assert inherited.options["tensor_parallel_size"] == 2
    assert "CUDA_VISIBLE_DEVICES" not in inherit_gpus(spec, None).env


def test_squeue_parsers_read_slurm_output():
    text = json.dumps(
        {
            "jobs": [
                {"job_id": 7, "name": "lab/llm", "job_state": "RUNNING", "batch_host": "gpu01", "nodes": "gpu01", "state_reason": "None"},
                {"job_id": 8, "name": "lab/embed", "job_state": ["PENDING"], "nodes": "", "state_reason": "Resources"},
            ]
        }
    )
    a, b = commands.parse_squeue_json(text)
    assert (a.job_id, a.name, a.state, a.node, a.active) == ("7", "lab/llm", "RUNNING", "gpu01", True)
    assert (b.state, b.reason) == ("PENDING", "Resources")  # 23.02 and later: job_state is a list of flags
    (c,) = commands.parse_squeue_format("9|COMPLETED|gpu02|None|lab/a|b\n")
    assert (c.job_id, c.state, c.name, c.active) == ("9", "COMPLETED", "lab/a|b", False)


# ------------------------------------------------------------------ a real Slurm
def toy_profile(mc, cluster: Cluster, **server) -> Path:
    return mc.profile(
        {
            "web": {
                "kind": "command",
                "command": [sys.executable, TOY_SERVER, "--port", "{port}", "--host", "{host}"],
                "health": {"http": "/health"},
                "stop_timeout": 3,
                "restart": {"backoff": 0.2},
                **server,
            }
        },
        name="lab",
        port_range=[27100, 27999],
        slurm={"modelctl": f"{sys.executable} -m modelctl", "time": "10"},
    )


def slurm_cli(mc, cluster: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return mc.cli("slurm", *args, env={"SLURM_CONF": str(cluster.conf), "PYTHONPATH": str(ROOT)}, timeout=timeout)


def status_of(mc, cluster: Cluster, path: Path) -> dict:
    res = slurm_cli(mc, cluster, "status", "-p", str(path), "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    (row,) = json.loads(res.stdout)
    return row


def ready(mc, cluster: Cluster, path: Path, other_than: int | None = None) -> dict | None:
    row = status_of(mc, cluster, path)
    if row["state"] != "ready":
        return None
    if other_than is not None and json.loads(Path(report_of(mc)).read_text())["pid"] == other_than:
        return None
    return row


def report_of(mc) -> Path:
    return scripts.report_path(mc.state_dir, "lab", "web")


@pytest.mark.slow
def test_a_server_runs_as_a_slurm_job_restarts_in_place_and_is_cancelled(mc, slurm):  # noqa: F811
    path = toy_profile(mc, slurm, env={"TOY_VALUE": "$(echo expanded) $HOME `id`"})
    t0 = time.monotonic()
    res = slurm_cli(mc, slurm, "submit", "-p", str(path))
    assert res.returncode == 0 and "lab/web: submitted job" in res.stdout, res.stdout + res.stderr
    row = wait_for(lambda: ready(mc, slurm, path), 60, interval=0.3, what=f"the job ready ({slurm.root / 'log'})")
    submit_to_ready = time.monotonic() - t0
    assert set(row) >= {"name", "state", "url", "job_id", "node"} and row["name"] == "lab/web"
    assert row["node"] == slurm.node and row["job_state"] == "RUNNING" and row["health"] == "ok"
    assert re.fullmatch(rf"http://{slurm.node}:27\d\d\d", row["url"]), row["url"]  # an auto port from the profile's range
    status, info = http_get(row["url"] + "/info")
    assert status == 200
    assert info["env"]["SLURM_JOB_ID"] == row["job_id"]  # it runs inside the job
    assert info["env"]["TOY_VALUE"] == "$(echo expanded) $HOME `id`"  # the profile reaches the job as written
    port = int(row["url"].rsplit(":", 1)[1])
    listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN]
    assert listening == ["0.0.0.0"]  # slurm.host's default: reachable from the other nodes
    human = slurm_cli(mc, slurm, "status", "-p", str(path))
    assert "lab/web" in human.stdout and "ready" in human.stdout and row["url"] in human.stdout, human.stdout

    # a second submit of a running server does not start a duplicate
    again = slurm_cli(mc, slurm, "submit", "-p", str(path))
    assert again.returncode == 0 and f"already running, not submitted again: job {row['job_id']}" in again.stdout, again.stdout
    assert [j for j in slurm.jobs() if j[1] == "lab/web" and j[2] in ("PENDING", "RUNNING")] == [(row["job_id"], "lab/web", "RUNNING")]

    # SIGKILL the server: the job's modelctl run brings it back on the same node and URL, same job
    os.kill(info["pid"], signal.SIGKILL)
    t1 = time.monotonic()
    back = wait_for(lambda: ready(mc, slurm, path, other_than=info["pid"]), 30, interval=0.2, what="the server back")
    kill_to_back = time.monotonic() - t1
    assert back["url"] == row["url"] and back["job_id"] == row["job_id"] and back["restarts"] == 1
    assert http_get(back["url"] + "/info")[1]["pid"] != info["pid"]

    # cancel returns once the job is gone, and the port is free
    res = slurm_cli(mc, slurm, "cancel", "-p", str(path))
    assert res.returncode == 0 and f"lab/web: job {row['job_id']} ended" in res.stdout, res.stdout + res.stderr
    assert not [j for j in slurm.jobs() if j[0] == row["job_id"] and j[2] in ("PENDING", "RUNNING", "COMPLETING")]
    assert not [c for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN]
    gone = status_of(mc, slurm, path)
    assert gone["state"] in ("cancelled", "stopped", "ended") and gone["url"] == "", gone
    assert json.loads(report_of(mc).read_text())["state"] == "stopped"  # modelctl run stopped it the way down does
    log = next((mc.state_dir / "slurm" / "lab").glob(f"web.{row['job_id']}.log")).read_text()
    assert "ready at" in log
    print(f"\nSlurm: submit to ready {submit_to_ready:.1f}s, SIGKILL to back {kill_to_back:.1f}s")


@pytest.mark.slow
def test_a_gpu_server_gets_the_jobs_gpus_from_slurm(mc, slurm):  # noqa: F811
    path = toy_profile(mc, slurm, gpus=2)
    script = scripts.generate(load_profile(path), mc.state_dir)[0].text
    assert "#SBATCH --gres=gpu:2" in script.splitlines()
    res = slurm_cli(mc, slurm, "submit", "-p", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    try:
        row = wait_for(lambda: ready(mc, slurm, path), 60, interval=0.3, what="the GPU job ready")
        info = http_get(row["url"] + "/info")[1]
        assert info["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"  # from Slurm's GRES allocation, not from modelctl's discovery
        # squeue's two output forms agree about the job
        names = ["lab/web"]
        as_json, as_text = commands_squeue(slurm, names, True), commands_squeue(slurm, names, False)
        assert [(j.job_id, j.state, j.node) for j in as_json] == [(j.job_id, j.state, j.node) for j in as_text]
        assert [(j.job_id, j.state) for j in as_json if j.active] == [(row["job_id"], "RUNNING")]
    finally:
        assert slurm_cli(mc, slurm, "cancel", "-p", str(path)).returncode == 0


def commands_squeue(cluster: Cluster, names: list[str], use_json: bool) -> list[commands.Job]:
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        return commands.squeue(names, use_json=use_json)
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF")
        else:
            os.environ["SLURM_CONF"] = old


@pytest.mark.slow
def test_a_server_that_cannot_start_ends_its_job_and_says_why(mc, slurm):  # noqa: F811
    path = toy_profile(
        mc, slurm, command=[sys.executable, TOY_SERVER, "--exit-code", "3", "--port", "{port}"], restart={"max_failures": 2, "backoff": 0.1}
    )
    res = slurm_cli(mc, slurm, "submit", "-p", str(path))
    assert res.returncode == 0, res.stdout + res.stderr
    row = wait_for(
        # "crashed" passes too: the runner reports it while it cleans up a failed instance, before it
        # decides to restart (reported as "restarting") or to give up ("failed", and the job ends)
        lambda: (r := status_of(mc, slurm, path))["state"] not in ("pending", "starting", "restarting", "crashed") and r,
        60,
        interval=0.3,
        what="the job to end",
    )
    assert row["url"] == "" and "exit" in row["detail"], row
    assert json.loads(report_of(mc).read_text())["state"] == "failed"
