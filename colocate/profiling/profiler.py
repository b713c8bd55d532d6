"""Measure members: memory, latency, kernel footprint, CPU use, energy, per batch size.

:func:`profile` loads each member once, then for each batch size (ascending)
measures it and records one :class:`~colocate.profiling.types.Profile`. A batch
size that runs out of memory is recorded as such and the run goes on. Results
are cached on disk (see :mod:`colocate.profiling.cache`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from colocate._timing import measure
from colocate.backends import create_runner
from colocate.backends.base import MemberRunner
from colocate.config import DEFAULT_BATCH_SIZES
from colocate.devices import Device
from colocate.ensemble import Ensemble, Member
from colocate.errors import (
    ColocateError,
    InvalidInputError,
    MeasurementError,
    MemberOutOfMemoryError,
)
from colocate.profiling import memory
from colocate.profiling.cache import ProfileCache, cache_key, framework_version, model_hash
from colocate.profiling.types import (
    CpuFootprint,
    EnergyFootprint,
    KernelFootprint,
    MemoryFootprint,
    Profile,
    ProfileSet,
    VariantProfiles,
)

_T = TypeVar("_T")

#: called as progress(done, total, description) after each (member, batch size)
ProgressFn = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ProfileSettings:
    """How hard to measure. Times in seconds."""

    warmup: int = 3  # untimed runs before timing each batch size
    repeats: int = 20  # timed runs (at most)
    max_time_s: float = 2.0  # stop timing a batch size after this much timed time (>= 3 runs)
    trace_batches: int = 5  # batches in the GPU kernel trace / CPU operator trace
    kernels: bool = True  # take a kernel trace on a GPU / operator trace on the CPU
    thread_scaling: bool = True  # on the CPU, time the member at 1..N threads
    energy: bool = True  # on a GPU, measure power and energy with NVML
    energy_min_time_s: float = 0.5  # run back-to-back batches at least this long for energy

    def recorded(self) -> str:
        """The settings that decide which figures a profile holds (part of its cache key): a
        profile taken without the thread scaling, say, is not one asked for with it."""
        return f"kernels={self.kernels} thread_scaling={self.thread_scaling} energy={self.energy}"

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1 or self.trace_batches < 1:
            raise InvalidInputError(
                f"ProfileSettings: need warmup >= 0, repeats >= 1, trace_batches >= 1; got "
                f"{self.warmup}, {self.repeats}, {self.trace_batches}"
            )


def _resolve_members(target: Member | Ensemble | Sequence[Member]) -> tuple[Member, ...]:
    if isinstance(target, Member):
        return (target,)
    if isinstance(target, Ensemble):
        return target.members
    members = tuple(target)
    if not members or not all(isinstance(m, Member) for m in members):
        raise InvalidInputError("profile() takes a Member, an Ensemble or a sequence of Members")
    return members


def _check_batch_sizes(batch_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(sorted(set(batch_sizes)))
    if not sizes or any((not isinstance(b, int)) or b < 1 for b in sizes):
        raise InvalidInputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    return sizes


def versions_for(member: Member, device: Device) -> dict[str, str]:
    """Library versions recorded with a profile."""
    from colocate import __version__

    found = {
        "colocate": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        member.backend: framework_version(member.backend),
    }
    if device.driver_version:
        found["driver"] = device.driver_version
    if device.cuda_version:
        found["cuda"] = device.cuda_version
    return found


def profile(
    target: Member | Ensemble | Sequence[Member],
    device: Device,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    settings: ProfileSettings | None = None,
    cache: ProfileCache | bool = True,
    progress: ProgressFn | None = None,
) -> ProfileSet:
    """Profile each member on ``device`` at each batch size: one Profile per pair.

    Args:
        target: a member, an ensemble, or members.
        device: a real device (the CPU or a CUDA GPU).
        batch_sizes: batch sizes to measure (profiled in ascending order).
        settings: how hard to measure (defaults: :class:`ProfileSettings`).
        cache: True for the user cache, False for none, or a :class:`ProfileCache`.
        progress: called after each (member, batch size) with (done, total, description).

    A batch size that runs out of memory gives a profile with status
    ``"out_of_memory"`` (and the largest batch that fit); the others go on.
    A missing backend package or an input spec that does not match the model
    raises a :class:`~colocate.errors.ColocateError` naming the member.
    """
    members = _resolve_members(target)
    sizes = _check_batch_sizes(batch_sizes)
    chosen = settings or ProfileSettings()
    store = cache if isinstance(cache, ProfileCache) else (ProfileCache() if cache else None)
    if not device.can_execute:
        raise InvalidInputError(
            f"cannot profile on '{device.name}' ({device.kind}); profile on a real device and plan "
            "for the simulated one with recorded profiles"
        )
    total = len(members) * len(sizes)
    done = 0
    results: list[Profile] = []
    for member in members:
        digest = model_hash(member)
        keys = {b: cache_key(member, device, b, digest, chosen.recorded()) for b in sizes}
        cached = {b: store.lookup(keys[b]) for b in sizes} if store is not None else {}
        missing = [b for b in sizes if cached.get(b) is None]
        fresh = _profile_member(member, device, missing, digest, chosen) if missing else {}
        for b in sizes:
            found = cached.get(b)
            if found is not None and found.member != member.name:
                # the cache is keyed by the model, not the name: the same model under another name
                found = dataclasses.replace(found, member=member.name)
            if found is None:
                found = fresh[b]
                if store is not None and found.status != "failed":
                    store.store(keys[b], found)
            results.append(found)
            done += 1
            if progress is not None:
                progress(done, total, f"{member.name} @ batch {b}: {found.status}")
    return ProfileSet(tuple(results))


def _blank_profile(member: Member, device: Device, batch_size: int, digest: str, **fields: Any) -> Profile:
    base: dict[str, Any] = {
        "member": member.name,
        "backend": member.backend,
        "precision": member.precision,
        "batch_size": batch_size,
        "device": device,
        "model_hash": digest,
        "status": "ok",
        "load_time_s": 0.0,
        "latency": None,
        "throughput_sps": 0.0,
        "host_share": None,
        "memory": None,
        "kernels": None,
        "cpu": None,
        "energy": None,
        "versions": versions_for(member, device),
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    base.update(fields)
    return Profile(**base)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemberOutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "failed to allocate memory" in text


def _profile_member(
    member: Member, device: Device, sizes: Sequence[int], digest: str, settings: ProfileSettings
) -> dict[int, Profile]:
    runner = create_runner(member, device)
    probe = _MemoryProbe.for_runner(runner)
    before_load = probe.before_load()
    try:
        runner.activate()
    except ColocateError as exc:
        if not _is_oom(exc):
            raise
        return {
            b: _blank_profile(member, device, b, digest, status="out_of_memory", error=str(exc))
            for b in sizes
        }
    results: dict[int, Profile] = {}
    largest_ok: int | None = None
    try:
        weights = probe.after_load(before_load)
        for batch_size in sizes:
            try:
                result = _profile_batch(runner, probe, weights, batch_size, digest, settings)
                largest_ok = batch_size
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                probe.recover()
                result = _blank_profile(
                    member,
                    device,
                    batch_size,
                    digest,
                    status="out_of_memory",
                    load_time_s=runner.load_time_s or 0.0,
                    error=str(exc),
                    max_fitting_batch=largest_ok,
                )
            results[batch_size] = result
    finally:
        runner.deactivate()
    return results


_COMPILE_NOTE = "torch.compile: the first call at batch"


def compile_seconds(profile: Profile) -> float | None:
    """How long the first call of a ``compile`` torch member took at this batch size, compiling
    included (from the profile's note; None for a member that was not compiled)."""
    for note in profile.notes:
        if note.startswith(_COMPILE_NOTE):
            return float(note.rsplit(" compiled in ", 1)[1].removesuffix(" s"))
    return None


def _first_run(runner: MemberRunner, batch_size: int) -> Any:
    member = runner.member
    batch = member.input.example(batch_size)
    prepared = runner.prepare(batch)
    try:
        output = runner.to_numpy(runner.run(prepared))
    except ColocateError:
        raise
    except Exception as exc:
        if _is_oom(exc):
            raise MemberOutOfMemoryError(str(exc), member=member.name, batch_size=batch_size) from exc
        raise InvalidInputError(
            f"member '{member.name}': running a batch of shape {batch.shape} ({batch.dtype}) failed "
            f"with {type(exc).__name__}: {exc}; check that its InputSpec matches the model"
        ) from exc
    if output.ndim < 1 or output.shape[0] != batch_size:
        raise InvalidInputError(
            f"member '{member.name}': output shape {output.shape} does not start with the batch size "
            f"{batch_size}; the model must return (batch, ...)"
        )
    return prepared


def _profile_batch(
    runner: MemberRunner,
    probe: _MemoryProbe,
    weights_bytes: int,
    batch_size: int,
    digest: str,
    settings: ProfileSettings,
) -> Profile:
    member, device = runner.member, runner.device
    notes: list[str] = list(probe.notes)
    probe.start_peak()
    prepared = _first_run(runner, batch_size)
    compiled_s = getattr(runner, "compile_seconds", {}).get(tuple(getattr(prepared, "shape", ())))
    if compiled_s is not None:
        notes.append(f"{_COMPILE_NOTE} {batch_size} compiled in {compiled_s:.3f} s")
    mem = probe.footprint(weights_bytes, functools.partial(runner.run, prepared))

    launch_s: list[float] = []

    def launch() -> None:
        start = time.perf_counter()
        runner.run(prepared)
        launch_s.append(time.perf_counter() - start)

    cpu_before = time.process_time()  # every thread's CPU time, in ns steps (os.times: 10 ms)
    wall_before = time.perf_counter()
    latency = measure(
        launch,
        sync=runner.synchronize,
        warmup=settings.warmup,
        repeats=settings.repeats,
        max_time_s=settings.max_time_s,
    )
    wall = time.perf_counter() - wall_before
    cpu_after = time.process_time()
    timed_launches = launch_s[-len(latency.samples_s) :]
    host_share = None
    if device.kind == "cuda":
        host_share = min(1.0, float(np.median(timed_launches)) / latency.median_s)

    kernels: KernelFootprint | None = None
    cpu: CpuFootprint | None = None
    energy: EnergyFootprint | None = None
    if device.kind == "cuda":
        if settings.kernels:
            kernels = _trace_kernels(runner, prepared, settings, notes)
        if settings.energy:
            energy = _measure_energy(runner, prepared, batch_size, settings, notes)
        if settings.kernels and kernels is None and energy is not None:
            kernels = nvml_busy_footprint(energy)
    else:
        threads = _threads_of(runner)
        busy = (cpu_after - cpu_before) / max(wall * threads, 1e-12)
        top_ops: tuple[tuple[str, float], ...] = ()
        if settings.kernels and member.backend == "torch":
            from colocate.profiling.kernels import cpu_trace

            top_ops, _ = cpu_trace(functools.partial(runner.run, prepared), batches=settings.trace_batches)
        scaling = _thread_scaling(runner, prepared, settings) if settings.thread_scaling else ()
        cpu = CpuFootprint(
            threads=threads,
            busy_share=min(1.0, max(0.0, busy)),
            thread_scaling=scaling,
            top_ops=top_ops,
        )
    return _blank_profile(
        member,
        device,
        batch_size,
        digest,
        load_time_s=runner.load_time_s or 0.0,
        latency=latency,
        throughput_sps=batch_size / latency.median_s if latency.median_s > 0 else 0.0,
        host_share=host_share,
        memory=mem,
        kernels=kernels,
        cpu=cpu,
        energy=energy,
        notes=tuple(notes),
    )


def _trace_kernels(
    runner: MemberRunner, prepared: Any, settings: ProfileSettings, notes: list[str]
) -> KernelFootprint | None:
    from colocate.profiling.kernels import trace_gpu

    sm_count = runner.device.sm_count or _torch_sm_count(runner.device.index)
    try:
        return trace_gpu(
            functools.partial(runner.run, prepared),
            runner.synchronize,
            batches=settings.trace_batches,
            sm_count=sm_count,
        )
    except (MeasurementError, RuntimeError) as exc:
        notes.append(f"kernel trace unavailable: {exc}")
        return None


def nvml_busy_footprint(energy: EnergyFootprint) -> KernelFootprint | None:
    """A coarse kernel footprint from NVML's "GPU busy" share, when no kernel trace can be had.

    Only ``busy_fraction`` is known (the share of time any kernel ran); kernel counts, gaps and
    grids are unknown and left at 0, and ``source`` says so.
    """
    if energy.utilization_pct is None:
        return None
    return KernelFootprint(
        source="nvml sampling (no kernel trace: only busy_fraction is measured)",
        traced_batches=0,
        kernels_per_batch=0.0,
        kernel_time_s=0.0,
        busy_fraction=min(1.0, max(0.0, energy.utilization_pct / 100.0)),
        launch_gap_median_s=0.0,
        launch_gap_p90_s=0.0,
        max_grid_blocks=0,
        typical_grid_blocks=0,
        sm_fill=0.0,
        occupancy_pct=None,
        first_kernel_delay_s=0.0,
    )


def _measure_energy(
    runner: MemberRunner, prepared: Any, batch_size: int, settings: ProfileSettings, notes: list[str]
) -> EnergyFootprint | None:
    from colocate.profiling.sampler import NvmlSampler, nvml_index

    batches = 0
    with NvmlSampler(nvml_index(runner.device)) as sampler:
        start = time.perf_counter()
        while time.perf_counter() - start < settings.energy_min_time_s:
            for _ in range(8):
                runner.run(prepared)
            runner.synchronize()
            batches += 8
    result = sampler.result(batches * batch_size)
    if result is None:
        notes.append(f"energy unavailable: {sampler.unavailable_reason}")
    return result


def _torch_sm_count(index: int) -> int:
    import torch

    return int(torch.cuda.get_device_properties(index).multi_processor_count)


def _threads_of(runner: MemberRunner) -> int:
    if runner.member.backend == "torch":
        import torch

        return int(torch.get_num_threads())
    configured = int(runner.member.options.get("intra_op_num_threads", 0) or 0)
    return configured if configured > 0 else max(1, runner.device.cpu_cores)


def thread_counts(cores: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``cores``, and ``cores`` itself."""
    counts = {cores}
    k = 1
    while k < cores:
        counts.add(k)
        k *= 2
    return tuple(sorted(counts))


def _thread_scaling(
    runner: MemberRunner, prepared: Any, settings: ProfileSettings
) -> tuple[tuple[int, float], ...]:
    cores = max(1, runner.device.cpu_cores)
    reps = max(3, settings.repeats // 2)
    results: list[tuple[int, float]] = []
    if runner.member.backend == "torch":
        import torch

        original = torch.get_num_threads()
        try:
            for k in thread_counts(cores):
                torch.set_num_threads(k)
                stats = measure(
                    functools.partial(runner.run, prepared),
                    warmup=1,
                    repeats=reps,
                    max_time_s=settings.max_time_s / 2,
                )
                results.append((k, stats.median_s))
        finally:
            torch.set_num_threads(original)
        return tuple(results)
    batch = runner.member.input.example(int(prepared.shape[0]))
    for k in thread_counts(cores):
        options = {**runner.member.options, "intra_op_num_threads": k}
        variant = dataclasses.replace(runner.member, options=options)
        with create_runner(variant, runner.device) as other:
            staged = other.prepare(batch)
            stats = measure(
                functools.partial(other.run, staged),
                warmup=1,
                repeats=reps,
                max_time_s=settings.max_time_s / 2,
            )
        results.append((k, stats.median_s))
    return tuple(results)


class _MemoryProbe:
    """Reads a member's memory with the best counters its backend and device offer."""

    def __init__(self, runner: MemberRunner) -> None:
        self.runner = runner
        self.notes: list[str] = []
        self._peak_reset = False

    @staticmethod
    def for_runner(runner: MemberRunner) -> _MemoryProbe:
        if runner.device.kind == "cuda":
            return _CudaMemoryProbe(runner)
        return _MemoryProbe(runner)

    # CPU ----------------------------------------------------------------------

    def before_load(self) -> int:
        return memory.rss_bytes()

    def after_load(self, before: int) -> int:
        """Weights bytes of the loaded member."""
        self._rss_after_load = memory.rss_bytes()
        self._rss_load_delta = max(0, self._rss_after_load - before)
        model = getattr(self.runner, "model", None)
        if self.runner.member.backend == "torch" and model is not None:
            return memory.torch_module_bytes(model)
        path = self.runner.member.source_path
        if path is not None:
            return memory.model_file_bytes(path)
        return self._rss_load_delta

    def start_peak(self) -> None:
        self._peak_reset = memory.reset_peak_rss()
        self._rss_before_run = memory.rss_bytes()

    def footprint(self, weights: int, run_batch: Callable[[], object]) -> MemoryFootprint:
        """Memory after the first run of a batch; ``run_batch`` runs it once more if needed."""
        if self.runner.member.backend == "torch":
            from colocate.profiling.kernels import cpu_trace

            _, peak = cpu_trace(run_batch, batches=1)
            source = "torch parameters + torch profiler allocations; RSS for the process"
        else:
            peak_rss = memory.peak_rss_bytes() if self._peak_reset else None
            peak = max(0, (peak_rss or memory.rss_bytes()) - self._rss_after_load)
            source = "model file size + peak RSS above the loaded state"
        return MemoryFootprint(
            weights_bytes=weights,
            peak_activation_bytes=int(peak),
            reserved_unused_bytes=0,
            process_bytes=self._rss_load_delta,
            source=source,
        )

    def recover(self) -> None:
        """Free what a failed (out-of-memory) batch left behind."""


class _CudaMemoryProbe(_MemoryProbe):
    def __init__(self, runner: MemberRunner) -> None:
        super().__init__(runner)
        import torch

        self._counters = memory.TorchCudaCounters(torch, runner.device.index)
        self._torch_member = runner.member.backend == "torch"
        if not self._torch_member:
            self.notes.append(
                "memory from device-wide used memory (mem_get_info) deltas: other processes on "
                "the GPU disturb it"
            )

    def before_load(self) -> int:
        self._counters.synchronize()
        return self._counters.allocated() if self._torch_member else self._counters.device_used()

    def after_load(self, before: int) -> int:
        self._counters.synchronize()
        if self._torch_member:
            self._after_load = self._counters.allocated()
        else:
            self._after_load = self._counters.device_used()
        self._process_after_load = _nvml_process_bytes(self.runner.device)
        return max(0, self._after_load - before)

    def start_peak(self) -> None:
        self._counters.synchronize()
        self._counters.reset_peak()
        self._used_before_run = self._counters.device_used()

    def footprint(self, weights: int, run_batch: Callable[[], object]) -> MemoryFootprint:
        self._counters.synchronize()
        process = _nvml_process_bytes(self.runner.device)
        if self._torch_member:
            peak = max(0, self._counters.peak_allocated() - self._after_load)
            unused = max(0, self._counters.peak_reserved() - self._counters.peak_allocated())
            source = "torch.cuda allocator statistics; NVML per-process for the process"
        else:
            peak = max(0, self._counters.device_used() - self._after_load)
            unused = 0
            source = "device used memory (mem_get_info) deltas; NVML per-process for the process"
            engine_scratch = getattr(self.runner, "engine_device_memory_bytes", None)
            if isinstance(engine_scratch, int):  # TensorRT: the context's scratch memory is exact
                peak = max(peak, engine_scratch)
                source = "TensorRT engine device memory (device_memory_size_v2) and used-memory deltas"
            pool_used = getattr(self.runner, "pool_used_bytes", None)
            if callable(pool_used):  # CuPy: what the pool holds for live arrays, for cross-checking
                self.notes.append(f"CuPy pool held {int(pool_used())} bytes after the first batch")
        return MemoryFootprint(
            weights_bytes=weights,
            peak_activation_bytes=int(peak),
            reserved_unused_bytes=int(unused),
            process_bytes=process,
            source=source,
        )

    def recover(self) -> None:
        import torch

        torch.cuda.synchronize(self.runner.device.index)
        torch.cuda.empty_cache()


def _nvml_process_bytes(device: Device) -> int | None:
    from colocate.profiling.sampler import nvml_index, process_gpu_memory_bytes

    return process_gpu_memory_bytes(nvml_index(device))


def _profile_child(
    members: tuple[Member, ...],
    device: Device,
    sizes: tuple[int, ...],
    settings: ProfileSettings,
    out_path: str,
) -> None:
    """Spawned child of :func:`profile_isolated`: profile, write the set, exit."""
    from colocate import serde

    serde.save(profile(members, device, sizes, settings=settings, cache=True), out_path)


def profile_isolated(
    target: Member | Ensemble | Sequence[Member],
    device: Device,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    settings: ProfileSettings | None = None,
    timeout_s: float = 1800.0,
) -> ProfileSet:
    """:func:`profile` in a spawned child process (results also land in the user cache).

    Framework work done in a process slows the stream slots it runs afterwards (measured on the
    CPU: a sequential plan at a third of its speed after the members ran once in the main
    thread; on a GPU the CUPTI trace stays attached too), so a process that goes on to serve or
    compare plans should profile apart.
    Falls back to profiling here when the members cannot be sent to a child (they do not pickle).
    """
    import pickle

    members = _resolve_members(target)
    sizes = _check_batch_sizes(batch_sizes)
    chosen = settings or ProfileSettings()
    try:
        pickle.dumps(members)
    except Exception:
        return profile(members, device, sizes, settings=chosen)
    return _in_child(
        _profile_child,
        (members, device, sizes, chosen),
        ProfileSet,
        timeout_s=timeout_s,
        rerun_hint="run colocate.profiling.profile(...) in this process to see the error",
    )


def profile_variants(
    target: Member | Ensemble | Sequence[Member],
    device: Device,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    *,
    backends: str | Sequence[str] = "auto",
    settings: ProfileSettings | None = None,
    isolated: bool = True,
    cache: ProfileCache | bool = True,
    onnx_dir: str | None = None,
    progress: ProgressFn | None = None,
) -> VariantProfiles:
    """Profile each member under each of its backend variants (:mod:`colocate.variants`).

    Every variant usable on ``device`` (``backends="auto"``) or named (``"torch,onnxruntime"``;
    the member as given is always profiled too) is profiled at every batch size. Torch members
    are exported to ONNX once for the ONNX-based variants (cached on disk). Profiles are cached
    like :func:`profile`'s: the key holds the backend and its options, so the variants of one
    model never share an entry.

    Args:
        isolated: list, export and profile the variants in a spawned child process (the user
            cache; see :func:`profile_isolated`), so that this process imports no framework;
            False does it here with ``cache`` (and reports ``progress``).

    Raises:
        UnknownBackendError: an unknown label in ``backends``.
        ExportError: a named ONNX-based variant for a member that cannot be exported.
    """
    from colocate.variants import backend_variants, variant_label, variant_labels

    members = _resolve_members(target)
    sizes = _check_batch_sizes(batch_sizes)
    for member in members:
        variant_labels(member, device, backends)  # bad input fails here, before a child starts
    if isolated and _picklable(members):
        return _in_child(
            _variants_child,
            (members, device, sizes, settings or ProfileSettings(), backends, onnx_dir),
            VariantProfiles,
            timeout_s=1800.0,
        )
    flat: list[tuple[str, Member]] = []
    for member in members:
        variants_of = backend_variants(member, device, backends, onnx_dir=onnx_dir)
        flat.extend((v.label, v.member) for v in variants_of)
    variants = [m for _, m in flat]
    measured = profile(variants, device, sizes, settings=settings, cache=cache, progress=progress)
    per_member = len(sizes)
    if len(measured.profiles) != per_member * len(flat):
        raise MeasurementError(
            f"profiling {len(flat)} variant(s) at {len(sizes)} batch size(s) gave "
            f"{len(measured.profiles)} profiles; this is a bug in colocate"
        )
    grouped: dict[str, list[Profile]] = {}
    for i, (label, member) in enumerate(flat):
        chunk = measured.profiles[i * per_member : (i + 1) * per_member]
        grouped.setdefault(label, []).extend(dataclasses.replace(p, member=member.name) for p in chunk)
    return VariantProfiles(
        sets={label: ProfileSet(tuple(found)) for label, found in grouped.items()},
        defaults={m.name: variant_label(m) for m in members},
    )


def _picklable(members: Sequence[Member]) -> bool:
    import pickle

    try:
        pickle.dumps(tuple(members))
    except Exception:
        return False
    return True


def _variants_child(
    members: tuple[Member, ...],
    device: Device,
    sizes: tuple[int, ...],
    settings: ProfileSettings,
    backends: str | Sequence[str],
    onnx_dir: str | None,
    out_path: str,
) -> None:
    """Spawned child of :func:`profile_variants`: export, profile, write the result or the error."""
    from pathlib import Path

    from colocate import serde

    try:
        found = profile_variants(
            members, device, sizes, backends=backends, settings=settings, isolated=False, onnx_dir=onnx_dir
        )
    except ColocateError as exc:
        Path(out_path).with_suffix(".error").write_text(f"{type(exc).__name__}: {exc}", encoding="utf-8")
        raise
    serde.save(found, out_path)


def _in_child(
    target: Callable[..., None],
    args: tuple[Any, ...],
    result_type: type[_T],
    *,
    timeout_s: float,
    rerun_hint: str = "run it with isolated=False to see the error in this process",
) -> _T:
    """Run ``target(*args, out_path)`` in a spawned child; load its ``result_type`` from ``out_path``.

    A child that fails may leave its error in ``out_path`` with the suffix ``.error``; the
    raised error quotes it, or the exit code, and ``rerun_hint``.
    """
    import multiprocessing
    import tempfile
    from pathlib import Path

    from colocate import serde

    with tempfile.TemporaryDirectory(prefix="colocate-profile-") as tmp:
        out_path = f"{tmp}/result.json"
        context = multiprocessing.get_context("spawn")
        child = context.Process(target=target, args=(*args, out_path), daemon=True)
        child.start()
        child.join(timeout_s)
        if child.is_alive():
            child.kill()
            raise MeasurementError(f"profiling in a child process took over {timeout_s:g} s; stopped it")
        if child.exitcode != 0:
            error = Path(out_path).with_suffix(".error")
            why = error.read_text(encoding="utf-8") if error.is_file() else f"exit code {child.exitcode}"
            raise MeasurementError(f"profiling in a child process failed ({why}); {rerun_hint}")
        return serde.load(result_type, out_path)
