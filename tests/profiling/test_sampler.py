"""NVML sampling: a fake ``pynvml`` with known answers, the real one where there is no GPU, and a GPU test."""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest

from colocate.errors import InvalidInputError
from colocate.profiling.sampler import (
    SOURCE_ENERGY_COUNTER,
    SOURCE_POWER_SAMPLES,
    NvmlSampler,
    device_used_bytes,
    gpu_contexts,
    process_gpu_memory_bytes,
)


class _Handle:
    """The opaque device handle the fake hands out (real pynvml: a ``c_nvmlDevice_t`` pointer)."""

    def __init__(self, index: int) -> None:
        self.index = index


@dataclass
class _Process:
    pid: int
    usedGpuMemory: int | None  # NVML's field name


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _Memory:
    total: int
    free: int
    used: int


def make_fake_pynvml(
    *,
    energy_mj: tuple[int, ...] = (1000, 3000),
    energy_supported: bool = True,
    init_error: str | None = None,
    power_mw: int = 250_000,
    utilization: int = 80,
    processes: tuple[_Process, ...] = (),
    mps_processes: tuple[_Process, ...] = (),
    device_count: int = 1,
) -> Any:
    """A ``pynvml`` stand-in with the real names and error classes; it counts calls and checks handles."""
    nvml: Any = types.ModuleType("pynvml")
    calls: Counter[str] = Counter()
    nvml.calls = calls
    nvml.initialised = 0  # NVML's reference count
    handles = [_Handle(i) for i in range(device_count)]
    energy_reads = list(energy_mj)

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        def __str__(self) -> str:
            return "NVML Shared Library Not Found"

    class NVMLError_NotSupported(NVMLError):
        def __str__(self) -> str:
            return "Not Supported"

    class NVMLError_InvalidArgument(NVMLError):
        def __str__(self) -> str:
            return "Invalid Argument"

    class NVMLError_Uninitialized(NVMLError):
        def __str__(self) -> str:
            return "Uninitialized"

    nvml.NVMLError = NVMLError
    nvml.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    nvml.NVMLError_NotSupported = NVMLError_NotSupported
    nvml.NVMLError_InvalidArgument = NVMLError_InvalidArgument
    nvml.NVMLError_Uninitialized = NVMLError_Uninitialized

    def check(handle: object, what: str) -> None:
        calls[what] += 1
        if nvml.initialised <= 0:
            raise NVMLError_Uninitialized()
        if not any(handle is h for h in handles):
            raise TypeError(f"{what}: expected the handle from nvmlDeviceGetHandleByIndex, got {handle!r}")

    def nvmlInit() -> None:
        calls["nvmlInit"] += 1
        if init_error == "LibraryNotFound":
            raise NVMLError_LibraryNotFound()
        nvml.initialised += 1

    def nvmlShutdown() -> None:
        calls["nvmlShutdown"] += 1
        if nvml.initialised <= 0:
            raise NVMLError_Uninitialized()
        nvml.initialised -= 1

    def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
        calls["nvmlDeviceGetHandleByIndex"] += 1
        if nvml.initialised <= 0:
            raise NVMLError_Uninitialized()
        if not isinstance(index, int) or isinstance(index, bool):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(handles):
            raise NVMLError_InvalidArgument()
        return handles[index]

    def nvmlDeviceGetTotalEnergyConsumption(handle: object) -> int:
        check(handle, "nvmlDeviceGetTotalEnergyConsumption")
        if not energy_supported:
            raise NVMLError_NotSupported()
        return energy_reads.pop(0) if len(energy_reads) > 1 else energy_reads[0]

    def nvmlDeviceGetPowerUsage(handle: object) -> int:
        check(handle, "nvmlDeviceGetPowerUsage")
        return power_mw

    def nvmlDeviceGetUtilizationRates(handle: object) -> _Utilization:
        check(handle, "nvmlDeviceGetUtilizationRates")
        return _Utilization(gpu=utilization, memory=10)

    def nvmlDeviceGetComputeRunningProcesses(handle: object) -> list[_Process]:
        check(handle, "nvmlDeviceGetComputeRunningProcesses")
        return list(processes)

    def nvmlDeviceGetMPSComputeRunningProcesses(handle: object) -> list[_Process]:
        check(handle, "nvmlDeviceGetMPSComputeRunningProcesses")
        return list(mps_processes)

    def nvmlDeviceGetMemoryInfo(handle: object) -> _Memory:
        check(handle, "nvmlDeviceGetMemoryInfo")
        return _Memory(total=80 << 30, free=70 << 30, used=10 << 30)

    def nvmlDeviceGetHandleByUUID(uuid: str) -> _Handle:  # UUIDs "GPU-<NVML index>" here
        calls["nvmlDeviceGetHandleByUUID"] += 1
        if nvml.initialised <= 0:
            raise NVMLError_Uninitialized()
        for handle in handles:
            if uuid == f"GPU-{handle.index}":
                return handle
        raise NVMLError_InvalidArgument()

    def nvmlDeviceGetIndex(handle: object) -> int:
        check(handle, "nvmlDeviceGetIndex")
        assert isinstance(handle, _Handle)
        return handle.index

    for function in (
        nvmlInit,
        nvmlShutdown,
        nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetTotalEnergyConsumption,
        nvmlDeviceGetPowerUsage,
        nvmlDeviceGetUtilizationRates,
        nvmlDeviceGetComputeRunningProcesses,
        nvmlDeviceGetMPSComputeRunningProcesses,
        nvmlDeviceGetMemoryInfo,
        nvmlDeviceGetHandleByUUID,
        nvmlDeviceGetIndex,
    ):
        setattr(nvml, function.__name__, function)
    return nvml


def _sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("colocate-nvml-sampler")]


def install(monkeypatch: pytest.MonkeyPatch, nvml: Any) -> Any:
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml


# --------------------------------------------------------------------------- NvmlSampler with the fake


def test_the_gpu_is_found_in_nvmls_numbering_by_its_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    # with CUDA_VISIBLE_DEVICES=2 the GPU is CUDA ordinal 0 but NVML index 2: measuring NVML's
    # GPU 0 would read another GPU's power, memory and processes
    from colocate.devices import Device
    from colocate.profiling.sampler import nvml_index

    nvml = install(monkeypatch, make_fake_pynvml(device_count=4))
    visible = Device(kind="cuda", name="GPU", index=0, uuid="GPU-2")
    assert nvml_index(visible) == 2
    assert nvml.calls["nvmlInit"] == nvml.calls["nvmlShutdown"] == 1 and nvml.initialised == 0
    assert nvml_index(Device(kind="cuda", name="GPU", index=1)) == 1  # no UUID: the ordinal
    assert nvml_index(Device(kind="cuda", name="GPU", index=1, uuid="GPU-9")) == 1  # unknown to NVML


def test_energy_from_the_counter(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = install(monkeypatch, make_fake_pynvml(energy_mj=(1000, 3000), power_mw=250_000, utilization=80))
    with NvmlSampler(0, interval_s=0.005) as sampler:
        assert sampler.available
        assert _sampler_threads(), "the sampling thread is not running inside the block"
        time.sleep(0.05)
    assert not _sampler_threads()
    energy = sampler.result(samples_processed=100)
    assert energy is not None
    assert energy.source == SOURCE_ENERGY_COUNTER
    assert energy.energy_per_sample_j == pytest.approx(0.02)  # (3000 - 1000) mJ = 2 J over 100 samples
    assert energy.mean_power_w == pytest.approx(250.0)  # mW -> W
    assert energy.utilization_pct == pytest.approx(80.0)
    assert nvml.calls["nvmlInit"] == nvml.calls["nvmlShutdown"] == 1
    assert nvml.initialised == 0
    assert nvml.calls["nvmlDeviceGetTotalEnergyConsumption"] == 2
    assert nvml.calls["nvmlDeviceGetPowerUsage"] >= 2  # sampled repeatedly while the block ran


def test_unsupported_energy_counter_falls_back_to_power_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = install(monkeypatch, make_fake_pynvml(energy_supported=False, power_mw=100_000))
    with NvmlSampler(0, interval_s=0.005) as sampler:
        time.sleep(0.05)
    energy = sampler.result(samples_processed=10)
    assert energy is not None
    assert energy.source == SOURCE_POWER_SAMPLES
    assert "power samples" in energy.source
    assert energy.mean_power_w == pytest.approx(100.0)
    # 100 W over at least the 50 ms slept (and well under a second), shared by 10 samples
    assert 100.0 * 0.05 / 10 * 0.99 <= energy.energy_per_sample_j <= 100.0 * 1.0 / 10
    assert any("energy counter unavailable" in note for note in sampler.notes)
    assert nvml.calls["nvmlShutdown"] == 1


def test_a_block_shorter_than_one_interval_still_gets_a_power_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, make_fake_pynvml(energy_supported=False, power_mw=42_000))
    with NvmlSampler(0, interval_s=10.0) as sampler:
        pass
    energy = sampler.result(samples_processed=1)
    assert energy is not None and energy.mean_power_w == pytest.approx(42.0)
    assert not _sampler_threads()


def test_library_not_found_makes_the_sampler_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = install(monkeypatch, make_fake_pynvml(init_error="LibraryNotFound"))
    with NvmlSampler(0) as sampler:
        assert not _sampler_threads()
    assert not sampler.available
    assert sampler.result(samples_processed=1) is None
    assert sampler.unavailable_reason is not None
    assert "NVMLError_LibraryNotFound" in sampler.unavailable_reason
    assert nvml.calls["nvmlShutdown"] == 0  # init failed: nothing to shut down


def test_a_missing_device_shuts_nvml_down_again(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = install(monkeypatch, make_fake_pynvml(device_count=1))
    with NvmlSampler(3) as sampler:
        pass
    assert sampler.result(samples_processed=1) is None
    assert sampler.unavailable_reason is not None and "no device 3" in sampler.unavailable_reason
    assert nvml.calls["nvmlInit"] == nvml.calls["nvmlShutdown"] == 1
    assert not _sampler_threads()


def test_missing_pynvml_makes_the_sampler_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with NvmlSampler(0) as sampler:
        pass
    assert sampler.result(samples_processed=1) is None
    assert sampler.unavailable_reason is not None and "pynvml" in sampler.unavailable_reason


def test_nvml_errors_while_sampling_stay_in_the_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = install(monkeypatch, make_fake_pynvml())

    def broken(handle: object) -> int:
        raise nvml.NVMLError_NotSupported()

    nvml.nvmlDeviceGetPowerUsage = broken
    nvml.nvmlDeviceGetUtilizationRates = broken
    with NvmlSampler(0, interval_s=0.005) as sampler:
        time.sleep(0.03)
    assert not _sampler_threads()
    energy = sampler.result(samples_processed=4)
    assert energy is not None  # the energy counter still answers
    assert energy.source == SOURCE_ENERGY_COUNTER
    assert energy.energy_per_sample_j == pytest.approx(0.5)
    assert energy.mean_power_w > 0  # energy / elapsed
    assert energy.utilization_pct is None
    assert any("power reading failed" in note for note in sampler.notes)
    assert nvml.calls["nvmlShutdown"] == 1


def test_result_before_the_block_ends_is_none_and_bad_counts_are_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    install(monkeypatch, make_fake_pynvml())
    sampler = NvmlSampler(0)
    assert sampler.result(samples_processed=1) is None
    with pytest.raises(InvalidInputError):
        sampler.result(samples_processed=0)
    with pytest.raises(InvalidInputError):
        NvmlSampler(0, interval_s=0)


def test_the_sampler_can_be_used_again(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = install(monkeypatch, make_fake_pynvml(energy_mj=(0, 1000, 1000, 4000)))
    sampler = NvmlSampler(0, interval_s=0.005)
    results = []
    for _ in range(2):
        with sampler:
            pass
        energy = sampler.result(samples_processed=1)
        assert energy is not None
        results.append(energy.energy_per_sample_j)
    assert results == pytest.approx([1.0, 3.0])
    assert nvml.calls["nvmlInit"] == nvml.calls["nvmlShutdown"] == 2


# --------------------------------------------------------------------------- process and device memory


def test_process_memory_finds_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    nvml = install(
        monkeypatch,
        make_fake_pynvml(
            processes=(_Process(pid=me + 1, usedGpuMemory=1), _Process(pid=me, usedGpuMemory=512 << 20))
        ),
    )
    assert process_gpu_memory_bytes(0) == 512 << 20
    assert process_gpu_memory_bytes(0, pid=me + 1) == 1
    assert nvml.calls["nvmlInit"] == nvml.calls["nvmlShutdown"] == 2
    assert nvml.initialised == 0


def test_process_memory_is_none_when_absent_or_unreported(monkeypatch: pytest.MonkeyPatch) -> None:
    me = os.getpid()
    install(monkeypatch, make_fake_pynvml(processes=(_Process(pid=me + 1, usedGpuMemory=1),)))
    assert process_gpu_memory_bytes(0) is None  # e.g. hidden by a container's PID namespace
    install(monkeypatch, make_fake_pynvml(processes=(_Process(pid=me, usedGpuMemory=None),)))
    assert process_gpu_memory_bytes(0) is None
    install(monkeypatch, make_fake_pynvml(mps_processes=(_Process(pid=me, usedGpuMemory=7),)))
    assert process_gpu_memory_bytes(0) == 7  # an MPS client
    install(monkeypatch, make_fake_pynvml(init_error="LibraryNotFound"))
    assert process_gpu_memory_bytes(0) is None


def test_gpu_contexts_tell_mps_clients_from_processes_with_their_own_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nvml = install(
        monkeypatch,
        make_fake_pynvml(
            # with MPS, the server has the compute context and its clients are listed apart
            processes=(_Process(pid=100, usedGpuMemory=1), _Process(pid=300, usedGpuMemory=1)),
            mps_processes=(_Process(pid=200, usedGpuMemory=1), _Process(pid=201, usedGpuMemory=1)),
        ),
    )
    assert gpu_contexts(0, [200, 300, 201, 999]) == {
        200: "mps-client",
        300: "own-context",
        201: "mps-client",
        999: "not-listed",  # no context, or hidden by a container's PID namespace
    }
    assert nvml.calls["nvmlDeviceGetMPSComputeRunningProcesses"] == 1
    assert nvml.calls["nvmlInit"] == nvml.calls["nvmlShutdown"] == 1
    assert gpu_contexts(3, [200]) is None  # no such device
    install(monkeypatch, make_fake_pynvml(init_error="LibraryNotFound"))
    assert gpu_contexts(0, [200]) is None


def test_gpu_contexts_without_the_mps_query(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = make_fake_pynvml(processes=(_Process(pid=5, usedGpuMemory=1),))
    del nvml.nvmlDeviceGetMPSComputeRunningProcesses  # an older nvidia-ml-py
    install(monkeypatch, nvml)
    assert gpu_contexts(0, [5, 6]) == {5: "own-context", 6: "not-listed"}


def test_device_used_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = install(monkeypatch, make_fake_pynvml())
    assert device_used_bytes(0) == 10 << 30
    assert device_used_bytes(5) is None
    assert nvml.calls["nvmlInit"] == nvml.calls["nvmlShutdown"] == 2
    install(monkeypatch, make_fake_pynvml(init_error="LibraryNotFound"))
    assert device_used_bytes(0) is None


# --------------------------------------------------------------------------- the real pynvml


def _has_nvml() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(_has_nvml(), reason="this machine has an NVIDIA driver: covered by the GPU test")
def test_real_pynvml_without_a_gpu_is_unavailable_not_an_error() -> None:
    with NvmlSampler(0) as sampler:
        pass
    assert sampler.result(samples_processed=1) is None
    assert sampler.unavailable_reason
    assert process_gpu_memory_bytes(0) is None
    assert device_used_bytes(0) is None
    assert not _sampler_threads()


@pytest.mark.gpu
def test_real_sampler_around_matmuls_on_the_gpu() -> None:
    import torch

    a = torch.randn(4096, 4096, device="cuda")
    b = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    with NvmlSampler(torch.cuda.current_device(), interval_s=0.01) as sampler:
        for _ in range(300):
            a @ b
        torch.cuda.synchronize()
    assert not _sampler_threads()
    energy = sampler.result(samples_processed=300)
    assert energy is not None, sampler.unavailable_reason
    assert energy.mean_power_w > 0
    assert energy.energy_per_sample_j > 0
    assert energy.utilization_pct is None or 0.0 <= energy.utilization_pct <= 100.0
    assert device_used_bytes(torch.cuda.current_device()) is not None
