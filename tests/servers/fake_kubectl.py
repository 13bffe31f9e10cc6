"""A stand-in for the kubectl verbs modelctl uses, for machines without a cluster.

    apply -k DIR | delete --ignore-not-found -k DIR | get deployments -l SEL -o json [-n NS]

Objects live in $FAKE_KUBECTL_STATE (JSON); `apply -k` renders DIR with the real
`kubectl kustomize` when kubectl is installed (so a broken kustomization fails here as it would
there), else reads the files. Every call is appended to $FAKE_KUBECTL_LOG. Deployments report
$FAKE_KUBECTL_READY ready replicas (default: all of them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml


def objects_of(directory: str) -> list[dict]:
    real = shutil.which("kubectl")
    if real:
        out = subprocess.run([real, "kustomize", directory], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            sys.exit(1)
        return [d for d in yaml.safe_load_all(out.stdout) if d]
    kust = yaml.safe_load((Path(directory) / "kustomization.yaml").read_text())
    docs = [yaml.safe_load((Path(directory) / r).read_text()) for r in kust["resources"]]
    for d in docs:
        if kust.get("namespace") and d["kind"] != "Namespace":
            d["metadata"]["namespace"] = kust["namespace"]
    return docs


def key(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('namespace', 'default')}/{obj['metadata']['name']}"


def main(argv: list[str]) -> int:
    state_path = Path(os.environ["FAKE_KUBECTL_STATE"])
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    with open(os.environ["FAKE_KUBECTL_LOG"], "a") as log:
        log.write(json.dumps(argv) + "\n")
    if argv[0] == "apply" and "-k" in argv:
        for obj in objects_of(argv[argv.index("-k") + 1]):
            verb = "configured" if key(obj) in state else "created"
            state[key(obj)] = obj
            print(f"{obj['kind'].lower()}/{obj['metadata']['name']} {verb}")
    elif argv[0] == "delete" and "-k" in argv:
        for obj in objects_of(argv[argv.index("-k") + 1]):
            if state.pop(key(obj), None) is not None:
                print(f'{obj["kind"].lower()} "{obj["metadata"]["name"]}" deleted')
    elif argv[:2] == ["get", "deployments"]:
        selector = dict(kv.split("=", 1) for kv in argv[argv.index("-l") + 1].split(","))
        namespace = argv[argv.index("-n") + 1] if "-n" in argv else "default"
        items = []
        for obj in state.values():
            labels = obj["metadata"].get("labels", {})
            if (
                obj["kind"] == "Deployment"
                and obj["metadata"].get("namespace", "default") == namespace
                and all(labels.get(k) == v for k, v in selector.items())
            ):
                wanted = obj["spec"].get("replicas", 1)
                ready = int(os.environ.get("FAKE_KUBECTL_READY", wanted))
                status = {"replicas": wanted, "readyReplicas": ready, "updatedReplicas": wanted, "conditions": [
                    {"type": "Available", "status": str(ready >= wanted), "message": "Deployment has minimum availability."},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable" if ready >= wanted else "ReplicaSetUpdated",
                     "message": f'ReplicaSet "{obj["metadata"]["name"]}" is progressing.'},
                ]}  # fmt: skip
                items.append({**obj, "status": status})
        print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    else:
        print(f"fake kubectl: unsupported: {argv}", file=sys.stderr)
        return 1
    state_path.write_text(json.dumps(state))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
