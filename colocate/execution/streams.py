"""``stream`` slots: members run in the serving process, on a thread (and a CUDA stream) of their own.

Each :class:`StreamSlot` owns one daemon thread and a queue. The thread creates
and activates the slot's runners itself and then serves the queue: for each
batch it enqueues every member (``prepare`` + ``run``) and then fetches the
outputs. On a GPU the work goes to the slot's own CUDA stream
(:func:`~colocate.execution.base.make_slot_stream`), and fetching an output waits
for that stream only (``Stream.synchronize``), never for the whole device, so the
slots' kernels overlap. The frameworks release the interpreter lock while they
compute; torch members with the ``cuda_graph`` option replay one CUDA graph per
batch, which takes the host (and the lock) out of the loop almost entirely.

On the CPU the thread runs the members with torch's intra-op thread pool, which
is shared by the whole process: the executor sets it once to the largest
``cpu_threads`` of the plan's stream slots. ONNX Runtime members get the slot's
``cpu_threads`` as their own ``intra_op_num_threads``.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING

from colocate.ensemble import Member
from colocate.errors import ColocateError, WorkerFailedError
from colocate.execution.base import (
    MemberCallError,
    RequestBatch,
    activate_runners,
    deactivate_runners,
    describe_slot,
    make_slot_stream,
    member_error,
    run_members,
)
from colocate.execution.types import SlotAnswer

if TYPE_CHECKING:
    from colocate.backends.base import MemberRunner
    from colocate.devices import Device
    from colocate.planning.types import Slot

_Item = tuple[RequestBatch, "Future[SlotAnswer]"]


class StreamSlot:
    """A ``stream`` slot: a thread of the serving process (with its own CUDA stream on a GPU).

    Args:
        slot: the plan's slot.
        members: the slot's members, in run order.
        device: where they run (CPU or CUDA).
        start_timeout_s: how long :meth:`start` waits for the members to load.
        warmup_batch_size: run one batch of this size through every member before serving
            (None: no warm-up).
    """

    kind = "stream"

    def __init__(
        self,
        slot: Slot,
        members: tuple[Member, ...],
        device: Device,
        *,
        start_timeout_s: float = 300.0,
        warmup_batch_size: int | None = None,
    ) -> None:
        self.slot = slot
        self.members = members
        self.device = device
        self.start_timeout_s = start_timeout_s
        self.warmup_batch_size = warmup_batch_size
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._lock = threading.Lock()
        self._stopped = False

    @property
    def name(self) -> str:
        """The slot's name in the plan."""
        return self.slot.name

    @property
    def alive(self) -> bool:
        """Whether the slot's thread is serving."""
        thread = self._thread
        return thread is not None and thread.is_alive() and self._ready.is_set() and not self._stopped

    def start(self) -> None:
        """Start the thread, which loads the members; wait until they are loaded.

        Raises:
            ColocateError: a member could not be loaded (the loader's own error, naming it).
            WorkerFailedError: loading took longer than ``start_timeout_s``.
        """
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._main, name=f"colocate-slot-{self.name}", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.start_timeout_s):
            self.stop()
            raise WorkerFailedError(
                f"{describe_slot(self.slot)}: the members did not load within {self.start_timeout_s:g} s"
            )
        if self._load_error is not None:
            self._thread.join(timeout=5.0)
            error = self._load_error
            if isinstance(error, ColocateError):
                raise error
            raise WorkerFailedError(
                f"{describe_slot(self.slot)}: loading the members failed: {type(error).__name__}: {error}"
            ) from error

    def submit(self, batch: RequestBatch) -> Future[SlotAnswer]:
        """Queue ``batch``; the future holds every member's raw output (or the member's error)."""
        future: Future[SlotAnswer] = Future()
        with self._lock:
            if self._stopped or not self.alive:
                future.set_exception(
                    WorkerFailedError(f"{describe_slot(self.slot)} is not serving (stopped or not started)")
                )
                return future
            self._queue.put((batch, future))
        return future

    def stop(self, grace_s: float = 10.0) -> None:
        """Fail the queued requests, let the running one finish, stop the thread. Idempotent.

        A member stuck inside the framework cannot be interrupted: the thread is
        a daemon and is left behind after ``grace_s``.
        """
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            pending: list[_Item] = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    pending.append(item)
            self._queue.put(None)
        closed = WorkerFailedError(f"{describe_slot(self.slot)} was stopped before this request ran")
        for _, future in pending:
            _fail(future, closed)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=grace_s)

    # -- the slot's thread

    def _main(self) -> None:
        runners: list[MemberRunner] = []
        try:
            stream = make_slot_stream(self.device)
            runners = activate_runners(
                self.members, self.device, stream, warmup_batch_size=self.warmup_batch_size
            )
        except MemberCallError as failure:  # reported by start(), never raised in this thread
            self._load_error = member_error(failure.error, failure.member, self.name, failure.context)
            self._ready.set()
            return
        except BaseException as exc:
            self._load_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                batch, future = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    started_s = time.perf_counter()
                    outputs = run_members(runners, batch.array, self.name)
                    finished_s = time.perf_counter()
                except BaseException as exc:  # a failing member fails its request, never the thread
                    if not isinstance(exc, ColocateError):
                        exc = WorkerFailedError(f"{describe_slot(self.slot)}: {type(exc).__name__}: {exc}")
                    future.set_exception(exc)
                else:
                    future.set_result(SlotAnswer(outputs, started_s, finished_s))
                del item, batch, future  # hold nothing of a finished request while waiting
        finally:
            deactivate_runners(runners)


def _fail(future: Future[SlotAnswer], error: BaseException) -> None:
    if future.set_running_or_notify_cancel():
        future.set_exception(error)


__all__ = ["StreamSlot"]
