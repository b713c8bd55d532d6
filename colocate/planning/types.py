"""What a plan is: slots on one device, members assigned to them, and a prediction.

A :class:`Plan` is data: the planner makes it, an executor runs it, and both
sides agree only on this file. Units live in the field names (``_s`` seconds,
``_bytes``, ``_sps`` samples per second).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Literal

from colocate.devices import Device
from colocate.errors import InvalidInputError

SlotKind = Literal["stream", "process", "mps"]
SLOT_KINDS: tuple[str, ...] = ("stream", "process", "mps")
Objective = Literal["throughput", "latency", "throughput_under_latency"]


@dataclass(frozen=True)
class Slot:
    """One place members run: they run one after another in ``members`` order.

    - ``stream``: a CUDA stream in the serving process (on the CPU: a thread).
    - ``process``: a worker process (time-sliced on the GPU).
    - ``mps``: a worker process under NVIDIA MPS with ``thread_percentage`` of the SMs and a
      device-memory limit (on the CPU: a process pinned to that share of the cores).
    """

    name: str  # unique within the plan, e.g. "s0"
    kind: SlotKind
    members: tuple[str, ...]  # member names, in run order; at least one
    thread_percentage: float | None = None  # mps: CUDA_MPS_ACTIVE_THREAD_PERCENTAGE in (0, 100]
    memory_limit_bytes: int | None = None  # mps: CUDA_MPS_PINNED_DEVICE_MEM_LIMIT for the worker
    cpu_threads: int | None = None  # CPU device: intra-op threads of this slot (None: library default)

    def __post_init__(self) -> None:
        if self.kind not in SLOT_KINDS:
            raise InvalidInputError(
                f"slot '{self.name}': unknown kind {self.kind!r}; choose one of {', '.join(SLOT_KINDS)}"
            )
        if not self.members:
            raise InvalidInputError(f"slot '{self.name}' has no members")
        if self.thread_percentage is not None and not 0 < self.thread_percentage <= 100:
            raise InvalidInputError(
                f"slot '{self.name}': thread_percentage {self.thread_percentage} is not in (0, 100]"
            )
        if self.kind != "mps" and self.thread_percentage is not None:
            raise InvalidInputError(
                f"slot '{self.name}': thread_percentage is only for 'mps' slots, not '{self.kind}'"
            )
        if self.memory_limit_bytes is not None and self.memory_limit_bytes <= 0:
            raise InvalidInputError(f"slot '{self.name}': memory_limit_bytes must be positive")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise InvalidInputError(f"slot '{self.name}': cpu_threads must be >= 1")


@dataclass(frozen=True)
class MemberPrediction:
    """The cost model's view of one member inside a plan (per request of ``batch_size``)."""

    member: str
    slot: str  # name of its slot
    alone_s: float  # its latency alone on the device (from its profile)
    start_s: float  # predicted start within a request (members before it in its slot)
    finish_s: float  # predicted finish within a request
    slowdown: float  # predicted factor >= 1 from sharing the device with the other slots
    memory_bytes: int  # weights + peak activations + workspace it needs at this batch size
    source: str  # "measured" (a profile on this device) or "estimated: ..." (how)


@dataclass(frozen=True)
class Prediction:
    """Predicted performance of a plan at its batch size."""

    throughput_sps: float  # samples per second with requests back to back
    latency_s: float  # median request latency (submit to combined result)
    latency_p99_s: float  # tail request latency
    peak_memory_bytes: int  # device memory the plan needs (all slots, contexts, margins)
    critical_member: str  # the member whose finish sets the request latency
    bound: str  # what limits throughput, e.g. "critical path", "SM time", "host", "time slicing"
    members: tuple[MemberPrediction, ...]


@dataclass(frozen=True)
class MemberBackend:
    """The backend variant a plan runs one member with (see :mod:`colocate.variants`)."""

    member: str
    label: str  # variant label: "torch", "torch+cudagraph", "onnxruntime", "tensorrt", "cupy"
    backend: str  # the backend it runs on, e.g. "torch" for "torch+cudagraph"
    options: tuple[str, ...] = ()  # backend options the variant switches on, e.g. ("cuda_graph",)
    default: str = ""  # the label of the member as given
    speedup_alone: float = 1.0  # predicted latency alone under `default` / under `label`, at the plan's batch


@dataclass(frozen=True)
class Plan:
    """Slots on one device at one batch size, with the prediction and the reasons."""

    device: Device
    batch_size: int
    slots: tuple[Slot, ...]
    prediction: Prediction
    strategy: str  # the strategy that made it, e.g. "sequential", "streams", "auto"
    objective: str = "throughput"  # what it was chosen for
    explanation: tuple[str, ...] = ()  # readable reasons, one per line
    notes: tuple[str, ...] = field(default_factory=tuple)  # caveats: estimated figures, margins
    backends: tuple[MemberBackend, ...] = ()  # each member's backend variant; () = each as given
    # (member, model hash of the profiles it was planned from, as given): checked against the
    # ensemble a plan file is run with; () = not recorded (plans made before they were)
    model_hashes: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise InvalidInputError(f"plan batch_size must be >= 1, got {self.batch_size}")
        if not self.slots:
            raise InvalidInputError("a plan needs at least one slot")
        names = [s.name for s in self.slots]
        if len(set(names)) != len(names):
            raise InvalidInputError(f"plan has duplicate slot names: {names}")
        seen: set[str] = set()
        for slot in self.slots:
            for member in slot.members:
                if member in seen:
                    raise InvalidInputError(
                        f"member '{member}' is in more than one slot; each member runs in exactly one"
                    )
                seen.add(member)
        chosen = [b.member for b in self.backends]
        if len(set(chosen)) != len(chosen) or not set(chosen) <= seen:
            raise InvalidInputError(
                f"plan backends name members {chosen}: each must be a member of the plan, at most once"
            )
        mps_total = sum(s.thread_percentage or 0.0 for s in self.slots if s.kind == "mps")
        if mps_total > 100.0 + 1e-6:
            raise InvalidInputError(
                f"the mps slots' thread percentages sum to {mps_total:.1f} %, over 100 %; "
                "lower them so the partitions fit the device"
            )

    @property
    def members(self) -> tuple[str, ...]:
        """All member names, slot by slot in run order."""
        return tuple(m for s in self.slots for m in s.members)

    def backend_of(self, member: str) -> MemberBackend | None:
        """The backend variant the plan chose for ``member``; None: run it as given."""
        for choice in self.backends:
            if choice.member == member:
                return choice
        return None

    def model_hash_of(self, member: str) -> str | None:
        """The model hash of the profiles ``member`` was planned from (None: not recorded)."""
        return dict(self.model_hashes).get(member)

    def slot_of(self, member: str) -> Slot:
        """The slot that runs ``member``."""
        for slot in self.slots:
            if member in slot.members:
                return slot
        raise InvalidInputError(f"member '{member}' is not in this plan; members: {', '.join(self.members)}")

    def check_covers(self, member_names: tuple[str, ...] | list[str]) -> None:
        """Raise unless the plan runs exactly these members."""
        planned, wanted = set(self.members), set(member_names)
        if planned != wanted:
            missing = sorted(wanted - planned)
            extra = sorted(planned - wanted)
            raise InvalidInputError(
                f"plan does not match the ensemble: missing {missing or 'none'}, "
                f"unknown {extra or 'none'}; re-plan for this ensemble"
            )


@dataclass(frozen=True)
class PlanMeasurement:
    """A candidate plan run for real, a few rounds, to settle what the cost model cannot call.

    ``auto`` planning given such measurements picks the measured-best of them (see
    :func:`colocate.planning.plan`); a calibration records them
    (:func:`colocate.comparison.calibrate`).
    """

    name: str  # what proposed it when it was measured, e.g. "auto", "streams", "sequential"
    slots: tuple[Slot, ...]  # the slots that ran
    batch_size: int  # samples per request
    predicted_sps: float  # the cost model's throughput prediction when it was measured
    round_sps: tuple[float, ...]  # measured samples/s, one per round (empty when it failed)
    failure: str | None = None  # why it did not run, if it did not

    def __post_init__(self) -> None:
        if not self.slots:
            raise InvalidInputError(f"plan measurement '{self.name}' has no slots")
        if any(not value >= 0 for value in self.round_sps):
            raise InvalidInputError(
                f"plan measurement '{self.name}': samples/s must be >= 0, got {list(self.round_sps)}"
            )

    @property
    def measured_sps(self) -> float | None:
        """The median samples/s over the rounds; None when it did not run."""
        return float(statistics.median(self.round_sps)) if self.round_sps else None

    @property
    def members(self) -> tuple[str, ...]:
        """All member names, slot by slot."""
        return tuple(m for s in self.slots for m in s.members)

    def describe(self) -> str:
        """One line: ``"streams (5 stream slots)"``."""
        kinds = sorted({s.kind for s in self.slots})
        return f"{self.name} ({len(self.slots)} {'/'.join(kinds)} slot{'s' if len(self.slots) > 1 else ''})"
