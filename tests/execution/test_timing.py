"""Where a request's time went: each slot's wait, compute and return, the combine, the overhead.

The members sleep a known time, so a slot's compute time has a floor the test can
check; a worker process reports its own clock readings, so these tests also catch
a reply that mixes up its start and end or a front that pairs them with the wrong slot.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from colocate import serde
from colocate.ensemble import Ensemble
from colocate.execution import EnsembleResult, Executor, RunResult, run_requests
from colocate.planning.types import Slot

from .helpers import batch_with_first, make_plan, sleeper

TIMEOUT_S = 60.0
FAST_S = 0.03
SLOW_S = 0.12


@pytest.fixture(scope="module")
def executor() -> Iterator[Executor]:
    ensemble = Ensemble((sleeper("fast", delay_s=FAST_S), sleeper("slow", delay_s=SLOW_S)))
    plan = make_plan(
        Slot("s0", "stream", ("fast",), cpu_threads=1),
        Slot("p0", "process", ("slow",), cpu_threads=1),
    )
    with Executor(plan, ensemble, request_timeout_s=TIMEOUT_S) as running:
        yield running


def _check(result: EnsembleResult) -> None:
    by_slot = {t.slot: t for t in result.slots}
    assert set(by_slot) == {"s0", "p0"}
    assert by_slot["s0"].compute_s >= FAST_S
    assert by_slot["p0"].compute_s >= SLOW_S
    # each slot's compute is its own member's sleep, not the other's: the stream slot never takes
    # as long as the worker's member sleeps
    assert by_slot["s0"].compute_s < SLOW_S
    for timing in result.slots:
        assert timing.queued_s >= 0.0
        assert timing.returned_s >= 0.0
        assert timing.queued_s + timing.compute_s + timing.returned_s <= result.latency_s
    assert result.slots[-1].slot == "p0"  # the slow slot answered last
    assert result.combine_s > 0.0
    expected = result.latency_s - result.combine_s - by_slot["p0"].compute_s
    assert result.overhead_s == pytest.approx(expected)
    assert 0.0 <= result.overhead_s < result.latency_s - SLOW_S


def test_predict_result_says_where_the_time_went(executor: Executor) -> None:
    batch = batch_with_first(0.5)
    result = executor.predict_result(batch, return_members=True)
    np.testing.assert_allclose(result.combined, executor.predict(batch))
    assert set(result.members or {}) == {"fast", "slow"}
    _check(result)


def test_submitted_requests_carry_their_timing_too(executor: Executor) -> None:
    futures = [executor.submit(batch_with_first(float(i))) for i in range(3)]
    for future in futures:
        _check(future.result(timeout=TIMEOUT_S))


def test_stats_and_measured_runs_summarise_the_overhead(executor: Executor) -> None:
    before = executor.stats()
    measured = run_requests(executor, requests=4, concurrency=1, warmup=0)
    assert measured.status == "ok"
    assert measured.overhead is not None and measured.latency is not None
    assert len(measured.overhead.samples_s) == measured.requests_completed == 4
    # the overhead excludes at least the slow member's sleep from each latency
    for latency, overhead in zip(measured.latency.samples_s, measured.overhead.samples_s, strict=True):
        assert overhead <= latency - SLOW_S
    after = executor.stats()
    assert after.overhead is not None
    assert len(after.overhead.samples_s) == after.completed == (before.completed + 4)
    assert serde.loads(RunResult, serde.dumps(measured)) == measured


def test_an_old_run_result_without_overhead_still_loads(executor: Executor) -> None:
    measured = run_requests(executor, requests=2, concurrency=1, warmup=0)
    data = serde.to_dict(measured)
    del data["overhead"]
    assert serde.from_dict(RunResult, data).overhead is None
