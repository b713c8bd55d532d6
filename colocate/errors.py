"""The one exception hierarchy of colocate.

Every error colocate raises on purpose is a :class:`ColocateError`. Messages
name the member (where there is one), the value that was wrong, what was
expected, and the fix.
"""

from __future__ import annotations


class ColocateError(Exception):
    """Base class of every error colocate raises on purpose."""


class InvalidInputError(ColocateError, ValueError):
    """A value given by the caller is wrong: a shape, a dtype, a name, an option."""


class UnknownBackendError(InvalidInputError):
    """A backend or backend-variant name that colocate does not know."""


class BackendUnavailableError(ColocateError, ImportError):
    """A backend (or another optional feature) needs a package that is not installed."""


class ModelLoadError(ColocateError):
    """A member's model could not be loaded: missing or corrupt file, failing factory."""


class ExportError(ModelLoadError):
    """A member cannot be converted to the format a backend variant needs (e.g. ONNX)."""


class DeviceError(ColocateError):
    """A device cannot do what was asked (e.g. run a member on a simulated GPU)."""


class MemberOutOfMemoryError(ColocateError):
    """A member ran out of device memory.

    Attributes:
        member: name of the member.
        batch_size: batch size at which it ran out, or None when unknown.
    """

    def __init__(self, message: str, *, member: str, batch_size: int | None = None) -> None:
        super().__init__(message)
        self.member = member
        self.batch_size = batch_size


class PlanInfeasibleError(ColocateError):
    """A plan cannot run on the device: it does not fit in memory, or asks for what is absent."""


class MPSUnavailableError(ColocateError):
    """NVIDIA MPS was asked for but cannot be used on this machine."""


class WorkerFailedError(ColocateError):
    """A worker thread or process died or failed while running a member."""


class MeasurementError(ColocateError):
    """A measurement could not be taken or is not trustworthy."""


class InternalError(ColocateError):
    """An internal invariant failed. This is a bug in colocate: please report it."""


def os_error_reason(exc: OSError, *, path: object = None) -> str:
    """Why a file operation failed, for a message: the system's reason and the file it names
    (left out when it is ``path``, which the message names already)."""
    reason = exc.strerror or str(exc)
    if exc.filename and (path is None or str(exc.filename) != str(path)):
        reason += f": {exc.filename}"
    return reason


__all__ = [
    "BackendUnavailableError",
    "ColocateError",
    "DeviceError",
    "ExportError",
    "InternalError",
    "InvalidInputError",
    "MPSUnavailableError",
    "MeasurementError",
    "MemberOutOfMemoryError",
    "ModelLoadError",
    "PlanInfeasibleError",
    "UnknownBackendError",
    "WorkerFailedError",
    "os_error_reason",
]
