"""The conflict graph: members as nodes with their demands, pairs weighted by predicted slowdown.

Every pair of members is an edge whose ``slowdown`` is how much slower the pair runs side by side
(in two slots of one kind) than alone: the cost model's prediction for that two-slot plan, or
the measured figure when an interference table gives one. Strategies read it: members joined by
a heavy edge hurt each other and are better run one after another in one slot; members joined
by a light edge overlap well and are better in different slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import networkx as nx

from colocate.planning.cost import CostModel, Engine, InterferenceTable
from colocate.planning.demands import DemandSet
from colocate.planning.types import SLOT_KINDS


def conflict_graph(
    demands: DemandSet,
    interference: InterferenceTable | None = None,
    *,
    kind: str = "stream",
    model: CostModel | None = None,
    engine: Engine | None = None,
) -> Any:
    """The conflict graph of ``demands`` (a complete ``networkx.Graph``).

    Node attributes: every field of the member's :class:`~colocate.planning.demands.MemberDemand`
    plus ``memory_bytes``, ``busy_s``, ``host_s`` and ``sm_seconds``. Edge attributes:
    ``slowdown`` (factor >= 1 of the pair run concurrently, measured when ``interference`` has
    the pair measured in slots of ``kind`` (an mps graph also takes a process measurement), else
    predicted), ``model_slowdown`` (the prediction), ``measured`` (bool),
    ``weight`` (``slowdown - 1``, for networkx algorithms) and ``gain`` (sequential time of the
    pair over its concurrent time: above 1, running them side by side pays).

    Args:
        demands: the members' demands (from :func:`member_demands`).
        interference: measured pairwise slowdowns ``{(a, b): factor}`` (two stream slots) or
            ``{(a, b, kind): factor}``; overrides the model for pairs of that kind.
        kind: slot kind the pair runs in: ``stream``, ``process`` or ``mps``.
        model: the cost model (default constants when None).
        engine: an engine for ``demands`` to reuse (its cache); built from ``model`` when None.
    """
    if kind not in SLOT_KINDS:
        from colocate.errors import InvalidInputError

        raise InvalidInputError(f"unknown slot kind {kind!r}; choose one of {', '.join(SLOT_KINDS)}")
    if engine is None:
        base = model or CostModel()
        if interference is not None:
            base = dataclasses.replace(base, interference=interference)
        engine = base.engine(demands)
    elif interference is not None:
        engine = dataclasses.replace(engine.model, interference=interference).engine(demands)
    graph = nx.Graph(device=demands.device.name, batch_size=demands.batch_size, kind=kind)
    for d in demands.members:
        graph.add_node(
            d.member,
            **dataclasses.asdict(d),
            memory_bytes=d.memory_bytes,
            busy_s=d.busy_s,
            host_s=d.host_s,
            sm_seconds=d.sm_seconds,
        )
    names = demands.names
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            predicted = engine.pair_slowdown(a, b, kind)
            measured = engine.measured_pair(a, b, kind)
            slowdown = max(1.0, measured) if measured is not None else predicted
            la, lb = demands[a].latency_s, demands[b].latency_s
            gain = (la + lb) / (max(la, lb) * slowdown)
            graph.add_edge(
                a,
                b,
                slowdown=slowdown,
                model_slowdown=predicted,
                measured=measured is not None,
                weight=slowdown - 1.0,
                gain=gain,
            )
    return graph


def compatibility_graph(conflicts: Any, threshold: float) -> Any:
    """The members that overlap well: an edge where the pair's slowdown is at most ``threshold``."""
    graph = nx.Graph()
    graph.add_nodes_from(conflicts.nodes(data=True))
    graph.add_edges_from(
        (a, b, data) for a, b, data in conflicts.edges(data=True) if data["slowdown"] <= threshold
    )
    return graph


__all__ = ["compatibility_graph", "conflict_graph"]
