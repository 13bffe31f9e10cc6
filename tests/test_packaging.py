"""A plain wheel (not an editable install) works from any directory: the embedded default
profile and the examples ship inside it."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import ROOT


def test_a_wheel_carries_the_default_profile_and_works_from_any_directory(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("modelctl-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        z.extractall(site)
    assert "modelctl/profiles/default.yaml" in names and "modelctl/profiles/examples/vllm.yaml" in names
    assert "servers/sentence/app.py" in names

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MODELCTL_PROFILE", "PYTHONPATH")}
    env.update(PYTHONPATH=str(site), MODELCTL_STATE_DIR=str(tmp_path / "state"))
    code = "import modelctl, modelctl.profile as p; print(modelctl.__file__); print(p.default_profile_path()); print(sorted(p.load_profile().servers))"
    out = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    module, profile, servers = out.stdout.splitlines()
    assert Path(module).is_relative_to(site) and Path(profile) == site / "modelctl" / "profiles" / "default.yaml"
    assert servers == "['embed', 'rerank']"
    # the CLI without -p finds the embedded default (units name its servers)
    res = subprocess.run(
        [sys.executable, "-m", "modelctl", "systemd", "generate"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0 and "modelctl-default-embed.service" in res.stdout, res.stderr
