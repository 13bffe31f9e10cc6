"""kubectl for the generated objects: `apply -k`, `delete -k`, and the servers' rollout state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from modelctl.cluster.k8s.manifests import MANAGED_BY, Generated, dns_name
from modelctl.errors import ModelctlError


def kubectl() -> str:
    exe = os.environ.get("MODELCTL_KUBECTL") or shutil.which("kubectl")
    if not exe:
        raise ModelctlError("kubectl is not on PATH: install it, or run `modelctl k8s generate --out DIR` and apply DIR yourself")
    return exe


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    try:
        res = subprocess.run([kubectl(), *args], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise ModelctlError(f"kubectl {' '.join(args)} did not finish within {timeout:g}s") from None
    if res.returncode != 0:
        raise ModelctlError(f"kubectl {' '.join(args)} failed (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")
    return res


def _with_dir(generated: Generated, out: Path | None, verb: list[str]) -> str:
    if out is not None:
        generated.write(out)
        return _run([*verb, "-k", str(out)]).stdout
    with tempfile.TemporaryDirectory(prefix="modelctl-k8s-") as tmp:
        generated.write(Path(tmp))
        return _run([*verb, "-k", tmp]).stdout


def apply(generated: Generated, out: Path | None = None) -> str:
    return _with_dir(generated, out, ["apply"])


def delete(generated: Generated, out: Path | None = None) -> str:
    return _with_dir(generated, out, ["delete", "--ignore-not-found"])


def status(profile_name: str, namespace: str | None) -> list[dict[str, Any]]:
    """One row per Deployment of the profile: replicas wanted, ready, updated, and why not."""
    selector = f"app.kubernetes.io/part-of={dns_name(profile_name)},app.kubernetes.io/managed-by={MANAGED_BY}"
    args = ["get", "deployments", "-l", selector, "-o", "json"]
    args += ["-n", namespace] if namespace else []
    items = json.loads(_run(args, timeout=60).stdout or "{}").get("items", [])
    rows = []
    for d in sorted(items, key=lambda d: d["metadata"]["name"]):
        spec, st = d.get("spec", {}), d.get("status", {})
        conditions = {c.get("type"): c for c in st.get("conditions", [])}
        progressing = conditions.get("Progressing", {})
        available = conditions.get("Available", {})
        wanted, ready = spec.get("replicas", 1), st.get("readyReplicas", 0)
        state = "ready" if ready >= wanted > 0 else ("failed" if progressing.get("reason") == "ProgressDeadlineExceeded" else "starting")
        rows.append(
            {
                "name": d["metadata"]["name"],
                "server": d["metadata"].get("labels", {}).get("app.kubernetes.io/name", ""),
                "namespace": d["metadata"].get("namespace"),
                "state": state,
                "replicas": wanted,
                "ready": ready,
                "updated": st.get("updatedReplicas", 0),
                "detail": (progressing.get("message") if state != "ready" else available.get("message")) or "",
            }
        )
    return rows
