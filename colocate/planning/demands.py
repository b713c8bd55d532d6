"""What each member asks of the device at one batch size, from its profiles.

:func:`member_demands` turns a :class:`~colocate.profiling.ProfileSet` into one
:class:`MemberDemand` per member for a target device and batch size: its latency
alone, how busy it keeps the device and how much of it (SM fill), how busy it
keeps its host thread, and the memory it needs. Each demand says where its
figures come from: ``"measured"`` (a profile on this device at this batch size)
or ``"estimated: ..."`` (how).

The estimation model (also in ``docs/planning.md``):

* **A batch size that was not profiled.** Latency is close to affine in the
  batch size between profiled sizes, so every time (latency, p99, device-busy
  time, host time), the SM fill and the activation memory are interpolated
  linearly between the two nearest profiled sizes. Beyond the largest profiled
  size the two largest are extrapolated (slopes clamped at >= 0; activations at
  least proportional to the batch); with a single profiled size the host time
  stays, the device-busy time and the activations scale with the batch.
* **Profiles from another GPU** (e.g. recorded on an H200, planning for an H100).
  A member's latency is split into host time ``H``, device-busy time ``G`` and a
  remainder ``R = L - max(H, G)`` (synchronisation, launch latency). The host
  time and the remainder are kept (same host assumed); the busy time scales by
  ``r = 0.5 * F_src/F_dst + 0.5 * B_src/B_dst``, the mean of the ratios of peak
  throughput (FP16 tensor for fp16/bf16 members, FP32 otherwise) and memory
  bandwidth (:data:`GPU_COMPUTE_WEIGHT`), so ``L' = R + max(H, r * G)``; a
  host-bound member stays host-bound. The SM fill scales with the SM counts,
  ``min(1, fill * SMs_src / SMs_dst)``. Memory is taken as is.
* **Only CPU profiles, planning for a GPU.** The member's work is estimated from
  its CPU run: ``FLOPs = busy core-seconds * CPU_GFLOPS_PER_CORE``; its GPU busy
  time is ``max(FLOPs / (peak * GPU_ACHIEVED_COMPUTE_FRACTION), bytes /
  (bandwidth * GPU_ACHIEVED_BANDWIDTH_FRACTION))`` with ``bytes`` = weights +
  activations; its host time is the part of its CPU latency that does not grow
  with the batch (the intercept of latency over batch size between its two
  smallest profiled sizes; with one size, :data:`ESTIMATED_HOST_FRACTION` of its
  latency): per-operator dispatch, which a GPU run pays on the host too, clamped
  to [:data:`MIN_ESTIMATED_HOST_S`, :data:`MAX_ESTIMATED_HOST_S`]; SM fill
  :data:`ESTIMATED_SM_FILL`; activations times :data:`GPU_ACTIVATION_FACTOR`
  (cuDNN workspaces and the caching allocator's reservation). These are rough:
  profile on the GPU for real figures.
* **Devices are "the same"** when both are the CPU, or both are the same GPU
  product (a preset name, e.g. a real "NVIDIA H200" and the simulated "H200").
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from colocate.devices import Device, get_preset, preset_for_product
from colocate.ensemble import Ensemble
from colocate.errors import InvalidInputError, PlanInfeasibleError
from colocate.profiling.types import Profile, ProfileSet

_MIB = 1 << 20

CUDA_CONTEXT_BYTES = 500 * _MIB
"""Device memory one process's CUDA context takes when no profile tells (an estimate for an
H100-class GPU with a framework loaded; the recorded H200 profiles measure 750-900 MiB with
torch 2.11 including cuBLAS/cuDNN handles, and are used instead where they apply)."""
MPS_CLIENT_SHARE = 0.37
"""Device memory an MPS client process costs, as a share of a plain process's CUDA context.

The MPS server holds one copy of the storage and scheduling resources its clients share, so
a client carries less than a context of its own ("to a much lesser degree" since Volta, which
gives each client its own address space: NVIDIA's MPS documentation, "When to Use MPS").
Measured on a lent H100 (driver 580, torch 2.11; benchmarks/results/
20261127T1959-nvidia-h100-80gb-hbm3-packing.json, 8 small members at batch 1): an MPS worker
per member used 2,780 MiB and a plain worker process per member 6,850 MiB, which is
(2,780 - 370) / 8 = 301 MiB per client against (6,850 - 370) / 8 = 810 MiB per process
beyond the members' own 370 MiB: 0.37. One measurement; the server's own context is not
in it (nor in the executor's measured memory, which covers the plan's own processes)."""
MIN_CONTEXT_BYTES = 200 * _MIB
"""Lower clamp of a context size measured from profiles."""
MAX_CONTEXT_BYTES = 4 << 30
"""Upper clamp of a context size measured from profiles."""
CPU_PROCESS_BYTES = 256 * _MIB
"""RAM a process costs on the CPU device, the serving process and each worker: the interpreter
plus the framework's resident set. Measured on this project's CPU machine (torch 2.13): the
serving process 260-280 MiB before any member loads, worker processes 215-260 MiB
(benchmarks/results/20261127T0724-cpu-packing.json)."""
DEFAULT_SIMULATED_HOST_CORES = 8
"""Host cores assumed for a simulated GPU when neither the device nor the profiles say."""

GPU_COMPUTE_WEIGHT = 0.5
"""Share of a kernel's time taken as compute-bound when scaling between GPUs (the rest scales
with memory bandwidth)."""
CPU_GFLOPS_PER_CORE = 40.0
"""Achieved FP32 GFLOP/s of one CPU core running framework kernels (an estimate for a modern
x86 core with AVX2/AVX-512), used to turn CPU busy time into work."""
GPU_ACHIEVED_COMPUTE_FRACTION = 0.25
"""Share of a GPU's peak throughput a small-batch inference reaches (estimate)."""
GPU_ACHIEVED_BANDWIDTH_FRACTION = 0.5
"""Share of a GPU's peak memory bandwidth a small-batch inference reaches (estimate)."""
ESTIMATED_HOST_FRACTION = 0.25
"""With a single CPU profile, the share of its latency taken as per-operator dispatch (host time)."""
MIN_ESTIMATED_HOST_S = 50e-6
"""Least host time per batch of a member estimated from a CPU profile."""
MAX_ESTIMATED_HOST_S = 5e-3
"""Most host time per batch of a member estimated from a CPU profile."""
ESTIMATED_SM_FILL = 0.8
"""SM fill of a member estimated from a CPU profile (the recorded H200 profiles: 0.5-1.0)."""
GPU_ACTIVATION_FACTOR = 1.5
"""GPU activation memory of a member estimated from a CPU profile, per byte measured on the CPU."""
FIRST_KERNEL_DELAY_S = 20e-6
"""Latency added to an estimated GPU member: from the host call to its first kernel."""
PEAK_TFLOPS_PER_SM = {"fp32": 0.5, "fp16": 7.5, "bf16": 7.5}
"""Peak TFLOP/s per SM assumed for a GPU spec that gives no throughput (H100: 67/132, 989/132)."""
BANDWIDTH_GBS_PER_SM = 25.0
"""Memory bandwidth per SM assumed for a GPU spec that gives none (H100: 3350/132)."""
UNKNOWN_BUSY_FRACTION = 0.5
"""GPU busy fraction assumed when a profile has no kernel footprint."""
UNKNOWN_HOST_SHARE = 0.5
"""Host share assumed when a GPU profile does not give one."""
UNKNOWN_PARALLEL_FRACTION = 0.8
"""Parallel share of a CPU member's work (Amdahl) when it has no thread-scaling figures."""
_MIN_TIME_S = 1e-7


@dataclass(frozen=True)
class MemberDemand:
    """One member on the target device at one batch size, alone (per batch).

    On a GPU, "busy" means kernels running and ``sm_fill`` is the share of the SMs they cover;
    on the CPU device, "busy" is the member's threads computing and ``sm_fill`` is the share of
    the cores it runs on.
    """

    member: str
    batch_size: int
    latency_s: float  # median latency alone on the whole device
    p99_s: float  # tail latency alone
    busy_fraction: float  # device-busy time / latency, in [0, 1]
    sm_fill: float  # share of the SMs (CPU: cores) its work covers while busy, in (0, 1]
    host_share: float  # time its host thread is busy dispatching / latency (0 on the CPU device)
    weights_bytes: int  # resident weights
    activation_bytes: int  # peak activations + workspace + allocator reservation at this batch
    input_bytes: int = 0  # one input batch (0 when unknown)
    threads: int | None = None  # CPU device: threads it was profiled with
    thread_scaling: tuple[tuple[int, float], ...] = ()  # CPU: (threads, latency s) at this batch
    source: str = "measured"  # "measured" or "estimated: <how>"
    backend: str = ""  # the backend its profiles ran on ("" when unknown)

    @property
    def memory_bytes(self) -> int:
        """Weights + peak activations: what it needs at this batch size."""
        return self.weights_bytes + self.activation_bytes

    @property
    def busy_s(self) -> float:
        """Device-busy time per batch (GPU kernels; CPU: its threads computing)."""
        return self.latency_s * self.busy_fraction

    @property
    def host_s(self) -> float:
        """Host-thread time per batch."""
        return self.latency_s * self.host_share

    @property
    def sm_seconds(self) -> float:
        """Work in whole-device seconds: busy time x SM fill."""
        return self.busy_s * self.sm_fill

    @property
    def p99_ratio(self) -> float:
        """Tail over median, at least 1."""
        return max(1.0, self.p99_s / self.latency_s) if self.latency_s > 0 else 1.0

    @property
    def measured(self) -> bool:
        return self.source == "measured"

    def interpreter_share(self) -> float:
        """CPU: the share of its time a stream slot (a thread of the serving process) cannot run
        beside the other stream slots.

        Eager torch: all of it. On this project's CPU machine, stream slots of torch members
        never beat running them one after another (0.58-0.94x in four runs), while the same
        members in worker processes ran 1.3-1.7x faster: the interpreter and the framework's
        per-process state serialise them. Other backends (ONNX Runtime releases the GIL for a
        whole run): their :meth:`serial_fraction`.
        """
        return 1.0 if self.backend == "torch" else self.serial_fraction()

    def serial_fraction(self) -> float:
        """CPU: the share of this member's time that does not speed up with threads (Amdahl's
        serial fraction, fitted between 1 thread and ``self.threads`` from its thread scaling,
        clamped to [0, 1]; ``1 - UNKNOWN_PARALLEL_FRACTION`` without figures).

        For eager frameworks this is mostly the interpreter dispatching operators, which holds
        the GIL: what stream slots of one process cannot run side by side.
        """
        points = sorted((k, t) for k, t in self.thread_scaling if k >= 1 and t > 0)
        full = self.threads or (points[-1][0] if points else 1)
        if len(points) < 2 or full <= 1:
            return 1.0 - UNKNOWN_PARALLEL_FRACTION
        one = _piecewise(points, 1)
        many = _piecewise(points, full)
        if one <= 0:
            return 1.0 - UNKNOWN_PARALLEL_FRACTION
        fraction = (many / one - 1.0 / full) / (1.0 - 1.0 / full)
        return min(1.0, max(0.0, fraction))

    def latency_with_threads(self, threads: int) -> float:
        """Latency with ``threads`` threads (CPU device), from its thread scaling.

        The scaling's shape is kept and anchored at this demand's latency (at ``self.threads``).
        Without scaling figures, Amdahl's law with :data:`UNKNOWN_PARALLEL_FRACTION`.
        """
        full = self.threads or threads
        if threads >= full or full <= 1:
            return self.latency_s
        points = sorted((k, t) for k, t in self.thread_scaling if k >= 1 and t > 0)
        if len(points) < 2:
            p = UNKNOWN_PARALLEL_FRACTION
            return self.latency_s * ((1 - p) + p * full / threads)
        anchor = _piecewise(points, full)
        ratio = _piecewise(points, threads) / anchor if anchor > 0 else 1.0
        return self.latency_s * max(ratio, 1.0)


def _piecewise(points: Sequence[tuple[int, float]], x: int) -> float:
    """Piecewise-linear value at ``x``; below the first point, inverse-linear; above, flat."""
    if x <= points[0][0]:
        return points[0][1] * points[0][0] / max(x, 1)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


@dataclass(frozen=True)
class DemandSet:
    """The demands of all members on one device at one batch size, plus device-level costs."""

    device: Device
    batch_size: int
    members: tuple[MemberDemand, ...]
    process_bytes: int  # memory one worker process costs: CUDA context (GPU) or interpreter (CPU)
    process_bytes_source: str  # "measured: ..." or "estimated: ..."
    host_cores: int  # host CPU cores that can run host threads at once
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [d.member for d in self.members]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"duplicate member demands: {names}")
        if not names:
            raise InvalidInputError("no member demands: the ensemble has no members")

    @cached_property
    def by_name(self) -> dict[str, MemberDemand]:
        """Member name -> demand."""
        return {d.member: d for d in self.members}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.member for d in self.members)

    def __getitem__(self, member: str) -> MemberDemand:
        try:
            return self.by_name[member]
        except KeyError:
            raise InvalidInputError(
                f"no demand for member '{member}'; members: {', '.join(self.names)}"
            ) from None

    def scaled(self, factor: float) -> DemandSet:
        """These demands with every member's times multiplied by ``factor`` (latency, tail,
        thread scaling): the machine runs ``factor`` times slower (or faster) now than when it
        was profiled (see :attr:`colocate.report.Calibration.time_scale`)."""
        if factor == 1.0:
            return self
        if not factor > 0:
            raise InvalidInputError(f"time scale must be positive, got {factor!r}")
        members = tuple(
            dataclasses.replace(
                d,
                latency_s=d.latency_s * factor,
                p99_s=d.p99_s * factor,
                thread_scaling=tuple((k, t * factor) for k, t in d.thread_scaling),
            )
            for d in self.members
        )
        note = f"member times scaled by {factor:.3g} (calibration: how fast plans run now)"
        return dataclasses.replace(self, members=members, notes=(*self.notes, note))

    @property
    def mps_client_bytes(self) -> int:
        """Memory one mps worker costs: on a GPU an MPS client's share of a context
        (:data:`MPS_CLIENT_SHARE`), on the CPU a whole process (there it is one)."""
        if not self.device.is_gpu:
            return self.process_bytes
        return round(self.process_bytes * MPS_CLIENT_SHARE)

    def worker_bytes(self, kind: str) -> int:
        """Memory a worker of a ``kind`` slot costs beyond its members: a process's
        (``process``), an MPS client's (``mps``), none for a ``stream`` slot (it runs in the
        serving process)."""
        if kind == "stream":
            return 0
        return self.mps_client_bytes if kind == "mps" else self.process_bytes

    @property
    def memory_available_bytes(self) -> int:
        """Free memory of the device (total when unknown)."""
        free = self.device.memory_free_bytes
        return free if free is not None else self.device.memory_total_bytes

    @property
    def is_gpu(self) -> bool:
        return self.device.is_gpu

    @property
    def cores(self) -> int:
        """The CPU device's cores (1 for a GPU, where it is not used)."""
        return max(1, self.device.cpu_cores) if not self.device.is_gpu else 1


def demand_set(
    device: Device,
    batch_size: int,
    members: Sequence[MemberDemand],
    *,
    process_bytes: int | None = None,
    host_cores: int | None = None,
) -> DemandSet:
    """A :class:`DemandSet` from hand-made demands (tests, what-if studies), with default costs."""
    source = "given"
    if process_bytes is None:
        process_bytes = CUDA_CONTEXT_BYTES if device.is_gpu else CPU_PROCESS_BYTES
        source = "estimated: default per-process cost"
    if host_cores is None:
        host_cores = _host_cores(device, [])[0]
    return DemandSet(
        device=device,
        batch_size=batch_size,
        members=tuple(members),
        process_bytes=process_bytes,
        process_bytes_source=source,
        host_cores=host_cores,
    )


# ---------------------------------------------------------------------------
# Raw figures of one profile, and interpolation between batch sizes
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Figures:
    batch_size: int
    latency_s: float
    p99_s: float
    busy_s: float
    host_s: float
    sm_fill: float
    weights_bytes: int
    activation_bytes: int
    threads: int | None
    thread_scaling: tuple[tuple[int, float], ...]

    def normalised(self) -> _Figures:
        """Latency at least the busy and host times; fractions within bounds."""
        busy = max(0.0, self.busy_s)
        host = max(0.0, self.host_s)
        latency = max(self.latency_s, busy, host, _MIN_TIME_S)
        return dataclasses.replace(
            self,
            latency_s=latency,
            p99_s=max(self.p99_s, latency),
            busy_s=busy,
            host_s=host,
            sm_fill=min(1.0, max(0.01, self.sm_fill)),
            activation_bytes=max(0, self.activation_bytes),
        )


def _figures(p: Profile, notes: list[str]) -> _Figures:
    """A profile's figures; unknown ones get documented defaults (noted)."""
    assert p.latency is not None and p.memory is not None
    latency = max(p.latency.median_s, _MIN_TIME_S)
    mem = p.memory
    if p.device.is_gpu:
        k = p.kernels
        if k is not None and k.busy_fraction > 0:
            busy = k.busy_fraction
        else:
            busy = UNKNOWN_BUSY_FRACTION
            notes.append(f"{p.member}: no kernel trace; GPU busy fraction assumed {busy:.0%}")
        if k is not None and k.sm_fill > 0:
            fill = k.sm_fill
        else:
            fill = 1.0
            notes.append(f"{p.member}: SM fill unknown; assumed 100 %")
        if p.host_share is not None:
            host = p.host_share
        else:
            host = UNKNOWN_HOST_SHARE
            notes.append(f"{p.member}: host share unknown; assumed {host:.0%}")
        threads: int | None = None
        scaling: tuple[tuple[int, float], ...] = ()
    else:
        cpu = p.cpu
        threads = cpu.threads if cpu is not None else None
        scaling = cpu.thread_scaling if cpu is not None else ()
        busy = cpu.busy_share if cpu is not None else 0.0
        if busy <= 0.0:
            busy = 1.0
            notes.append(f"{p.member}: CPU busy share not measured; assumed 100 %")
        fill = 1.0  # replaced by threads / cores for the target
        host = 0.0
    return _Figures(
        batch_size=p.batch_size,
        latency_s=latency,
        p99_s=max(p.latency.p99_s, latency),
        busy_s=latency * min(1.0, busy),
        host_s=latency * min(1.0, host),
        sm_fill=fill,
        weights_bytes=mem.weights_bytes,
        activation_bytes=mem.peak_activation_bytes + mem.reserved_unused_bytes,
        threads=threads,
        thread_scaling=scaling,
    ).normalised()


def _one_per_batch_size(profiles: Sequence[Profile]) -> tuple[Profile, ...]:
    """One profile per batch size, the latest measured: files of profiles given together may
    repeat a size (two measurements, or two precisions when the member's is unknown), and
    two figures at one batch size leave nothing to interpolate between."""
    latest: dict[int, Profile] = {}
    for profile in profiles:
        known = latest.get(profile.batch_size)
        if known is None or profile.measured_at > known.measured_at:
            latest[profile.batch_size] = profile
    return tuple(sorted(latest.values(), key=lambda p: p.batch_size))


def _lerp(a: float, b: float, w: float) -> float:
    return a + (b - a) * w


def _mix(lo: _Figures, hi: _Figures, batch: int) -> _Figures:
    """Linear interpolation (or extrapolation) of every figure to ``batch``."""
    w = (batch - lo.batch_size) / (hi.batch_size - lo.batch_size)
    ratio_lo = lo.p99_s / lo.latency_s
    ratio_hi = hi.p99_s / hi.latency_s
    latency = _lerp(lo.latency_s, hi.latency_s, w)
    nearest = lo if abs(batch - lo.batch_size) <= abs(batch - hi.batch_size) else hi
    return _Figures(
        batch_size=batch,
        latency_s=latency,
        p99_s=latency * max(1.0, _lerp(ratio_lo, ratio_hi, min(max(w, 0.0), 1.0))),
        busy_s=_lerp(lo.busy_s, hi.busy_s, w),
        host_s=_lerp(lo.host_s, hi.host_s, w),
        sm_fill=_lerp(lo.sm_fill, hi.sm_fill, min(max(w, 0.0), 1.0)),
        weights_bytes=nearest.weights_bytes,
        activation_bytes=round(_lerp(lo.activation_bytes, hi.activation_bytes, w)),
        threads=nearest.threads,
        thread_scaling=_scaled_scaling(nearest, latency),
    )


def _scaled_scaling(f: _Figures, latency: float) -> tuple[tuple[int, float], ...]:
    ratio = latency / f.latency_s if f.latency_s > 0 else 1.0
    return tuple((k, t * ratio) for k, t in f.thread_scaling)


def _single_point(f: _Figures, batch: int) -> _Figures:
    """From one profiled size: host time and remainder stay, busy time and activations scale."""
    scale = batch / f.batch_size
    rest = f.latency_s - max(f.host_s, f.busy_s)
    busy = f.busy_s * scale
    latency = rest + max(f.host_s, busy)
    return _Figures(
        batch_size=batch,
        latency_s=latency,
        p99_s=latency * f.p99_s / f.latency_s,
        busy_s=busy,
        host_s=f.host_s,
        sm_fill=f.sm_fill,
        weights_bytes=f.weights_bytes,
        activation_bytes=round(f.activation_bytes * scale),
        threads=f.threads,
        thread_scaling=_scaled_scaling(f, latency),
    )


def _at_batch(series: Sequence[_Figures], batch: int) -> tuple[_Figures, str]:
    """The figures at ``batch`` and, if not profiled, how they were estimated."""
    ordered = sorted(series, key=lambda f: f.batch_size)
    for f in ordered:
        if f.batch_size == batch:
            return f, ""
    lower = [f for f in ordered if f.batch_size < batch]
    upper = [f for f in ordered if f.batch_size > batch]
    if lower and upper:
        lo, hi = lower[-1], upper[0]
        return _mix(lo, hi, batch).normalised(), (
            f"interpolated between batch {lo.batch_size} and {hi.batch_size}"
        )
    if len(ordered) == 1:
        only = ordered[0]
        return _single_point(only, batch).normalised(), (
            f"scaled from batch {only.batch_size} (the only profiled size)"
        )
    if lower:  # above the largest profiled size
        a, c = lower[-2], lower[-1]
        mixed = _mix(a, c, batch)
        floor = _single_point(c, batch)
        est = dataclasses.replace(
            mixed,
            latency_s=max(mixed.latency_s, c.latency_s),
            p99_s=max(mixed.p99_s, c.p99_s),
            busy_s=max(mixed.busy_s, c.busy_s),
            host_s=max(mixed.host_s, c.host_s),
            sm_fill=c.sm_fill,
            activation_bytes=max(mixed.activation_bytes, floor.activation_bytes, c.activation_bytes),
        )
        return est.normalised(), f"extrapolated above the largest profiled batch {c.batch_size}"
    a, c = upper[0], upper[1]  # below the smallest profiled size
    mixed = _mix(a, c, batch)
    scale = batch / a.batch_size

    def clamp(value: float, top: float) -> float:
        return min(top, max(value, top * scale))

    est = dataclasses.replace(
        mixed,
        latency_s=clamp(mixed.latency_s, a.latency_s),
        p99_s=clamp(mixed.p99_s, a.p99_s),
        busy_s=clamp(mixed.busy_s, a.busy_s),
        host_s=clamp(mixed.host_s, a.host_s),
        sm_fill=a.sm_fill,
        activation_bytes=round(clamp(mixed.activation_bytes, a.activation_bytes)),
    )
    return est.normalised(), f"extrapolated below the smallest profiled batch {a.batch_size}"


# ---------------------------------------------------------------------------
# Devices: identity, peak figures, host cores, process cost
# ---------------------------------------------------------------------------


def device_key(device: Device) -> str:
    """What makes two devices "the same" for profiles: the CPU, or one GPU product."""
    if device.kind == "cpu":
        return "cpu"
    preset = None
    if device.kind == "simulated":
        try:
            preset = get_preset(device.name)
        except InvalidInputError:
            preset = None
    if preset is None:
        preset = preset_for_product(device.name)
    if preset is not None:
        return preset.name.lower()
    return re.sub(r"[^0-9a-z]", "", device.name.lower().removesuffix(" (simulated)"))


def _peak_tflops(device: Device, precision: str) -> tuple[float, bool]:
    """Peak throughput for ``precision`` and whether the device (or its preset) gave it."""
    low = precision in ("fp16", "bf16")
    value = device.peak_fp16_tflops if low else device.peak_fp32_tflops
    if value is None:
        preset = preset_for_product(device.name)
        if preset is not None:
            value = preset.peak_fp16_tflops if low else preset.peak_fp32_tflops
    if value is not None:
        return value, True
    per_sm = PEAK_TFLOPS_PER_SM.get(precision, PEAK_TFLOPS_PER_SM["fp32"])
    return per_sm * (device.sm_count or 100), False


def _bandwidth_gbs(device: Device) -> tuple[float, bool]:
    value = device.memory_bandwidth_gbs
    if value is None:
        preset = preset_for_product(device.name)
        if preset is not None:
            value = preset.memory_bandwidth_gbs
    if value is not None:
        return value, True
    return BANDWIDTH_GBS_PER_SM * (device.sm_count or 100), False


def _host_cores(device: Device, source_devices: Sequence[Device]) -> tuple[int, str]:
    """Host cores that can run host threads at once, and a note when assumed."""
    if device.kind != "simulated" or device.cpu_cores > 1:
        return max(1, device.cpu_cores), ""
    from_profiles = [d.cpu_cores for d in source_devices if d.is_gpu and d.cpu_cores > 1]
    if from_profiles:
        cores = max(from_profiles)
        return cores, f"host of the simulated GPU assumed to have {cores} cores, like the profiled machine"
    return DEFAULT_SIMULATED_HOST_CORES, (
        f"host of the simulated GPU assumed to have {DEFAULT_SIMULATED_HOST_CORES} cores "
        "(set cpu_cores in the device spec to change it)"
    )


def _process_bytes(device: Device, used: Sequence[Profile]) -> tuple[int, str]:
    """Memory one worker process costs on ``device``: measured from GPU profiles where possible."""
    if not device.is_gpu:
        return CPU_PROCESS_BYTES, (
            f"estimated: {CPU_PROCESS_BYTES / _MIB:.0f} MiB of RAM per process, the serving "
            "process and each worker (interpreter + framework)"
        )
    overheads: list[int] = []
    same = True
    where = ""
    for p in used:
        if not (p.ok and p.device.is_gpu and p.memory is not None and p.memory.process_bytes):
            continue
        extra = p.memory.process_bytes - p.memory.total_bytes
        if extra > 0:
            overheads.append(extra)
            same = same and device_key(p.device) == device_key(device)
            where = p.device.name
    if not overheads:
        return CUDA_CONTEXT_BYTES, (
            f"estimated: {CUDA_CONTEXT_BYTES / _MIB:.0f} MiB per CUDA context (no GPU profile measures it)"
        )
    value = int(statistics.median(overheads))
    value = min(MAX_CONTEXT_BYTES, max(MIN_CONTEXT_BYTES, value))
    how = (
        f"{value / _MIB:.0f} MiB per CUDA context: median of NVML process memory minus allocator use "
        f"over {len(overheads)} profile(s) on {where}"
    )
    return value, ("measured: " + how) if same else ("estimated: " + how)


# ---------------------------------------------------------------------------
# The demands
# ---------------------------------------------------------------------------


def _input_bytes(ensemble: Ensemble | None, member: str, batch: int) -> int:
    if ensemble is None:
        return 0
    spec = ensemble.member(member).input
    itemsize = np.dtype(spec.dtype).itemsize
    return batch * math.prod(spec.shape[1:]) * itemsize


def _member_names(ensemble: Ensemble | Sequence[str]) -> tuple[tuple[str, ...], Ensemble | None]:
    if isinstance(ensemble, Ensemble):
        return ensemble.member_names, ensemble
    if isinstance(ensemble, str):
        raise InvalidInputError("give an Ensemble or a list of member names, not one string")
    names = tuple(ensemble)
    if not names or not all(isinstance(n, str) for n in names):
        raise InvalidInputError("give an Ensemble or a non-empty list of member names")
    if len(set(names)) != len(names):
        raise InvalidInputError(f"duplicate member names: {list(names)}")
    return names, None


def _as_profile_set(profiles: ProfileSet | Sequence[Profile]) -> ProfileSet:
    if isinstance(profiles, ProfileSet):
        return profiles
    items = tuple(profiles)
    if not all(isinstance(p, Profile) for p in items):
        raise InvalidInputError("profiles must be a ProfileSet or a list of Profile objects")
    return ProfileSet(items)


@dataclass(frozen=True)
class _Source:
    """The profiles chosen for one member: all on one device (and one precision)."""

    device: Device
    profiles: tuple[Profile, ...]  # status ok
    failed: tuple[Profile, ...]  # out of memory on this device
    kind: str  # "same", "gpu", "cpu"
    precision_note: str


def _choose_source(
    member: str, wanted_precision: str | None, device: Device, all_profiles: Sequence[Profile]
) -> _Source:
    mine = [p for p in all_profiles if p.member == member]
    if not mine:
        raise InvalidInputError(
            f"member '{member}' has no profile; profile it first: "
            f"colocate profile --device <device> (or colocate.profiling.profile)"
        )
    ok = [p for p in mine if p.ok and p.latency is not None and p.memory is not None]
    precision_note = ""
    if wanted_precision is not None:
        matching = [p for p in ok if p.precision == wanted_precision]
        if matching:
            ok = matching
        elif ok:
            got = sorted({p.precision for p in ok})
            precision_note = (
                f"{member}: runs in {wanted_precision} but was profiled in {', '.join(got)}; "
                "its figures are for that precision"
            )
    target = device_key(device)
    groups: dict[str, list[Profile]] = {}
    for p in ok:
        groups.setdefault(device_key(p.device), []).append(p)
    oom = tuple(p for p in mine if p.status == "out_of_memory" and device_key(p.device) == target)
    if target in groups:
        same = _one_per_batch_size(groups[target])
        return _Source(same[0].device, same, oom, "same", precision_note)
    if oom:
        return _Source(oom[0].device, (), oom, "same", precision_note)
    if not groups:
        statuses = ", ".join(sorted({f"{p.status} at batch {p.batch_size}" for p in mine}))
        raise InvalidInputError(
            f"member '{member}' has no usable profile ({statuses}); re-run colocate profile for it"
        )
    if device.is_gpu:
        gpu_groups = [g for g in groups.values() if g[0].device.is_gpu]
        if gpu_groups:
            group = max(gpu_groups, key=len)
            return _Source(group[0].device, _one_per_batch_size(group), (), "gpu", precision_note)
        group = max(groups.values(), key=len)
        return _Source(group[0].device, _one_per_batch_size(group), (), "cpu", precision_note)
    where = ", ".join(sorted({g[0].device.name for g in groups.values()}))
    raise InvalidInputError(
        f"member '{member}' was profiled only on {where}; planning for the CPU needs a CPU profile: "
        "colocate profile --device cpu"
    )


def _scale_gpu(f: _Figures, src: Device, dst: Device, precision: str) -> tuple[_Figures, str]:
    f_src, known_src = _peak_tflops(src, precision)
    f_dst, known_dst = _peak_tflops(dst, precision)
    b_src, kb_src = _bandwidth_gbs(src)
    b_dst, kb_dst = _bandwidth_gbs(dst)
    compute = f_src / f_dst
    bandwidth = b_src / b_dst
    ratio = GPU_COMPUTE_WEIGHT * compute + (1 - GPU_COMPUTE_WEIGHT) * bandwidth
    rest = f.latency_s - max(f.host_s, f.busy_s)
    busy = f.busy_s * ratio
    latency = rest + max(f.host_s, busy)
    sm_ratio = (src.sm_count or 1) / (dst.sm_count or 1) if src.sm_count and dst.sm_count else 1.0
    scaled = dataclasses.replace(
        f,
        latency_s=latency,
        p99_s=latency * f.p99_s / f.latency_s,
        busy_s=busy,
        sm_fill=min(1.0, f.sm_fill * sm_ratio),
    ).normalised()
    assumed = "" if known_src and known_dst and kb_src and kb_dst else "; peak figures partly assumed per SM"
    note = (
        f"scaled from {src.name} profiles: kernel time x{ratio:.2f} (compute x{compute:.2f}, "
        f"bandwidth x{bandwidth:.2f}), SM fill x{sm_ratio:.2f}{assumed}"
    )
    return scaled, note


def _cpu_dispatch_s(series: Sequence[_Figures]) -> float:
    """The batch-independent part of a CPU member's latency (intercept over batch size)."""
    ordered = sorted(series, key=lambda f: f.batch_size)
    if len(ordered) >= 2:
        a, c = ordered[0], ordered[1]
        slope = (c.latency_s - a.latency_s) / (c.batch_size - a.batch_size)
        intercept = a.latency_s - max(0.0, slope) * a.batch_size
        return max(0.0, intercept)
    return ordered[0].latency_s * ESTIMATED_HOST_FRACTION


def _cpu_to_gpu(f: _Figures, dispatch_s: float, dst: Device, precision: str) -> tuple[_Figures, str]:
    threads = f.threads or 1
    flops = f.busy_s * threads * CPU_GFLOPS_PER_CORE * 1e9
    peak, _ = _peak_tflops(dst, precision)
    bandwidth, _ = _bandwidth_gbs(dst)
    activation = round(f.activation_bytes * GPU_ACTIVATION_FACTOR)
    traffic = f.weights_bytes + activation
    busy = max(
        flops / (peak * 1e12 * GPU_ACHIEVED_COMPUTE_FRACTION),
        traffic / (bandwidth * 1e9 * GPU_ACHIEVED_BANDWIDTH_FRACTION),
        _MIN_TIME_S,
    )
    host = min(MAX_ESTIMATED_HOST_S, max(MIN_ESTIMATED_HOST_S, dispatch_s))
    latency = max(host, busy) + FIRST_KERNEL_DELAY_S
    est = _Figures(
        batch_size=f.batch_size,
        latency_s=latency,
        p99_s=latency * f.p99_s / f.latency_s,
        busy_s=busy,
        host_s=host,
        sm_fill=ESTIMATED_SM_FILL,
        weights_bytes=f.weights_bytes,
        activation_bytes=activation,
        threads=None,
        thread_scaling=(),
    ).normalised()
    note = (
        f"estimated from a CPU profile: {flops / 1e9:.2f} GFLOP at {CPU_GFLOPS_PER_CORE:.0f} GFLOP/s "
        "per core, "
        f"GPU at {GPU_ACHIEVED_COMPUTE_FRACTION:.0%} of {peak:.0f} TFLOP/s / "
        f"{GPU_ACHIEVED_BANDWIDTH_FRACTION:.0%} of {bandwidth:.0f} GB/s, host {host * 1e3:.2f} ms"
    )
    return est, note


def member_demands(
    ensemble: Ensemble | Sequence[str],
    device: Device,
    profiles: ProfileSet | Sequence[Profile],
    batch_size: int,
) -> DemandSet:
    """Each member's demands on ``device`` at ``batch_size``, from ``profiles``.

    Args:
        ensemble: the ensemble (its members' precision and input size are used) or member names.
        device: the device to plan for (a GPU, a simulated GPU, or the CPU).
        profiles: profiles of the members, on this device or others (see the module docstring for
            how figures from other devices and batch sizes are estimated).
        batch_size: the batch size of one request.

    Raises:
        InvalidInputError: a member has no usable profile (the message says how to make one), or a
            member has only GPU profiles and the device is the CPU.
        PlanInfeasibleError: a member ran out of memory on this device at this batch size or below.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch size must be a positive integer, got {batch_size!r}")
    names, ens = _member_names(ensemble)
    pset = _as_profile_set(profiles)
    notes: list[str] = []
    demands: list[MemberDemand] = []
    used: list[Profile] = []
    source_devices: list[Device] = []
    for name in names:
        precision = ens.member(name).precision if ens is not None else None
        src = _choose_source(name, precision, device, pset.profiles)
        if src.precision_note:
            notes.append(src.precision_note)
        too_big = sorted(p.batch_size for p in src.failed if p.batch_size <= batch_size)
        if too_big:
            fit = max((p.batch_size for p in src.profiles if p.batch_size < too_big[0]), default=None)
            hint = f"the largest profiled batch that fits is {fit}" if fit else "no profiled batch fits"
            raise PlanInfeasibleError(
                f"member '{name}' ran out of memory on {device.name} at batch {too_big[0]} "
                f"(planning for batch {batch_size}); {hint}: use a smaller batch size"
            )
        if not src.profiles:
            raise InvalidInputError(f"member '{name}' has no usable profile on {device.name}")
        used.extend(src.profiles)
        source_devices.append(src.device)
        member_notes: list[str] = []
        series = [_figures(p, member_notes) for p in src.profiles]
        notes.extend(dict.fromkeys(member_notes))
        figs, how = _at_batch(series, batch_size)
        hows = [how] if how else []
        run_precision = precision or src.profiles[0].precision
        if src.kind == "gpu":
            figs, scaled = _scale_gpu(figs, src.device, device, run_precision)
            hows.append(scaled)
        elif src.kind == "cpu":
            figs, scaled = _cpu_to_gpu(figs, _cpu_dispatch_s(series), device, run_precision)
            hows.append(scaled)
        if device.is_gpu:
            fill = figs.sm_fill
            threads = None
        else:
            threads = figs.threads or max(1, device.cpu_cores)
            fill = min(1.0, threads / max(1, device.cpu_cores))
        source = "measured" if not hows else "estimated: " + "; ".join(hows)
        demands.append(
            MemberDemand(
                member=name,
                batch_size=batch_size,
                latency_s=figs.latency_s,
                p99_s=figs.p99_s,
                busy_fraction=min(1.0, figs.busy_s / figs.latency_s),
                sm_fill=fill,
                host_share=min(1.0, figs.host_s / figs.latency_s) if device.is_gpu else 0.0,
                weights_bytes=figs.weights_bytes,
                activation_bytes=figs.activation_bytes,
                input_bytes=_input_bytes(ens, name, batch_size),
                threads=threads,
                thread_scaling=figs.thread_scaling if not device.is_gpu else (),
                source=source,
                backend=src.profiles[0].backend,
            )
        )
    process_bytes, process_source = _process_bytes(device, used)
    cores, cores_note = _host_cores(device, source_devices)
    if cores_note:
        notes.append(cores_note)
    return DemandSet(
        device=device,
        batch_size=batch_size,
        members=tuple(demands),
        process_bytes=process_bytes,
        process_bytes_source=process_source,
        host_cores=cores,
        notes=tuple(dict.fromkeys(notes)),
    )


def profiled_batch_sizes(
    ensemble: Ensemble | Sequence[str], profiles: ProfileSet | Sequence[Profile]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Batch sizes with an ok profile of every member (first), and of any member (second)."""
    names, _ = _member_names(ensemble)
    pset = _as_profile_set(profiles)
    per_member: Mapping[str, set[int]] = {
        n: {p.batch_size for p in pset.profiles if p.member == n and p.ok} for n in names
    }
    common = set.intersection(*per_member.values()) if per_member else set()
    union = set.union(*per_member.values()) if per_member else set()
    return tuple(sorted(common)), tuple(sorted(union))


__all__ = [
    "CPU_PROCESS_BYTES",
    "CUDA_CONTEXT_BYTES",
    "MPS_CLIENT_SHARE",
    "DemandSet",
    "MemberDemand",
    "demand_set",
    "device_key",
    "member_demands",
    "profiled_batch_sizes",
]
