"""Strategies: partitions, the exhaustive limit, fork-join packing, colouring, layout validity."""

from __future__ import annotations

import pytest

from colocate.devices import Device
from colocate.errors import InvalidInputError
from colocate.planning import CostModel, DemandSet
from colocate.planning.strategies import (
    STRATEGY_FUNCTIONS,
    Context,
    bell_number,
    check_exhaustive,
    exhaustive_count,
    pack,
    set_partitions,
)

from .helpers import GIB, demand, demands


def _ctx(ds: DemandSet) -> Context:
    return Context(ds, CostModel().engine(ds))


def test_set_partitions_are_all_distinct_and_counted_by_bell() -> None:
    for n in range(1, 8):
        parts = list(set_partitions([f"m{i}" for i in range(n)]))
        keys = {tuple(sorted(tuple(g) for g in p)) for p in parts}
        assert len(parts) == len(keys) == bell_number(n)
        assert all(sorted(m for g in p for m in g) == sorted(f"m{i}" for i in range(n)) for p in parts)
    assert [exhaustive_count(n) for n in range(1, 7)] == [3, 10, 39, 173, 856, 4657]


def test_exhaustive_refuses_large_ensembles_with_the_count() -> None:
    check_exhaustive(8)
    with pytest.raises(InvalidInputError, match=r"refuses 9 members.*1,1\d\d,\d\d\d layouts.*'auto'"):
        check_exhaustive(9)


def test_packing_gives_the_straggler_its_own_slot() -> None:
    ds = demands(
        demand("big", 20.0),
        *[demand(f"small{i}", 4.0) for i in range(4)],
    )
    ctx = _ctx(ds)
    order = sorted(ds.names, key=lambda m: -ctx.latency(m))
    groups = pack(ctx, "stream", 2, order)
    assert groups is not None
    assert sorted(map(sorted, groups)) == [["big"], ["small0", "small1", "small2", "small3"]]


def test_packing_respects_memory() -> None:
    small = Device(
        kind="simulated", name="small", memory_total_bytes=4 * GIB, memory_free_bytes=4 * GIB, sm_count=40
    )
    members = [demand(f"m{i}", 5.0, weights_mib=100, act_mib=100) for i in range(6)]
    ds = demands(*members, device=small, context_mib=1000)
    ctx = _ctx(ds)
    groups = pack(ctx, "process", 6, list(ds.names))
    assert groups is not None and len(groups) <= 3  # a fourth process context would not fit
    layout = ctx.layout(groups, "process")
    assert ctx.engine.fits(layout)
    assert sorted(m for g in groups for m in g) == sorted(ds.names)


def test_coloring_puts_members_that_hurt_each_other_in_one_slot() -> None:
    ds = demands(
        demand("host_a", 6.0, busy=0.2, host=1.0),
        demand("host_b", 6.0, busy=0.2, host=1.0),
        demand("light", 6.0, busy=0.2, host=0.05),
    )
    ctx = _ctx(ds)
    layouts = [c.layout for c in STRATEGY_FUNCTIONS["coloring"](ctx)]
    wanted = [
        lay
        for lay in layouts
        if all(s.kind == "stream" for s in lay)
        and sorted(tuple(s.members) for s in lay) == [("host_a", "host_b"), ("light",)]
    ]
    assert wanted, layouts


@pytest.mark.parametrize("name", list(STRATEGY_FUNCTIONS), ids=lambda n: f"strategy-{n}")
def test_every_candidate_is_a_valid_layout(name: str) -> None:
    ds = demands(*[demand(f"m{i}", 1.0 + 3 * i, busy=0.2 + 0.1 * i, host=0.2 * i) for i in range(5)])
    ctx = _ctx(ds)
    count = 0
    for cand in STRATEGY_FUNCTIONS[name](ctx):
        count += 1
        members = [m for s in cand.layout for m in s.members]
        assert sorted(members) == sorted(ds.names)
        kinds = {s.kind for s in cand.layout}
        assert not ("process" in kinds and "mps" in kinds)
        shares = [s.percent for s in cand.layout if s.kind == "mps"]
        assert all(p is not None and 0 < p <= 100 for p in shares)
        assert sum(p or 0 for p in shares) <= 100 + 1e-9
        assert cand.strategy == name and cand.why
    assert count >= 1
