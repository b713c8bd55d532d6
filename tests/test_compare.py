from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from colocate import Device, Ensemble, Member, serde, zoo
from colocate.comparison import (
    Calibration,
    PairMeasurement,
    RunSettings,
    compare,
    load_calibration,
    save_report,
)
from colocate.planning.types import Plan, Prediction, Slot
from colocate.report import Report, table_rows, to_csv

FAST = RunSettings(requests=6, seconds=None, concurrency=2, warmup=1)


class AlwaysFails(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this member always fails")


def always_fails() -> torch.nn.Module:
    return AlwaysFails()


def hand_plan(device: Device, strategy: str, groups: list[list[str]], kind: str = "stream") -> Plan:
    slots = tuple(Slot(name=f"s{i}", kind=kind, members=tuple(g)) for i, g in enumerate(groups))  # type: ignore[arg-type]
    members = tuple(m for g in groups for m in g)
    return Plan(
        device=device,
        batch_size=2,
        slots=slots,
        strategy=strategy,
        prediction=Prediction(100.0, 0.02, 0.03, 1 << 20, members[0], "test", ()),
    )


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    members = tuple(zoo.member(arch, scale="tiny") for arch in ("mlp", "mobilenet"))
    return Ensemble(members, name="pair")


def test_compare_rows_speedup_and_outputs(cpu: Device, ensemble: Ensemble, tmp_path: Path) -> None:
    plans = [
        hand_plan(cpu, "sequential", [["mlp", "mobilenet"]]),
        hand_plan(cpu, "streams", [["mlp"], ["mobilenet"]]),
        hand_plan(cpu, "processes", [["mlp"], ["mobilenet"]], kind="process"),
    ]
    report = compare(ensemble, cpu, plans, batch_size=2, settings=FAST)
    assert [r.name for r in report.results] == ["sequential", "streams", "processes"]
    assert all(r.status == "ok" and r.run is not None for r in report.results)
    base = report.result("sequential")
    assert base is not None and base.speedup == pytest.approx(1.0)
    for r in report.results:
        assert r.run is not None and r.speedup is not None
        assert r.speedup == pytest.approx(r.run.throughput_sps / base.run.throughput_sps)  # type: ignore[union-attr]
        assert r.prediction_error == pytest.approx((100.0 - r.run.throughput_sps) / r.run.throughput_sps)
    assert report.best is not None and sum(row[0].endswith(" *") for row in table_rows(report)) == 1
    written = save_report(report, tmp_path / "out")
    assert serde.load(Report, written["json"]) == report
    rows = list(csv.DictReader(io.StringIO(to_csv(report))))
    assert [row["plan"] for row in rows] == ["sequential", "streams", "processes"]
    assert float(rows[1]["speedup"]) == pytest.approx(report.results[1].speedup)
    png = written["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "sequential" in written["txt"].read_text()


def test_failing_plan_is_reported_and_others_run(cpu: Device, tmp_path: Path) -> None:
    good = zoo.member("mlp", scale="tiny")
    bad = Member("broken", backend="torch", source=always_fails, input=good.input)
    ensemble = Ensemble((good, bad), name="with-broken")
    plans = [
        hand_plan(cpu, "sequential", [["mlp", "broken"]]),
        hand_plan(cpu, "streams", [["mlp"], ["broken"]]),
    ]
    report = compare(ensemble, cpu, plans, batch_size=2, settings=FAST)
    for r in report.results:
        assert r.status in ("failed", "errors") and r.reason and "broken" in r.reason
    assert report.best is None or report.best.status == "errors"
    # one good plan beside a broken one still gets measured
    ok_ens = Ensemble((good,), name="only-good")
    mixed = compare(
        ok_ens,
        cpu,
        [hand_plan(cpu, "sequential", [["mlp"]]), hand_plan(cpu, "wrong", [["mlp", "nope"]])],
        batch_size=2,
        settings=FAST,
    )
    assert mixed.result("sequential").status == "ok"  # type: ignore[union-attr]
    wrong = mixed.result("wrong")
    assert wrong is not None and wrong.status == "failed" and "nope" in (wrong.reason or "")


def test_calibration_round_trips_and_feeds_the_planner(cpu: Device, tmp_path: Path) -> None:
    calibration = Calibration(
        ensemble="pair",
        device=cpu,
        batch_size=2,
        pairs=(PairMeasurement("mlp", "mobilenet", 0.001, 0.004, 0.006, 1.5, 1.1),),
    )
    path = serde.save(calibration, tmp_path / "cal.json")
    assert load_calibration(path) == calibration
    assert calibration.interference() == {("mlp", "mobilenet"): 1.5}
    assert json.loads(path.read_text())["type"] == "Calibration"
    assert np.isfinite(calibration.pairs[0].slowdown)
