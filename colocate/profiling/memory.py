"""Memory counters: torch's CUDA allocator, the device's used memory, the process's RSS.

GPU figures come from the framework's own counters where it has them (torch's
allocator statistics) and from the device's used memory otherwise; CPU figures
from the process's resident set and its peak (``VmHWM``, reset through
``/proc/self/clear_refs`` on Linux).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_bytes() -> int:
    """Resident memory of this process now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _status_kib(key: str) -> int | None:
    try:
        for line in _PROC_STATUS.read_text(encoding="ascii").splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the peak resident set (VmHWM) to the current RSS; False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    """Peak resident memory since the last :func:`reset_peak_rss` (VmHWM), None if unknown."""
    return _status_kib("VmHWM")


def torch_module_bytes(module: Any) -> int:
    """Bytes of a torch module's parameters and buffers (what its weights occupy)."""
    total = 0
    for tensor in list(module.parameters()) + list(module.buffers()):
        total += int(tensor.numel()) * int(tensor.element_size())
    return total


def model_file_bytes(path: Path) -> int:
    """Size of a model file plus its external-data side file (``<name>.data``), if any."""
    size = path.stat().st_size
    side = path.with_name(path.name + ".data")
    if side.is_file():
        size += side.stat().st_size
    return size


class TorchCudaCounters:
    """torch's caching-allocator statistics for one CUDA device."""

    def __init__(self, torch: Any, device_index: int) -> None:
        self._torch = torch
        self._index = device_index

    def synchronize(self) -> None:
        self._torch.cuda.synchronize(self._index)

    def allocated(self) -> int:
        return int(self._torch.cuda.memory_allocated(self._index))

    def reserved(self) -> int:
        return int(self._torch.cuda.memory_reserved(self._index))

    def reset_peak(self) -> None:
        self._torch.cuda.reset_peak_memory_stats(self._index)

    def peak_allocated(self) -> int:
        return int(self._torch.cuda.max_memory_allocated(self._index))

    def peak_reserved(self) -> int:
        return int(self._torch.cuda.max_memory_reserved(self._index))

    def device_used(self) -> int:
        """Device-wide used memory (all processes, CUDA contexts included)."""
        free, total = self._torch.cuda.mem_get_info(self._index)
        return int(total) - int(free)
