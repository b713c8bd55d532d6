"""Member demands from profiles: measured, interpolated, scaled from another GPU or the CPU."""

from __future__ import annotations

import dataclasses

import pytest

from colocate.devices import Device, find_device
from colocate.ensemble import Ensemble, InputSpec, Member
from colocate.errors import InvalidInputError, PlanInfeasibleError
from colocate.planning import member_demands
from colocate.planning.demands import (
    ESTIMATED_SM_FILL,
    GPU_ACTIVATION_FACTOR,
    MemberDemand,
    device_key,
)
from colocate.planning.synthetic import synthetic_profile
from colocate.profiling import ProfileSet

from .helpers import MIB, h100, profiles, recorded


def _model() -> None:  # a picklable-enough factory for test members
    return None


def test_recorded_h200_profiles_are_measured_on_an_h200() -> None:
    ps = recorded()
    ds = member_demands(ps.members, find_device("h200"), ps, 32)
    for d in ds.members:
        p = ps.get(d.member, 32)
        assert p is not None and p.latency and p.kernels and p.memory
        assert d.source == "measured"
        assert d.latency_s == p.latency.median_s
        assert d.busy_fraction == pytest.approx(p.kernels.busy_fraction)
        assert d.sm_fill == pytest.approx(p.kernels.sm_fill)
        assert d.memory_bytes == p.memory.total_bytes
    assert ds.process_bytes_source.startswith("measured")
    assert 600 * MIB < ds.process_bytes < 1100 * MIB  # NVML process memory minus allocator use
    assert ds.host_cores == 16  # the profiled machine's cores, for a simulated device


def test_profiles_from_another_gpu_scale_kernel_time_by_compute_and_bandwidth() -> None:
    ps = recorded()
    ds = member_demands(ps.members, h100(), ps, 32)
    ratio = 0.5 * (67 / 67) + 0.5 * (4800 / 3350)
    for d in ds.members:
        p = ps.get(d.member, 32)
        assert p is not None and p.latency and p.kernels and p.host_share is not None
        latency = p.latency.median_s
        busy, host = latency * p.kernels.busy_fraction, latency * p.host_share
        expected = latency - max(host, busy) + max(host, busy * ratio)
        assert d.latency_s == pytest.approx(expected, rel=1e-9), d.member
        assert d.busy_s == pytest.approx(busy * ratio, rel=1e-9)
        assert d.host_s == pytest.approx(host, rel=1e-9)
        assert d.source.startswith("estimated: scaled from NVIDIA H200 profiles")
        assert "x1.22" in d.source
    resnet = ds["resnet"]  # host-bound at batch 32: the slower GPU hides under the host time
    assert resnet.latency_s == pytest.approx(ps.get("resnet", 32).latency.median_s)  # type: ignore[union-attr]
    assert ds["vit"].latency_s > 1.15 * ps.get("vit", 32).latency.median_s  # type: ignore[union-attr]
    assert not ds.process_bytes_source.startswith("measured")  # measured on the H200, not here


def test_unprofiled_batch_sizes_are_interpolated_and_marked() -> None:
    ps = recorded()
    ds = member_demands(ps.members, find_device("h200"), ps, 16)
    for d in ds.members:
        lo, hi = ps.get(d.member, 8), ps.get(d.member, 32)
        assert lo and hi and lo.latency and hi.latency and lo.memory and hi.memory
        w = (16 - 8) / (32 - 8)
        assert d.latency_s == pytest.approx(
            lo.latency.median_s + w * (hi.latency.median_s - lo.latency.median_s)
        )
        act_lo = lo.memory.total_bytes - lo.memory.weights_bytes
        act_hi = hi.memory.total_bytes - hi.memory.weights_bytes
        assert d.activation_bytes == round(act_lo + w * (act_hi - act_lo))
        assert d.source == "estimated: interpolated between batch 8 and 32"
    big = member_demands(ps.members, find_device("h200"), ps, 256)
    for d in big.members:
        top = ps.get(d.member, 128)
        assert top and top.latency and top.memory
        assert d.latency_s >= top.latency.median_s
        assert d.activation_bytes >= 2 * (top.memory.total_bytes - top.memory.weights_bytes) - 1
        assert "extrapolated above the largest profiled batch 128" in d.source


def test_one_profiled_size_scales_busy_time_and_activations_only() -> None:
    ps = profiles(
        {"name": "a", "latency_ms": 10.0, "busy": 0.4, "host_share": 0.5, "activation_mib": 100, "batch": 8}
    )
    d = member_demands(["a"], h100(), ps, 16)["a"]
    assert d.host_s == pytest.approx(0.005)
    assert d.busy_s == pytest.approx(0.008)
    assert d.latency_s == pytest.approx(0.010 - 0.005 + 0.008)
    assert d.activation_bytes == 200 * MIB
    assert "scaled from batch 8" in d.source
    small = member_demands(["a"], h100(), ps, 2)["a"]
    assert small.latency_s == pytest.approx(0.010)  # host-bound: dispatch does not shrink with the batch
    two = ProfileSet(
        (*ps.profiles, synthetic_profile("a", h100(), batch_size=32, latency_s=0.030, activation_mib=400))
    )
    below = member_demands(["a"], h100(), two, 2)["a"]
    assert 0.010 * 2 / 8 <= below.latency_s <= 0.010
    assert "extrapolated below the smallest profiled batch 8" in below.source


def test_cpu_profiles_give_estimated_gpu_demands() -> None:
    cpu = Device(kind="cpu", name="cpu", memory_total_bytes=8 << 30, cpu_cores=4)
    ps = ProfileSet(
        (synthetic_profile("a", cpu, batch_size=8, latency_s=0.004, busy=0.9, activation_mib=10, threads=4),)
    )
    d = member_demands(["a"], h100(), ps, 8)["a"]
    assert d.source.startswith("estimated: estimated from a CPU profile")
    assert d.sm_fill == ESTIMATED_SM_FILL
    assert d.activation_bytes == round(10 * MIB * GPU_ACTIVATION_FACTOR)
    assert 0 < d.latency_s < 0.004  # the GPU is faster than 4 CPU cores


def test_cpu_demands_use_cores_and_thread_scaling() -> None:
    cpu = Device(kind="cpu", name="cpu", memory_total_bytes=8 << 30, cpu_cores=4)
    scaling = ((1, 0.012), (2, 0.007), (4, 0.004))
    ps = ProfileSet((synthetic_profile("a", cpu, latency_s=0.004, threads=4, thread_scaling=scaling),))
    d = member_demands(["a"], cpu, ps, 32)["a"]
    assert d.source == "measured" and d.host_share == 0.0
    assert d.sm_fill == 1.0  # 4 threads on 4 cores
    assert d.latency_with_threads(1) == pytest.approx(0.012)
    assert d.latency_with_threads(2) == pytest.approx(0.007)
    assert d.latency_with_threads(3) == pytest.approx(0.0055)
    flat = dataclasses.replace(d, thread_scaling=())
    assert flat.latency_with_threads(2) == pytest.approx(0.004 * (0.2 + 0.8 * 2))


def test_gpu_only_profiles_cannot_plan_for_the_cpu() -> None:
    ps = recorded()
    cpu = Device(kind="cpu", name="cpu", memory_total_bytes=8 << 30, cpu_cores=4)
    with pytest.raises(InvalidInputError, match="colocate profile --device cpu"):
        member_demands(ps.members, cpu, ps, 8)


def test_a_member_without_profiles_is_named() -> None:
    ps = recorded()
    with pytest.raises(InvalidInputError, match=r"member 'extra' has no profile.*colocate profile"):
        member_demands([*ps.members, "extra"], h100(), ps, 8)


def test_out_of_memory_on_this_device_is_infeasible() -> None:
    ps = ProfileSet(
        (
            synthetic_profile("a", h100(), batch_size=8, latency_s=0.01),
            synthetic_profile("a", h100(), batch_size=64, latency_s=0.01, status="out_of_memory"),
        )
    )
    with pytest.raises(
        PlanInfeasibleError, match=r"member 'a' ran out of memory.*batch 64.*largest profiled batch"
    ):
        member_demands(["a"], h100(), ps, 128)
    assert member_demands(["a"], h100(), ps, 16)["a"].latency_s > 0


def test_per_process_cost_is_measured_from_process_memory() -> None:
    ps = profiles(
        {"name": "a", "latency_ms": 5, "weights_mib": 100, "activation_mib": 200, "process_mib": 1000}
    )
    ds = member_demands(["a"], h100(), ps, 8)
    assert ds.process_bytes == 700 * MIB
    assert ds.process_bytes_source.startswith("measured")


def test_ensemble_members_give_input_size_and_precision() -> None:
    ensemble = Ensemble(
        (
            Member("a", "torch", _model, InputSpec((-1, 3, 8, 8)), precision="fp16"),
            Member("b", "torch", _model, InputSpec((-1, 16))),
        )
    )
    ps = profiles({"name": "a", "latency_ms": 5}, {"name": "b", "latency_ms": 5})
    ds = member_demands(ensemble, h100(), ps, 8)
    assert ds["a"].input_bytes == 8 * 3 * 8 * 8 * 4
    assert ds["b"].input_bytes == 8 * 16 * 4
    assert any("a: runs in fp16 but was profiled in fp32" in n for n in ds.notes)


def test_device_identity() -> None:
    real = dataclasses.replace(find_device("h200"), kind="cuda", name="NVIDIA H200")
    assert device_key(real) == device_key(find_device("h200"))
    assert device_key(find_device("h100")) != device_key(find_device("h200"))
    assert device_key(Device(kind="cpu", name="x")) == "cpu"


def test_demand_helpers() -> None:
    d = MemberDemand("a", 8, 0.01, 0.02, 0.5, 0.5, 0.2, 10, 20)
    assert d.memory_bytes == 30 and d.sm_seconds == pytest.approx(0.0025) and d.p99_ratio == 2.0
    with pytest.raises(InvalidInputError, match="batch size"):
        member_demands(["a"], h100(), ProfileSet(()), 0)


def test_two_profiles_at_one_batch_size_take_the_latest_not_a_division_by_zero() -> None:
    # --profiles a.json b.json concatenates: the same member measured twice at batch 1 (or in
    # two precisions) divided by zero when interpolating to any size outside the profiled ones
    h = h100()
    older = dataclasses.replace(
        synthetic_profile("m", h, batch_size=1, latency_s=0.004), measured_at="2026-11-27"
    )
    newer = dataclasses.replace(
        synthetic_profile("m", h, batch_size=1, latency_s=0.002), measured_at="2026-11-28"
    )
    at_4 = dataclasses.replace(
        synthetic_profile("m", h, batch_size=4, latency_s=0.005), measured_at="2026-11-28"
    )
    for order in ((older, newer, at_4), (newer, at_4, older)):
        demand = member_demands(["m"], h, ProfileSet(order), 8).members[0]
        assert demand.latency_s == pytest.approx(0.002 + (0.005 - 0.002) * (8 - 1) / 3)  # from the newer
    half = dataclasses.replace(
        synthetic_profile("m", h, batch_size=1, latency_s=0.001, precision="fp16"), measured_at="2026-11-29"
    )
    mixed = member_demands(["m"], h, ProfileSet((newer, at_4, half)), 16).members[0]
    assert mixed.latency_s > 0  # precisions mixed (the member's unknown): no crash
