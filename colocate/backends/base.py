"""The one backend seam: a :class:`MemberRunner` loads a member on a device and runs batches.

The public methods here own the lifecycle, the input checks, load timing and
the error messages; a backend writes only the ``_``-prefixed hooks. On a GPU a
runner can be given a CUDA stream (a torch stream, a CuPy stream, or a raw
``cudaStream_t`` handle as an int); all its work is enqueued on that stream.

Run a batch in one call with :meth:`MemberRunner.infer`, or split it, as the
profiler and executors do, into ``prepare`` (host -> device copy), ``run``
(asynchronous on a GPU), ``synchronize`` and ``to_numpy``.
"""

from __future__ import annotations

import time
import warnings
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from colocate.devices import Device
from colocate.ensemble import Array, Member
from colocate.errors import DeviceError, InternalError, InvalidInputError, ModelLoadError


def stream_handle(stream: Any) -> int:
    """The raw ``cudaStream_t`` of ``stream`` as an int.

    Accepts a torch stream (``.cuda_stream``), a CuPy stream (``.ptr``), any
    object with ``__cuda_stream__()`` (the CUDA stream protocol), or an int.
    """
    if isinstance(stream, bool):
        raise InvalidInputError(f"not a CUDA stream: {stream!r}")
    if isinstance(stream, int):
        return stream
    for attribute in ("cuda_stream", "ptr"):
        value = getattr(stream, attribute, None)
        if isinstance(value, int):
            return value
    protocol = getattr(stream, "__cuda_stream__", None)
    if callable(protocol):
        _, handle = protocol()
        return int(handle)
    raise InvalidInputError(
        f"not a CUDA stream: {type(stream).__name__}; pass a torch.cuda.Stream, a "
        "cupy.cuda.Stream or a raw stream handle (int)"
    )


class MemberRunner(ABC):
    """Runs one member on one device (and, on a GPU, one stream).

    Use as a context manager, or call :meth:`activate` and :meth:`deactivate`.
    """

    backend_name: ClassVar[str] = ""
    #: whether the backend can run on the CPU device
    supports_cpu: ClassVar[bool] = True
    #: whether the backend can run on a CUDA device
    supports_cuda: ClassVar[bool] = True

    def __init__(self, member: Member, device: Device, *, stream: Any | None = None) -> None:
        if member.backend != self.backend_name:
            raise InternalError(
                f"runner {type(self).__name__} got member '{member.name}' of backend "
                f"'{member.backend}'; this is a bug in colocate"
            )
        if not device.can_execute:
            raise DeviceError(
                f"member '{member.name}': device '{device.name}' is {device.kind} and cannot run "
                "models; plan for it, but run on a real device (colocate.devices.best_device())"
            )
        if device.kind == "cpu" and not self.supports_cpu:
            raise DeviceError(
                f"member '{member.name}': backend '{self.backend_name}' needs a CUDA GPU; "
                "this device is the CPU. Use backend 'torch' or 'onnxruntime' on the CPU"
            )
        if device.kind == "cuda" and not self.supports_cuda:
            raise DeviceError(f"member '{member.name}': backend '{self.backend_name}' cannot run on a GPU")
        if stream is not None and device.kind != "cuda":
            raise InvalidInputError(
                f"member '{member.name}': a CUDA stream was given but the device is {device.kind}"
            )
        self.member = member
        self.device = device
        self.stream = stream
        self.is_active = False
        self.load_time_s: float | None = None  # seconds the last activate() took

    # --- public API (owns checks and state) -----------------------------------

    def activate(self) -> MemberRunner:
        """Load the member on the device. Idempotent. Records :attr:`load_time_s`."""
        if self.is_active:
            return self
        start = time.perf_counter()
        self._activate()
        self._synchronize()
        self.load_time_s = time.perf_counter() - start
        self.is_active = True
        return self

    def prepare(self, batch: Array) -> Any:
        """Check ``batch`` against the member's input spec and stage it on the device."""
        self._require_active("prepare")
        self.member.input.check(self.member.name, batch)
        return self._prepare(np.ascontiguousarray(batch))

    def run(self, prepared: Any) -> Any:
        """Run the member on a prepared batch; asynchronous on a GPU."""
        self._require_active("run")
        return self._run(prepared)

    def synchronize(self) -> None:
        """Wait until the work this runner enqueued is done."""
        self._synchronize()

    def to_numpy(self, output: Any) -> Array:
        """Bring an output of :meth:`run` to the host as a numpy array (synchronising)."""
        return self._to_numpy(output)

    def infer(self, batch: Array) -> Array:
        """Check, stage, run and fetch one batch: the member's raw output as numpy.

        Raises:
            InvalidInputError: the batch does not match the member's input spec.
            ColocateError: the backend's own errors (e.g. out of memory), naming the member.
            Exception: the framework's own error when the model fails on the batch, as it came
                (the executor and :func:`colocate.profiling.profile`, which call this, name the
                member and the slot around it).
        """
        return self.to_numpy(self.run(self.prepare(batch)))

    def deactivate(self) -> None:
        """Release the model and its device memory. Idempotent."""
        if not self.is_active:
            return
        try:
            self._deactivate()
        finally:
            self.is_active = False

    def __enter__(self) -> MemberRunner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    def __del__(self) -> None:
        if getattr(self, "is_active", False):
            warnings.warn(
                f"runner for member '{self.member.name}' was never deactivated; "
                "use it as a context manager or call deactivate()",
                ResourceWarning,
                stacklevel=2,
            )

    def _model_file(self, hint: str) -> Path:
        """The member's model file, or a ModelLoadError naming the member, the path and ``hint``."""
        path = self.member.source_path
        if path is None or not path.is_file():
            raise ModelLoadError(
                f"member '{self.member.name}': model file {str(path)!r} does not exist; {hint}"
            )
        return path

    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise InvalidInputError(
                f"member '{self.member.name}': {what}() before activate(); "
                "call runner.activate() or use 'with runner:'"
            )

    # --- hooks a backend writes ----------------------------------------------

    @abstractmethod
    def _activate(self) -> None:
        """Load the model (and its session/engine/context) onto the device."""

    @abstractmethod
    def _prepare(self, batch: Array) -> Any:
        """Stage a checked, contiguous batch on the device."""

    @abstractmethod
    def _run(self, prepared: Any) -> Any:
        """Enqueue the model on the prepared batch; return the output handle."""

    @abstractmethod
    def _to_numpy(self, output: Any) -> Array:
        """Copy an output to the host."""

    @abstractmethod
    def _deactivate(self) -> None:
        """Free everything :meth:`_activate` created."""

    def _synchronize(self) -> None:  # noqa: B027 - CPU backends have nothing to wait for
        """Wait for this runner's device work; CPU backends need nothing."""
