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


#: cgroup v2 files of this process's CPU quota and memory limit (Docker --cpus / -m, SLURM).
CGROUP_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_MEMORY_MAX = "/sys/fs/cgroup/memory.max"


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
    quota = (_read_first_line(CGROUP_CPU_MAX) or "max").split()
    if len(quota) == 2 and quota[0] != "max":
        try:
            cpus = min(cpus, max(1, math.ceil(int(quota[0]) / int(quota[1]))))
        except (ValueError, ZeroDivisionError):
            pass
    slots = os.environ.get("NSLOTS", "")
    if slots.isdigit() and int(slots) > 0:
        cpus = min(cpus, int(slots))
    return cpus


def memory_limit_gb() -> float | None:
    """This process's cgroup memory limit in GB (``docker run -m``, a SLURM job), or ``None``
    where there is none: MultiProc would otherwise plan with 90 % of the machine's RAM."""
    text = _read_first_line(CGROUP_MEMORY_MAX)
    if text is None or not text.isdigit():
        return None
    return int(text) / 1024**3


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
