"""Planning: decide how to co-locate an ensemble's members on one device, and predict the result.

``plan(ensemble, device, profiles)`` reads the members' profiles (:mod:`.demands`), builds the
conflict graph (:mod:`.graph`), lets strategies propose slot layouts (:mod:`.strategies`),
predicts each with the cost model (:mod:`.cost`), rejects what does not fit in memory, and
returns the best :class:`~colocate.planning.types.Plan` for the objective with its reasons
(:mod:`.search`, :mod:`.explain`). :mod:`.render` prints plans. See ``docs/planning.md``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from colocate.planning.cost import CostModel, Evaluation, SlotSpec, mps_percentages
    from colocate.planning.demands import DemandSet, MemberDemand, demand_set, member_demands
    from colocate.planning.graph import compatibility_graph, conflict_graph
    from colocate.planning.render import PLAN_COLUMNS, plan_rows, render_plan
    from colocate.planning.search import OBJECTIVES, SETTLE_WITHIN, PlanList, plan, plan_all
    from colocate.planning.strategies import DESCRIPTIONS, MAX_EXHAUSTIVE_MEMBERS, STRATEGIES
    from colocate.planning.types import (
        SLOT_KINDS,
        MemberBackend,
        MemberPrediction,
        Plan,
        PlanMeasurement,
        Prediction,
        Slot,
    )

# Each name resolves on first use: a worker process that only unpickles a Plan's types (through
# colocate.planning.types) then does not import the search, the graphs and networkx
# (a quarter of a second of every worker's start on a small machine).
_LAZY = {
    **dict.fromkeys(("CostModel", "Evaluation", "SlotSpec", "mps_percentages"), "colocate.planning.cost"),
    **dict.fromkeys(
        ("DemandSet", "MemberDemand", "demand_set", "member_demands"), "colocate.planning.demands"
    ),
    **dict.fromkeys(("compatibility_graph", "conflict_graph"), "colocate.planning.graph"),
    **dict.fromkeys(("PLAN_COLUMNS", "plan_rows", "render_plan"), "colocate.planning.render"),
    **dict.fromkeys(
        ("OBJECTIVES", "SETTLE_WITHIN", "PlanList", "plan", "plan_all"), "colocate.planning.search"
    ),
    **dict.fromkeys(("DESCRIPTIONS", "MAX_EXHAUSTIVE_MEMBERS", "STRATEGIES"), "colocate.planning.strategies"),
    **dict.fromkeys(
        ("SLOT_KINDS", "MemberBackend", "MemberPrediction", "Plan", "PlanMeasurement", "Prediction", "Slot"),
        "colocate.planning.types",
    ),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'colocate.planning' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "DESCRIPTIONS",
    "MAX_EXHAUSTIVE_MEMBERS",
    "OBJECTIVES",
    "PLAN_COLUMNS",
    "SETTLE_WITHIN",
    "SLOT_KINDS",
    "STRATEGIES",
    "CostModel",
    "DemandSet",
    "Evaluation",
    "MemberBackend",
    "MemberDemand",
    "MemberPrediction",
    "Plan",
    "PlanList",
    "PlanMeasurement",
    "Prediction",
    "Slot",
    "SlotSpec",
    "compatibility_graph",
    "conflict_graph",
    "demand_set",
    "member_demands",
    "mps_percentages",
    "plan",
    "plan_all",
    "plan_rows",
    "render_plan",
]


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
