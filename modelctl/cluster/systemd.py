"""systemd units from a profile: one service per server (`modelctl run NAME`) and a target.

Ports and GPUs are resolved when the units are written — an `auto` port becomes a number in
the unit — so the servers come back at boot where clients expect them. Unit names carry the
profile (modelctl-<profile>-<server>.service), so two profiles' servers never collide.

A server that can take a socket gets a `.socket` unit beside its service (`ListenStream=`,
`Accept=no`): systemd holds the listening socket across restarts of the service, exactly as
the supervisor does, and `modelctl run` hands it on to the server (fd 3, LISTEN_FDS).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from modelctl.backends import get_backend
from modelctl.errors import ModelctlError
from modelctl.host.gpus import allocate_gpus, discover_gpus
from modelctl.names import unit_name
from modelctl.profile import Profile
from modelctl.spec import ServerSpec
from modelctl.state.leases import PortRequest, allocate_ports
from modelctl.state.store import StateStore

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# time systemd gives `modelctl run` beyond the server's own timeouts (start-up of modelctl itself)
START_SLACK_SECONDS = 30
STOP_SLACK_SECONDS = 5


def target_name(profile: Profile) -> str:
    return f"modelctl-{profile.name}.target"


def unit_dir(user: bool) -> Path:
    if user:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
        return Path(base) / "systemd" / "user"
    return Path("/etc/systemd/system")


def _quote(value: str) -> str:
    """Quote one word for ExecStart= / Environment= (systemd's own quoting rules).

    A newline or other control character would end the line and inject directives: refused.
    """
    if _CONTROL.search(value):
        raise ModelctlError(f"cannot write {value[:60]!r} into a systemd unit: it contains a newline or control character")
    if value and not any(c in value for c in " \t\"'\\$%;"):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "$$").replace("%", "%%")
    return f'"{escaped}"'


def resolve_allocations(profile: Profile, store: StateStore) -> tuple[dict[str, int | None], dict[str, list[int]]]:
    """Fixed ports (auto → the server's recorded port, else a free one) and GPU ids, by the same
    rule as `up` (modelctl/state/leases.py), without leasing: generating units starts nothing."""
    records = {r.ref: r for r in store.records()}
    requests = []
    for spec in profile.servers.values():
        old = records.get(spec.ref)
        previous = old.port if old else None  # the server's own port, even if it runs now
        requests.append(PortRequest.of(spec, previous, previous, get_backend(spec.kind).is_external(spec)))
    held = {r.port: r.label for r in records.values() if r.port and r.ref.profile != profile.name}
    ports = allocate_ports(requests, profile.port_range, held).ports
    gpu_requests = {s.name: (s.gpus, s.gpus_shared) for s in profile.servers.values() if s.gpu_count}
    gpus = allocate_gpus(gpu_requests, discover_gpus(), {}) if gpu_requests else {}
    return {ref.name: port for ref, port in ports.items()}, gpus


def socket_unit_name(profile: Profile, spec: ServerSpec) -> str:
    return unit_name(profile.name, spec.name).removesuffix(".service") + ".socket"


def listen_address(host: str, port: int) -> str:
    if host in ("", "*"):
        return str(port)
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def socket_unit(profile: Profile, spec: ServerSpec, port: int) -> str:
    """The listening socket systemd holds for the server across restarts of its service."""
    return "\n".join(
        [
            "[Unit]",
            f"Description=modelctl socket of {spec.kind} server {spec.name} (profile {profile.name})",
            f"PartOf={target_name(profile)}",
            "",
            "[Socket]",
            f"ListenStream={listen_address(spec.host, port)}",
            "Accept=no",
            f"Backlog={spec.backlog}",
            "FileDescriptorName=http",
            f"Service={unit_name(profile.name, spec.name)}",
            "",
            "[Install]",
            f"WantedBy={target_name(profile)}",
            "",
        ]
    )


def service_unit(profile: Profile, spec: ServerSpec, store: StateStore, port: int | None, gpus: list[int], user: bool) -> str:
    argv = [sys.executable, "-m", "modelctl", "--state-dir", str(Path(store.root).resolve()), "run", spec.name,
            "--profile", str(Path(profile.path).resolve())]  # fmt: skip
    if port is not None:
        argv += ["--port", str(port)]
    if gpus:
        argv += ["--gpus", ",".join(map(str, gpus))]
    policy = spec.restart
    env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus)), **spec.env}
    held = spec.socket and port is not None
    socket_deps = [f"Requires={socket_unit_name(profile, spec)}", f"After={socket_unit_name(profile, spec)}"] if held else []
    lines = [
        "[Unit]",
        f"Description=modelctl {spec.kind} server {spec.name} (profile {profile.name})",
        "After=network-online.target",
        "Wants=network-online.target",
        *socket_deps,
        f"PartOf={target_name(profile)}",
        f"StartLimitIntervalSec={int(policy.window)}",
        f"StartLimitBurst={policy.max_failures}",
        "",
        "[Service]",
        "Type=notify",
        "NotifyAccess=main",
        "ExecStart=" + " ".join(_quote(a) for a in argv),
        *(f"Environment={_quote(f'{k}={v}')}" for k, v in env.items()),
        "Restart=on-failure",
        f"RestartSec={max(policy.backoff, 0.1):g}",
        f"TimeoutStartSec={int(spec.startup_timeout + START_SLACK_SECONDS)}",
        f"TimeoutStopSec={int(spec.stop_timeout + STOP_SLACK_SECONDS)}",
        # the whole cgroup, children of children included; never KillMode=process
        "KillMode=control-group",
        "KillSignal=SIGTERM",
        f"SyslogIdentifier=modelctl-{profile.name}-{spec.name}",
        f"WorkingDirectory={_quote(str(Path(profile.path).resolve().parent))}",
    ]
    if not user and os.geteuid() != 0:
        import pwd

        lines.append(f"User={pwd.getpwuid(os.geteuid()).pw_name}")
    if held and spec.start == "on-demand":
        lines.append("")  # no [Install]: the .socket unit starts it at the first connection
    else:
        lines += ["", "[Install]", f"WantedBy={target_name(profile)}", ""]
    return "\n".join(lines)


def target_unit(profile: Profile, user: bool) -> str:
    services = " ".join(
        socket_unit_name(profile, spec) if spec.start == "on-demand" and spec.socket else unit_name(profile.name, spec.name)
        for spec in profile.servers.values()
    )
    return "\n".join(
        [
            "[Unit]",
            f"Description=modelctl profile {profile.name} ({profile.path})",
            f"Wants={services}",
            "",
            "[Install]",
            f"WantedBy={'default.target' if user else 'multi-user.target'}",
            "",
        ]
    )


def generate_units(profile: Profile, store: StateStore, user: bool = True) -> dict[str, str]:
    """File name → unit text, for every server of the profile and its target."""
    ports, gpus = resolve_allocations(profile, store)
    units = {}
    for spec in profile.servers.values():
        port = ports[spec.name]
        units[unit_name(profile.name, spec.name)] = service_unit(profile, spec, store, port, gpus.get(spec.name, []), user)
        if spec.socket and port is not None:
            units[socket_unit_name(profile, spec)] = socket_unit(profile, spec, port)
    units[target_name(profile)] = target_unit(profile, user)
    return units


def write_units(units: dict[str, str], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in units.items():
        path = directory / name
        path.write_text(text)
        paths.append(path)
    return paths


def systemd_running() -> bool:
    return os.path.isdir("/run/systemd/system") and shutil.which("systemctl") is not None


def daemon_reload(user: bool) -> str:
    if not systemd_running():
        return "systemd is not running on this machine: run `systemctl daemon-reload` where it is"
    cmd = ["systemctl", *(["--user"] if user else []), "daemon-reload"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        return f"{' '.join(cmd)} failed: {res.stderr.strip()}"
    return f"ran {' '.join(cmd)}"


def install_hint(profile: Profile, user: bool, out: Path | None) -> str:
    flag = "--user " if user else ""
    where = unit_dir(user)
    copy = f"copy {out}/* to {where}, then " if out else f"save them in {where}, then "
    return (
        f"\nTo install: {copy}run:\n"
        f"  systemctl {flag}daemon-reload\n"
        f"  systemctl {flag}enable --now {target_name(profile)}\n"
        f"(or `modelctl systemd install{' --system' if not user else ''}`). Logs: journalctl {flag}-u 'modelctl-{profile.name}-*'"
        + ("\nUser units start at boot only with lingering: loginctl enable-linger $USER" if user else "")
    )
