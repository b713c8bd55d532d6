"""Kernel and operator footprints from ``torch.profiler`` Chrome traces.

Only the stable Chrome-trace export ("Route A" in the GPU reference) is used,
so the same code reads traces of torch 2.11 and 2.13:

* GPU kernels are events with ``cat == "kernel"`` whose ``args`` carry
  ``"stream"``, ``"grid"`` ``[x, y, z]``, ``"block"``, ``"blocks per SM"``,
  ``"warps per SM"`` and ``"est. achieved occupancy %"`` (older Kineto:
  ``"est. achieved occupancy"`` as a fraction). ``ts`` and ``dur`` are in
  microseconds, on the same clock as the CPU events.
* Each profiled batch is wrapped in ``record_function("colocate.batch")``,
  which appears as a CPU ``user_annotation`` event (on a GPU also as a
  ``gpu_user_annotation`` twin on the device timeline, which is ignored here).
* CPU operators are ``cat == "cpu_op"`` events; allocator activity is the
  ``"[memory]"`` instant events (``args``: ``"Bytes"`` signed, ``"Total
  Allocated"``, ``"Device Type"`` 0 = CPU, 1 = CUDA, ...).

The ``*_from_trace`` functions are pure, so they are tested on synthetic
traces; :func:`trace_gpu` and :func:`cpu_trace` record the traces.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import json
import math
import os
import re
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from colocate._optional import optional_import
from colocate._timing import percentile
from colocate.errors import InvalidInputError, MeasurementError
from colocate.profiling.types import KernelFootprint

#: name of the ``record_function`` range that marks one batch
BATCH_ANNOTATION = "colocate.batch"
#: ``KernelFootprint.source`` of a footprint read from a profiler trace
TRACE_SOURCE = "torch.profiler (CUPTI)"
_US = 1e-6  # seconds per microsecond
_NEST_TOLERANCE_US = 0.01  # float rounding of ts/dur in exported traces

_OCCUPANCY_PCT_KEY = "est. achieved occupancy %"
_OCCUPANCY_FRACTION_KEY = "est. achieved occupancy"


# --------------------------------------------------------------------------- helpers


def _number(value: object) -> float | None:
    """``value`` as a finite float, or None (strings such as ``"inf"`` included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        result = float(value)
    elif isinstance(value, str):
        try:
            result = float(value)
        except ValueError:
            return None
    else:
        return None
    return result if math.isfinite(result) else None


def _args(event: dict[str, Any]) -> dict[str, Any]:
    args = event.get("args")
    return args if isinstance(args, dict) else {}


def _interval(event: dict[str, Any]) -> tuple[float, float] | None:
    """(start, duration) in µs of a complete event, or None when it has no usable ``ts``."""
    ts = _number(event.get("ts"))
    if ts is None:
        return None
    dur = _number(event.get("dur"))
    return ts, max(dur if dur is not None else 0.0, 0.0)


def _category(event: dict[str, Any]) -> str:
    cat = event.get("cat")
    return cat.lower() if isinstance(cat, str) else ""


def _grid_blocks(args: dict[str, Any]) -> int | None:
    """Blocks in a kernel's grid (product of ``args["grid"]``), or None when absent."""
    grid = args.get("grid")
    if not isinstance(grid, (list, tuple)) or not grid:
        return None
    blocks = 1
    for dim in grid:
        size = _number(dim)
        if size is None or size < 0:
            return None
        blocks *= int(size)
    return blocks


def _occupancy_pct(args: dict[str, Any]) -> float | None:
    """Kineto's estimated achieved occupancy of one kernel in %, from either key spelling."""
    pct = _number(args.get(_OCCUPANCY_PCT_KEY))
    if pct is not None:
        return pct
    value = _number(args.get(_OCCUPANCY_FRACTION_KEY))
    if value is None:
        return None
    return 100.0 * value if value <= 1.0 else value


def _weighted_median(values: Sequence[float], weights: Sequence[float]) -> float:
    """The lower weighted median: the smallest value whose cumulative weight reaches half."""
    total = sum(weights)
    if total <= 0:
        weights = [1.0] * len(values)
        total = float(len(values))
    cumulative = 0.0
    for value, weight in sorted(zip(values, weights, strict=True), key=lambda pair: pair[0]):
        cumulative += weight
        if cumulative >= total / 2:
            return value
    return max(values)


def _weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    total = sum(weights)
    if total <= 0:
        return sum(values) / len(values)
    return sum(v * w for v, w in zip(values, weights, strict=True)) / total


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Total length covered by ``(start, end)`` intervals, overlaps counted once."""
    covered = 0.0
    current_start: float | None = None
    current_end = 0.0
    for start, end in sorted(intervals):
        if end <= start:
            continue
        if current_start is None or start > current_end:
            if current_start is not None:
                covered += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_start is not None:
        covered += current_end - current_start
    return covered


def _load_trace(path: str) -> list[dict[str, Any]]:
    """The events of an exported Chrome trace (a ``{"traceEvents": [...]}`` dict or a bare list)."""
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    if not isinstance(events, list):
        raise MeasurementError(f"the profiler trace {path} holds no event list (got {type(events).__name__})")
    return [event for event in events if isinstance(event, dict)]


def _export_events(prof: Any) -> list[dict[str, Any]]:
    """Export ``prof``'s Chrome trace to a temporary file, read it back and remove the file."""
    fd, path = tempfile.mkstemp(prefix="colocate-trace-", suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        return _load_trace(path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)


# --------------------------------------------------------------------------- GPU kernels


def _batch_annotations(events: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(start, duration) µs of the CPU-side ``colocate.batch`` ranges, in time order."""
    found = [
        _interval(e)
        for e in events
        if e.get("name") == BATCH_ANNOTATION and _category(e) == "user_annotation"
    ]
    if not found:  # very old exports put record_function ranges among the cpu ops
        found = [
            _interval(e) for e in events if e.get("name") == BATCH_ANNOTATION and _category(e) == "cpu_op"
        ]
    return sorted(interval for interval in found if interval is not None)


def footprint_from_trace(
    events: list[dict[str, Any]],
    *,
    batches: int,
    sm_count: int,
    window_s: float | None = None,
) -> KernelFootprint:
    """The kernel footprint of ``batches`` profiled batches from Chrome-trace ``events``.

    Args:
        events: the ``traceEvents`` of a ``torch.profiler`` Chrome trace (µs timestamps),
            with each batch wrapped in ``record_function("colocate.batch")``. Kernels that start
            before the first such range (a warm-up inside the profiler) are left out; a kernel
            belongs to the last range that started at or before it. Launch gaps are taken between
            consecutive kernels of one stream within one batch (the time between batches is the
            profiling loop's).
        batches: how many batches the trace holds; per-batch figures divide by it.
        sm_count: streaming multiprocessors of the GPU, for ``sm_fill``.
        window_s: wall time of the traced window in seconds; by default from the start of the
            first batch annotation to the end of the last annotation or kernel, whichever is later
            (without annotations: from the first kernel's start to the last kernel's end).

    Raises:
        MeasurementError: the trace holds no GPU kernel.
        InvalidInputError: ``batches`` or ``sm_count`` below 1, or ``window_s`` not positive.
    """
    if batches < 1:
        raise InvalidInputError(f"batches must be at least 1, got {batches}")
    if sm_count < 1:
        raise InvalidInputError(f"sm_count must be at least 1, got {sm_count}")
    if window_s is not None and not window_s > 0:
        raise InvalidInputError(f"window_s must be positive, got {window_s}")

    kernels: list[tuple[float, float, dict[str, Any]]] = []
    for event in events:
        if _category(event) != "kernel":
            continue
        interval = _interval(event)
        if interval is not None:
            kernels.append((interval[0], interval[1], _args(event)))
    if not kernels:
        raise MeasurementError(
            "no GPU kernels in the trace (no events with cat 'kernel'): the work ran on the CPU, "
            "CUPTI could not trace (driver/permissions), or the batches launched nothing"
        )
    kernels.sort(key=lambda k: k[0])
    annotations = _batch_annotations(events)
    if annotations:  # kernels that started before the first batch (a warm-up) are not the batches'
        kernels = [k for k in kernels if k[0] >= annotations[0][0]]
        if not kernels:
            raise MeasurementError(
                f"no GPU kernels in the trace after the first '{BATCH_ANNOTATION}' range began: "
                "the batches launched nothing on the GPU"
            )

    # -- totals and busy fraction
    total_dur = sum(dur for _, dur, _ in kernels)
    kernel_end = max(ts + dur for ts, dur, _ in kernels)
    if annotations:
        window_start = annotations[0][0]
        window_end = max(max(ts + dur for ts, dur in annotations), kernel_end)
    else:
        window_start, window_end = kernels[0][0], kernel_end
    busy = union_length((max(ts, window_start), min(ts + dur, window_end)) for ts, dur, _ in kernels)
    window_us = window_s / _US if window_s is not None else window_end - window_start
    busy_fraction = min(max(busy / window_us, 0.0), 1.0) if window_us > 0 else 1.0

    # -- which batch each kernel belongs to: the last annotation that started at or before it
    starts = [start for start, _ in annotations]
    batch_of = [bisect.bisect_right(starts, ts) - 1 for ts, _, _ in kernels] if starts else [0] * len(kernels)

    # -- launch gaps, per (device, stream), between consecutive kernels of the same batch
    by_stream: dict[tuple[object, object], list[tuple[float, float, int]]] = defaultdict(list)
    for (ts, dur, args), batch in zip(kernels, batch_of, strict=True):
        by_stream[(args.get("device"), args.get("stream", 0))].append((ts, dur, batch))
    gaps: list[float] = []
    for stream_kernels in by_stream.values():
        stream_kernels.sort()
        for (prev_ts, prev_dur, prev_batch), (next_ts, _, next_batch) in itertools.pairwise(stream_kernels):
            if prev_batch == next_batch:  # the time between batches is the profiling loop's, not the member's
                gaps.append(max(next_ts - (prev_ts + prev_dur), 0.0) * _US)
    gaps.sort()
    gap_median = percentile(gaps, 50) if gaps else 0.0
    gap_p90 = percentile(gaps, 90) if gaps else 0.0

    # -- grid, SM fill, occupancy (duration-weighted)
    grid_blocks: list[float] = []
    grid_weights: list[float] = []
    occupancy: list[float] = []
    occupancy_weights: list[float] = []
    for _, dur, args in kernels:
        blocks = _grid_blocks(args)
        if blocks is not None:
            grid_blocks.append(float(blocks))
            grid_weights.append(dur)
        pct = _occupancy_pct(args)
        if pct is not None:
            occupancy.append(pct)
            occupancy_weights.append(dur)
    if grid_blocks:
        max_grid = int(max(grid_blocks))
        typical_grid = int(_weighted_median(grid_blocks, grid_weights))
        sm_fill = _weighted_mean([min(1.0, b / sm_count) for b in grid_blocks], grid_weights)
    else:
        max_grid, typical_grid, sm_fill = 0, 0, 0.0
    occupancy_pct = _weighted_mean(occupancy, occupancy_weights) if occupancy else None

    # -- delay from each batch's host call to its first kernel (kernels are sorted by ts)
    first_in_batch: dict[int, float] = {}
    for (ts, _, _), batch in zip(kernels, batch_of, strict=True):
        if batch >= 0:
            first_in_batch.setdefault(batch, ts)
    delays = [(first_in_batch[b] - starts[b]) * _US for b in first_in_batch] if starts else []
    delays.sort()
    first_delay = percentile(delays, 50) if delays else 0.0

    return KernelFootprint(
        source=TRACE_SOURCE,
        traced_batches=batches,
        kernels_per_batch=len(kernels) / batches,
        kernel_time_s=total_dur * _US / batches,
        busy_fraction=busy_fraction,
        launch_gap_median_s=gap_median,
        launch_gap_p90_s=gap_p90,
        max_grid_blocks=max_grid,
        typical_grid_blocks=typical_grid,
        sm_fill=min(max(sm_fill, 0.0), 1.0),
        occupancy_pct=occupancy_pct,
        first_kernel_delay_s=first_delay,
    )


_PROFILER_NOISE = re.compile(r"^(USDT|INFO):.*(profiler_start|profiler_stop|SyncActivityProfilerHandler)")


@contextlib.contextmanager
def quiet_profiler_log() -> Iterator[None]:
    """Hide the profiler's own start/stop log lines that Kineto writes to fd 2; keep the rest.

    torch's C++ profiler prints ``USDT: ... profiler_start`` lines on the process's stderr on every
    trace, which garbles progress bars and tables. Anything else written meanwhile is passed on.
    """
    stderr_fd = 2  # native code writes to fd 2 whatever sys.stderr is
    try:
        saved = os.dup(stderr_fd)
    except OSError:  # no fd 2 (some embedded interpreters)
        yield
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), stderr_fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, stderr_fd)
            os.close(saved)
            capture.seek(0)
            kept = [
                line
                for line in capture.read().decode(errors="replace").splitlines(keepends=True)
                if not _PROFILER_NOISE.match(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def trace_gpu(
    run_batch: Callable[[], object],
    sync: Callable[[], None],
    *,
    batches: int = 5,
    sm_count: int,
) -> KernelFootprint:
    """Profile ``batches`` calls of ``run_batch`` with CUPTI and summarise their kernels.

    Each call runs inside ``record_function("colocate.batch")`` and is followed by ``sync()``
    inside the profiled region, so batches do not overlap. One more call runs first inside the
    profiler, outside any batch range, and is left out of the figures: it absorbs the profiler's
    start-up overhead. Warm the member up first: the trace
    should not hold autotuning or lazy loading. Profiling adds host overhead to every launch,
    so keep it apart from timing runs.

    Args:
        run_batch: runs one batch on the GPU (enqueues its work).
        sync: waits for the GPU work ``run_batch`` enqueued.
        batches: batches to trace (at least 1).
        sm_count: streaming multiprocessors of the GPU.

    Raises:
        BackendUnavailableError: torch is not installed.
        MeasurementError: the trace holds no GPU kernel (e.g. CUPTI unavailable).
    """
    if batches < 1:
        raise InvalidInputError(f"batches must be at least 1, got {batches}")
    torch = optional_import("torch", purpose="kernel tracing (colocate.profiling.kernels.trace_gpu)")
    profiler = torch.profiler
    activities = [profiler.ProfilerActivity.CPU, profiler.ProfilerActivity.CUDA]
    with quiet_profiler_log(), profiler.profile(activities=activities) as prof:
        # one batch outside any "colocate.batch" range first: the profiler's own start-up cost
        # (CUPTI buffers, first-op overhead, about 2 ms) lands on it, not on the first traced batch
        run_batch()
        sync()
        for _ in range(batches):
            with profiler.record_function(BATCH_ANNOTATION):
                run_batch()
            sync()
    events = _export_events(prof)
    return footprint_from_trace(events, batches=batches, sm_count=sm_count)


# --------------------------------------------------------------------------- CPU operators and memory


def top_ops_from_trace(events: list[dict[str, Any]], limit: int = 8) -> tuple[tuple[str, float], ...]:
    """The ``limit`` operators with the most self time, as (name, share of all operator self time).

    An operator's self time is its duration minus the durations of the ``cpu_op`` events directly
    nested in it on the same thread. Shares sum to at most 1 and come largest first.
    """
    if limit < 1:
        raise InvalidInputError(f"limit must be at least 1, got {limit}")
    by_thread: dict[tuple[object, object], list[tuple[float, float, str]]] = defaultdict(list)
    for event in events:
        if _category(event) != "cpu_op":
            continue
        interval = _interval(event)
        name = event.get("name")
        if interval is None or not isinstance(name, str):
            continue
        by_thread[(event.get("pid"), event.get("tid"))].append((interval[0], interval[1], name))

    self_time: dict[str, float] = defaultdict(float)
    for ops in by_thread.values():
        ops.sort(key=lambda op: (op[0], -op[1]))  # parents before the children they start with
        own = [dur for _, dur, _ in ops]
        stack: list[int] = []  # indices of the open (enclosing) operators
        for index, (ts, dur, _) in enumerate(ops):
            end = ts + dur
            while stack:
                parent_ts, parent_dur, _ = ops[stack[-1]]
                parent_end = parent_ts + parent_dur
                if ts < parent_end and end <= parent_end + _NEST_TOLERANCE_US:
                    break
                stack.pop()
            if stack:
                own[stack[-1]] -= dur
            stack.append(index)
        for (_, _, name), mine in zip(ops, own, strict=True):
            self_time[name] += max(mine, 0.0)

    total = sum(self_time.values())
    if total <= 0:
        return ()
    ranked = sorted(self_time.items(), key=lambda item: (-item[1], item[0]))[:limit]
    return tuple((name, spent / total) for name, spent in ranked)


def peak_allocated_from_trace(events: list[dict[str, Any]], device_type: int = 0) -> int:
    """Peak bytes allocated during the trace on ``device_type`` (0 = CPU, 1 = CUDA), from 0 at its start.

    Sums the signed ``"Bytes"`` of the ``"[memory]"`` events in time order (frees of memory
    allocated before the trace can take the sum below 0; the peak is at least 0).
    """
    changes: list[tuple[float, float]] = []
    for event in events:
        if event.get("name") != "[memory]":
            continue
        args = _args(event)
        kind = _number(args.get("Device Type"))
        size = _number(args.get("Bytes"))
        ts = _number(event.get("ts"))
        if kind is None or int(kind) != device_type or size is None or ts is None:
            continue
        changes.append((ts, size))
    changes.sort(key=lambda change: change[0])  # stable: keeps export order at equal times
    running = peak = 0.0
    for _, size in changes:
        running += size
        peak = max(peak, running)
    return int(peak)


def cpu_trace(
    run_batch: Callable[[], object],
    *,
    batches: int = 3,
    limit: int = 8,
) -> tuple[tuple[tuple[str, float], ...], int]:
    """Profile ``batches`` calls of ``run_batch`` on the CPU: (top operators, peak allocated bytes).

    Uses ``torch.profiler`` with ``profile_memory=True`` and CPU activity only. The peak counts
    CPU allocations made during the profiled calls (activations, outputs, workspace), from zero.

    Raises:
        BackendUnavailableError: torch is not installed.
    """
    if batches < 1:
        raise InvalidInputError(f"batches must be at least 1, got {batches}")
    torch = optional_import("torch", purpose="operator tracing (colocate.profiling.kernels.cpu_trace)")
    profiler = torch.profiler
    with (
        quiet_profiler_log(),
        profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        for _ in range(batches):
            with profiler.record_function(BATCH_ANNOTATION):
                run_batch()
    events = _export_events(prof)
    return top_ops_from_trace(events, limit), peak_allocated_from_trace(events, 0)


__all__ = [
    "BATCH_ANNOTATION",
    "TRACE_SOURCE",
    "cpu_trace",
    "footprint_from_trace",
    "peak_allocated_from_trace",
    "top_ops_from_trace",
    "trace_gpu",
    "union_length",
]
