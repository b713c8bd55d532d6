"""The executor on a CUDA GPU: stream, process and MPS slots give the sequential loop's predictions.

Skipped without a GPU (tests/conftest.py); the MPS test also needs nvidia-cuda-mps-control.
"""

from __future__ import annotations

import numpy as np
import pytest

from colocate import devices, zoo
from colocate.devices import Device
from colocate.ensemble import Ensemble
from colocate.errors import MPSUnavailableError
from colocate.execution import Executor, run_requests
from colocate.planning.types import Slot

from .helpers import assert_released, make_plan, sequential

GIB = 1 << 30
RTOL = 1e-3
ATOL = 1e-5


def _ensemble() -> Ensemble:
    return Ensemble((zoo.member("resnet", scale="small"), zoo.member("mlp", scale="small")))


def _check(executor: Executor, ensemble: Ensemble, cuda: Device) -> None:
    batch = ensemble.members[0].input.example(8, seed=5)
    expected, expected_members = sequential(ensemble, batch, cuda)
    combined, members = executor.predict(batch, return_members=True)
    np.testing.assert_allclose(combined, expected, rtol=RTOL, atol=ATOL)
    for name, output in expected_members.items():
        np.testing.assert_allclose(members[name], output, rtol=RTOL, atol=ATOL)
    futures = [executor.submit(ensemble.members[0].input.example(8, seed=i)) for i in range(16)]
    for i, future in enumerate(futures):
        reference = sequential(ensemble, ensemble.members[0].input.example(8, seed=i), cuda)[0]
        np.testing.assert_allclose(future.result(timeout=120).combined, reference, rtol=RTOL, atol=ATOL)
    result = run_requests(executor, requests=20, concurrency=4)
    assert result.status == "ok" and result.throughput_sps > 0
    # each slot's clock readings (the worker's, for process and mps slots) bracket its members'
    # run, GPU work included (fetching the outputs waits for the slot's stream)
    timed = executor.predict_result(batch)
    assert {t.slot for t in timed.slots} == {s.name for s in executor.plan.slots}
    for timing in timed.slots:
        assert timing.compute_s > 0.0 and timing.queued_s >= 0.0 and timing.returned_s >= 0.0
        assert timing.queued_s + timing.compute_s + timing.returned_s <= timed.latency_s
    assert 0.0 <= timed.overhead_s < timed.latency_s
    assert result.overhead is not None and len(result.overhead.samples_s) == result.requests_completed


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_stream_slots_on_cuda(cuda: Device, cuda_graphs: bool) -> None:
    ensemble = _ensemble()
    plan = make_plan(Slot("s0", "stream", ("resnet",)), Slot("s1", "stream", ("mlp",)), device=cuda)
    with Executor(plan, ensemble, cuda_graphs=cuda_graphs) as executor:
        _check(executor, ensemble, cuda)


@pytest.mark.gpu
def test_process_slots_on_cuda(cuda: Device) -> None:
    ensemble = _ensemble()
    plan = make_plan(Slot("p0", "process", ("resnet",)), Slot("p1", "process", ("mlp",)), device=cuda)
    executor = Executor(plan, ensemble)
    with executor:
        pids = list(executor.worker_pids().values())
        prefix = executor.shared_memory_prefix
        _check(executor, ensemble, cuda)
    assert_released(executor, pids, prefix, no_children=False)


@pytest.mark.gpu
@pytest.mark.mps
def test_mps_slots_on_cuda_with_a_private_daemon(cuda: Device) -> None:
    ensemble = _ensemble()
    plan = make_plan(
        Slot("m0", "mps", ("resnet",), thread_percentage=50.0, memory_limit_bytes=8 * GIB),
        Slot("m1", "mps", ("mlp",), thread_percentage=50.0, memory_limit_bytes=8 * GIB),
        device=cuda,
    )
    executor = Executor(plan, ensemble, allow_mps_start=True)
    try:
        executor.start()
    except MPSUnavailableError as exc:  # the machine does not allow MPS (e.g. a VM without it)
        pytest.skip(f"MPS cannot be used here: {exc}")
    with executor:
        daemon = executor.mps_daemon
        assert daemon is not None and daemon.pipe_directory is not None
        pipe = daemon.pipe_directory
        started = daemon.started
        pids = list(executor.worker_pids().values())
        _check(executor, ensemble, cuda)
    assert_released(executor, pids, None, no_children=False)
    if started:  # a daemon colocate started is gone, with its private directory
        assert not devices.mps_daemon_running(str(pipe))
        assert not pipe.exists()


@pytest.mark.gpu
@pytest.mark.mps
def test_mps_workers_join_the_mps_server(cuda: Device) -> None:
    # an mps slot whose worker made a CUDA context of its own would be time-sliced like a process
    ensemble = _ensemble()
    plan = make_plan(
        Slot("m0", "mps", ("resnet",), thread_percentage=50.0),
        Slot("m1", "mps", ("mlp",), thread_percentage=50.0),
        device=cuda,
    )
    executor = Executor(plan, ensemble, allow_mps_start=True)
    try:
        executor.start()
    except MPSUnavailableError as exc:
        pytest.skip(f"MPS cannot be used here: {exc}")
    with executor:
        executor.predict(ensemble.members[0].input.example(8, seed=1))
        contexts = executor.worker_contexts()
    if set(contexts.values()) <= {"not-listed", "unknown"}:
        pytest.skip(f"NVML does not list the workers ({contexts}): a PID namespace, or no NVML")
    assert set(contexts.values()) == {"mps-client"}, contexts


@pytest.mark.gpu
def test_process_workers_have_cuda_contexts_of_their_own(cuda: Device) -> None:
    if devices.mps_daemon_running():
        pytest.skip("an MPS daemon runs for every process here: workers join it")
    ensemble = _ensemble()
    plan = make_plan(Slot("p0", "process", ("resnet",)), Slot("p1", "process", ("mlp",)), device=cuda)
    with Executor(plan, ensemble) as executor:
        executor.predict(ensemble.members[0].input.example(8, seed=1))
        contexts = executor.worker_contexts()
    if set(contexts.values()) <= {"not-listed", "unknown"}:
        pytest.skip(f"NVML does not list the workers ({contexts}): a PID namespace, or no NVML")
    assert set(contexts.values()) == {"own-context"}, contexts
