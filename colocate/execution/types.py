"""What executing a plan gives back: one request's result, and a measured run.

Units live in the field names: ``_s`` seconds, ``_bytes``, ``_sps`` samples per
second, ``_pct`` percent, ``_w`` watts. :class:`RunResult` is data: it
round-trips through JSON (:mod:`colocate.serde`) and is what ``compare`` puts
side by side with the plan's prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from colocate._timing import LatencyStats
from colocate.devices import Device
from colocate.ensemble import Array
from colocate.planning.types import Prediction

RunStatus = Literal["ok", "errors", "failed"]


@dataclass(frozen=True)
class SlotAnswer:
    """One slot's answer to one request: its members' raw outputs, and when it ran them.

    The times are ``time.perf_counter()`` readings taken where the members ran (the serving
    process, or a worker process: on Linux that clock is ``CLOCK_MONOTONIC``, the same in
    every process), so the front can tell the members' time from the time around it.
    """

    outputs: dict[str, Array]  # raw output by member name
    started_s: float  # the slot began running the members (perf_counter)
    finished_s: float  # every member's output was fetched (perf_counter)


@dataclass(frozen=True)
class SlotTiming:
    """Where one request's time went in one slot (seconds)."""

    slot: str  # the slot's name in the plan
    queued_s: float  # submit -> the slot began: checks, staging, queueing, the hand-off (pipe, wake-up)
    compute_s: float  # the slot ran its members: prepare, run and fetch, one after another
    returned_s: float  # the slot finished -> the front had its outputs: the hand-off back, unpacking


@dataclass(frozen=True)
class EnsembleResult:
    """One request's answer, with where its latency went."""

    combined: Array  # the ensemble's combined prediction, (batch, classes)
    members: dict[str, Array] | None  # each member's raw output, when asked for (return_members=True)
    latency_s: float  # from submit to the combined result, perf_counter seconds
    request_id: int  # the executor's id of the request, increasing in submission order
    slots: tuple[SlotTiming, ...] = ()  # one per slot, in the order they answered
    combine_s: float = 0.0  # the ensemble's combine rule on the members' outputs

    @property
    def overhead_s(self) -> float:
        """The latency that neither the members nor the combine rule spent.

        ``latency_s`` less ``combine_s`` less the compute time of the slot that answered last:
        checks, staging, queueing behind other requests, the hand-offs to and from that slot
        (thread wake-ups, pipes) and the front's bookkeeping. With one request in flight it is
        what the executor adds over calling the members directly, as long as they compute as
        fast in their slot as in the caller. Never below 0 (a difference below it is rounding).
        """
        compute_s = self.slots[-1].compute_s if self.slots else 0.0
        return max(0.0, self.latency_s - self.combine_s - compute_s)


@dataclass(frozen=True)
class ExecutorStats:
    """Counters of an executor since it started."""

    submitted: int  # requests accepted by submit()
    completed: int  # requests answered with a combined prediction
    failed: int  # requests answered with an error
    in_flight: int  # submitted and not yet answered
    worker_restarts: int  # dead workers restarted (on_worker_death="restart")
    alive: bool  # every slot serves
    broken_reason: str | None  # why the executor cannot serve any more, else None
    latency: LatencyStats | None  # request latencies of the completed requests (the last 100 000)
    overhead: LatencyStats | None = None  # their EnsembleResult.overhead_s (the same requests)


@dataclass(frozen=True)
class ProcessMemory:
    """Peak memory of one process that ran part of the plan."""

    role: str  # "front" (the serving process: stream slots, combining) or the worker's slot name
    pid: int
    peak_host_bytes: int | None  # peak resident set (VmHWM); None where the OS does not say
    peak_gpu_bytes: int | None  # peak NVML per-process GPU memory while measured (GPU only), else None


@dataclass(frozen=True)
class RunResult:
    """A measured run of one plan: throughput, latency, memory and utilisation, with the prediction."""

    strategy: str  # the plan's strategy name
    device: Device  # where it ran
    batch_size: int  # samples per request
    slots: tuple[str, ...]  # one line per slot: "s0 stream: resnet, vit"
    concurrency: int  # requests kept in flight
    warmup_requests: int  # requests run first and not counted
    requests_completed: int  # counted requests answered with a prediction
    requests_failed: int  # counted requests answered with an error
    wall_s: float  # from the first counted submit to the last counted answer
    throughput_sps: float  # completed samples per second over wall_s
    latency: LatencyStats | None  # request latencies (submit to combined result); None if none completed
    memory: tuple[ProcessMemory, ...]  # one per process: the front, then each worker
    utilization_pct_samples: tuple[float, ...]  # NVML "GPU busy" samples while measured (GPU only)
    utilization_pct: float | None  # their mean; None on the CPU or without NVML
    mean_power_w: float | None  # mean board power while measured (GPU with NVML), else None
    status: RunStatus  # "ok"; "errors": some requests failed; "failed": the plan broke or nothing completed
    errors: tuple[str, ...]  # the first distinct error messages (at most 10)
    worker_restarts: int  # dead workers restarted during the run
    interrupted: bool  # stopped early by Ctrl-C (the numbers cover what ran)
    prediction: Prediction | None  # the plan's prediction, for side-by-side comparison
    versions: dict[str, str] = field(default_factory=dict)  # colocate, python, numpy, frameworks, driver
    notes: tuple[str, ...] = ()  # caveats: memory or utilisation unavailable, and why
    overhead: LatencyStats | None = None  # EnsembleResult.overhead_s of the completed requests

    @property
    def peak_memory_bytes(self) -> int | None:
        """The plan's peak memory: summed over processes, GPU memory on a GPU, else resident memory."""
        field_name = "peak_gpu_bytes" if self.device.kind == "cuda" else "peak_host_bytes"
        values = [getattr(m, field_name) for m in self.memory]
        known = [v for v in values if v is not None]
        return sum(known) if known else None

    @property
    def requests_per_s(self) -> float:
        """Completed requests per second."""
        return self.requests_completed / self.wall_s if self.wall_s > 0 else 0.0


__all__ = [
    "EnsembleResult",
    "ExecutorStats",
    "ProcessMemory",
    "RunResult",
    "RunStatus",
    "SlotAnswer",
    "SlotTiming",
]
