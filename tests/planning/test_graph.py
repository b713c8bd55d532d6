"""The conflict graph: nodes carry demands, edges the predicted (or measured) pair slowdown."""

from __future__ import annotations

import pytest

from colocate.errors import InvalidInputError
from colocate.planning import DemandSet, compatibility_graph, conflict_graph

from .helpers import demand, demands


def _set() -> DemandSet:
    return demands(
        demand("light_a", 10.0, busy=0.3, fill=0.5, host=0.1),
        demand("light_b", 8.0, busy=0.3, fill=0.5, host=0.1),
        demand("host_a", 6.0, busy=0.2, fill=0.5, host=1.0),
        demand("host_b", 6.0, busy=0.2, fill=0.5, host=1.0),
    )


def test_nodes_carry_demands_and_every_pair_is_an_edge() -> None:
    ds = _set()
    g = conflict_graph(ds)
    assert set(g.nodes) == set(ds.names)
    assert g.number_of_edges() == 6
    node = g.nodes["light_a"]
    assert node["latency_s"] == pytest.approx(0.010)
    assert node["memory_bytes"] == ds["light_a"].memory_bytes
    assert node["sm_seconds"] == pytest.approx(0.010 * 0.3 * 0.5)
    for _, _, data in g.edges(data=True):
        assert data["slowdown"] >= 1.0 and data["weight"] == pytest.approx(data["slowdown"] - 1.0)
        assert data["measured"] is False


def test_pair_slowdowns_follow_the_shared_resources() -> None:
    ds = _set()
    streams = conflict_graph(ds, kind="stream")
    # light members overlap freely: only the bandwidth term while both run; the pair takes
    # (b's stretched 8 ms, then the rest of a alone) over a's 10 ms alone
    k = 1 + 0.1 * 0.15
    dur_a, dur_b = 7 + 3 * k, 5.6 + 2.4 * k
    pair = dur_b + (1 - dur_b / dur_a) * 10
    assert streams.edges["light_a", "light_b"]["slowdown"] == pytest.approx(pair / 10, rel=1e-9)
    assert streams.edges["light_a", "light_b"]["gain"] > 1.7
    # host-bound members in streams wait for one GIL: twice as slow side by side
    assert streams.edges["host_a", "host_b"]["slowdown"] == pytest.approx(2.0, rel=1e-6)
    assert streams.edges["host_a", "host_b"]["gain"] == pytest.approx(1.0, rel=1e-6)
    processes = conflict_graph(ds, kind="process")
    assert processes.edges["host_a", "host_b"]["slowdown"] == pytest.approx(1.0)  # own interpreters


def test_measured_pairs_override_the_model() -> None:
    ds = _set()
    g = conflict_graph(ds, interference={("light_b", "light_a"): 2.5})
    edge = g.edges["light_a", "light_b"]
    assert edge["slowdown"] == 2.5 and edge["measured"] is True
    assert edge["model_slowdown"] < 1.01


def test_compatibility_graph_keeps_pairs_that_overlap_well() -> None:
    g = conflict_graph(_set())
    ok = compatibility_graph(g, 1.15)
    assert ok.has_edge("light_a", "light_b")
    assert not ok.has_edge("host_a", "host_b")
    assert set(ok.nodes) == set(g.nodes)
    with pytest.raises(InvalidInputError, match="unknown slot kind"):
        conflict_graph(_set(), kind="thread")
