"""Which device a stage runs on: one resolver for extraction and training, and the CPU cores a process may use."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from fusionpipe import cuda
from fusionpipe.errors import FusionpipeError

CGROUP = Path("/sys/fs/cgroup")


def resolve_device(device: str) -> torch.device:
    """Device "auto" is cuda when there is one, else cpu; anything else is checked, with the fix in the error."""
    if device == "auto":
        return torch.device("cuda" if cuda.available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise FusionpipeError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from e
    if d.type == "cuda" and not cuda.available():
        raise FusionpipeError(f"device {device!r} asked for but CUDA is not available; use --device cpu or auto")
    return d


def usable_cores() -> int:
    """The cores this process may keep busy: its CPU affinity, capped by a cgroup CPU quota (a container's
    `--cpus`), which os.cpu_count() ignores: sized by it, a 4-CPU container on a 64-core host would start
    16 helper processes, each importing torch, and share 4 CPUs among them."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpus(CGROUP)
    return max(1, min(cores, quota) if quota else cores)


def cgroup_cpus(root: Path) -> int | None:
    """The CPU quota of the cgroup mounted at `root`, rounded up to whole CPUs; None if there is none.
    cgroup v2 writes "QUOTA PERIOD" (or "max PERIOD") in cpu.max; v1 two files under cpu/."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def free_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on ``device``: the GPU's free memory, or the host's available memory (Linux
    MemAvailable, lowered to a container's cgroup memory limit less its usage). None when it cannot be told."""
    if device.type == "cuda":
        return cuda.free_memory(device)
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    try:
        limit, used = ((CGROUP / name).read_text().strip() for name in ("memory.max", "memory.current"))
        if limit != "max":
            free = min(free, int(limit) - int(used))
    except (OSError, ValueError):
        pass
    return free
