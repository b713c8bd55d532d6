"""The demo: load the default ensemble on the best device and answer one batch.

It prints each member's load time and latency and the combined prediction.
Later stages (profile, plan, compare) build on the same pieces.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from colocate import zoo
from colocate._timing import LatencyStats, measure
from colocate.backends import create_runner
from colocate.backends.base import MemberRunner
from colocate.config import cache_dir
from colocate.devices import Device
from colocate.ensemble import Array, Ensemble


@dataclass(frozen=True)
class MemberTiming:
    """One member's figures in the demo. Times in seconds."""

    member: str
    backend: str
    load_time_s: float  # activate(): build/load + move to the device
    latency: LatencyStats  # run + synchronize on a staged batch


@dataclass(frozen=True)
class DemoResult:
    """What the demo measured."""

    device: Device
    ensemble: str
    batch_size: int
    members: tuple[MemberTiming, ...]
    predicted_class: tuple[int, ...]  # combined prediction per sample
    confidence: tuple[float, ...]  # combined probability of that class
    sequential_latency_s: float  # sum of member medians: the one-after-another baseline


def default_ensemble_for(device: Device, scale: str | None, backend: str) -> Ensemble:
    """The default ensemble at ``scale`` (``"large"`` on a GPU, ``"small"`` on the CPU by default)."""
    chosen = scale or ("large" if device.kind == "cuda" else "small")
    onnx_dir = str(cache_dir("onnx", chosen)) if backend != "torch" else None
    return zoo.default_ensemble(scale=chosen, backend=backend, onnx_dir=onnx_dir)


def run_demo(
    ensemble: Ensemble,
    device: Device,
    *,
    batch_size: int = 8,
    repeats: int = 10,
    seed: int = 0,
    on_member: Callable[[str], None] | None = None,
) -> DemoResult:
    """Load every member on ``device``, time it on one batch, combine the predictions."""
    timings: list[MemberTiming] = []
    outputs: dict[str, Array] = {}
    for member in ensemble.members:
        if on_member is not None:
            on_member(member.name)
        batch = member.input.example(batch_size, seed=seed)
        runner: MemberRunner = create_runner(member, device)
        with runner:
            prepared = runner.prepare(batch)
            latency = measure(
                functools.partial(runner.run, prepared),
                sync=runner.synchronize,
                warmup=2,
                repeats=repeats,
            )
            outputs[member.name] = runner.infer(batch)
            timings.append(MemberTiming(member.name, member.backend, runner.load_time_s or 0.0, latency))
    combined = ensemble.combine_outputs(outputs)
    predicted = combined.argmax(axis=1)
    return DemoResult(
        device=device,
        ensemble=ensemble.name,
        batch_size=batch_size,
        members=tuple(timings),
        predicted_class=tuple(int(c) for c in predicted),
        confidence=tuple(float(p) for p in combined[np.arange(len(predicted)), predicted]),
        sequential_latency_s=sum(t.latency.median_s for t in timings),
    )
