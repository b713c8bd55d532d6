"""Property tests over random synthetic ensembles (2-7 members) on simulated GPUs and the CPU."""

from __future__ import annotations

import dataclasses
import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from colocate import serde
from colocate.devices import Device, find_device
from colocate.errors import PlanInfeasibleError
from colocate.planning import STRATEGIES, CostModel, Plan, member_demands, plan, plan_all
from colocate.planning.cost import Engine, as_layout
from colocate.planning.search import SIMPLER_WITHIN, Pool, Selector
from colocate.planning.strategies import (
    STRATEGY_FUNCTIONS,
    Candidate,
    Context,
    _kind_assignments,
    _promising_kind_assignments,
    set_partitions,
)
from colocate.planning.synthetic import synthetic_profile
from colocate.profiling import ProfileSet

SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
CPU = Device(kind="cpu", name="cpu", memory_total_bytes=32 << 30, memory_free_bytes=24 << 30, cpu_cores=4)

member = st.fixed_dictionaries(
    {
        "latency_s": st.floats(2e-4, 3e-2),
        "busy": st.floats(0.02, 1.0),
        "sm_fill": st.floats(0.05, 1.0),
        "host_share": st.floats(0.0, 1.0),
        "weights_mib": st.floats(1, 1000),
        "activation_mib": st.floats(1, 3000),
        "p99_ratio": st.floats(1.0, 2.0),
    }
)
devices = st.sampled_from(["h100", "t4", "l4", "cpu"])


def _profiles(specs: list[dict[str, float]], device: Device) -> ProfileSet:
    out = []
    for i, spec in enumerate(specs):
        if device.is_gpu:
            out.append(synthetic_profile(f"m{i}", device, batch_size=8, **spec))  # type: ignore[arg-type]
        else:
            cpu_spec = {k: v for k, v in spec.items() if k not in ("host_share",)}
            cpu_spec["sm_fill"] = 1.0
            scaling = ((1, spec["latency_s"] * 3), (2, spec["latency_s"] * 1.7), (4, spec["latency_s"]))
            profile = synthetic_profile(
                f"m{i}",
                device,
                batch_size=8,
                threads=4,
                thread_scaling=scaling,
                **cpu_spec,  # type: ignore[arg-type]
            )
            out.append(profile)
    return ProfileSet(tuple(out))


def _device(name: str) -> Device:
    return CPU if name == "cpu" else find_device(name)


def _check(plans: list[Plan], ps: ProfileSet, device: Device) -> None:
    names = ps.members
    ds = member_demands(names, device, ps, 8)
    limit = CostModel().memory_limit_bytes(ds)
    if device.is_gpu:
        work = sum(d.sm_seconds for d in ds.members)
    else:  # a member may run on fewer cores, more efficiently: its least core-time is the bound
        cores = device.cpu_cores
        work = sum(
            min(d.latency_with_threads(k) * d.busy_fraction * k / cores for k in range(1, cores + 1))
            for d in ds.members
        )
    physical = max(work, max(d.latency_s for d in ds.members))
    for p in plans:
        p.check_covers(names)
        assert sorted(p.members) == sorted(names)  # each member exactly once
        assert sum(s.thread_percentage or 0 for s in p.slots if s.kind == "mps") <= 100 + 1e-9
        assert p.prediction.peak_memory_bytes <= limit
        assert p.prediction.throughput_sps <= 8 / physical * (1 + 1e-9)
        assert p.prediction.latency_s >= physical
        assert p.prediction.latency_p99_s >= p.prediction.latency_s


@SETTINGS
@given(st.lists(member, min_size=2, max_size=7), devices)
def test_every_strategy_gives_valid_plans_within_memory(
    specs: list[dict[str, float]], device_name: str
) -> None:
    device = _device(device_name)
    ps = _profiles(specs, device)
    wanted = [s for s in STRATEGIES if s != "exhaustive" or len(specs) <= 4]
    plans = plan_all(ps.members, device, ps, batch_size=8, strategies=wanted)
    for reason in plans.skipped.values():
        assert "fits in memory" in reason
    _check(list(plans), ps, device)
    by = {p.strategy: p for p in plans}
    if "sequential" in by:
        assert "auto" in by
        assert by["auto"].prediction.throughput_sps >= by["sequential"].prediction.throughput_sps
    if "exhaustive" in by:
        best = by["exhaustive"].prediction.throughput_sps
        for p in plans:
            assert best >= p.prediction.throughput_sps * (1 - SIMPLER_WITHIN), p.strategy
    if "auto" in by:
        assert serde.loads(Plan, serde.dumps(by["auto"])) == by["auto"]


@SETTINGS
@given(st.lists(member, min_size=2, max_size=5))
def test_latency_objective_never_loses_to_sequential(specs: list[dict[str, float]]) -> None:
    device = find_device("h100")
    ps = _profiles(specs, device)
    try:
        plans = plan_all(
            ps.members, device, ps, batch_size=8, objective="latency", strategies=["sequential", "auto"]
        )
    except PlanInfeasibleError:
        return
    by = {p.strategy: p for p in plans}
    if "sequential" in by:
        assert by["auto"].prediction.latency_s <= by["sequential"].prediction.latency_s


memory_gib = st.sampled_from([2.0, 6.0, 24.0])  # tight (some layouts rejected), close, ample


def _exhaustive_world(
    specs: list[dict[str, float]], device_name: str, free_gib: float, model: CostModel
) -> tuple[ProfileSet, Device, Engine, Context]:
    device = dataclasses.replace(_device(device_name), memory_free_bytes=int(free_gib * (1 << 30)))
    ps = _profiles(specs, device)
    ds = member_demands(ps.members, device, ps, 8)
    engine = model.engine(ds)
    return ps, device, engine, Context(ds, engine)


scales = st.sampled_from(
    [CostModel(), CostModel(time_scale=1.2, worker_time_scale=1.5, stream_time_scale=2.0)]
)


@SETTINGS
@given(st.lists(member, min_size=2, max_size=5), devices, memory_gib, scales)
def test_a_partitions_floor_bounds_every_layout_of_it(
    specs: list[dict[str, float]], device_name: str, free_gib: float, model: CostModel
) -> None:
    """exhaustive skips a partition on Engine.partition_lower_bound: it must be no worse than
    each kind assignment's own bound, or a winning layout could be skipped; and a layout must
    fit whenever every_layout_fits says all do."""
    _, _, engine, ctx = _exhaustive_world(specs, device_name, free_gib, model)
    all_fit = engine.every_layout_fits()
    for groups in set_partitions(list(ctx.demands.names)):
        most_sps, least_latency = engine.partition_lower_bound([tuple(g) for g in groups])
        for kinds in _kind_assignments(len(groups)):
            layout = ctx.layout(groups, kinds)
            sps, latency = engine.lower_bound(layout)
            assert sps <= most_sps * (1 + 1e-12), (groups, kinds)
            assert latency >= least_latency * (1 - 1e-12), (groups, kinds)
            if all_fit:
                assert engine.peak_memory(layout) <= engine.limit


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    st.lists(member, min_size=2, max_size=5),
    devices,
    memory_gib,
    st.sampled_from([("throughput", None), ("latency", None), ("throughput_under_latency", 0.01)]),
)
def test_exhaustive_chooses_what_evaluating_every_layout_chooses(
    specs: list[dict[str, float]],
    device_name: str,
    free_gib: float,
    objective_and_bound: tuple[str, float | None],
) -> None:
    """The bar from the other strategies and the skipped layouts only save work: the plan (and
    the count of layouts rejected for memory) is the one an unpruned search picks."""
    objective, bound = objective_and_bound
    ps, device, engine, ctx = _exhaustive_world(specs, device_name, free_gib, CostModel())
    reference = Pool(Selector(objective, bound))
    for candidate in STRATEGY_FUNCTIONS["exhaustive"](ctx):
        reference.offer(engine, candidate, prune=False)
    chosen = reference.choose()
    options = {"strategy": "exhaustive", "batch_size": 8, "objective": objective, "latency_bound_s": bound}
    if chosen is None or reference.selector.of(chosen[0])[0] == 0:  # nothing fits, or meets the bound
        with pytest.raises(PlanInfeasibleError):
            plan(ps.members, device, ps, **options)  # type: ignore[arg-type]
        return
    made = plan(ps.members, device, ps, **options)  # type: ignore[arg-type]
    assert as_layout(made.slots) == chosen[0].layout
    rejected = [line for line in made.explanation if "do not fit in memory" in line]
    assert rejected == (
        [f"{reference.too_big} candidate layout(s) were rejected: they do not fit in memory"]
        if reference.too_big
        else []
    )


@SETTINGS
@given(
    st.lists(member, min_size=2, max_size=5),
    devices,
    scales,
    st.sampled_from([0.5, 0.8, 0.95, 1.0]),
)
def test_the_kind_walk_keeps_every_assignment_whose_bound_passes(
    specs: list[dict[str, float]], device_name: str, model: CostModel, quantile: float
) -> None:
    """exhaustive walks each partition's kind assignments depth first and skips a subtree on its
    bound: every assignment whose own bound passes must still come, in _kind_assignments' order."""
    _, _, engine, ctx = _exhaustive_world(specs, device_name, 24.0, model)
    for groups in set_partitions(list(ctx.demands.names)):
        members = [tuple(g) for g in groups]
        every = list(_kind_assignments(len(members)))
        own = {kinds: engine.lower_bound(ctx.layout(groups, kinds))[0] for kinds in every}
        ranked = sorted(own.values())
        bar = ranked[min(len(ranked) - 1, int(quantile * len(ranked)))]

        def could_win(throughput: float, latency: float, bar: float = bar) -> bool:
            return throughput >= bar

        kept = list(_promising_kind_assignments(engine, members, could_win))
        assert kept == [kinds for kinds in every if kinds in set(kept)]  # in the same order
        assert {kinds for kinds in every if own[kinds] >= bar} <= set(kept), (groups, bar)


class _Scored:
    """Just what a Pool reads of an Evaluation."""

    def __init__(self, index: int, throughput: float, latency: float, workers: int) -> None:
        self.throughput_sps = throughput
        self.latency_s = latency
        self.workers = workers
        self.layout = (index,)


@SETTINGS
@given(
    objective=st.sampled_from(["throughput", "latency", "throughput_under_latency"]),
    offers=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "exhaustive"]),
            st.floats(10.0, 12.0),  # throughput: many close calls within the tie window
            st.floats(0.01, 0.012),
            st.integers(0, 3),
        ),
        min_size=1,
        max_size=40,
    ),
)
def test_a_pool_that_builds_only_what_it_keeps_ends_as_one_that_keeps_every_evaluation(
    objective: str, offers: list[tuple[str, float, float, int]]
) -> None:
    # Pool.offer hands the pool a candidate's score and builds its Evaluation only when the pool
    # keeps something of it: the pool's state must end the same as when every candidate comes
    # with its Evaluation built, and nothing dropped may have been built
    selector = Selector(objective, 0.011 if objective == "throughput_under_latency" else None)
    every, lazy = Pool(selector), Pool(selector)
    built: set[tuple[int, ...]] = set()

    def build(scored: _Scored) -> _Scored:
        built.add(scored.layout)
        return scored

    for i, (strategy, throughput, latency, workers) in enumerate(offers):
        scored = _Scored(i, throughput, latency, workers)
        candidate = Candidate(scored.layout, strategy, ())  # type: ignore[arg-type]
        every.add(scored, candidate)  # type: ignore[arg-type]
        kept = lazy._add(
            selector.score(throughput, latency),
            candidate,
            functools.cache(lambda scored=scored: build(scored)),  # type: ignore[misc]
        )
        assert (kept is not None) == (scored.layout in built)
    assert lazy.evaluated == every.evaluated == len(offers)
    assert lazy.best == every.best
    assert [e.layout for e, _ in lazy.near] == [e.layout for e, _ in every.near]
    assert [e.layout for e, _ in lazy.starts()] == [e.layout for e, _ in every.starts()]
    assert {k: v[1].layout for k, v in lazy.by_strategy.items()} == {
        k: v[1].layout for k, v in every.by_strategy.items()
    }
    chosen_lazy, chosen_every = lazy.choose(), every.choose()
    assert chosen_lazy is not None and chosen_every is not None
    assert chosen_lazy[0].layout == chosen_every[0].layout


@SETTINGS
@given(st.lists(member, min_size=2, max_size=4), devices, scales)
def test_throughput_and_latency_are_the_evaluations_whatever_came_before(
    specs: list[dict[str, float]], device_name: str, model: CostModel
) -> None:
    # the engine keeps the last layout's simulation for evaluate(): asked in any order, the two
    # figures must be the Evaluation's, bit for bit (a search compares them with its best)
    _, _, engine, ctx = _exhaustive_world(specs, device_name, 64.0, model)
    names = list(ctx.demands.names)
    layouts = [
        ctx.layout(groups, kinds) for groups in set_partitions(names) for kinds in ("stream", "process")
    ]
    fresh = model.engine(ctx.demands)
    expected = {layout: fresh.evaluate(layout) for layout in layouts}
    for first, second in zip(layouts, reversed(layouts), strict=True):
        sps, latency = engine.throughput_and_latency(first)
        engine.throughput_and_latency(second)
        ev = engine.evaluate(first)
        assert (sps, latency) == (ev.throughput_sps, ev.latency_s)
        assert ev == expected[first]
