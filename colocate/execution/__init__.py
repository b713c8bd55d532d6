"""Execution: run a plan's slots and serve the ensemble (see docs/execution.md).

- :class:`Executor` starts a :class:`~colocate.planning.types.Plan`'s slots (``stream``:
  a thread and CUDA stream in this process; ``process``: a spawned worker; ``mps``: a
  worker under NVIDIA MPS, or pinned to a share of the cores on the CPU) and answers
  requests with the ensemble's combined prediction (:class:`EnsembleResult`).
- :func:`run_requests` drives an executor and measures it (:class:`RunResult`).
- :class:`MpsDaemon` finds, or starts and stops, the MPS control daemon.

Nothing here imports a framework until a slot loads its members.
"""

from __future__ import annotations

from colocate.execution.front import Executor
from colocate.execution.measure import default_batch, run_at_rate, run_requests
from colocate.execution.mps import MpsDaemon
from colocate.execution.types import (
    EnsembleResult,
    ExecutorStats,
    ProcessMemory,
    RunResult,
    SlotAnswer,
    SlotTiming,
)

__all__ = [
    "EnsembleResult",
    "Executor",
    "ExecutorStats",
    "MpsDaemon",
    "ProcessMemory",
    "RunResult",
    "SlotAnswer",
    "SlotTiming",
    "default_batch",
    "run_at_rate",
    "run_requests",
]
