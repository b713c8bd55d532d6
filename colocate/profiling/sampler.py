"""Power, energy, utilisation and memory of a GPU, read through NVML (``nvidia-ml-py``).

Everything here degrades to "unknown" (None) instead of raising when NVML is
missing or refuses a query: no driver library (CI, CPU machines), an old
driver, a query the GPU does not support, no permission.

Device indices are NVML's, which follow PCI bus order and ignore
``CUDA_VISIBLE_DEVICES``; CUDA's default order (fastest first) can differ too.
The index is used as given: on a machine with several GPUs the caller must
pass the NVML index of the GPU it means (match by UUID where in doubt).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from types import ModuleType, TracebackType
from typing import Any, Literal

from colocate.devices import Device
from colocate.errors import InvalidInputError
from colocate.profiling.types import EnergyFootprint

#: ``EnergyFootprint.source`` when the energy comes from the driver's energy counter
SOURCE_ENERGY_COUNTER = "nvml total energy"
#: ``EnergyFootprint.source`` when the energy is mean sampled power x elapsed time
SOURCE_POWER_SAMPLES = "nvml power samples"


def _import_pynvml() -> tuple[ModuleType | None, str | None]:
    """The ``pynvml`` module (from nvidia-ml-py), or None and why not."""
    try:
        with warnings.catch_warnings():
            # the deprecated 'pynvml' distribution warns on import; the module is the same
            warnings.simplefilter("ignore", FutureWarning)
            return importlib.import_module("pynvml"), None
    except ImportError as exc:
        return None, f"pynvml is not importable ({exc}); install it with: pip install 'colocate[gpu]'"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def nvml_index(device: Device) -> int:
    """The NVML index of the GPU ``device`` names, found by its UUID.

    ``Device.index`` is the CUDA ordinal, which follows ``CUDA_VISIBLE_DEVICES``; NVML numbers
    every GPU in PCI order (gpu-apis.md: match by UUID). Falls back to the ordinal when the
    UUID is unknown or NVML cannot say.
    """
    ordinal = device.index or 0
    if not device.uuid:
        return ordinal
    nvml, _ = _import_pynvml()
    if nvml is None:
        return ordinal
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        return ordinal
    try:
        return int(nvml.nvmlDeviceGetIndex(nvml.nvmlDeviceGetHandleByUUID(device.uuid)))
    except nvml.NVMLError:
        return ordinal
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


@contextlib.contextmanager
def _nvml_device(device_index: int) -> Iterator[tuple[Any, Any] | None]:
    """Yields (pynvml module, device handle) with NVML initialised, or None when unavailable."""
    nvml, _ = _import_pynvml()
    if nvml is None:
        yield None
        return
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:
        yield None
        return
    try:
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
        except nvml.NVMLError:
            yield None
            return
        yield nvml, handle
    finally:
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


class NvmlSampler:
    """Samples a GPU's board power and utilisation on a background thread while in a ``with`` block.

    On entry it reads the driver's total-energy counter and starts a daemon thread that reads
    ``nvmlDeviceGetPowerUsage`` (mW) and ``nvmlDeviceGetUtilizationRates().gpu`` every
    ``interval_s``; on exit it stops the thread and reads the energy counter again.
    :meth:`result` then gives an :class:`EnergyFootprint`. Without NVML (no package, no driver,
    bad index) the sampler is *unavailable*: it starts no thread, :meth:`result` returns None and
    :attr:`unavailable_reason` says why. Nothing here raises because of NVML.

    ``device_index`` is NVML's index (PCI bus order, not ``CUDA_VISIBLE_DEVICES``).

    Example::

        with NvmlSampler(0) as sampler:
            run_many_batches()
        energy = sampler.result(samples_processed=batches * batch_size)
    """

    def __init__(self, device_index: int, interval_s: float = 0.02) -> None:
        """Prepare a sampler of NVML device ``device_index``, reading every ``interval_s`` seconds."""
        if device_index < 0:
            raise InvalidInputError(f"device_index must be >= 0, got {device_index}")
        if not interval_s > 0:
            raise InvalidInputError(f"interval_s must be positive, got {interval_s}")
        self.device_index = device_index
        self.interval_s = interval_s
        #: why the sampler could not run at all (None while it can)
        self.unavailable_reason: str | None = None
        #: caveats: counters or queries that failed while sampling
        self.notes: list[str] = []
        self._nvml: Any = None
        self._handle: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._power_mw: list[float] = []
        self._util_pct: list[float] = []
        self._power_ok = True
        self._util_ok = True
        self._energy_start_mj: float | None = None
        self._energy_end_mj: float | None = None
        self._start_s = 0.0
        self._end_s: float | None = None
        self._available = False

    @property
    def available(self) -> bool:
        """Whether NVML answered on entry (False before entry or when unavailable)."""
        return self._available

    def __enter__(self) -> NvmlSampler:
        self._reset()
        nvml, reason = _import_pynvml()
        if nvml is None:
            self.unavailable_reason = reason
            return self
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            self.unavailable_reason = f"NVML could not be initialised ({_describe(exc)})"
            return self
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
        except nvml.NVMLError as exc:
            self.unavailable_reason = f"NVML has no device {self.device_index} ({_describe(exc)})"
            with contextlib.suppress(nvml.NVMLError):
                nvml.nvmlShutdown()
            return self
        self._nvml, self._handle = nvml, handle
        self._available = True
        self._energy_start_mj = self._read_energy()
        self._start_s = time.perf_counter()
        self._thread = threading.Thread(
            target=self._run, name=f"colocate-nvml-sampler-{self.device_index}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._nvml is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._end_s = time.perf_counter()
        if self._energy_start_mj is not None:
            self._energy_end_mj = self._read_energy()
        if not self._power_mw and self._power_ok:
            self._sample()  # a run shorter than the thread's first read still gets one sample
        with contextlib.suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()
        self._nvml = None
        self._handle = None

    def result(self, samples_processed: int) -> EnergyFootprint | None:
        """Power and energy over the ``with`` block, or None when NVML gave neither.

        Energy is the energy counter's difference (source ``"nvml total energy"``) or, where the
        counter is unsupported, mean sampled power x elapsed time (``"nvml power samples"``).

        Args:
            samples_processed: inputs processed inside the block (for ``energy_per_sample_j``).
        """
        if samples_processed < 1:
            raise InvalidInputError(f"samples_processed must be at least 1, got {samples_processed}")
        if self.unavailable_reason is not None or self._end_s is None:
            return None
        elapsed = max(self._end_s - self._start_s, 0.0)
        mean_power = statistics.fmean(self._power_mw) / 1000.0 if self._power_mw else None
        energy: float | None = None
        source = SOURCE_POWER_SAMPLES
        if self._energy_start_mj is not None and self._energy_end_mj is not None:
            delta = self._energy_end_mj - self._energy_start_mj
            if delta >= 0:
                energy, source = delta / 1000.0, SOURCE_ENERGY_COUNTER
            else:
                self._note(f"energy counter went backwards ({delta} mJ); using power samples")
        if energy is None:
            if mean_power is None:
                self._note("neither the energy counter nor power samples are available")
                return None
            energy = mean_power * elapsed
        if mean_power is None:
            mean_power = energy / elapsed if elapsed > 0 else 0.0
        utilization = statistics.fmean(self._util_pct) if self._util_pct else None
        return EnergyFootprint(
            mean_power_w=mean_power,
            energy_per_sample_j=energy / samples_processed,
            utilization_pct=utilization,
            source=source,
        )

    # -- internals

    def _reset(self) -> None:
        self.unavailable_reason = None
        self.notes = []
        self._stop.clear()
        self._power_mw, self._util_pct = [], []
        self._power_ok = self._util_ok = True
        self._energy_start_mj = self._energy_end_mj = None
        self._end_s = None
        self._available = False

    def _note(self, note: str) -> None:
        if note not in self.notes:
            self.notes.append(note)

    def _read_energy(self) -> float | None:
        try:
            return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except Exception as exc:  # NVMLError_NotSupported before Volta, or anything else
            self._note(f"energy counter unavailable ({_describe(exc)}); energy from power samples")
            return None

    def _sample(self) -> None:
        nvml, handle = self._nvml, self._handle
        if self._power_ok:
            try:
                self._power_mw.append(float(nvml.nvmlDeviceGetPowerUsage(handle)))
            except Exception as exc:
                self._power_ok = False
                self._note(f"power reading failed ({_describe(exc)})")
        if self._util_ok:
            try:
                self._util_pct.append(float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
            except Exception as exc:
                self._util_ok = False
                self._note(f"utilization reading failed ({_describe(exc)})")

    def _run(self) -> None:
        try:
            while True:
                self._sample()
                if not (self._power_ok or self._util_ok):
                    return
                if self._stop.wait(self.interval_s):
                    return
        except Exception as exc:  # never let the sampling thread raise
            self._note(f"sampling thread stopped ({_describe(exc)})")


_COMPUTE_PROCESSES = "nvmlDeviceGetComputeRunningProcesses"  # processes with a CUDA context (the MPS server)
_MPS_PROCESSES = "nvmlDeviceGetMPSComputeRunningProcesses"  # MPS clients


def _running_processes(nvml: Any, handle: Any, query: str) -> list[Any]:
    """What NVML's ``query`` lists on the device; empty when this pynvml lacks it or the driver
    does not answer."""
    function = getattr(nvml, query, None)
    if function is None:
        return []
    try:
        return list(function(handle))
    except nvml.NVMLError:
        return []


def process_gpu_memory_bytes(device_index: int, pid: int | None = None) -> int | None:
    """GPU memory NVML attributes to process ``pid`` (default: this process) on a device, in bytes.

    Includes the process's CUDA context. Looks at compute processes, then MPS clients. None when
    NVML is unavailable, the process is not listed (inside a container's PID namespace NVML reports
    host PIDs, which differ from ``os.getpid()``), or the driver does not report the figure.
    """
    wanted = os.getpid() if pid is None else pid
    with _nvml_device(device_index) as found:
        if found is None:
            return None
        nvml, handle = found
        for query in (_COMPUTE_PROCESSES, _MPS_PROCESSES):
            for process in _running_processes(nvml, handle, query):
                if getattr(process, "pid", None) == wanted:
                    used = getattr(process, "usedGpuMemory", None)
                    return int(used) if used is not None else None
    return None


def device_used_bytes(device_index: int) -> int | None:
    """Memory in use on the whole device (all processes, plus the driver's), in bytes; None without NVML."""
    with _nvml_device(device_index) as found:
        if found is None:
            return None
        nvml, handle = found
        try:
            return int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
        except nvml.NVMLError:
            return None


#: how NVML lists a process on a device (:func:`gpu_contexts`)
GpuContext = Literal["mps-client", "own-context", "not-listed"]


def gpu_contexts(device_index: int, pids: Iterable[int]) -> dict[int, GpuContext] | None:
    """How NVML lists each of ``pids`` on a device: as an MPS client
    (``nvmlDeviceGetMPSComputeRunningProcesses``), with a compute context of its own
    (``nvmlDeviceGetComputeRunningProcesses``; with MPS running, the MPS server is listed
    there and its clients are not), or not at all (no CUDA context yet, or a container's PID
    namespace: NVML reports host PIDs). None without NVML.
    """
    with _nvml_device(device_index) as found:
        if found is None:
            return None
        nvml, handle = found
        listed = {
            query: {
                int(p.pid)
                for p in _running_processes(nvml, handle, query)
                if getattr(p, "pid", None) is not None
            }
            for query in (_MPS_PROCESSES, _COMPUTE_PROCESSES)
        }
    contexts: dict[int, GpuContext] = {}
    for pid in pids:
        if pid in listed[_MPS_PROCESSES]:
            contexts[pid] = "mps-client"
        elif pid in listed[_COMPUTE_PROCESSES]:
            contexts[pid] = "own-context"
        else:
            contexts[pid] = "not-listed"
    return contexts


__all__ = [
    "SOURCE_ENERGY_COUNTER",
    "SOURCE_POWER_SAMPLES",
    "GpuContext",
    "NvmlSampler",
    "device_used_bytes",
    "gpu_contexts",
    "nvml_index",
    "process_gpu_memory_bytes",
]
