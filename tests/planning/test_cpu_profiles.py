"""Planning from real CPU profiles of the default ensemble (tiny scale): for the CPU and an H100."""

from __future__ import annotations

import pytest

from colocate import serde, zoo
from colocate.devices import cpu_device
from colocate.planning import Plan, plan, plan_all, render_plan
from colocate.profiling import ProfileSet, ProfileSettings, profile

from .helpers import h100

FAST = ProfileSettings(warmup=1, repeats=5, max_time_s=0.2, trace_batches=1, thread_scaling=False)


@pytest.fixture(scope="module")
def cpu_profiles() -> tuple[object, ProfileSet]:
    ensemble = zoo.default_ensemble(scale="tiny")
    return ensemble, profile(ensemble, cpu_device(), (1, 8), settings=FAST, cache=False)


def test_cpu_plans_are_valid_and_beat_or_match_sequential(cpu_profiles) -> None:  # type: ignore[no-untyped-def]
    ensemble, ps = cpu_profiles
    device = cpu_device()
    plans = plan_all(ensemble, device, ps, batch_size=8)
    assert not plans.skipped or set(plans.skipped) <= {"processes", "mps"}
    by = {p.strategy: p for p in plans}
    assert by["auto"].prediction.throughput_sps >= by["sequential"].prediction.throughput_sps
    for p in plans:
        p.check_covers(ensemble.member_names)
        assert all(m.source == "measured" for m in p.prediction.members)
        assert p.prediction.peak_memory_bytes <= (device.memory_free_bytes or device.memory_total_bytes)
        for slot in p.slots:
            if slot.kind == "mps":
                assert slot.cpu_threads is not None and 1 <= slot.cpu_threads <= device.cpu_cores
                assert slot.memory_limit_bytes is None
    assert serde.loads(Plan, serde.dumps(by["auto"])) == by["auto"]
    text = render_plan(by["auto"])
    assert "on the CPU a stream slot is a thread" in text


def test_cpu_profiles_plan_for_a_simulated_gpu_with_estimates(cpu_profiles) -> None:  # type: ignore[no-untyped-def]
    ensemble, ps = cpu_profiles
    p = plan(ensemble, h100(), ps)
    assert p.batch_size == 8
    assert all(m.source.startswith("estimated: estimated from a CPU profile") for m in p.prediction.members)
    assert any("estimated: resnet, mobilenet, efficientnet, vit, mlp" in n for n in p.notes)
    assert any("500 MiB per CUDA context" in n for n in p.notes)
