"""The front of an executor: fan a request out to every slot, gather, combine, measure.

:class:`Executor` starts the slots of a :class:`~colocate.planning.types.Plan`
and serves the ensemble::

    with Executor(plan, ensemble) as executor:
        probs = executor.predict(batch)                    # combined (batch, classes)
        future = executor.submit(batch, return_members=True)
        result = future.result()                           # EnsembleResult

Every request reaches every slot with the same batch (written once into shared
memory when the plan has worker processes); each slot runs its members one
after another and answers with their raw outputs; when all slots have answered,
the ensemble's combine rule makes the prediction. A request's latency runs from
``submit`` to the combined result.

Faults: a member that raises fails that request only, with an error naming the
member; a worker process that dies fails its requests in flight at once
(:class:`~colocate.errors.WorkerFailedError` naming the slot) and is restarted or
marks the executor broken (``on_worker_death``); a request that gets no answer
within ``request_timeout_s`` fails. :meth:`Executor.close` releases workers,
shared memory and any MPS daemon it started; it also runs when the executor is
garbage-collected and at interpreter exit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import select
import statistics
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError, as_completed
from concurrent.futures import ThreadPoolExecutor as _ThreadPool
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np

from colocate._timing import LatencyStats
from colocate.ensemble import Array, Ensemble, Member
from colocate.errors import (
    ColocateError,
    DeviceError,
    InvalidInputError,
    WorkerFailedError,
)
from colocate.execution._shm import SharedBatchPool, SharedBlock
from colocate.execution.base import (
    RequestBatch,
    SlotExecutor,
    describe_slot,
    set_torch_threads,
    with_cpu_threads,
    with_cuda_graph,
)
from colocate.execution.mps import MpsDaemon, MpsSlot, cpu_share, usable_cores
from colocate.execution.processes import OnWorkerDeath, ProcessSlot, pickle_members
from colocate.execution.streams import StreamSlot
from colocate.execution.types import EnsembleResult, ExecutorStats, SlotAnswer, SlotTiming
from colocate.planning.cost import cpu_threads_per_slot
from colocate.planning.types import Plan, Slot

_WATCHDOG_INTERVAL_S = 0.1
_OWN_THREAD_PREFIX = "colocate-"  # every thread an executor or its slots start is named so
_LATENCY_WINDOW = 100_000
_ACCEPTED_LAYOUTS_KEPT = 64  # batch layouts remembered as accepted by every member
# Polling near the expected reply (reply_wait "auto" with a free core): the recent waits it
# goes by (per batch shape, for this many shapes), how many before it starts, the most their
# 10th-90th percentiles may spread (a share of the typical wait), and the lead before the
# short end and after the long end (a share of the typical wait, within bounds).
_REPLY_WAITS_KEPT = 16
_REPLY_WAIT_SHAPES_KEPT = 16
_REPLY_WAITS_NEEDED = 3
_REPLY_WAITS_MAX_SPREAD = 0.5
_POLL_LEAD_SHARE = 0.05
_POLL_LEAD_MIN_S = 0.0002
_POLL_LEAD_MAX_S = 0.002
# How long a worker polls its pipe after each reply when a core is free (reply polling on):
# a caller in a loop sends its next request within a fraction of a millisecond of the reply
# (on this project's 2-core VM, 0.4-0.6 ms: its reply read, combine and dispatch).
_WORKER_IDLE_POLL_S = 0.001

ReplyWait = Literal["auto", "spin", "block"]
REPLY_WAITS: tuple[ReplyWait, ...] = ("auto", "spin", "block")
#: how a predict() call waits for process slots' replies, as decided from ``reply_wait``
ReplyPolling = Literal["sleep", "near-reply", "throughout"]


@dataclass
class _Request:
    """A request in flight (front-side bookkeeping)."""

    request_id: int
    future: Future[EnsembleResult]
    start_s: float
    deadline_s: float
    return_members: bool
    shape: tuple[int, ...]  # the batch's shape: a request's time depends on it
    waiting: set[str]  # slots that have not answered yet
    block: SharedBlock | None
    outputs: dict[str, Array] = field(default_factory=dict)
    timings: list[SlotTiming] = field(default_factory=list)  # in the order the slots answered
    error: BaseException | None = None


class _Resources:
    """What must be released on close, kept apart from the executor so a finalizer can hold it."""

    def __init__(self) -> None:
        self.slots: list[SlotExecutor] = []
        self.pool: SharedBatchPool | None = None
        self.daemon: MpsDaemon | None = None
        self.stop_event = threading.Event()
        self.watchdog: threading.Thread | None = None
        self.torch_threads_before: int | None = None
        self.released = False
        self.lock = threading.Lock()

    def release(self) -> None:
        with self.lock:
            if self.released:
                return
            self.released = True
        self.stop_event.set()
        errors: list[BaseException] = []

        def stop(slot: SlotExecutor) -> None:
            try:
                slot.stop()
            except Exception as exc:  # go on releasing the rest
                errors.append(exc)

        if threading.current_thread().name.startswith(_OWN_THREAD_PREFIX):
            # called from one of the executor's threads (close() in a done callback): a slot
            # stopped in another thread would join this one, which waits for that thread
            for slot in self.slots:
                stop(slot)
        else:
            self._stop_in_parallel(stop)
        if self.watchdog is not None and self.watchdog is not threading.current_thread():
            self.watchdog.join(timeout=2.0)
        if self.pool is not None:
            self.pool.close()
        if self.daemon is not None:
            try:
                self.daemon.stop()
            except Exception as exc:
                errors.append(exc)
        if self.torch_threads_before is not None:
            with contextlib.suppress(Exception):
                set_torch_threads(self.torch_threads_before)
        if errors:
            raise errors[0]

    def _stop_in_parallel(self, stop: Callable[[SlotExecutor], None]) -> None:
        """Each worker gets its stop message at once, and the grace periods overlap."""
        stoppers = [
            threading.Thread(target=stop, args=(slot,), name=f"colocate-stop-{slot.name}", daemon=True)
            for slot in self.slots
        ]
        started: list[threading.Thread] = []
        for thread, slot in zip(stoppers, self.slots, strict=True):
            try:
                thread.start()
                started.append(thread)
            except RuntimeError:  # at interpreter exit (the finalizer) Python 3.12+ starts no thread
                stop(slot)
        for thread in started:
            thread.join()


class Executor:
    """Runs a plan: starts its slots, serves the ensemble, measures, and stops everything on close.

    Args:
        plan: the plan to run; its ``device`` is where it runs (the CPU or a CUDA GPU). A
            member the plan chose a backend variant for (``plan.backends``) runs as that
            variant (:func:`colocate.variants.variant_member`), in every slot kind.
        ensemble: the ensemble the plan was made for (the plan must cover exactly its members).
        on_worker_death: ``"fail"``: a dead worker process marks the executor broken (every
            later request fails at once, with the reason); ``"restart"``: start a new worker
            (requests in flight at the death still fail; later ones wait for the new worker).
        allow_mps_start: for ``mps`` slots on a GPU, start a private MPS control daemon when
            none runs (and stop it on close). Without it and without a daemon, :meth:`start`
            raises :class:`~colocate.errors.MPSUnavailableError` saying how to enable MPS.
        request_timeout_s: a request not answered within this time fails with
            :class:`~colocate.errors.WorkerFailedError`.
        start_timeout_s: how long each slot may take to load its members.
        max_restarts: restarts per slot before it is marked failed anyway.
        cuda_graphs: on a GPU, run torch members with CUDA-graph replay (the member option
            ``cuda_graph``) unless a member sets the option itself.
        stop_grace_s: how long :meth:`close` waits for a worker before terminating it.
        warmup: each slot runs one random batch of the plan's batch size through its members
            before serving (lazy initialisation, autotuning and CUDA-graph capture happen then,
            one member at a time in a process); a member failing on it fails :meth:`start`.
        reply_wait: how a thread in :meth:`predict` waits for its process and mps slots'
            replies. A thread that sleeps for the milliseconds a request takes wakes slowly
            and runs its next microseconds of code slowly (on a virtual machine several
            times slower); one that polls does not, but it keeps a core busy meanwhile.
            ``"block"``: sleep until the reply comes. ``"spin"``: poll the pipes without
            sleeping for the whole wait (like ``cudaDeviceScheduleSpin``). ``"auto"``
            (default): when a core is free, sleep through most of the wait and poll from a
            little before the short end of the recent waits for batches of that shape (their
            10th percentile) to a little after the long end (their 90th; at most the second
            half of the typical wait, and not at all while they spread over more than half
            of it); else sleep. A core is free when every slot
            is a worker process (a stream slot's thread would share this interpreter with
            the polling one) and the workers' busy threads (their torch threads on the CPU,
            one each on a GPU) leave at least one usable core. :attr:`reply_polling` says
            what was decided. Whenever replies are polled for, each worker also polls its pipe
            for a millisecond after each reply before it sleeps (:attr:`worker_idle_poll_s`),
            so that the caller's next request finds it awake.

    Worker processes are started with ``spawn``: a script that uses process or mps
    slots needs the usual ``if __name__ == "__main__":`` guard, and their members must
    pickle (a module-level factory or a model file path).
    """

    def __init__(
        self,
        plan: Plan,
        ensemble: Ensemble,
        *,
        on_worker_death: OnWorkerDeath = "fail",
        allow_mps_start: bool = False,
        request_timeout_s: float = 60.0,
        start_timeout_s: float = 300.0,
        max_restarts: int = 3,
        cuda_graphs: bool = False,
        stop_grace_s: float = 5.0,
        warmup: bool = True,
        reply_wait: ReplyWait = "auto",
    ) -> None:
        if on_worker_death not in ("fail", "restart"):
            raise InvalidInputError(f"on_worker_death must be 'fail' or 'restart', got {on_worker_death!r}")
        check_reply_wait(reply_wait)
        if not request_timeout_s > 0:
            raise InvalidInputError(f"request_timeout_s must be positive, got {request_timeout_s}")
        if max_restarts < 0:
            raise InvalidInputError(f"max_restarts must be >= 0, got {max_restarts}")
        self.plan = plan
        self.ensemble = ensemble
        self.on_worker_death: OnWorkerDeath = on_worker_death
        self.allow_mps_start = allow_mps_start
        self.request_timeout_s = float(request_timeout_s)
        self.start_timeout_s = float(start_timeout_s)
        self.max_restarts = max_restarts
        self.cuda_graphs = cuda_graphs
        self.stop_grace_s = stop_grace_s
        #: batch size of the warm-up batch each slot runs before serving (None: no warm-up)
        self.warmup_batch_size: int | None = plan.batch_size if warmup else None
        self.reply_wait: ReplyWait = reply_wait
        self._reply_polling: ReplyPolling = "sleep"  # decided by start()
        # recent foreground waits by batch shape (a batch of 64 takes longer than one of 1)
        self._reply_waits: dict[tuple[int, ...], deque[float]] = {}
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, self._resources.release)
        self._lock = threading.Lock()
        self._pending: dict[int, _Request] = {}
        self._next_id = 0
        self._started = False
        self._closed = False
        self._uses_shm = any(s.kind in ("process", "mps") for s in plan.slots)
        self._submitted = 0
        self._completed = 0
        self._failed = 0
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._overheads: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        self._variants: dict[str, Member] = {}  # member name -> member as run (the plan's variant)
        self._accepted_layouts: set[tuple[tuple[int, ...], str]] = set()  # (shape, dtype) checked ok

    # -- lifecycle

    def __enter__(self) -> Executor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> Executor:
        """Check the plan, start every slot (in parallel) and wait until all members are loaded.

        Raises:
            DeviceError: the plan's device cannot run models (a simulated GPU).
            InvalidInputError: the plan does not cover the ensemble's members, or a member of
                a process/mps slot does not pickle (the message names it and the fix).
            MPSUnavailableError: mps slots on a GPU without an MPS daemon (says how to enable it).
            ColocateError: a member failed to load (naming it); everything started is released.
        """
        with self._lock:
            if self._closed:
                raise InvalidInputError("this executor is closed; create a new Executor to run again")
            if self._started:
                return self
            self._started = True
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        plan, device = self.plan, self.plan.device
        if not device.can_execute:
            raise DeviceError(
                f"the plan is for '{device.name}', a {device.kind} device that cannot run models; "
                "make the plan for a real device (colocate.devices.best_device() or 'cpu')"
            )
        if device.kind not in ("cpu", "cuda"):
            raise DeviceError(f"cannot execute on a {device.kind} device")
        plan.check_covers(self.ensemble.member_names)
        self._variants = {name: self._variant_of(name) for name in plan.members}
        for slot in plan.slots:  # every worker's members must pickle: checked before anything starts
            if slot.kind in ("process", "mps"):
                pickle_members(slot, tuple(self._variants[m] for m in slot.members))
        resources = self._resources
        # decided from the plan alone, before the workers start: they poll after each reply too
        self._reply_polling = self._decide_reply_polling()
        slots = self._make_slots()  # pickles process members: fails before anything starts
        resources.slots.extend(slots)
        if self._uses_shm:
            resources.pool = SharedBatchPool()
        if device.kind == "cpu":
            threads = [self._cpu_threads(s) or 0 for s in plan.slots if s.kind == "stream"]
            has_torch = any(
                self._variants[m].backend == "torch"
                for s in plan.slots
                if s.kind == "stream"
                for m in s.members
            )
            if threads and has_torch:
                resources.torch_threads_before = set_torch_threads(max(threads))
        pool = _ThreadPool(max_workers=len(slots), thread_name_prefix="colocate-start")
        try:
            starts = [pool.submit(slot.start) for slot in slots]
            try:
                failed = next((f for f in as_completed(starts) if f.exception() is not None), None)
            except BaseException:  # Ctrl-C while the members load: the other slots stop loading
                with contextlib.suppress(Exception):
                    resources.release()
                raise
            if failed is not None:  # one slot failed: the others stop loading instead of finishing
                with contextlib.suppress(Exception):
                    resources.release()
                error = failed.exception()
                assert error is not None
                raise error
        finally:
            pool.shutdown(wait=True)
        resources.watchdog = threading.Thread(
            target=_watchdog,
            args=(weakref.ref(self), resources.stop_event),
            name="colocate-executor-watchdog",
            daemon=True,
        )
        resources.watchdog.start()

    def _make_slots(self) -> list[SlotExecutor]:
        plan, device = self.plan, self.plan.device
        slots: list[SlotExecutor] = []
        cores = usable_cores()
        core_offset: int | None = 0
        cpu_mps = [s for s in plan.slots if s.kind == "mps"] if device.kind == "cpu" else []
        if sum(len(cpu_share(s, cores)) for s in cpu_mps) > len(cores):
            core_offset = None  # partitions oversubscribe the cores: leave placement to the OS
        for slot in plan.slots:
            members = tuple(self._member_for(name, self._cpu_threads(slot)) for name in slot.members)
            if slot.kind == "stream":
                slots.append(
                    StreamSlot(
                        slot,
                        members,
                        device,
                        start_timeout_s=self.start_timeout_s,
                        warmup_batch_size=self.warmup_batch_size,
                    )
                )
                continue
            options: dict[str, Any] = {
                "idle_poll_s": self.worker_idle_poll_s,
                "warmup_batch_size": self.warmup_batch_size,
                "on_worker_death": self.on_worker_death,
                "max_restarts": self.max_restarts,
                "start_timeout_s": self.start_timeout_s,
                "stop_grace_s": self.stop_grace_s,
            }
            if slot.kind == "process":
                threads = self._cpu_threads(slot)
                slots.append(ProcessSlot(slot, members, device, cpu_threads=threads, **options))
                continue
            daemon: MpsDaemon | None = None
            if device.kind == "cuda":
                if self._resources.daemon is None:
                    self._resources.daemon = MpsDaemon(allow_start=self.allow_mps_start).start()
                daemon = self._resources.daemon
            mps_slot = MpsSlot(slot, members, device, daemon=daemon, cpu_offset=core_offset, **options)
            if device.kind == "cpu" and core_offset is not None:
                core_offset += len(cpu_share(slot, cores, core_offset))
            slots.append(mps_slot)
        return slots

    @property
    def reply_polling(self) -> ReplyPolling:
        """How :meth:`predict` waits for process and mps slots' replies, decided by :meth:`start`
        from ``reply_wait``: ``"sleep"``, ``"near-reply"`` (poll around the expected reply) or
        ``"throughout"``."""
        return self._reply_polling

    @property
    def worker_idle_poll_s(self) -> float:
        """How long each process or mps worker polls its pipe after a reply before it sleeps:
        a millisecond when replies are polled for (``reply_wait`` ``"spin"``, or ``"auto"``
        with a core free), so that a caller's next request finds the worker awake; else 0."""
        return 0.0 if self._reply_polling == "sleep" else _WORKER_IDLE_POLL_S

    def _decide_reply_polling(self) -> ReplyPolling:
        if self.reply_wait == "spin":
            return "throughout"
        if self.reply_wait == "auto" and self._has_core_to_poll():
            return "near-reply"
        return "sleep"

    def _has_core_to_poll(self) -> bool:
        """Whether a thread polling for replies leaves the plan's own work its cores and this
        interpreter (``reply_wait="auto"``)."""
        slots = self.plan.slots
        if not slots or any(slot.kind == "stream" for slot in slots):
            return False  # a stream slot's thread runs in this interpreter beside the poller
        cores = usable_cores()
        if self.plan.device.kind == "cpu":
            busy = sum(self._worker_threads(slot, cores) for slot in slots)
        else:
            busy = len(slots)  # a GPU worker keeps one thread busy: the one launching its kernels
        return busy + 1 <= len(cores)

    def _worker_threads(self, slot: Slot, cores: tuple[int, ...]) -> int:
        """The threads a CPU worker of ``slot`` computes with (as :class:`MpsSlot` and
        :meth:`_make_slots` give them: an mps worker one per core of its share)."""
        if slot.kind == "mps":
            return len(cpu_share(slot, cores))
        return self._cpu_threads(slot) or len(cores)

    def _cpu_threads(self, slot: Slot) -> int | None:
        """A CPU slot's intra-op threads: the plan's, else a fair share of the cores per slot.

        ``mps`` slots size themselves from their core share; GPU slots leave it to the framework.
        """
        if self.plan.device.kind != "cpu" or slot.kind == "mps":
            return slot.cpu_threads
        return slot.cpu_threads or cpu_threads_per_slot(len(usable_cores()), len(self.plan.slots))

    def _variant_of(self, name: str) -> Member:
        """The member as the plan runs it: with the backend variant the plan chose, if any."""
        member = self.ensemble.member(name)
        choice = self.plan.backend_of(name)
        if choice is None:
            return member
        from colocate.variants import variant_member

        return variant_member(member, choice.label, self.plan.device)

    def _member_for(self, name: str, cpu_threads: int | None) -> Member:
        member = self._variants[name]
        if self.plan.device.kind == "cpu":
            return with_cpu_threads(member, cpu_threads)
        return with_cuda_graph(member) if self.cuda_graphs else member

    def close(self) -> None:
        """Stop every slot, fail what is still in flight, unlink shared memory, stop an MPS daemon
        this executor started, restore torch's thread count. Idempotent; also runs at exit."""
        with self._lock:
            self._closed = True
        try:
            self._finalizer()
        finally:
            with self._lock:
                leftover = list(self._pending.values())
                self._pending.clear()
            closed = WorkerFailedError("the executor was closed before this request finished")
            for request in leftover:
                self._finish_failed(request.future, closed)

    # -- serving

    @property
    def alive(self) -> bool:
        """Whether the executor is started, not closed, and every slot serves."""
        return self._started and not self._closed and all(slot.alive for slot in self._resources.slots)

    @property
    def broken_reason(self) -> str | None:
        """Why the executor cannot serve any more (a failed worker), else None."""
        for slot in self._resources.slots:
            failure = getattr(slot, "failure", None)
            if failure:
                return str(failure)
        if self._started and not self._closed:
            for slot in self._resources.slots:
                if not slot.alive:
                    return f"slot '{slot.name}' stopped serving"
        return None

    @property
    def slots(self) -> tuple[SlotExecutor, ...]:
        """The running slots, in plan order."""
        return tuple(self._resources.slots)

    @property
    def mps_daemon(self) -> MpsDaemon | None:
        """The MPS daemon the mps slots joined (GPU only; ``started`` says whether this executor
        started it, and so stops it on close), else None."""
        return self._resources.daemon

    def worker_contexts(self) -> dict[str, str]:
        """Slot name -> how NVML lists its worker on the plan's GPU (process and mps slots).

        ``"mps-client"`` (the worker joined the MPS server: what an mps slot should be),
        ``"own-context"`` (a CUDA context of its own, time-sliced with the others: what a
        process slot is without MPS, and an mps slot that did not join), ``"not-listed"`` (no
        CUDA context yet, or a container's PID namespace hides it) or ``"unknown"`` (no NVML).
        Empty on the CPU.
        """
        if self.plan.device.kind != "cuda":
            return {}
        from colocate.profiling.sampler import gpu_contexts, nvml_index

        pids = self.worker_pids()
        found = gpu_contexts(nvml_index(self.plan.device), pids.values())
        if found is None:
            return dict.fromkeys(pids, "unknown")
        return {slot: found[pid] for slot, pid in pids.items()}

    def worker_pids(self) -> dict[str, int]:
        """Slot name -> process id of its current worker (process and mps slots)."""
        pids: dict[str, int] = {}
        for slot in self._resources.slots:
            pid = getattr(slot, "pid", None)
            if isinstance(pid, int):
                pids[slot.name] = pid
        return pids

    def shared_memory_names(self) -> tuple[str, ...]:
        """Names of the shared-memory blocks that exist now (for checks; empty after close)."""
        pool = self._resources.pool
        return pool.names if pool is not None else ()

    @property
    def shared_memory_prefix(self) -> str | None:
        """The prefix of every shared-memory block this executor creates (None without workers)."""
        pool = self._resources.pool
        return pool.prefix if pool is not None else None

    def submit(self, batch: Array, *, return_members: bool = False) -> Future[EnsembleResult]:
        """Start one request; the future resolves to an :class:`EnsembleResult` or to the error.

        The batch is copied (into shared memory when the plan has workers), so the caller may
        reuse it as soon as this returns. A batch the members do not accept fails the future
        with an :class:`~colocate.errors.InvalidInputError` naming the member.

        Raises:
            InvalidInputError: the executor is not started or is closed.
        """
        return self._submit(batch, return_members)[0]

    def _submit(self, batch: Array, return_members: bool) -> tuple[Future[EnsembleResult], _Request | None]:
        """:meth:`submit`, also returning the request's bookkeeping (None when it failed at once)."""
        start_s = time.perf_counter()
        future: Future[EnsembleResult] = Future()
        with self._lock:
            if self._closed:
                raise InvalidInputError("this executor is closed; create a new Executor")
            if not self._started:
                raise InvalidInputError("call start() (or use 'with Executor(...)') before submit()")
            request_id = self._next_id
            self._next_id += 1
            self._submitted += 1
        error = self._check_batch(batch)
        if error is not None:
            self._finish_failed(future, error)
            return future, None
        array = np.asarray(batch)
        block: SharedBlock | None = None
        pool = self._resources.pool
        try:
            if pool is not None:
                block = pool.acquire(array.nbytes)
                view = block.view(array.shape, array.dtype)
                np.copyto(view, array)
                slot_batch = RequestBatch(request_id, view, block.name)
            else:
                slot_batch = RequestBatch(request_id, np.array(array, copy=True))
        except (ColocateError, OSError) as exc:  # no room in shared memory
            self._finish_failed(future, exc)
            return future, None
        slots = self._resources.slots
        request = _Request(
            request_id=request_id,
            future=future,
            start_s=start_s,
            deadline_s=start_s + self.request_timeout_s,
            return_members=return_members,
            shape=tuple(array.shape),
            waiting={slot.name for slot in slots},
            block=block,
        )
        with self._lock:
            self._pending[request_id] = request
        for slot in slots:
            # the callback holds the executor weakly: a finished future kept somewhere (futures keep
            # their callbacks) must not keep the executor, and so its workers, alive
            done = functools.partial(_slot_done, weakref.ref(self), request, slot.name)
            slot.submit(slot_batch).add_done_callback(done)
        return future, request

    @overload
    def predict(self, batch: Array, *, return_members: Literal[False] = False) -> Array: ...

    @overload
    def predict(self, batch: Array, *, return_members: Literal[True]) -> tuple[Array, dict[str, Array]]: ...

    def predict(
        self, batch: Array, *, return_members: bool = False
    ) -> Array | tuple[Array, dict[str, Array]]:
        """The combined prediction for ``batch`` (and, with ``return_members``, each member's output).

        Raises:
            ColocateError: the request failed (a member's error names it; a dead worker's names the slot).
        """
        result = self.predict_result(batch, return_members=return_members)
        if return_members:
            return result.combined, dict(result.members or {})
        return result.combined

    def predict_result(self, batch: Array, *, return_members: bool = False) -> EnsembleResult:
        """:meth:`predict`, giving the whole :class:`EnsembleResult`: the prediction and where its time went.

        ``result.slots`` says, per slot, how long the request waited to start, computed and
        took to come back; ``result.overhead_s`` is the latency neither the members nor the
        combine rule spent.

        Raises:
            ColocateError: the request failed (a member's error names it; a dead worker's names the slot).
        """
        return self._submit_and_read(batch, return_members).result(timeout=self.request_timeout_s + 5.0)

    def _submit_and_read(self, batch: Array, return_members: bool = False) -> Future[EnsembleResult]:
        """Submit ``batch`` and read the process slots' replies in this thread until they answered it.

        A process slot's reply then wakes this thread directly, instead of waking the slot's
        reader thread, which would then wake this one (see ``ProcessSlot.begin_foreground``).
        The future is done when this returns, unless a stream slot is still running the request
        (or the request timed out).
        """
        readers: dict[int, ProcessSlot] = {}
        for slot in self._resources.slots:
            if isinstance(slot, ProcessSlot):
                fd = slot.begin_foreground()
                if fd is not None:
                    readers[fd] = slot
        try:
            future, request = self._submit(batch, return_members)
            if readers and request is not None:
                self._read_in_foreground(request, dict(readers))
        finally:
            for slot in readers.values():
                slot.end_foreground()
        return future

    def _read_in_foreground(self, request: _Request, readers: dict[int, ProcessSlot]) -> None:
        """Read the process slots' replies until none of them is still to answer ``request``.

        Asleep in ``poll`` until they come, except within the polling window of
        ``reply_wait`` (:meth:`_polling_window`), where ``poll`` does not sleep.
        """
        waiting = select.poll()
        for fd in readers:
            waiting.register(fd, select.POLLIN)
        deadline = request.deadline_s
        poll_from, poll_until = self._polling_window(request.start_s, request.shape)
        replied_s: float | None = None  # when the last reply was seen

        def unanswered() -> bool:
            return not request.future.done() and any(s.name in request.waiting for s in readers.values())

        while readers and unanswered():
            now = time.perf_counter()
            if now >= deadline:
                return  # the watchdog fails the request
            if now >= poll_until:
                timeout_ms = (deadline - now) * 1000.0
            elif now >= poll_from:
                timeout_ms = 0.0
            else:  # poll's timeout is whole milliseconds, rounded up: round down to be awake in time
                timeout_ms = float(math.floor((poll_from - now) * 1000.0))
            events = waiting.poll(timeout_ms)
            if events:
                replied_s = time.perf_counter()
            for fd, _ in events:
                slot = readers.get(fd)
                if slot is not None and not slot.read_replies():
                    del readers[fd]  # its pipe ended: the slot's reader thread handles that
                    waiting.unregister(fd)
        if replied_s is not None and not unanswered():
            self._record_wait(request.shape, replied_s - request.start_s)

    def _record_wait(self, shape: tuple[int, ...], waited_s: float) -> None:
        """Keep how long a request of this batch shape waited for its replies (the last few,
        for the last few shapes)."""
        with self._lock:
            waits = self._reply_waits.get(shape)
            if waits is None:
                if len(self._reply_waits) >= _REPLY_WAIT_SHAPES_KEPT:
                    self._reply_waits.pop(next(iter(self._reply_waits)))  # the oldest shape
                waits = self._reply_waits[shape] = deque(maxlen=_REPLY_WAITS_KEPT)
            waits.append(waited_s)

    def _polling_window(self, start_s: float, shape: tuple[int, ...]) -> tuple[float, float]:
        """When to poll for a request's replies without sleeping (``perf_counter`` seconds).

        ``"near-reply"``: from a lead before the short end of the recent waits for batches of
        this shape (their 10th percentile) to a lead after the long end (the 90th), starting no
        earlier than half the typical (median) wait; nothing until a few waits are known, nor
        while they spread over more than half the typical wait (polling through such a spread
        costs a core for little).
        ``"throughout"``: the whole wait. ``"sleep"``: never.
        """
        if self._reply_polling == "throughout":
            return start_s, math.inf
        if self._reply_polling == "sleep":
            return start_s, start_s
        with self._lock:
            waits = list(self._reply_waits.get(shape, ()))
        if len(waits) < _REPLY_WAITS_NEEDED:
            return start_s, start_s
        typical_s = statistics.median(waits)
        deciles = statistics.quantiles(waits, n=10, method="inclusive")
        short_s, long_s = deciles[0], deciles[-1]  # one outlier does not widen the window
        if long_s - short_s > _REPLY_WAITS_MAX_SPREAD * typical_s:
            return start_s, start_s
        lead_s = min(max(_POLL_LEAD_SHARE * typical_s, _POLL_LEAD_MIN_S), _POLL_LEAD_MAX_S)
        poll_from_s = max(short_s - lead_s, typical_s / 2)
        return start_s + poll_from_s, start_s + long_s + lead_s

    def predict_many(
        self, batches: Iterable[Array], *, return_members: bool = False, max_in_flight: int | None = None
    ) -> list[EnsembleResult]:
        """Results for many batches, in their order, keeping up to ``max_in_flight`` requests going.

        Raises:
            ColocateError: the first failed request's error (in batch order).
        """
        limit = max_in_flight if max_in_flight is not None else 2 * len(self.plan.slots)
        if limit < 1:
            raise InvalidInputError(f"max_in_flight must be >= 1, got {limit}")
        futures: list[Future[EnsembleResult]] = []
        results: list[EnsembleResult] = []
        wait_s = self.request_timeout_s + 5.0
        for batch in batches:
            if len(futures) - len(results) >= limit:
                results.append(futures[len(results)].result(timeout=wait_s))
            futures.append(self.submit(batch, return_members=return_members))
        results.extend(f.result(timeout=wait_s) for f in futures[len(results) :])
        return results

    def stats(self) -> ExecutorStats:
        """Counters and request latencies so far."""
        with self._lock:
            latencies = list(self._latencies)
            overheads = list(self._overheads)
            in_flight = len(self._pending)
            submitted, completed, failed = self._submitted, self._completed, self._failed
        restarts = sum(int(getattr(slot, "restarts", 0)) for slot in self._resources.slots)
        return ExecutorStats(
            submitted=submitted,
            completed=completed,
            failed=failed,
            in_flight=in_flight,
            worker_restarts=restarts,
            alive=self.alive,
            broken_reason=self.broken_reason,
            latency=LatencyStats.from_samples(latencies) if latencies else None,
            overhead=LatencyStats.from_samples(overheads) if overheads else None,
        )

    # -- internals

    def _check_batch(self, batch: object) -> ColocateError | None:
        if not isinstance(batch, np.ndarray):
            return InvalidInputError(
                f"ensemble '{self.ensemble.name}': a batch must be a numpy array, got "
                f"{type(batch).__name__}; convert it with numpy.asarray(...)"
            )
        # the checks depend on shape and dtype only: a layout every member accepted once passes
        layout = (batch.shape, batch.dtype.str)
        if layout in self._accepted_layouts:
            return None
        for member in self.ensemble.members:
            try:
                member.input.check(member.name, batch)
            except InvalidInputError as exc:
                return exc
        if len(self._accepted_layouts) < _ACCEPTED_LAYOUTS_KEPT:
            self._accepted_layouts.add(layout)
        return None

    def _finish_failed(self, future: Future[EnsembleResult], error: BaseException) -> None:
        if _fail(future, error):
            with self._lock:
                self._failed += 1

    def _on_slot_done(self, request: _Request, slot: str, slot_future: Future[SlotAnswer]) -> None:
        answered_s = time.perf_counter()
        answer: SlotAnswer | None = None
        error: BaseException | None = None
        try:
            answer = slot_future.result()  # done already: one look at it, not two
        except BaseException as exc:  # the slot's error fails the request
            error = exc
        with self._lock:
            if answer is None:
                if request.error is None:
                    request.error = error
            else:
                request.outputs.update(answer.outputs)
                request.timings.append(
                    SlotTiming(
                        slot=slot,
                        queued_s=answer.started_s - request.start_s,
                        compute_s=answer.finished_s - answer.started_s,
                        returned_s=answered_s - answer.finished_s,
                    )
                )
            request.waiting.discard(slot)
            if request.waiting:
                return
            self._pending.pop(request.request_id, None)
        if request.block is not None and self._resources.pool is not None:
            # a stream slot's member may return its input or a view of it (torch hands back CPU
            # tensors without a copy): keep such an output, since the block serves the next request
            whole = request.block.view((request.block.capacity,), np.dtype(np.uint8))
            for name, output in request.outputs.items():
                if np.may_share_memory(output, whole):
                    request.outputs[name] = output.copy()
            self._resources.pool.release(request.block)
        self._finish(request)

    def _finish(self, request: _Request) -> None:
        if request.future.done():  # timed out or closed already
            return
        if request.error is not None:
            self._finish_failed(request.future, request.error)
            return
        combine_start_s = time.perf_counter()
        try:
            combined = self.ensemble.combine_outputs(request.outputs)
        except Exception as exc:
            self._finish_failed(request.future, exc)
            return
        end_s = time.perf_counter()
        latency = end_s - request.start_s
        result = EnsembleResult(
            combined=combined,
            members=dict(request.outputs) if request.return_members else None,
            latency_s=latency,
            request_id=request.request_id,
            slots=tuple(request.timings),
            combine_s=end_s - combine_start_s,
        )
        try:
            request.future.set_result(result)
        except InvalidStateError:
            return
        with self._lock:
            self._completed += 1
            self._latencies.append(latency)
            self._overheads.append(result.overhead_s)

    def _expire(self, now_s: float) -> None:
        """Fail the requests past their deadline (called by the watchdog thread)."""
        with self._lock:
            late = [r for r in self._pending.values() if r.deadline_s <= now_s and not r.future.done()]
        for request in late:
            names = (
                ", ".join(describe_slot(s) for s in self.plan.slots if s.name in request.waiting) or "none"
            )
            self._finish_failed(
                request.future,
                WorkerFailedError(
                    f"request {request.request_id}: no answer within {self.request_timeout_s:g} s "
                    f"from {names}"
                ),
            )


def check_reply_wait(reply_wait: object) -> ReplyWait:
    """``reply_wait`` if it is one of :data:`REPLY_WAITS`.

    Raises:
        InvalidInputError: it is not; the message names the value and the choices.
    """
    if reply_wait not in REPLY_WAITS:
        raise InvalidInputError(f"reply_wait must be 'auto', 'spin' or 'block', got {reply_wait!r}")
    return reply_wait


def _slot_done(
    ref: weakref.ReferenceType[Executor], request: _Request, slot: str, future: Future[SlotAnswer]
) -> None:
    executor = ref()
    if executor is not None:
        executor._on_slot_done(request, slot, future)


def _watchdog(ref: weakref.ReferenceType[Executor], stop: threading.Event) -> None:
    """Fails late requests; holds the executor only weakly, so it never keeps it alive."""
    while not stop.wait(_WATCHDOG_INTERVAL_S):
        executor = ref()
        if executor is None:
            return
        executor._expire(time.perf_counter())
        del executor


def _fail(future: Future[Any], error: BaseException) -> bool:
    try:
        future.set_exception(error)
    except InvalidStateError:
        return False
    return True


__all__ = ["REPLY_WAITS", "Executor", "ReplyPolling", "ReplyWait", "check_reply_wait"]
