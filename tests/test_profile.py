"""Profiles: valid ones become typed specs; wrong ones name the file, the server and the key."""

from __future__ import annotations

import pytest

from modelctl.errors import ProfileError
from modelctl.profile import default_profile_path, load_profile


def write(tmp_path, text: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_defaults_are_filled_in(tmp_path):
    prof = load_profile(write(tmp_path, "servers:\n  a:\n    kind: command\n    command: [x, '{port}']\n"))
    spec = prof.servers["a"]
    assert spec.port is None and spec.host == "127.0.0.1" and spec.gpus == 0
    assert spec.health.kind == "tcp" and spec.restart.policy == "always"
    assert spec.startup_timeout == 60.0 and spec.stop_timeout == 10.0
    assert prof.name == "p"


def test_bundled_default_profile_has_embedding_and_rerank_servers():
    prof = load_profile(default_profile_path())
    tasks = {s.options["task"] for s in prof.servers.values() if s.kind == "sentence"}
    assert tasks == {"embedding", "rerank"}
    assert prof.servers["gateway"].kind == "gateway" and prof.servers["gateway"].port == 8702  # one URL for both


def test_profile_env_var_is_used_without_path(tmp_path, monkeypatch):
    path = write(tmp_path, "servers:\n  only:\n    kind: command\n    command: [x, '{port}']\n")
    monkeypatch.setenv("MODELCTL_PROFILE", str(path))
    assert list(load_profile().servers) == ["only"]


@pytest.mark.parametrize(
    "body, server, key, words",
    [
        ("  a:\n    kind: command\n    command: [x, '{port}']\n    colour: red\n", "a", "colour", "unknown key"),
        ("  a:\n    kind: command\n    command: [x, '{port}']\n    port: eighty\n", "a", "port", "1-65535"),
        ("  a:\n    kind: command\n    command: 'python -m http.server'\n", "a", "command", "never a shell string"),
        ("  a:\n    kind: command\n    command: [x, '{prot}']\n", "a", "command", "unknown placeholder {prot}"),
        ("  a:\n    command: [x]\n", "a", "kind", "missing"),
        ("  a:\n    kind: teapot\n", "a", "kind", "one of"),
        ("  a:\n    kind: vllm\n", "a", "model", "missing"),
        ("  a:\n    kind: command\n    command: [x, '{port}']\n    gpus: yes\n", "a", "gpus", "count"),
        ("  a:\n    kind: command\n    command: [x, '{port}']\n    health: {http: health}\n", "a", "health.http", "starting with '/'"),
        ("  a:\n    kind: command\n    command: [x, '{port}']\n    restart: {max_failures: 0}\n", "a", "restart.max_failures", "from 1 to"),
        ("  a:\n    kind: command\n    command: [x, '{port}']\n    env: {1BAD: x}\n", "a", "env", "not a valid environment variable name"),
        ("  a:\n    kind: sentence\n    device: cuda\n", "a", "device", "needs GPUs"),
        ("  a:\n    kind: vllm\n    model: m\n    args: ['--port', '9']\n", "a", "args", "set by modelctl"),
        ("  a:\n    kind: sentence\n    backend: tensorrt\n", "a", "backend", "one of auto, torch, onnx, openvino"),
        ("  a:\n    kind: sentence\n    backend: openvino\n    quantize: int8\n", "a", "quantize", "for backend: onnx"),
        ("  a:\n    kind: sentence\n    quantize: int8\n", "a", "quantize", "for backend: onnx"),
        ("  a:\n    kind: sentence\n    backend: onnx\n    gpus: 1\n", "a", "backend", "runs on the CPU"),
    ],
)
def test_bad_server_key_names_file_server_and_key(tmp_path, body, server, key, words):
    path = write(tmp_path, "servers:\n" + body)
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    msg = str(e.value)
    assert str(path) in msg and f"server '{server}'" in msg and f"key '{key}'" in msg, msg
    assert words in msg, msg


def test_duplicate_ports_name_both_servers(tmp_path):
    path = write(
        tmp_path,
        "servers:\n  a:\n    kind: command\n    command: [x, '{port}']\n    port: 9000\n  b:\n    kind: command\n    command: [y, '{port}']\n    port: 9000\n",
    )
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert "server 'b'" in str(e.value) and "key 'port'" in str(e.value) and "server 'a'" in str(e.value)


def test_invalid_yaml_gives_the_line(tmp_path):
    path = write(tmp_path, "servers:\n  a:\n    kind: command\n   command: [x\n")
    with pytest.raises(ProfileError, match=r"invalid YAML at line \d+"):
        load_profile(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "nope.yaml")


def test_unknown_top_level_key(tmp_path):
    with pytest.raises(ProfileError, match="key 'server'"):
        load_profile(write(tmp_path, "server:\n  a: {}\n"))


def test_fingerprint_changes_with_the_spec(tmp_path):
    a = load_profile(write(tmp_path, "servers:\n  a:\n    kind: command\n    command: [x, '{port}']\n")).servers["a"]
    b = load_profile(write(tmp_path, "servers:\n  a:\n    kind: command\n    command: [y, '{port}']\n")).servers["a"]
    assert a.fingerprint != b.fingerprint


# ---------------------------------------------------------------------- hostile and careless input
@pytest.mark.parametrize(
    "body, key",
    [
        ("    restart: {backoff: .nan}\n", "restart.backoff"),
        ("    stop_timeout: .inf\n", "stop_timeout"),
        ("    startup_timeout: 1e20\n", "startup_timeout"),
        ("    health: {http: /health, interval: .nan}\n", "health.interval"),
        ("    restart: {max_failures: 100000000000}\n", "restart.max_failures"),
        ("    restart: {window: -.inf}\n", "restart.window"),
    ],
)
def test_numbers_must_be_finite_and_bounded(tmp_path, body, key):
    path = write(tmp_path, "servers:\n  a:\n    kind: command\n    command: [x, '{port}']\n" + body)
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert f"key '{key}'" in str(e.value) and "server 'a'" in str(e.value)


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    import time

    # nested aliases inside a valid key: 10^12 values once expanded (an error message's repr of
    # it used to run for minutes, eating memory)
    items = ["&a0 [x, x, x, x, x, x, x, x, x, x]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 12)]
    path = write(tmp_path, "servers:\n  web:\n    kind: command\n    command: [x, '{port}']\n    description: [" + ", ".join(items) + "]\n")
    t0 = time.monotonic()
    with pytest.raises(ProfileError, match="alias bomb"):
        load_profile(path)
    assert time.monotonic() - t0 < 5


def test_a_self_referring_alias_is_refused(tmp_path):
    path = write(tmp_path, "servers: &s {web: {kind: command, command: [x, '{port}'], env: *s}}\n")
    with pytest.raises(ProfileError, match="refers to a node that contains it"):
        load_profile(path)


def test_an_error_never_prints_a_huge_value_in_full(tmp_path):
    path = write(tmp_path, "servers:\n  a:\n    kind: command\n    command: [x, '{port}']\n    port: '" + "9" * 100_000 + "'\n")
    with pytest.raises(ProfileError) as e:
        load_profile(path)
    assert "key 'port'" in str(e.value) and len(str(e.value)) < 500


def test_a_huge_profile_file_is_refused(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("# " + "x" * (2 << 20) + "\nservers: {}\n")
    with pytest.raises(ProfileError, match="larger than"):
        load_profile(path)


@pytest.mark.parametrize("name", ["ok\n", "-dash", "a/b", "x" * 64, ""])
def test_server_names_must_match_in_full(tmp_path, name):
    import yaml

    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"servers": {name: {"kind": "command", "command": ["x", "{port}"]}}}))
    with pytest.raises(ProfileError, match="server names use"):
        load_profile(path)


def test_env_values_may_not_contain_newlines(tmp_path):
    import yaml

    path = tmp_path / "p.yaml"
    evil = {"kind": "command", "command": ["x", "{port}"], "env": {"A": "1\nExecStartPre=/bin/sh -c 'id > /tmp/pwned'\n[Install]"}}
    path.write_text(yaml.safe_dump({"servers": {"web": evil}}))
    with pytest.raises(ProfileError, match=r"key 'env'.*newlines"):
        load_profile(path)


def test_a_command_that_never_uses_its_port_is_refused(tmp_path):
    path = write(tmp_path, "servers:\n  a:\n    kind: command\n    command: [python3, -m, http.server]\n")
    with pytest.raises(ProfileError, match=r"key 'command'.*never uses \{port\}"):
        load_profile(path)


@pytest.mark.parametrize("extra", ["    port_env: PORT\n", "    port: 8123\n    command: [python3, -m, http.server, '8123']\n"])
def test_a_port_from_the_environment_or_a_fixed_port_in_the_argv_is_fine(tmp_path, extra):
    body = "servers:\n  a:\n    kind: command\n" + ("" if "command" in extra else "    command: [python3, -m, http.server]\n") + extra
    assert load_profile(write(tmp_path, body)).servers["a"].kind == "command"
