"""``process`` slots: members run in a worker process of their own, started with ``spawn``.

What travels how (one request, one slot):

- the batch: written once by the front into a shared-memory block
  (:mod:`colocate.execution._shm`) that every worker maps by name and reads in
  place; on a GPU the worker's runners copy it from there to the device (through
  their pinned staging buffer) on the slot's own stream;
- the request: a small header over a ``multiprocessing`` pipe,
  ``("run", request id, block name, shape, dtype)``;
- the answer: ``("ok", request id, outputs, started, finished)`` (``perf_counter``
  readings around the members' run, for the request's timing). The outputs are
  ``batch x classes`` scores, a few kilobytes, sent as raw bytes inside the reply (no
  tensor is pickled, no per-slot output segment to manage): when they share one shape
  and dtype, as scores do, ``(members, shape, dtype, bytes of all of them)``, read back
  with one ``frombuffer`` (per-member arrays cost numpy's per-call overhead each, on
  every request); else ``[(member, shape, dtype, raw bytes), ...]``;
  or ``("error", request id, member, error type, message)``. Both directions use
  ``send_bytes`` of a plain ``pickle.dumps`` (the same framing as ``Connection.send``,
  without its per-message pickler set-up).

Lifecycle: :meth:`ProcessSlot.start` spawns the worker (``worker_main``, a
module-level function), which sets its environment (MPS variables, CPU affinity)
*before* unpickling its members, so that nothing initialises CUDA earlier; loads
the members; and answers ``ready`` (the handshake has a timeout). A reader
thread waits on the reply pipe with one ``select.poll`` object for the pipe's
life (``multiprocessing.connection.wait`` builds a selector per call, tens of
microseconds a request) and resolves each reply's future; the pipe's end means
the worker is gone. A watcher thread per worker waits for its exit (its
sentinel, and ``waitid`` every quarter second, since a process the worker
forked holds the sentinel open too) and, should the pipe stay open after the
death (that fork holds the worker's end of it as well), shuts the pipe down so
the reader sees the end. A thread that waits for its own request
(``Executor.predict``) reads the replies itself while it waits
(:meth:`ProcessSlot.begin_foreground`): the reply then
wakes that thread directly instead of the reader thread, which would then wake
it, one thread wake-up less per request. A worker given ``idle_poll_s`` polls its pipe
that long after each reply before it sleeps on it, so that a caller's next request
finds it awake (the executor sets it when a core is free to poll on). The reader thread parks meanwhile, and
also whenever no reply is due, so a loop of ``predict`` calls never wakes it.
A worker's death fails every request in flight at once with a
:class:`~colocate.errors.WorkerFailedError` naming the slot, its members and the
exit code or signal. Then the slot is restarted (``on_worker_death="restart"``,
at most ``max_restarts`` times; requests submitted meanwhile wait for the new
worker) or marked failed, and every later request fails at once with the reason.
:meth:`ProcessSlot.stop` asks the worker to stop, waits ``stop_grace_s``, then
terminates and finally kills it. Workers ignore Ctrl-C (the serving process
decides when they stop) and exit by themselves when the serving process dies.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from colocate.ensemble import Member
from colocate.errors import ColocateError, InternalError, InvalidInputError, WorkerFailedError
from colocate.execution._shm import BlockCache
from colocate.execution.base import (
    MemberCallError,
    RequestBatch,
    activate_runners,
    call_members,
    deactivate_runners,
    describe_slot,
    make_slot_stream,
    rebuild_error,
    set_torch_threads,
)
from colocate.execution.types import SlotAnswer

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from colocate.backends.base import MemberRunner
    from colocate.devices import Device
    from colocate.planning.types import Slot

OnWorkerDeath = Literal["fail", "restart"]
_State = Literal["new", "running", "restarting", "failed", "stopping", "stopped"]
_POLL_S = 0.25  # how often a waiting handshake checks whether the slot is being stopped
_EOF_GRACE_S = 1.0  # how long a dead worker's pipe may stay open before the watcher shuts it
_PROTOCOL = pickle.HIGHEST_PROTOCOL


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, sent to it once at spawn."""

    slot: str  # slot name
    # pickle of ((name, pickle of the Member), ...): unpickled after the environment is set, one
    # member at a time, so that one the worker cannot rebuild is named
    members_blob: bytes
    device: Device
    env: dict[str, str] = field(default_factory=dict)  # set in os.environ before anything else
    cpu_threads: int | None = None  # torch intra-op threads of the worker (None: torch's default)
    cpu_affinity: tuple[int, ...] | None = None  # cores the worker may run on (None: all)
    warmup_batch_size: int | None = None  # one batch of this size through every member before ready
    idle_poll_s: float = 0.0  # after each reply, poll the pipe this long before sleeping on it


def pickle_members(slot: Slot, members: tuple[Member, ...]) -> bytes:
    """The members of a process or mps slot as bytes for the worker, checking each pickles.

    Raises:
        InvalidInputError: a member cannot be pickled; the message names it and the fix.
    """
    for member in members:
        try:
            pickle.dumps(member)
        except Exception as exc:
            raise InvalidInputError(
                f"member '{member.name}' cannot be sent to a worker process ({slot.kind} slot "
                f"'{slot.name}'): {type(exc).__name__}: {exc}. Give it a module-level factory "
                "(e.g. colocate.zoo.ModelFactory or a function defined at the top of a module) or a "
                "model file path as source, or put it in a 'stream' slot"
            ) from exc
    return pickle.dumps(tuple((member.name, pickle.dumps(member)) for member in members))


def unpickle_members(blob: bytes) -> tuple[Member, ...]:
    """The members :func:`pickle_members` packed (in a worker process).

    Raises:
        MemberCallError: a member the worker cannot rebuild (e.g. a factory defined in the
            ``__main__`` of ``python -c`` or a notebook, which a spawned process cannot import).
    """
    members = []
    for name, member_blob in pickle.loads(blob):
        try:
            members.append(pickle.loads(member_blob))
        except Exception as exc:
            error = WorkerFailedError(
                f"member '{name}': the worker process could not rebuild it ({type(exc).__name__}: "
                f"{exc}); define its factory or class in a module the worker can import (not in "
                "the __main__ of `python -c`, a notebook or an interactive session), or put it in a "
                "'stream' slot"
            )
            raise MemberCallError(name, error, " while unpickling it in the worker") from exc
    return tuple(members)


def describe_exit(exitcode: int | None) -> str:
    """``"exit code 3"``, ``"killed by signal SIGKILL"`` or ``"exit code unknown"``."""
    if exitcode is None:
        return "exit code unknown"
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


class ProcessSlot:
    """A ``process`` slot: a spawned worker process that loads and runs the slot's members.

    Args:
        slot: the plan's slot.
        members: its members, in run order; each must pickle (module-level factory or file path).
        device: where they run (CPU or CUDA).
        on_worker_death: ``"fail"`` (the slot, hence the plan, is broken from then on) or
            ``"restart"`` (start a new worker; requests in flight at the death still fail).
        max_restarts: restarts allowed before the slot is marked failed anyway.
        start_timeout_s: how long to wait for the worker's ``ready``.
        stop_grace_s: how long :meth:`stop` waits before terminating the worker.
        env: environment variables of the worker (set before it loads anything).
        cpu_affinity: cores the worker is pinned to (``os.sched_setaffinity``); None for all.
        cpu_threads: torch's intra-op thread count in the worker; None for torch's default.
        warmup_batch_size: the worker runs one batch of this size through every member
            before it answers ``ready`` (None: no warm-up).
        idle_poll_s: after each reply the worker polls its pipe this long without sleeping
            before it sleeps on it (0: it sleeps at once). A request that comes meanwhile, as
            the next one of a caller in a loop does, then finds the worker awake instead of
            paying its wake-up; the price is a core kept busy for that long after each reply.
    """

    kind = "process"

    def __init__(
        self,
        slot: Slot,
        members: tuple[Member, ...],
        device: Device,
        *,
        on_worker_death: OnWorkerDeath = "fail",
        max_restarts: int = 3,
        start_timeout_s: float = 300.0,
        stop_grace_s: float = 5.0,
        env: Mapping[str, str] | None = None,
        cpu_affinity: tuple[int, ...] | None = None,
        cpu_threads: int | None = None,
        warmup_batch_size: int | None = None,
        idle_poll_s: float = 0.0,
    ) -> None:
        if on_worker_death not in ("fail", "restart"):
            raise InvalidInputError(f"on_worker_death must be 'fail' or 'restart', got {on_worker_death!r}")
        if not idle_poll_s >= 0.0:
            raise InvalidInputError(f"idle_poll_s must be >= 0 seconds, got {idle_poll_s!r}")
        self.slot = slot
        self.members = members
        self.device = device
        self.on_worker_death: OnWorkerDeath = on_worker_death
        self.max_restarts = max_restarts
        self.start_timeout_s = start_timeout_s
        self.stop_grace_s = stop_grace_s
        self.spec = WorkerSpec(
            slot=slot.name,
            members_blob=pickle_members(slot, members),
            device=device,
            env=dict(env or {}),
            cpu_threads=cpu_threads,
            cpu_affinity=cpu_affinity,
            warmup_batch_size=warmup_batch_size,
            idle_poll_s=idle_poll_s,
        )
        self._lock = threading.Lock()  # state, pending, backlog, process, conn
        self._send_lock = threading.Lock()  # writes to the pipe (never held with _lock)
        # reading replies: one whole message at a time, by the reader thread or by a foreground
        # reader (see begin_foreground); _lock may be taken while holding it, never the reverse
        self._read_lock = threading.Lock()
        # the thread (ident) that, waiting on a request, reads the pipe itself; None: the reader does
        self._foreground: int | None = None
        # the reader thread parks on this while it has nothing to read (see _read_until_end)
        self._reader_wanted = threading.Condition(self._read_lock)
        self._reader_woken = False  # the worker exited or the slot stops: look at the pipe
        self._ready_poll: select.poll | None = None  # over the current pipe; used under _read_lock
        self._state: _State = "new"
        self._process: BaseProcess | None = None
        self._launching: BaseProcess | None = None  # a worker loading its members (start, restart)
        self._conn: Connection | None = None
        self._pending: dict[int, Future[SlotAnswer]] = {}
        self._backlog: list[tuple[Any, ...]] = []  # requests waiting for a restarted worker
        self._reader: threading.Thread | None = None
        self._failure: str | None = None
        self._restarts = 0
        self._pids: list[int] = []

    # -- public state

    @property
    def name(self) -> str:
        """The slot's name in the plan."""
        return self.slot.name

    @property
    def alive(self) -> bool:
        """Whether the slot serves (running, or restarting a worker)."""
        return self._state in ("running", "restarting")

    @property
    def failure(self) -> str | None:
        """Why the slot stopped serving for good (a dead worker not restarted), else None."""
        return self._failure

    @property
    def pid(self) -> int | None:
        """The current worker's process id (None before start and after stop)."""
        process = self._process
        return process.pid if process is not None and self._state != "stopped" else None

    @property
    def pids(self) -> tuple[int, ...]:
        """Every worker process id this slot has started (restarts included)."""
        return tuple(self._pids)

    @property
    def restarts(self) -> int:
        """How many times the worker was restarted after dying."""
        return self._restarts

    # -- lifecycle

    def start(self) -> None:
        """Spawn the worker and wait for its ``ready`` (blocking).

        Raises:
            ColocateError: a member could not be loaded (the worker's error, naming it).
            WorkerFailedError: the worker died or did not answer within ``start_timeout_s``.
        """
        with self._lock:
            if self._state != "new":
                return
        process, conn = self._launch()
        try:
            self._handshake(process, conn)
        except BaseException:
            self._reap(process)
            conn.close()
            with self._lock:
                self._state = "stopped"
            raise
        with self._lock:
            if self._state != "new":  # stopped while starting
                abort = True
            else:
                abort = False
                self._process, self._conn = process, conn
                self._state = "running"
        if abort:
            self._reap(process)
            conn.close()
            raise WorkerFailedError(f"{describe_slot(self.slot)} was stopped while starting")
        self._watch(process, conn)
        self._reader = threading.Thread(
            target=self._read_loop, name=f"colocate-reader-{self.name}", daemon=True
        )
        self._reader.start()

    def submit(self, batch: RequestBatch) -> Future[SlotAnswer]:
        """Send ``batch`` (which must live in shared memory) to the worker; a future of the outputs."""
        future: Future[SlotAnswer] = Future()
        if batch.shm_name is None:
            _fail(
                future,
                InternalError(
                    f"{describe_slot(self.slot)}: got a batch outside shared memory; "
                    "this is a bug in colocate"
                ),
            )
            return future
        array = batch.array
        message = ("run", batch.request_id, batch.shm_name, tuple(array.shape), array.dtype.str)
        with self._lock:
            state = self._state
            if state == "failed":
                _fail(future, WorkerFailedError(self._failure or f"{describe_slot(self.slot)} failed"))
                return future
            if state not in ("running", "restarting"):
                _fail(future, WorkerFailedError(f"{describe_slot(self.slot)} is not serving ({state})"))
                return future
            self._pending[batch.request_id] = future
            if state == "restarting":
                self._backlog.append(message)
                return future
            conn = self._conn
        with self._read_lock:  # a reply will come: the reader reads it, unless a foreground reader does
            if self._foreground is None:
                self._reader_wanted.notify_all()  # a no-op unless the reader is parked
        self._send(conn, pickle.dumps(message, _PROTOCOL))
        return future

    def stop(self) -> None:
        """Stop the worker (stop message, grace period, terminate, kill); fail what is in flight.

        Idempotent; safe after the worker died.
        """
        with self._lock:
            if self._state in ("stopping", "stopped"):
                return
            self._state = "stopping"
            process, conn = self._process, self._conn
            launching, self._launching = self._launching, None
            pending = list(self._pending.values())
            self._pending.clear()
            self._backlog.clear()
        self._wake_reader()
        stopped = WorkerFailedError(f"{describe_slot(self.slot)} was stopped before this request finished")
        for future in pending:
            _fail(future, stopped)
        if launching is not None and launching is not process:
            self._reap(launching)  # still loading its members: start() (or a restart) then gives up
        if process is not None:
            if conn is not None and process.is_alive():
                self._send_stop(conn)
            process.join(self.stop_grace_s)
            self._reap(process)
        if conn is not None:
            _shut_down(conn)  # the reader's wait on the pipe ends even if the worker's end lives on
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(timeout=self.stop_grace_s + 2 * _POLL_S + 5.0)
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.close()
        if process is not None:
            with contextlib.suppress(ValueError):
                process.close()
        with self._lock:
            self._state = "stopped"

    # -- foreground reading: the waiting thread reads its own reply

    def begin_foreground(self) -> int | None:
        """Let the calling thread read this slot's replies itself, until :meth:`end_foreground`.

        A thread that waits for a request can read the reply from the pipe directly
        instead of being woken by the reader thread once that thread has read it: one
        thread wake-up less per request, which on a small or virtual machine is a good
        part of a process slot's cost. The reader thread stands aside meanwhile (it
        still handles the worker's death). Only one foreground reader at a time.

        Returns:
            The pipe's file descriptor to wait on (``select.poll``), then call
            :meth:`read_replies` when it is readable; None when the slot is not running
            or another thread reads in the foreground (wait on the future instead).
        """
        with self._read_lock:
            if self._foreground is not None:
                return None
            with self._lock:
                conn = self._conn if self._state == "running" else None
            if conn is None or self._ready_poll is None:
                return None
            try:
                fd = conn.fileno()
            except (OSError, ValueError):
                return None
            self._foreground = threading.get_ident()
            return fd

    def read_replies(self) -> bool:
        """Read and resolve the next reply (foreground reader only, once ``poll`` said the pipe
        is readable: no other thread reads it meanwhile, so this does not block).

        One message per call, without asking ``poll`` first or after: at one request in flight
        there is one, and each extra ``poll`` is a system call on every request. The caller's
        own ``poll`` finds any further reply.

        Returns:
            False when the pipe has ended (the worker died or the slot stops): this thread
            no longer reads in the foreground, and the reader thread, woken, handles the end
            (at once: the caller may wait for other slots a long while before it calls
            :meth:`end_foreground`).
        """
        with self._read_lock:
            with self._lock:
                conn = self._conn
            reply = None
            if conn is not None and self._ready_poll is not None:
                with contextlib.suppress(EOFError, OSError, ValueError, pickle.UnpicklingError):
                    reply = pickle.loads(conn.recv_bytes())
            if reply is None:
                if self._foreground == threading.get_ident():
                    self._foreground = None
                self._reader_woken = True
                self._reader_wanted.notify_all()
                return False
        self._on_reply(reply)
        return True

    def end_foreground(self) -> None:
        """Hand the pipe back to the reader thread (woken only when a reply is still due)."""
        with self._read_lock:
            if self._foreground != threading.get_ident():
                return  # not (or no longer) this thread's: read_replies handed it back
            self._foreground = None
            if self._expects_replies():  # else waking it costs a thread wake-up for nothing
                self._reader_wanted.notify_all()

    # -- internals: spawning

    def _launch(self) -> tuple[BaseProcess, Connection]:
        context = multiprocessing.get_context("spawn")
        parent_conn, child_conn = context.Pipe(duplex=True)
        process = context.Process(
            target=worker_main,
            args=(child_conn, self.spec),
            name=f"colocate-{self.kind}-{self.name}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        if process.pid is not None:
            self._pids.append(process.pid)
        with self._lock:
            self._launching = process
        return process, parent_conn

    def _handshake(self, process: BaseProcess, conn: Connection) -> None:
        """Wait for the worker's ``ready`` while it loads its members; then it is no longer the
        one :meth:`stop` must end itself, whether it loaded or not."""
        try:
            self._await_ready(process, conn)
        finally:
            with self._lock:
                self._launching = None

    def _await_ready(self, process: BaseProcess, conn: Connection) -> None:
        stopped = f"{describe_slot(self.slot)} was stopped while starting its worker"
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerFailedError(
                    f"{describe_slot(self.slot)}: the worker (pid {process.pid}) did not load its members "
                    f"within {self.start_timeout_s:g} s"
                )
            if self._state in ("stopping", "stopped"):
                raise WorkerFailedError(stopped)
            ready = wait([conn, process.sentinel], timeout=min(remaining, _POLL_S))
            if conn in ready:
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    message = None
                if message is not None and message[0] == "ready":
                    return
                if message is not None and message[0] == "load_error":
                    _, member, type_name, text, context = message
                    raise rebuild_error(type_name, text, member, self.name, context)
            if conn in ready or process.sentinel in ready or _has_exited(process):
                process.join(timeout=5.0)
                if self._state in ("stopping", "stopped"):  # stop() ended it
                    raise WorkerFailedError(stopped)
                raise WorkerFailedError(
                    f"{describe_slot(self.slot)}: the worker (pid {process.pid}) died while loading its "
                    f"members ({describe_exit(process.exitcode)})"
                )

    def _reap(self, process: BaseProcess) -> None:
        """Make sure ``process`` is gone: terminate, then kill."""
        if process.is_alive():
            process.terminate()
            process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)

    def _send(self, conn: Connection | None, payload: bytes) -> None:
        if conn is None:
            return
        # a dead worker: the reader sees the pipe's end and fails the request
        with self._send_lock, contextlib.suppress(OSError, ValueError):
            conn.send_bytes(payload)

    def _send_stop(self, conn: Connection) -> None:
        """Send the stop message, unless the pipe stays full for the grace period.

        A worker busy with one long request reads nothing meanwhile: once the requests queued
        behind it fill the pipe, a sender blocks (holding the send lock) until it reads again,
        which for a stuck member is never. Then stop() goes on to terminate it instead.
        """
        if not self._send_lock.acquire(timeout=self.stop_grace_s):
            return
        try:
            _, writable, _ = select.select([], [conn], [], self.stop_grace_s)
            if writable:  # room for a few bytes: the short message does not block
                conn.send_bytes(pickle.dumps(("stop",), _PROTOCOL))
        except (OSError, ValueError):
            pass  # the worker is gone: nothing to tell it
        finally:
            self._send_lock.release()

    # -- internals: the reader and watcher threads

    def _read_loop(self) -> None:
        """Read replies until the pipe ends; then handle the worker's death (or return on stop)."""
        while True:
            with self._lock:
                process, conn = self._process, self._conn
                state = self._state
            if process is None or conn is None or state in ("stopping", "stopped"):
                return
            self._read_until_end(conn)
            with self._lock:
                if self._state in ("stopping", "stopped"):
                    return  # stop() ends the worker (from this thread too: close() in a done callback)
            with contextlib.suppress(ValueError):  # a stop() since closed the process object
                process.join(timeout=1.0)
                self._reap(process)
            if not self._on_death(process, conn):
                return

    def _read_until_end(self, conn: Connection) -> None:
        """Resolve replies from ``conn`` until it ends, standing aside while a foreground reader reads."""
        waiting = select.poll()  # this thread's own: a poll object may not be polled by two threads
        ready = select.poll()
        try:
            waiting.register(conn.fileno(), select.POLLIN)
            ready.register(conn.fileno(), select.POLLIN)
        except (OSError, ValueError):
            return
        with self._read_lock:
            self._ready_poll = ready
        try:
            while True:
                with self._read_lock:
                    # park while a foreground reader reads, or while no reply is due: then a
                    # predict() loop never wakes this thread. submit(), end_foreground(), the
                    # watcher (the worker exited) and stop() wake it.
                    while not self._reader_woken and (
                        self._foreground is not None or not self._expects_replies()
                    ):
                        self._reader_wanted.wait()
                    self._reader_woken = False
                # a message, the pipe's end, or stop() shutting it wakes this (a plain blocking
                # read would hold the read lock while it waits, and keep foreground readers out)
                waiting.poll()
                with self._read_lock:
                    if self._foreground is not None:
                        continue  # the foreground reader takes it
                    replies, ended = _read_waiting(conn, ready)
                self._resolve_all(replies)
                if ended:
                    return  # the pipe ended: the worker is gone, or stop() shut the pipe
        except (OSError, ValueError):
            return
        finally:
            with self._read_lock:
                if self._ready_poll is ready:
                    self._ready_poll = None

    def _resolve_all(self, replies: list[tuple[Any, ...]]) -> None:
        # outside the read lock: a future's callbacks may submit again, or read in the foreground
        for message in replies:
            self._on_reply(message)

    def _expects_replies(self) -> bool:
        with self._lock:
            return bool(self._pending) and self._state == "running"

    def _wake_reader(self) -> None:
        with self._read_lock:
            self._reader_woken = True
            self._reader_wanted.notify_all()

    def _watch(self, process: BaseProcess, conn: Connection) -> None:
        """Start a thread that shuts ``conn`` should it outlive ``process`` (see the module doc)."""

        def watch() -> None:
            # the sentinel alone is not enough: a fork of the worker holds its write end too
            while not _has_exited(process):
                with self._lock:
                    if self._process is not process or self._state in ("stopping", "stopped"):
                        return
                try:
                    wait([process.sentinel], timeout=_POLL_S)
                except (OSError, ValueError):
                    return
            self._wake_reader()  # it may be parked with nothing due: it must read the pipe's end
            deadline = time.monotonic() + _EOF_GRACE_S
            while time.monotonic() < deadline:
                with self._lock:
                    if self._conn is not conn or self._state != "running":
                        return  # the reader saw the end (or the slot stops): nothing to do
                time.sleep(0.02)
            _shut_down(conn)

        threading.Thread(target=watch, name=f"colocate-watch-{self.name}", daemon=True).start()

    def _on_reply(self, message: tuple[Any, ...]) -> None:
        kind, request_id = message[0], message[1]
        with self._lock:
            future = self._pending.pop(request_id, None)
        if future is None:  # failed already (timeout, death, stop)
            return
        if kind == "ok":
            _, _, packed, started_s, finished_s = message
            _resolve(future, SlotAnswer(unpack_outputs(packed), started_s, finished_s))
        else:
            _, _, member, type_name, text = message
            _fail(future, rebuild_error(type_name, text, member, self.name))

    def _on_death(self, process: BaseProcess, conn: Connection) -> bool:
        """A worker died: fail its requests, then restart it or mark the slot failed.

        Returns whether the monitor goes on (a new worker serves).
        """
        reason = (
            f"{describe_slot(self.slot)}: worker process {process.pid} died "
            f"({describe_exit(process.exitcode)})"
        )
        with self._lock:
            if self._state in ("stopping", "stopped"):
                return False
            failed = list(self._pending.values())
            self._pending.clear()
            restart = self.on_worker_death == "restart" and self._restarts < self.max_restarts
            if restart:
                self._state = "restarting"
                self._restarts += 1
            else:
                self._state = "failed"
                more = f" after {self._restarts} restart(s)" if self.on_worker_death == "restart" else ""
                self._failure = f"{reason}{more}; the plan is broken (start the executor again)"
        with contextlib.suppress(OSError):
            conn.close()
        error = WorkerFailedError(
            f"{reason}; its requests in flight failed" + ("; restarting it" if restart else "")
        )
        for future in failed:
            _fail(future, error)
        if not restart:
            return False
        return self._restart(reason)

    def _restart(self, reason: str) -> bool:
        try:
            process, conn = self._launch()
        except Exception as exc:
            return self._restart_failed(reason, exc, None)
        try:
            self._handshake(process, conn)
        except Exception as exc:
            self._reap(process)
            conn.close()
            return self._restart_failed(reason, exc, process)
        with self._lock:
            if self._state != "restarting":  # stopped meanwhile
                stale = True
            else:
                stale = False
                self._process, self._conn = process, conn
                self._state = "running"
                backlog, self._backlog = self._backlog, []
        if stale:
            self._reap(process)
            conn.close()
            return False
        self._watch(process, conn)
        for message in backlog:
            self._send(conn, pickle.dumps(message, _PROTOCOL))
        return True

    def _restart_failed(self, reason: str, exc: Exception, process: BaseProcess | None) -> bool:
        with self._lock:
            if self._state != "restarting":
                return False
            self._state = "failed"
            self._failure = f"{reason}; restarting it failed ({exc}); the plan is broken"
            failed = list(self._pending.values())
            self._pending.clear()
            self._backlog.clear()
        error = WorkerFailedError(self._failure)
        error.__cause__ = exc
        for future in failed:
            _fail(future, error)
        return False


def _read_waiting(conn: Connection, ready: select.poll) -> tuple[list[tuple[Any, ...]], bool]:
    """Every reply already in ``conn`` (``ready`` polls it), and whether the pipe has ended."""
    replies: list[tuple[Any, ...]] = []
    try:
        while ready.poll(0):
            replies.append(pickle.loads(conn.recv_bytes()))
    except (EOFError, OSError, ValueError, pickle.UnpicklingError):
        return replies, True
    return replies, False


def _has_exited(process: BaseProcess) -> bool:
    """Whether ``process`` exited, without reaping it (``process.exitcode`` reaps it, and a thread
    reaping it while another joins it can leave the other with no exit code)."""
    try:
        pid = process.pid
        if pid is None:
            return False
        try:
            return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True  # reaped already
        except (AttributeError, OSError):  # no waitid (not Linux)
            return not process.is_alive()
    except ValueError:
        # stop() closed the process object (after joining it) while a watcher still looked at
        # it: every method then raises "process object is closed", and the process is gone
        return True


def _shut_down(conn: Connection) -> None:
    """End ``conn`` for every thread blocked reading it (closing the descriptor would not)."""
    with contextlib.suppress(OSError, ValueError), socket.socket(fileno=os.dup(conn.fileno())) as sock:
        sock.shutdown(socket.SHUT_RDWR)


def _resolve(future: Future[SlotAnswer], value: SlotAnswer) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_result(value)


def _fail(future: Future[Any], error: BaseException) -> None:
    with contextlib.suppress(InvalidStateError):
        future.set_exception(error)


# ---------------------------------------------------------------------------
# The worker side (runs in the spawned process)
# ---------------------------------------------------------------------------


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """Entry point of a worker process: set up, load the members, serve requests until told to stop.

    Module-level so that ``spawn`` can import it. The environment and CPU
    affinity are applied before the members are unpickled, hence before any
    framework is imported or CUDA is initialised.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the serving process's to handle
    os.environ.update(spec.env)
    if spec.cpu_affinity and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, spec.cpu_affinity)
    runners: list[MemberRunner] = []
    blocks = BlockCache()
    try:
        try:
            members = unpickle_members(spec.members_blob)
            if spec.cpu_threads is not None and any(m.backend == "torch" for m in members):
                set_torch_threads(spec.cpu_threads)
            stream = make_slot_stream(spec.device)
            runners = activate_runners(members, spec.device, stream, warmup_batch_size=spec.warmup_batch_size)
        except MemberCallError as failure:
            error = failure.error
            message = (
                "load_error",
                failure.member,
                type(error).__name__,
                _error_text(error),
                failure.context,
            )
            _worker_send(conn, message)
            return
        except BaseException as exc:
            _worker_send(conn, ("load_error", None, type(exc).__name__, _error_text(exc), ""))
            return
        if not _worker_send(conn, ("ready", os.getpid())):
            return
        _serve(conn, runners, blocks, spec.slot, spec.idle_poll_s)
    finally:
        deactivate_runners(runners)
        blocks.close()
        with contextlib.suppress(OSError):
            conn.close()


def _serve(
    conn: Connection, runners: list[MemberRunner], blocks: BlockCache, slot: str, idle_poll_s: float = 0.0
) -> None:
    inbox: deque[tuple[Any, ...]] = deque()
    waiting = select.poll()  # one for the worker's life: Connection.poll builds a selector per call
    waiting.register(conn.fileno(), select.POLLIN)
    while True:
        try:
            if not inbox:
                if idle_poll_s > 0.0:
                    until = time.perf_counter() + idle_poll_s
                    while not waiting.poll(0) and time.perf_counter() < until:
                        pass
                inbox.append(pickle.loads(conn.recv_bytes()))
            while waiting.poll(0):  # take everything already sent, so a stop is seen at once
                inbox.append(pickle.loads(conn.recv_bytes()))
        except (EOFError, OSError):
            return  # the serving process is gone
        if any(message[0] == "stop" for message in inbox):
            return
        message = inbox.popleft()
        if message[0] != "run":
            continue
        if not _worker_send(conn, _run_request(message, runners, blocks, slot)):
            return


def _run_request(
    message: tuple[Any, ...], runners: list[MemberRunner], blocks: BlockCache, slot: str
) -> tuple[Any, ...]:
    _, request_id, shm_name, shape, dtype = message
    try:
        array = blocks.view(shm_name, tuple(shape), dtype)
    except Exception as exc:
        return (
            "error",
            request_id,
            None,
            type(exc).__name__,
            f"cannot map the request's shared memory {shm_name!r}: {exc}",
        )
    try:
        started_s = time.perf_counter()
        outputs = call_members(runners, array)
        finished_s = time.perf_counter()
    except MemberCallError as failure:
        return ("error", request_id, failure.member, type(failure.error).__name__, _error_text(failure.error))
    finally:
        del array
    return ("ok", request_id, pack_outputs(outputs), started_s, finished_s)


def pack_outputs(outputs: Mapping[str, np.ndarray]) -> Any:
    """The members' outputs as a reply carries them (see the module doc); :func:`unpack_outputs`."""
    arrays = [np.ascontiguousarray(out) for out in outputs.values()]
    first = arrays[0] if arrays else None
    if first is not None and all(a.shape == first.shape and a.dtype == first.dtype for a in arrays):
        return (tuple(outputs), tuple(first.shape), first.dtype.str, b"".join(a.data for a in arrays))
    return [(name, tuple(a.shape), a.dtype.str, a.tobytes()) for name, a in zip(outputs, arrays, strict=True)]


def unpack_outputs(packed: Any) -> dict[str, np.ndarray]:
    """The outputs :func:`pack_outputs` packed, as writable arrays by member name."""
    if isinstance(packed, tuple):  # all of one shape and dtype, in one buffer
        names, shape, dtype, data = packed
        stacked = np.frombuffer(data, dtype=np.dtype(dtype)).reshape((len(names), *shape)).copy()
        return dict(zip(names, stacked, strict=True))
    return {
        name: np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()
        for name, shape, dtype, data in packed
    }


def _error_text(exc: BaseException) -> str:
    text = str(exc)
    if not isinstance(exc, ColocateError) and not text:
        text = repr(exc)
    return text


def _worker_send(conn: Connection, message: tuple[Any, ...]) -> bool:
    try:
        conn.send_bytes(pickle.dumps(message, _PROTOCOL))
    except (OSError, ValueError):
        return False
    return True


__all__ = ["OnWorkerDeath", "ProcessSlot", "WorkerSpec", "describe_exit", "pickle_members", "worker_main"]
