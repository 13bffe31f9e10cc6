"""One sbatch script per server: the job runs `modelctl run SERVER` on the node it lands on.

The mapping (README, "Slurm"):
- the job is named PROFILE/SERVER, so `slurm status`, `slurm cancel` and a second `submit` find it;
- `gpus: N` (or a list of N ids) asks for `--gres=gpu:N` (`gpu:TYPE:N` with slurm.gpu_type), and
  the server sees the GPUs Slurm gave the job: `modelctl run --gpus inherit` never overrides
  Slurm's CUDA_VISIBLE_DEVICES;
- `stop_timeout` gives `--signal=B:TERM@SECONDS`: the batch shell hears SIGTERM that long before
  the time limit, and `modelctl run` stops the server cleanly through the same path as `down`;
- slurm.partition, account, qos, time, constraint, cpus_per_task, mem and sbatch give the other
  `#SBATCH` lines; modules are loaded and setup lines run before modelctl;
- the profile is embedded in the script as it was submitted, so env, model paths and the rest pass
  through unchanged, and editing the file later does not change a queued job;
- every word of the job's command line that comes from the profile is quoted; the command is
  this modelctl by its absolute path (slurm.modelctl overrides it), as the systemd units do;
- an on-demand server is refused: its job would end when it is idle, and nothing restarts it;
- a gateway is no job: it reads the records of its own machine, and each job keeps its own on its node;
- inside the job, the supervisor's restart policy brings a crashed server back on the same node
  and port without a new job (`--restart-in-place`), and `--report` writes where it landed
  (node, port, URL, state) to STATE/slurm/PROFILE/SERVER.json on the shared filesystem.

The output is deterministic: the same profile and state directory give the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelctl.errors import ProfileError
from modelctl.profile import Profile
from modelctl.spec import ServerSpec

# seconds between the --signal warning and the time limit, besides the server's own stop_timeout
SIGNAL_MARGIN = 30
ACTIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING", "STAGE_OUT")


def job_name(profile: str, server: str) -> str:
    return f"{profile}/{server}"


def jobs_dir(state_dir: Path, profile: str) -> Path:
    """Where a profile's scripts, job output and reports live: on the cluster's shared filesystem."""
    return state_dir / "slurm" / profile


def report_path(state_dir: Path, profile: str, server: str) -> Path:
    return jobs_dir(state_dir, profile) / f"{server}.json"


def settings(profile: Profile, spec: ServerSpec) -> dict[str, Any]:
    """The server's slurm: keys over the profile's."""
    return {**profile.slurm, **spec.slurm}


@dataclass(frozen=True)
class Script:
    server: str
    name: str  # the file name
    text: str


def sbatch_lines(profile: Profile, spec: ServerSpec, state_dir: Path) -> list[str]:
    s = settings(profile, spec)
    out = jobs_dir(state_dir, profile.name)
    lines = [
        f"--job-name={job_name(profile.name, spec.name)}",
        f"--output={out / spec.name}.%j.log",
        "--nodes=1",
        "--ntasks=1",
    ]
    if spec.gpu_count:
        gres = f"gpu:{s['gpu_type']}:{spec.gpu_count}" if s.get("gpu_type") else f"gpu:{spec.gpu_count}"
        lines.append(f"--gres={gres}")
    for key, option in (("partition", "partition"), ("account", "account"), ("qos", "qos"), ("time", "time")):
        if s.get(key) is not None:
            lines.append(f"--{option}={s[key]}")
    if s.get("constraint"):
        lines.append(f"--constraint={s['constraint']}")
    if s.get("cpus_per_task"):
        lines.append(f"--cpus-per-task={s['cpus_per_task']}")
    if s.get("mem"):
        lines.append(f"--mem={s['mem']}")
    lines.append(f"--signal=B:TERM@{math.ceil(spec.stop_timeout) + SIGNAL_MARGIN}")
    lines += s.get("sbatch") or []
    return lines


def _delimiter(text: str) -> str:
    """A here-document delimiter that no line of the text equals."""
    tag = "MODELCTL_PROFILE_" + hashlib.sha256(text.encode()).hexdigest()[:12].upper()
    assert tag not in text.splitlines()
    return tag


def default_modelctl() -> str:
    """The modelctl that generates the scripts, by its absolute path (a venv's, like the systemd
    units'): a job's shell has no activated venv, and a bare `modelctl` may be another or none."""
    return shlex.join([sys.executable, "-m", "modelctl"])


class InJob(str):
    """A path inside the job's own directory: written as "$job" followed by the quoted rest."""


def shell_word(word: str) -> str:
    """One word of the job's command line. Every word that comes from the profile is quoted."""
    if isinstance(word, InJob):
        return '"$job"' + shlex.quote(str(word))
    return shlex.quote(word)


def script(profile: Profile, spec: ServerSpec, state_dir: Path, profile_text: str, modelctl: str | None = None) -> Script:
    s = settings(profile, spec)
    q = shlex.quote
    report = report_path(state_dir, profile.name, spec.name)
    command_words = shlex.split(s.get("modelctl") or modelctl or default_modelctl())
    host = s.get("host") or "0.0.0.0"
    run: list[str] = [
        *command_words,
        "--state-dir",
        InJob("/state"),
        "run",
        spec.name,
        "--profile",
        InJob(f"/{profile.name}.yaml"),
        "--host",
        host,
        "--gpus",
        "inherit",
        "--restart-in-place",
        "--report",
        str(report),
    ]
    command = " ".join(shell_word(a) for a in run)
    delimiter = _delimiter(profile_text)
    body = [
        "#!/bin/bash",
        f"# {job_name(profile.name, spec.name)}: written by `modelctl slurm generate` from {Path(profile.path).name}",
        *(f"#SBATCH {line}" for line in sbatch_lines(profile, spec, state_dir)),
        "",
        "set -euo pipefail",
        *(f"module load {q(m)}" for m in s.get("modules") or []),
        *(s.get("setup") or []),
        "",
        "# a node-local directory for this job: the profile as submitted, and modelctl's own state",
        'job="${TMPDIR:-/tmp}/modelctl-slurm-${SLURM_JOB_ID}"',
        'mkdir -p "$job"',
        "trap 'rm -rf \"$job\"' EXIT",
        f"cat > {shell_word(InJob(f'/{profile.name}.yaml'))} <<'{delimiter}'",
        profile_text.rstrip("\n"),
        delimiter,
        "",
        "# modelctl run restarts a crashed server in place; SIGTERM (scancel, or --signal before the",
        "# time limit) stops it the way `modelctl down` does",
        f"{command} &",
        "child=$!",
        "trap 'kill -TERM \"$child\" 2>/dev/null' TERM INT",
        'status=0; wait "$child" || status=$?',
        'while kill -0 "$child" 2>/dev/null; do wait "$child" || status=$?; done',
        'exit "$status"',
        "",
    ]
    return Script(server=spec.name, name=f"{spec.name}.sbatch", text="\n".join(body))


def refuse_on_demand(profile: Profile, spec: ServerSpec) -> None:
    """An on-demand server's `modelctl run` exits once it has been idle: under systemd its .socket
    unit starts it again at the next client, but a Slurm job that ended is gone for good."""
    if spec.start == "on-demand":
        raise ProfileError(
            profile.path,
            "on-demand cannot run as a Slurm job: the job would end after idle_timeout and nothing would start it again "
            "at the next client; set `start: always` for this server (a job holds its node for its whole time limit "
            "anyway), or leave it out: modelctl slurm generate -p PROFILE SERVER...",
            server=spec.name,
            key="start",
        )


NOT_A_JOB = {
    "gateway": "the gateway reads modelctl's records on its own machine, and each Slurm job keeps its state on its node, "
    "so a gateway job would find no server; clients call each job's reported URL (modelctl slurm status)",
}


def job_servers(profile: Profile) -> list[str]:
    """The servers that become jobs, in the profile's order: all but a gateway (NOT_A_JOB)."""
    return [name for name, spec in profile.servers.items() if spec.kind not in NOT_A_JOB]


def left_out(profile: Profile) -> list[str]:
    """`SERVER: why` for each server of the profile that is no job."""
    return [f"{name}: {NOT_A_JOB[spec.kind]}" for name, spec in profile.servers.items() if spec.kind in NOT_A_JOB]


def generate(profile: Profile, state_dir: Path, servers: list[str] | None = None, modelctl: str | None = None) -> list[Script]:
    """The scripts for the profile's servers (all that can be jobs, or those named), in the
    profile's order. `modelctl`: the command the jobs run (default: this one, by its absolute path)."""
    text = Path(profile.path).read_text()
    specs: Mapping[str, ServerSpec] = profile.servers
    names = servers or job_servers(profile)
    for name in names:
        if specs[name].kind in NOT_A_JOB:
            raise ProfileError(profile.path, f"cannot run as a Slurm job: {NOT_A_JOB[specs[name].kind]}", key="gateway")
        refuse_on_demand(profile, specs[name])
    return [script(profile, specs[name], state_dir, text, modelctl) for name in names]


def write(scripts: list[Script], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in scripts:
        path = out / s.name
        path.write_text(s.text)
        path.chmod(0o755)
        paths.append(path)
    return paths
