"""predict() reads its worker processes' replies in the calling thread; the reader thread stands aside.

Waiting threads read their own replies so that a reply wakes the waiting thread
directly (one wake-up less per request). These tests check that this happens, and
that it never costs an answer: asynchronous requests beside it, several callers at
once, a reader thread parked for a while, and a worker dying under a foreground read.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import pytest

from colocate.ensemble import Ensemble
from colocate.errors import WorkerFailedError
from colocate.execution import EnsembleResult, Executor, run_requests
from colocate.execution.processes import ProcessSlot
from colocate.planning.types import Slot

from .helpers import assert_close, assert_released, batch_with_first, make_plan, sequential, sleeper

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    return Ensemble((sleeper("a", delay_s=0.02), sleeper("b", delay_s=0.02), sleeper("c", delay_s=0.0)))


@pytest.fixture(scope="module")
def executor(ensemble: Ensemble) -> Iterator[Executor]:
    plan = make_plan(
        Slot("p0", "process", ("a",), cpu_threads=1),
        Slot("p1", "process", ("b",), cpu_threads=1),
        Slot("s0", "stream", ("c",), cpu_threads=1),
    )
    executor = Executor(plan, ensemble, request_timeout_s=TIMEOUT_S)
    with executor:
        yield executor
    assert_released(executor, [], executor.shared_memory_prefix)


def _record_readers(executor: Executor, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the threads that handle each process-slot reply, in order."""
    seen: list[str] = []
    for slot in executor.slots:
        if isinstance(slot, ProcessSlot):
            original = slot._on_reply

            def recording(message: tuple[object, ...], original: object = original) -> None:
                seen.append(threading.current_thread().name)
                original(message)  # type: ignore[operator]

            monkeypatch.setattr(slot, "_on_reply", recording)
    return seen


def test_predict_reads_the_replies_in_the_calling_thread_and_submit_leaves_them_to_the_readers(
    executor: Executor, ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = batch_with_first(0.5)
    expected, _ = sequential(ensemble, batch)
    seen = _record_readers(executor, monkeypatch)
    for _ in range(3):
        assert_close(executor.predict(batch), expected)
    assert seen == [threading.current_thread().name] * 6  # 3 requests x 2 process slots
    seen.clear()
    # after the foreground reads, the parked reader threads must still answer asynchronous requests
    assert_close(executor.submit(batch).result(timeout=10.0).combined, expected)
    assert sorted(seen) == ["colocate-reader-p0", "colocate-reader-p1"]


def test_a_loop_of_predict_calls_never_wakes_the_reader_threads(
    executor: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each wake-up of a parked reader costs a thread wake-up (CPU beside the caller) per request
    wakes: list[str] = []
    for slot in executor.slots:
        if isinstance(slot, ProcessSlot):
            condition = slot._reader_wanted
            original = condition.notify_all

            def counting(name: str = slot.name, original: object = original) -> None:
                wakes.append(name)
                original()  # type: ignore[operator]

            monkeypatch.setattr(condition, "notify_all", counting)
    batch = batch_with_first(0.5)
    for _ in range(5):
        executor.predict(batch)
    assert wakes == []
    # an asynchronous request still wakes its readers, which answer it
    executor.submit(batch).result(timeout=10.0)
    assert sorted(set(wakes)) == ["p0", "p1"]


def test_run_requests_one_at_a_time_reads_in_the_foreground_and_more_at_once_does_not(
    executor: Executor, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _record_readers(executor, monkeypatch)
    result = run_requests(executor, requests=4, concurrency=1, warmup=0, batch=batch_with_first(0.5))
    assert result.status == "ok" and result.requests_completed == 4
    assert set(seen) == {threading.current_thread().name}
    seen.clear()
    result = run_requests(executor, requests=6, concurrency=3, warmup=0, batch=batch_with_first(0.5))
    assert result.status == "ok" and result.requests_completed == 6
    assert set(seen) == {"colocate-reader-p0", "colocate-reader-p1"}


def test_callers_at_once_beside_asynchronous_requests_each_get_their_own_answer(
    executor: Executor, ensemble: Ensemble
) -> None:
    batches = [batch_with_first(float(i), seed=i) for i in range(24)]
    expected = [sequential(ensemble, b)[0] for b in batches]

    def call(i: int) -> np.ndarray:
        if i % 3 == 0:
            return executor.submit(batches[i]).result(timeout=TIMEOUT_S).combined
        return executor.predict(batches[i])

    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(call, range(len(batches))))
    for answer, wanted in zip(got, expected, strict=True):
        assert_close(answer, wanted)


def test_a_worker_killed_under_a_foreground_read_fails_the_call_at_once() -> None:
    ensemble = Ensemble((sleeper("slow", delay_s=0.5),))
    executor = Executor(make_plan(Slot("p0", "process", ("slow",), cpu_threads=1)), ensemble)
    with executor:
        executor.predict(batch_with_first(0.0))
        pid = executor.worker_pids()["p0"]
        killer = threading.Timer(0.15, os.kill, args=(pid, signal.SIGKILL))
        killer.start()
        started = time.monotonic()
        with pytest.raises(WorkerFailedError, match=r"slot 'p0'.*died.*SIGKILL"):
            executor.predict(batch_with_first(0.0))
        assert time.monotonic() - started < 3.0
        killer.join()
    # the module's executor is still open: its workers are children too
    assert_released(executor, [pid], executor.shared_memory_prefix, no_children=False)


def test_a_worker_that_answered_and_died_during_a_foreground_read_is_restarted_at_once() -> None:
    # its pipe ends while predict() still waits for the other slot: the slot's reader thread
    # must handle the death then (before, it stayed parked and the next request failed)
    ensemble = Ensemble((sleeper("fast", delay_s=0.0), sleeper("slow", delay_s=1.0)))
    plan = make_plan(
        Slot("p0", "process", ("fast",), cpu_threads=1), Slot("p1", "process", ("slow",), cpu_threads=1)
    )
    executor = Executor(plan, ensemble, on_worker_death="restart", reply_wait="block")
    with executor:
        executor.predict(batch_with_first(0.0))
        fast = executor.slots[0]
        assert isinstance(fast, ProcessSlot)
        pid = executor.worker_pids()["p0"]
        killer = threading.Timer(0.3, os.kill, args=(pid, signal.SIGKILL))
        killer.start()
        executor.predict(batch_with_first(0.0))  # p0 answered before it was killed
        killer.join()
        deadline = time.monotonic() + 30.0
        while executor.worker_pids().get("p0") in (None, pid) and time.monotonic() < deadline:
            time.sleep(0.02)  # without a request: the death is seen as it happens
        assert fast.restarts == 1 and executor.broken_reason is None
        assert executor.worker_pids()["p0"] != pid
        expected, _ = sequential(ensemble, batch_with_first(0.25))
        assert_close(executor.predict(batch_with_first(0.25)), expected)
    assert_released(executor, [pid], executor.shared_memory_prefix, no_children=False)


def test_a_done_callback_may_submit_again_to_the_same_process_slots(
    executor: Executor, ensemble: Ensemble
) -> None:
    # replies are resolved outside the slot's read lock: a callback that submits (which takes
    # that lock to wake the reader) must not deadlock the reader thread that runs it
    batch = batch_with_first(0.75)
    expected, _ = sequential(ensemble, batch)
    chained: list[Future[EnsembleResult]] = []
    first = executor.submit(batch)
    first.add_done_callback(lambda _done: chained.append(executor.submit(batch)))
    assert_close(first.result(timeout=10.0).combined, expected)
    deadline = time.monotonic() + 10.0
    while not chained and time.monotonic() < deadline:
        time.sleep(0.01)
    assert chained, "the callback never ran to its end (deadlock?)"
    assert_close(chained[0].result(timeout=10.0).combined, expected)
    assert_close(executor.predict(batch), expected)  # and the slots still serve
