"""A Slurm job's GPUs are Slurm's: on a real one-node Slurm (tests/slurm_cluster.py, two GPUs
declared as GRES), a server whose job got GPU 1, because another job holds GPU 0, runs on GPU 1,
where modelctl's own discovery on that node (MODELCTL_GPUS=0,1) would have chosen GPU 0."""

from __future__ import annotations

import json

import pytest

from .conftest import http_get, wait_for
from .slurm_cluster import Cluster, slurm  # noqa: F401 - the fixture
from .test_slurm import ready, slurm_cli, toy_profile

pytestmark = pytest.mark.slow


def test_a_gpu_server_runs_on_the_gres_that_slurm_allocated_not_on_what_discovery_would_pick(mc, slurm):  # noqa: F811
    """Fails if `modelctl run --gpus inherit` is ignored (the server would get GPU 0, the first
    GPU that discovery lists, instead of Slurm's GPU 1)."""
    cluster: Cluster = slurm
    blocker = cluster.run(
        "sbatch", "--parsable", "--gres=gpu:1", "--job-name=holds-gpu-0", f"--output={mc.tmp / 'holds-gpu-0.out'}", "--wrap", "sleep 600"
    )
    assert blocker.returncode == 0, blocker.stderr
    blocker_id = blocker.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: (blocker_id, "holds-gpu-0", "RUNNING") in cluster.jobs(), 30, interval=0.3, what="the job that holds GPU 0")
        path = toy_profile(mc, cluster, gpus=1)
        res = mc.cli("slurm", "submit", "-p", str(path), env={"SLURM_CONF": str(cluster.conf), "MODELCTL_GPUS": "0,1"})
        assert res.returncode == 0, res.stdout + res.stderr
        try:
            row = wait_for(lambda: ready(mc, cluster, path), 60, interval=0.3, what="the GPU job ready")
            info = http_get(row["url"] + "/info")[1]
            assert info["env"]["CUDA_VISIBLE_DEVICES"] == "1", json.dumps(info["env"], indent=1)
        finally:
            assert slurm_cli(mc, cluster, "cancel", "-p", str(path)).returncode == 0
    finally:
        cluster.run("scancel", blocker_id)
