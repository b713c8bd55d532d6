"""Shared pieces of the execution tests: plans built by hand, members that fail or sleep on cue.

The torch modules and factories live at module level so that worker processes
(started with spawn) can unpickle the members that use them.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from colocate.backends import create_runner
from colocate.devices import Device, cpu_device
from colocate.ensemble import Array, Ensemble, InputSpec, Member
from colocate.execution import Executor
from colocate.planning.types import Plan, Prediction, Slot

TINY_SHAPE = (-1, 3, 32, 32)
CLASSES = 10


def make_plan(*slots: Slot, batch_size: int = 4, device: Device | None = None) -> Plan:
    """A plan with these slots (on the CPU by default) and a zero prediction."""
    prediction = Prediction(
        throughput_sps=0.0,
        latency_s=0.0,
        latency_p99_s=0.0,
        peak_memory_bytes=0,
        critical_member=slots[0].members[0],
        bound="test",
        members=(),
    )
    return Plan(
        device=device or cpu_device(),
        batch_size=batch_size,
        slots=tuple(slots),
        prediction=prediction,
        strategy="test",
    )


def sequential(
    ensemble: Ensemble, batch: Array, device: Device | None = None
) -> tuple[Array, dict[str, Array]]:
    """The reference: each member alone, one after another, then the ensemble's combine rule."""
    outputs: dict[str, Array] = {}
    for member in ensemble.members:
        with create_runner(member, device or cpu_device()) as runner:
            outputs[member.name] = runner.infer(batch)
    return ensemble.combine_outputs(outputs), outputs


class Head(torch.nn.Module):
    """A fixed linear head over the flattened 3x32x32 image: deterministic logits."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.weight = torch.nn.Parameter(torch.randn(3 * 32 * 32, CLASSES, generator=generator) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight


class Bomb(Head):
    """Raises when the batch's first value is ``trigger``; otherwise the linear head."""

    def __init__(self, trigger: float) -> None:
        super().__init__()
        self.trigger = trigger

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.flatten()[0]) == self.trigger:
            raise RuntimeError(f"boom: first value is {self.trigger:g}")
        return super().forward(x)


class Sleeper(Head):
    """Sleeps ``delay_s`` per batch, then the linear head: keeps requests in flight."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay_s)
        return super().forward(x)


@dataclass(frozen=True)
class BombFactory:
    trigger: float

    def __call__(self) -> torch.nn.Module:
        return Bomb(self.trigger)


@dataclass(frozen=True)
class SleeperFactory:
    delay_s: float

    def __call__(self) -> torch.nn.Module:
        return Sleeper(self.delay_s)


@dataclass(frozen=True)
class ForkingSleeperFactory:
    """A :class:`Sleeper` whose loading forks a process that holds every descriptor of the worker
    (its pipe to the serving process too) for ``hold_s``; the fork's pid goes to ``pid_file``."""

    delay_s: float
    pid_file: str
    hold_s: float = 30.0

    def __call__(self) -> torch.nn.Module:
        pid = os.fork()
        if pid == 0:  # the fork: keep the inherited descriptors open, then leave without clean-up
            time.sleep(self.hold_s)
            os._exit(0)
        with open(self.pid_file, "w") as out:
            out.write(str(pid))
        return Sleeper(self.delay_s)


@dataclass(frozen=True)
class SlowLoadingFactory:
    """A :class:`Head` that takes ``load_s`` to load, or fails to (``fail``) once that passed."""

    load_s: float
    fail: bool = False

    def __call__(self) -> torch.nn.Module:
        time.sleep(self.load_s)
        if self.fail:
            raise RuntimeError("weights missing")
        return Head()


def slow_loading(name: str, load_s: float, *, fail: bool = False) -> Member:
    return Member(
        name=name, backend="torch", source=SlowLoadingFactory(load_s, fail), input=InputSpec(TINY_SHAPE)
    )


class _FirstFeatures(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10]  # a view of the input: no copy


def flatten_identity() -> torch.nn.Module:
    """A model whose 10 outputs are its input's first 10 values: a view of the input, as torch
    returns it on the CPU."""
    return _FirstFeatures()


def forking_sleeper(name: str, delay_s: float, pid_file: str) -> Member:
    return Member(
        name=name,
        backend="torch",
        source=ForkingSleeperFactory(delay_s, pid_file),
        input=InputSpec(TINY_SHAPE),
    )


def bomb(name: str, trigger: float) -> Member:
    return Member(name=name, backend="torch", source=BombFactory(trigger), input=InputSpec(TINY_SHAPE))


def sleeper(name: str, delay_s: float) -> Member:
    return Member(name=name, backend="torch", source=SleeperFactory(delay_s), input=InputSpec(TINY_SHAPE))


def batch_with_first(value: float, seed: int = 0, batch_size: int = 4) -> Array:
    array = InputSpec(TINY_SHAPE).example(batch_size, seed=seed)
    array.flat[0] = value
    return array


def shm_left(prefix: str | None) -> list[str]:
    """Shared-memory segments under /dev/shm whose names start with ``prefix``."""
    if prefix is None or not os.path.isdir("/dev/shm"):
        return []
    return [name for name in os.listdir("/dev/shm") if name.startswith(prefix)]


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def assert_released(
    executor: Executor, pids: Iterable[int], prefix: str | None, *, no_children: bool = True
) -> None:
    """After close: no worker process, no shared-memory segment is left (and, with
    ``no_children``, no child process at all: only when no other executor is open)."""
    wanted = list(pids)
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and any(pid_exists(p) for p in wanted):
        time.sleep(0.05)
    assert [p for p in wanted if pid_exists(p)] == [], "worker processes left running"
    children = multiprocessing.active_children()
    assert [c for c in children if c.pid in wanted] == []
    if no_children:
        assert children == []
    assert shm_left(prefix) == []
    assert executor.shared_memory_names() == ()


def assert_close(actual: Array, expected: Array, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
