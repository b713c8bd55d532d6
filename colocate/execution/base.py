"""What every slot executor is, and the few helpers all of them share.

A *slot* (see :class:`colocate.planning.types.Slot`) runs its members one after
another on each request's batch. A :class:`SlotExecutor` is the running form of
one slot: :class:`~colocate.execution.streams.StreamSlot` (a thread and, on a
GPU, a CUDA stream in the serving process), :class:`~colocate.execution.processes.ProcessSlot`
(a spawned worker process) and :class:`~colocate.execution.mps.MpsSlot` (a worker
process under NVIDIA MPS, or pinned to a share of the cores on the CPU).

The front (:class:`~colocate.execution.front.Executor`) gives every slot the same
:class:`RequestBatch` and gathers the raw member outputs each slot returns.

Nothing here imports a framework: the helpers that need torch import it when called.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from colocate._optional import is_available
from colocate.ensemble import Array, Member
from colocate.errors import ColocateError, MemberOutOfMemoryError, WorkerFailedError

if TYPE_CHECKING:
    from colocate.backends.base import MemberRunner
    from colocate.devices import Device
    from colocate.execution.types import SlotAnswer
    from colocate.planning.types import Slot


@dataclass(frozen=True)
class RequestBatch:
    """One request's batch as the slots see it.

    ``array`` is what in-process (stream) slots read. When the plan has worker
    processes, ``array`` is a view of the shared-memory block ``shm_name``, which
    the workers map by name: the batch is written once per request, for all slots.
    """

    request_id: int  # unique per executor, increasing in submission order
    array: Array  # the batch; must not be written to while the request is in flight
    shm_name: str | None = None  # shared-memory block holding ``array`` (process and mps slots)


@runtime_checkable
class SlotExecutor(Protocol):
    """The running form of one slot of a plan.

    ``start`` loads the slot's members (blocking; raises when a member cannot be
    loaded); ``submit`` returns a future of a
    :class:`~colocate.execution.types.SlotAnswer` (``{member name: raw output}``
    and when they ran) for one batch, run through the slot's members one after
    another; ``stop`` releases everything the slot holds and fails what is still
    in flight; ``alive`` says whether the slot can still serve.
    """

    @property
    def name(self) -> str:
        """The slot's name in the plan."""
        ...

    @property
    def alive(self) -> bool:
        """Whether the slot is started and can take requests."""
        ...

    def start(self) -> None:
        """Load the members and get ready to serve (blocking)."""
        ...

    def submit(self, batch: RequestBatch) -> Future[SlotAnswer]:
        """Run the slot's members on ``batch``; the future holds their raw outputs and when they ran."""
        ...

    def stop(self) -> None:
        """Stop serving, fail what is in flight, release every resource. Idempotent."""
        ...


def describe_slot(slot: Slot) -> str:
    """``"slot 's1' (process: resnet, vit)"``: how errors name a slot."""
    return f"slot '{slot.name}' ({slot.kind}: {', '.join(slot.members)})"


def member_error(exc: BaseException, member: str, slot: str, context: str = "") -> ColocateError:
    """The error a request gets when ``member`` (in slot ``slot``) raised ``exc``.

    A colocate error that already names the member is kept as it is (e.g. an
    :class:`InvalidInputError` for a wrong batch, a :class:`MemberOutOfMemoryError`);
    anything else becomes a :class:`WorkerFailedError` that names the member, the
    slot and the original error.
    """
    if isinstance(exc, ColocateError) and f"'{member}'" in str(exc):
        return exc
    error = WorkerFailedError(
        f"member '{member}' in slot '{slot}' raised {type(exc).__name__}{context}: {exc}"
    )
    error.__cause__ = exc
    return error


def rebuild_error(
    type_name: str, message: str, member: str | None, slot: str, context: str = ""
) -> ColocateError:
    """An error reported by a worker process (as type name and text) as a colocate error.

    Worker processes send errors as text, never pickled exceptions (a pickled
    exception with keyword-only fields does not always unpickle).
    """
    if member is None:
        return WorkerFailedError(f"slot '{slot}': worker error {type_name}: {message}")
    if type_name == "MemberOutOfMemoryError":
        return MemberOutOfMemoryError(message, member=member)
    errors_module = importlib.import_module("colocate.errors")
    cls = getattr(errors_module, type_name, None)
    if (
        isinstance(cls, type)
        and issubclass(cls, ColocateError)
        and cls is not MemberOutOfMemoryError
        and f"'{member}'" in message
    ):
        return cls(message)
    return WorkerFailedError(f"member '{member}' in slot '{slot}' raised {type_name}{context}: {message}")


def with_cpu_threads(member: Member, threads: int | None) -> Member:
    """``member`` with its intra-op thread count set to ``threads`` where the backend takes one.

    ONNX Runtime members get ``intra_op_num_threads`` (unless the member sets it
    already); torch's thread count is per process and is set by the slot instead.
    """
    if threads is None or member.backend != "onnxruntime" or "intra_op_num_threads" in member.options:
        return member
    return dataclasses.replace(member, options={**member.options, "intra_op_num_threads": int(threads)})


def with_cuda_graph(member: Member) -> Member:
    """A torch ``member`` with the ``cuda_graph`` option on (unless it sets the option itself, or
    is compiled: ``compile`` and ``cuda_graph`` exclude each other)."""
    if member.backend != "torch" or "cuda_graph" in member.options:
        return member
    if member.options.get("compile", False) not in (False, None):
        return member
    return dataclasses.replace(member, options={**member.options, "cuda_graph": True})


def set_torch_threads(threads: int) -> int | None:
    """Set torch's intra-op thread count (process-wide); returns the previous count.

    Does nothing (returns None) when torch is not installed.
    """
    if not is_available("torch"):
        return None
    torch: Any = importlib.import_module("torch")
    previous = int(torch.get_num_threads())
    if previous != threads:
        torch.set_num_threads(int(threads))
    return previous


def make_slot_stream(device: Device) -> Any:
    """A CUDA stream of the slot's own on a GPU (a ``torch.cuda.Stream``), None on the CPU.

    All members of the slot enqueue on it, so a slot is one ordered queue of GPU
    work. Without torch, None: each runner then makes its own stream. torch hands
    out pool streams round-robin, 32 per priority: more than 32 stream slots alias.
    """
    if device.kind != "cuda" or not is_available("torch"):
        return None
    torch: Any = importlib.import_module("torch")
    return torch.cuda.Stream(device=torch.device(device.torch_device))


class MemberCallError(Exception):
    """Raised by :func:`call_members`: ``member`` raised ``error``."""

    def __init__(self, member: str, error: Exception, context: str = "") -> None:
        super().__init__(f"member '{member}' raised {type(error).__name__}{context}: {error}")
        self.member = member
        self.error = error
        self.context = context  # "" while serving; " while loading"; " on a warm-up batch of N"


#: serialises loading inside one process: model factories often seed torch's process-wide RNG
#: (``torch.random.fork_rng`` + ``manual_seed``, as colocate.zoo does), which is not thread-safe,
#: so two stream slots building models at once would get each other's random weights.
LOAD_LOCK = threading.Lock()


def activate_runners(
    members: Sequence[Member], device: Device, stream: Any, *, warmup_batch_size: int | None = None
) -> list[MemberRunner]:
    """Create and activate a runner per member (in order), then warm each one up.

    The warm-up runs one batch of ``warmup_batch_size`` random inputs (the member's
    own :meth:`~colocate.ensemble.InputSpec.example`) through every member, so that
    lazy initialisation, autotuning and CUDA-graph capture happen before the first
    request. Loading and warming up hold :data:`LOAD_LOCK`: one member at a time in
    a process (CUDA-graph captures never overlap). On a failure the runners made so
    far are deactivated.

    Raises:
        MemberCallError: the member that failed, with ``context`` " while loading" or
            " on a warm-up batch of N".
    """
    from colocate.backends import create_runner

    runners: list[MemberRunner] = []
    try:
        for member in members:
            try:
                runner = create_runner(member, device, stream=stream)
                with LOAD_LOCK:
                    runner.activate()
            except Exception as exc:
                raise MemberCallError(member.name, exc, " while loading") from exc
            runners.append(runner)
        if warmup_batch_size is not None:
            for runner in runners:
                batch = runner.member.input.example(warmup_batch_size, seed=0)
                try:
                    with LOAD_LOCK:
                        runner.infer(batch)
                except Exception as exc:
                    context = f" on a warm-up batch of {warmup_batch_size}"
                    raise MemberCallError(runner.member.name, exc, context) from exc
    except BaseException:
        deactivate_runners(runners)
        raise
    return runners


def deactivate_runners(runners: Sequence[MemberRunner]) -> None:
    """Deactivate every runner, ignoring errors (used on shutdown paths)."""
    for runner in runners:
        with contextlib.suppress(Exception):  # shutdown goes on; the runner is discarded anyway
            runner.deactivate()


def call_members(runners: Sequence[MemberRunner], batch: Array) -> dict[str, Array]:
    """Run every runner on ``batch``, one after another; their raw outputs by member name.

    On a GPU all members' work is enqueued first (``prepare`` + ``run``, asynchronous
    on the slot's stream) and fetched afterwards, so the host does not wait between
    members; fetching waits for the slot's stream only.

    Raises:
        MemberCallError: the first member that raised, with its error.
    """
    launched: list[tuple[MemberRunner, Any]] = []
    for runner in runners:
        try:
            launched.append((runner, runner.run(runner.prepare(batch))))
        except Exception as exc:
            raise MemberCallError(runner.member.name, exc) from exc
    outputs: dict[str, Array] = {}
    for runner, handle in launched:
        try:
            outputs[runner.member.name] = runner.to_numpy(handle)
        except Exception as exc:
            raise MemberCallError(runner.member.name, exc) from exc
    return outputs


def run_members(runners: Sequence[MemberRunner], batch: Array, slot: str) -> dict[str, Array]:
    """:func:`call_members`, with a failing member's error turned into :func:`member_error`."""
    try:
        return call_members(runners, batch)
    except MemberCallError as failure:
        raise member_error(failure.error, failure.member, slot, failure.context) from failure.error


__all__ = [
    "LOAD_LOCK",
    "MemberCallError",
    "RequestBatch",
    "SlotExecutor",
    "activate_runners",
    "call_members",
    "deactivate_runners",
    "describe_slot",
    "make_slot_stream",
    "member_error",
    "rebuild_error",
    "run_members",
    "set_torch_threads",
    "with_cpu_threads",
    "with_cuda_graph",
]
