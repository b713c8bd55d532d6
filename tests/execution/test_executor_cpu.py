"""The executor on the CPU: every slot kind gives the sequential loop's predictions."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from collections.abc import Iterator
from concurrent.futures import wait

import numpy as np
import pytest

from colocate import serde, zoo
from colocate.devices import simulated_device
from colocate.ensemble import Ensemble, InputSpec, Member
from colocate.errors import DeviceError, InvalidInputError, WorkerFailedError
from colocate.execution import Executor, RunResult, run_requests
from colocate.execution.mps import MpsSlot, usable_cores
from colocate.planning.types import Slot

from .helpers import (
    TINY_SHAPE,
    assert_close,
    assert_released,
    batch_with_first,
    bomb,
    flatten_identity,
    make_plan,
    sequential,
    sleeper,
)

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    return zoo.default_ensemble(scale="tiny")


@pytest.fixture(scope="module")
def batch(ensemble: Ensemble) -> np.ndarray:
    return ensemble.members[0].input.example(4, seed=7)


@pytest.fixture(scope="module")
def reference(ensemble: Ensemble, batch: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    return sequential(ensemble, batch)


@pytest.fixture(scope="module")
def mixed(ensemble: Ensemble) -> Iterator[Executor]:
    """Stream + process + mps (pinned to half the cores) slots, shared by several tests."""
    plan = make_plan(
        Slot("s0", "stream", ("resnet", "mlp"), cpu_threads=1),
        Slot("p0", "process", ("mobilenet", "vit"), cpu_threads=1),
        Slot("m0", "mps", ("efficientnet",), thread_percentage=50.0),
    )
    executor = Executor(plan, ensemble, request_timeout_s=TIMEOUT_S)
    with executor:
        yield executor
    assert_released(executor, [], executor.shared_memory_prefix)


def test_stream_slots_match_sequential(
    ensemble: Ensemble, batch: np.ndarray, reference: tuple[np.ndarray, dict[str, np.ndarray]]
) -> None:
    plan = make_plan(
        Slot("s0", "stream", ("resnet", "mobilenet"), cpu_threads=1),
        Slot("s1", "stream", ("efficientnet",), cpu_threads=1),
        Slot("s2", "stream", ("vit", "mlp"), cpu_threads=1),
    )
    with Executor(plan, ensemble) as executor:
        combined = executor.predict(batch)
        assert executor.shared_memory_prefix is None  # no workers: no shared memory
    assert_close(combined, reference[0])


def test_process_slots_match_sequential(
    ensemble: Ensemble, batch: np.ndarray, reference: tuple[np.ndarray, dict[str, np.ndarray]]
) -> None:
    plan = make_plan(
        Slot("p0", "process", ("resnet", "mobilenet", "mlp"), cpu_threads=1),
        Slot("p1", "process", ("efficientnet", "vit"), cpu_threads=1),
    )
    executor = Executor(plan, ensemble)
    with executor:
        pids = executor.worker_pids()
        assert set(pids) == {"p0", "p1"}
        combined, members = executor.predict(batch, return_members=True)
        prefix = executor.shared_memory_prefix
        assert executor.shared_memory_names()  # the batch went through shared memory
    assert_close(combined, reference[0])
    for name, output in reference[1].items():
        assert_close(members[name], output)
    assert_released(executor, pids.values(), prefix, no_children=False)


def test_mixed_slots_match_sequential_and_return_members(
    mixed: Executor, batch: np.ndarray, reference: tuple[np.ndarray, dict[str, np.ndarray]]
) -> None:
    combined, members = mixed.predict(batch, return_members=True)
    assert_close(combined, reference[0])
    assert set(members) == set(reference[1])
    for name, output in reference[1].items():
        assert members[name].shape == output.shape
        assert_close(members[name], output)
    result = mixed.submit(batch).result(timeout=TIMEOUT_S)
    assert result.members is None
    assert result.latency_s > 0
    assert_close(result.combined, reference[0])


def test_many_concurrent_submits_each_get_their_own_answer(mixed: Executor, ensemble: Ensemble) -> None:
    spec = ensemble.members[0].input
    batches = [spec.example(4, seed=100 + i) for i in range(20)]
    futures = [mixed.submit(b) for b in batches]
    _done, not_done = wait(futures, timeout=TIMEOUT_S)
    assert not not_done
    results = [f.result() for f in futures]
    ids = [r.request_id for r in results]
    assert ids == sorted(ids) and len(set(ids)) == 20
    for b, result in zip(batches, results, strict=True):
        assert_close(result.combined, sequential(ensemble, b)[0])
    assert not np.allclose(results[0].combined, results[1].combined)  # distinct inputs, distinct answers
    ordered = mixed.predict_many(batches[:5])
    for b, result in zip(batches[:5], ordered, strict=True):
        assert_close(result.combined, sequential(ensemble, b)[0])


def test_the_caller_may_reuse_its_batch_right_after_submit(mixed: Executor, ensemble: Ensemble) -> None:
    spec = ensemble.members[0].input
    original = spec.example(4, seed=3)
    buffer = original.copy()
    future = mixed.submit(buffer)
    buffer[:] = 0.0  # overwritten before the answer: the executor copied it
    assert_close(future.result(timeout=TIMEOUT_S).combined, sequential(ensemble, original)[0])


def test_bad_batch_fails_that_request_naming_the_member(mixed: Executor, batch: np.ndarray) -> None:
    with pytest.raises(InvalidInputError, match=r"member '.*'.*dtype float64"):
        mixed.predict(batch.astype(np.float64))
    with pytest.raises(InvalidInputError, match="numpy array"):
        mixed.predict([[1.0, 2.0]])  # type: ignore[call-overload]
    assert mixed.predict(batch).shape == (4, 10)  # still serving
    stats = mixed.stats()
    assert stats.failed >= 2 and stats.completed >= 1 and stats.alive and stats.broken_reason is None
    assert stats.latency is not None and stats.latency.median_s > 0


def test_run_requests_counts_and_measures(mixed: Executor) -> None:
    seen: list[tuple[int, int | None]] = []
    result = run_requests(
        mixed, requests=12, concurrency=4, warmup=2, progress=lambda d, t: seen.append((d, t))
    )
    assert result.status == "ok"
    assert result.requests_completed == 12 and result.requests_failed == 0
    assert result.throughput_sps > 0 and result.wall_s > 0
    assert result.latency is not None and len(result.latency.samples_s) == 12
    assert result.batch_size == 4 and result.concurrency == 4 and result.warmup_requests == 2
    roles = [m.role for m in result.memory]
    assert roles == ["front", "p0", "m0"]
    assert all(m.peak_host_bytes and m.peak_host_bytes > 0 for m in result.memory)
    assert result.peak_memory_bytes is not None
    assert result.versions["torch"] and result.versions["colocate"]
    assert seen and seen[-1] == (12, 12)
    timed = run_requests(mixed, seconds=0.5, concurrency=2, warmup=0)
    assert timed.requests_completed > 0 and timed.status == "ok"
    for measured in (result, timed):
        assert serde.loads(RunResult, serde.dumps(measured)) == measured


def test_mps_slot_on_the_cpu_is_pinned_to_its_share_of_the_cores(mixed: Executor) -> None:
    slot = next(s for s in mixed.slots if s.name == "m0")
    assert isinstance(slot, MpsSlot)
    cores = usable_cores()
    assert slot.cpu_cores is not None
    assert len(slot.cpu_cores) == max(1, round(0.5 * len(cores)))
    assert os.sched_getaffinity(mixed.worker_pids()["m0"]) == set(slot.cpu_cores)
    assert slot.spec.cpu_threads == len(slot.cpu_cores)
    assert not any(key.startswith("CUDA_MPS") for key in slot.spec.env)  # no MPS on the CPU


def test_member_raising_fails_only_that_request_in_stream_and_process_slots() -> None:
    members = (
        zoo.member("mlp", scale="tiny"),
        bomb("bomb_s", trigger=999.0),
        bomb("bomb_p", trigger=777.0),
    )
    ensemble = Ensemble(members)
    plan = make_plan(
        Slot("s0", "stream", ("mlp", "bomb_s")),
        Slot("p0", "process", ("bomb_p",), cpu_threads=1),
    )
    executor = Executor(plan, ensemble, request_timeout_s=TIMEOUT_S)
    with executor:
        pids = executor.worker_pids()
        good = executor.submit(batch_with_first(0.5))
        bad_stream = executor.submit(batch_with_first(999.0))
        bad_process = executor.submit(batch_with_first(777.0))
        after = executor.submit(batch_with_first(0.25, seed=1))
        assert good.result(timeout=TIMEOUT_S).combined.shape == (4, 10)
        with pytest.raises(
            WorkerFailedError, match=r"member 'bomb_s' in slot 's0' raised RuntimeError: boom"
        ):
            bad_stream.result(timeout=TIMEOUT_S)
        with pytest.raises(
            WorkerFailedError, match=r"member 'bomb_p' in slot 'p0' raised RuntimeError: boom"
        ):
            bad_process.result(timeout=TIMEOUT_S)
        assert after.result(timeout=TIMEOUT_S).combined.shape == (4, 10)
        assert executor.alive
        assert executor.predict(batch_with_first(0.0)).shape == (4, 10)
        prefix = executor.shared_memory_prefix
    assert_released(executor, pids.values(), prefix, no_children=False)


def _unpicklable_factory() -> object:
    raise AssertionError("never called")


def test_process_slot_members_must_pickle() -> None:
    local = Member(
        name="local",
        backend="torch",
        source=lambda: _unpicklable_factory(),
        input=InputSpec((-1, 3, 32, 32)),
    )
    with pytest.raises(Exception):  # noqa: B017 - only documents that lambdas do not pickle
        pickle.dumps(local)
    plan = make_plan(Slot("p0", "process", ("local",)))
    with pytest.raises(InvalidInputError, match=r"member 'local' cannot be sent to a worker.*module-level"):
        Executor(plan, Ensemble((local,))).start()


def test_plan_checks(ensemble: Ensemble) -> None:
    partial = make_plan(Slot("s0", "stream", ("resnet",)))
    with pytest.raises(InvalidInputError, match="missing"):
        Executor(partial, ensemble).start()
    everything = make_plan(Slot("s0", "stream", ensemble.member_names))
    simulated = make_plan(Slot("s0", "stream", ensemble.member_names), device=simulated_device("h100"))
    with pytest.raises(DeviceError, match="simulated"):
        Executor(simulated, ensemble).start()
    executor = Executor(everything, ensemble)
    with pytest.raises(InvalidInputError, match="start"):
        executor.submit(ensemble.members[0].input.example(2))
    executor.close()
    executor.close()  # idempotent
    with pytest.raises(InvalidInputError, match="closed"):
        executor.start()
    with pytest.raises(InvalidInputError, match="on_worker_death"):
        Executor(everything, ensemble, on_worker_death="ignore")  # type: ignore[arg-type]


def test_load_error_names_the_member_and_releases_everything() -> None:
    broken = Member(
        name="broken",
        backend="torch",
        source=zoo.ModelFactory("mlp", scale="tiny"),
        input=InputSpec((-1, 3, 32, 32)),
        options={"no_such_option": True},
    )
    ensemble = Ensemble((zoo.member("mlp", scale="tiny"), broken))
    plan = make_plan(Slot("s0", "stream", ("mlp",)), Slot("s1", "stream", ("broken",)))
    executor = Executor(plan, ensemble)
    with pytest.raises(InvalidInputError, match=r"member 'broken'.*no_such_option"):
        executor.start()
    assert not executor.alive


@pytest.mark.parametrize("kind", ["stream", "process"])
def test_a_member_failing_on_the_warm_up_batch_fails_start_naming_it(kind: str) -> None:
    first = float(InputSpec((-1, 3, 32, 32)).example(4, seed=0).flat[0])  # what the warm-up batch holds
    ensemble = Ensemble((zoo.member("mlp", scale="tiny"), bomb("doomed", trigger=first)))
    plan = make_plan(Slot("s0", "stream", ("mlp",)), Slot("x0", kind, ("doomed",)))  # type: ignore[arg-type]
    executor = Executor(plan, ensemble)
    with pytest.raises(
        WorkerFailedError,
        match=r"member 'doomed' in slot 'x0' raised RuntimeError on a warm-up batch of 4: boom",
    ):
        executor.start()
    assert not executor.alive
    assert [c for c in multiprocessing.active_children() if c.name.endswith("-x0")] == []


def test_mps_partitions_that_oversubscribe_the_cores_are_not_pinned() -> None:
    cores = usable_cores()
    ensemble = zoo.default_ensemble(scale="tiny")
    names = ensemble.member_names[: len(cores) + 1]  # one partition more than there are cores
    share = 100.0 / len(names)
    plan = make_plan(*(Slot(f"m{i}", "mps", (n,), thread_percentage=share) for i, n in enumerate(names)))
    sub = Ensemble(tuple(ensemble.member(n) for n in names), name="oversubscribed")
    with Executor(plan, sub) as executor:
        slots = [s for s in executor.slots if isinstance(s, MpsSlot)]
        assert all(s.cpu_cores is None for s in slots)  # the OS balances them
        assert all(s.spec.cpu_threads == 1 for s in slots)
        assert executor.predict(sub.members[0].input.example(4)).shape == (4, 10)


def test_an_output_that_is_a_view_of_the_shared_batch_outlives_the_next_request() -> None:
    # beside a worker slot the batch goes through shared memory, and a stream slot's member reads
    # that view: a member returning (a view of) its input handed back memory the next request
    # overwrote once the block was reused
    echo = Member(name="echo", backend="torch", source=flatten_identity, input=InputSpec(TINY_SHAPE))
    ensemble = Ensemble((echo, sleeper("worker", delay_s=0.0)))
    plan = make_plan(Slot("s0", "stream", ("echo",)), Slot("p0", "process", ("worker",), cpu_threads=1))
    with Executor(plan, ensemble) as executor:
        first = executor.submit(batch_with_first(0.25), return_members=True).result(timeout=60)
        assert first.members is not None
        kept = first.members["echo"].copy()
        executor.submit(np.full_like(batch_with_first(0.0), 9.0)).result(timeout=60)
        np.testing.assert_array_equal(first.members["echo"], kept)
        assert first.members["echo"].flat[0] == np.float32(0.25)
