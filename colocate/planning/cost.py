"""The cost model: predict a plan's throughput, latency and memory from the members' demands.

A request of ``batch_size`` samples is forked to every slot; a slot runs its members one after
another; slots run concurrently; the request is done when the slowest member is (fork-join),
plus the combine. The model simulates one request as a processor-sharing system: at every
moment each slot runs its current member, and each running member progresses at a rate set by
the resources it shares with the members running in the other slots. A member alone takes
``L = R + max(H, G)``: host time ``H`` (its thread dispatching work), device-busy time ``G``
(kernels; on the CPU device: its threads computing), and a remainder ``R`` that overlaps neither
(synchronisation, launch latency). Running beside others it takes ``R + max(H * kh, G * kg)``:

* **SMs (CPU: cores).** Members in one *concurrency domain* (the serving process's streams, or
  every slot once MPS is in the plan, or all threads and processes on the CPU) run kernels at
  the same time. Each uses ``busy x fill`` of the device on average; when the sum ``D`` over the
  running members exceeds 1 the device is shared in proportion (``kg = D``); below 1 they
  overlap nearly freely, paying only for memory bandwidth and caches
  (``kg *= 1 + bandwidth_interference x min(1, D - own)``).
* **Time slicing.** Without MPS, kernels of different processes never overlap: the GPU
  alternates between contexts, so a member's kernels wait while other processes' kernels run
  (``kg *= 1 + (1 + time_slice_overhead) x`` the busy share of the other running processes).
* **MPS partitions.** An ``mps`` slot with ``p`` % of the threads has kernels that need ``fill``
  of the SMs but get at most ``p``: ``kg *= max(1, fill / p)``; its members' demand counts at
  ``min(fill, p)``. On the CPU an ``mps`` slot is a process on ``p`` % of the cores; its members
  take their latency at that many threads (from their thread scaling).
* **Host.** Stream slots share the serving process's interpreter: their host work is serialised
  by the GIL (capacity ``stream_host_capacity`` threads); worker processes each have their own;
  all host threads share the host's cores.
* **Measured pairs.** With an interference table (a pair's slowdown = its time side by side
  over the slower member's time alone, measured in two slots of one kind), a member running
  beside a measured partner is stretched by the factor that makes the two-member prediction in
  slots of that kind take exactly the measured slowdown (found by bisection on the pair). A
  measurement applies only where both members run in slots of its kind (see
  :func:`measurement_kind`): a pair measured in two stream slots (threads sharing one
  interpreter) says nothing about the same pair in two worker processes, and vice versa.

Throughput has requests back to back: ``batch_size / interval`` where the interval is the
largest of the slowest slot's time (its dispatch included), the SM-time bound (total
``busy x fill x latency`` of all members: the work cannot beat the whole device), the
time-slicing bound (busy times of different processes add up), and the host bounds (GIL and
cores). Latency is the same fork-join maximum (a request cannot beat those bounds either)
plus the combine. The p99 adds the tail of the slots that finish within 10 % of the last:
along a slot, the members' tails ``(p99 / median - 1) x`` their time there add in quadrature
(independent delays), and the largest such slot tail is added to the median. No prediction
is faster than a member alone or than the device's SM time.

Memory, per slot: the members' weights plus the largest peak activation among them (members of
one slot run one after another on one stream, so the caching allocator reuses their activation
blocks), plus ``allocator_margin``; plus one process cost per worker process (a CUDA context on
a GPU, the interpreter's RSS on the CPU; an MPS client on a GPU costs a share of a context,
``MPS_CLIENT_SHARE``, since the MPS server holds what its clients share) and one for the serving
process (on a GPU only when it runs streams). A plan fits when that is at most the device's
free memory minus ``safety_margin``.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from colocate.devices import Device
from colocate.errors import InvalidInputError
from colocate.planning.demands import DemandSet, MemberDemand, demand_set
from colocate.planning.types import MemberPrediction, Prediction, Slot

_MIB = 1 << 20
MIN_MPS_PERCENT = 1.0
"""Smallest MPS active-thread percentage the planner gives a slot."""


class SlotSpec(NamedTuple):
    """A slot before it is named: kind, members in run order, MPS percentage (mps only)."""

    kind: str
    members: tuple[str, ...]
    percent: float | None = None


Layout = tuple[SlotSpec, ...]
"""Slots of a candidate plan, in order; slot ``i`` is named ``s{i}``."""

PairKey = tuple[str, str] | tuple[str, str, str]
"""A measured pair: ``(a, b)`` measured in two stream slots, or ``(a, b, kind)``."""
InterferenceTable = (
    Mapping[tuple[str, str], float] | Mapping[tuple[str, str, str], float] | Mapping[PairKey, float]
)
"""Measured pair slowdowns: ``{(a, b): factor}`` (two stream slots) or ``{(a, b, kind): factor}``."""
MEASURED_KINDS: tuple[str, ...] = ("stream", "process", "mps")
"""Slot kinds a pair can be measured in."""


def measurement_kind(kind_a: str, kind_b: str) -> str | None:
    """The kind of pair measurement that applies to members in slots of ``kind_a`` and ``kind_b``.

    Two stream slots: ``"stream"``. Two worker slots (``process`` or ``mps``): ``"process"``, or
    ``"mps"`` for two mps slots (where an ``mps`` measurement is preferred and a ``process`` one
    is the fallback: both are worker processes with their own interpreter). A stream slot beside
    a worker: None (no measurement applies; the model's prediction stands).
    """
    if kind_a == "stream" or kind_b == "stream":
        return "stream" if kind_a == kind_b else None
    return "mps" if kind_a == kind_b == "mps" else "process"


def slot_name(index: int) -> str:
    """The name of slot ``index`` in a plan."""
    return f"s{index}"


@dataclass(frozen=True)
class Evaluation:
    """The cost model's verdict on one layout (cheap; :meth:`CostModel.predict` gives the full one)."""

    layout: Layout
    throughput_sps: float
    latency_s: float
    latency_p99_s: float
    peak_memory_bytes: int
    memory_limit_bytes: int
    bound: str
    critical_member: str
    slot_end_s: tuple[float, ...]  # per slot: dispatch + its members' finish
    starts_s: tuple[tuple[float, ...], ...]  # per slot, per member
    finishes_s: tuple[tuple[float, ...], ...]
    bounds_s: tuple[tuple[str, float], ...]  # each interval bound

    @property
    def fits(self) -> bool:
        """Whether the predicted peak memory is within the limit."""
        return self.peak_memory_bytes <= self.memory_limit_bytes

    @property
    def workers(self) -> int:
        """Worker processes (process and mps slots)."""
        return sum(1 for s in self.layout if s.kind != "stream")

    @property
    def critical_slot(self) -> int:
        """Index of the slot that finishes last."""
        return max(range(len(self.slot_end_s)), key=lambda i: self.slot_end_s[i])


def _serving_pays(layout: Layout, demands: DemandSet) -> bool:
    """Whether the serving process pays a process cost: on a GPU only with stream slots (its
    CUDA context), on the CPU always (the interpreter and the framework)."""
    return any(s.kind == "stream" for s in layout) or not demands.is_gpu


class _Eff:
    """One member's figures in one kind of slot (what the simulation reads)."""

    __slots__ = ("alone", "bq", "cap", "d", "g", "h", "host", "latency", "rest", "work")

    def __init__(
        self, latency: float, g: float, host: float, fill_eff: float, cap: float, work: float, alone: float
    ) -> None:
        self.latency = latency  # its latency in this slot kind, alone
        self.g = g  # device-busy time
        self.host = host  # host time
        self.rest = max(0.0, latency - max(host, g))
        self.d = (g / latency) * fill_eff  # SM demand rate while running
        self.bq = g / latency  # busy share (for time slicing)
        self.h = host / latency  # host-thread demand rate
        self.cap = cap  # MPS cap stretch of its kernels
        self.work = work  # SM-seconds (whole-device seconds) of its work
        self.alone = alone  # latency alone on the whole device


@dataclass(frozen=True)
class CostModel:
    """Predicts throughput, latency and memory of slot layouts (see the module docstring).

    The fields are the model's constants; the defaults are documented estimates, to be
    calibrated against measured runs. ``interference`` holds measured pairwise slowdowns
    (``{(a, b): factor}`` for a pair measured in two stream slots, ``{(a, b, kind): factor}`` for
    one measured in two slots of ``kind``; factor >= 1 = the pair's time side by side over the
    slower member's alone), which override the model for those pairs in slots of that kind.
    """

    stream_host_capacity: float = 1.0  # host threads' worth of dispatch one interpreter runs at once (GIL)
    # GPU time lost to context switches, per unit of time-sliced time. Calibrated on a lent H200
    # (benchmarks/results/20261127T0540-nvidia-h200-executor-diagnostic.json): five host-bound
    # worker processes at batch 8 took 3.2x the sum of their latencies alone.
    time_slice_overhead: float = 2.2
    # Whether mps slots overlap on the GPU as MPS documents. False until a measurement shows it:
    # on the lent H200 five MPS workers ran no faster than five time-sliced processes
    # (benchmarks/results/20261127T0537-nvidia-h200-compare-report.json), so by default mps
    # layouts are bounded like time-sliced ones.
    trust_mps_overlap: bool = False
    bandwidth_interference: float = 0.10  # slowdown per unit of other kernels' concurrent SM demand
    stream_dispatch_s: float = 20e-6  # handing a request to a stream's thread
    process_dispatch_s: float = 150e-6  # handing a request to a worker process and back (IPC)
    shm_copy_bytes_per_s: float = 8e9  # copying a request into shared memory for the workers
    combine_base_s: float = 20e-6  # gathering and combining the members' outputs
    combine_per_member_s: float = 5e-6
    allocator_margin: float = 0.05  # on top of each slot's memory: allocator rounding, fragmentation
    safety_margin: float = 0.10  # share of the free memory no plan may use
    mps_limit_headroom: float = 0.10  # an mps slot's memory limit: (its need + process cost) x (1 + headroom)
    interference: InterferenceTable | None = field(default=None, compare=False)
    # every member's times x this: how much slower (>1) or faster the machine runs plans now than
    # its profiles say (Calibration.time_scale, from plans run at calibration); 1 = as profiled
    time_scale: float = 1.0
    # members' times in worker slots (process, mps) x this, on top of time_scale: how much faster
    # (<1) or slower plans of worker processes ran at calibration than the model predicts
    # relative to stream plans (Calibration.worker_time_scale). It absorbs what the model cannot
    # see: on a lent H100, eight host-bound members at batch 1 in a process each ran 3.4x the
    # throughput of a Python loop, while the time-slicing bound (contexts' latencies add up,
    # fitted at batch 8 on an H200) predicted a third of it; 1 = as modelled
    worker_time_scale: float = 1.0
    # members' times in a stream slot beside other slots x this, on top of time_scale: how much
    # slower (>1) or faster plans of several stream slots ran at calibration than the model
    # predicts relative to the loop (Calibration.stream_time_scale). On a lent H100, eight
    # CUDA-graph members in a stream slot each ran at 0.6-0.8x the loop where the model, seeing no
    # host work to contend for, predicted 3.2x (one calibration: 4.0); on this project's 2-core
    # CPU it ranged 0.3-2.1 over the recorded runs; 1 = as modelled
    stream_time_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("time_scale", "worker_time_scale", "stream_time_scale"):
            value = getattr(self, name)
            if not value > 0:
                raise InvalidInputError(f"CostModel.{name} must be positive, got {value!r}")
        for name in ("stream_host_capacity", "shm_copy_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise InvalidInputError(f"CostModel.{name} must be positive")
        for name in (
            "time_slice_overhead",
            "bandwidth_interference",
            "stream_dispatch_s",
            "process_dispatch_s",
            "combine_base_s",
            "combine_per_member_s",
            "allocator_margin",
            "mps_limit_headroom",
        ):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"CostModel.{name} must be >= 0")
        if not 0 <= self.safety_margin < 1:
            raise InvalidInputError("CostModel.safety_margin must be in [0, 1)")
        if self.interference is not None:
            table: dict[tuple[str, str, str], float] = {}
            items: list[tuple[object, object]] = list(dict(self.interference).items())
            for key, value in items:
                if not (
                    isinstance(key, tuple) and len(key) in (2, 3) and all(isinstance(k, str) for k in key)
                ):
                    raise InvalidInputError(
                        "interference table keys must be (member, member) or (member, member, kind), "
                        f"got {key!r}"
                    )
                a, b = str(key[0]), str(key[1])
                kind = str(key[2]) if len(key) == 3 else "stream"
                if a == b:
                    raise InvalidInputError(f"interference pair {key!r} names one member twice")
                if kind not in MEASURED_KINDS:
                    raise InvalidInputError(
                        f"interference pair {key!r}: unknown slot kind {kind!r}; "
                        f"choose one of {', '.join(MEASURED_KINDS)}"
                    )
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise InvalidInputError(
                        f"interference {key!r}: slowdown must be a positive number, got {value!r}"
                    )
                table[(min(a, b), max(a, b), kind)] = float(value)
            object.__setattr__(self, "interference", table)

    # -- public -------------------------------------------------------------------------

    def memory_limit_bytes(self, demands: DemandSet) -> int:
        """Memory a plan may use: free memory minus the safety margin."""
        return int(demands.memory_available_bytes * (1.0 - self.safety_margin))

    def slot_memory_bytes(self, members: Sequence[str], demands: DemandSet) -> int:
        """Memory of one slot's members: weights + the largest activation, + allocator margin."""
        weights = sum(demands[m].weights_bytes for m in members)
        activation = max(demands[m].activation_bytes for m in members)
        return math.ceil((weights + activation) * (1.0 + self.allocator_margin))

    def peak_memory_bytes(self, layout: Layout, demands: DemandSet) -> int:
        """Predicted peak memory of a layout: slots + what its processes cost."""
        total = sum(self.slot_memory_bytes(s.members, demands) for s in layout)
        return total + self.process_memory_bytes(layout, demands)

    def process_memory_bytes(self, layout: Layout, demands: DemandSet) -> int:
        """What a layout's processes cost beyond their members: each worker's
        (:meth:`DemandSet.worker_bytes`: an MPS client's on a GPU is a share of a context), and
        the serving process's when it pays one (:meth:`processes`)."""
        workers = sum(demands.worker_bytes(s.kind) for s in layout)
        return workers + (demands.process_bytes if _serving_pays(layout, demands) else 0)

    def processes(self, layout: Layout, demands: DemandSet) -> int:
        """Processes that pay a process cost: the workers, and the serving process.

        On a GPU the serving process pays (a CUDA context) only when it runs stream slots; on
        the CPU it always does, since it holds the interpreter and the framework whatever it
        runs (measured: the serving process's resident set is part of every plan's peak).
        """
        workers = sum(1 for s in layout if s.kind != "stream")
        return workers + int(_serving_pays(layout, demands))

    def mps_memory_limit_bytes(self, members: Sequence[str], demands: DemandSet) -> int:
        """CUDA_MPS_PINNED_DEVICE_MEM_LIMIT for an mps slot, in whole MiB.

        What the plan budgets for that client (its members' memory plus the per-process cost, since
        library workspaces outside the framework's allocator count against the limit too), with
        ``mps_limit_headroom`` on top so the limit guards the device without failing a member
        whose figures were a little low.
        """
        budget = self.slot_memory_bytes(members, demands) + demands.process_bytes
        need = budget * (1.0 + self.mps_limit_headroom)
        return math.ceil(need / _MIB) * _MIB

    def engine(self, demands: DemandSet) -> Engine:
        """An evaluator bound to ``demands`` that caches per-member figures (for searches)."""
        return Engine(self, demands)

    def evaluate(self, layout: Layout, demands: DemandSet) -> Evaluation:
        """The verdict on one layout."""
        return Engine(self, demands).evaluate(layout)

    def predict(
        self,
        slots: Sequence[Slot] | Layout,
        demands: DemandSet | Mapping[str, MemberDemand] | Sequence[MemberDemand],
        device: Device | None = None,
        batch_size: int | None = None,
    ) -> Prediction:
        """Predict a plan: its throughput, latency (median, p99), peak memory and each member.

        Args:
            slots: the plan's slots (or a layout of :class:`SlotSpec`).
            demands: a :class:`DemandSet` (from :func:`member_demands`), or member demands by
                name (then ``device`` and ``batch_size`` are required and the default process
                cost applies).
            device: the device, when ``demands`` is not a DemandSet.
            batch_size: the batch size, when ``demands`` is not a DemandSet.
        """
        demand_set_ = _as_demand_set(demands, device, batch_size)
        layout = as_layout(slots)
        return Engine(self, demand_set_).prediction(layout)


def _as_demand_set(
    demands: DemandSet | Mapping[str, MemberDemand] | Sequence[MemberDemand],
    device: Device | None,
    batch_size: int | None,
) -> DemandSet:
    if isinstance(demands, DemandSet):
        return demands
    if device is None or batch_size is None:
        raise InvalidInputError("predict() needs device and batch_size when demands is not a DemandSet")
    items = list(demands.values()) if isinstance(demands, Mapping) else list(demands)
    return demand_set(device, batch_size, items)


def as_layout(slots: Sequence[Slot] | Layout) -> Layout:
    """Slots (or slot specs) as a :data:`Layout`."""
    out: list[SlotSpec] = []
    for s in slots:
        if isinstance(s, Slot):
            out.append(SlotSpec(s.kind, tuple(s.members), s.thread_percentage))
        elif isinstance(s, SlotSpec):
            out.append(s)
        else:
            raise InvalidInputError(f"expected Slot objects, got {type(s).__name__}")
    return tuple(out)


def mps_percentages(groups: Sequence[Sequence[str]], demands: DemandSet) -> tuple[float, ...]:
    """MPS thread percentages for slots running ``groups``: proportional to their SM work.

    A slot's weight is its members' ``busy x fill x latency`` (SM-seconds), so GPU-bound parts
    of the slots finish together (the fork-join balance) and the straggler gets the largest
    share. No slot gets more than its widest member's fill (more would sit idle) nor less than
    :data:`MIN_MPS_PERCENT`; what a capped slot leaves goes to the others. The percentages are
    whole-ish (one decimal) and sum to at most 100.
    """
    n = len(groups)
    if n == 0:
        return ()
    floor = min(MIN_MPS_PERCENT, 100.0 / n)
    weights = [max(sum(demands[m].sm_seconds for m in g), 1e-12) for g in groups]
    caps = [max(floor, 100.0 * max(demands[m].sm_fill for m in g)) for g in groups]
    shares = [0.0] * n
    free = set(range(n))
    budget = 100.0
    while free:
        total = sum(weights[i] for i in free)
        capped = [i for i in free if budget * weights[i] / total >= caps[i]]
        if not capped:
            for i in free:
                shares[i] = budget * weights[i] / total
            break
        for i in capped:
            shares[i] = caps[i]
            budget -= caps[i]
            free.discard(i)
        if budget <= 0:
            break
    shares = [max(floor, s) for s in shares]
    total = sum(shares)
    if total > 100.0:
        shares = [s * 100.0 / total for s in shares]
    out = [max(floor, math.floor(s * 10.0) / 10.0) for s in shares]
    while sum(out) > 100.0 + 1e-9:  # the floors pushed it over: trim the largest
        i = max(range(n), key=lambda k: out[k])
        out[i] = round(out[i] - 0.1, 1)
    return tuple(out)


class Engine:
    """Evaluates layouts for one :class:`DemandSet`, caching per-member figures."""

    def __init__(self, model: CostModel, demands: DemandSet) -> None:
        self.model = model
        self.demands = demands.scaled(model.time_scale)
        self.gpu = demands.is_gpu
        self.limit = model.memory_limit_bytes(demands)
        self._eff: dict[tuple[str, str, float | None, bool], _Eff] = {}
        self._pairs: dict[tuple[str, str], float] = {}
        self._slot_mem: dict[tuple[str, ...], int] = {}
        # a slot's figures in a layout of n slots, and the last layout's bounds: a search bounds
        # then evaluates the same layout, and meets the same slots in many layouts
        self._effs_of_slot: dict[tuple[SlotSpec, int], tuple[_Eff, ...]] = {}
        self._sums_of_slot: dict[tuple[SlotSpec, int], tuple[float, float, float]] = {}
        self._last_bounds: tuple[Layout, tuple[list[float], float, list[tuple[str, float]]]] | None = None
        self._last_interval: (
            tuple[Layout, tuple[_Sim, list[float], float, list[tuple[str, float]], list[float], str, float]]
            | None
        ) = None
        self._floors: dict[
            tuple[tuple[str, ...], int, tuple[str, ...]], tuple[float, float, float, float]
        ] = {}
        self._inputs: dict[tuple[str, ...], int] = {}
        self._every_layout_fits: bool | None = None
        # normalised by CostModel.__post_init__: (a, b, kind) with a < b
        table = typing.cast("Mapping[tuple[str, str, str], float]", model.interference or {})
        unknown = sorted({m for (a, b, _) in table for m in (a, b)} - set(demands.names))
        if unknown:
            raise InvalidInputError(
                f"interference table names unknown member(s) {unknown}; members: {', '.join(demands.names)}"
            )
        self._measured: dict[tuple[str, str, str], float] = dict(table)
        self._paired = frozenset(m for (a, b, _) in table for m in (a, b))  # members with a measurement
        self.evaluations = 0

    # -- figures ------------------------------------------------------------------------

    def eff(self, name: str, kind: str, percent: float | None, slots: int = 1) -> _Eff:
        """A member's effective figures in a slot of ``kind`` (``percent`` for mps) in a layout
        of ``slots`` slots: on the CPU a stream or process slot runs its members at the threads
        the executor gives it (:func:`cpu_threads_per_slot`), so their latency and core share
        are taken at that many threads."""
        threads = cpu_threads_per_slot(self.demands.cores, slots) if not self.gpu and kind != "mps" else None
        beside_others = kind == "stream" and slots > 1
        key = (name, kind, percent if kind == "mps" else threads, beside_others)
        cached = self._eff.get(key)
        if cached is not None:
            return cached
        d = self.demands[name]
        # the calibrated corrections for worker slots and for stream slots beside other slots
        # (CostModel.worker_time_scale, CostModel.stream_time_scale)
        if kind != "stream":
            scale = self.model.worker_time_scale
        else:
            scale = self.model.stream_time_scale if beside_others else 1.0
        latency = d.latency_s * scale
        busy = d.busy_s * scale
        if self.gpu:
            fill = d.sm_fill
            host_s = d.host_s * scale
            if kind == "mps":
                p = (percent or 100.0) / 100.0
                e = _Eff(latency, busy, host_s, min(fill, p), max(1.0, fill / p), busy * fill, latency)
            else:
                e = _Eff(latency, busy, host_s, fill, 1.0, busy * fill, latency)
        else:
            cores = self.demands.cores
            k = cpu_threads_for(percent, cores) if kind == "mps" else cpu_threads_per_slot(cores, slots)
            if kind == "mps" or k < cores:
                lat_k = d.latency_with_threads(k) * scale
                g = lat_k * d.busy_fraction
                fill_k = min(1.0, k / cores)
            else:
                lat_k, g, fill_k = latency, busy, d.sm_fill
            # stream slots are threads of one interpreter: what of a member cannot run beside the
            # other threads (MemberDemand.interpreter_share) serialises on it
            host = lat_k * d.interpreter_share() if kind == "stream" else 0.0
            e = _Eff(lat_k, g, host, fill_k, 1.0, g * fill_k, latency)
        self._eff[key] = e
        return e

    def slot_effs(self, slot: SlotSpec, slots: int) -> tuple[_Eff, ...]:
        """:meth:`eff` of each of ``slot``'s members, in a layout of ``slots`` slots."""
        key = (slot, slots)
        cached = self._effs_of_slot.get(key)
        if cached is None:
            cached = tuple(self.eff(m, slot.kind, slot.percent, slots) for m in slot.members)
            self._effs_of_slot[key] = cached
        return cached

    def time_sliced(self, worker: str) -> bool:
        """Whether layouts of stream slots and ``worker`` slots are bounded by time slicing (a
        GPU's contexts take turns; MPS clients too unless ``trust_mps_overlap``)."""
        return self.gpu and (worker != "mps" or not self.model.trust_mps_overlap)

    def slot_sums(self, slot: SlotSpec, slots: int) -> tuple[float, float, float]:
        """The slot's members' work, host time and latency, each summed in run order."""
        key = (slot, slots)
        cached = self._sums_of_slot.get(key)
        if cached is None:
            work = host = latency = 0.0
            for e in self.slot_effs(slot, slots):
                work += e.work
                host += e.host
                latency += e.latency
            cached = (work, host, latency)
            self._sums_of_slot[key] = cached
        return cached

    def _largest_input(self, members: tuple[str, ...]) -> int:
        cached = self._inputs.get(members)
        if cached is None:
            cached = max(self.demands[m].input_bytes for m in members)
            self._inputs[members] = cached
        return cached

    def slot_memory(self, members: tuple[str, ...]) -> int:
        cached = self._slot_mem.get(members)
        if cached is None:
            cached = self.model.slot_memory_bytes(members, self.demands)
            self._slot_mem[members] = cached
        return cached

    def peak_memory(self, layout: Layout) -> int:
        total = sum(self.slot_memory(s.members) for s in layout)
        return total + self.model.process_memory_bytes(layout, self.demands)

    def fits(self, layout: Layout) -> bool:
        return self.every_layout_fits() or self.peak_memory(layout) <= self.limit

    def every_layout_fits(self) -> bool:
        """Whether every layout of the members (or of some of them) fits: the most any can need
        is each member in a slot of its own (a slot's memory is its weights plus its largest
        activation, at most the sum of its members' alone), each slot a worker of the costlier
        kind, and the serving process paying too."""
        if self._every_layout_fits is None:
            names = self.demands.names
            worker = max(self.demands.worker_bytes("process"), self.demands.worker_bytes("mps"))
            most = (
                sum(self.slot_memory((m,)) for m in names) + len(names) * worker + self.demands.process_bytes
            )
            self._every_layout_fits = most <= self.limit
        return self._every_layout_fits

    # -- pairs --------------------------------------------------------------------------

    def _pair_layout(self, a: str, b: str, kind: str) -> Layout:
        if kind == "mps":
            pa, pb = mps_percentages([[a], [b]], self.demands)
            return (SlotSpec("mps", (a,), pa), SlotSpec("mps", (b,), pb))
        return (SlotSpec(kind, (a,)), SlotSpec(kind, (b,)))

    def _pair_makespan(self, layout: Layout, factor: float | None) -> float:
        sim = self._simulate(layout, corrected=False, pair_factor=factor)
        return max(sim.finishes[0][0], sim.finishes[1][0])

    def pair_slowdown(self, a: str, b: str, kind: str = "stream") -> float:
        """Model slowdown of ``a`` and ``b`` run side by side in two slots of ``kind`` (>= 1).

        The pair's time (both started together, until both are done) over the slower member's
        time alone: what a calibration run measures as the pair's request latency over the
        slower member's. For ``mps`` the two slots get :func:`mps_percentages`. Measured
        interference is not applied.
        """
        cache_key = (min(a, b) + "\0" + max(a, b), kind)
        cached = self._pairs.get(cache_key)
        if cached is not None:
            return cached
        layout = self._pair_layout(a, b, kind)
        alone = max(self.demands[a].latency_s, self.demands[b].latency_s)
        value = max(1.0, self._pair_makespan(layout, None) / alone)
        self._pairs[cache_key] = value
        return value

    def measured(self, a: str, b: str, kind: str = "stream") -> tuple[float, str] | None:
        """The measurement that applies to ``a`` and ``b`` in two slots of ``kind``, and the kind
        it was measured in; None when the table has none for that kind.

        A stream slot pair takes a ``stream`` measurement only; a process pair a ``process`` one;
        an mps pair an ``mps`` one, else a ``process`` one (both are worker processes).
        """
        first, second = min(a, b), max(a, b)
        for measured_kind in ("mps", "process") if kind == "mps" else (kind,):
            value = self._measured.get((first, second, measured_kind))
            if value is not None:
                return value, measured_kind
        return None

    def measured_pair(self, a: str, b: str, kind: str = "stream") -> float | None:
        """The measured slowdown of the pair in two slots of ``kind``, if the table has one that
        applies (see :meth:`measured`)."""
        found = self.measured(a, b, kind)
        return found[0] if found is not None else None

    def _correction(self, a: str, b: str, kind: str) -> float:
        """The factor on both members' time while side by side in slots of ``kind`` that makes the
        pair take its measured slowdown (found by bisection on the pair in slots of the kind it
        was measured in; 1 when no measurement applies)."""
        found = self.measured(a, b, kind)
        if found is None:
            return 1.0
        measured, measured_kind = found
        key = (min(a, b) + "\0" + max(a, b), "correction:" + measured_kind)
        cached = self._pairs.get(key)
        if cached is not None:
            return cached
        layout = self._pair_layout(a, b, measured_kind)
        target = max(1.0, measured) * max(self.demands[a].latency_s, self.demands[b].latency_s)
        low, high = 0.05, 1.0
        while self._pair_makespan(layout, high) < target and high < 1e3:
            high *= 2.0
        for _ in range(50):
            mid = 0.5 * (low + high)
            if self._pair_makespan(layout, mid) < target:
                low = mid
            else:
                high = mid
        value = 0.5 * (low + high)
        self._pairs[key] = value
        return value

    # -- simulation ---------------------------------------------------------------------

    def _simulate(self, layout: Layout, *, corrected: bool = True, pair_factor: float | None = None) -> _Sim:
        model = self.model
        n = len(layout)
        effs = [self.slot_effs(s, n) for s in layout]
        names = [s.members for s in layout]
        stream = [s.kind == "stream" for s in layout]
        if not self.gpu or any(s.kind == "mps" for s in layout):
            domain = [0] * n
            n_domains = 1
        else:
            domain = []
            n_domains = 1
            for s in layout:
                if s.kind == "stream":
                    domain.append(0)
                else:
                    domain.append(n_domains)
                    n_domains += 1
        multi = n_domains > 1
        correct = (corrected and bool(self._measured)) or pair_factor is not None
        kinds = [s.kind for s in layout]
        beta = model.bandwidth_interference
        slice_cost = 1.0 + model.time_slice_overhead
        cap = model.stream_host_capacity
        host_cores = float(self.demands.host_cores)
        pos = [0] * n
        rem = [1.0] * n
        starts = [[0.0] * len(s.members) for s in layout]
        finishes = [[0.0] * len(s.members) for s in layout]
        active = list(range(n))
        t = 0.0
        while active:
            dsum = [0.0] * n_domains
            occp = [1.0] * n_domains
            gil = 0.0
            worker_host = 0.0
            running = [effs[k][pos[k]] for k in active]  # each active slot's current member
            for k, e in zip(active, running, strict=True):
                dm = domain[k]
                dsum[dm] += e.d
                if multi:  # occupancy matters only between concurrency domains
                    occp[dm] *= 1.0 - e.bq
                if stream[k]:
                    gil += e.h
                else:
                    worker_host += e.h
            k_gil = gil / cap if gil > cap else 1.0
            host_load = (gil if gil < cap else cap) + worker_host
            k_cores = host_load / host_cores if host_load > host_cores else 1.0
            k_stream_host = k_gil if k_gil > k_cores else k_cores
            if multi:
                occ = [1.0 - p for p in occp]
                total_occ = sum(occ)
            best = math.inf
            durations: list[float] = []
            for k, e in zip(active, running, strict=True):
                dm = domain[k]
                demand = dsum[dm]
                others = demand - e.d
                k_gpu = (
                    e.cap
                    * (demand if demand > 1.0 else 1.0)
                    * (1.0 + beta * (others if others < 1.0 else 1.0))
                )
                if multi:
                    k_gpu *= 1.0 + slice_cost * (total_occ - occ[dm])
                a = e.host * (k_stream_host if stream[k] else k_cores)
                b = e.g * k_gpu
                duration = e.rest + (a if a > b else b)
                if correct and (pair_factor is not None or names[k][pos[k]] in self._paired):
                    # a measured pair stretches both while side by side, in whichever concurrency
                    # domains they run, when it was measured in slots of their kinds. Beside
                    # several measured partners a member takes their geometric mean, not their
                    # product: the engine already counts each extra partner's share of the
                    # cores or SMs, and multiplying pair corrections counted it again (on 2
                    # CPU cores, five worker processes were predicted at a third of their speed)
                    me = names[k][pos[k]]
                    log_sum = 0.0
                    partners = 0
                    for o in active:
                        if o == k:
                            continue
                        pair_kind = measurement_kind(kinds[k], kinds[o])
                        if pair_kind is None:
                            continue
                        factor = (
                            pair_factor
                            if pair_factor is not None
                            else self._correction(me, names[o][pos[o]], pair_kind)
                        )
                        if factor != 1.0:
                            log_sum += math.log(factor)
                            partners += 1
                    if partners:
                        duration *= math.exp(log_sum / partners)
                if duration < e.latency and pair_factor is None:
                    duration = e.latency
                durations.append(duration)
                left = rem[k] * duration
                if left < best:
                    best = left
            t += best
            still: list[int] = []
            for k, duration in zip(active, durations, strict=True):
                r = rem[k] - best / duration
                if r <= 1e-9:
                    finishes[k][pos[k]] = t
                    pos[k] += 1
                    if pos[k] < len(effs[k]):
                        starts[k][pos[k]] = t
                        rem[k] = 1.0
                        still.append(k)
                else:
                    rem[k] = r
                    still.append(k)
            active = still
        return _Sim(starts, finishes)

    # -- verdicts -----------------------------------------------------------------------

    def _check(self, layout: Layout) -> None:
        if not layout:
            raise InvalidInputError("a plan needs at least one slot")
        if self.gpu:
            kinds = {s.kind for s in layout}
            if "process" in kinds and "mps" in kinds:
                raise InvalidInputError(
                    "a plan cannot mix 'process' and 'mps' slots on a GPU: under MPS every process "
                    "is an MPS client; use one kind of worker"
                )

    def _bounds(self, layout: Layout) -> tuple[list[float], float, list[tuple[str, float]]]:
        """Per-slot dispatch offsets, the combine time, and the interval bounds that need no
        simulation (a fresh list each call: :meth:`evaluate` replaces the critical path's)."""
        last = self._last_bounds
        if last is not None and last[0] == layout:
            offsets, combine, bounds = last[1]
            return offsets, combine, list(bounds)
        found = self._compute_bounds(layout)
        self._last_bounds = (layout, found)
        offsets, combine, bounds = found
        return offsets, combine, list(bounds)

    def _compute_bounds(self, layout: Layout) -> tuple[list[float], float, list[tuple[str, float]]]:
        model = self.model
        demands = self.demands
        worker_inputs = [self._largest_input(s.members) for s in layout if s.kind != "stream"]
        copy_s = max(worker_inputs) / model.shm_copy_bytes_per_s if worker_inputs else 0.0
        offsets = [
            model.stream_dispatch_s if s.kind == "stream" else model.process_dispatch_s + copy_s
            for s in layout
        ]
        members_n = sum(len(s.members) for s in layout)
        combine = model.combine_base_s + model.combine_per_member_s * members_n
        front = sum(offsets) + combine
        work = 0.0
        stream_host = 0.0
        all_host = 0.0
        serial = 0.0
        domain_work: list[float] = []
        domain_busy: list[float] = []
        main_work = 0.0
        main_busy = 0.0
        has_mps = any(s.kind == "mps" for s in layout)
        time_sliced = self.time_sliced("mps" if has_mps else "process")
        slots = len(layout)
        for i, s in enumerate(layout):
            slot_work, host, latency = self.slot_sums(s, slots)
            serial = max(serial, offsets[i] + latency)
            work += slot_work
            all_host += host
            if s.kind == "stream":
                stream_host += host
                main_work += slot_work
                main_busy = max(main_busy, latency)
            else:
                # a context holds the GPU while it has work queued: for a host-bound member that is
                # its whole latency, not only its kernels' busy time
                domain_work.append(slot_work)
                domain_busy.append(latency)
        bounds: list[tuple[str, float]] = [("critical path", serial)]
        bounds.append(("SM time" if self.gpu else "core time", work))
        if time_sliced and len(domain_work) + (1 if main_busy > 0 else 0) > 1:
            sliced = max(main_work, main_busy) + sum(
                max(w, b) for w, b in zip(domain_work, domain_busy, strict=True)
            )
            bounds.append(("time slicing", sliced * (1.0 + model.time_slice_overhead)))
        bounds.append(("host (GIL)", (stream_host + front) / model.stream_host_capacity))
        bounds.append(("host (CPU cores)", (all_host + front) / max(1, demands.host_cores)))
        return offsets, combine, bounds

    def lower_bound(self, layout: Layout) -> tuple[float, float]:
        """Throughput and latency no better than which ``layout`` can be predicted (no simulation).

        Returns ``(most throughput, least latency)``: members run at least as long as alone.
        """
        _, combine, bounds = self._bounds(layout)
        interval = max(b for _, b in bounds)
        return self.demands.batch_size / interval, interval + combine

    def partition_lower_bound(self, groups: Sequence[tuple[str, ...]]) -> tuple[float, float]:
        """Throughput and latency no better than which *any* layout of these slots can be
        predicted, whatever each slot's kind (stream, process or mps) and MPS share.

        Each bound of :meth:`lower_bound` but time slicing (which only adds to a layout's
        bounds), taken with every slot at its most favourable kind for that bound
        (:meth:`slot_floor`): a lower bound on each bound, so on their maximum, for every kind
        assignment. An exhaustive search skips a partition of the members whose bound cannot win.
        """
        slots = len(groups)
        serial = work = interpreter = host = 0.0
        for group in groups:
            g_serial, g_work, g_interpreter, g_host = self.slot_floor(
                group, slots, ("stream", "process", "mps")
            )
            serial = max(serial, g_serial)
            work += g_work
            interpreter += g_interpreter
            host += g_host
        return self.floor_bound((serial, work, interpreter, host), sum(len(g) for g in groups))

    def floor_bound(
        self, floor: tuple[float, float, float, float], members: int, sliced: float = 0.0
    ) -> tuple[float, float]:
        """The (most throughput, least latency) of a layout of ``members`` members whose slots'
        floors (:meth:`slot_floor`) add up to ``floor``: the critical path (their maximum), then
        the work, the interpreter's and the host's time (their sums); ``sliced``: a floor of the
        time-slicing bound, when one is known. The interval is taken a
        part in a billion lower, so that sums taken in another order than a layout's own bounds
        cannot come out above them by a rounding."""
        model = self.model
        serial, work, interpreter, host = floor
        combine = model.combine_base_s + model.combine_per_member_s * members
        interval = max(
            serial,
            work,
            (interpreter + combine) / model.stream_host_capacity,
            (host + combine) / max(1, self.demands.host_cores),
            sliced,
        ) * (1.0 - 1e-9)
        return self.demands.batch_size / interval, interval + combine

    def slot_floor(
        self, members: tuple[str, ...], slots: int, kinds: tuple[str, ...]
    ) -> tuple[float, float, float, float]:
        """A slot's least contribution, over ``kinds`` and every MPS share, to each bound of
        :meth:`_compute_bounds`: its dispatch plus its latency (the critical path), its work, its
        dispatch plus its interpreter time (the GIL), its dispatch plus its host time (the
        cores). A worker's dispatch is taken without its shared-memory copy (>= 0)."""
        key = (members, slots, kinds)
        cached = self._floors.get(key)
        if cached is not None:
            return cached
        options = []
        for kind in kinds:
            if kind != "mps":
                options.append(SlotSpec(kind, members))
            elif self.gpu:  # an MPS share changes only what the simulation reads, none of these sums
                options.append(SlotSpec("mps", members, 100.0))
            else:  # an mps slot's share is its thread count: each one it can have
                cores = self.demands.cores
                options.extend(SlotSpec("mps", members, 100.0 * t / cores) for t in range(1, cores + 1))
        serial = work = interpreter = host = math.inf
        for spec in options:
            s_work, s_host, s_latency = self.slot_sums(spec, slots)
            stream = spec.kind == "stream"
            offset = self.model.stream_dispatch_s if stream else self.model.process_dispatch_s
            serial = min(serial, offset + s_latency)
            work = min(work, s_work)
            interpreter = min(interpreter, offset + (s_host if stream else 0.0))
            host = min(host, offset + s_host)
        floor = (serial, work, interpreter, host)
        self._floors[key] = floor
        return floor

    def _interval(
        self, layout: Layout
    ) -> tuple[_Sim, list[float], float, list[tuple[str, float]], list[float], str, float]:
        """The simulation of ``layout`` and what it makes of the bounds: (simulation, dispatch
        offsets, combine time, bounds with the simulated critical path, each slot's end, the
        binding bound's name, the interval). The last layout's is kept, so that
        :meth:`throughput_and_latency` then :meth:`evaluate` simulate it once."""
        last = self._last_interval
        if last is not None and last[0] == layout:
            return last[1]
        self._check(layout)
        sim = self._simulate(layout)
        offsets, combine, bounds = self._bounds(layout)
        slot_end = [offsets[i] + sim.finishes[i][-1] for i in range(len(layout))]
        bounds[0] = ("critical path", max(slot_end))
        label, interval = max(bounds, key=lambda b: b[1])
        found = (sim, offsets, combine, bounds, slot_end, label, interval)
        self._last_interval = (layout, found)
        return found

    def throughput_and_latency(self, layout: Layout) -> tuple[float, float]:
        """What :meth:`evaluate` predicts for ``layout``'s throughput and median latency, without
        building the rest of its :class:`Evaluation` (a search drops most layouts on these two)."""
        *_, combine, _, _, _, interval = self._interval(layout)
        return self.demands.batch_size / interval, interval + combine

    def evaluate(self, layout: Layout) -> Evaluation:
        """Throughput, latency, memory and bounds of ``layout``."""
        self.evaluations += 1
        demands = self.demands
        sim, offsets, _, bounds, slot_end, label, _ = self._interval(layout)
        throughput, latency = self.throughput_and_latency(layout)
        critical_slot = max(range(len(layout)), key=lambda i: slot_end[i])
        critical = layout[critical_slot].members[-1]
        latest = slot_end[critical_slot]
        spread = 0.0  # the tail: independent members' tails add in quadrature along a slot
        for i, s in enumerate(layout):
            if slot_end[i] < 0.9 * latest:
                continue
            squares = 0.0
            for j, m in enumerate(s.members):
                extra = (demands[m].p99_ratio - 1.0) * (sim.finishes[i][j] - sim.starts[i][j])
                squares += extra * extra
            spread = max(spread, math.sqrt(squares))
        return Evaluation(
            layout=layout,
            throughput_sps=throughput,
            latency_s=latency,
            latency_p99_s=latency + spread,
            peak_memory_bytes=self.peak_memory(layout),
            memory_limit_bytes=self.limit,
            bound=label,
            critical_member=critical,
            slot_end_s=tuple(slot_end),
            starts_s=tuple(tuple(offsets[i] + t for t in sim.starts[i]) for i in range(len(layout))),
            finishes_s=tuple(tuple(offsets[i] + t for t in sim.finishes[i]) for i in range(len(layout))),
            bounds_s=tuple(bounds),
        )

    def prediction(self, layout: Layout) -> Prediction:
        """The full :class:`Prediction` of ``layout`` (slots named ``s0``, ``s1``, ...)."""
        for s in layout:
            for m in s.members:
                self.demands[m]  # raises for unknown members
        ev = self.evaluate(layout)
        return prediction_from(ev, self)


class _Sim(NamedTuple):
    starts: list[list[float]]
    finishes: list[list[float]]


def cpu_threads_per_slot(cores: int, slots: int) -> int:
    """Threads each of ``slots`` concurrent CPU slots (threads or processes) gets: a fair share.

    Every slot with all the cores would oversubscribe them (each framework thread pool spins up
    ``cores`` threads), which on a small machine is many times slower than sharing them out.
    """
    return max(1, cores // max(1, slots))


def cpu_threads_for(percent: float | None, cores: int) -> int:
    """Threads of a CPU 'mps' slot with ``percent`` % of ``cores`` cores (at least 1)."""
    if percent is None:
        return cores
    return max(1, min(cores, round(percent / 100.0 * cores)))


def prediction_from(ev: Evaluation, engine: Engine) -> Prediction:
    """The :class:`Prediction` for an evaluation."""
    demands = engine.demands
    members: list[MemberPrediction] = []
    for i, s in enumerate(ev.layout):
        for j, m in enumerate(s.members):
            d = demands[m]
            start, finish = ev.starts_s[i][j], ev.finishes_s[i][j]
            alone = d.latency_s
            members.append(
                MemberPrediction(
                    member=m,
                    slot=slot_name(i),
                    alone_s=alone,
                    start_s=start,
                    finish_s=finish,
                    slowdown=max(1.0, (finish - start) / alone) if alone > 0 else 1.0,
                    memory_bytes=d.memory_bytes,
                    source=d.source,
                )
            )
    return Prediction(
        throughput_sps=ev.throughput_sps,
        latency_s=ev.latency_s,
        latency_p99_s=ev.latency_p99_s,
        peak_memory_bytes=ev.peak_memory_bytes,
        critical_member=ev.critical_member,
        bound=ev.bound,
        members=tuple(members),
    )


__all__ = [
    "MEASURED_KINDS",
    "CostModel",
    "Engine",
    "Evaluation",
    "InterferenceTable",
    "Layout",
    "PairKey",
    "SlotSpec",
    "as_layout",
    "cpu_threads_for",
    "cpu_threads_per_slot",
    "measurement_kind",
    "mps_percentages",
    "prediction_from",
    "slot_name",
]
