"""How predict() waits for its worker processes' replies: Executor(reply_wait=...).

"block" sleeps in poll until a reply comes; "spin" polls without sleeping for the whole
wait; "auto" polls near the expected reply when a core is free, else sleeps. These tests
check the decision, the polling window, and what poll is actually asked in real requests.
"""

from __future__ import annotations

import math
import select
import types
from collections import deque
from collections.abc import Iterator

import numpy as np
import pytest

from colocate.devices import Device
from colocate.ensemble import Ensemble
from colocate.errors import InvalidInputError
from colocate.execution import Executor, front
from colocate.planning.types import Slot

from .helpers import assert_close, batch_with_first, make_plan, sequential, sleeper

DELAY_S = 0.02


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    return Ensemble((sleeper("a", delay_s=DELAY_S), sleeper("b", delay_s=DELAY_S)))


def _two_processes(threads: int = 1) -> tuple[Slot, Slot]:
    return (
        Slot("p0", "process", ("a",), cpu_threads=threads),
        Slot("p1", "process", ("b",), cpu_threads=threads),
    )


def _cores(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(front, "usable_cores", lambda: tuple(range(count)))


def test_reply_wait_is_checked(ensemble: Ensemble) -> None:
    with pytest.raises(InvalidInputError, match="reply_wait must be 'auto', 'spin' or 'block', got 'busy'"):
        Executor(make_plan(*_two_processes()), ensemble, reply_wait="busy")  # type: ignore[arg-type]


def test_auto_polls_only_when_the_workers_leave_a_core_free(
    ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    def decided(*slots: Slot, reply_wait: str = "auto", device: Device | None = None) -> str:
        executor = Executor(make_plan(*slots, device=device), ensemble, reply_wait=reply_wait)  # type: ignore[arg-type]
        return executor._decide_reply_polling()

    _cores(monkeypatch, 3)
    assert decided(*_two_processes(threads=1)) == "near-reply"  # 2 busy threads + the poller <= 3
    assert decided(*_two_processes(threads=2)) == "sleep"  # 4 busy threads: no core to spare
    # a stream slot's thread shares the interpreter with the poller: never poll beside it
    beside_a_stream = (
        Slot("p0", "process", ("a",), cpu_threads=1),
        Slot("s0", "stream", ("b",), cpu_threads=1),
    )
    assert decided(*beside_a_stream) == "sleep"
    assert decided(*_two_processes(threads=2), reply_wait="spin") == "throughout"  # forced
    assert decided(*_two_processes(threads=1), reply_wait="block") == "sleep"
    _cores(monkeypatch, 4)  # a CPU mps slot computes with its share of the cores
    assert decided(Slot("m0", "mps", ("a", "b"), thread_percentage=50.0)) == "near-reply"  # 2 of 4
    assert decided(Slot("m0", "mps", ("a", "b"), thread_percentage=100.0)) == "sleep"  # all 4
    # an mps worker on the CPU computes with one thread per core of its share, whatever the
    # slot's cpu_threads says (MpsSlot sets it so): 4 busy threads, no core to spare
    assert decided(Slot("m0", "mps", ("a", "b"), thread_percentage=100.0, cpu_threads=1)) == "sleep"
    # on a GPU each worker keeps one thread busy, whatever its torch thread count
    gpu = Device(kind="cuda", name="a GPU", cpu_cores=2)
    _cores(monkeypatch, 2)
    assert decided(Slot("p0", "process", ("a", "b"), cpu_threads=8), device=gpu) == "near-reply"
    assert decided(*_two_processes(threads=8), device=gpu) == "sleep"


def test_the_polling_window_spans_the_recent_waits_for_the_batch_shape(ensemble: Ensemble) -> None:
    executor = Executor(make_plan(*_two_processes()), ensemble)
    executor._reply_polling = "near-reply"
    start, shape, other = 100.0, (4, 3, 32, 32), (64, 3, 32, 32)

    def window(waits: list[float], of: tuple[int, ...] = shape) -> tuple[float, float]:
        executor._reply_waits.clear()
        executor._reply_waits[shape] = deque(waits)
        return executor._polling_window(start, of)

    assert window([0.020, 0.022]) == (start, start)  # too few waits yet: sleep
    # 20.0-22.0 ms in 0.2 ms steps: 10th percentile 20.2, 90th 21.8, typical 21
    even = [0.020 + 0.0002 * i for i in range(11)]
    lead = 0.05 * 0.021  # the typical wait's share, within 0.2-2 ms
    assert window(even) == pytest.approx((start + 0.0202 - lead, start + 0.0218 + lead))
    assert window(even, of=other) == (start, start)  # another shape: nothing known yet
    # one outlier in eleven does not widen the window past the 90th percentile
    assert window([*even[:-1], 0.5])[1] == pytest.approx(start + 0.0218 + lead, abs=0.0005)
    # long waits: the lead is at most 2 ms (5 % would be 5 ms)
    assert window([0.100, 0.101, 0.102]) == pytest.approx((start + 0.1002 - 0.002, start + 0.1018 + 0.002))
    # short waits: the lead is at least 0.2 ms, and the window opens no earlier than half the wait
    assert window([0.0006, 0.001, 0.001]) == pytest.approx((start + 0.0005, start + 0.0012))
    # waits spread over more than half the typical one: polling through them is not worth a core
    assert window([0.010, 0.020, 0.030]) == (start, start)
    executor._reply_polling = "throughout"
    assert executor._polling_window(start, shape) == (start, math.inf)
    executor._reply_polling = "sleep"
    assert executor._polling_window(start, shape) == (start, start)


def test_recent_waits_are_kept_per_shape_for_a_few_shapes(ensemble: Ensemble) -> None:
    executor = Executor(make_plan(*_two_processes()), ensemble)
    for i in range(20):
        executor._record_wait((1, 3, 32, 32), 0.001 * i)
    assert list(executor._reply_waits[(1, 3, 32, 32)]) == pytest.approx([0.001 * i for i in range(4, 20)])
    for batch in range(2, 18):  # 16 more shapes: the oldest one is dropped
        executor._record_wait((batch, 3, 32, 32), 0.01)
    assert len(executor._reply_waits) == 16
    assert (1, 3, 32, 32) not in executor._reply_waits
    assert (17, 3, 32, 32) in executor._reply_waits


class _RecordingPoll:
    """select.poll, recording the timeout of every call."""

    def __init__(self, timeouts: list[float | None]) -> None:
        self._poll = select.poll()
        self._timeouts = timeouts

    def register(self, fd: int, mask: int) -> None:
        self._poll.register(fd, mask)

    def unregister(self, fd: int) -> None:
        self._poll.unregister(fd)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        self._timeouts.append(timeout)
        return self._poll.poll(timeout)


@pytest.fixture()
def timeouts(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[float | None]]:
    recorded: list[float | None] = []
    fake = types.SimpleNamespace(poll=lambda: _RecordingPoll(recorded), POLLIN=select.POLLIN)
    monkeypatch.setattr(front, "select", fake)
    yield recorded


def _poll_timeouts_per_request(
    executor: Executor, ensemble: Ensemble, timeouts: list[float | None], requests: int
) -> list[list[float | None]]:
    batch = batch_with_first(0.25)
    expected, _ = sequential(ensemble, batch)
    per_request = []
    for _ in range(requests):
        timeouts.clear()
        assert_close(executor.predict(batch), expected)
        per_request.append(list(timeouts))
    return per_request


REQUESTS = 12


@pytest.mark.parametrize("reply_wait", ["auto", "spin", "block"])
def test_predict_polls_as_reply_wait_says(
    reply_wait: str, ensemble: Ensemble, timeouts: list[float | None], monkeypatch: pytest.MonkeyPatch
) -> None:
    _cores(monkeypatch, 4)  # so that "auto" has a core to spare on any machine
    plan = make_plan(*_two_processes(threads=1))
    with Executor(plan, ensemble, reply_wait=reply_wait, request_timeout_s=60.0) as executor:  # type: ignore[arg-type]
        polling = {"auto": "near-reply", "spin": "throughout", "block": "sleep"}[reply_wait]
        assert executor.reply_polling == polling
        # the workers poll after each reply exactly when the replies are polled for
        idle_poll_s = 0.0 if reply_wait == "block" else front._WORKER_IDLE_POLL_S
        assert executor.worker_idle_poll_s == idle_poll_s > 0.0 or reply_wait == "block"
        assert [slot.spec.idle_poll_s for slot in executor._resources.slots] == [idle_poll_s] * 2
        per_request = _poll_timeouts_per_request(executor, ensemble, timeouts, requests=REQUESTS)
    assert all(per_request), "every request waited in poll"
    zero = [[t for t in calls if t == 0] for calls in per_request]
    if reply_wait == "block":
        assert not any(zero)  # asleep until each reply
    elif reply_wait == "spin":
        assert all(t == 0 for calls in per_request for t in calls)  # never asleep
    else:
        assert not any(zero[:3])  # no window before three waits are known
        # then asleep for most of the ~20 ms wait (one timeout of whole milliseconds), and
        # polling without sleeping near the reply in a good share of the requests: on a busy
        # 2-core machine a slow early wait keeps the window shut for a while (its waits spread
        # too far), and a reply that comes early arrives while the front still sleeps (a fresh
        # clone's run polled in 1 of 5 requests after the first three, while 8 requests were made)
        later = per_request[3:]
        assert sum(1 for calls in later if calls[0] is not None and calls[0] >= 5) >= len(later) - 1
        assert sum(1 for z in zero[3:] if z) >= len(later) // 3
    (waits,) = executor._reply_waits.values()  # one batch shape
    assert len(waits) == REQUESTS
    assert all(0.9 * DELAY_S <= w <= 60.0 for w in waits)


def test_spinning_gives_the_same_answers_as_members_called_directly(
    ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = make_plan(*_two_processes(threads=1))
    rng = np.random.default_rng(5)
    with Executor(plan, ensemble, reply_wait="spin") as executor:
        for _ in range(3):
            batch = rng.normal(size=(4, 3, 32, 32)).astype(np.float32)
            combined, members = executor.predict(batch, return_members=True)
            expected, expected_members = sequential(ensemble, batch)
            assert_close(combined, expected)
            for name, output in expected_members.items():
                assert_close(members[name], output)


@pytest.mark.parametrize("idle_poll_s", [0.0, 0.05])
def test_a_worker_polls_its_pipe_after_a_reply_only_when_told(
    idle_poll_s: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    import multiprocessing
    import pickle
    import threading
    import time

    from colocate.execution import processes
    from colocate.execution._shm import BlockCache, SharedBatchPool

    calls: list[float | None] = []
    # the worker's module only: select.poll elsewhere stays the real one
    recording = types.SimpleNamespace(poll=lambda: _RecordingPoll(calls), POLLIN=select.POLLIN)
    monkeypatch.setattr(processes, "select", recording)
    front_end, worker_end = multiprocessing.Pipe()
    pool = SharedBatchPool()
    block = pool.acquire(64)
    blocks = BlockCache()
    worker = threading.Thread(target=processes._serve, args=(worker_end, [], blocks, "s0", idle_poll_s))
    worker.start()
    try:
        front_end.send_bytes(pickle.dumps(("run", 7, block.name, (2, 2), "float32")))
        reply = pickle.loads(front_end.recv_bytes())
        assert reply[:3] == ("ok", 7, [])  # no members: no outputs
        time.sleep(idle_poll_s + 0.05)  # past the polling window: asleep on the pipe by now
        calls_then = len(calls)
        time.sleep(0.05)
        assert len(calls) == calls_then, "the worker kept polling past its window"
        front_end.send_bytes(pickle.dumps(("stop",)))
        worker.join(5.0)
        assert not worker.is_alive()
    finally:
        blocks.close()
        pool.close()
        front_end.close()
    polled = [t for t in calls if t == 0]
    if idle_poll_s == 0.0:
        assert len(polled) == 2  # one look for more messages after each of the two it received
    else:
        assert len(polled) > 100  # polled without sleeping through the 50 ms after its reply
