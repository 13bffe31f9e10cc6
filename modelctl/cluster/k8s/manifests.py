"""A profile → Kubernetes objects: per server a Deployment and a Service (and a model cache
PersistentVolumeClaim, an API-key Secret where needed), plus a kustomization.yaml.

What the supervisor does locally, Kubernetes does here: restarts (the Deployment), GPUs (the
device plugin, from `nvidia.com/gpu` limits — never CUDA_VISIBLE_DEVICES), placement (node
selectors, tolerations), health (probes from the profile's health spec). The output is
deterministic — same profile, same bytes — so it diffs cleanly in git.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from modelctl import __version__
from modelctl.backends import get_backend
from modelctl.backends.base import ClusterContainer
from modelctl.errors import ProfileError
from modelctl.profile import Profile
from modelctl.spec import KeyProblem, ServerSpec

DEFAULT_IMAGE = f"modelctl-sentence:{__version__}"  # built from the Containerfile
PRE_STOP_SECONDS = 5  # endpoints drop the pod before it gets SIGTERM
STARTUP_PERIOD = 10
LIVENESS_PERIOD = 10
DEFAULT_CACHE_SIZE = "20Gi"
DEFAULT_SHM_SIZE = "16Gi"
GPU = "nvidia.com/gpu"
MANAGED_BY = "modelctl"


class _PlainDumper(yaml.SafeDumper):
    """No anchors and aliases: every manifest reads on its own."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


@dataclass(frozen=True)
class ClusterOptions:
    namespace: str | None = None  # else the profile's k8s.namespace
    image: str | None = None  # the bundled server's image; else the profile's k8s.image, else DEFAULT_IMAGE
    create_namespace: bool = False


@dataclass(frozen=True)
class Generated:
    files: dict[str, dict[str, Any]]  # file name → object (kustomization.yaml included)
    skipped: list[str]  # servers that do not run in the cluster, and why
    namespace: str | None

    def render(self) -> dict[str, str]:
        return {
            name: yaml.dump(obj, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, width=200)
            for name, obj in self.files.items()
        }

    def stream(self) -> str:
        """The objects as one YAML stream for `kubectl apply -f -`: no Kustomization (kubectl -f
        rejects it), so each object carries the namespace the Kustomization would have set."""
        docs = []
        for name, each in self.files.items():
            if each.get("kind") == "Kustomization":
                continue
            obj = each
            if self.namespace and obj.get("kind") != "Namespace":
                obj = {**obj, "metadata": {**obj.get("metadata", {}), "namespace": self.namespace}}
            text = yaml.dump(obj, Dumper=_PlainDumper, sort_keys=False, default_flow_style=False, width=200)
            docs.append(f"---\n# {name}\n{text}")
        return "".join(docs)

    def write(self, out: Path) -> list[Path]:
        """The files; a Secret's is written 0600 (it holds an API key), the others 0644."""
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name, text in self.render().items():
            path = out / name
            mode = 0o600 if self.is_secret(name) else 0o644
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            with os.fdopen(fd, "w") as f:
                os.fchmod(f.fileno(), mode)  # an existing file keeps its mode on open: set it
                f.write(text)
            paths.append(path)
        return paths

    def is_secret(self, name: str) -> bool:
        return self.files[name].get("kind") == "Secret"


def dns_name(*parts: str) -> str:
    """A DNS-1035 label from names that allow `_`, `.` and upper case; long ones end in a hash."""
    raw = re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", "-".join(parts).lower())).strip("-")
    if not raw or not raw[0].isalpha():
        raw = f"m-{raw}"
    if len(raw) > 52:  # room for the longest suffix (-api-key) within 63
        raw = f"{raw[:43].rstrip('-')}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
    return raw


def cluster_port(spec: ServerSpec) -> int:
    """Fixed in the cluster: the k8s port, else the profile's port, else the kind's own."""
    return int(spec.k8s.get("port") or spec.port or get_backend(spec.kind).cluster_port)


def startup_budget(spec: ServerSpec) -> int:
    """Seconds the startup probe allows: initialDelay (0) + period × failureThreshold."""
    return STARTUP_PERIOD * _startup_failures(spec)


def _startup_failures(spec: ServerSpec) -> int:
    return math.ceil(spec.startup_timeout / STARTUP_PERIOD) + 1


def probes(spec: ServerSpec) -> dict[str, Any]:
    """Startup covers startup_timeout; readiness is quick; liveness is slow, like the vLLM
    production-stack and TEI charts — a busy server is not killed for one slow answer."""
    h = spec.health
    if h.kind == "none":
        return {}
    handler: dict[str, Any] = {"httpGet": {"path": h.path, "port": "http"}} if h.kind == "http" else {"tcpSocket": {"port": "http"}}
    timeout = max(1, math.ceil(h.timeout))
    liveness_failures = max(3, math.ceil(h.grace / LIVENESS_PERIOD))
    return {
        "startupProbe": {
            **handler,
            "periodSeconds": STARTUP_PERIOD,
            "timeoutSeconds": timeout,
            "failureThreshold": _startup_failures(spec),
        },
        "readinessProbe": {
            **handler,
            "periodSeconds": max(1, min(5, math.ceil(h.interval))),
            "timeoutSeconds": timeout,
            "failureThreshold": 3,
        },
        "livenessProbe": {**handler, "periodSeconds": LIVENESS_PERIOD, "timeoutSeconds": timeout, "failureThreshold": liveness_failures},
    }


def generate(profile: Profile, options: ClusterOptions = ClusterOptions()) -> Generated:
    """Every object of the profile; ProfileError (file, server, key) for what cannot be generated."""
    namespace = options.namespace or profile.k8s.get("namespace")
    default_image = options.image or profile.k8s.get("image") or DEFAULT_IMAGE
    files: dict[str, dict[str, Any]] = {}
    skipped = []
    names: dict[str, str] = {}
    for spec in profile.servers.values():
        try:
            container = get_backend(spec.kind).cluster(spec, cluster_port(spec), default_image)
        except KeyProblem as e:
            raise ProfileError(profile.path, e.message, server=spec.name, key=e.key) from None
        if container is None:
            skipped.append(f"{spec.ref}: {get_backend(spec.kind).not_in_cluster(spec)}")
            continue
        name = dns_name(profile.name, spec.name)
        if name in names:
            raise ProfileError(
                profile.path, f"has the same Kubernetes name ({name}) as server '{names[name]}'; rename one", server=spec.name
            )
        names[name] = spec.name
        for suffix, obj in _server_objects(profile, spec, container, name, namespace).items():
            files[f"{name}.{suffix}.yaml"] = obj
    if namespace and options.create_namespace:
        files["namespace.yaml"] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": namespace, "labels": {"app.kubernetes.io/managed-by": MANAGED_BY}},
        }
    kustomization: dict[str, Any] = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    if namespace:
        kustomization["namespace"] = namespace
    kustomization["resources"] = sorted(files)
    files = dict(sorted(files.items()))
    files["kustomization.yaml"] = kustomization
    return Generated(files, skipped, namespace)


def _labels(profile: Profile, spec: ServerSpec, name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": dns_name(spec.name),
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": spec.kind,
        "app.kubernetes.io/part-of": dns_name(profile.name),
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _meta(name: str, namespace: str | None, labels: Mapping[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = dict(labels)
    return meta


def expand_safe(value: str) -> str:
    """A literal for the fields where Kubernetes expands `$(NAME)` and turns `$$` into `$`
    (env values, command, args): every `$` doubled, so the pod gets exactly what the profile says."""
    return value.replace("$", "$$")


def _server_objects(profile: Profile, spec: ServerSpec, c: ClusterContainer, name: str, namespace: str | None) -> dict[str, dict[str, Any]]:
    k = {**profile.k8s, **spec.k8s}  # the server's keys over the profile's defaults
    labels = _labels(profile, spec, name)
    selector = {"app.kubernetes.io/instance": name, "app.kubernetes.io/part-of": labels["app.kubernetes.io/part-of"]}
    objects: dict[str, dict[str, Any]] = {}
    volumes, mounts = _volumes(profile, spec, c, k, name, namespace, labels, objects)
    env = _env(spec, c, name, namespace, labels, objects)
    container = _container(spec, c, k, env, mounts)
    pod = _pod(spec, c, k, container, mounts, volumes)
    template_meta: dict[str, Any] = {"labels": labels}
    if k.get("annotations"):
        template_meta["annotations"] = dict(k["annotations"])
    # two pods would need twice the GPUs, or the same ReadWriteOnce volume: replace, never surge
    recreate = bool(spec.gpu_count) or "cache.pvc" in objects
    strategy: dict[str, Any] = (
        {"type": "Recreate"} if recreate else {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    )
    objects["deployment"] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, namespace, labels),
        "spec": {
            "replicas": int(k.get("replicas", 1)),
            "selector": {"matchLabels": selector},
            "strategy": strategy,
            "progressDeadlineSeconds": startup_budget(spec) + 120,
            "template": {"metadata": template_meta, "spec": pod},
        },
    }
    port = cluster_port(spec)
    objects["service"] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, namespace, labels),
        "spec": {
            "type": k.get("service_type", "ClusterIP"),
            "selector": selector,
            "ports": [{"name": "http", "port": port, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return objects


def _volumes(
    profile: Profile,
    spec: ServerSpec,
    c: ClusterContainer,
    k: Mapping[str, Any],
    name: str,
    namespace: str | None,
    labels: Mapping[str, str],
    objects: dict[str, dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the container's mounts: the model cache (a claim of its own), a
    claim with model files, and /dev/shm for tensor parallelism."""
    mounts: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    cache = {**(profile.k8s.get("cache") or {}), **(spec.k8s.get("cache") or {})}
    # a server that writes its own cache: section wants the volume; else the kind decides
    wanted = cache.get("enabled", True if "cache" in spec.k8s else c.downloads)
    cache_path = cache.get("path", c.cache_path)
    if cache_path and wanted:
        claim = f"{name}-cache"
        pvc_spec: dict[str, Any] = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": cache.get("size", DEFAULT_CACHE_SIZE)}},
        }
        if cache.get("storage_class"):
            pvc_spec["storageClassName"] = cache["storage_class"]
        objects["cache.pvc"] = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": _meta(claim, namespace, labels),
            "spec": pvc_spec,
        }
        volumes.append({"name": "cache", "persistentVolumeClaim": {"claimName": claim}})
        mounts.append({"name": "cache", "mountPath": cache_path})
    if k.get("model_volume"):
        mv = k["model_volume"]
        volumes.append({"name": "models", "persistentVolumeClaim": {"claimName": mv["claim"], "readOnly": True}})
        mounts.append({"name": "models", "mountPath": mv["path"], "readOnly": True})
    if c.shm:
        volumes.append({"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": k.get("shm_size", DEFAULT_SHM_SIZE)}})
        mounts.append({"name": "shm", "mountPath": "/dev/shm"})
    return volumes, mounts


def _env(
    spec: ServerSpec, c: ClusterContainer, name: str, namespace: str | None, labels: Mapping[str, str], objects: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    """The container's environment, values escaped; an API key goes into a Secret instead."""
    env = {**spec.env, **c.env, "MODELCTL_SERVER": str(spec.ref)}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # the device plugin decides which GPUs the pod sees
    env_list: list[dict[str, Any]] = [{"name": key, "value": expand_safe(value)} for key, value in sorted(env.items())]
    if c.secret_env:
        secret = f"{name}-api-key"
        objects["api-key.secret"] = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(secret, namespace, labels),
            "type": "Opaque",
            "stringData": dict(c.secret_env),
        }
        env_list += [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}} for key in sorted(c.secret_env)]
    return env_list


def _container(
    spec: ServerSpec, c: ClusterContainer, k: Mapping[str, Any], env: list[dict[str, Any]], mounts: list[dict[str, Any]]
) -> dict[str, Any]:
    resources: dict[str, dict[str, Any]] = {kind: dict(values) for kind, values in (k.get("resources") or {}).items()}
    if spec.gpu_count:
        resources.setdefault("requests", {})[GPU] = spec.gpu_count
        resources.setdefault("limits", {})[GPU] = spec.gpu_count
    container: dict[str, Any] = {"name": "server", "image": c.image}
    if k.get("image_pull_policy"):
        container["imagePullPolicy"] = k["image_pull_policy"]
    if c.command:
        container["command"] = [expand_safe(a) for a in c.command]
    if c.args:
        container["args"] = [expand_safe(a) for a in c.args]
    if c.working_dir:
        container["workingDir"] = c.working_dir
    container["ports"] = [{"name": "http", "containerPort": cluster_port(spec), "protocol": "TCP"}]
    container["env"] = env
    if resources:
        container["resources"] = resources
    container.update(probes(spec))
    container["lifecycle"] = {"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}}
    if mounts:
        container["volumeMounts"] = mounts
    return container


def _pod(
    spec: ServerSpec,
    c: ClusterContainer,
    k: Mapping[str, Any],
    container: dict[str, Any],
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
) -> dict[str, Any]:
    pod: dict[str, Any] = {}
    if c.init_script:
        pod["initContainers"] = [
            {
                "name": "fetch-model",
                "image": c.image,
                "command": ["/bin/sh", "-c", expand_safe(c.init_script)],
                "volumeMounts": [m for m in mounts if m["name"] != "shm"],
            }
        ]
    pod["containers"] = [container]
    pod["terminationGracePeriodSeconds"] = PRE_STOP_SECONDS + math.ceil(spec.stop_timeout) + 5
    if k.get("node_selector"):
        pod["nodeSelector"] = dict(k["node_selector"])
    tolerations = [_toleration(t) for t in k.get("tolerations") or []]
    if spec.gpu_count and not any(t.get("key") == GPU for t in tolerations):
        tolerations.append({"key": GPU, "operator": "Exists", "effect": "NoSchedule"})  # GPU nodes are often tainted
    if tolerations:
        pod["tolerations"] = tolerations
    if k.get("image_pull_secrets"):
        pod["imagePullSecrets"] = [{"name": s} for s in k["image_pull_secrets"]]
    if volumes:
        pod["volumes"] = volumes
    return pod


def _toleration(t: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: t[key] for key in ("key", "operator", "value", "effect") if key in t}
    if "toleration_seconds" in t:
        out["tolerationSeconds"] = t["toleration_seconds"]
    return out
