"""The README's first example runs as a newcomer runs it, at an 80-column terminal, and prints
what the README shows.

The blocks marked `<!-- run by tests/test_readme.py ... -->` are run command by command (`$ `
lines) in a fresh state directory; each command's output must hold the README's lines in order,
compared by shape: numbers (ports, pids, sizes, scores) and runs of spaces may differ, the words
may not. The default profile's fixed ports are moved to free ones (the same words, other numbers).
"""

from __future__ import annotations

import os
import random
import re
import shlex
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from .conftest import ROOT
from .terminal import run_in_terminal

README = ROOT / "README.md"
MARK = "<!-- run by tests/test_readme.py"


def marked_blocks(text: str) -> list[list[tuple[str, list[str]]]]:
    """Each marked block as (command, expected output lines)."""
    blocks = []
    for part in text.split(MARK)[1:]:
        body = part.split("```console\n", 1)[1].split("\n```", 1)[0]
        steps: list[tuple[str, list[str]]] = []
        for line in body.splitlines():
            if line.startswith("$ "):
                steps.append((line[2:], []))
            elif steps:
                steps[-1][1].append(line)
        blocks.append(steps)
    return blocks


def four_digit_ports(n: int) -> list[int]:
    """n ports of 8710-9999 that are free now (auto ports are 20000 and up; tests' own are ephemeral)."""
    found: list[int] = []
    for port in random.sample(range(8710, 10000), 1290):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            return found
    raise AssertionError("no free ports of four digits")


def shape(line: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"\d+(\.\d+)?", "N", line)).strip()


def holds_in_order(output: str, expected: list[str]) -> str | None:
    """The first expected line the output lacks (in order, by shape); None when all are there."""
    lines = [shape(line) for line in output.splitlines()]
    at = 0
    for want in expected:
        w = shape(want)
        if not w or "/home/you/" in want:  # blank lines, and the reader's own paths
            continue
        while at < len(lines) and lines[at] != w:
            at += 1
        if at == len(lines):
            return want
        at += 1
    return None


def test_the_readme_marks_its_first_example_to_be_run():
    blocks = marked_blocks(README.read_text())
    assert blocks and blocks[0][0][0] == "modelctl up"
    assert all(out for _, out in blocks[0]), "every command of the first example shows its output"


@pytest.mark.slow
def test_the_readme_first_example_runs_on_a_cpu_machine_and_prints_what_it_shows(tmp_path, mc):
    # free ports of four digits, as the README's: at 80 columns a longer URL narrows the model column
    ports = dict(zip((8700, 8701, 8702), four_digit_ports(3), strict=True))
    default = yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())
    for server in [*default["servers"].values(), default["gateway"]]:
        server["port"] = ports[server["port"]]
    profile = tmp_path / "default.yaml"
    profile.write_text(yaml.safe_dump(default))
    bin_dir = Path(sys.executable).parent  # the venv's modelctl on PATH, as `source .venv/bin/activate` puts it
    env = {**mc.env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MODELCTL_PROFILE": str(profile)}
    timings = []
    try:
        for block in marked_blocks(README.read_text()):
            for command, expected in block:
                for old, new in ports.items():
                    command = command.replace(str(old), str(new))
                t0 = time.monotonic()
                code, out = run_in_terminal(["bash", "-c", command], 80, env, cwd=str(tmp_path), timeout=300)
                timings.append(f"{command.split(' -')[0][:40]}: {time.monotonic() - t0:.1f}s")
                assert code == 0, f"{command}\n{out}"
                assert "command not found" not in out
                missing = holds_in_order(out, expected)
                assert missing is None, f"`{command}` did not print {missing!r}; it printed:\n{out}"
                for url in re.findall(r"https?://\S+", out):
                    assert "…" not in url, f"a cut URL in `{command}`: {url}"
    finally:
        mc.cli("down")
        print("\n".join(timings))


def test_every_command_the_readme_shows_exists():
    """Each `modelctl ...` of the README's shell blocks parses: its --help answers."""
    from typer.testing import CliRunner

    from modelctl.cli import app

    commands: set[str] = set()
    for block in re.findall(r"```(?:sh|console)\n(.*?)```", README.read_text(), re.S):
        for line in block.splitlines():
            words = shlex.split(line.removeprefix("$ "), comments=True) if "modelctl" in line else []
            if words[:1] == ["modelctl"]:
                path = []
                for word in words[1:]:
                    if word.startswith("-") or "|" in word or "/" in word or "." in word:
                        break
                    path.append(word)
                commands.add(" ".join(path[:2]))
    assert "up" in {c.split()[0] for c in commands if c}
    runner = CliRunner()
    for command in sorted(commands):
        words = command.split()
        res = runner.invoke(app, [*words, "--help"])
        if res.exit_code != 0 and len(words) == 2:  # the second word was an argument
            res = runner.invoke(app, [words[0], "--help"])
        assert res.exit_code == 0, (command, res.output)
