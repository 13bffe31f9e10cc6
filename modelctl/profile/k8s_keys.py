"""The `k8s:` keys of a profile (defaults for every server) and of a server, checked like every
other key: a wrong one names the file, the server and the key."""

from __future__ import annotations

import re
from typing import Any

from modelctl.spec import (
    Key,
    KeyProblem,
    check_bool,
    check_choice,
    check_count,
    check_port,
    check_section,
    check_str,
    check_str_list,
    describe,
    required,
)

# Kubernetes quantities: 500m, 2, 8Gi, 1.5G
_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
# label and annotation keys: an optional DNS prefix, then a name
_LABEL_KEY = re.compile(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def check_quantity(value: Any) -> str:
    text = str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _QUANTITY.fullmatch(text):
        raise ValueError(f"must be a Kubernetes quantity like 2, 500m or 8Gi, got {describe(value)}")
    return text


def check_resource_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of resource: quantity (cpu: 2, memory: 8Gi), got {describe(value)}")
    out = {}
    for name, qty in value.items():
        if not isinstance(name, str) or not _LABEL_KEY.fullmatch(name):
            raise ValueError(f"{describe(name)} is not a resource name")
        if name == "nvidia.com/gpu":
            raise ValueError("GPUs come from the server's gpus: key, not from resources")
        out[name] = check_quantity(qty)
    return out


def check_label_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of label: value, got {describe(value)}")
    out = {}
    for k, v in value.items():
        text = str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        if not isinstance(k, str) or not _LABEL_KEY.fullmatch(k) or not isinstance(text, str) or not _LABEL_VALUE.fullmatch(text):
            raise ValueError(f"{describe(k)}: {describe(v)} is not a valid label")
        out[k] = text
    return out


def check_annotations(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError(f"must be a mapping of annotation: text, got {describe(value)}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _LABEL_KEY.fullmatch(k):
            raise ValueError(f"{describe(k)} is not a valid annotation key")
        out[k] = check_str(str(v))
    return out


def check_dns_name(value: Any) -> str:
    if not isinstance(value, str) or not _DNS_NAME.fullmatch(value):
        raise ValueError(f"must be a DNS-1123 name (lower-case letters, digits, '-'), got {describe(value)}")
    return value


def check_secret_names(value: Any) -> list[str]:
    names = value if isinstance(value, list) else [value]
    return [check_dns_name(name) for name in names]


TOLERATION_KEYS = {
    "key": Key(check_str, doc="the taint's key"),
    "operator": Key(check_choice("Equal", "Exists"), doc="Equal or Exists"),
    "value": Key(check_str, doc="the taint's value"),
    "effect": Key(check_choice("NoSchedule", "PreferNoSchedule", "NoExecute"), doc="the taint's effect"),
    "toleration_seconds": Key(check_count, doc="seconds a NoExecute taint is tolerated"),
}


def check_tolerations(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ValueError(f"must be a list of tolerations, got {describe(value)}")
    return [check_section(item, TOLERATION_KEYS, f"tolerations[{i}]") for i, item in enumerate(value)]


RESOURCE_KEYS = {
    "requests": Key(check_resource_map, doc="what the scheduler reserves (cpu: 2, memory: 8Gi)"),
    "limits": Key(check_resource_map, doc="the most the container may use"),
}

CACHE_KEYS = {
    "enabled": Key(check_bool, doc="mount a model cache volume (default: for kinds that download models)"),
    "size": Key(check_quantity, doc="the volume's size (default 20Gi)"),
    "storage_class": Key(check_dns_name, doc="the StorageClass (default: the cluster's)"),
    "path": Key(check_str, doc="where the volume is mounted (default: where the kind keeps models)"),
}

VOLUME_KEYS = {
    "claim": required(check_dns_name, "an existing PersistentVolumeClaim"),
    "path": required(check_str, "where it is mounted (read-only)"),
}


def _section(keys: dict[str, Key]) -> Any:
    return lambda value: check_section(value, keys, "")


def _nested(check: Any, name: str) -> Any:
    def checked(value: Any) -> Any:
        try:
            return check(value)
        except KeyProblem as e:
            raise KeyProblem(f"{name}{e.key}", e.message) from None

    return checked


COMMON = {
    "image": Key(check_str, doc="the container image"),
    "image_pull_policy": Key(check_choice("Always", "IfNotPresent", "Never"), doc="Always | IfNotPresent | Never"),
    "node_selector": Key(check_label_map, doc="node labels the pod must run on"),
    "tolerations": Key(check_tolerations, doc="taints the pod tolerates (GPU nodes)"),
    "cache": Key(_nested(_section(CACHE_KEYS), "cache"), doc="the model cache volume: {size, storage_class, enabled}"),
    "service_type": Key(check_choice("ClusterIP", "NodePort", "LoadBalancer"), doc="the Service's type (default ClusterIP)"),
    "annotations": Key(check_annotations, doc="pod annotations"),
}

SERVER_KEYS: dict[str, Key] = {
    **COMMON,
    "replicas": Key(check_count, doc="pods (default 1)"),
    "resources": Key(_nested(_section(RESOURCE_KEYS), "resources"), doc="{requests, limits} besides GPUs"),
    "port": Key(check_port, doc="the container port (default: the server's port, or the kind's)"),
    "model_volume": Key(_nested(_section(VOLUME_KEYS), "model_volume"), doc="{claim, path}: a PVC with model files, mounted read-only"),
    "shm_size": Key(check_quantity, doc="shared memory for tensor parallelism (default 16Gi)"),
    "command": Key(check_str_list, doc="kind command: the argv in the image, if it differs from the local one (same placeholders)"),
}

PROFILE_KEYS: dict[str, Key] = {
    **COMMON,
    "namespace": Key(check_dns_name, doc="the namespace objects go to"),
    "image_pull_secrets": Key(check_secret_names, doc="secrets for private registries"),
}


def check_server_k8s(value: Any) -> dict[str, Any]:
    return check_section(value, SERVER_KEYS, "k8s")


def check_profile_k8s(value: Any) -> dict[str, Any]:
    return check_section(value, PROFILE_KEYS, "k8s")
