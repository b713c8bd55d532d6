"""colocate: run an ensemble of deep-learning models as fast as possible on one GPU.

Profile each member, plan how to co-locate them (streams, processes, MPS
partitions), and execute and compare plans. ``import colocate`` needs none of
the heavy frameworks; they are imported when a backend is first used.
"""

from __future__ import annotations

from colocate.devices import Device
from colocate.ensemble import Ensemble, InputSpec, Member
from colocate.errors import (
    BackendUnavailableError,
    ColocateError,
    DeviceError,
    InternalError,
    InvalidInputError,
    MeasurementError,
    MemberOutOfMemoryError,
    ModelLoadError,
    MPSUnavailableError,
    PlanInfeasibleError,
    WorkerFailedError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ColocateError",
    "Device",
    "DeviceError",
    "Ensemble",
    "InputSpec",
    "InternalError",
    "InvalidInputError",
    "MPSUnavailableError",
    "MeasurementError",
    "Member",
    "MemberOutOfMemoryError",
    "ModelLoadError",
    "PlanInfeasibleError",
    "WorkerFailedError",
    "__version__",
]
