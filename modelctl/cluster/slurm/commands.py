"""Slurm through its own commands: `sbatch --parsable`, `squeue --json` (else `squeue --format`),
`scancel`. Each honours SLURM_CONF from the environment, as Slurm's tools do.

modelctl keeps no record of a cluster's jobs: a job is found by its name (PROFILE/SERVER) in
squeue, and where it landed by the report its `modelctl run` writes to the shared state directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from modelctl.cluster.slurm.scripts import ACTIVE_STATES, Script, generate, job_name, job_servers, jobs_dir, report_path, write
from modelctl.errors import ModelctlError
from modelctl.host.files import acquire_flock
from modelctl.profile import Profile
from modelctl.spec import ServerSpec

TIMEOUT = 60.0  # seconds any one Slurm command may take


def _exe(name: str) -> str:
    exe = shutil.which(name)
    if not exe:
        raise ModelctlError(
            f"{name} is not on PATH: run this on a machine that can submit Slurm jobs (a login node), "
            "or write the scripts with `modelctl slurm generate --out DIR`"
        )
    return exe


def _run(name: str, args: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run([_exe(name), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ModelctlError(f"{name} {' '.join(args)} did not answer within {timeout:g}s: is slurmctld up?") from None
    if res.returncode != 0:
        raise ModelctlError(f"{name} {' '.join(args)} failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()}")
    return res


@dataclass(frozen=True)
class Job:
    job_id: str
    name: str
    state: str  # Slurm's: PENDING, RUNNING, COMPLETING, ...
    node: str  # where it runs ("" while pending)
    reason: str  # why it pends, or "None"

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def _state_of(value: Any) -> str:
    """squeue --json gives job_state as a string (22.05) or a list of flags (23.02 and later)."""
    if isinstance(value, list):
        return str(value[0]) if value else ""
    return str(value or "")


def parse_squeue_json(text: str) -> list[Job]:
    data = json.loads(text)
    jobs = []
    for j in data.get("jobs", []):
        node = j.get("batch_host") or j.get("nodes") or ""
        jobs.append(
            Job(
                job_id=str(j.get("job_id")),
                name=str(j.get("name", "")),
                state=_state_of(j.get("job_state")),
                node=str(node),
                reason=str(j.get("state_reason") or "None"),
            )
        )
    return jobs


FORMAT = "%i|%T|%N|%r|%j"  # the name last: it may hold anything but a newline


def parse_squeue_format(text: str) -> list[Job]:
    jobs = []
    for line in text.splitlines():
        parts = line.split("|", 4)
        if len(parts) == 5:
            job_id, state, node, reason, name = parts
            jobs.append(Job(job_id=job_id.strip(), name=name, state=state.strip(), node=node.strip(), reason=reason.strip()))
    return jobs


def squeue(names: list[str], use_json: bool | None = None) -> list[Job]:
    """The jobs with these names (every state squeue still shows). --json where this Slurm has it."""
    user = ["--me"]
    if use_json is not False:
        try:
            res = subprocess.run([_exe("squeue"), "--json", *user], capture_output=True, text=True, timeout=TIMEOUT, env=dict(os.environ))
        except subprocess.TimeoutExpired:
            raise ModelctlError(f"squeue did not answer within {TIMEOUT:g}s: is slurmctld up?") from None
        if res.returncode == 0 and res.stdout.lstrip().startswith("{"):
            return [j for j in parse_squeue_json(res.stdout) if j.name in names]
        if use_json:
            raise ModelctlError(f"squeue --json failed (exit {res.returncode}): {(res.stderr or res.stdout).strip()}")
    res = _run("squeue", ["--noheader", "--states=all", f"--format={FORMAT}", *user])
    return [j for j in parse_squeue_format(res.stdout) if j.name in names]


@contextlib.contextmanager
def _submit_lock(directory: Path) -> Iterator[None]:
    """One submit at a time per profile, so two of them cannot both find no job and both submit."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".submit.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # bounded, and names the holder: another submit waits for squeue and sbatch at most
        acquire_flock(fd, 2 * TIMEOUT, f"submitting to Slurm ({directory / '.submit.lock'})")
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Submitted:
    server: str
    job_id: str
    new: bool  # False: a job of that name was already queued or running
    state: str


def submit(profile: Profile, state_dir: Path, servers: list[str] | None = None) -> list[Submitted]:
    """sbatch each server's script, unless a job of its name is already pending or running."""
    directory = jobs_dir(state_dir, profile.name)
    scripts: list[Script] = generate(profile, state_dir, servers)
    done = []
    with _submit_lock(directory):
        active = {j.name: j for j in squeue([job_name(profile.name, s.server) for s in scripts]) if j.active}
        for s in scripts:
            name = job_name(profile.name, s.server)
            if name in active:
                done.append(Submitted(s.server, active[name].job_id, False, active[name].state))
                continue
            (path,) = write([s], directory)
            report_path(state_dir, profile.name, s.server).unlink(missing_ok=True)  # a report of an earlier job
            out = _run("sbatch", ["--parsable", str(path)]).stdout.strip()
            job_id = out.split(";", 1)[0]
            if not job_id.isdigit():
                raise ModelctlError(f"sbatch {path} answered {out!r}, not a job id")
            done.append(Submitted(s.server, job_id, True, "PENDING"))
    return done


def read_report(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def probe(spec: ServerSpec, url: str, timeout: float = 2.0) -> str:
    """The server's health, as `modelctl status` sees it: ok, or why not."""
    if not url:
        return ""
    if spec.health.kind == "none":
        return "not probed"
    if spec.health.kind == "tcp":
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        try:
            with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=timeout):
                return "ok"
        except OSError as e:
            return f"no answer: {e.strerror or e}"
    try:
        with urllib.request.urlopen(url + spec.health.path, timeout=timeout) as resp:
            return "ok" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        return f"no answer: {getattr(reason, 'strerror', None) or reason}"


@dataclass
class JobStatus:
    name: str  # PROFILE/SERVER
    state: str  # what a user wants to know: pending, starting, ready, restarting, unhealthy, ..., not submitted
    url: str
    job_id: str | None
    node: str
    job_state: str  # Slurm's, or "" when squeue no longer shows the job
    server_state: str  # from the job's report
    health: str
    restarts: int
    detail: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _why(report: dict[str, Any] | None) -> str:
    """What the job's report says about the last failure: its class, how it exited, its last line."""
    if not report:
        return ""
    parts = [str(report[k]) for k in ("last_error", "last_exit") if report.get(k)]
    if report.get("last_line"):
        parts.append(f"last line: {report['last_line']}")
    return "; ".join(parts)


def _combined(job: Job | None, report: dict[str, Any] | None, health: str) -> tuple[str, str]:
    reported = str(report.get("state")) if report else ""
    if job is None:
        if report is None:
            return "not submitted", ""
        return ("ended" if reported in ("ready", "starting", "backoff") else reported or "ended"), _why(report)
    if job.state == "PENDING":
        return "pending", job.reason if job.reason != "None" else ""
    if not job.active:
        return job.state.lower(), _why(report)
    if job.state in ("COMPLETING", "SIGNALING"):
        return "stopping", ""
    if report is None:
        return "starting", "the job runs; modelctl has not reported yet"
    if reported == "ready":
        return ("ready", "") if health in ("ok", "not probed") else ("unhealthy", health)
    if reported == "backoff":
        return "restarting", _why(report)
    return reported, _why(report)


def status(profile: Profile, state_dir: Path, use_json: bool | None = None) -> list[JobStatus]:
    names = {job_name(profile.name, s): s for s in job_servers(profile)}
    jobs = squeue(list(names), use_json=use_json)
    rows = []
    for name, server in names.items():
        mine = [j for j in jobs if j.name == name]
        job = next((j for j in mine if j.active), mine[-1] if mine else None)
        report = read_report(report_path(state_dir, profile.name, server))
        if report is not None and job is not None and str(report.get("job_id")) != job.job_id:
            report = None  # an earlier job's
        url = str(report.get("url") or "") if report else ""
        # a server that reported failed or stopped serves nothing, though its job may run a moment more
        alive = job is not None and job.state == "RUNNING" and (report or {}).get("state") not in ("failed", "stopped")
        health = probe(profile.servers[server], url) if alive and url else ""
        state, detail = _combined(job, report, health)
        rows.append(
            JobStatus(
                name=name,
                state=state,
                url=url if alive else "",
                job_id=job.job_id if job else (str(report.get("job_id")) if report and report.get("job_id") else None),
                node=(job.node if job else "") or (str(report.get("node") or "") if report else ""),
                job_state=job.state if job else "",
                server_state=str(report.get("state") or "") if report else "",
                health=health,
                restarts=int(report.get("restarts") or 0) if report else 0,
                detail=detail,
            )
        )
    return rows


def cancel(profile: Profile, servers: list[str] | None = None, timeout: float | None = None) -> list[Job]:
    """scancel the servers' jobs and wait until squeue shows none of them active."""
    names = [job_name(profile.name, s) for s in (servers or job_servers(profile))]
    jobs = [j for j in squeue(names) if j.active]
    if not jobs:
        return []
    _run("scancel", [j.job_id for j in jobs])
    longest = max(profile.servers[j.name.split("/", 1)[1]].stop_timeout for j in jobs)
    deadline = time.monotonic() + (timeout if timeout is not None else longest + 90)
    ids = {j.job_id for j in jobs}
    while True:
        left = [j for j in squeue(names) if j.job_id in ids and j.active]
        if not left:
            return jobs
        if time.monotonic() > deadline:
            raise ModelctlError(
                "still ending after scancel: " + ", ".join(f"{j.name} (job {j.job_id}, {j.state} on {j.node or '?'})" for j in left)
            )
        time.sleep(0.5)
