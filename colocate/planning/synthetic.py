"""Synthetic profiles: made-up but plausible members, for tests, benchmarks and what-if planning.

:func:`synthetic_profile` builds one :class:`~colocate.profiling.Profile` from a handful of
numbers (latency, GPU busy share, SM fill, host share, memory); :func:`synthetic_profiles`
draws ``n`` members at random (seeded) in the ranges the recorded H200 profiles span.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from colocate._timing import LatencyStats
from colocate.devices import Device
from colocate.errors import InvalidInputError
from colocate.profiling.types import CpuFootprint, KernelFootprint, MemoryFootprint, Profile, ProfileSet

_MIB = 1 << 20


def synthetic_profile(
    member: str,
    device: Device,
    *,
    batch_size: int = 32,
    latency_s: float,
    busy: float = 0.5,
    sm_fill: float = 0.8,
    host_share: float = 0.5,
    weights_mib: float = 100.0,
    activation_mib: float = 200.0,
    p99_ratio: float = 1.1,
    precision: str = "fp32",
    process_mib: float | None = None,
    threads: int | None = None,
    thread_scaling: Sequence[tuple[int, float]] = (),
    status: str = "ok",
) -> Profile:
    """One profile with the given figures (GPU figures on a GPU, CPU figures on the CPU).

    ``process_mib``, when given, is the whole process's memory (NVML per-process on a GPU), from
    which the planner measures the per-process cost (process minus weights and activations).
    """
    if latency_s <= 0 or not 0 <= busy <= 1 or not 0 < sm_fill <= 1 or not 0 <= host_share <= 1:
        raise InvalidInputError(
            f"synthetic profile '{member}': need latency > 0, busy and host share in [0, 1], fill in (0, 1]"
        )
    if status != "ok":
        return Profile(
            member=member,
            backend="torch",
            precision=precision,
            batch_size=batch_size,
            device=device,
            model_hash=f"synthetic-{member}",
            status="out_of_memory" if status == "out_of_memory" else "failed",
            load_time_s=0.0,
            latency=None,
            throughput_sps=0.0,
            host_share=None,
            memory=None,
            kernels=None,
            cpu=None,
            energy=None,
            error=f"synthetic {status}",
        )
    p99 = latency_s * max(1.0, p99_ratio)
    latency = LatencyStats(
        samples_s=(latency_s,),
        median_s=latency_s,
        p90_s=latency_s + (p99 - latency_s) * 0.5,
        p99_s=p99,
        mean_s=latency_s,
        min_s=latency_s,
        max_s=p99,
        iqr_s=0.0,
    )
    weights = int(weights_mib * _MIB)
    activation = int(activation_mib * _MIB)
    memory = MemoryFootprint(
        weights_bytes=weights,
        peak_activation_bytes=activation,
        reserved_unused_bytes=0,
        process_bytes=int(process_mib * _MIB) if process_mib is not None else None,
        source="synthetic",
    )
    kernels = None
    cpu = None
    if device.is_gpu:
        sms = device.sm_count or 100
        kernels = KernelFootprint(
            source="synthetic",
            traced_batches=1,
            kernels_per_batch=100.0,
            kernel_time_s=latency_s * busy,
            busy_fraction=busy,
            launch_gap_median_s=10e-6,
            launch_gap_p90_s=20e-6,
            max_grid_blocks=max(1, round(sm_fill * sms)),
            typical_grid_blocks=max(1, round(sm_fill * sms)),
            sm_fill=sm_fill,
            occupancy_pct=None,
            first_kernel_delay_s=10e-6,
        )
    else:
        cpu = CpuFootprint(
            threads=threads or max(1, device.cpu_cores),
            busy_share=busy,
            thread_scaling=tuple(thread_scaling),
            top_ops=(),
        )
    return Profile(
        member=member,
        backend="torch",
        precision=precision,
        batch_size=batch_size,
        device=device,
        model_hash=f"synthetic-{member}",
        status="ok",
        load_time_s=0.0,
        latency=latency,
        throughput_sps=batch_size / latency_s,
        host_share=host_share if device.is_gpu else None,
        memory=memory,
        kernels=kernels,
        cpu=cpu,
        energy=None,
    )


def synthetic_profiles(
    n: int,
    device: Device,
    *,
    seed: int = 0,
    batch_size: int = 32,
    prefix: str = "m",
) -> ProfileSet:
    """``n`` random members (``m0``, ``m1``, ...) profiled on ``device`` at one batch size.

    Latencies are log-uniform over 0.3-30 ms; GPU busy share 0.1-0.95, SM fill 0.3-1, host share
    0.05-1; weights 5-500 MiB, activations 20-1000 MiB; p99 / median 1.02-1.4 (seeded).
    """
    if n < 1:
        raise InvalidInputError(f"synthetic_profiles needs n >= 1, got {n}")
    rng = random.Random(seed)
    profiles = []
    for i in range(n):
        profiles.append(
            synthetic_profile(
                f"{prefix}{i}",
                device,
                batch_size=batch_size,
                latency_s=10 ** rng.uniform(-3.5, -1.5),
                busy=rng.uniform(0.1, 0.95),
                sm_fill=rng.uniform(0.3, 1.0),
                host_share=rng.uniform(0.05, 1.0),
                weights_mib=rng.uniform(5, 500),
                activation_mib=rng.uniform(20, 1000),
                p99_ratio=rng.uniform(1.02, 1.4),
            )
        )
    return ProfileSet(tuple(profiles))


__all__ = ["synthetic_profile", "synthetic_profiles"]
