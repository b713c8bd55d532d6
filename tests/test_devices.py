"""Tests of colocate.devices: NVML detection (against a fake NVML), CPU, presets, specs, MPS."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from colocate import devices, serde
from colocate.devices import (
    GPU_PRESETS,
    Device,
    best_device,
    cpu_device,
    device_table_rows,
    find_device,
    list_devices,
    load_spec,
    mps_available,
    mps_daemon_running,
    save_spec,
    simulated_device,
)
from colocate.errors import DeviceError, InvalidInputError

GIB = 1 << 30


def _torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


requires_gpu = pytest.mark.skipif(not _torch_has_cuda(), reason="needs a CUDA GPU")


# ---------------------------------------------------------------------------
# A fake of nvidia-ml-py's pynvml: same names and signatures, strict about handles
# ---------------------------------------------------------------------------


class NVMLError(Exception):
    """Base of the fake NVML errors (like pynvml.NVMLError)."""


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_Uninitialized(NVMLError):
    pass


class FakeHandle:
    """An opaque device handle, as nvmlDeviceGetHandleByIndex hands out."""

    def __init__(self, index: int) -> None:
        self.index = index


class FakeGpu:
    def __init__(
        self,
        name: str = "NVIDIA H100 80GB HBM3",
        uuid: str = "GPU-11111111-2222-3333-4444-555555555555",
        total: int = 80 * GIB,
        free: int = 79 * GIB,
        capability: tuple[int, int] = (9, 0),
        mig: list[int] | None = None,  # None -> NotSupported
        mps_processes: int = 0,
    ) -> None:
        self.name = name
        self.uuid = uuid
        self.total = total
        self.free = free
        self.capability = capability
        self.mig = mig
        self.mps_processes = mps_processes


class FakeNvml:
    """Module-like fake of pynvml. Unknown attributes fail loudly, and so do wrong handles."""

    NVMLError = NVMLError
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVML_DEVICE_MIG_ENABLE = 1
    NVML_DEVICE_MIG_DISABLE = 0

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        init_error: type[Exception] | None = None,
        not_supported: set[str] | None = None,
        driver: str = "580.159",
        cuda: int = 13000,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.not_supported = not_supported or set()
        self.driver = driver
        self.cuda = cuda
        self.handles = [FakeHandle(i) for i in range(len(gpus))]
        self.init_calls = 0
        self.shutdown_calls = 0
        self.live = 0  # nvmlInit reference count

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # the import machinery probes __spec__ and the like
            raise AttributeError(name)
        raise AssertionError(f"the fake pynvml has no {name!r}: colocate called something unexpected")

    # -- helpers ------------------------------------------------------------
    def _check(self, what: str) -> None:
        if self.live <= 0:
            raise NVMLError_Uninitialized(f"{what} called outside nvmlInit/nvmlShutdown")
        if what in self.not_supported:
            raise NVMLError_NotSupported(f"{what}: Not Supported")

    def _gpu(self, handle: object, what: str) -> FakeGpu:
        self._check(what)
        if not isinstance(handle, FakeHandle) or handle is not self.handles[handle.index]:
            raise AssertionError(f"{what} got {handle!r}, not a handle from nvmlDeviceGetHandleByIndex")
        return self.gpus[handle.index]

    # -- the API (signatures as in nvidia-ml-py 13.615) ----------------------
    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error("NVML Shared Library Not Found")
        self.live += 1

    def nvmlShutdown(self) -> None:
        self.shutdown_calls += 1
        if self.live <= 0:
            raise NVMLError_Uninitialized("nvmlShutdown without nvmlInit")
        self.live -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._check("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._check("nvmlDeviceGetHandleByIndex")
        if not isinstance(index, int) or not 0 <= index < len(self.gpus):
            raise AssertionError(f"nvmlDeviceGetHandleByIndex got a bad index {index!r}")
        return self.handles[index]

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> FakeHandle:
        self._check("nvmlDeviceGetHandleByUUID")
        for handle, gpu in zip(self.handles, self.gpus, strict=True):
            if gpu.uuid == uuid:
                return handle
        raise NVMLError("Not Found")

    def nvmlDeviceGetName(self, handle: object) -> str:
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetMemoryInfo(self, handle: object, version: object = None) -> SimpleNamespace:
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(total=gpu.total, free=gpu.free, used=gpu.total - gpu.free)

    def nvmlDeviceGetCudaComputeCapability(self, handle: object) -> tuple[int, int]:
        return self._gpu(handle, "nvmlDeviceGetCudaComputeCapability").capability

    def nvmlDeviceGetMigMode(self, device: object) -> list[int]:
        gpu = self._gpu(device, "nvmlDeviceGetMigMode")
        if gpu.mig is None:
            raise NVMLError_NotSupported("Not Supported")
        return list(gpu.mig)

    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle: object) -> list[SimpleNamespace]:
        gpu = self._gpu(handle, "nvmlDeviceGetMPSComputeRunningProcesses")
        return [SimpleNamespace(pid=1000 + i, usedGpuMemory=None) for i in range(gpu.mps_processes)]

    def nvmlSystemGetDriverVersion(self) -> str:
        self._check("nvmlSystemGetDriverVersion")
        return self.driver

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        self._check("nvmlSystemGetCudaDriverVersion_v2")
        return self.cuda


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No real torch, no CUDA_VISIBLE_DEVICES, an empty MPS pipe dir: detection sees only the fake."""
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    pipe_dir = tmp_path / "mps"
    pipe_dir.mkdir()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipe_dir))
    return pipe_dir


def install(monkeypatch: pytest.MonkeyPatch, fake: FakeNvml) -> FakeNvml:
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


# ---------------------------------------------------------------------------
# GPU detection through the fake NVML
# ---------------------------------------------------------------------------


def test_fake_h100_is_listed_with_every_field(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    fake = install(monkeypatch, FakeNvml([FakeGpu()]))
    found = list_devices()
    assert [d.kind for d in found] == ["cuda", "cpu"]
    gpu = found[0]
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.index == 0
    assert gpu.uuid == "GPU-11111111-2222-3333-4444-555555555555"
    assert gpu.memory_total_bytes == 80 * GIB
    assert gpu.memory_free_bytes == 79 * GIB
    assert gpu.compute_capability == (9, 0)
    assert gpu.driver_version == "580.159"
    assert gpu.cuda_version == "13.0"
    assert gpu.mig_enabled is False  # MIG query NotSupported
    assert gpu.mps_running is False
    assert gpu.sm_count == 132  # from the product table: H100 SXM
    assert gpu.memory_bandwidth_gbs == 3350
    assert gpu.peak_fp16_tflops == pytest.approx(989.4)
    assert gpu.cpu_cores == devices.usable_cpu_cores()
    assert gpu.torch_device == "cuda:0" and gpu.can_execute
    assert fake.init_calls == 1 and fake.shutdown_calls == 1 and fake.live == 0


def test_nvml_init_failure_lists_only_the_cpu(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    fake = install(monkeypatch, FakeNvml([FakeGpu()], init_error=NVMLError_LibraryNotFound))
    found = list_devices()
    assert [d.kind for d in found] == ["cpu"]
    assert list_devices(include_cpu=False) == []
    assert best_device().kind == "cpu"
    assert fake.shutdown_calls == 0  # nothing to shut down after a failed init


def test_pynvml_not_installed_lists_only_the_cpu(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert [d.kind for d in list_devices()] == ["cpu"]


@pytest.mark.parametrize(
    ("call", "check"),
    [
        ("nvmlDeviceGetCudaComputeCapability", lambda d: d.compute_capability is None),
        ("nvmlDeviceGetMemoryInfo", lambda d: d.memory_total_bytes == 0 and d.memory_free_bytes is None),
        ("nvmlSystemGetDriverVersion", lambda d: d.driver_version is None),
        ("nvmlSystemGetCudaDriverVersion_v2", lambda d: d.cuda_version is None),
        ("nvmlDeviceGetUUID", lambda d: d.uuid is None),
        ("nvmlDeviceGetName", lambda d: d.name == "NVIDIA GPU 0" and d.sm_count is None),
        ("nvmlDeviceGetMPSComputeRunningProcesses", lambda d: d.mps_running is False),
    ],
)
def test_a_not_supported_field_becomes_none(
    monkeypatch: pytest.MonkeyPatch, isolated: Path, call: str, check: Any
) -> None:
    fake = install(monkeypatch, FakeNvml([FakeGpu()], not_supported={call}))
    gpus = list_devices(include_cpu=False)
    assert len(gpus) == 1
    assert check(gpus[0])
    assert fake.shutdown_calls == 1 and fake.live == 0


def test_enumeration_failure_still_shuts_nvml_down(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    fake = install(monkeypatch, FakeNvml([FakeGpu()], not_supported={"nvmlDeviceGetCount"}))
    assert [d.kind for d in list_devices()] == ["cpu"]
    assert fake.init_calls == 1 and fake.shutdown_calls == 1 and fake.live == 0


def test_mig_enabled_and_mps_clients(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    install(monkeypatch, FakeNvml([FakeGpu(mig=[1, 1], mps_processes=2)]))
    (gpu,) = list_devices(include_cpu=False)
    assert gpu.mig_enabled is True
    assert gpu.mps_running is True
    assert devices.mps_clients_running(gpu) is True
    assert devices.mps_clients_running(cpu_device()) is False


def test_mps_daemon_pipe_marks_gpus(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    install(monkeypatch, FakeNvml([FakeGpu()]))
    os.mkfifo(isolated / "control")
    (gpu,) = list_devices(include_cpu=False)
    assert gpu.mps_running is True


def test_best_device_takes_most_free_memory_and_cuda_n(
    monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    gpus = [
        FakeGpu(name="NVIDIA A100-SXM4-80GB", uuid="GPU-aaaa", free=10 * GIB, capability=(8, 0)),
        FakeGpu(name="NVIDIA H100 PCIe", uuid="GPU-bbbb", free=70 * GIB),
    ]
    install(monkeypatch, FakeNvml(gpus))
    best = best_device()
    assert (best.index, best.name, best.sm_count) == (1, "NVIDIA H100 PCIe", 114)
    assert find_device("cuda:0").name == "NVIDIA A100-SXM4-80GB"
    assert find_device("cuda").index == 0
    with pytest.raises(DeviceError, match=r"cuda:0 \(NVIDIA A100-SXM4-80GB\), cuda:1"):
        find_device("cuda:2")


@pytest.mark.parametrize(
    ("visible", "expected_uuids"),
    [
        ("1", ["GPU-bbbb"]),
        ("1,0", ["GPU-bbbb", "GPU-aaaa"]),
        ("GPU-bb", ["GPU-bbbb"]),
        ("0,7,1", ["GPU-aaaa"]),  # enumeration stops at the first invalid entry
        ("", []),
        ("-1", []),
    ],
)
def test_cuda_visible_devices_is_followed(
    monkeypatch: pytest.MonkeyPatch, isolated: Path, visible: str, expected_uuids: list[str]
) -> None:
    install(monkeypatch, FakeNvml([FakeGpu(uuid="GPU-aaaa"), FakeGpu(uuid="GPU-bbbb")]))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    gpus = list_devices(include_cpu=False)
    assert [d.uuid for d in gpus] == expected_uuids
    assert [d.index for d in gpus] == list(range(len(expected_uuids)))


def _fake_torch(
    sm_count: int = 77, *, initialized: bool, uuid: str = "11111111-2222-3333-4444-555555555555"
) -> Any:
    props = SimpleNamespace(
        name="NVIDIA H100 80GB HBM3",
        total_memory=80 * GIB,
        multi_processor_count=sm_count,
        major=9,
        minor=0,
        uuid=uuid,
    )
    cuda = SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: initialized,
        device_count=lambda: 1,
        get_device_properties=lambda i: props if i == 0 else (_ for _ in ()).throw(AssertionError(i)),
    )
    return SimpleNamespace(cuda=cuda, __name__="torch")


def test_sm_count_from_torch_only_when_cuda_already_initialised(
    monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    install(monkeypatch, FakeNvml([FakeGpu()]))
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(initialized=False))
    assert list_devices(include_cpu=False)[0].sm_count == 132  # product table, torch not asked
    assert list_devices(include_cpu=False, init_cuda=True)[0].sm_count == 77
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(initialized=True))
    assert list_devices(include_cpu=False)[0].sm_count == 77
    assert devices.read_sm_count_with_torch(0) == 77
    with pytest.raises(DeviceError, match="cuda:3"):
        devices.read_sm_count_with_torch(3)


def test_torch_fallback_when_nvml_is_unavailable(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    install(monkeypatch, FakeNvml([], init_error=NVMLError_LibraryNotFound))
    monkeypatch.setitem(sys.modules, "torch", _fake_torch(sm_count=132, initialized=False))
    found = list_devices()
    assert [d.kind for d in found] == ["cuda", "cpu"]
    gpu = found[0]
    assert (gpu.name, gpu.memory_total_bytes, gpu.sm_count, gpu.compute_capability) == (
        "NVIDIA H100 80GB HBM3",
        80 * GIB,
        132,
        (9, 0),
    )
    assert gpu.uuid == "GPU-11111111-2222-3333-4444-555555555555"
    assert gpu.memory_bandwidth_gbs == 3350


def test_unknown_product_has_no_sm_count_or_peaks(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    install(monkeypatch, FakeNvml([FakeGpu(name="NVIDIA Future GPU X")]))
    (gpu,) = list_devices(include_cpu=False)
    assert gpu.sm_count is None and gpu.memory_bandwidth_gbs is None and gpu.peak_fp16_tflops is None


@pytest.mark.parametrize(
    ("product", "sms"),
    [
        ("NVIDIA H100 80GB HBM3", 132),
        ("NVIDIA H100 PCIe", 114),
        ("NVIDIA H100 NVL", 132),
        ("NVIDIA H200", 132),
        ("NVIDIA A100-SXM4-80GB", 108),
        ("NVIDIA A100 80GB PCIe", 108),
        ("NVIDIA A10G", 80),
        ("NVIDIA A10", 72),
        ("NVIDIA L4", 58),
        ("NVIDIA L40S", 142),
        ("Tesla T4", 40),
        ("Tesla V100-SXM2-16GB", 80),
    ],
)
def test_sm_count_for_product(product: str, sms: int) -> None:
    assert devices.sm_count_for_product(product) == sms


def test_product_presets_do_not_overlap() -> None:
    assert devices.preset_for_product("NVIDIA H100 PCIe").name == "H100-PCIe"  # type: ignore[union-attr]
    assert devices.preset_for_product("NVIDIA H100 80GB HBM3").name == "H100-SXM"  # type: ignore[union-attr]
    assert devices.preset_for_product("NVIDIA H100 NVL") is None
    assert devices.preset_for_product("NVIDIA GH200 480GB") is None
    assert devices.preset_for_product("NVIDIA A100 80GB PCIe") is None  # other bandwidth than SXM
    assert devices.preset_for_product("NVIDIA L40") is None


# ---------------------------------------------------------------------------
# The real machine
# ---------------------------------------------------------------------------


def test_list_devices_on_this_machine_ends_with_the_cpu() -> None:
    found = list_devices()
    assert found[-1].kind == "cpu"
    assert all(d.kind == "cuda" for d in found[:-1])
    assert [d.index for d in found[:-1]] == list(range(len(found) - 1))
    if not _torch_has_cuda():
        assert len(found) == 1  # this machine has no GPU: exactly the CPU


@pytest.mark.gpu
@requires_gpu
def test_nvml_agrees_with_torch_on_a_real_gpu() -> None:
    import torch

    gpus = list_devices(include_cpu=False)
    assert len(gpus) == torch.cuda.device_count()
    for gpu in gpus:
        props = torch.cuda.get_device_properties(gpu.index)
        assert gpu.name == props.name
        # NVML's total counts memory that cudaGetDeviceProperties leaves out: a few % at most
        assert gpu.memory_total_bytes == pytest.approx(props.total_memory, rel=0.05)
        assert gpu.compute_capability == (props.major, props.minor)
        assert gpu.driver_version and gpu.cuda_version
        assert gpu.memory_free_bytes is not None and 0 < gpu.memory_free_bytes <= gpu.memory_total_bytes
        if gpu.sm_count is not None:
            assert gpu.sm_count == props.multi_processor_count
    exact = list_devices(include_cpu=False, init_cuda=True)
    assert [g.sm_count for g in exact] == [
        torch.cuda.get_device_properties(g.index).multi_processor_count for g in exact
    ]
    assert best_device().kind == "cuda"
    assert find_device("cuda:0").uuid == gpus[0].uuid


# ---------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------


def test_cpu_device_reports_affinity_cores_and_memory() -> None:
    cpu = cpu_device()
    assert cpu.kind == "cpu" and cpu.name
    assert cpu.cpu_cores == len(os.sched_getaffinity(0))
    assert cpu.memory_total_bytes > 0
    assert cpu.memory_free_bytes is not None and 0 < cpu.memory_free_bytes <= cpu.memory_total_bytes
    assert cpu.torch_device == "cpu" and cpu.can_execute and not cpu.is_gpu


def test_cpu_device_with_restricted_affinity_has_one_core() -> None:
    code = textwrap.dedent(
        """
        import os
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        from colocate.devices import cpu_device
        print(cpu_device().cpu_cores)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "1"


def test_host_memory_respects_a_cgroup_limit(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree: 1 kB\nMemAvailable:   12000000 kB\n")
    cgroup = tmp_path / "cgroup"
    (cgroup / "job").mkdir(parents=True)
    (cgroup / "memory.max").write_text("max\n")
    (cgroup / "job" / "memory.max").write_text(f"{4 * GIB}\n")
    (cgroup / "job" / "memory.current").write_text(f"{1 * GIB}\n")
    self_cgroup = tmp_path / "self_cgroup"
    self_cgroup.write_text("0::/job\n")
    total, free = devices._host_memory(str(meminfo), str(cgroup), str(self_cgroup))
    assert (total, free) == (4 * GIB, 3 * GIB)
    # no limit: /proc/meminfo as it is
    (cgroup / "job" / "memory.max").write_text("max\n")
    total, free = devices._host_memory(str(meminfo), str(cgroup), str(self_cgroup))
    assert (total, free) == (16000000 * 1024, 12000000 * 1024)


# ---------------------------------------------------------------------------
# Presets, spec files, serde
# ---------------------------------------------------------------------------

EXPECTED_PRESETS = {
    # name: (SMs, memory GiB, GB/s, fp16 dense TFLOP/s, fp32 TFLOP/s, capability)
    "H100-SXM": (132, 80, 3350, 989.4, 67, (9, 0)),
    "H100-PCIe": (114, 80, 2000, 756.5, 51, (9, 0)),
    "H200": (132, 141, 4800, 989.4, 67, (9, 0)),
    "A100-80GB": (108, 80, 2039, 312, 19.5, (8, 0)),
    "L4": (58, 24, 300, 121, 30.3, (8, 9)),
    "T4": (40, 16, 320, 65, 8.1, (7, 5)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_every_preset_loads_with_datasheet_numbers(name: str) -> None:
    assert name in GPU_PRESETS
    device = simulated_device(name)
    sms, gib, bandwidth, fp16, fp32, capability = EXPECTED_PRESETS[name]
    assert device.kind == "simulated" and device.name == f"{name} (simulated)"
    assert device.is_gpu and not device.can_execute
    assert device.sm_count == sms > 0
    assert device.memory_total_bytes == gib * GIB > 0
    assert device.memory_free_bytes == device.memory_total_bytes
    assert device.memory_bandwidth_gbs == pytest.approx(bandwidth)
    assert device.peak_fp16_tflops == pytest.approx(fp16)
    assert device.peak_fp32_tflops == pytest.approx(fp32)
    assert device.compute_capability == capability


@pytest.mark.parametrize(
    ("alias", "preset"),
    [
        ("H100", "H100-SXM"),
        ("h100", "H100-SXM"),
        ("A100", "A100-80GB"),
        ("h100_pcie", "H100-PCIe"),
        ("t4", "T4"),
    ],
)
def test_preset_aliases_and_case(alias: str, preset: str) -> None:
    assert simulated_device(alias) == simulated_device(preset)
    assert simulated_device(alias).name == f"{preset} (simulated)"


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(InvalidInputError, match="H100-SXM, H100-PCIe, H200, A100-80GB, L4, T4") as info:
        simulated_device("B9000")
    assert "'B9000'" in str(info.value)


def test_plain_json_spec_loads(tmp_path: Path) -> None:
    path = tmp_path / "mygpu.json"
    path.write_text(
        json.dumps(
            {
                "name": "MyGPU",
                "sm_count": 100,
                "memory_gb": 48,
                "memory_bandwidth_gbs": 1000,
                "peak_fp16_tflops": 200,
                "peak_fp32_tflops": 50,
                "compute_capability": [8, 6],
            }
        )
    )
    device = load_spec(path)
    assert device == Device(
        kind="simulated",
        name="MyGPU (simulated)",
        memory_total_bytes=48 * GIB,
        memory_free_bytes=48 * GIB,
        sm_count=100,
        compute_capability=(8, 6),
        memory_bandwidth_gbs=1000.0,
        peak_fp16_tflops=200.0,
        peak_fp32_tflops=50.0,
    )
    assert simulated_device(str(path)) == device
    assert find_device(str(path)) == device


def test_plain_spec_with_bytes_and_only_required_keys(tmp_path: Path) -> None:
    path = tmp_path / "min.json"
    path.write_text(json.dumps({"name": "Tiny", "sm_count": 4, "memory_total_bytes": 1 << 30}))
    device = load_spec(path)
    assert (device.sm_count, device.memory_total_bytes, device.peak_fp16_tflops) == (4, GIB, None)


def test_serde_spec_file_loads_and_round_trips(tmp_path: Path) -> None:
    original = simulated_device("H100")
    path = save_spec(original, tmp_path / "h100.json")
    assert load_spec(path) == original
    assert serde.load(Device, path) == original
    assert simulated_device(str(path)) == original
    cpu = cpu_device()
    serde.save(cpu, tmp_path / "cpu.json")
    assert serde.load(Device, tmp_path / "cpu.json") == cpu
    assert load_spec(tmp_path / "cpu.json") == cpu


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "X", "memory_gb": 8}, "'sm_count'"),
        ({"sm_count": 8, "memory_gb": 8}, "'name'"),
        ({"name": "X", "sm_count": 8}, "memory_gb"),
        ({"name": "X", "sm_count": 0, "memory_gb": 8}, "'sm_count' must be a positive integer"),
        ({"name": "X", "sm_count": 8, "memory_gb": -1}, "'memory_gb' must be a positive number"),
        ({"name": "X", "sm_count": 8, "memory_gb": 8, "compute_capability": [9]}, "compute_capability"),
        ({"name": "X", "sm_count": 8, "memory_gb": 8, "sm_cuont": 1}, "unknown key"),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_spec_errors_name_the_key_and_file(tmp_path: Path, body: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))
    with pytest.raises(InvalidInputError, match=message) as info:
        load_spec(path)
    assert str(path) in str(info.value)


def test_missing_and_invalid_spec_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="no such GPU spec file"):
        load_spec(tmp_path / "absent.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        simulated_device(str(broken))


def test_fingerprint_is_stable_and_tells_gpus_apart(tmp_path: Path) -> None:
    h100 = simulated_device("H100")
    assert h100.fingerprint() == simulated_device("h100-sxm").fingerprint()
    assert len(h100.fingerprint()) == 16
    path = save_spec(h100, tmp_path / "h100.json")
    assert load_spec(path).fingerprint() == h100.fingerprint()
    assert h100.fingerprint() != simulated_device("A100").fingerprint()
    # sha256 of fixed fields: the same in another interpreter
    code = "from colocate.devices import simulated_device; print(simulated_device('H100').fingerprint())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == h100.fingerprint()


# ---------------------------------------------------------------------------
# MPS detection
# ---------------------------------------------------------------------------


def test_mps_control_fifo_means_running(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "control")
    assert mps_daemon_running(str(tmp_path)) is True


def test_empty_pipe_dir_means_not_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert mps_daemon_running(str(tmp_path)) is False
    (tmp_path / "control").write_text("a regular file is not the daemon's pipe")
    assert mps_daemon_running(str(tmp_path)) is False
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "absent"))
    assert mps_daemon_running() is False


def test_a_control_socket_alone_is_a_stopped_daemon() -> None:
    # driver 580: `control` is a Unix socket and stays after `quit`; only the pid file goes
    directory = Path(tempfile.mkdtemp(prefix="mps", dir="/tmp"))  # short: socket paths max ~107 bytes
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.bind(str(directory / "control"))
            assert mps_daemon_running(str(directory)) is False
            (directory / "nvidia-cuda-mps-control.pid").write_text("4321\n")
            assert mps_daemon_running(str(directory)) is True
    finally:
        shutil.rmtree(directory)


def test_mps_pid_file_and_env_pipe_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "nvidia-cuda-mps-control.pid").write_text("1234\n")
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))
    assert mps_daemon_running() is True
    assert devices.mps_pipe_directory() == tmp_path


def test_mps_available_follows_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert mps_available() is False
    binary = tmp_path / "nvidia-cuda-mps-control"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert mps_available() is True


# ---------------------------------------------------------------------------
# find_device and the table rows
# ---------------------------------------------------------------------------


def test_find_device_cpu_and_preset() -> None:
    assert find_device("cpu").kind == "cpu"
    assert find_device(" CPU ").kind == "cpu"
    assert find_device("h100") == simulated_device("H100-SXM")
    assert find_device("H100-SXM (simulated)") == simulated_device("H100-SXM")


def test_find_device_missing_cuda_ordinal(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    install(monkeypatch, FakeNvml([], init_error=NVMLError_LibraryNotFound))
    with pytest.raises(DeviceError, match="'cuda:3' does not exist: this machine has no CUDA GPU"):
        find_device("cuda:3")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        find_device("cuda")
    assert find_device("best").kind == "cpu"


def test_find_device_cuda_3_on_this_machine() -> None:
    if len(list_devices(include_cpu=False)) > 3:
        pytest.skip("this machine has a cuda:3")
    with pytest.raises(DeviceError, match="cuda:3"):
        find_device("cuda:3")


def test_find_device_unknown_string() -> None:
    with pytest.raises(InvalidInputError, match=r"unknown device 'tpu'.*known presets: H100-SXM"):
        find_device("tpu")


def test_device_table_rows() -> None:
    rows = device_table_rows([simulated_device("H100"), cpu_device()])
    assert list(rows[0]) == [
        "device",
        "kind",
        "name",
        "SMs",
        "memory GiB",
        "free GiB",
        "capability",
        "driver",
        "CUDA",
        "MPS",
        "MIG",
        "cores",
    ]
    assert rows[0]["SMs"] == "132"
    assert rows[0]["memory GiB"] == "80.0"
    assert rows[0]["capability"] == "9.0"
    assert rows[0]["device"] == "-"
    assert rows[0]["MPS"] == "no"
    assert rows[1]["kind"] == "cpu" and rows[1]["MPS"] == "-" and rows[1]["SMs"] == "-"
    assert rows[1]["cores"] == str(len(os.sched_getaffinity(0)))
    assert all(isinstance(v, str) for row in rows for v in row.values())
