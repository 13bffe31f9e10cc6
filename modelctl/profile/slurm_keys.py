"""The `slurm:` keys of a profile (defaults for every server) and of a server, checked like every
other key: a wrong one names the file, the server and the key."""

from __future__ import annotations

import re
from typing import Any

from modelctl.spec import Key, check_count, check_section, check_str, describe

# Slurm's time formats: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; or UNLIMITED
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
_MEMORY = re.compile(r"[0-9]+[KMGT]?")
_NAME = re.compile(r"[A-Za-z0-9_.,:+=@-]+")  # partitions, accounts, qos, GPU types
# one option a line: a value with spaces (or quotes) would put a second option on the #SBATCH line
_SBATCH_OPTION = re.compile(r"--[a-z][a-z0-9-]*(=[^\s\"'\\]+)?")
# Slurm's feature expressions: names joined by & | , and counts, brackets ([a*2&b*1]), no spaces
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.:+=@&|,*()\[\]!-]+")
# options modelctl writes itself: given twice, sbatch would take the last one silently
_OWN_OPTIONS = ("--job-name", "--output", "--error", "--signal", "--gres", "--nodes", "--ntasks", "--parsable")


def time_seconds(text: str) -> float | None:
    """A Slurm time limit in seconds; None for UNLIMITED."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return None
    m = _TIME.fullmatch(text)
    if not m:
        raise ValueError(f"must be a Slurm time: minutes (90), HH:MM:SS, D-HH:MM:SS or UNLIMITED, got {describe(text)}")
    days, a, b, c = m.group(1), m.group(2), m.group(3), m.group(4)
    if days is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
        parts = [int(a), int(b or 0), int(c or 0)]
        return int(days) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]
    if b is None:  # minutes
        return int(a) * 60
    if c is None:  # MM:SS
        return int(a) * 60 + int(b)
    return int(a) * 3600 + int(b) * 60 + int(c)


def check_time(value: Any) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str):
        raise ValueError(f"must be a Slurm time: minutes (90), HH:MM:SS, D-HH:MM:SS or UNLIMITED, got {describe(value)}")
    seconds = time_seconds(text)
    if seconds is not None and seconds <= 0:
        raise ValueError(f"must be longer than zero, got {describe(value)}")
    return text


def check_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(f"must be a Slurm name (letters, digits, _ . , : + = @ -), got {describe(value)}")
    return value


def check_memory(value: Any) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _MEMORY.fullmatch(text):
        raise ValueError(f"must be Slurm memory: megabytes (16000) or a number with K, M, G or T (16G), got {describe(value)}")
    return text


def check_sbatch_options(value: Any) -> list[str]:
    options = value if isinstance(value, list) else [value]
    out = []
    for option in options:
        text = check_str(option)
        if not _SBATCH_OPTION.fullmatch(text):
            raise ValueError(
                f"must be long sbatch options like --exclusive or --mail-type=END, one an item, with no spaces or quotes, got {describe(option)}"
            )
        if text.split("=", 1)[0] in _OWN_OPTIONS:
            raise ValueError(f"{text.split('=', 1)[0]} is written by modelctl (from the job's name, gpus: and stop_timeout)")
        out.append(text)
    return out


def check_constraint(value: Any) -> str:
    if not isinstance(value, str) or not _CONSTRAINT.fullmatch(value):
        raise ValueError(
            f"must be a Slurm feature expression (names joined by & | , with counts and brackets, no spaces), got {describe(value)}"
        )
    return value


def check_lines(value: Any) -> list[str]:
    lines = value if isinstance(value, list) else [value]
    return [check_str(line) for line in lines]


COMMON: dict[str, Key] = {
    "partition": Key(check_name, doc="the partition (queue) jobs go to"),
    "account": Key(check_name, doc="the account jobs are charged to"),
    "qos": Key(check_name, doc="the quality of service"),
    "time": Key(check_time, doc="the job's time limit (minutes, HH:MM:SS, D-HH:MM:SS or UNLIMITED)"),
    "constraint": Key(check_constraint, doc="node features the job needs (--constraint)"),
    "cpus_per_task": Key(check_count, doc="CPUs for the server"),
    "mem": Key(check_memory, doc="memory for the server (16G)"),
    "gpu_type": Key(check_name, doc="the GPU type in the GRES request (a100: --gres=gpu:a100:N)"),
    "modules": Key(check_lines, doc="environment modules loaded before the server starts"),
    "setup": Key(check_lines, doc="shell lines run before the server starts (activate a venv, ...)"),
    "sbatch": Key(check_sbatch_options, doc="more #SBATCH options, like --exclusive"),
    "modelctl": Key(check_str, doc="the modelctl command on the nodes (default: the one that generates the scripts, by its absolute path)"),
    "host": Key(check_str, doc="the address servers bind on the node (default 0.0.0.0: reachable from other nodes)"),
}

SERVER_KEYS: dict[str, Key] = dict(COMMON)
PROFILE_KEYS: dict[str, Key] = dict(COMMON)


def check_server_slurm(value: Any) -> dict[str, Any]:
    return check_section(value, SERVER_KEYS, "slurm")


def check_profile_slurm(value: Any) -> dict[str, Any]:
    return check_section(value, PROFILE_KEYS, "slurm")
