"""Drive an executor with a steady stream of requests and measure it: :func:`run_requests`.

The same procedure for every plan, so that ``compare`` can put the results side
by side: warm-up requests first (not counted), then ``concurrency`` requests
kept in flight until ``requests`` have been submitted or ``seconds`` have
passed; every answer is waited for. Latency is each request's submit-to-combined
time; throughput is completed samples over the wall time from the first counted
submit to the last counted answer. Memory: each process's peak resident set
(``VmHWM``) on the CPU; on a GPU also each process's GPU memory from NVML,
sampled while the requests run, with NVML utilisation and power samples.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from colocate._timing import LatencyStats
from colocate.ensemble import Array, Ensemble
from colocate.errors import InvalidInputError
from colocate.execution.types import ProcessMemory, RunResult, RunStatus

if TYPE_CHECKING:
    from concurrent.futures import Future

    from colocate.execution.front import Executor
    from colocate.execution.types import EnsembleResult
    from colocate.planning.types import Plan

DEFAULT_REQUESTS = 100  # requests run when neither requests nor seconds is given
MAX_ERRORS_KEPT = 10
Progress = Callable[[int, "int | None"], None]


def default_batch(ensemble: Ensemble, batch_size: int, seed: int = 0) -> Array:
    """A reproducible random batch that every member accepts.

    Raises:
        InvalidInputError: the members take different inputs (pass a batch yourself).
    """
    first = ensemble.members[0]
    for member in ensemble.members[1:]:
        if member.input.shape[1:] != first.input.shape[1:] or member.input.dtype != first.input.dtype:
            raise InvalidInputError(
                f"ensemble '{ensemble.name}': members '{first.name}' and '{member.name}' take different "
                f"inputs ({first.input.shape}, {first.input.dtype} vs {member.input.shape}, "
                f"{member.input.dtype}); pass batch=... explicitly"
            )
    return first.input.example(batch_size, seed=seed)


def worker_context_notes(plan: Plan, contexts: Mapping[str, str]) -> list[str]:
    """Notes on how NVML listed the workers (:meth:`Executor.worker_contexts`): one line for all,
    and a warning for each mps slot whose worker did not join the MPS server."""
    if not contexts:
        return []
    notes = ["workers on the GPU (NVML): " + ", ".join(f"{slot} {how}" for slot, how in contexts.items())]
    kinds = {slot.name: slot.kind for slot in plan.slots}
    for slot, how in contexts.items():
        if kinds.get(slot) == "mps" and how == "own-context":
            notes.append(
                f"mps slot '{slot}': its worker has a CUDA context of its own, so it did not join the "
                "MPS server and is time-sliced like a process slot (check the daemon's pipe directory)"
            )
    return notes


def run_requests(
    executor: Executor,
    *,
    requests: int | None = None,
    seconds: float | None = None,
    batch: Array | None = None,
    concurrency: int | None = None,
    warmup: int | None = None,
    progress: Progress | None = None,
    sample_interval_s: float = 0.1,
) -> RunResult:
    """Run requests through ``executor`` (started here if needed, not closed) and measure them.

    Args:
        executor: the executor of the plan to measure.
        requests: how many counted requests to run (default 100 when ``seconds`` is not given).
        seconds: run for this long instead (or as well: whichever ends first).
        batch: the batch every request carries; default a seeded random batch of the plan's
            batch size that fits every member.
        concurrency: requests kept in flight; default two per slot.
        warmup: requests run first and not counted; default ``concurrency`` (at least 2).
        progress: called as ``progress(done, total)`` from the calling thread as answers
            arrive; ``total`` is None for a run by time.
        sample_interval_s: how often GPU memory, utilisation and power are sampled.

    A Ctrl-C stops submitting, waits for the requests in flight and returns what ran
    (``interrupted=True``); a second Ctrl-C while waiting is raised.
    """
    if requests is not None and requests < 1:
        raise InvalidInputError(f"requests must be >= 1, got {requests}")
    if seconds is not None and not seconds > 0:
        raise InvalidInputError(f"seconds must be positive, got {seconds}")
    if requests is None and seconds is None:
        requests = DEFAULT_REQUESTS
    plan = executor.plan
    in_flight = concurrency if concurrency is not None else 2 * len(plan.slots)
    if in_flight < 1:
        raise InvalidInputError(f"concurrency must be >= 1, got {in_flight}")
    warm = warmup if warmup is not None else max(2, in_flight)
    if warm < 0:
        raise InvalidInputError(f"warmup must be >= 0, got {warm}")
    executor.start()
    data = batch if batch is not None else default_batch(executor.ensemble, plan.batch_size)
    samples_per_request = int(data.shape[0]) if data.ndim else 1
    restarts_before = executor.stats().worker_restarts
    notes: list[str] = []

    if warm:
        _drive(executor, data, requests=warm, seconds=None, concurrency=in_flight, progress=None)
    device = plan.device
    sampler: Any = None
    watcher: _GpuMemoryWatcher | None = None
    if device.kind == "cuda":
        from colocate.profiling.sampler import NvmlSampler, nvml_index

        index = nvml_index(device)  # NVML's numbering, not the CUDA ordinal
        sampler = NvmlSampler(index, interval_s=sample_interval_s).__enter__()
        if sampler.unavailable_reason:
            notes.append(f"no GPU utilisation or power: {sampler.unavailable_reason}")
        watcher = _GpuMemoryWatcher(index, _pids(executor), sample_interval_s)
        watcher.start()
    try:
        outcome = _drive(
            executor, data, requests=requests, seconds=seconds, concurrency=in_flight, progress=progress
        )
    finally:
        if watcher is not None:
            watcher.stop()
        if sampler is not None:
            sampler.__exit__(None, None, None)

    utilisation: tuple[float, ...] = ()
    mean_util: float | None = None
    power: float | None = None
    if sampler is not None and sampler.available:
        utilisation = tuple(float(v) for v in getattr(sampler, "_util_pct", ()))
        energy = sampler.result(samples_processed=max(1, outcome.completed * samples_per_request))
        if energy is not None:
            mean_util, power = energy.utilization_pct, energy.mean_power_w
        notes.extend(sampler.notes)
    memory = _memory(executor, watcher)
    if device.kind == "cuda" and all(m.peak_gpu_bytes is None for m in memory):
        notes.append("no per-process GPU memory from NVML (no NVML, or PIDs differ inside a container)")
    if device.kind == "cuda":
        notes.extend(worker_context_notes(plan, executor.worker_contexts()))

    broken = executor.broken_reason
    status: RunStatus = "ok"
    if broken is not None or (outcome.completed == 0 and outcome.submitted > 0):
        status = "failed"
    elif outcome.failed:
        status = "errors"
    errors = list(outcome.errors)
    if broken is not None and broken not in errors:
        errors.insert(0, broken)
    wall = outcome.wall_s
    return RunResult(
        strategy=plan.strategy,
        device=device,
        batch_size=samples_per_request,
        slots=tuple(f"{s.name} {s.kind}: {', '.join(s.members)}" for s in plan.slots),
        concurrency=in_flight,
        warmup_requests=warm,
        requests_completed=outcome.completed,
        requests_failed=outcome.failed,
        wall_s=wall,
        throughput_sps=outcome.completed * samples_per_request / wall if wall > 0 else 0.0,
        latency=_latency(outcome.latencies),
        memory=memory,
        utilization_pct_samples=utilisation,
        utilization_pct=mean_util,
        mean_power_w=power,
        status=status,
        errors=tuple(errors[:MAX_ERRORS_KEPT]),
        worker_restarts=executor.stats().worker_restarts - restarts_before,
        interrupted=outcome.interrupted,
        prediction=plan.prediction,
        versions=_versions(executor.ensemble, device, tuple(b.backend for b in executor.plan.backends)),
        notes=tuple(notes),
        overhead=_latency(outcome.overheads),
    )


class _Outcome:
    def __init__(self) -> None:
        self.submitted = 0
        self.completed = 0
        self.failed = 0
        self.latencies: list[float] = []
        self.overheads: list[float] = []
        self.errors: list[str] = []
        self.first_submit_s: float | None = None
        self.last_answer_s: float | None = None
        self.interrupted = False

    @property
    def finished(self) -> int:
        return self.completed + self.failed

    @property
    def wall_s(self) -> float:
        if self.first_submit_s is None or self.last_answer_s is None:
            return 0.0
        return max(0.0, self.last_answer_s - self.first_submit_s)


def _drive(
    executor: Executor,
    batch: Array,
    *,
    requests: int | None,
    seconds: float | None,
    concurrency: int,
    progress: Progress | None,
) -> _Outcome:
    """Keep ``concurrency`` requests in flight until ``requests`` were submitted or ``seconds`` passed."""
    outcome = _Outcome()
    slots = threading.Semaphore(concurrency)
    changed = threading.Condition()

    def on_done(future: Future[EnsembleResult]) -> None:
        error = future.exception()
        with changed:
            outcome.last_answer_s = time.perf_counter()
            if error is None:
                outcome.completed += 1
                result = future.result()
                outcome.latencies.append(result.latency_s)
                outcome.overheads.append(result.overhead_s)
            else:
                outcome.failed += 1
                text = f"{type(error).__name__}: {error}"
                if text not in outcome.errors and len(outcome.errors) < MAX_ERRORS_KEPT:
                    outcome.errors.append(text)
            changed.notify_all()
        slots.release()

    reported = -1

    def report() -> None:
        nonlocal reported
        if progress is not None and outcome.finished != reported:
            reported = outcome.finished
            progress(reported, requests if seconds is None else None)

    start = time.perf_counter()
    deadline = start + seconds if seconds is not None else None
    try:
        while requests is None or outcome.submitted < requests:
            if deadline is not None and time.perf_counter() >= deadline:
                break
            if executor.broken_reason is not None:
                break
            if not slots.acquire(timeout=0.05):
                report()
                continue
            if deadline is not None and time.perf_counter() >= deadline:
                slots.release()
                break
            if outcome.first_submit_s is None:
                outcome.first_submit_s = time.perf_counter()
            # one at a time, this thread waits anyway: it reads the workers' replies itself, as
            # predict() does (one thread wake-up less per request)
            future = executor._submit_and_read(batch) if concurrency == 1 else executor.submit(batch)
            outcome.submitted += 1
            future.add_done_callback(on_done)
            report()
    except KeyboardInterrupt:
        outcome.interrupted = True
    wait_s = executor.request_timeout_s + 10.0
    give_up = time.perf_counter() + wait_s
    while True:
        with changed:
            if outcome.finished >= outcome.submitted or time.perf_counter() >= give_up:
                break
            changed.wait(timeout=0.1)
        report()
    report()
    return outcome


def run_at_rate(
    executor: Executor,
    rate_rps: float,
    seconds: float,
    *,
    batch: Array | None = None,
) -> tuple[int, int, LatencyStats | None]:
    """Offer requests at a fixed rate (open loop) for ``seconds``; (completed, failed, latency).

    Unlike :func:`run_requests`, which keeps a fixed number of requests in flight, arrivals here
    do not wait for answers: past the plan's capacity requests queue up and latency grows, which
    is what a latency-versus-load curve shows. Requests arrive evenly spaced.
    """
    if not rate_rps > 0 or not seconds > 0:
        raise InvalidInputError(f"need a positive rate and duration, got {rate_rps} req/s for {seconds} s")
    executor.start()
    data = batch if batch is not None else default_batch(executor.ensemble, executor.plan.batch_size)
    futures: list[Future[EnsembleResult]] = []
    start = time.perf_counter()
    count = max(1, int(rate_rps * seconds))
    for i in range(count):
        due = start + i / rate_rps
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(executor.submit(data))
    latencies: list[float] = []
    failed = 0
    for future in futures:
        try:
            latencies.append(future.result(timeout=executor.request_timeout_s + 10.0).latency_s)
        except Exception:  # every failure counts; the comparison reports the counts
            failed += 1
    return len(latencies), failed, _latency(latencies)


def _latency(samples: list[float]) -> LatencyStats | None:
    return LatencyStats.from_samples(samples) if samples else None


def _pids(executor: Executor) -> dict[str, int]:
    return {"front": os.getpid(), **executor.worker_pids()}


def _status_bytes(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status in bytes (None where unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    parts = line.split()
                    return int(parts[1]) * 1024 if len(parts) > 1 and parts[1].isdigit() else None
    except OSError:
        return None
    return None


def _memory(executor: Executor, watcher: _GpuMemoryWatcher | None) -> tuple[ProcessMemory, ...]:
    rows = []
    for role, pid in _pids(executor).items():
        rows.append(
            ProcessMemory(
                role=role,
                pid=pid,
                peak_host_bytes=_status_bytes(pid, "VmHWM"),
                peak_gpu_bytes=watcher.peak(pid) if watcher is not None else None,
            )
        )
    return tuple(rows)


class _GpuMemoryWatcher:
    """Samples NVML's per-process GPU memory of some processes on a thread; keeps each one's peak."""

    def __init__(self, device_index: int, pids: dict[str, int], interval_s: float) -> None:
        self.device_index = device_index
        self.pids = dict(pids)
        self.interval_s = max(interval_s, 0.05)
        self._peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="colocate-gpu-memory", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        self._sample()

    def peak(self, pid: int) -> int | None:
        return self._peaks.get(pid)

    def _sample(self) -> None:
        from colocate.profiling.sampler import process_gpu_memory_bytes

        for pid in self.pids.values():
            try:
                used = process_gpu_memory_bytes(self.device_index, pid)
            except Exception:  # NVML trouble means "unknown", never a failed run
                used = None
            if used is not None:
                self._peaks[pid] = max(self._peaks.get(pid, 0), used)

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self.interval_s):
                return


def _versions(ensemble: Ensemble, device: Any, variant_backends: tuple[str, ...] = ()) -> dict[str, str]:
    from colocate import __version__
    from colocate.profiling.cache import framework_version

    versions = {
        "colocate": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    for backend in sorted({m.backend for m in ensemble.members} | set(variant_backends)):
        versions[backend] = framework_version(backend)
    if device.driver_version:
        versions["driver"] = str(device.driver_version)
    if device.cuda_version:
        versions["cuda"] = str(device.cuda_version)
    return versions


__all__ = ["DEFAULT_REQUESTS", "default_batch", "run_requests", "worker_context_notes"]
