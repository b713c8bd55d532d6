"""plan() and plan_all(): objectives, the default batch size, errors, JSON, optimality."""

from __future__ import annotations

import itertools
import json

import pytest

from colocate import serde
from colocate.devices import Device
from colocate.errors import InvalidInputError, PlanInfeasibleError
from colocate.planning import CostModel, Plan, member_demands, plan, plan_all
from colocate.planning import search as search_module
from colocate.planning.cost import SlotSpec
from colocate.planning.search import SIMPLER_WITHIN
from colocate.planning.strategies import Context, _kind_assignments, set_partitions
from colocate.planning.synthetic import synthetic_profiles
from colocate.planning.types import PlanMeasurement
from colocate.profiling import ProfileSet

from .helpers import EAGER, GIB, GRAPHED, h100, profiles, recorded, t4


def physical_interval(p: Plan, ps: ProfileSet) -> float:
    """The least request interval any plan can have: SM time, and the slowest member alone."""
    ds = member_demands(list(p.members), p.device, ps, p.batch_size)
    return max(sum(d.sm_seconds for d in ds.members), max(d.latency_s for d in ds.members))


def check_valid(p: Plan, ps: ProfileSet, names: tuple[str, ...]) -> None:
    p.check_covers(names)
    assert sum(s.thread_percentage or 0 for s in p.slots if s.kind == "mps") <= 100 + 1e-9
    ds = member_demands(names, p.device, ps, p.batch_size)
    assert p.prediction.peak_memory_bytes <= CostModel().memory_limit_bytes(ds)
    assert p.prediction.throughput_sps <= p.batch_size / physical_interval(p, ps) * (1 + 1e-9)
    assert p.prediction.latency_p99_s >= p.prediction.latency_s > 0
    finishes = {m.member: m.finish_s for m in p.prediction.members}
    assert finishes[p.prediction.critical_member] == pytest.approx(max(finishes.values()))
    for m in p.prediction.members:
        assert m.finish_s - m.start_s >= m.alone_s * (1 - 1e-9) or p.slot_of(m.member).kind == "mps"
        assert m.slowdown >= 1.0
    for s in p.slots:
        if s.kind == "mps" and p.device.is_gpu:
            assert s.memory_limit_bytes is not None and s.thread_percentage is not None


@pytest.mark.parametrize("path", [EAGER, GRAPHED], ids=["eager-fp32", "graphed-fp16"])
@pytest.mark.parametrize("batch", [1, 8, 32, 128])
def test_recorded_profiles_plan_for_a_simulated_h100(path, batch) -> None:  # type: ignore[no-untyped-def]
    ps = recorded(path)
    plans = plan_all(ps.members, h100(), ps, batch_size=batch, strategies=["sequential", "auto"])
    assert not plans.skipped
    seq, auto = plans
    for p in plans:
        check_valid(p, ps, ps.members)
    assert auto.strategy == "auto" and seq.strategy == "sequential"
    assert auto.prediction.throughput_sps >= seq.prediction.throughput_sps
    assert any("critical member" in line for line in auto.explanation)
    assert any("scaled from NVIDIA H200" in note for note in auto.notes)


def test_small_batches_of_host_bound_members_and_the_measured_time_slicing() -> None:
    ps = recorded(EAGER)
    # as measured on the H200, time-sliced (or MPS) worker processes do not pay: auto keeps streams
    p = plan(ps.members, h100(), ps, batch_size=1)
    assert {s.kind for s in p.slots} == {"stream"}
    # where MPS overlaps clients as documented, host-bound members go to their own processes
    trusting = CostModel(trust_mps_overlap=True)
    p = plan(ps.members, h100(), ps, batch_size=1, model=trusting)
    assert {s.kind for s in p.slots} & {"process", "mps"}  # eager members are host-bound at batch 1
    seq = plan(ps.members, h100(), ps, batch_size=1, strategy="sequential", model=trusting)
    assert p.prediction.throughput_sps > 2 * seq.prediction.throughput_sps
    graphed = recorded(GRAPHED)
    streams = plan(graphed.members, h100(), graphed, batch_size=1, strategy="streams")
    procs = plan(graphed.members, h100(), graphed, batch_size=1, strategy="processes")
    assert streams.prediction.throughput_sps > procs.prediction.throughput_sps  # graphs: little host work


def test_default_batch_is_the_largest_profiled_up_to_32_that_fits() -> None:
    ps = recorded()
    p = plan(ps.members, h100(), ps)
    assert p.batch_size == 32
    assert any(n.startswith("batch size 32: the largest") for n in p.notes)
    small = Device(
        kind="simulated",
        name="small",
        memory_total_bytes=2 * GIB,
        memory_free_bytes=2 * GIB,
        sm_count=132,
        memory_bandwidth_gbs=3350,
        peak_fp32_tflops=67,
        peak_fp16_tflops=989,
    )
    assert plan(ps.members, small, ps).batch_size == 8


def test_unknown_names_and_missing_bounds_are_clear_errors() -> None:
    ps = recorded()
    with pytest.raises(
        InvalidInputError, match=r"unknown strategy 'fast'.*sequential, streams, processes, mps"
    ):
        plan(ps.members, h100(), ps, strategy="fast")
    with pytest.raises(InvalidInputError, match=r"unknown objective 'speed'.*throughput, latency"):
        plan(ps.members, h100(), ps, objective="speed")
    with pytest.raises(InvalidInputError, match="needs latency_bound_s"):
        plan(ps.members, h100(), ps, objective="throughput_under_latency")
    with pytest.raises(InvalidInputError, match="only used with objective"):
        plan(ps.members, h100(), ps, latency_bound_s=0.01)
    with pytest.raises(InvalidInputError, match="member 'ghost' has no profile"):
        plan([*ps.members, "ghost"], h100(), ps)


def test_a_latency_bound_no_plan_meets_reports_the_best_latency() -> None:
    ps = recorded()
    with pytest.raises(
        PlanInfeasibleError, match=r"latency bound of 1\.000 ms.*lowest predicted median latency is"
    ):
        plan(
            ps.members, h100(), ps, batch_size=32, objective="throughput_under_latency", latency_bound_s=0.001
        )


def test_throughput_under_a_latency_bound() -> None:
    ps = recorded(GRAPHED)
    everything = plan_all(ps.members, h100(), ps, batch_size=8)
    latencies = sorted(p.prediction.latency_s for p in everything)
    bound = (latencies[0] + latencies[-1]) / 2
    p = plan(
        ps.members, h100(), ps, batch_size=8, objective="throughput_under_latency", latency_bound_s=bound
    )
    assert p.prediction.latency_s <= bound
    meeting = [q for q in everything if q.prediction.latency_s <= bound]
    best = max(q.prediction.throughput_sps for q in meeting)
    assert p.prediction.throughput_sps >= best * (1 - SIMPLER_WITHIN)
    fastest = plan(ps.members, h100(), ps, batch_size=8, objective="latency")
    assert fastest.prediction.latency_s <= latencies[0] * (1 + SIMPLER_WITHIN)


def _hog_profiles() -> ProfileSet:
    return profiles(
        {"name": "hog", "latency_ms": 20, "weights_mib": 1024, "activation_mib": 7 * 1024},
        {"name": "b", "latency_ms": 10, "weights_mib": 512, "activation_mib": 4 * 1024},
        {"name": "c", "latency_ms": 10, "weights_mib": 512, "activation_mib": 3 * 1024},
        device=t4(),
    )


def test_a_memory_hungry_member_makes_streams_infeasible_and_is_named() -> None:
    ps = _hog_profiles()
    names = ps.members
    with pytest.raises(PlanInfeasibleError) as info:
        plan(names, t4(), ps, batch_size=8, strategy="streams")
    message = str(info.value)
    assert "strategy 'streams' has no plan that fits in memory on T4 (simulated)" in message
    assert "14.40 GiB usable (16.00 GiB free minus the 10% safety margin)" in message
    assert "each member needs (weights + peak activations): hog 8.00 GiB" in message  # largest first
    assert "strategy 'sequential' or 'auto'" in message
    best = plan(names, t4(), ps, batch_size=8)
    check_valid(best, ps, names)
    plans = plan_all(names, t4(), ps, batch_size=8)
    assert {"streams", "processes", "mps"} <= set(plans.skipped)
    assert "sequential" in [p.strategy for p in plans]


def test_nothing_fits_lists_every_members_need() -> None:
    ps = profiles(
        {"name": "huge", "latency_ms": 20, "weights_mib": 2048, "activation_mib": 20 * 1024},
        {"name": "tiny", "latency_ms": 1, "weights_mib": 10, "activation_mib": 10},
        device=t4(),
    )
    with pytest.raises(PlanInfeasibleError) as info:
        plan(ps.members, t4(), ps, batch_size=8)
    message = str(info.value)
    assert message.startswith("no plan fits in memory on T4 (simulated) at batch 8")
    assert "huge 22.00 GiB (2.00 GiB + 20.00 GiB), tiny 20 MiB (10 MiB + 10 MiB)" in message
    assert "huge alone need(s) more than is available" in message
    with pytest.raises(PlanInfeasibleError, match=r"no plan from|fits in memory"):
        plan(ps.members, t4(), ps)  # the default batch size cannot help either


def test_plans_round_trip_through_json() -> None:
    ps = recorded()
    for strategy in ("auto", "mps", "processes"):
        p = plan(ps.members, h100(), ps, batch_size=8, strategy=strategy)
        again = serde.loads(Plan, serde.dumps(p))
        assert again == p


def test_plans_record_the_model_of_each_members_profiles() -> None:
    ps = recorded()
    measured = {p.member: p.model_hash for p in ps.profiles}
    chosen = plan(ps.members, h100(), ps, batch_size=8)
    assert dict(chosen.model_hashes) == {m: measured[m] for m in chosen.members}
    assert chosen.model_hash_of(chosen.members[0]) == measured[chosen.members[0]]
    assert chosen.model_hash_of("not-a-member") is None
    for each in plan_all(ps.members, h100(), ps, batch_size=8, strategies=["sequential", "streams"]):
        assert dict(each.model_hashes) == dict(chosen.model_hashes)
    document = json.loads(serde.dumps(chosen))
    del document["data"]["model_hashes"]
    older = serde.loads(Plan, json.dumps(document))
    assert older.model_hashes == ()  # a plan file from before they were recorded still loads


def test_exhaustive_is_skipped_for_large_ensembles() -> None:
    ps = synthetic_profiles(9, h100(), seed=3)
    plans = plan_all(ps.members, h100(), ps, strategies=["sequential", "exhaustive", "auto"])
    assert [p.strategy for p in plans] == ["sequential", "auto"]
    assert "refuses 9 members" in plans.skipped["exhaustive"]
    assert plans.rejected == (f"exhaustive: {plans.skipped['exhaustive']}",)
    with pytest.raises(InvalidInputError, match="refuses 9 members"):
        plan(ps.members, h100(), ps, strategy="exhaustive")


def test_interference_table_changes_the_prediction() -> None:
    ps = profiles(*[{"name": f"m{i}", "latency_ms": 5 + i, "busy": 0.3, "host_share": 0.1} for i in range(3)])
    names = ps.members
    free = plan(names, h100(), ps, strategy="streams")
    table = {pair: 3.0 for pair in itertools.combinations(names, 2)}
    hurt = plan(names, h100(), ps, strategy="streams", interference=table)
    assert hurt.prediction.throughput_sps < 0.6 * free.prediction.throughput_sps
    auto = plan(names, h100(), ps, interference=table)
    seq = plan(names, h100(), ps, strategy="sequential", interference=table)
    assert auto.prediction.throughput_sps >= seq.prediction.throughput_sps
    assert auto.prediction.throughput_sps > hurt.prediction.throughput_sps


def _true_optimum(ps: ProfileSet, batch: int) -> float:
    ds = member_demands(ps.members, h100(), ps, batch)
    engine = CostModel().engine(ds)
    ctx = Context(ds, engine)
    best = 0.0
    for groups in set_partitions(list(ds.names)):
        for kinds in _kind_assignments(len(groups)):
            layout = ctx.layout(groups, kinds)
            if engine.fits(layout):
                best = max(best, engine.evaluate(layout).throughput_sps)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_exhaustive_finds_the_optimum_and_auto_comes_close(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    ps = synthetic_profiles(5, h100(), seed=seed, batch_size=8)
    optimum = _true_optimum(ps, 8)
    exhaustive = plan(ps.members, h100(), ps, strategy="exhaustive", batch_size=8)
    assert optimum * (1 - SIMPLER_WITHIN) <= exhaustive.prediction.throughput_sps <= optimum * (1 + 1e-9)
    monkeypatch.setattr(search_module, "AUTO_EXHAUSTIVE_MEMBERS", 0)  # heuristics + local search only
    auto = plan(ps.members, h100(), ps, batch_size=8)
    assert auto.prediction.throughput_sps >= 0.97 * optimum


def test_plan_accepts_layout_specs_for_prediction() -> None:
    ps = recorded()
    ds = member_demands(ps.members, h100(), ps, 8)
    p = CostModel().predict((SlotSpec("stream", ps.members),), ds)
    seq = plan(ps.members, h100(), ps, batch_size=8, strategy="sequential")
    assert p == seq.prediction


def _worker_caveat(notes: tuple[str, ...]) -> list[str]:
    return [n for n in notes if n.startswith("uncalibrated for worker processes")]


def test_an_uncalibrated_gpu_plan_of_host_bound_members_says_to_measure_worker_slots() -> None:
    eager = recorded()  # H200 eager profiles: resnet, mobilenet and efficientnet host-bound at batch 8
    (caveat,) = _worker_caveat(plan(eager.members, h100(), eager, batch_size=8).notes)
    assert caveat.startswith("uncalibrated for worker processes: 3 members are host-bound")
    assert "colocate plan --calibration" in caveat
    # CUDA graphs take the host work away: the model's time-slicing bound is not what decides
    graphed = serde.load(ProfileSet, GRAPHED)
    assert not _worker_caveat(plan(graphed.members, h100(), graphed, batch_size=8).notes)
    # calibrated for worker processes (a time scale measured), or settled by measurement: no caveat
    calibrated = CostModel(worker_time_scale=0.5)
    assert not _worker_caveat(plan(eager.members, h100(), eager, batch_size=8, model=calibrated).notes)
    loop = plan(eager.members, h100(), eager, strategy="sequential", batch_size=8)
    # measured far above any prediction: auto settles on it by measurement
    ran = PlanMeasurement("sequential", loop.slots, 8, loop.prediction.throughput_sps, (9000.0, 9100.0))
    settled = plan(eager.members, h100(), eager, batch_size=8, measured_plans=(ran,))
    assert "measured-best" in settled.explanation[0]
    assert not _worker_caveat(settled.notes)
