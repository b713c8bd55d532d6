"""render_plan and plan_rows: what a person reads."""

from __future__ import annotations

from colocate.planning import PLAN_COLUMNS, plan, plan_all, plan_rows, render_plan
from colocate.planning.render import slot_kind_text

from .helpers import h100, recorded


def test_render_plan_shows_slots_members_prediction_and_reasons() -> None:
    ps = recorded()
    p = plan(ps.members, h100(), ps, batch_size=8)
    text = render_plan(p)
    assert text.startswith("Plan for H100-SXM (simulated), batch 8: strategy auto, objective throughput")
    assert f"{p.prediction.throughput_sps:.0f} samples/s" in text
    assert f"critical member {p.prediction.critical_member}" in text
    for slot in p.slots:
        assert f"  {slot.name} " in text
    for member in ps.members:
        assert member in text
    assert "Why:" in text and "Notes:" in text and "(* critical member)" in text
    critical_row = [line for line in text.splitlines() if line.rstrip().endswith(" *")]
    assert len(critical_row) == 1 and critical_row[0].strip().startswith(p.prediction.critical_member)
    for line in p.explanation:
        assert line in text


def test_plan_rows_one_row_per_plan() -> None:
    ps = recorded()
    plans = plan_all(ps.members, h100(), ps, batch_size=8)
    rows = plan_rows(plans)
    assert len(rows) == len(plans)
    assert all(len(r) == len(PLAN_COLUMNS) for r in rows)
    assert [r[0] for r in rows] == [p.strategy for p in plans]
    assert rows[0][1] == "1 stream"
    mps = next(p for p in plans if p.strategy == "mps")
    assert all(slot_kind_text(s).startswith("mps ") and s.thread_percentage for s in mps.slots)
