"""What a profile holds: one member, on one device, at one batch size.

Units live in the field names: ``_bytes``, ``_s`` (seconds), ``_w`` (watts),
``_j`` (joules), ``_sps`` (samples per second). Fractions are in [0, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from colocate._timing import LatencyStats
from colocate.devices import Device
from colocate.errors import InvalidInputError

ProfileStatus = Literal["ok", "out_of_memory", "failed"]


@dataclass(frozen=True)
class MemoryFootprint:
    """Memory one member takes on its device."""

    weights_bytes: int  # resident after load (parameters, buffers, engine/initializers)
    peak_activation_bytes: int  # peak during one inference above the weights (activations, workspace)
    reserved_unused_bytes: int  # held by the framework's allocator beyond its peak use (0 if unknown)
    process_bytes: int | None  # whole-process figure for cross-checking: NVML per-process or RSS delta
    source: str  # where the numbers come from, e.g. "torch.cuda allocator + NVML", "torch profiler + RSS"

    @property
    def total_bytes(self) -> int:
        """What the planner must budget: weights + peak activations + unused reservation."""
        return self.weights_bytes + self.peak_activation_bytes + self.reserved_unused_bytes


@dataclass(frozen=True)
class KernelFootprint:
    """How a member uses the GPU, from a kernel trace (per batch, averaged over traced batches)."""

    source: str  # "torch.profiler (CUPTI)" or "nvml sampling" (then kernel fields are unknown: 0)
    traced_batches: int  # batches in the trace
    kernels_per_batch: float  # GPU kernels launched per batch
    kernel_time_s: float  # summed kernel durations per batch
    busy_fraction: float  # union of kernel intervals / wall time of the traced window, in [0, 1]
    launch_gap_median_s: float  # median idle gap between consecutive kernels (same stream)
    launch_gap_p90_s: float
    max_grid_blocks: int  # largest grid (blocks) launched
    typical_grid_blocks: int  # time-weighted median grid size
    sm_fill: float  # time-weighted share of the SMs a kernel's grid can cover, min(1, blocks/SMs)
    occupancy_pct: float | None  # time-weighted estimated achieved occupancy (static, per kernel), %
    first_kernel_delay_s: float  # from the start of a batch's host call to its first kernel


@dataclass(frozen=True)
class CpuFootprint:
    """How a member uses the CPU (on the CPU device)."""

    threads: int  # threads the member ran with while timed
    busy_share: float  # process CPU time / (wall time x threads) while timed, in [0, 1]
    thread_scaling: tuple[tuple[int, float], ...]  # (threads, median latency s) for 1..N threads
    top_ops: tuple[tuple[str, float], ...]  # (operator, share of operator self time), largest first


@dataclass(frozen=True)
class EnergyFootprint:
    """Power and energy on a GPU, from NVML, over the timed runs."""

    mean_power_w: float  # average board power while timed
    energy_per_sample_j: float  # energy / samples processed
    utilization_pct: float | None  # NVML "GPU busy" mean (any kernel running), %
    source: str  # "nvml total energy" or "nvml power samples"


@dataclass(frozen=True)
class Profile:
    """One member on one device at one batch size, as measured."""

    member: str  # member name
    backend: str  # backend name
    precision: str  # "fp32", "fp16", "bf16"
    batch_size: int
    device: Device
    model_hash: str  # identifies the model's weights/file
    status: ProfileStatus  # "ok", or why there are no figures
    load_time_s: float  # activate(): load/build + move to the device
    latency: LatencyStats | None  # per-batch latency (None unless status is "ok")
    throughput_sps: float  # batch_size / median latency (0 unless ok)
    host_share: float | None  # time for the host call to return / latency: what streams can hide
    memory: MemoryFootprint | None
    kernels: KernelFootprint | None  # GPU only
    cpu: CpuFootprint | None  # CPU only
    energy: EnergyFootprint | None  # GPU only, where NVML reports it
    error: str | None = None  # the error message when status is not "ok"
    max_fitting_batch: int | None = None  # largest profiled batch that fit, when out of memory
    versions: dict[str, str] = field(default_factory=dict)  # colocate, framework, python, ...
    measured_at: str = ""  # ISO date-time of the measurement
    notes: tuple[str, ...] = ()  # caveats, e.g. which counters were unavailable

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class ProfileSet:
    """Profiles of several members and batch sizes, saved as one JSON file."""

    profiles: tuple[Profile, ...]

    def get(self, member: str, batch_size: int) -> Profile | None:
        """The profile of ``member`` at ``batch_size``, if any."""
        for p in self.profiles:
            if p.member == member and p.batch_size == batch_size:
                return p
        return None

    @property
    def members(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for p in self.profiles:
            seen.setdefault(p.member, None)
        return tuple(seen)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({p.batch_size for p in self.profiles}))


@dataclass(frozen=True)
class VariantProfiles:
    """Profiles of the members under several backend variants (see :mod:`colocate.variants`).

    ``sets`` maps a variant label (``"torch"``, ``"torch+cudagraph"``, ``"onnxruntime"``, ...)
    to the profiles of the members that have that variant; ``defaults`` maps each member to the
    label of the member as given (its default variant). Saved as one JSON file.
    """

    sets: dict[str, ProfileSet]  # variant label -> profiles of the members under it
    defaults: dict[str, str]  # member name -> label of the member as given

    def __post_init__(self) -> None:
        for member, label in self.defaults.items():
            found = self.sets.get(label)
            if found is None or member not in found.members:
                raise InvalidInputError(
                    f"VariantProfiles: member '{member}' has no profiles under its default backend "
                    f"'{label}'; profile it with colocate.profiling.profile_variants"
                )

    @property
    def members(self) -> tuple[str, ...]:
        """The members, in the order of ``defaults``."""
        return tuple(self.defaults)

    @property
    def labels(self) -> tuple[str, ...]:
        """The variant labels that have profiles."""
        return tuple(self.sets)

    def labels_of(self, member: str) -> tuple[str, ...]:
        """The labels ``member`` was profiled under, its default first."""
        default = self.defaults.get(member)
        found = [label for label, s in self.sets.items() if member in s.members]
        return tuple(sorted(found, key=lambda label: label != default))

    def for_assignment(self, assignment: Mapping[str, str]) -> ProfileSet:
        """One ProfileSet: each member's profiles under its label in ``assignment`` (else its default)."""
        chosen: list[Profile] = []
        for member, default in self.defaults.items():
            label = assignment.get(member, default)
            source = self.sets.get(label)
            if source is None or member not in source.members:
                raise InvalidInputError(
                    f"member '{member}' has no profiles under backend '{label}'; profiled under: "
                    f"{', '.join(self.labels_of(member))}"
                )
            chosen.extend(p for p in source.profiles if p.member == member)
        return ProfileSet(tuple(chosen))

    @property
    def default_set(self) -> ProfileSet:
        """Every member's profiles under its default variant."""
        return self.for_assignment({})
