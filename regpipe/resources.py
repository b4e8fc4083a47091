"""Runtime and peak memory of a block of code, measured the same way for every method.

:func:`measure_resources` times a block and reads the process's peak resident memory during it
(Linux lets the high-water mark be reset per block; elsewhere the lifetime peak is reported and
said so) and, when CUDA is in use, the GPU's peak allocation. ``regpipe-bench``, the BIDS App's
registration nodes and ANTs' child processes all use it, so their numbers compare.

Example
-------
>>> with measure_resources() as usage:
...     total = sum(range(1000))
>>> usage.runtime_s >= 0.0 and usage.scope in ("block", "process")
True
"""

from __future__ import annotations

import re
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ResourceUsage", "measure_resources", "peak_memory_mb"]


def peak_memory_mb() -> float:
    """Peak resident memory (MiB) of this process over its lifetime."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class ResourceUsage:
    """What :class:`measure_resources` measured.

    ``peak_memory_mb`` is the peak resident memory (MiB) of the process *during the block*
    when Linux lets the high-water mark be reset (``/proc/self/clear_refs``; ``scope`` is
    ``"block"``), else the peak over the process lifetime (``scope`` ``"process"``).
    ``peak_gpu_memory_mb`` is CUDA's peak allocation during the block (``None`` without CUDA).
    """

    runtime_s: float = 0.0
    peak_memory_mb: float = 0.0
    scope: str = "process"
    peak_gpu_memory_mb: float | None = None

    def as_metrics(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {
            "runtime_s": self.runtime_s,
            "peak_memory_mb": self.peak_memory_mb,
            "peak_memory_scope": self.scope,
        }
        if self.peak_gpu_memory_mb is not None:
            metrics["peak_gpu_memory_mb"] = self.peak_gpu_memory_mb
        return metrics


def _read_vm_hwm_mb() -> float | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+)\s+kB", status)
    return int(match.group(1)) / 1024.0 if match else None


def _reset_vm_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets the peak RSS (Linux >= 4.0)
    except OSError:
        return False
    return _read_vm_hwm_mb() is not None


def _cuda_in_use() -> Any:
    import sys

    torch = sys.modules.get("torch")  # never import torch just to measure
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch
    return None


@contextmanager
def measure_resources() -> Iterator[ResourceUsage]:
    """Measure wall-clock runtime and peak memory of a block of code.

    Example
    -------
    >>> with measure_resources() as usage:
    ...     total = sum(range(1000))
    >>> usage.runtime_s >= 0.0
    True
    """
    usage = ResourceUsage()
    block_scope = _reset_vm_hwm()
    torch = _cuda_in_use()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        yield usage
    finally:
        usage.runtime_s = time.perf_counter() - started
        peak = _read_vm_hwm_mb() if block_scope else None
        if peak is None:
            peak = peak_memory_mb()
        usage.peak_memory_mb = float(peak)
        usage.scope = "block" if block_scope else "process"
        torch = torch or _cuda_in_use()
        if torch is not None:
            usage.peak_gpu_memory_mb = torch.cuda.max_memory_allocated() / 2**20
