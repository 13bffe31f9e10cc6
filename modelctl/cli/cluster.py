"""The commands that hand a profile to another supervisor: `systemd`, `k8s` and `slurm`. Each group
registers itself on the app (modelctl/cli/app.py). What a command writes for a machine (units,
manifests, scripts) goes to stdout; what it says to a person goes to stderr."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from modelctl.cli.app import ProfileOption, app, console, ctx_state, err_console, fail, load
from modelctl.cli.format import styled_state
from modelctl.cli.tables import Cell, Column, render, terminal_width
from modelctl.profile import Profile
from modelctl.sanitize import one_line, printable

if TYPE_CHECKING:
    from modelctl.cluster.k8s.manifests import Generated

systemd_app = typer.Typer(help="Run a profile's servers under systemd.", no_args_is_help=True)
app.add_typer(systemd_app, name="systemd")
k8s_app = typer.Typer(help="Run a profile's servers on Kubernetes (which then does the supervising).", no_args_is_help=True)
app.add_typer(k8s_app, name="k8s")
slurm_app = typer.Typer(help="Run a profile's servers as Slurm jobs (each job supervises its server).", no_args_is_help=True)
app.add_typer(slurm_app, name="slurm")

OutOption = typer.Option(None, "--out", metavar="DIR", help="Directory to write the files to (default: print them to stdout).")


def _width() -> int | None:
    return terminal_width(console.width, console.is_terminal, False)


def _print_table(columns: tuple[Column, ...], rows: list[list[Cell]]) -> None:
    for line in render(columns, rows, _width()):
        console.print(line, highlight=False)


# ---------------------------------------------------------------------------- systemd
UserOption = typer.Option(
    None,
    "--user/--system",
    help="User units in ~/.config/systemd/user, or system units in /etc/systemd/system (default: --user, or --system as root).",
)


def _user_units(user: Optional[bool]) -> bool:
    return user if user is not None else os.geteuid() != 0


@systemd_app.command("generate")
def systemd_generate(profile: Optional[str] = ProfileOption, user: Optional[bool] = UserOption, out: Optional[Path] = OutOption) -> None:
    """Write one unit per server plus a target that groups them (units on stdout, how to install them on stderr)."""
    from modelctl.cluster import systemd

    prof = load(profile)
    as_user = _user_units(user)
    units = systemd.generate_units(prof, ctx_state.store, user=as_user)
    if out is None:
        for name, text in units.items():
            print(f"# {name}\n{text}")
    else:
        for p in systemd.write_units(units, out):
            err_console.print(f"wrote {p}", highlight=False)
    err_console.print(systemd.install_hint(prof, user=as_user, out=out).strip("\n"), highlight=False)


@systemd_app.command("install")
def systemd_install(profile: Optional[str] = ProfileOption, user: Optional[bool] = UserOption) -> None:
    """Write the units to systemd's directory and reload systemd."""
    from modelctl.cluster import systemd

    prof = load(profile)
    as_user = _user_units(user)
    units = systemd.generate_units(prof, ctx_state.store, user=as_user)
    for p in systemd.write_units(units, systemd.unit_dir(as_user)):
        console.print(f"wrote {p}", highlight=False)
    console.print(systemd.daemon_reload(as_user), highlight=False)
    console.print(
        f"enable and start with: systemctl {'--user ' if as_user else ''}enable --now {systemd.target_name(prof)}", highlight=False
    )


# ---------------------------------------------------------------------------- Kubernetes
NamespaceOption = typer.Option(None, "--namespace", "-n", metavar="NAMESPACE", help="Namespace (default: the profile's k8s.namespace).")
ImageOption = typer.Option(None, "--image", metavar="IMAGE", help="The bundled server's image (default: modelctl-sentence:VERSION).")
CreateNamespaceOption = typer.Option(False, "--create-namespace", help="Also write the Namespace object.")


def _generated(prof: Profile, namespace: Optional[str], image: Optional[str], create_namespace: bool = False) -> Generated:
    from modelctl.cluster.k8s.manifests import ClusterOptions, generate

    generated = generate(prof, ClusterOptions(namespace=namespace, image=image, create_namespace=create_namespace))
    for note in generated.skipped:
        err_console.print(f"skipped {note}", highlight=False)
    return generated


def _image_hint(prof: Profile, image: Optional[str]) -> str:
    """How to get the bundled server's image into the cluster, when a server runs it."""
    from modelctl.cluster.k8s.manifests import DEFAULT_IMAGE

    if not any(s.kind == "sentence" for s in prof.servers.values()):
        return ""
    name = image or str(prof.k8s.get("image") or DEFAULT_IMAGE)
    return (
        f"the sentence servers run the image {name}: build it from this checkout first "
        f"(docker build -t {name} -f Containerfile .), then push it to your registry, or load it into a local cluster "
        f"(kind load docker-image {name})"
    )


@k8s_app.command("generate")
def k8s_generate(
    profile: Optional[str] = ProfileOption,
    out: Optional[Path] = OutOption,
    namespace: Optional[str] = NamespaceOption,
    image: Optional[str] = ImageOption,
    create_namespace: bool = CreateNamespaceOption,
) -> None:
    """Per server a Deployment and a Service (and a model cache PVC). On stdout, a stream for
    `kubectl apply -f -`; with --out, files and a kustomization.yaml for `kubectl apply -k DIR`."""
    prof = load(profile)
    generated = _generated(prof, namespace, image, create_namespace)
    if hint := _image_hint(prof, image):
        err_console.print(hint, highlight=False)
    if out is None:
        print(generated.stream(), end="")
        err_console.print("apply with: modelctl k8s generate ... | kubectl apply -f -   (or write files: --out DIR)", highlight=False)
        return
    for path in generated.write(out):
        note = " (mode 0600: it holds the API key)" if generated.is_secret(path.name) else ""
        err_console.print(f"wrote {path}{note}", highlight=False)
    err_console.print(f"apply with: kubectl apply -k {out}", highlight=False)


@k8s_app.command("apply")
def k8s_apply(
    profile: Optional[str] = ProfileOption,
    namespace: Optional[str] = NamespaceOption,
    image: Optional[str] = ImageOption,
    out: Optional[Path] = typer.Option(None, "--out", metavar="DIR", help="Keep the manifests in this directory."),
    create_namespace: bool = CreateNamespaceOption,
) -> None:
    """Generate the manifests and `kubectl apply -k` them."""
    from modelctl.cli.progress import while_waiting
    from modelctl.cluster.k8s import kubectl

    prof = load(profile)
    generated = _generated(prof, namespace, image, create_namespace)
    print(while_waiting(err_console, "kubectl apply:", [prof.name], lambda: kubectl.apply(generated, out)), end="")
    err_console.print(
        f"watch the rollout with: modelctl k8s status -p {prof.path}" + (f" -n {namespace}" if namespace else ""), highlight=False
    )


@k8s_app.command("delete")
def k8s_delete(
    profile: Optional[str] = ProfileOption,
    namespace: Optional[str] = NamespaceOption,
    image: Optional[str] = ImageOption,
) -> None:
    """`kubectl delete -k` the profile's objects (the model cache volumes too)."""
    from modelctl.cli.progress import while_waiting
    from modelctl.cluster.k8s import kubectl

    prof = load(profile)
    generated = _generated(prof, namespace, image)
    print(while_waiting(err_console, "kubectl delete:", [prof.name], lambda: kubectl.delete(generated)), end="")


@k8s_app.command("status")
def k8s_status(
    profile: Optional[str] = ProfileOption,
    namespace: Optional[str] = NamespaceOption,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list (for scripts)."),
) -> None:
    """The profile's Deployments in the cluster: replicas ready, rollout state."""
    from modelctl.cluster.k8s import kubectl

    prof = load(profile)
    rows = kubectl.status(prof.name, namespace or prof.k8s.get("namespace"))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print(f"no Deployments of profile {prof.name} in the cluster", highlight=False)
        return
    columns = (
        Column("deployment", keep=True),
        Column("server", keep=True),
        Column("state", keep=True),
        Column("ready"),
        Column("detail", narrow_to=20),
    )
    _print_table(columns, [[r["name"], r["server"], styled_state(r["state"]), f"{r['ready']}/{r['replicas']}", r["detail"]] for r in rows])


# ---------------------------------------------------------------------------- Slurm
ServersArg = typer.Argument(None, metavar="SERVER...", help="Servers (default: all of the profile's).")


def _servers_of(prof: Profile, servers: Optional[list[str]]) -> Optional[list[str]]:
    for name in servers or []:
        if name not in prof.servers:
            raise fail(f"{prof.path}: no server named {name!r}; the profile has: {', '.join(prof.servers)}", 2)
    return list(servers) if servers else None


@slurm_app.command("generate")
def slurm_generate(
    profile: Optional[str] = ProfileOption, out: Optional[Path] = OutOption, servers: Optional[list[str]] = ServersArg
) -> None:
    """One sbatch script per server; each job runs `modelctl run SERVER` and reports where it landed."""
    from modelctl.cluster.slurm import scripts

    prof = load(profile)
    generated = scripts.generate(prof, ctx_state.store.root, _servers_of(prof, servers))
    if not servers:
        for why in scripts.left_out(prof):
            err_console.print(f"left out: {why}", style="dim", highlight=False)
    if out is None:
        for s in generated:
            print(f"# ---- {s.name}\n{s.text}", end="")
        return
    for path in scripts.write(generated, out):
        err_console.print(f"wrote {path}", highlight=False)
    jobs = scripts.jobs_dir(ctx_state.store.root, prof.name)
    jobs.mkdir(parents=True, exist_ok=True)  # Slurm writes no output to a directory that does not exist
    err_console.print(
        f"submit with: modelctl slurm submit -p {prof.path}, or sbatch each script (the jobs write to {jobs}, "
        "which must be on a filesystem the nodes share)",
        highlight=False,
    )


@slurm_app.command("submit")
def slurm_submit(profile: Optional[str] = ProfileOption, servers: Optional[list[str]] = ServersArg) -> None:
    """sbatch each server's job, unless one of its name is already pending or running."""
    from modelctl.cluster.slurm import commands

    prof = load(profile)
    for s in commands.submit(prof, ctx_state.store.root, _servers_of(prof, servers)):
        what = "submitted" if s.new else f"already {s.state.lower()}, not submitted again:"
        console.print(f"{prof.name}/{s.server}: {what} job {s.job_id}", highlight=False)
    console.print(f"watch with: modelctl slurm status -p {prof.path}", style="dim", highlight=False)


@slurm_app.command("status")
def slurm_status(
    profile: Optional[str] = ProfileOption, as_json: bool = typer.Option(False, "--json", help="Print a JSON list (for scripts).")
) -> None:
    """Each server's job: id, Slurm state, node, URL and health."""
    from modelctl.cluster.slurm import commands

    rows = commands.status(load(profile), ctx_state.store.root)
    if as_json:
        print(json.dumps([r.to_json() for r in rows], indent=2))
        return
    columns = (
        Column("server", keep=True),
        Column("state", keep=True),
        Column("job", drop=2),
        Column("node", drop=1),
        Column("url", keep=True),
        Column("restarts", drop=3),
        Column("detail", narrow_to=20, drop=4),
    )
    table: list[list[Cell]] = [
        [
            r.name,
            styled_state(one_line(r.state)),
            f"{r.job_id} ({one_line(r.job_state.lower())})" if r.job_id and r.job_state else (r.job_id or ""),
            printable(r.node),
            printable(r.url),
            str(r.restarts) if r.restarts else "",
            one_line(r.detail),
        ]
        for r in rows
    ]
    _print_table(columns, table)


@slurm_app.command("cancel")
def slurm_cancel(profile: Optional[str] = ProfileOption, servers: Optional[list[str]] = ServersArg) -> None:
    """scancel the servers' jobs and return once they are gone."""
    from modelctl.cli.progress import while_waiting
    from modelctl.cluster.slurm import commands

    prof = load(profile)
    names = _servers_of(prof, servers)
    ended = while_waiting(err_console, "cancelling the jobs of", [prof.name], lambda: commands.cancel(prof, names))
    if not ended:
        console.print(f"no pending or running jobs of profile {prof.name}", highlight=False)
    for j in ended:
        console.print(f"{j.name}: job {j.job_id} ended", highlight=False)
