"""colocate: run an ensemble of deep-learning models as fast as possible on one GPU.

Profile each member, plan how to co-locate them (streams, processes, MPS
partitions), and execute and compare plans. ``import colocate`` needs none of
the heavy frameworks; they are imported when a backend is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

from colocate.devices import Device
from colocate.ensemble import Ensemble, InputSpec, Member
from colocate.errors import (
    BackendUnavailableError,
    ColocateError,
    DeviceError,
    ExportError,
    InternalError,
    InvalidInputError,
    MeasurementError,
    MemberOutOfMemoryError,
    ModelLoadError,
    MPSUnavailableError,
    PlanInfeasibleError,
    UnknownBackendError,
    WorkerFailedError,
)

__version__ = "0.1.0"

# Heavier parts resolve on first use, so `import colocate` stays light.
_LAZY = {
    "profile": ("colocate.profiling", "profile"),
    "Profile": ("colocate.profiling", "Profile"),
    "ProfileSet": ("colocate.profiling", "ProfileSet"),
    "plan": ("colocate.planning", "plan"),
    "Plan": ("colocate.planning.types", "Plan"),
    "Executor": ("colocate.execution", "Executor"),
    "compare": ("colocate.comparison", "compare"),
    "calibrate": ("colocate.comparison", "calibrate"),
    "calibrate_backends": ("colocate.comparison", "calibrate_backends"),
    "load_calibration": ("colocate.comparison", "load_calibration"),
    "Calibration": ("colocate.comparison", "Calibration"),
    "RunSettings": ("colocate.comparison", "RunSettings"),
    "Report": ("colocate.report", "Report"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(module_name), attribute)
    raise AttributeError(f"module 'colocate' has no attribute {name!r}")


__all__ = [
    "BackendUnavailableError",
    "ColocateError",
    "Device",
    "DeviceError",
    "Ensemble",
    "ExportError",
    "InputSpec",
    "InternalError",
    "InvalidInputError",
    "MPSUnavailableError",
    "MeasurementError",
    "Member",
    "MemberOutOfMemoryError",
    "ModelLoadError",
    "PlanInfeasibleError",
    "UnknownBackendError",
    "WorkerFailedError",
    "__version__",
    *_LAZY,
]
