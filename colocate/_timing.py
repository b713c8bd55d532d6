"""The one clock: synchronise, then read; warm up; repeat; keep raw samples.

Every timing in colocate goes through :func:`measure`, which calls ``sync``
(e.g. a CUDA stream's ``synchronize``) before each clock read, so GPU work is
never timed by its launch alone. The clock is a parameter so that measurement
logic is tested with a fake clock, without hardware.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from colocate.errors import InvalidInputError, MeasurementError

Clock = Callable[[], float]
#: interquartile range / median above which a measurement is flagged noisy
HIGH_VARIANCE_RATIO = 0.10


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..100) of already sorted samples."""
    if not sorted_samples:
        raise MeasurementError("no samples to take a percentile of")
    if not 0.0 <= q <= 100.0:
        raise InvalidInputError(f"percentile must be in [0, 100], got {q}")
    position = (len(sorted_samples) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    fraction = position - low
    below, above = sorted_samples[low], sorted_samples[high]
    return min(max(below + (above - below) * fraction, below), above)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of repeated timings of one operation. Times in seconds."""

    samples_s: tuple[float, ...]  # raw per-call times, in measurement order
    median_s: float  # p50
    p90_s: float
    p99_s: float
    mean_s: float
    min_s: float
    max_s: float
    iqr_s: float  # p75 - p25

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> LatencyStats:
        """Statistics of ``samples`` (at least one, all >= 0)."""
        if not samples:
            raise MeasurementError("no timing samples were taken")
        if any(s < 0 or math.isnan(s) for s in samples):
            raise MeasurementError(f"negative or NaN timing sample in {list(samples)[:5]}...")
        ordered = sorted(samples)
        return cls(
            samples_s=tuple(float(s) for s in samples),
            median_s=percentile(ordered, 50),
            p90_s=percentile(ordered, 90),
            p99_s=percentile(ordered, 99),
            mean_s=statistics.fmean(ordered),
            min_s=ordered[0],
            max_s=ordered[-1],
            iqr_s=percentile(ordered, 75) - percentile(ordered, 25),
        )

    @property
    def relative_spread(self) -> float:
        """IQR / median (0 when the median is 0)."""
        return self.iqr_s / self.median_s if self.median_s > 0 else 0.0

    @property
    def high_variance(self) -> bool:
        """Whether the spread is above :data:`HIGH_VARIANCE_RATIO`."""
        return self.relative_spread > HIGH_VARIANCE_RATIO


def measure(
    fn: Callable[[], object],
    *,
    sync: Callable[[], None] | None = None,
    warmup: int = 3,
    repeats: int = 20,
    max_time_s: float | None = None,
    clock: Clock = time.perf_counter,
) -> LatencyStats:
    """Time ``fn`` ``repeats`` times after ``warmup`` untimed calls.

    Args:
        fn: the operation; its work must be done (or enqueued) when it returns.
        sync: waits for the device work ``fn`` enqueued; called before each clock read.
        warmup: untimed calls first (autotuning, lazy loading, graph capture).
        repeats: timed calls (at least 1).
        max_time_s: stop early once this much timed time has passed (at least 3 samples kept).
        clock: the clock, in seconds.
    """
    if warmup < 0 or repeats < 1:
        raise InvalidInputError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    wait = sync if sync is not None else _no_sync
    for _ in range(warmup):
        fn()
    wait()
    samples: list[float] = []
    spent = 0.0
    for _ in range(repeats):
        wait()
        start = clock()
        fn()
        wait()
        elapsed = clock() - start
        samples.append(elapsed)
        spent += elapsed
        if max_time_s is not None and spent >= max_time_s and len(samples) >= 3:
            break
    return LatencyStats.from_samples(samples)


def _no_sync() -> None:
    return None
