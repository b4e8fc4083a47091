"""Compute devices: choosing one, CPU threads, optional mixed precision on GPUs.

Example
-------
>>> device = select_device("auto")  # CUDA when available, else the CPU
>>> with autocast(device, enabled=False):
...     pass
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from regpipe.errors import InputError, ResourceError

__all__ = ["autocast", "available_cpus", "memory_limit_gb", "select_device", "set_threads"]

_CUDA_SPEC = re.compile(r"^cuda(?::(\d+))?$")

#: Accepted names of mixed-precision types.
AUTOCAST_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def select_device(spec: str | torch.device = "auto") -> torch.device:
    """Turn a device name into a usable :class:`torch.device`.

    Parameters
    ----------
    spec
        ``"auto"`` (the first CUDA GPU when one is usable, else the CPU), ``"cpu"``,
        ``"cuda"`` (the current GPU) or ``"cuda:N"``.

    Raises
    ------
    InputError
        For a name that is none of the above.
    ResourceError
        When the requested GPU does not exist or CUDA is unavailable.
    """
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_SPEC.match(text)
    if match is None:
        raise InputError(f"unknown device {spec!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise ResourceError(f"device {text!r} requested but CUDA is not available here")
    if match.group(1) is not None:
        index = int(match.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            raise ResourceError(f"device {text!r} requested but only {count} GPU(s) are visible")
        return torch.device("cuda", index)
    return torch.device("cuda")


#: cgroup v2 files of this process's CPU quota and memory limit at the root of the cgroup
#: file system (a container's own: Docker --cpus / -m).
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_MEMORY_MAX = "/sys/fs/cgroup/memory.max"
#: Where the cgroup file systems are mounted, and the file naming this process's cgroups: a
#: SLURM job's limits sit in its own cgroup (``.../job_<id>/``), and cgroup v1 hosts keep them
#: in per-controller trees (``memory/.../memory.limit_in_bytes``, ``cpu/.../cpu.cfs_quota_us``).
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
#: v1 writes "no limit" as a huge number (9223372036854771712)
_NO_V1_LIMIT = 2**60


def _cgroup_folders() -> list[tuple[str, Path]]:
    """``(version, folder)`` of this process's cgroups and their ancestors (a limit of any of
    them applies), deepest first: ``("2", ...)`` under :data:`CGROUP_ROOT` (its root left out:
    :data:`CGROUP_CPU_MAX`/:data:`CGROUP_MEMORY_MAX`), ``("memory", ...)``/``("cpu", ...)``
    in cgroup v1's controller trees, their roots included (a Docker container's own cgroup
    on a v1 host; "no limit" there otherwise)."""
    try:
        lines = Path(PROC_CGROUP).read_text(encoding="ascii").splitlines()
    except (OSError, ValueError):
        return []
    folders = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        controllers, path = fields[1], fields[2].strip().strip("/")
        parts = Path(path).parts if path else ()
        if controllers == "":  # v2: its root files are CGROUP_CPU_MAX / CGROUP_MEMORY_MAX
            kinds, deepest_last = [("2", Path(CGROUP_ROOT))], 1
        else:  # v1: a container's own cgroup is mounted at its tree's root
            names = controllers.split(",")
            kinds = [(kind, Path(CGROUP_ROOT) / tree) for kind in ("memory", "cpu")
                     if kind in names for tree in dict.fromkeys((controllers, kind))]
            deepest_last = 0
        for kind, root in kinds:
            folders += [(kind, root.joinpath(*parts[:depth]))
                        for depth in range(len(parts), deepest_last - 1, -1)]
    return folders


def _read_first_line(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.readline().strip()
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask (a SLURM or container CPU set), capped by a
    cgroup CPU quota (``docker run --cpus``, which the mask does not show) and by SGE's
    ``NSLOTS``; all of the machine's CPUs where none of these exist."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    quotas = [(_read_first_line(CGROUP_CPU_MAX) or "max").split()]
    for kind, folder in _cgroup_folders():
        if kind == "2":
            quotas.append((_read_first_line(str(folder / "cpu.max")) or "max").split())
        elif kind == "cpu":
            quotas.append([_read_first_line(str(folder / name)) or "-1"
                           for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us")])
    for quota in quotas:
        if len(quota) == 2 and quota[0] not in ("max", "-1"):
            try:
                cpus = min(cpus, max(1, math.ceil(int(quota[0]) / int(quota[1]))))
            except (ValueError, ZeroDivisionError):
                pass
    slots = os.environ.get("NSLOTS", "")
    if slots.isdigit() and int(slots) > 0:
        cpus = min(cpus, int(slots))
    return cpus


def memory_limit_gb() -> float | None:
    """This process's cgroup memory limit in GB (``docker run -m``, a SLURM job; cgroup v2 or
    v1, the smallest of its cgroup's and their ancestors'), or ``None`` where there is none:
    MultiProc would otherwise plan with 90 % of the machine's RAM."""
    files = [CGROUP_MEMORY_MAX]
    for kind, folder in _cgroup_folders():
        if kind in ("2", "memory"):
            files.append(str(folder / ("memory.max" if kind == "2" else
                                       "memory.limit_in_bytes")))
    limits = [int(text) for text in map(_read_first_line, files)
              if text is not None and text.isdigit() and int(text) < _NO_V1_LIMIT]
    return min(limits) / 1024**3 if limits else None


def set_threads(n: int | None) -> int:
    """Set the number of CPU threads torch uses for one operation; ``None`` keeps it.

    Returns
    -------
    The number of threads now in use.

    Raises
    ------
    InputError
        When ``n`` is not a positive integer.
    """
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InputError(f"thread count must be a positive integer, got {n!r}")
        torch.set_num_threads(n)
    return torch.get_num_threads()


@contextlib.contextmanager
def autocast(
    device: torch.device | str, enabled: bool = False, dtype: str | torch.dtype = "bf16"
) -> Iterator[None]:
    """Mixed precision for the enclosed operations on a GPU; a no-op elsewhere.

    Float32 is the default (``enabled=False``). On CUDA with ``enabled=True``, eligible
    operations (convolutions, matrix products) run in ``dtype`` while precision-sensitive ones
    (``grid_sample``, reductions) stay in float32, as :func:`torch.autocast` decides. On the
    CPU the context does nothing, so results are identical with or without it.

    Parameters
    ----------
    device
        The device the enclosed work runs on.
    enabled
        Turn mixed precision on.
    dtype
        ``"bf16"``/``torch.bfloat16`` (default, no overflow risk) or ``"fp16"``/``torch.float16``.
    """
    device = torch.device(device)
    if isinstance(dtype, str):
        try:
            dtype = AUTOCAST_DTYPES[dtype.lower()]
        except KeyError:
            raise InputError(
                f"unknown mixed-precision type {dtype!r}; use one of {', '.join(AUTOCAST_DTYPES)}"
            ) from None
    elif dtype not in (torch.bfloat16, torch.float16):
        raise InputError(f"mixed precision needs bfloat16 or float16, got {dtype}")
    if not enabled or device.type != "cuda":
        yield
        return
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield
