"""A plain wheel (not an editable install) works from any directory: every package is in it, and
the embedded default profile and the examples ship inside it."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT


def build_wheel(tmp_path: Path) -> Path:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = dist.glob("modelctl-*.whl")
    return wheel


def package_dirs() -> set[str]:
    """Every directory of modelctl/ and servers/ that holds Python modules."""
    found = set()
    for top in ("modelctl", "servers"):
        for path in (ROOT / top).rglob("*.py"):
            found.add(str(path.parent.relative_to(ROOT)))
    return found


def test_a_wheel_carries_every_package_and_the_profiles(tmp_path):
    with zipfile.ZipFile(build_wheel(tmp_path)) as z:
        names = z.namelist()
    in_wheel = {str(Path(n).parent) for n in names if n.endswith(".py")}
    assert package_dirs() - in_wheel == set()
    assert "modelctl/profiles/default.yaml" in names and "modelctl/profiles/examples/vllm.yaml" in names


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_runs_up_and_down_on_the_default_profile_from_outside_the_checkout(tmp_path):
    """The wheel is installed into a new venv; its dependencies come from this environment's
    site-packages through PYTHONPATH, where .pth files (and so this checkout's editable install)
    are not read: whatever the wheel lacks, the run lacks."""
    wheel = build_wheel(tmp_path)
    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    deps = os.pathsep.join(site.getsitepackages())
    env = {k: v for k, v in os.environ.items() if k not in ("MODELCTL_PROFILE", "PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PYTHONPATH=deps, MODELCTL_STATE_DIR=str(tmp_path / "state"), HF_HUB_OFFLINE="1")
    python = venv / "bin" / "python"
    # pip from this environment installs into the new one (it has no pip of its own)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(python), "-c", "import modelctl; print(modelctl.__file__)"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr
    modelctl = [str(venv / "bin" / "modelctl")]
    try:
        up = subprocess.run([*modelctl, "up"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        status = subprocess.run([*modelctl, "status", "--json"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=60)
        rows = json.loads(status.stdout)
        assert sorted(r["id"] for r in rows) == ["default/embed", "default/gateway", "default/rerank"] and {r["state"] for r in rows} == {
            "ready"
        }
    finally:
        down = subprocess.run([*modelctl, "down"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
