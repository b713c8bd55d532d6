"""Devices: what can run (or be planned for) an ensemble.

A :class:`Device` is a real GPU (read with NVML and torch.cuda), the CPU, or a
simulated GPU built from a spec (for planning without the hardware).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.resources
import json
import logging
import os
import platform
import re
import shutil
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from colocate import serde
from colocate._optional import is_available, optional_import
from colocate.errors import BackendUnavailableError, DeviceError, InternalError, InvalidInputError

DeviceKind = Literal["cuda", "cpu", "simulated"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Device:
    """One device of this machine, or a simulated GPU.

    Memory is in bytes, bandwidth in GB/s, throughput in TFLOP/s.
    """

    kind: DeviceKind  # "cuda" (real GPU), "cpu", or "simulated" (a GPU from a spec)
    name: str  # e.g. "NVIDIA H100 80GB HBM3", "cpu", "H100-SXM (simulated)"
    index: int = 0  # CUDA ordinal for "cuda"; 0 otherwise
    memory_total_bytes: int = 0  # device memory (GPU) or usable RAM (CPU)
    memory_free_bytes: int | None = None  # free at detection time; None when unknown
    sm_count: int | None = None  # streaming multiprocessors (GPU only)
    compute_capability: tuple[int, int] | None = None  # (major, minor), GPU only
    driver_version: str | None = None  # NVIDIA driver version
    cuda_version: str | None = None  # CUDA version of the driver (e.g. "13.0")
    uuid: str | None = None  # GPU UUID from NVML
    mps_running: bool = False  # an MPS control daemon is reachable for this GPU
    mig_enabled: bool = False  # MIG mode is on (then MPS/stream plans target one slice)
    cpu_cores: int = 1  # cores usable by this process (affinity); host cores for GPUs
    memory_bandwidth_gbs: float | None = None  # peak memory bandwidth, GB/s
    peak_fp16_tflops: float | None = None  # dense FP16 tensor throughput, TFLOP/s
    peak_fp32_tflops: float | None = None  # FP32 throughput, TFLOP/s

    @property
    def is_gpu(self) -> bool:
        """A real or simulated GPU."""
        return self.kind in ("cuda", "simulated")

    @property
    def can_execute(self) -> bool:
        """Whether members can actually run here (not a simulated device)."""
        return self.kind in ("cuda", "cpu")

    @property
    def torch_device(self) -> str:
        """The torch device string: ``"cuda:N"`` or ``"cpu"``."""
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"

    def fingerprint(self) -> str:
        """A short stable key for caches: same hardware and software -> same key."""
        parts = [
            self.kind,
            self.name,
            str(self.memory_total_bytes),
            str(self.sm_count),
            str(self.compute_capability),
            str(self.driver_version),
            str(self.cpu_cores) if self.kind == "cpu" else "",
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def usable_cpu_cores() -> int:
    """Cores this process may run on (its affinity mask), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


# ---------------------------------------------------------------------------
# Presets (simulated GPUs) and the product-name tables
# ---------------------------------------------------------------------------

_GIB = 1 << 30
DEFAULT_MPS_PIPE_DIR = "/tmp/nvidia-mps"  # MPS's own default for CUDA_MPS_PIPE_DIRECTORY
_SIMULATED_SUFFIX = " (simulated)"
_PRESET_ALIASES_NOTE = "preset names are case-insensitive; '-', '_' and spaces are ignored"


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet numbers of one GPU product, the source of simulated devices.

    Throughput is dense (not sparse), memory in bytes, bandwidth in GB/s.
    """

    name: str  # preset name, e.g. "H100-SXM"
    sm_count: int  # streaming multiprocessors, > 0
    memory_total_bytes: int  # device memory in bytes (datasheet "GB" read as GiB), > 0
    memory_bandwidth_gbs: float | None = None  # peak memory bandwidth, GB/s
    peak_fp16_tflops: float | None = None  # dense FP16 tensor throughput, TFLOP/s
    peak_fp32_tflops: float | None = None  # FP32 throughput, TFLOP/s
    compute_capability: tuple[int, int] | None = None  # (major, minor)
    aliases: tuple[str, ...] = ()  # other names that select this preset, e.g. ("H100",)
    match: tuple[str, ...] = ()  # regexes searched in a real GPU's product name
    source: str = ""  # where the numbers come from

    def matches_product(self, product_name: str) -> bool:
        """Whether a real GPU's product name (from NVML or torch) is this preset's product."""
        return any(re.search(p, product_name, re.IGNORECASE) for p in self.match)

    def to_device(self) -> Device:
        """This preset as a ``"simulated"`` :class:`Device` (memory all free)."""
        return Device(
            kind="simulated",
            name=self.name + _SIMULATED_SUFFIX,
            memory_total_bytes=self.memory_total_bytes,
            memory_free_bytes=self.memory_total_bytes,
            sm_count=self.sm_count,
            compute_capability=self.compute_capability,
            memory_bandwidth_gbs=self.memory_bandwidth_gbs,
            peak_fp16_tflops=self.peak_fp16_tflops,
            peak_fp32_tflops=self.peak_fp32_tflops,
        )


# keys a plain JSON spec may hold (a preset entry of data/gpu_presets.json is one too)
_SPEC_REQUIRED = ("name", "sm_count")
_SPEC_MEMORY_KEYS = ("memory_total_bytes", "memory_gb", "memory_gib")
_SPEC_OPTIONAL = (
    "memory_free_bytes",
    "memory_bandwidth_gbs",
    "peak_fp16_tflops",
    "peak_fp32_tflops",
    "compute_capability",
    "aliases",
    "match",
    "source",
    "comment",
)
_SPEC_KEYS = (*_SPEC_REQUIRED, *_SPEC_MEMORY_KEYS, *_SPEC_OPTIONAL)


def _spec_from_mapping(data: object, source: str) -> GpuSpec:
    """Validate a plain JSON spec object and build a :class:`GpuSpec`; errors name key and source."""
    if not isinstance(data, dict):
        raise InvalidInputError(f"{source}: a GPU spec must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(_SPEC_KEYS))
    if unknown:
        raise InvalidInputError(
            f"{source}: unknown key(s) {unknown} in GPU spec; allowed keys: {', '.join(_SPEC_KEYS)}"
        )
    for key in _SPEC_REQUIRED:
        if key not in data:
            raise InvalidInputError(
                f"{source}: GPU spec is missing the required key '{key}' "
                f"(required: name, sm_count and one of {', '.join(_SPEC_MEMORY_KEYS)})"
            )
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        raise InvalidInputError(f"{source}: 'name' must be a non-empty string, got {name!r}")
    sm_count = data["sm_count"]
    if isinstance(sm_count, bool) or not isinstance(sm_count, int) or sm_count <= 0:
        raise InvalidInputError(f"{source}: 'sm_count' must be a positive integer, got {sm_count!r}")

    memory_keys = [k for k in _SPEC_MEMORY_KEYS if k in data]
    if not memory_keys:
        raise InvalidInputError(
            f"{source}: GPU spec is missing the device memory: give one of the keys "
            f"{', '.join(_SPEC_MEMORY_KEYS)} ('memory_gb' is read as GiB, 2^30 bytes)"
        )
    if len(memory_keys) > 1:
        raise InvalidInputError(f"{source}: give only one of the keys {memory_keys}, not several")
    memory_key = memory_keys[0]
    memory = _positive_number(data[memory_key], memory_key, source)
    memory_total = int(memory) if memory_key == "memory_total_bytes" else round(memory * _GIB)

    capability = _capability(data.get("compute_capability"), source)
    aliases = _string_list(data.get("aliases", []), "aliases", source)
    match = _string_list(data.get("match", []), "match", source)
    for pattern in match:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InvalidInputError(f"{source}: 'match' pattern {pattern!r} is invalid: {exc}") from exc
    source_text = data.get("source", "")
    if not isinstance(source_text, str):
        raise InvalidInputError(f"{source}: 'source' must be a string, got {source_text!r}")
    return GpuSpec(
        name=name.strip(),
        sm_count=sm_count,
        memory_total_bytes=memory_total,
        memory_bandwidth_gbs=_optional_number(
            data.get("memory_bandwidth_gbs"), "memory_bandwidth_gbs", source
        ),
        peak_fp16_tflops=_optional_number(data.get("peak_fp16_tflops"), "peak_fp16_tflops", source),
        peak_fp32_tflops=_optional_number(data.get("peak_fp32_tflops"), "peak_fp32_tflops", source),
        compute_capability=capability,
        aliases=aliases,
        match=match,
        source=source_text,
    )


def _positive_number(value: object, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidInputError(f"{source}: '{key}' must be a positive number, got {value!r}")
    return float(value)


def _optional_number(value: object, key: str, source: str) -> float | None:
    return None if value is None else _positive_number(value, key, source)


def _capability(value: object, source: str) -> tuple[int, int] | None:
    """``[9, 0]`` or ``"9.0"`` -> ``(9, 0)``; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        parts: list[object] = []
        for piece in value.split("."):
            parts.append(int(piece) if piece.isdigit() else piece)
        value = parts
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        return (int(value[0]), int(value[1]))
    raise InvalidInputError(
        f"{source}: 'compute_capability' must be [major, minor] (e.g. [9, 0]) or \"9.0\", got {value!r}"
    )


def _string_list(value: object, key: str, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInputError(f"{source}: '{key}' must be a list of strings, got {value!r}")
    return tuple(value)


def _load_preset_data() -> tuple[dict[str, GpuSpec], tuple[tuple[str, int], ...]]:
    """Read ``colocate/data/gpu_presets.json`` (shipped as package data)."""
    resource = importlib.resources.files("colocate").joinpath("data/gpu_presets.json")
    source = "colocate/data/gpu_presets.json"
    try:
        payload = json.loads(resource.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:  # a broken install, not a user error
        raise InternalError(f"{source}: cannot read the GPU presets shipped with colocate: {exc}") from exc
    presets: dict[str, GpuSpec] = {}
    for i, entry in enumerate(payload["presets"]):
        spec = _spec_from_mapping(entry, f"{source} presets[{i}]")
        presets[spec.name] = spec
    sm_counts = tuple((str(row["match"]), int(row["sm_count"])) for row in payload["sm_counts"])
    return presets, sm_counts


GPU_PRESETS: dict[str, GpuSpec]
"""Known GPU products by preset name ("H100-SXM", "H100-PCIe", "H200", "A100-80GB", "L4", "T4")."""
_SM_COUNT_BY_PRODUCT: tuple[tuple[str, int], ...]
GPU_PRESETS, _SM_COUNT_BY_PRODUCT = _load_preset_data()


def _normalise_name(name: str) -> str:
    return re.sub(r"[^0-9a-z]", "", name.lower())


def preset_names() -> list[str]:
    """The preset names, in the order of the presets file."""
    return list(GPU_PRESETS)


def get_preset(name: str) -> GpuSpec:
    """The preset called ``name`` (case-insensitive, aliases allowed: "H100" -> "H100-SXM").

    Raises:
        InvalidInputError: no such preset; the message lists the presets.
    """
    wanted = _normalise_name(name.removesuffix(_SIMULATED_SUFFIX))
    for spec in GPU_PRESETS.values():
        if wanted in {_normalise_name(n) for n in (spec.name, *spec.aliases)}:
            return spec
    raise InvalidInputError(f"unknown GPU preset {name!r}; {_preset_listing()}")


def _preset_listing() -> str:
    aliases = [f"{a} -> {s.name}" for s in GPU_PRESETS.values() for a in s.aliases]
    return (
        f"known presets: {', '.join(GPU_PRESETS)} (aliases: {', '.join(aliases)}; {_PRESET_ALIASES_NOTE}); "
        "or give the path of a JSON spec file"
    )


def preset_for_product(product_name: str) -> GpuSpec | None:
    """The preset whose product a real GPU's name (e.g. "NVIDIA H100 80GB HBM3") is, or None."""
    for spec in GPU_PRESETS.values():
        if spec.matches_product(product_name):
            return spec
    return None


def sm_count_for_product(product_name: str) -> int | None:
    """SM count of a known GPU product from its name, or None when the product is not known."""
    spec = preset_for_product(product_name)
    if spec is not None:
        return spec.sm_count
    for pattern, count in _SM_COUNT_BY_PRODUCT:
        if re.search(pattern, product_name, re.IGNORECASE):
            return count
    return None


# ---------------------------------------------------------------------------
# Spec files and simulated devices
# ---------------------------------------------------------------------------


def load_spec(path: str | Path) -> Device:
    """Load a device from a JSON spec file.

    Two formats are accepted:

    * a file written by :func:`save_spec` (``serde.save(device)``): the device as saved;
    * a plain JSON object with ``name``, ``sm_count``, the memory as ``memory_gb``
      (GiB, 2^30 bytes, as GPU datasheets count) or ``memory_total_bytes``, and
      optionally ``memory_bandwidth_gbs``, ``peak_fp16_tflops``, ``peak_fp32_tflops``,
      ``compute_capability`` (``[major, minor]``): a ``"simulated"`` device.

    Raises:
        InvalidInputError: no such file, not JSON, or a key missing or wrong (the
            message names the key and the file).
    """
    source = Path(path)
    if not source.is_file():
        raise InvalidInputError(f"{source}: no such GPU spec file")
    text = source.read_text(encoding="utf-8")
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{source}: not valid JSON ({exc})") from exc
    if isinstance(payload, dict) and "data" in payload and "type" in payload:
        return serde.loads(Device, text, source=str(source))
    spec = _spec_from_mapping(payload, str(source))
    return _as_simulated(spec.to_device())


def save_spec(device: Device, path: str | Path) -> Path:
    """Write ``device`` to a JSON file that :func:`load_spec` reads back equal; returns the path."""
    return serde.save(device, path)


def _as_simulated(device: Device) -> Device:
    """A simulated copy of ``device``: kind "simulated", name suffixed, memory all free."""
    name = device.name if device.name.endswith(_SIMULATED_SUFFIX) else device.name + _SIMULATED_SUFFIX
    return dataclasses.replace(
        device,
        kind="simulated",
        name=name,
        index=0,
        memory_free_bytes=device.memory_total_bytes,
        mps_running=False,
    )


def _looks_like_path(text: str) -> bool:
    return text.lower().endswith(".json") or os.sep in text or Path(text).is_file()


def simulated_device(name_or_path: str) -> Device:
    """A simulated GPU (kind ``"simulated"``) from a preset name or a JSON spec file.

    Args:
        name_or_path: a preset name, case-insensitive, e.g. ``"H100-SXM"``, ``"h100"``
            (alias of H100-SXM), ``"A100"`` (alias of A100-80GB); or the path of a
            spec file (see :func:`load_spec`).

    Raises:
        InvalidInputError: unknown preset (the message lists them) or a bad spec file.
    """
    text = str(name_or_path).strip()
    if _looks_like_path(text):
        return _as_simulated(load_spec(text))
    return get_preset(text).to_device()


# ---------------------------------------------------------------------------
# CPU
# ---------------------------------------------------------------------------


def _read_key_values(path: str) -> dict[str, str]:
    """``key: value`` lines of a /proc file (first occurrence of each key); {} if unreadable."""
    result: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                key, sep, value = line.partition(":")
                if sep:
                    result.setdefault(key.strip(), value.strip())
    except OSError:
        return {}
    return result


def _meminfo_bytes(meminfo: dict[str, str], key: str) -> int | None:
    """A /proc/meminfo value (``"16318408 kB"``) in bytes, or None."""
    value = meminfo.get(key, "").split()
    if not value or not value[0].isdigit():
        return None
    factor = 1024 if len(value) > 1 and value[1].lower() == "kb" else 1
    return int(value[0]) * factor


def _read_int_file(path: str) -> int | None:
    """The integer a cgroup file holds, or None ("max", missing, unreadable)."""
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_dirs(root: str, proc_self_cgroup: str) -> list[str]:
    """cgroup v2 directories that may limit this process: its own cgroup, then the root."""
    dirs: list[str] = []
    try:
        with open(proc_self_cgroup, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("0::"):
                    relative = line[3:].strip().lstrip("/")
                    if relative:
                        dirs.append(os.path.join(root, relative))
    except OSError:
        pass
    dirs.append(root)
    return dirs


def _cgroup_memory(
    root: str = "/sys/fs/cgroup", proc_self_cgroup: str = "/proc/self/cgroup"
) -> tuple[int | None, int | None]:
    """(limit, usage) in bytes of the tightest cgroup memory limit on this process, or Nones.

    Reads cgroup v2 ``memory.max``/``memory.current`` and, for cgroup v1,
    ``memory/memory.limit_in_bytes``/``memory.usage_in_bytes``.
    """
    candidates: list[tuple[int, int | None]] = []
    for directory in _cgroup_dirs(root, proc_self_cgroup):
        limit = _read_int_file(os.path.join(directory, "memory.max"))
        if limit is not None:
            candidates.append((limit, _read_int_file(os.path.join(directory, "memory.current"))))
    v1 = os.path.join(root, "memory")
    limit_v1 = _read_int_file(os.path.join(v1, "memory.limit_in_bytes"))
    if limit_v1 is not None:
        candidates.append((limit_v1, _read_int_file(os.path.join(v1, "memory.usage_in_bytes"))))
    if not candidates:
        return None, None
    return min(candidates, key=lambda c: c[0])


def _host_memory(
    meminfo_path: str = "/proc/meminfo",
    cgroup_root: str = "/sys/fs/cgroup",
    proc_self_cgroup: str = "/proc/self/cgroup",
) -> tuple[int, int | None]:
    """(total, free) bytes of RAM usable by this process, a cgroup limit respected."""
    meminfo = _read_key_values(meminfo_path)
    total = _meminfo_bytes(meminfo, "MemTotal")
    free = _meminfo_bytes(meminfo, "MemAvailable")
    if total is None:
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = page * os.sysconf("SC_PHYS_PAGES")
            if free is None:
                free = page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 0
    limit, usage = _cgroup_memory(cgroup_root, proc_self_cgroup)
    if limit is not None and (total == 0 or limit < total):
        total = limit
        if usage is not None:
            headroom = max(0, limit - usage)
            free = headroom if free is None else min(free, headroom)
    if free is not None and total > 0:
        free = min(free, total)
    return total, free


def _cpu_name(cpuinfo_path: str = "/proc/cpuinfo") -> str:
    info = _read_key_values(cpuinfo_path)
    for key in ("model name", "Model", "Processor", "cpu model"):
        if info.get(key):
            return info[key]
    return platform.processor() or "cpu"


def cpu_device() -> Device:
    """This machine's CPU as a device: kind ``"cpu"``.

    ``cpu_cores`` is what this process may use (its affinity mask); memory is
    RAM (``/proc/meminfo`` MemTotal / MemAvailable), capped by a cgroup memory
    limit when one is set.
    """
    total, free = _host_memory()
    return Device(
        kind="cpu",
        name=_cpu_name(),
        index=0,
        memory_total_bytes=total,
        memory_free_bytes=free,
        cpu_cores=usable_cpu_cores(),
    )


# ---------------------------------------------------------------------------
# MPS detection (no CUDA)
# ---------------------------------------------------------------------------


def mps_pipe_directory(pipe_dir: str | None = None) -> Path:
    """The MPS pipe directory: ``pipe_dir``, else ``$CUDA_MPS_PIPE_DIRECTORY``, else /tmp/nvidia-mps."""
    return Path(pipe_dir or os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_MPS_PIPE_DIR)


def mps_daemon_running(pipe_dir: str | None = None) -> bool:
    """Whether an MPS control daemon is running, checked without initialising CUDA.

    True when the pipe directory (see :func:`mps_pipe_directory`) holds the
    daemon's ``nvidia-cuda-mps-control.pid`` file, or a ``control`` named pipe
    (FIFO). A ``control`` *socket* alone is not enough: with driver 580 the
    daemon's ``control`` is a Unix socket that stays behind after ``quit``, while
    the pid file is removed (seen on an H200, driver 580.159.04). A daemon killed
    outright can leave its pid file behind; NVML's list of MPS clients
    (:func:`mps_clients_running`) is a second opinion.
    """
    directory = mps_pipe_directory(pipe_dir)
    if (directory / "nvidia-cuda-mps-control.pid").is_file():
        return True
    try:
        return stat.S_ISFIFO((directory / "control").stat().st_mode)
    except OSError:
        return False


def mps_available() -> bool:
    """Whether MPS can be started here: ``nvidia-cuda-mps-control`` is on the PATH."""
    return shutil.which("nvidia-cuda-mps-control") is not None


def mps_clients_running(device: Device) -> bool:
    """Whether NVML lists MPS client processes on a real GPU (matched by UUID).

    False for a CPU or simulated device, without NVML, or when NVML cannot tell.
    """
    if device.kind != "cuda" or not device.uuid:
        return False
    with _nvml_session() as nvml:
        if nvml is None:
            return False
        try:
            handle = nvml.nvmlDeviceGetHandleByUUID(device.uuid)
        except nvml.NVMLError:
            return False
        return _nvml_has_mps_clients(nvml, handle)


# ---------------------------------------------------------------------------
# GPUs: NVML, then torch.cuda as a fallback
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _nvml_session() -> Iterator[Any]:
    """Yield the initialised ``pynvml`` module, or None when NVML is unusable.

    nvmlShutdown is always called after a successful nvmlInit. CUDA is not initialised.
    """
    try:
        nvml: Any = optional_import("pynvml", purpose="GPU detection with NVML")
    except BackendUnavailableError:
        yield None
        return
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        _log.debug("NVML unavailable: %s", exc)
        yield None
        return
    try:
        yield nvml
    finally:
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError as exc:
            _log.debug("nvmlShutdown failed: %s", exc)


def _text(value: object) -> str:
    """NVML strings are ``str`` in nvidia-ml-py, ``bytes`` in old bindings."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _cuda_version_text(version: int) -> str:
    """NVML's CUDA driver version integer (13000) as ``"13.0"``."""
    return f"{version // 1000}.{(version % 1000) // 10}"


def _nvml_field(nvml: Any, what: str, fn: Any, *args: Any) -> Any:
    """Call one NVML query; an NVMLError (NotSupported, NoPermission...) gives None."""
    try:
        return fn(*args)
    except nvml.NVMLError as exc:
        _log.debug("NVML %s: %s", what, exc)
        return None


def _nvml_has_mps_clients(nvml: Any, handle: Any) -> bool:
    processes = _nvml_field(nvml, "MPS processes", nvml.nvmlDeviceGetMPSComputeRunningProcesses, handle)
    return bool(processes)


def _visible_nvml_indices(count: int, uuids: list[str | None]) -> list[int]:
    """NVML indices of the GPUs CUDA will see, in CUDA ordinal order.

    Follows ``CUDA_VISIBLE_DEVICES`` (indices or GPU UUIDs or their prefixes;
    enumeration stops at the first invalid entry, as CUDA does). Indices are
    taken in NVML (PCI) order, which is CUDA's order for identical GPUs. MIG
    entries cannot be mapped without CUDA: then all GPUs are listed in NVML order.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(range(count))
    order: list[int] = []
    for raw in visible.split(","):
        entry = raw.strip()
        if entry.upper().startswith("MIG-"):
            return list(range(count))
        index: int | None = None
        if re.fullmatch(r"-?\d+", entry):
            index = int(entry)
        elif entry:
            wanted = entry.lower().removeprefix("gpu-")
            hits = [
                i
                for i, uuid in enumerate(uuids)
                if uuid is not None and uuid.lower().removeprefix("gpu-").startswith(wanted)
            ]
            index = hits[0] if len(hits) == 1 else None
        if index is None or not 0 <= index < count or index in order:
            break
        order.append(index)
    return order


def _torch_if_imported() -> Any:
    """The torch module if this process already imported it, else None (never imports it)."""
    module = sys.modules.get("torch")
    return module if module is not None and hasattr(module, "cuda") else None


def _torch_ordinal_for_uuid(torch: Any, uuid: str | None, fallback: int) -> int | None:
    """The CUDA ordinal torch gives the GPU with NVML ``uuid`` (``fallback`` if uuids are absent)."""
    count = int(torch.cuda.device_count())
    if uuid:
        wanted = uuid.lower().removeprefix("gpu-")
        for ordinal in range(count):
            found = getattr(torch.cuda.get_device_properties(ordinal), "uuid", None)
            if found is not None and str(found).lower().removeprefix("gpu-") == wanted:
                return ordinal
    return fallback if 0 <= fallback < count else None


def read_sm_count_with_torch(index: int) -> int:
    """SM count of CUDA device ``index`` from ``torch.cuda.get_device_properties``.

    This initialises CUDA in the calling process: do not call it before forking
    workers or starting MPS. :func:`list_devices` uses it with ``init_cuda=True``.

    Raises:
        BackendUnavailableError: torch is not installed.
        DeviceError: no CUDA GPU, or no device ``index``.
    """
    torch: Any = optional_import("torch", purpose="reading the SM count with torch.cuda")
    if not torch.cuda.is_available():
        raise DeviceError(f"cannot read the SM count of cuda:{index}: torch sees no CUDA GPU")
    count = int(torch.cuda.device_count())
    if not 0 <= index < count:
        raise DeviceError(
            f"cannot read the SM count of cuda:{index}: torch sees {count} GPU(s), cuda:0..cuda:{count - 1}"
        )
    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _torch_sm_count(uuid: str | None, ordinal: int, *, init_cuda: bool) -> int | None:
    """SM count from torch: with ``init_cuda`` always tried, else only if CUDA is already initialised."""
    try:
        if init_cuda:
            torch: Any = optional_import("torch", purpose="reading the SM count with torch.cuda")
            if not torch.cuda.is_available():
                return None
        else:
            torch = _torch_if_imported()
            if torch is None or not torch.cuda.is_initialized():
                return None
        found = _torch_ordinal_for_uuid(torch, uuid, ordinal)
        return None if found is None else read_sm_count_with_torch(found)
    except Exception as exc:  # torch misbehaving must not break detection
        _log.debug("torch SM count for cuda:%d failed: %s", ordinal, exc)
        return None


def _nvml_gpus(nvml: Any, *, init_cuda: bool) -> list[Device]:
    """The GPUs NVML sees (those CUDA will see, by CUDA ordinal)."""
    count = int(nvml.nvmlDeviceGetCount())
    driver = _nvml_field(nvml, "driver version", nvml.nvmlSystemGetDriverVersion)
    cuda_int = _nvml_field(nvml, "CUDA driver version", nvml.nvmlSystemGetCudaDriverVersion_v2)
    daemon = mps_daemon_running()
    mig_enable = getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)
    host_cores = usable_cpu_cores()

    handles: list[Any] = []
    uuids: list[str | None] = []
    for i in range(count):
        handle = _nvml_field(nvml, f"handle of GPU {i}", nvml.nvmlDeviceGetHandleByIndex, i)
        handles.append(handle)
        uuid = None if handle is None else _nvml_field(nvml, "UUID", nvml.nvmlDeviceGetUUID, handle)
        uuids.append(None if uuid is None else _text(uuid))

    devices: list[Device] = []
    for ordinal, i in enumerate(_visible_nvml_indices(count, uuids)):
        handle = handles[i]
        if handle is None:  # lost or forbidden GPU: nothing can be read from it
            continue
        raw_name = _nvml_field(nvml, "name", nvml.nvmlDeviceGetName, handle)
        name = _text(raw_name) if raw_name is not None else f"NVIDIA GPU {i}"
        memory = _nvml_field(nvml, "memory info", nvml.nvmlDeviceGetMemoryInfo, handle)
        capability = _nvml_field(nvml, "compute capability", nvml.nvmlDeviceGetCudaComputeCapability, handle)
        mig = _nvml_field(nvml, "MIG mode", nvml.nvmlDeviceGetMigMode, handle)
        preset = preset_for_product(name)
        sm_count = _torch_sm_count(uuids[i], ordinal, init_cuda=init_cuda)
        if sm_count is None:
            sm_count = sm_count_for_product(name)
        devices.append(
            Device(
                kind="cuda",
                name=name,
                index=ordinal,
                memory_total_bytes=int(memory.total) if memory is not None else 0,
                memory_free_bytes=int(memory.free) if memory is not None else None,
                sm_count=sm_count,
                compute_capability=(
                    (int(capability[0]), int(capability[1])) if capability is not None else None
                ),
                driver_version=_text(driver) if driver is not None else None,
                cuda_version=_cuda_version_text(int(cuda_int)) if cuda_int is not None else None,
                uuid=uuids[i],
                mps_running=daemon or _nvml_has_mps_clients(nvml, handle),
                mig_enabled=mig is not None and int(mig[0]) == mig_enable,
                cpu_cores=host_cores,
                memory_bandwidth_gbs=preset.memory_bandwidth_gbs if preset else None,
                peak_fp16_tflops=preset.peak_fp16_tflops if preset else None,
                peak_fp32_tflops=preset.peak_fp32_tflops if preset else None,
            )
        )
    return devices


def _torch_gpus() -> list[Device]:
    """GPUs from torch.cuda (initialises CUDA): only used when NVML is unusable."""
    if not is_available("torch"):
        return []
    try:
        torch: Any = importlib.import_module("torch")
        if not torch.cuda.is_available():
            return []
        daemon = mps_daemon_running()
        host_cores = usable_cpu_cores()
        devices: list[Device] = []
        for ordinal in range(int(torch.cuda.device_count())):
            props = torch.cuda.get_device_properties(ordinal)
            name = str(props.name)
            raw_uuid = getattr(props, "uuid", None)
            preset = preset_for_product(name)
            devices.append(
                Device(
                    kind="cuda",
                    name=name,
                    index=ordinal,
                    memory_total_bytes=int(props.total_memory),
                    memory_free_bytes=None,  # torch.cuda.mem_get_info would create a context
                    sm_count=int(props.multi_processor_count),
                    compute_capability=(int(props.major), int(props.minor)),
                    uuid=None if raw_uuid is None else "GPU-" + str(raw_uuid).removeprefix("GPU-"),
                    mps_running=daemon,
                    cpu_cores=host_cores,
                    memory_bandwidth_gbs=preset.memory_bandwidth_gbs if preset else None,
                    peak_fp16_tflops=preset.peak_fp16_tflops if preset else None,
                    peak_fp32_tflops=preset.peak_fp32_tflops if preset else None,
                )
            )
        return devices
    except Exception as exc:  # a broken CUDA install means "no GPU", not a crash
        _log.debug("torch.cuda GPU detection failed: %s", exc)
        return []


def list_devices(*, include_cpu: bool = True, init_cuda: bool = False) -> list[Device]:
    """The devices of this machine: its GPUs (kind ``"cuda"``, by CUDA ordinal), then the CPU.

    GPUs are read with NVML (nvidia-ml-py), which does not initialise CUDA. The SM
    count comes from torch when this process already initialised CUDA (or when
    ``init_cuda=True``, which initialises it), else from a table of known products,
    else None. Bandwidth and peak throughput come from the matching preset. When
    NVML is missing or fails to initialise, torch.cuda is asked instead (this does
    initialise CUDA); without either, only the CPU is listed. Detection never raises.

    Args:
        include_cpu: append :func:`cpu_device` to the list.
        init_cuda: allow initialising CUDA through torch for exact SM counts.
    """
    gpus: list[Device] | None = None
    with _nvml_session() as nvml:
        if nvml is not None:
            try:
                gpus = _nvml_gpus(nvml, init_cuda=init_cuda)
            except nvml.NVMLError as exc:
                _log.debug("NVML GPU enumeration failed: %s", exc)
    if gpus is None:
        gpus = _torch_gpus()
    return [*gpus, cpu_device()] if include_cpu else gpus


def best_device() -> Device:
    """The GPU with the most free memory (the first one on a tie), else the CPU."""
    gpus = list_devices(include_cpu=False)
    if not gpus:
        return cpu_device()
    return max(
        gpus,
        key=lambda d: (d.memory_free_bytes if d.memory_free_bytes is not None else -1, d.memory_total_bytes),
    )


def _describe(devices: list[Device]) -> str:
    return ", ".join(f"{d.torch_device} ({d.name})" for d in devices)


def find_device(spec: str) -> Device:
    """Resolve a user's device string.

    Accepted: ``"cpu"``; ``"cuda"`` (= ``"cuda:0"``); ``"cuda:N"``; ``"best"`` (see
    :func:`best_device`); a preset name such as ``"h100"`` (a simulated GPU); the
    path of a JSON spec file (a simulated GPU, see :func:`load_spec`). A ``"sim:"``
    prefix (``"sim:h100"``) says explicitly that the device is simulated.

    Raises:
        DeviceError: a CUDA device that does not exist here (the message lists those that do).
        InvalidInputError: anything else that is not understood.
    """
    text = spec.strip()
    if text.lower().startswith("sim:"):  # "sim:h100" or "sim:my-gpu.json": explicitly simulated
        text = text[4:]
    lowered = text.lower()
    if lowered == "cpu":
        return cpu_device()
    if lowered in ("best", "auto"):
        return best_device()
    cuda = re.fullmatch(r"(?:cuda|gpu)(?::(\d+))?", lowered)
    if cuda:
        wanted = int(cuda.group(1) or 0)
        gpus = list_devices(include_cpu=False)
        for device in gpus:
            if device.index == wanted:
                return device
        there = (
            f"the GPUs here are {_describe(gpus)}"
            if gpus
            else "this machine has no CUDA GPU that NVML or torch can see (use 'cpu', or a preset name "
            "such as 'h100' to plan for a simulated GPU)"
        )
        raise DeviceError(f"device {text!r} does not exist: {there}")
    if _looks_like_path(text):
        return simulated_device(text)
    try:
        return get_preset(text).to_device()
    except InvalidInputError:
        raise InvalidInputError(
            f"unknown device {spec!r}: use 'cpu', 'cuda', 'cuda:N', 'best' or a GPU preset name; "
            f"{_preset_listing()}"
        ) from None


# ---------------------------------------------------------------------------
# Display
# ---------------------------------------------------------------------------


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / _GIB:.1f}"


def device_table_rows(devices: list[Device]) -> list[dict[str, str]]:
    """One readable row per device, for a terminal table (all values are strings).

    Keys, in order: ``device``, ``kind``, ``name``, ``SMs``, ``memory GiB``,
    ``free GiB``, ``capability``, ``driver``, ``CUDA``, ``MPS``, ``MIG``, ``cores``.
    Unknown values are ``"-"``.
    """
    rows: list[dict[str, str]] = []
    for d in devices:
        gpu = d.is_gpu
        rows.append(
            {
                "device": d.torch_device if d.can_execute else "-",
                "kind": d.kind,
                "name": d.name,
                "SMs": str(d.sm_count) if d.sm_count is not None else "-",
                "memory GiB": _gib(d.memory_total_bytes),
                "free GiB": _gib(d.memory_free_bytes),
                "capability": (
                    f"{d.compute_capability[0]}.{d.compute_capability[1]}" if d.compute_capability else "-"
                ),
                "driver": d.driver_version or "-",
                "CUDA": d.cuda_version or "-",
                "MPS": ("yes" if d.mps_running else "no") if gpu else "-",
                "MIG": ("yes" if d.mig_enabled else "no") if gpu else "-",
                "cores": str(d.cpu_cores),
            }
        )
    return rows


__all__ = [
    "DEFAULT_MPS_PIPE_DIR",
    "GPU_PRESETS",
    "Device",
    "DeviceKind",
    "GpuSpec",
    "best_device",
    "cpu_device",
    "device_table_rows",
    "find_device",
    "get_preset",
    "list_devices",
    "load_spec",
    "mps_available",
    "mps_clients_running",
    "mps_daemon_running",
    "mps_pipe_directory",
    "preset_for_product",
    "preset_names",
    "read_sm_count_with_torch",
    "save_spec",
    "simulated_device",
    "sm_count_for_product",
    "usable_cpu_cores",
]
