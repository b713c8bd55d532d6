from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import colocate.comparison as compare_module
from colocate import Device, Ensemble, Member, serde, zoo
from colocate._timing import LatencyStats
from colocate.comparison import (
    Calibration,
    PairMeasurement,
    RunSettings,
    compare,
    load_calibration,
    save_report,
)
from colocate.execution.types import RunResult
from colocate.planning.types import Plan, Prediction, Slot
from colocate.report import PlanRun, Report, table_rows, to_csv

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


def scripted_run(plan: Plan, sps: float, latencies_s: list[float]) -> PlanRun:
    """A measured run of ``plan``: ``sps`` samples/s, its requests' latencies ``latencies_s``."""
    return PlanRun(
        RunResult(
            strategy=plan.strategy,
            device=plan.device,
            batch_size=plan.batch_size,
            slots=tuple(f"{s.name} {s.kind}: {', '.join(s.members)}" for s in plan.slots),
            concurrency=2,
            warmup_requests=0,
            requests_completed=10,
            requests_failed=0,
            wall_s=1.0,
            throughput_sps=sps,
            latency=LatencyStats.from_samples(latencies_s),
            memory=(),
            utilization_pct_samples=(),
            utilization_pct=None,
            mean_power_w=None,
            status="ok",
            errors=(),
            worker_restarts=0,
            interrupted=False,
            prediction=plan.prediction,
        )
    )


def test_p50_and_p99_columns_share_the_basis_of_the_rounds(
    cpu: Device, ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the round with the median throughput (100 samples/s) had a slow median latency (50 ms);
    # the other two rounds 5 ms: the p99 over the rounds is 6 ms, so a p50 from that one round
    # (50 ms) would read above the p99
    script = iter([(100.0, 0.050), (90.0, 0.005), (110.0, 0.005)])

    def runner(plan: Plan, *_args: object, **_kwargs: object) -> tuple[PlanRun, None]:
        sps, p50 = next(script)
        return scripted_run(plan, sps, [p50, p50, p50 * 1.2]), None  # median p50, p99 about 1.2x

    monkeypatch.setattr(compare_module, "run_plan", runner)
    settings = RunSettings(requests=4, seconds=None, repeats=3)
    report = compare(ensemble, cpu, [hand_plan(cpu, "sequential", [["mlp", "mobilenet"]])], settings=settings)
    (result,) = report.results
    assert result.run is not None and result.run.latency is not None
    assert result.run.latency.median_s == pytest.approx(0.050)  # the median-throughput round
    assert result.round_p50_s == pytest.approx((0.050, 0.005, 0.005))
    assert result.latency_p50_s == pytest.approx(0.005)
    assert result.latency_p99_s == pytest.approx(0.006, rel=0.01)
    p50, p99 = table_rows(report)[0][6:8]
    assert p50 == "5.00" and float(p99.split()[0]) == pytest.approx(6.0, rel=0.01)
    (row,) = csv.DictReader(io.StringIO(to_csv(report)))
    assert float(row["latency_p50_s"]) == pytest.approx(0.005)
    assert float(row["latency_p50_s"]) <= float(row["latency_p99_s"])
    # the JSON round trip keeps the rounds' p50s; a report written before they existed still loads
    assert serde.loads(Report, serde.dumps(report)) == report
    data = json.loads(serde.dumps(report))
    del data["data"]["results"][0]["round_p50_s"]
    old = serde.loads(Report, json.dumps(data))
    assert old.results[0].round_p50_s == () and old.results[0].latency_p50_s is None  # no mixed basis
    one_round = dataclasses.replace(old.results[0], round_sps=(100.0,), round_p99_s=(0.06,))
    assert one_round.latency_p50_s == pytest.approx(0.050)  # one round: its run is that round
