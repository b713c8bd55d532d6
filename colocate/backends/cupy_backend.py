"""The ``cupy`` backend: a callable ``f(x: cupy.ndarray) -> cupy.ndarray`` on a CUDA GPU.

All work (the host -> device copy, the callable's kernels, the copy back) is
enqueued on one stream: the stream given to the runner (a CuPy stream is used
as is; a torch stream or a raw handle is wrapped in
``cupy.cuda.ExternalStream``), or a new ``cupy.cuda.Stream(non_blocking=True)``
(CuPy's own default is a blocking stream, which serialises with the legacy
default stream).

Precision ``fp16`` casts float batches to float16 before the copy; CuPy has no
bfloat16, so ``bf16`` is refused.

Memory comes from CuPy's default memory pool, shared by every CuPy member of
the process; :meth:`CupyRunner.pool_used_bytes` reads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from colocate._optional import optional_import
from colocate.backends.base import MemberRunner, stream_handle
from colocate.ensemble import Array
from colocate.errors import InvalidInputError, MemberOutOfMemoryError


class CupyRunner(MemberRunner):
    """Runs a CuPy callable on one GPU and one stream."""

    backend_name = "cupy"
    supports_cpu = False
    supports_cuda = True

    _cp: Any = None  # the cupy module while active
    _cuda_device: Any = None  # cupy.cuda.Device
    _cuda_stream: Any = None  # the stream all work goes to
    _out_of_memory: type[BaseException] | None = None  # cupy.cuda.memory.OutOfMemoryError
    _cast: np.dtype[Any] | None = None  # cast batches to this dtype before the copy

    def pool_used_bytes(self) -> int:
        """Bytes of CuPy's default memory pool held by live arrays (all CuPy users of the process)."""
        cp = self._cp or optional_import("cupy", purpose=f"backend 'cupy' of member '{self.member.name}'")
        return int(cp.get_default_memory_pool().used_bytes())

    # --- hooks ------------------------------------------------------------------

    def _activate(self) -> None:
        member = self.member
        cp = optional_import("cupy", purpose=f"backend 'cupy' of member '{member.name}'")
        if member.precision == "bf16":
            raise InvalidInputError(
                f"member '{member.name}': backend 'cupy' has no bfloat16; use precision 'fp16' or 'fp32'"
            )
        if not callable(member.source):
            raise InvalidInputError(
                f"member '{member.name}': backend 'cupy' needs a callable source "
                "f(x: cupy.ndarray) -> cupy.ndarray"
            )
        spec_dtype = np.dtype(member.input.dtype)
        self._cast = (
            np.dtype(np.float16)
            if member.precision == "fp16" and np.issubdtype(spec_dtype, np.floating)
            else None
        )
        cuda_device = cp.cuda.Device(self.device.index)
        cuda_device.use()  # this thread; the hooks below enter the device themselves
        self._cuda_stream = self._make_stream(cp)
        self._cuda_device = cuda_device
        self._out_of_memory = getattr(getattr(cp.cuda, "memory", None), "OutOfMemoryError", None)
        self._cp = cp

    def _prepare(self, batch: Array) -> Any:
        if self._cast is not None:
            batch = batch.astype(self._cast)
        with self._guard(batch.shape[0]), self._cuda_device, self._cuda_stream:
            return self._cp.asarray(batch)

    def _run(self, prepared: Any) -> Any:
        batch_size = int(prepared.shape[0]) if getattr(prepared, "shape", None) else None
        with self._guard(batch_size), self._cuda_device, self._cuda_stream:
            return self.member.source(prepared)

    def _to_numpy(self, output: Any) -> Array:
        with self._cuda_device:
            host = self._cp.asnumpy(output, stream=self._cuda_stream)
            self._cuda_stream.synchronize()
        return np.asarray(host)

    def _synchronize(self) -> None:
        if self._cuda_stream is not None:
            self._cuda_stream.synchronize()

    def _deactivate(self) -> None:
        try:
            if self._cuda_stream is not None:
                self._cuda_stream.synchronize()
        finally:
            self._cuda_stream = None
            self._cuda_device = None
            self._cp = None

    # --- helpers ------------------------------------------------------------------

    def _make_stream(self, cp: Any) -> Any:
        given = self.stream
        if given is None:
            return cp.cuda.Stream(non_blocking=True)
        cupy_streams = tuple(
            kind
            for kind in (getattr(cp.cuda, "Stream", None), getattr(cp.cuda, "ExternalStream", None))
            if isinstance(kind, type)
        )
        if cupy_streams and isinstance(given, cupy_streams):
            return given
        return cp.cuda.ExternalStream(stream_handle(given), device_id=self.device.index)

    def _guard(self, batch_size: int | None) -> _OutOfMemoryGuard:
        return _OutOfMemoryGuard(self.member.name, batch_size, self._out_of_memory)


class _OutOfMemoryGuard:
    """Turns CuPy's ``OutOfMemoryError`` into :class:`MemberOutOfMemoryError`."""

    def __init__(self, member: str, batch_size: int | None, error: type[BaseException] | None) -> None:
        self.member = member
        self.batch_size = batch_size
        self.error = error

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if self.error is not None and exc is not None and isinstance(exc, self.error):
            at = f" at batch size {self.batch_size}" if self.batch_size is not None else ""
            raise MemberOutOfMemoryError(
                f"member '{self.member}': CuPy ran out of device memory{at} ({exc}); use a smaller "
                "batch, or cap other members (cupy.get_default_memory_pool().set_limit)",
                member=self.member,
                batch_size=self.batch_size,
            ) from exc


__all__ = ["CupyRunner"]
