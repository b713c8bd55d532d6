"""colocate plan | run | compare, end to end on the CPU at tiny sizes, and the regime map."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from colocate import Device, serde, zoo
from colocate.cli import main
from colocate.comparison import Calibration, PairMeasurement, dedupe_plans, pareto_set, regime_rows
from colocate.execution.types import RunResult
from colocate.planning import conflict_graph, member_demands, plan
from colocate.planning.types import Plan
from colocate.profiling import ProfileSet, ProfileSettings, profile

DATA = Path(__file__).resolve().parent / "data"
H200 = DATA / "profiles-h200-default-large-fp32.json"
TINY = ["--device", "cpu", "--scale", "tiny"]


@pytest.fixture(scope="module")
def tiny_profiles(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cpu = __import__("colocate.devices", fromlist=["cpu_device"]).cpu_device()
    settings = ProfileSettings(warmup=1, repeats=5, max_time_s=0.2, trace_batches=1)
    result = profile(zoo.default_ensemble(scale="tiny"), cpu, (1, 2), settings=settings, cache=False)
    return serde.save(result, tmp_path_factory.mktemp("p") / "tiny.json")


def test_plan_then_run_a_saved_plan(
    tiny_profiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan_file = tmp_path / "plan.json"
    args = ["plan", *TINY, "--profiles", str(tiny_profiles), "--batch-size", "2", "--out", str(plan_file)]
    assert main(args) == 0
    assert "predicted" in capsys.readouterr().out.lower()
    saved = serde.load(Plan, plan_file)
    assert saved.batch_size == 2 and sorted(saved.members) == sorted(zoo.ARCHITECTURES)
    out = tmp_path / "run.json"
    assert main(["run", *TINY, "--plan", str(plan_file), "--requests", "4", "--out", str(out)]) == 0
    result = serde.load(RunResult, out)
    assert result.status == "ok" and result.requests_completed == 4 and result.throughput_sps > 0
    assert result.prediction == saved.prediction
    # where the time went: the overhead of each counted request, and the line that says it
    assert result.overhead is not None and len(result.overhead.samples_s) == 4
    assert result.latency is not None and result.overhead.median_s < result.latency.median_s
    assert f"outside the members ms: p50 {result.overhead.median_s * 1e3:.2f}" in capsys.readouterr().out


def test_plan_all_for_a_simulated_h100_from_recorded_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["plan", "--device", "sim:h100", "--scale", "large", "--profiles", str(H200), "--all", "--json"]
    assert main(args) == 0
    plans = json.loads(capsys.readouterr().out)
    strategies = {p["strategy"] for p in plans}
    assert {"sequential", "streams", "auto"} <= strategies
    assert all(p["device"]["kind"] == "simulated" for p in plans)


def test_compare_over_batch_sizes_writes_reports(
    tiny_profiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args = [
        "compare",
        *TINY,
        "--profiles",
        str(tiny_profiles),
        "--strategies",
        "sequential,streams",
        "--batch-sizes",
        "1,2",
        "--requests",
        "4",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Where each plan wins" in printed
    for batch in (1, 2):
        folder = out / f"batch-{batch}"
        assert {p.name for p in folder.iterdir()} >= {"report.json", "report.csv", "report.txt", "report.png"}


def test_calibration_sets_the_graph_edges(cpu: Device, tiny_profiles: Path) -> None:
    ensemble = zoo.default_ensemble(scale="tiny")
    profiles = serde.load(ProfileSet, tiny_profiles)
    calibration = Calibration(
        ensemble=ensemble.name,
        device=cpu,
        batch_size=2,
        pairs=(PairMeasurement("mlp", "resnet", 0.001, 0.002, 0.005, 2.5, 1.1),),
    )
    demands = member_demands(ensemble, cpu, profiles, 2)
    graph = conflict_graph(demands, calibration.interference())
    edge = graph.edges["mlp", "resnet"]
    assert edge["measured"] is True and edge["slowdown"] == pytest.approx(2.5)
    other = graph.edges["vit", "mobilenet"]
    assert other["measured"] is False
    before = plan(ensemble, cpu, profiles, strategy="streams", batch_size=2)
    after = plan(
        ensemble, cpu, profiles, strategy="streams", batch_size=2, interference=calibration.interference()
    )
    assert after.prediction.throughput_sps < before.prediction.throughput_sps


def test_dedupe_names_agreeing_strategies(cpu: Device, tiny_profiles: Path) -> None:
    ensemble = zoo.default_ensemble(scale="tiny")
    profiles = serde.load(ProfileSet, tiny_profiles)
    seq = plan(ensemble, cpu, profiles, strategy="sequential", batch_size=2)
    streams = plan(ensemble, cpu, profiles, strategy="streams", batch_size=2)
    twin = dataclasses.replace(streams, strategy="coloring")
    labels = [p.strategy for p in dedupe_plans([seq, streams, twin, dataclasses.replace(seq, strategy="x")])]
    assert labels == ["sequential", "streams=coloring"]


def test_pareto_and_regime_rows_on_a_recorded_report(tmp_path: Path) -> None:
    from colocate.comparison import compare
    from colocate.devices import cpu_device
    from tests.test_compare import FAST, hand_plan

    cpu = cpu_device()
    ensemble = zoo.default_ensemble(scale="tiny")
    plans = [
        hand_plan(cpu, "sequential", [list(ensemble.member_names)]),
        hand_plan(cpu, "streams", [[m] for m in ensemble.member_names]),
    ]
    report = compare(ensemble, cpu, plans, batch_size=2, settings=FAST)
    front = pareto_set(report)
    assert front and set(front) <= {"sequential", "streams"}
    best = report.best
    assert best is not None and best.name in front
    (row,) = regime_rows([report])
    assert row[0] == "2" and row[1] == best.name


def test_compare_calibrates_auto_by_default_and_reports_model_error(
    cpu: Device, tiny_profiles: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import colocate.comparison as compare_module
    from tests.test_compare import FAST

    ensemble = zoo.default_ensemble(scale="tiny")
    profiles = serde.load(ProfileSet, tiny_profiles)
    given = Calibration(
        ensemble=ensemble.name,
        device=cpu,
        batch_size=2,
        pairs=(PairMeasurement("mlp", "resnet", 0.001, 0.002, 0.004, 2.0, 1.1),),
    )
    calls: list[int] = []

    def fake_calibrate(*args: object, **kwargs: object) -> Calibration:
        calls.append(1)
        return given

    monkeypatch.setattr(compare_module, "calibrate", fake_calibrate)
    report = compare_module.compare(
        ensemble, cpu, ["sequential", "auto"], profiles=profiles, batch_size=2, settings=FAST
    )
    assert calls == [1] and report.calibrated and report.calibration == given
    assert any("measured now" in note for note in report.notes)
    assert all(r.uncalibrated_sps is not None for r in report.results if r.plan is not None)
    assert report.model_error() is not None and report.model_error(calibrated=False) is not None
    # without 'auto' among the strategies, or with calibration=None, nothing is measured first
    plain = compare_module.compare(
        ensemble, cpu, ["sequential"], profiles=profiles, batch_size=2, settings=FAST, calibration=None
    )
    assert calls == [1] and not plain.calibrated and plain.model_error(calibrated=False) is None


def test_compare_rate_sweep(tiny_profiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from colocate.report import Report

    out = tmp_path / "rates"
    args = [
        "compare", *TINY, "--profiles", str(tiny_profiles), "--strategies", "sequential",
        "--batch-sizes", "2", "--requests", "4", "--rates", "10,40", "--out", str(out),
    ]  # fmt: skip
    assert main(args) == 0
    assert "versus offered load" in capsys.readouterr().out
    report = serde.load(Report, out / "report.json")
    points = report.results[0].rates
    assert [p.rate_rps for p in points] == [10.0, 40.0]
    for p in points:
        assert p.completed + p.failed == int(p.rate_rps * 2.0)  # evenly spaced arrivals for 2 s
        assert p.latency_p50_s is not None and p.latency_p99_s is not None
        assert p.latency_p50_s <= p.latency_p99_s
    # every plan run was logged as it ended, with what the report says it measured
    (logged,) = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert logged["label"] == "sequential" and logged["batch_size"] == 2 and logged["status"] == "ok"
    assert logged["measured_sps"] == pytest.approx(report.results[0].run.throughput_sps)
    assert logged["slots"] == [
        "stream: " + ", ".join(m.name for m in zoo.default_ensemble(scale="tiny").members)
    ]
    assert logged["failure"] is None and logged["ended"]
