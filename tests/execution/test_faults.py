"""Dead workers: detected at once, requests fail (never hang), restart or report the plan broken."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest

from colocate import zoo
from colocate.ensemble import Ensemble
from colocate.errors import ColocateError, ModelLoadError, WorkerFailedError
from colocate.execution import EnsembleResult, Executor, run_requests
from colocate.planning.types import Plan, Slot

from .helpers import (
    assert_released,
    batch_with_first,
    forking_sleeper,
    make_plan,
    pid_exists,
    shm_left,
    sleeper,
    slow_loading,
)

TIMEOUT_S = 60.0
DETECT_S = 2.0  # a dead worker's requests must fail within this


def _plan_and_ensemble() -> tuple[Ensemble, Plan]:
    ensemble = Ensemble((zoo.member("mlp", scale="tiny"), sleeper("slow", delay_s=0.3)))
    plan = make_plan(Slot("s0", "stream", ("mlp",)), Slot("p0", "process", ("slow",), cpu_threads=1))
    return ensemble, plan


def _kill_mid_run(executor: Executor) -> tuple[int, list[Future[EnsembleResult]]]:
    assert executor.predict(batch_with_first(0.0)).shape == (4, 10)
    in_flight = [executor.submit(batch_with_first(0.0, seed=i)) for i in range(4)]
    time.sleep(0.1)  # the worker is inside the first request
    pid = executor.worker_pids()["p0"]
    os.kill(pid, signal.SIGKILL)
    return pid, in_flight


def test_killed_worker_fails_in_flight_and_new_requests_and_breaks_the_plan() -> None:
    ensemble, plan = _plan_and_ensemble()
    executor = Executor(plan, ensemble, on_worker_death="fail", request_timeout_s=TIMEOUT_S)
    with executor:
        prefix = executor.shared_memory_prefix
        pid, in_flight = _kill_mid_run(executor)
        killed_at = time.monotonic()
        for future in in_flight:
            with pytest.raises(WorkerFailedError, match=r"slot 'p0' \(process: slow\).*died.*SIGKILL"):
                future.result(timeout=DETECT_S)
        assert time.monotonic() - killed_at < DETECT_S
        assert not executor.alive
        assert executor.broken_reason is not None and "p0" in executor.broken_reason
        started = time.monotonic()
        with pytest.raises(WorkerFailedError, match=r"slot 'p0'.*plan is broken"):
            executor.predict(batch_with_first(0.0))
        assert time.monotonic() - started < 1.0  # failed at once, not after a timeout
        result = run_requests(executor, requests=5, warmup=0)
        assert result.status == "failed" and result.requests_completed == 0
        assert any("p0" in e for e in result.errors)
    assert_released(executor, [pid], prefix)


def test_a_dead_worker_is_seen_even_when_a_process_it_forked_keeps_its_pipe_open(tmp_path: Path) -> None:
    # the reader blocks on the pipe; the fork holds the worker's end open, so no end-of-file
    # comes: the watcher must see the death and shut the pipe
    pid_file = tmp_path / "fork.pid"
    ensemble = Ensemble((forking_sleeper("slow", 0.3, str(pid_file)),))
    plan = make_plan(Slot("p0", "process", ("slow",), cpu_threads=1))
    executor = Executor(plan, ensemble, on_worker_death="fail", request_timeout_s=TIMEOUT_S)
    fork_pid = None
    try:
        with executor:
            fork_pid = int(pid_file.read_text())
            assert pid_exists(fork_pid)
            in_flight = executor.submit(batch_with_first(0.0))
            time.sleep(0.1)
            os.kill(executor.worker_pids()["p0"], signal.SIGKILL)
            killed_at = time.monotonic()
            with pytest.raises(WorkerFailedError, match=r"slot 'p0'.*died.*SIGKILL"):
                in_flight.result(timeout=DETECT_S + 2.0)
            assert time.monotonic() - killed_at < DETECT_S + 2.0
            assert not executor.alive
    finally:
        if fork_pid is not None and pid_exists(fork_pid):
            os.kill(fork_pid, signal.SIGKILL)


def test_killed_worker_is_restarted_and_serving_goes_on() -> None:
    ensemble, plan = _plan_and_ensemble()
    executor = Executor(plan, ensemble, on_worker_death="restart", request_timeout_s=TIMEOUT_S)
    with executor:
        prefix = executor.shared_memory_prefix
        pid, in_flight = _kill_mid_run(executor)
        for future in in_flight:
            with pytest.raises(WorkerFailedError, match=r"slot 'p0'.*died.*restarting"):
                future.result(timeout=DETECT_S)
        # requests submitted while the new worker loads wait for it
        assert executor.predict(batch_with_first(0.0)).shape == (4, 10)
        new_pid = executor.worker_pids()["p0"]
        assert new_pid != pid
        stats = executor.stats()
        assert stats.worker_restarts == 1 and stats.alive and stats.broken_reason is None
    assert_released(executor, [pid, new_pid], prefix)


def test_close_fails_requests_in_flight_and_releases_everything() -> None:
    ensemble, plan = _plan_and_ensemble()
    executor = Executor(plan, ensemble, request_timeout_s=TIMEOUT_S, stop_grace_s=2.0)
    executor.start()
    pids = list(executor.worker_pids().values())
    prefix = executor.shared_memory_prefix
    futures = [executor.submit(batch_with_first(0.0, seed=i)) for i in range(6)]
    started = time.monotonic()
    executor.close()
    assert time.monotonic() - started < 5.0
    for future in futures:
        assert future.done()
    failed = [f for f in futures if f.exception() is not None]
    assert failed, "requests still queued at close must fail"
    for future in failed:
        assert isinstance(future.exception(), WorkerFailedError)
    assert_released(executor, pids, prefix)


def test_a_request_without_an_answer_fails_after_the_timeout() -> None:
    ensemble = Ensemble((sleeper("slow", delay_s=1.5),))
    plan = make_plan(Slot("s0", "stream", ("slow",)))
    with Executor(plan, ensemble, request_timeout_s=0.3) as executor:
        started = time.monotonic()
        with pytest.raises(WorkerFailedError, match=r"no answer within 0.3 s from slot 's0'"):
            executor.predict(batch_with_first(0.0))
        assert time.monotonic() - started < 1.2
        assert executor.stats().failed == 1


def test_an_executor_dropped_without_close_releases_its_workers() -> None:
    ensemble, plan = _plan_and_ensemble()
    executor = Executor(plan, ensemble).start()
    pids = list(executor.worker_pids().values())
    prefix = executor.shared_memory_prefix
    assert executor.predict(batch_with_first(0.0)).shape == (4, 10)
    del executor
    gc.collect()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and multiprocessing.active_children():
        time.sleep(0.05)
    assert multiprocessing.active_children() == []
    assert not [p for p in pids if pid_exists(p)]
    assert shm_left(prefix) == []


def test_a_closed_worker_process_counts_as_exited() -> None:
    # stop() joins and then closes the worker's process object; a watcher thread that looks at
    # it afterwards must see it gone, not die of "process object is closed" (it did, at random)
    from colocate.execution.processes import _has_exited

    process = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0.0,))
    process.start()
    process.join(60.0)
    process.close()
    with pytest.raises(ValueError, match="closed"):
        _ = process.pid  # what _has_exited read first
    assert _has_exited(process) is True


def test_stop_while_the_worker_loads_ends_start_at_once() -> None:
    # stop() came and went while start() waited for the worker's "ready": start() waited on
    # until the members had loaded, and the worker loaded on after stop() returned
    from colocate.devices import cpu_device
    from colocate.execution.processes import ProcessSlot

    slot = ProcessSlot(Slot("p0", "process", ("slow",)), (slow_loading("slow", 30.0),), cpu_device())
    outcome: list[BaseException | None] = []
    starter = threading.Thread(target=lambda: outcome.append(_error_of(slot.start)))
    starter.start()
    deadline = time.monotonic() + 30.0
    while not slot.pids and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # the worker imports and loads
    slot.stop()
    starter.join(timeout=10.0)
    assert not starter.is_alive(), "start() still waits for a stopped slot's worker"
    assert isinstance(outcome[0], WorkerFailedError) and "stopped while starting" in str(outcome[0])
    assert not [p for p in slot.pids if pid_exists(p)]


def _error_of(call: Callable[[], object]) -> BaseException | None:
    try:
        call()
    except BaseException as exc:
        return exc
    return None


def test_a_member_failing_to_load_stops_the_other_slots_loading() -> None:
    ensemble = Ensemble((slow_loading("slow", 60.0), slow_loading("broken", 0.5, fail=True)))
    plan = make_plan(Slot("p0", "process", ("slow",)), Slot("p1", "process", ("broken",)))
    executor = Executor(plan, ensemble)
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match=r"member 'broken'.*weights missing"):
        executor.start()
    assert time.monotonic() - started < 30.0, "start() waited for the other slot to finish loading"
    assert_released(executor, [], executor.shared_memory_prefix)


def test_ctrl_c_while_the_members_load_stops_the_workers_at_once() -> None:
    ensemble = Ensemble((slow_loading("slow", 60.0), slow_loading("slower", 60.0)))
    plan = make_plan(Slot("p0", "process", ("slow",)), Slot("p1", "process", ("slower",)))
    executor = Executor(plan, ensemble)
    # a real SIGINT, as Ctrl-C sends (interrupt_main() sets the flag but wakes no blocked wait)
    interrupt = threading.Timer(3.0, os.kill, args=(os.getpid(), signal.SIGINT))
    interrupt.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            executor.start()
    finally:
        interrupt.cancel()
    assert time.monotonic() - started < 30.0, "Ctrl-C waited for the members to load"
    assert_released(executor, [], executor.shared_memory_prefix)


@pytest.mark.parametrize("kind", ["stream", "process"])
def test_close_in_a_done_callback_returns_at_once_and_leaves_no_thread_failing(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # close() ran in the slot's own thread: each slot was stopped in a new thread, which then
    # joined the thread running the callback until its timeout (10 s), and a process slot's
    # reader then died of "process object is closed"
    thread_errors: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))
    ensemble = Ensemble((sleeper("a", delay_s=0.0),))
    executor = Executor(make_plan(Slot("s0", kind, ("a",))), ensemble, reply_wait="block").start()  # type: ignore[arg-type]
    pids = list(executor.worker_pids().values())
    closed = threading.Event()
    took: list[float] = []

    def close_here(_done: Future[EnsembleResult]) -> None:
        started = time.monotonic()
        executor.close()
        took.append(time.monotonic() - started)
        closed.set()

    executor.submit(batch_with_first(0.25)).add_done_callback(close_here)
    assert closed.wait(30.0)
    assert took[0] < 5.0, f"close() in a done callback took {took[0]:.1f} s"
    time.sleep(1.5)  # what the reader thread does once the callback returned
    assert thread_errors == []
    assert_released(executor, pids, executor.shared_memory_prefix)


def test_release_at_interpreter_exit_stops_the_slots_without_new_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # an executor never closed is released by its finalizer at exit, where Python 3.12+ refuses
    # to start threads: release() gave up before stopping any slot, leaving workers and memory
    from colocate.execution.front import _Resources

    stopped: list[str] = []

    class Slot_:
        def __init__(self, name: str) -> None:
            self.name = name

        def stop(self) -> None:
            stopped.append(self.name)

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    resources = _Resources()
    resources.slots.extend([Slot_("p0"), Slot_("p1")])  # type: ignore[list-item]
    monkeypatch.setattr(threading.Thread, "start", refuse)
    resources.release()
    assert stopped == ["p0", "p1"]


_UNIMPORTABLE_FACTORY = """
import sys
from dataclasses import dataclass
from colocate.ensemble import Ensemble, InputSpec, Member
from colocate.errors import ColocateError
from colocate.execution import Executor
from tests.execution.helpers import TINY_SHAPE, Head, make_plan, sleeper
from colocate.planning.types import Slot

@dataclass(frozen=True)
class LocalFactory:  # in the __main__ of `python -c`: it pickles here, a spawned worker cannot import it
    def __call__(self):
        return Head()

bad = Member(name="local_head", backend="torch", source=LocalFactory(), input=InputSpec(TINY_SHAPE))
ensemble = Ensemble((sleeper("good", 0.0), bad))
try:
    Executor(make_plan(Slot("p0", "process", ("good", "local_head"))), ensemble).start()
except ColocateError as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
"""


def test_a_member_the_worker_cannot_rebuild_is_named_with_the_fix() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", _UNIMPORTABLE_FACTORY], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout.startswith(
        "WorkerFailedError member 'local_head': the worker process could not rebuild"
    )
    assert "Can't get attribute 'LocalFactory'" in proc.stdout
    assert "define its factory or class in a module the worker can import" in proc.stdout


def test_close_does_not_hang_on_a_pipe_filled_behind_a_stuck_worker() -> None:
    # the worker reads nothing while one request runs: requests queued behind it fill the pipe,
    # a sender then blocks holding the send lock, and stop() waited for that lock forever
    ensemble = Ensemble((sleeper("stuck", delay_s=120.0),))
    plan = make_plan(Slot("p0", "process", ("stuck",), cpu_threads=1))
    executor = Executor(plan, ensemble, warmup=False, request_timeout_s=1.0, stop_grace_s=1.0).start()
    pids = list(executor.worker_pids().values())
    sent = [0]

    def flood() -> None:
        with contextlib.suppress(ColocateError):  # the executor closes under it
            for _ in range(100_000):
                executor.submit(batch_with_first(0.5))
                sent[0] += 1

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:  # until the sender blocks on the full pipe
        before = sent[0]
        time.sleep(0.5)
        if sent[0] == before:
            break
    assert sent[0] < 100_000, "the pipe never filled"
    closer = threading.Thread(target=executor.close, daemon=True)
    started = time.monotonic()
    closer.start()
    closer.join(timeout=30.0)
    assert not closer.is_alive(), "close() hangs"
    assert time.monotonic() - started < 15.0
    flooder.join(timeout=10.0)
    assert not flooder.is_alive(), "a sender stays blocked after close()"
    assert_released(executor, pids, executor.shared_memory_prefix)
