"""GPUs: which exist, and an exclusive assignment of them to servers."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterable, Mapping

from modelctl.errors import GpuAllocationError


def _parse_ids(text: str, source: str) -> list[int]:
    text = text.strip()
    if not text:
        return []
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise GpuAllocationError(f"{source}={text!r}: expected GPU ids like 0,1,2") from None


def discover_gpus() -> list[int]:
    """GPU ids on this machine: $MODELCTL_GPUS, else NVML, else nvidia-smi, else $CUDA_VISIBLE_DEVICES."""
    if "MODELCTL_GPUS" in os.environ:
        return _parse_ids(os.environ["MODELCTL_GPUS"], "MODELCTL_GPUS")
    ids = _nvml_ids()
    if ids is None:
        ids = _nvidia_smi_ids()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(x.strip().isdigit() for x in visible.split(",") if x.strip()):
        allowed = _parse_ids(visible, "CUDA_VISIBLE_DEVICES")
        ids = allowed if ids is None else [i for i in ids if i in allowed]
    return ids or []


def _nvml_ids() -> list[int] | None:
    try:
        import pynvml  # optional: nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            return list(range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def _nvidia_smi_ids() -> list[int] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return sorted(int(line) for line in out.stdout.split() if line.strip().isdigit())


def allocate_gpus(
    requests: Mapping[str, tuple[int | tuple[int, ...], bool]],
    available: Iterable[int],
    in_use: Mapping[int, str],
) -> dict[str, list[int]]:
    """Assign GPUs to servers: name → (count or ids, shared). Raises before anything is assigned.

    `in_use` maps GPU id → server already holding it exclusively. Explicit ids are served first,
    then counts take the lowest free ids. Shared servers may use any existing GPU.
    """
    available = sorted(set(available))
    taken = dict(in_use)
    result: dict[str, list[int]] = {}
    ordered = sorted(requests.items(), key=lambda kv: not isinstance(kv[1][0], tuple))
    for name, (want, shared) in ordered:
        if isinstance(want, tuple):
            missing = [g for g in want if g not in available]
            if missing:
                raise GpuAllocationError(
                    f"server '{name}': GPU {', '.join(map(str, missing))} does not exist on this machine "
                    f"(GPUs: {', '.join(map(str, available)) or 'none'}; override with MODELCTL_GPUS)"
                )
            busy = {g: taken[g] for g in want if g in taken and not shared}
            if busy:
                who = ", ".join(f"GPU {g} by '{s}'" for g, s in busy.items())
                raise GpuAllocationError(f"server '{name}': GPUs are already taken: {who} (use gpus_shared: true to share)")
            ids = list(want)
        else:
            if want == 0:
                result[name] = []
                continue
            pool = available if shared else [g for g in available if g not in taken]
            if len(pool) < want:
                raise GpuAllocationError(
                    f"server '{name}' needs {want} GPU(s) but only {len(pool)} free "
                    f"(GPUs: {', '.join(map(str, available)) or 'none'}; "
                    f"taken: {', '.join(f'{g} by {s!r}' for g, s in sorted(taken.items())) or 'none'})"
                )
            ids = pool[:want]
        if not shared:
            for g in ids:
                taken[g] = name
        result[name] = ids
    return result


def gpu_memory_by_pid() -> dict[int, int] | None:
    """GPU memory each process holds, summed over the GPUs (bytes); None without NVIDIA GPUs.

    NVML's per-process accounting (nvidia-ml-py), else nvidia-smi's compute apps.
    """
    usage = _nvml_memory()
    return usage if usage is not None else _nvidia_smi_memory()


def _nvml_memory() -> dict[int, int] | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        usage: dict[int, int] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            procs = list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
            procs += list(pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
            for p in procs:
                used = p.usedGpuMemory
                if used is not None:  # None where the driver does not account per process
                    usage[p.pid] = usage.get(p.pid, 0) + int(used)
        return usage
    except Exception:
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _nvidia_smi_memory() -> dict[int, int] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    usage: dict[int, int] = {}
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            usage[int(parts[0])] = usage.get(int(parts[0]), 0) + int(parts[1]) * 1024 * 1024  # MiB
    return usage


def group_gpu_memory(pids: list[int], usage: dict[int, int] | None) -> int | None:
    """A server's GPU memory: its processes' (vLLM's engine and workers hold it, not the API process)."""
    if usage is None:
        return None
    return sum(usage.get(pid, 0) for pid in pids)
