"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd from Debian's
slurm-wlm and munge packages, with their key, config, state, spool and logs in a temporary
directory and ports of their own, so they touch nothing of the machine's.

The node declares two GPUs as GRES over stand-in character devices (mknod, as /dev/null and
/dev/zero are), so a `--gres=gpu:2` job is scheduled and sees CUDA_VISIBLE_DEVICES=0,1 from Slurm.
Every daemon and job, with their stepds and everything they started, is ended at teardown, even
when a test fails: each carries the cluster's tag in its environment.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import TAG_VAR, kill_tagged, wait_for

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")


def why_no_slurm() -> str | None:
    if os.geteuid() != 0:
        return "a test Slurm cluster runs its daemons as root (as CI does)"
    missing = [d for d in DAEMONS if not (shutil.which(d) or Path("/usr/sbin", d).exists())]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian: apt-get install slurm-wlm munge)"
    return None


def _exe(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.tag = f"slurm-{uuid.uuid4().hex[:8]}"
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf), TAG_VAR: self.tag}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: dict[int, str] = {}

    def write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "log", "dev"):
            (r / d).mkdir(parents=True, exist_ok=True)
        r.chmod(0o755)
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for i, minor in enumerate((3, 5)):  # character devices, as GPUs are: /dev/null's and /dev/zero's numbers
            os.mknod(r / "dev" / f"gpu{i}", 0o600 | 0o020000, os.makedev(1, minor))
        ctld_port, slurmd_port = _free_ports(2)
        self.conf.write_text(
            "\n".join(
                [
                    "ClusterName=modelctl-test",
                    f"SlurmctldHost={self.node}(127.0.0.1)",
                    f"SlurmctldPort={ctld_port}",
                    f"SlurmdPort={slurmd_port}",
                    "AuthType=auth/munge",
                    "CredType=cred/munge",
                    f"AuthInfo=socket={r / 'munge.socket'}",
                    f"StateSaveLocation={r / 'state'}",
                    f"SlurmdSpoolDir={r / 'spool'}",
                    f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                    f"SlurmdPidFile={r / 'slurmd.pid'}",
                    f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                    f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                    "ProctrackType=proctrack/linuxproc",
                    "TaskPlugin=task/none",
                    "SchedulerType=sched/backfill",
                    "SelectType=select/cons_tres",
                    "SelectTypeParameters=CR_CPU",
                    "SlurmdParameters=config_overrides",  # 16 CPUs declared on a 2-core machine: jobs are small
                    "ReturnToService=2",
                    "SlurmUser=root",
                    "SlurmdUser=root",
                    "MpiDefault=none",
                    "KillWait=15",
                    "MinJobAge=300",
                    "JobCompType=jobcomp/none",
                    "AccountingStorageType=accounting_storage/none",
                    "GresTypes=gpu",
                    f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs=16 RealMemory=8000 Gres=gpu:2 State=UNKNOWN",
                    "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                    "",
                ]
            )
        )
        (r / "gres.conf").write_text(f"NodeName={self.node} Name=gpu File={r / 'dev' / 'gpu'}[0-1]\n")

    def _start(self, argv: list[str]) -> None:
        with open(self.root / "log" / f"{Path(argv[0]).name}.out", "ab") as log:
            proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        self.names[proc.pid] = Path(argv[0]).name

    def start(self) -> None:
        r = self.root
        self.write_config()
        self._start(
            [
                _exe("munged"),
                "--foreground",
                "--force",
                f"--socket={r / 'munge.socket'}",
                f"--key-file={r / 'munge.key'}",
                f"--pid-file={r / 'munged.pid'}",
                f"--log-file={r / 'log' / 'munged.log'}",
                f"--seed-file={r / 'munge.seed'}",
            ]
        )
        wait_for((r / "munge.socket").exists, 20, what="munged's socket")
        self._start([_exe("slurmctld"), "-D", "-f", str(self.conf)])
        self._start([_exe("slurmd"), "-D", "-f", str(self.conf)])
        wait_for(self.node_idle, 60, interval=0.3, what=f"the Slurm node to be idle (logs: {r / 'log'})")

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), env=self.env, capture_output=True, text=True, timeout=timeout)

    def node_idle(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise AssertionError(f"{self.names[p.pid]} exited with {p.returncode}; see {self.root / 'log'}")
        res = self.run("sinfo", "--noheader", "--format=%T")
        return res.returncode == 0 and res.stdout.strip() == "idle"

    def jobs(self) -> list[tuple[str, str, str]]:
        """(id, name, state) of every job squeue still shows."""
        res = self.run("squeue", "--noheader", "--states=all", "--format=%i|%T|%j")
        out = []
        for line in res.stdout.splitlines():
            job_id, state, name = line.split("|", 2)
            out.append((job_id, name, state))
        return out

    def stop(self) -> None:
        try:
            active = [j for j, _, state in self.jobs() if state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING")]
            if active:
                self.run("scancel", *active)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and any(
                    state in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING") for _, _, state in self.jobs()
                ):
                    time.sleep(0.3)
        except (subprocess.SubprocessError, OSError, ValueError):
            pass
        finally:
            for p in reversed(self.procs):
                if p.poll() is None:
                    p.terminate()
            for p in reversed(self.procs):
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            kill_tagged(self.tag)  # stepds and whatever a job left: they carry the daemons' tag


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    why = why_no_slurm()
    if why:
        pytest.skip(why)
    # a short path: munge's socket path must fit in sun_path
    root = Path(tmp_path_factory.mktemp("slurm", numbered=True))
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
