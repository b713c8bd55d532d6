from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from colocate._timing import LatencyStats, measure, percentile
from colocate.errors import InvalidInputError, MeasurementError


class FakeClock:
    """Each fn call costs the next value of ``costs``; a sync costs ``sync_cost``."""

    def __init__(self, costs: list[float], sync_cost: float = 0.0) -> None:
        self.now = 0.0
        self.costs = list(costs)
        self.sync_cost = sync_cost
        self.calls = 0
        self.pending = 0.0  # device work enqueued but not waited for

    def __call__(self) -> float:
        return self.now

    def fn(self) -> None:
        self.calls += 1
        self.pending += self.costs.pop(0)

    def sync(self) -> None:
        self.now += self.pending + self.sync_cost
        self.pending = 0.0


def test_measure_times_device_work_only_after_sync() -> None:
    clock = FakeClock([9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    stats = measure(clock.fn, sync=clock.sync, warmup=2, repeats=5, clock=clock)
    assert stats.samples_s == (1.0, 2.0, 3.0, 4.0, 5.0)  # warm-up excluded, async work counted
    assert stats.median_s == 3.0
    assert stats.min_s == 1.0 and stats.max_s == 5.0
    assert clock.calls == 7


def test_without_sync_async_work_is_invisible() -> None:
    clock = FakeClock([1.0] * 4)
    stats = measure(clock.fn, warmup=0, repeats=4, clock=clock)
    assert stats.max_s == 0.0  # shows why sync is passed for GPU work


def test_max_time_stops_early_but_keeps_three() -> None:
    clock = FakeClock([10.0] * 20)
    stats = measure(clock.fn, sync=clock.sync, warmup=0, repeats=20, max_time_s=5.0, clock=clock)
    assert len(stats.samples_s) == 3


def test_percentiles_known() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(MeasurementError):
        percentile([], 50)
    with pytest.raises(InvalidInputError):
        percentile([1.0], 101)


def test_bad_arguments() -> None:
    with pytest.raises(InvalidInputError):
        measure(lambda: None, repeats=0)
    with pytest.raises(MeasurementError):
        LatencyStats.from_samples([])
    with pytest.raises(MeasurementError):
        LatencyStats.from_samples([1.0, -1.0])


def test_high_variance_flag() -> None:
    assert not LatencyStats.from_samples([1.0] * 10).high_variance
    assert LatencyStats.from_samples([1.0, 1.0, 2.0, 3.0]).high_variance


@given(st.lists(st.floats(min_value=0.0, max_value=1e3, allow_nan=False), min_size=1, max_size=200))
def test_percentiles_ordered(samples: list[float]) -> None:
    s = LatencyStats.from_samples(samples)
    assert s.min_s <= s.median_s <= s.p90_s <= s.p99_s <= s.max_s
    assert s.iqr_s >= 0
