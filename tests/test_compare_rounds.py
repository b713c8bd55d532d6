"""Repeated, interleaved rounds; ties; calibration that settles near-ties; slot-kind aware pairs.

Nothing here runs a model: ``run_plan`` is replaced by a fake that returns scripted figures, so
each test checks the bookkeeping (order, medians, choices), not wall time.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import pytest

import colocate.comparison as compare_module
from colocate import Device, Ensemble, serde, zoo
from colocate.cli import _run_settings, build_parser
from colocate.comparison import (
    Calibration,
    PairMeasurement,
    RunSettings,
    compare,
    pair_kind,
    pairs_to_measure,
    rotated,
)
from colocate.errors import ColocateError, InvalidInputError
from colocate.planning import CostModel, SlotSpec, conflict_graph, plan
from colocate.planning.types import Plan, PlanMeasurement, Slot
from colocate.report import PlanResult, PlanRun, RatePoint, Report, render_table, table_rows, to_csv
from tests.planning.helpers import demand, demands, h100, recorded
from tests.test_compare import hand_plan, scripted_run

# --- a fake runner ---------------------------------------------------------------------------


def fake_run(plan: Plan, sps: float, *, latency_s: float | None = None) -> PlanRun:
    """A measured run of ``plan`` at ``sps`` samples/s (latency 1/sps unless given)."""
    latency = latency_s if latency_s is not None else plan.batch_size / sps
    return scripted_run(plan, sps, [latency, latency * 1.1, latency * 1.2])


class Runner:
    """Replaces ``run_plan``: answers each plan (by label) with the next of its scripted figures."""

    def __init__(self, script: dict[str, list[float]]) -> None:
        self.script = {name: iter(values) for name, values in script.items()}
        self.calls: list[str] = []
        self.rates: list[tuple[str, tuple[float, ...]]] = []

    def __call__(
        self, plan: Plan, ensemble: Ensemble, settings: RunSettings, *, name: str | None = None
    ) -> tuple[PlanRun | None, str | None]:
        label = name or plan.strategy
        self.calls.append(label)
        self.rates.append((label, settings.rates))
        value = next(self.script[label])
        if value < 0:
            return None, "WorkerFailedError: the plan's process died (exit code -9)"
        return fake_run(plan, value), None


@pytest.fixture
def pair_ensemble() -> Ensemble:
    return Ensemble(tuple(zoo.member(a, scale="tiny") for a in ("mlp", "mobilenet")), name="pair")


def three_plans(cpu: Device) -> list[Plan]:
    return [
        hand_plan(cpu, "sequential", [["mlp", "mobilenet"]]),
        hand_plan(cpu, "streams", [["mlp"], ["mobilenet"]]),
        hand_plan(cpu, "processes", [["mlp"], ["mobilenet"]], kind="process"),
    ]


# --- rounds ----------------------------------------------------------------------------------


def test_rotated_puts_every_item_in_every_position() -> None:
    items = ["a", "b", "c"]
    orders = [rotated(items, r) for r in range(3)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert [order.index("a") for order in orders] == [0, 2, 1]
    assert rotated(items, 3) == items and rotated([], 2) == []


def test_rounds_are_interleaved_rotated_and_reported_as_medians(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runner = Runner(
        {
            "sequential": [100.0, 80.0, 90.0],
            "streams": [120.0, 150.0, 130.0],
            "processes": [95.0, 60.0, 70.0],
        }
    )
    monkeypatch.setattr(compare_module, "run_plan", runner)
    settings = RunSettings(requests=4, seconds=None, repeats=3, rates=(5.0,))
    report = compare(pair_ensemble, cpu, three_plans(cpu), batch_size=2, settings=settings)
    # every plan once per round, the order rotated by one each round
    assert runner.calls == [
        "sequential", "streams", "processes",
        "streams", "processes", "sequential",
        "processes", "sequential", "streams",
    ]  # fmt: skip
    # the rate sweep runs in the first round only
    assert [label for label, rates in runner.rates if rates] == ["sequential", "streams", "processes"]
    seq, streams, procs = (report.result(n) for n in ("sequential", "streams", "processes"))
    assert seq is not None and streams is not None and procs is not None
    assert seq.round_sps == (100.0, 80.0, 90.0) and len(seq.round_p99_s) == 3
    assert seq.measured_sps == 90.0 and streams.measured_sps == 130.0 and procs.measured_sps == 70.0
    assert streams.run is not None and streams.run.throughput_sps == 130.0  # the median round is kept
    assert streams.speedup == pytest.approx(130.0 / 90.0)  # medians, not the first or the mean
    assert procs.speedup == pytest.approx(70.0 / 90.0)
    assert streams.measured_range_sps == (120.0, 150.0)
    assert streams.spread == pytest.approx(15.0 / 130.0)
    assert report.best is streams and report.rounds == 3
    assert report.settings["repeats"] == "3"
    rows = {row[0]: row for row in table_rows(report)}
    assert rows["streams *"][4] == "130 ±12%"
    assert any("3 interleaved rounds" in note for note in report.notes)
    # the data round-trips (the plot draws the ranges), and CSV carries the range
    written = compare_module.save_report(report, tmp_path / "out")
    assert serde.load(Report, written["json"]) == report
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "130 ±12%" in written["txt"].read_text()
    csv_rows = {r["plan"]: r for r in csv.DictReader(io.StringIO(to_csv(report)))}
    assert csv_rows["streams"]["rounds"] == "3"
    assert float(csv_rows["streams"]["measured_min_sps"]) == 120.0
    assert float(csv_rows["streams"]["measured_max_sps"]) == 150.0
    assert float(csv_rows["streams"]["measured_sps"]) == 130.0


def test_a_round_that_fails_fails_the_plan_and_says_which(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = Runner({"sequential": [100.0, 100.0], "streams": [120.0, -1.0]})
    monkeypatch.setattr(compare_module, "run_plan", runner)
    plans = three_plans(cpu)[:2]
    report = compare(pair_ensemble, cpu, plans, batch_size=2, settings=RunSettings(repeats=2))
    streams = report.result("streams")
    assert streams is not None and streams.status == "failed"
    assert streams.reason is not None and streams.reason.startswith("round 2 of 2: WorkerFailedError")
    assert streams.round_sps == (120.0,)  # what ran is kept, the plan is not the best
    assert report.best is not None and report.best.name == "sequential"


def test_observers_see_every_run_as_it_ends_in_order_with_its_label(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    # replaced below run_plan, so that run_plan's own call of the observers is what is tested
    figures = iter([100.0, 120.0, 90.0, -1.0, 70.0, 60.0])
    ran: list[float] = []

    def in_child(plan_: Plan, ensemble: Ensemble, settings: RunSettings) -> tuple[PlanRun | None, str | None]:
        value = next(figures)
        ran.append(value)
        if value < 0:
            return None, "WorkerFailedError: the plan's process died (exit code -9)"
        return fake_run(plan_, value), None

    monkeypatch.setattr(compare_module, "_run_plan_in_child", in_child)
    outer: list[tuple[str, float | None, str | None]] = []
    inner: list[str] = []

    def record_outer(label: str, plan_: Plan, measured: PlanRun | None, failure: str | None) -> None:
        outer.append((label, measured.run.throughput_sps if measured is not None else None, failure))

    plans = three_plans(cpu)[:2]
    with compare_module.observing_runs(record_outer):
        with compare_module.observing_runs(lambda label, *_: inner.append(label)):
            compare_module.run_rounds(
                [(p.strategy, p) for p in plans], pair_ensemble, RunSettings(), rounds=2
            )
        compare_module.run_plan(plans[0], pair_ensemble, RunSettings(), name="after the inner block")
    compare_module.run_plan(plans[0], pair_ensemble, RunSettings(), name="outside both")
    assert ran == [100.0, 120.0, 90.0, -1.0, 70.0, 60.0]  # every run went through the patched child
    # round 2 runs the plans rotated; the failed run is reported with its reason; each observer
    # sees the runs of its own block only
    assert outer == [
        ("sequential", 100.0, None),
        ("streams", 120.0, None),
        ("streams", 90.0, None),
        ("sequential", None, "WorkerFailedError: the plan's process died (exit code -9)"),
        ("after the inner block", 70.0, None),
    ]
    assert inner == ["sequential", "streams", "streams", "sequential"]


def test_calibration_runs_reach_the_observer_named_by_what_they_measure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    runner_calls: list[str] = []

    def here(plan_: Plan, ensemble: Ensemble, settings: RunSettings) -> tuple[PlanRun | None, str | None]:
        latency = 0.012 if len(plan_.slots) == 2 else 0.01
        runner_calls.append(plan_.strategy)
        return fake_run(plan_, 1.0 / latency, latency_s=latency), None

    monkeypatch.setattr(compare_module, "_run_plan_in_child", here)
    seen: list[str] = []
    ensemble = zoo.default_ensemble(scale="large")
    picks = [("mlp", "vit", "process")]
    with compare_module.observing_runs(lambda label, *_: seen.append(label)):
        compare_module._measure_pairs(
            ensemble, h100(), recorded(), 8, picks, RunSettings(seconds=1.0), lambda _: None
        )
    assert seen == [
        "pair calibration: mlp alone (process)",
        "pair calibration: vit alone (process)",
        "pair calibration: mlp beside vit (process)",
    ]
    assert runner_calls == ["calibration"] * 3


def test_repeats_must_be_a_positive_whole_number() -> None:
    with pytest.raises(InvalidInputError, match="repeats must be a whole number"):
        RunSettings(repeats=0)
    with pytest.raises(InvalidInputError, match="repeats"):
        RunSettings(repeats=True)


def test_reply_wait_is_checked_and_reaches_the_executor(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidInputError, match="reply_wait must be 'auto', 'spin' or 'block', got 'busy'"):
        RunSettings(reply_wait="busy")  # type: ignore[arg-type]
    assert _run_settings(build_parser().parse_args(["run", "--device", "cpu"])).reply_wait == "auto"
    args = build_parser().parse_args(["compare", "--device", "cpu", "--reply-wait", "spin"])
    assert _run_settings(args).reply_wait == "spin"
    # execute() gives it to the executor it starts
    from colocate import comparison

    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def fake_executor(plan: object, ensemble: object, **options: object) -> object:
        seen.update(options)
        raise Stop

    monkeypatch.setattr(comparison, "Executor", fake_executor)
    with pytest.raises(Stop):
        comparison.execute(None, None, RunSettings(reply_wait="block"))  # type: ignore[arg-type]
    assert seen["reply_wait"] == "block"


def test_cli_compare_takes_repeats() -> None:
    args = build_parser().parse_args(["compare", "--device", "cpu", "--repeats", "3"])
    assert _run_settings(args).repeats == 3
    alias = build_parser().parse_args(["compare", "--device", "cpu", "--rounds", "2"])
    assert _run_settings(alias).repeats == 2
    plain = build_parser().parse_args(["compare", "--device", "cpu"])
    assert _run_settings(plain).repeats == 1
    demo = build_parser().parse_args(["demo", "--device", "cpu"])
    assert demo.rounds == 2


# --- ties ------------------------------------------------------------------------------------


def _result(cpu: Device, name: str, rounds: tuple[float, ...]) -> PlanResult:
    plan_ = hand_plan(cpu, name, [["mlp"]])
    run = fake_run(plan_, sorted(rounds)[(len(rounds) - 1) // 2]).run
    return PlanResult(name, "ok", None, plan_, run, None, round_sps=rounds)


def test_plans_whose_range_overlaps_the_best_are_tied(cpu: Device) -> None:
    report = Report(
        ensemble="pair",
        device=cpu,
        batch_size=2,
        baseline="sequential",
        results=(
            _result(cpu, "sequential", (90.0, 100.0, 95.0)),
            _result(cpu, "streams", (110.0, 104.0, 120.0)),  # best: median 110, range 104-120
            _result(cpu, "auto", (101.0, 106.0, 105.0)),  # highest 106 >= 104: tied
            _result(cpu, "processes", (60.0, 70.0, 65.0)),
        ),
    )
    assert report.best is not None and report.best.name == "streams"
    assert report.tied_with_best() == ("auto",)
    names = [row[0] for row in table_rows(report)]
    assert names == ["sequential", "streams *", "auto ~", "processes"]
    csv_rows = {r["plan"]: r for r in csv.DictReader(io.StringIO(to_csv(report)))}
    assert (
        csv_rows["auto"]["tied_with_best"] == "True" and csv_rows["sequential"]["tied_with_best"] == "False"
    )
    title = render_table(report).title
    assert "median of 3 interleaved rounds" in title and "~ = tied" in title
    # one round each: nothing is tied unless equal
    single = dataclasses.replace(
        report, results=tuple(dataclasses.replace(r, round_sps=r.round_sps[:1]) for r in report.results)
    )
    assert single.tied_with_best() == () and single.rounds == 1


def test_old_report_json_without_rounds_still_loads(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compare_module, "run_plan", Runner({"sequential": [100.0], "streams": [120.0]}))
    report = compare(pair_ensemble, cpu, three_plans(cpu)[:2], batch_size=2, settings=RunSettings())
    data = json.loads(serde.dumps(report))
    for result in data["data"]["results"]:
        del result["round_sps"], result["round_p99_s"]
    old = serde.loads(Report, json.dumps(data))
    streams = old.result("streams")
    assert streams is not None and streams.round_sps == () and streams.measured_sps == 120.0
    assert streams.spread is None and old.rounds == 1 and old.best is not None and old.best.name == "streams"


class BrokeRunner(Runner):
    """A :class:`Runner` whose negative figures are runs that broke partway: status ``failed``,
    with the throughput of the requests finished before (as ``run_requests`` reports them)."""

    def __call__(
        self, plan: Plan, ensemble: Ensemble, settings: RunSettings, *, name: str | None = None
    ) -> tuple[PlanRun | None, str | None]:
        label = name or plan.strategy
        self.calls.append(label)
        value = next(self.script[label])
        run = fake_run(plan, abs(value))
        if value < 0:
            broke = dataclasses.replace(run.run, status="failed", errors=("WorkerFailedError: it broke",))
            run = PlanRun(broke, run.rates)
        return run, None


def test_a_plan_that_broke_partway_counts_nowhere(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    # its throughput is that of the requests it finished before breaking: the best plan left it
    # out, but the Pareto set took it (and dominated every plan that served)
    runner = BrokeRunner({"sequential": [100.0], "streams": [-500.0], "processes": [90.0]})
    monkeypatch.setattr(compare_module, "run_plan", runner)
    report = compare(pair_ensemble, cpu, three_plans(cpu), batch_size=2, settings=RunSettings())
    broke = report.result("streams")
    assert broke is not None and broke.status == "failed" and not broke.ran
    assert report.best is not None and report.best.name == "sequential"
    assert compare_module.pareto_set(report) == ["sequential"]


def test_a_baseline_that_broke_partway_gives_no_speed_ups(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = BrokeRunner({"sequential": [-20.0], "streams": [120.0], "processes": [90.0]})
    monkeypatch.setattr(compare_module, "run_plan", runner)
    report = compare(pair_ensemble, cpu, three_plans(cpu), batch_size=2, settings=RunSettings())
    assert [r.speedup for r in report.results] == [None, None, None]  # was 6.0x and 4.5x
    assert any("no speed-ups: the baseline 'sequential' did not run to its end" in n for n in report.notes)


def test_no_warm_up_is_recorded_as_none_not_as_the_default(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = Runner({"sequential": [100.0, 100.0], "streams": [120.0, 120.0]})
    monkeypatch.setattr(compare_module, "run_plan", runner)
    plans = three_plans(cpu)[:2]
    report = compare(pair_ensemble, cpu, plans, batch_size=2, settings=RunSettings(warmup=0))
    assert report.settings["warmup"] == "0"
    report = compare(pair_ensemble, cpu, plans, batch_size=2, settings=RunSettings())
    assert report.settings["warmup"] == "executor default"


def test_a_calibration_from_another_batch_size_or_ensemble_is_refused(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compare_module, "run_plan", Runner({"sequential": [100.0], "streams": [120.0]}))
    at_8 = Calibration(ensemble="pair", device=cpu, batch_size=8, pairs=())
    with pytest.raises(InvalidInputError, match="measured at batch size 8, not 2"):
        compare(pair_ensemble, cpu, three_plans(cpu)[:2], batch_size=2, calibration=at_8)
    other = dataclasses.replace(at_8, ensemble="default-tiny", batch_size=2)
    with pytest.raises(InvalidInputError, match="on ensemble 'default-tiny', not 'pair'"):
        compare(pair_ensemble, cpu, three_plans(cpu)[:2], batch_size=2, calibration=other)


def test_a_p99_from_few_requests_at_a_load_says_how_few() -> None:
    from colocate.report import FEW_FOR_P99, rate_rows

    few = RatePoint(rate_rps=2.0, completed=2, failed=0, latency_p50_s=0.010, latency_p99_s=0.016)
    many = dataclasses.replace(few, rate_rps=50.0, completed=FEW_FOR_P99)
    result = PlanResult("sequential", "ok", None, None, None, None, rates=(few, many))
    report = Report(
        ensemble="e",
        device=Device(kind="cpu", name="cpu"),
        batch_size=1,
        baseline="sequential",
        results=(result,),
        settings={},
    )
    _, rows = rate_rows(report)
    assert rows == [["sequential", "10.0 / 16.0 (n=2)", "10.0 / 16.0"]]


# --- calibration: runner-up pairs, then settling the close call -------------------------------


class CalibrationRunner:
    """Replaces ``run_plan`` for a calibration: pair runs answer latencies, candidate plans
    samples/s by their label."""

    def __init__(self, plan_sps: dict[str, float], pair_stretch: float = 1.05) -> None:
        self.plan_sps = plan_sps
        self.pair_stretch = pair_stretch
        self.pair_runs: list[tuple[str, tuple[tuple[str, ...], ...]]] = []
        self.plan_runs: list[str] = []

    def __call__(
        self, plan_: Plan, ensemble: Ensemble, settings: RunSettings, *, name: str | None = None
    ) -> tuple[PlanRun | None, str | None]:
        if plan_.strategy == "calibration":
            kinds = {s.kind for s in plan_.slots}
            (kind,) = kinds
            self.pair_runs.append((kind, tuple(s.members for s in plan_.slots)))
            latency = 0.01 * (self.pair_stretch if len(plan_.slots) == 2 else 1.0)
            return fake_run(plan_, 1.0 / latency, latency_s=latency), None
        label = name or plan_.strategy
        self.plan_runs.append(label)
        return fake_run(plan_, self.plan_sps.get(label, 10.0)), None


def test_calibrating_a_sequential_pick_measures_runner_up_pairs_and_settles_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the H100 at batch 1 (H200 profiles): the model puts sequential, coloring and streams within
    # 0.5 %, and auto picks sequential, which co-locates no pair
    ensemble = zoo.default_ensemble(scale="large")
    profiles = recorded()
    before = plan(ensemble, h100(), profiles, batch_size=1)
    assert len(before.slots) == 1 and pairs_to_measure(before, 3) == []
    runner = CalibrationRunner({"streams": 40.0, "sequential": 36.0, "coloring": 30.0})
    monkeypatch.setattr(compare_module, "run_plan", runner)
    calibration = compare_module.calibrate(ensemble, h100(), profiles, batch_size=1, max_pairs=3)
    # three pairs, from the runner-up plans, measured in stream slots like those plans run them
    assert len(calibration.pairs) == 3
    assert all(p.kind == "stream" for p in calibration.pairs)
    assert {kind for kind, _ in runner.pair_runs} == {"stream"}
    assert all(p.slowdown == pytest.approx(1.05) for p in calibration.pairs)
    # then the close call: auto's pick and the best runners-up (3 in all), and the by-hand plans
    # not among them (a process per member, predicted far below), two interleaved rounds each
    names = [m.name for m in calibration.plans]
    assert names == ["sequential", "coloring", "streams", "processes"]
    assert sorted(runner.plan_runs) == sorted(names * 2)
    assert runner.plan_runs[: len(names)] == names and runner.plan_runs[len(names) :] != names
    assert all(len(m.round_sps) == 2 for m in calibration.plans)
    # planning with the calibration picks the measured-best, and says so
    after = plan(
        ensemble,
        h100(),
        profiles,
        batch_size=1,
        interference=calibration.interference(),
        measured_plans=calibration.measured_plans(),
    )
    assert [s.members for s in after.slots] == [(m,) for m in ensemble.member_names]
    assert any(
        line.startswith("settled by measurement: streams measured 40 vs sequential 36")
        for line in after.explanation
    )


def test_worker_pairs_are_measured_alone_and_together_in_worker_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ensemble = zoo.default_ensemble(scale="large")
    runner = CalibrationRunner({}, pair_stretch=1.3)
    monkeypatch.setattr(compare_module, "run_plan", runner)
    settings = RunSettings(seconds=1.0, concurrency=1)
    picks = [("mlp", "vit", "process"), ("mlp", "resnet", "stream")]
    measured = compare_module._measure_pairs(ensemble, h100(), recorded(), 8, picks, settings, lambda _: None)
    assert [(p.a, p.b, p.kind) for p in measured] == [("mlp", "vit", "process"), ("mlp", "resnet", "stream")]
    assert runner.pair_runs == [
        ("process", (("mlp",),)),
        ("process", (("vit",),)),
        ("process", (("mlp",), ("vit",))),
        ("stream", (("mlp",),)),  # alone again: a stream slot is not a worker process
        ("stream", (("resnet",),)),
        ("stream", (("mlp",), ("resnet",))),
    ]
    assert all(p.slowdown == pytest.approx(1.3) for p in measured)
    engine = CostModel().engine(compare_module.member_demands(ensemble, h100(), recorded(), 8))
    assert measured[0].predicted_slowdown == pytest.approx(engine.pair_slowdown("mlp", "vit", "process"))


def test_calibration_without_plan_measurements_measures_pairs_only(monkeypatch: pytest.MonkeyPatch) -> None:
    ensemble = zoo.default_ensemble(scale="large")
    runner = CalibrationRunner({})
    monkeypatch.setattr(compare_module, "run_plan", runner)
    calibration = compare_module.calibrate(
        ensemble, h100(), recorded(), batch_size=1, max_pairs=1, max_plans=0
    )
    assert len(calibration.pairs) == 1 and calibration.plans == () and runner.plan_runs == []


def test_compare_calibrates_then_runs_the_settled_auto_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    ensemble = zoo.default_ensemble(scale="large")
    runner = CalibrationRunner({"streams": 40.0, "sequential": 36.0, "coloring": 30.0, "auto": 40.0})
    monkeypatch.setattr(compare_module, "run_plan", runner)
    report = compare(
        ensemble, h100(), ["sequential", "streams", "auto"], profiles=recorded(), batch_size=1,
        settings=RunSettings(seconds=1.0, repeats=2),
    )  # fmt: skip
    assert report.calibration is not None and len(report.calibration.plans) >= 2
    auto = report.result("auto")
    assert auto is not None and auto.plan is not None
    assert [s.members for s in auto.plan.slots] == [(m,) for m in ensemble.member_names]
    assert any(line.startswith("settled by measurement: streams") for line in auto.plan.explanation)
    assert any("the calibration ran 4 candidate plans" in note for note in report.notes)
    assert report.rounds == 2 and auto.round_sps == (40.0, 40.0)
    assert set(report.tied_with_best()) == {"auto"} or report.best is auto


# --- planning with plan measurements -------------------------------------------------------


def _measured(p: Plan, *rounds: float, name: str | None = None) -> PlanMeasurement:
    return PlanMeasurement(name or p.strategy, p.slots, p.batch_size, p.prediction.throughput_sps, rounds)


@pytest.fixture(scope="module")
def h100_batch8() -> dict[str, Plan]:
    profiles = recorded()
    return {p.strategy: p for p in compare_module.plan_all(profiles.members, h100(), profiles, batch_size=8)}


def _auto(measured: tuple[PlanMeasurement, ...], objective: str = "throughput", **kw: object) -> Plan:
    profiles = recorded()
    return plan(
        profiles.members, h100(), profiles, batch_size=8, objective=objective, measured_plans=measured, **kw
    )  # type: ignore[arg-type]


def test_measured_plans_make_auto_pick_the_measured_best(h100_batch8: dict[str, Plan]) -> None:
    model_pick = h100_batch8["auto"]
    seq, streams, procs = h100_batch8["sequential"], h100_batch8["streams"], h100_batch8["processes"]
    # sequential is predicted within 10 % of auto's pick, processes far below it
    assert seq.prediction.throughput_sps >= 0.9 * model_pick.prediction.throughput_sps
    assert procs.prediction.throughput_sps < 0.5 * model_pick.prediction.throughput_sps
    measured = (
        _measured(model_pick, 306.0, 300.0, name="auto"),
        _measured(streams, 358.0, 350.0),
        _measured(seq, 380.0, 376.0),
        _measured(procs, 200.0, 210.0),
    )
    chosen = _auto(measured)
    assert chosen.slots == seq.slots
    line = next(x for x in chosen.explanation if x.startswith("settled by measurement"))
    assert line.startswith(
        "settled by measurement: sequential measured 378 vs streams 354, auto 303, processes 205 samples/s"
    )
    assert "instead of the model's pick" in line
    # a plan predicted far below the pick that measured faster in the same rounds wins all the same:
    # the prediction may rest on a pair measured badly (on the CPU a process per member was
    # predicted 25 % below auto's pick after one such pair, and measured 32 % above it)
    far_off = _auto((*measured[:3], _measured(procs, 900.0, 880.0)))
    assert far_off.slots == procs.slots
    assert any(x.startswith("settled by measurement: processes measured 890 vs") for x in far_off.explanation)
    # the model's pick measured best: it stays, and the explanation says it was confirmed
    confirmed = _auto((_measured(model_pick, 430.0, 420.0, name="auto"), _measured(seq, 380.0, 376.0)))
    assert confirmed.slots == model_pick.slots
    assert any("the model's pick" in x for x in confirmed.explanation)


def test_measured_plans_do_not_apply_without_the_pick_or_for_other_objectives(
    h100_batch8: dict[str, Plan],
) -> None:
    model_pick = h100_batch8["auto"]
    seq, streams = h100_batch8["sequential"], h100_batch8["streams"]
    # the pick not measured: its prediction (485 samples/s) stands in for a measurement
    without_pick = (_measured(streams, 358.0), _measured(seq, 380.0))
    assert model_pick.prediction.throughput_sps > 400.0
    kept = _auto(without_pick)
    assert kept.slots == model_pick.slots  # no measurement beats what the pick is predicted to give
    assert not any("settled" in x for x in kept.explanation)
    beaten = _auto((_measured(streams, 358.0), _measured(seq, 530.0, 510.0)))
    assert beaten.slots == seq.slots  # a measured plan ran faster than the pick's prediction: it wins
    line = next(x for x in beaten.explanation if x.startswith("settled by measurement"))
    assert line.startswith(
        "settled by measurement: sequential measured 520, streams 358 samples/s; the model's pick"
    )
    assert f"predicted to give {model_pick.prediction.throughput_sps:,.0f}" in line
    both = (_measured(model_pick, 306.0, name="auto"), _measured(seq, 380.0))
    latency = _auto(both, objective="latency")
    assert not any("settled" in x for x in latency.explanation)
    other_batch = tuple(dataclasses.replace(m, batch_size=1) for m in both)
    assert _auto(other_batch).slots == model_pick.slots
    failed = (_measured(model_pick, 306.0, name="auto"), dataclasses.replace(_measured(seq), failure="died"))
    assert _auto(failed).slots == model_pick.slots
    # other strategies are not settled
    profiles = recorded()
    fixed = plan(profiles.members, h100(), profiles, strategy="streams", batch_size=8, measured_plans=both)
    assert fixed.slots == streams.slots


# --- slot kinds of pair measurements ----------------------------------------------------------


def _two_members() -> object:
    return demands(
        demand("a", 10.0, busy=0.3, fill=0.5, host=0.1),
        demand("b", 8.0, busy=0.3, fill=0.5, host=0.1),
    )


def _finish(model: CostModel, kind: str) -> float:
    ds = _two_members()
    layout = (SlotSpec(kind, ("a",)), SlotSpec(kind, ("b",)))
    if kind == "mps":
        layout = (SlotSpec("mps", ("a",), 50.0), SlotSpec("mps", ("b",), 50.0))
    prediction = model.predict(layout, ds)  # type: ignore[arg-type]
    return max(m.finish_s - m.start_s for m in prediction.members)


def test_a_pair_measurement_applies_only_to_slots_of_its_kind() -> None:
    plain = CostModel()
    stream_measured = CostModel(interference={("a", "b"): 3.0})
    process_measured = CostModel(interference={("b", "a", "process"): 3.0})
    mps_measured = CostModel(interference={("a", "b", "process"): 3.0, ("a", "b", "mps"): 1.5})
    # a stream measurement (the old two-member key) changes stream slots only
    assert _finish(stream_measured, "stream") > 2.5 * _finish(plain, "stream")
    assert _finish(stream_measured, "process") == pytest.approx(_finish(plain, "process"))
    assert _finish(stream_measured, "mps") == pytest.approx(_finish(plain, "mps"))
    # a process measurement changes process slots, and mps slots (worker processes too) ...
    assert _finish(process_measured, "stream") == pytest.approx(_finish(plain, "stream"))
    assert _finish(process_measured, "process") > 2.0 * _finish(plain, "process")
    assert _finish(process_measured, "mps") > 2.0 * _finish(plain, "mps")
    # ... unless an mps measurement says otherwise
    assert _finish(mps_measured, "mps") < _finish(process_measured, "mps")
    # a stream slot beside a process slot: no measurement applies
    ds = _two_members()
    mixed = (SlotSpec("stream", ("a",)), SlotSpec("process", ("b",)))
    for model in (stream_measured, process_measured):
        assert model.predict(mixed, ds).throughput_sps == pytest.approx(
            plain.predict(mixed, ds).throughput_sps
        )  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="unknown slot kind 'thread'"):
        CostModel(interference={("a", "b", "thread"): 1.2})


def test_a_process_measurement_reproduces_the_pair_in_process_slots_on_a_gpu() -> None:
    ds = _two_members()
    model = CostModel(interference={("a", "b", "process"): 2.0})
    engine = model.engine(ds)  # type: ignore[arg-type]
    layout = (SlotSpec("process", ("a",)), SlotSpec("process", ("b",)))
    ev = engine.evaluate(layout)
    offset = ev.starts_s[0][0]
    makespan = max(ev.finishes_s[0][0], ev.finishes_s[1][0]) - offset
    assert makespan / 0.010 == pytest.approx(2.0, rel=1e-6)
    assert engine.measured_pair("a", "b", "mps") == 2.0 and engine.measured_pair("a", "b") is None


def test_the_conflict_graph_of_a_kind_uses_that_kinds_measurements() -> None:
    ds = _two_members()
    table = {("a", "b", "process"): 2.5}
    assert conflict_graph(ds, table, kind="process").edges["a", "b"]["measured"] is True  # type: ignore[arg-type]
    assert conflict_graph(ds, table, kind="stream").edges["a", "b"]["measured"] is False  # type: ignore[arg-type]


def test_pairs_are_measured_in_the_kind_of_their_slots(cpu: Device) -> None:
    assert pair_kind("stream", "stream") == "stream"
    assert pair_kind("process", "process") == "process" and pair_kind("mps", "mps") == "process"
    assert pair_kind("stream", "process") is None
    mixed = Plan(
        device=cpu,
        batch_size=2,
        slots=(
            Slot("s0", "stream", ("a",)),
            Slot("s1", "stream", ("b",)),
            Slot("s2", "process", ("c",)),
            Slot("s3", "mps", ("d",), thread_percentage=50.0),
        ),
        prediction=hand_plan(cpu, "x", [["a"]]).prediction,
        strategy="x",
    )
    picks = pairs_to_measure(mixed, 10)
    assert sorted(picks) == [("a", "b", "stream"), ("c", "d", "process")]


def test_calibration_json_round_trips_and_old_files_load(cpu: Device, tmp_path: Path) -> None:
    seq = hand_plan(cpu, "sequential", [["mlp", "mobilenet"]])
    calibration = Calibration(
        ensemble="pair",
        device=cpu,
        batch_size=2,
        pairs=(
            PairMeasurement("mlp", "mobilenet", 0.001, 0.004, 0.006, 1.5, 1.1),
            PairMeasurement("mlp", "mobilenet", 0.002, 0.005, 0.007, 1.4, 1.2, kind="process"),
        ),
        plans=(
            PlanMeasurement("sequential", seq.slots, 2, 100.0, (90.0, 95.0)),
            PlanMeasurement("streams", seq.slots, 2, 99.0, (), failure="died"),
        ),
    )
    calibration = dataclasses.replace(calibration, time_scale=1.25)
    path = serde.save(calibration, tmp_path / "cal.json")
    assert compare_module.load_calibration(path) == calibration
    assert calibration.model().time_scale == 1.25
    assert calibration.interference() == {("mlp", "mobilenet"): 1.5, ("mlp", "mobilenet", "process"): 1.4}
    assert [m.name for m in calibration.measured_plans()] == ["sequential"]
    assert calibration.plans[0].measured_sps == 92.5
    # a file from before kinds and plan measurements
    data = json.loads(path.read_text())
    del data["data"]["plans"]
    del data["data"]["time_scale"]
    for pair in data["data"]["pairs"]:
        del pair["kind"]
    old = serde.loads(Calibration, json.dumps(data))
    assert old.plans == () and [p.kind for p in old.pairs] == ["stream", "stream"]
    assert old.time_scale == 1.0
    with pytest.raises(InvalidInputError, match="samples/s must be >= 0"):
        PlanMeasurement("x", seq.slots, 2, 1.0, (-1.0,))


def test_cli_plan_uses_a_saved_calibration(
    h100_batch8: dict[str, Plan], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from colocate.cli import main
    from tests.planning.helpers import EAGER

    model_pick, seq = h100_batch8["auto"], h100_batch8["sequential"]
    calibration = Calibration(
        ensemble="default-large",
        device=h100(),
        batch_size=8,
        pairs=(),
        plans=(_measured(model_pick, 306.0, name="auto"), _measured(seq, 380.0)),
    )
    path = serde.save(calibration, tmp_path / "calibration.json")
    # the profiles are the large ensemble's: --scale large (a plan for another scale is refused)
    args = ["plan", "--device", "h100", "--scale", "large", "--profiles", str(EAGER)]
    args += ["--batch-size", "8", "--json"]
    assert main([*args, "--calibration", str(path)]) == 0
    settled = serde.loads(Plan, capsys.readouterr().out)
    assert settled.slots == seq.slots
    assert any(
        line.startswith("settled by measurement: sequential measured 380") for line in settled.explanation
    )
    assert main(args) == 0
    assert serde.loads(Plan, capsys.readouterr().out).slots == model_pick.slots


def test_every_by_hand_plan_is_measured_when_settling_past_the_limit_and_once(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    pick = hand_plan(cpu, "auto", [["mlp", "mobilenet"]], kind="process")
    runners = [
        hand_plan(cpu, "coloring", [["mlp"], ["mobilenet"]], kind="mps"),
        hand_plan(cpu, "packing", [["mobilenet", "mlp"]], kind="mps"),
        hand_plan(cpu, "exhaustive", [["mlp"], ["mobilenet"]], kind="process"),
    ]
    by_hand = [
        hand_plan(cpu, "sequential", [["mlp", "mobilenet"]]),
        hand_plan(cpu, "streams", [["mlp"], ["mobilenet"]]),
        hand_plan(cpu, "processes", [["mlp"], ["mobilenet"]], kind="process"),
    ]
    monkeypatch.setattr(compare_module, "candidate_plans", lambda *a, **k: (pick, list(runners)))
    monkeypatch.setattr(compare_module, "by_hand_plans", lambda *a, **k: list(by_hand))
    monkeypatch.setattr(compare_module, "mps_can_run", lambda *a: False)
    monkeypatch.setattr(compare_module, "_measure_pairs", lambda *a, **k: [])
    measured: list[list[str]] = []

    def fake_measure(plans: list[Plan], *_a: object, **_k: object) -> tuple[PlanMeasurement, ...]:
        measured.append([p.strategy for p in plans])
        return ()

    monkeypatch.setattr(compare_module, "measure_plans", fake_measure)
    compare_module.calibrate(pair_ensemble, cpu, ProfileSetStub(), batch_size=2, max_plans=3)
    # the pick and the two best runners-up, then every by-hand plan, past the limit: the third
    # runner-up is left out, but the same slots made by hand (a process per member) run
    assert measured == [["auto", "coloring", "packing", "sequential", "streams", "processes"]]
    # a by-hand plan with the slots of a plan already in runs once, under the name it has there
    monkeypatch.setattr(compare_module, "by_hand_plans", lambda *a, **k: [by_hand[2], by_hand[2]])
    monkeypatch.setattr(compare_module, "candidate_plans", lambda *a, **k: (pick, [runners[2]]))
    measured.clear()
    compare_module.calibrate(pair_ensemble, cpu, ProfileSetStub(), batch_size=2, max_plans=3)
    assert measured == [["auto", "exhaustive"]]


def test_by_hand_plans_are_the_three_a_user_makes_whatever_their_prediction() -> None:
    ensemble = zoo.default_ensemble(scale="large")
    made = compare_module.by_hand_plans(ensemble, h100(), recorded(), batch_size=8)
    assert [p.strategy for p in made] == ["sequential", "streams", "processes"]
    assert [len(p.slots) for p in made] == [1, len(ensemble.members), len(ensemble.members)]
    assert {s.kind for s in made[2].slots} == {"process"}


class ProfileSetStub:
    """Stands in for profiles where every function that reads them is replaced."""


# --- how fast plans run now against the profiles ---------------------------------------------


def test_time_scale_stretches_every_member_and_the_prediction() -> None:
    ds = demands(demand("a", 10), demand("b", 20))
    layout = (SlotSpec("stream", ("a", "b")),)
    base = CostModel().predict(layout, ds)
    slower = CostModel(time_scale=1.5).predict(layout, ds)
    assert slower.throughput_sps == pytest.approx(base.throughput_sps / 1.5, rel=0.02)
    assert ds.scaled(1.5)["b"].latency_s == pytest.approx(0.030)
    assert ds.scaled(1.0) is ds
    with pytest.raises(InvalidInputError, match="time_scale"):
        CostModel(time_scale=0.0)


def test_calibration_runs_the_pick_without_a_close_call_and_takes_the_time_scale(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    pick = hand_plan(cpu, "auto", [["mlp", "mobilenet"]], kind="process")  # predicted 100 samples/s
    monkeypatch.setattr(compare_module, "candidate_plans", lambda *a, **k: (pick, []))
    monkeypatch.setattr(compare_module, "by_hand_plans", lambda *a, **k: [pick])  # the pick is one
    monkeypatch.setattr(compare_module, "mps_can_run", lambda *a: False)
    monkeypatch.setattr(compare_module, "_unmeasured_pick", lambda *a: None)  # as measured
    monkeypatch.setattr(compare_module, "_measure_pairs", lambda *a, **k: [])
    ran: list[list[str]] = []

    def fake_measure(plans: list[Plan], *_a: object, **_k: object) -> tuple[PlanMeasurement, ...]:
        ran.append([p.strategy for p in plans])
        return tuple(PlanMeasurement(p.strategy, p.slots, 2, 100.0, (78.0, 82.0)) for p in plans)

    monkeypatch.setattr(compare_module, "measure_plans", fake_measure)
    calibration = compare_module.calibrate(pair_ensemble, cpu, ProfileSetStub(), batch_size=2)
    assert ran == [["auto"]]  # no close call: the pick alone, to see how fast plans run now
    assert calibration.time_scale == pytest.approx(100.0 / 80.0)
    assert calibration.model().time_scale == pytest.approx(1.25)
    none = compare_module.calibrate(pair_ensemble, cpu, ProfileSetStub(), batch_size=2, max_plans=0)
    assert none.time_scale == 1.0 and ran == [["auto"]]  # pairs only: nothing run, no scale


# --- worker plans and MPS in a calibration (what the lent H100 showed at batch 1) -------------


def _ran(p: Plan, predicted: float, measured: float) -> PlanMeasurement:
    return PlanMeasurement(p.strategy, p.slots, p.batch_size, predicted, (measured,))


def test_time_scales_split_stream_plans_from_worker_plans(cpu: Device) -> None:
    seq = hand_plan(cpu, "sequential", [["mlp", "mobilenet"]])
    streams = hand_plan(cpu, "streams", [["mlp"], ["mobilenet"]])
    procs = hand_plan(cpu, "processes", [["mlp"], ["mobilenet"]], kind="process")
    mps = hand_plan(cpu, "mps", [["mlp"], ["mobilenet"]], kind="mps")
    mixed = Plan(
        device=cpu,
        batch_size=2,
        slots=(Slot("s0", "stream", ("mlp",)), Slot("s1", "process", ("mobilenet",))),
        strategy="mixed",
        prediction=seq.prediction,
    )
    # the H100's batch-1 case: stream plans near their prediction, processes 13x theirs
    plans = (_ran(seq, 43.0, 48.0), _ran(streams, 37.8, 39.0), _ran(procs, 13.4, 181.0))
    time_scale, worker, side_by_side = compare_module._time_scales(plans)
    assert time_scale == pytest.approx(43 / 48)  # the loop: no concurrency model in its prediction
    assert worker == pytest.approx((13.4 / 181) / time_scale)
    assert side_by_side == pytest.approx((37.8 / 39) / time_scale)  # a thread per member, beside the loop
    # without the loop, the median over the plans of stream slots
    coloring = hand_plan(cpu, "coloring", [["mlp"], ["mobilenet"]])
    without_loop = (_ran(streams, 37.8, 39.0), _ran(coloring, 43.0, 51.7), _ran(procs, 13.4, 181.0))
    # (which then set time_scale themselves: no separate factor for them)
    assert compare_module._time_scales(without_loop)[::2] == (pytest.approx((37.8 / 39 + 43 / 51.7) / 2), 1.0)
    # CUDA graphs on the H100: the loop as predicted, streams of graphs a quarter of theirs
    graphs = (_ran(seq, 366.0, 354.0), _ran(streams, 1108.0, 229.0), _ran(coloring, 1187.0, 290.0))
    loop_scale = 366 / 354
    side = ((1108 / 229 + 1187 / 290) / 2) / loop_scale
    assert compare_module._time_scales(graphs) == (pytest.approx(loop_scale), 1.0, pytest.approx(side))
    assert 3.9 < side < 4.5
    # the worker figure is the median over worker-only plans, mps ones included
    _, worker2, _ = compare_module._time_scales((*plans, _ran(mps, 13.4, 150.0), _ran(procs, 13.4, 170.0)))
    assert worker2 == pytest.approx((13.4 / 170) / time_scale)
    # a mixed plan informs neither scale
    assert compare_module._time_scales((*plans, _ran(mixed, 100.0, 1.0))) == (
        time_scale,
        worker,
        side_by_side,
    )
    # worker plans alone: one scale for every plan, as before the split
    assert compare_module._time_scales((_ran(procs, 10.0, 20.0), _ran(mps, 10.0, 40.0))) == (
        pytest.approx(0.375),
        1.0,
        1.0,
    )
    assert compare_module._time_scales((_ran(seq, 10.0, 20.0),)) == (0.5, 1.0, 1.0)
    assert compare_module._time_scales(()) == (1.0, 1.0, 1.0)


def test_stream_time_scale_stretches_stream_slots_beside_others_only() -> None:
    ds = demands(demand("a", 10), demand("b", 20))
    loop = (SlotSpec("stream", ("a", "b")),)
    streams = (SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",)))
    workers = (SlotSpec("process", ("a",)), SlotSpec("process", ("b",)))
    mixed = (SlotSpec("stream", ("a",)), SlotSpec("process", ("b",)))
    slower = CostModel(stream_time_scale=4.0)
    base = CostModel()
    # the loop and the workers as modelled; streams side by side at a quarter (fixed costs aside)
    for layout in (loop, workers):
        assert slower.predict(layout, ds).throughput_sps == pytest.approx(
            base.predict(layout, ds).throughput_sps
        )
    assert base.predict(streams, ds).throughput_sps / 4.5 < slower.predict(streams, ds).throughput_sps
    assert slower.predict(streams, ds).throughput_sps <= base.predict(streams, ds).throughput_sps / 3
    # a stream slot beside a worker slot is beside other slots too
    assert slower.predict(mixed, ds).throughput_sps < base.predict(mixed, ds).throughput_sps
    for bad in (0.0, -1.0):
        with pytest.raises(InvalidInputError, match="stream_time_scale"):
            CostModel(stream_time_scale=bad)


def test_worker_time_scale_stretches_worker_slots_only() -> None:
    ds = demands(demand("a", 10), demand("b", 20))
    stream = (SlotSpec("stream", ("a",)), SlotSpec("stream", ("b",)))
    workers = (SlotSpec("process", ("a",)), SlotSpec("process", ("b",)))
    faster = CostModel(worker_time_scale=0.1)
    assert faster.predict(stream, ds).throughput_sps == pytest.approx(
        CostModel().predict(stream, ds).throughput_sps
    )
    base = CostModel().predict(workers, ds).throughput_sps
    # the dispatch and combine are not member times, so the gain is a little under 10x
    assert 6 * base < faster.predict(workers, ds).throughput_sps <= 10 * base
    for bad in (0.0, -1.0):
        with pytest.raises(InvalidInputError, match="worker_time_scale"):
            CostModel(worker_time_scale=bad)


def test_calibration_carries_the_worker_and_stream_time_scales_and_reads_old_files(tmp_path: Path) -> None:
    calibration = Calibration(
        ensemble="pair",
        device=h100(),
        batch_size=1,
        pairs=(),
        time_scale=0.9,
        worker_time_scale=0.08,
        stream_time_scale=4.0,
    )
    loaded = serde.load(Calibration, serde.save(calibration, tmp_path / "c.json"))
    assert loaded == calibration
    model = loaded.model()
    assert (model.time_scale, model.worker_time_scale, model.stream_time_scale) == (0.9, 0.08, 4.0)
    raw = json.loads((tmp_path / "c.json").read_text())
    raw["data"].pop("worker_time_scale")
    raw["data"].pop("stream_time_scale")
    (tmp_path / "old.json").write_text(json.dumps(raw))
    old = serde.load(Calibration, tmp_path / "old.json")
    assert (old.worker_time_scale, old.stream_time_scale) == (1.0, 1.0)


def test_a_calibrated_worker_scale_lets_auto_pick_worker_processes_the_model_ranked_last() -> None:
    profiles = recorded()
    every = {p.strategy: p for p in compare_module.plan_all(profiles.members, h100(), profiles, batch_size=8)}
    uncalibrated = plan(profiles.members, h100(), profiles, batch_size=8)
    assert all(s.kind == "stream" for s in uncalibrated.slots)
    # worker plans measured at a tenth of their predicted time: auto now lays out worker slots
    calibrated = plan(
        profiles.members, h100(), profiles, batch_size=8, model=CostModel(worker_time_scale=0.1)
    )
    assert all(s.kind != "stream" for s in calibrated.slots)
    assert calibrated.prediction.throughput_sps > every["processes"].prediction.throughput_sps


def test_mps_can_run_on_a_real_gpu_with_a_daemon_or_leave_to_start_one(
    cpu: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = dataclasses.replace(h100(), kind="cuda")
    monkeypatch.setattr(compare_module, "mps_daemon_running", lambda: False)
    monkeypatch.setattr(compare_module, "mps_available", lambda: True)
    assert compare_module.mps_can_run(gpu, RunSettings(allow_mps_start=True))
    assert not compare_module.mps_can_run(gpu, RunSettings())
    # leave to start a daemon, but no nvidia-cuda-mps-control to start it with
    monkeypatch.setattr(compare_module, "mps_available", lambda: False)
    assert not compare_module.mps_can_run(gpu, RunSettings(allow_mps_start=True))
    assert not compare_module.mps_can_run(h100(), RunSettings(allow_mps_start=True))  # simulated
    assert compare_module.mps_can_run(cpu, RunSettings())  # core shares: always
    monkeypatch.setattr(compare_module, "mps_daemon_running", lambda: True)
    assert compare_module.mps_can_run(gpu, RunSettings())


def test_baseline_plans_add_an_mps_worker_per_member_when_asked() -> None:
    ensemble = zoo.default_ensemble(scale="large")
    plain = compare_module.baseline_plans(ensemble, h100(), recorded(), batch_size=8)
    assert [p.strategy for p in plain] == ["sequential", "streams", "processes"]
    made = compare_module.baseline_plans(ensemble, h100(), recorded(), batch_size=8, with_mps=True)
    assert [p.strategy for p in made] == ["sequential", "streams", "processes", "mps"]
    assert {s.kind for s in made[3].slots} == {"mps"}
    assert sorted(len(s.members) for s in made[3].slots) == [1] * len(ensemble.members)


def test_calibrate_measures_the_mps_baseline_where_mps_can_run(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    pick = hand_plan(cpu, "auto", [["mlp", "mobilenet"]])
    asked: list[bool] = []

    def fake_baselines(*_a: object, with_mps: bool = False, **_k: object) -> list[Plan]:
        asked.append(with_mps)
        extra = [hand_plan(cpu, "mps", [["mlp"], ["mobilenet"]], kind="mps")] if with_mps else []
        return [pick, *extra]

    monkeypatch.setattr(compare_module, "candidate_plans", lambda *a, **k: (pick, []))
    monkeypatch.setattr(compare_module, "baseline_plans", fake_baselines)
    monkeypatch.setattr(compare_module, "_measure_pairs", lambda *a, **k: [])
    monkeypatch.setattr(compare_module, "mps_can_run", lambda device, settings: settings.allow_mps_start)
    ran: list[list[str]] = []

    def fake_measure(plans: list[Plan], *_a: object, **_k: object) -> tuple[PlanMeasurement, ...]:
        ran.append([p.strategy for p in plans])
        return ()

    monkeypatch.setattr(compare_module, "measure_plans", fake_measure)
    compare_module.calibrate(pair_ensemble, cpu, ProfileSetStub(), batch_size=2)
    compare_module.calibrate(
        pair_ensemble, cpu, ProfileSetStub(), batch_size=2, run_settings=RunSettings(allow_mps_start=True)
    )
    assert asked == [False, True]
    assert ran == [["auto"], ["auto", "mps"]]


def test_unmeasured_pick_is_auto_with_the_calibration_unless_a_run_had_its_slots() -> None:
    profiles = recorded()
    every = {p.strategy: p for p in compare_module.plan_all(profiles.members, h100(), profiles, batch_size=8)}
    auto = plan(profiles.members, h100(), profiles, batch_size=8)
    seq = every["sequential"]
    only_loop = Calibration(
        ensemble="large", device=h100(), batch_size=8, pairs=(), plans=(_measured(seq, 1.0),)
    )
    pick = compare_module._unmeasured_pick(profiles.members, h100(), profiles, 8, only_loop)
    # the loop measured at 1 sample/s: auto's own slots stay its pick, and no run had them
    assert pick is not None and pick.slots == auto.slots
    both = dataclasses.replace(only_loop, plans=(_measured(seq, 1.0), _measured(auto, 1.0)))
    assert compare_module._unmeasured_pick(profiles.members, h100(), profiles, 8, both) is None


def test_calibrate_measures_its_calibrated_pick_when_no_run_had_it(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    pick = hand_plan(cpu, "auto", [["mlp", "mobilenet"]])
    later = hand_plan(cpu, "auto", [["mlp"], ["mobilenet"]], kind="process")
    monkeypatch.setattr(compare_module, "candidate_plans", lambda *a, **k: (pick, []))
    monkeypatch.setattr(compare_module, "baseline_plans", lambda *a, **k: [pick])
    monkeypatch.setattr(compare_module, "_measure_pairs", lambda *a, **k: [])
    asked: list[Calibration] = []

    def fake_pick(*args: object) -> Plan:
        asked.append(args[-1])  # type: ignore[arg-type]
        return later

    monkeypatch.setattr(compare_module, "_unmeasured_pick", fake_pick)
    ran: list[list[str]] = []

    def fake_measure(plans: list[Plan], *_a: object, **_k: object) -> tuple[PlanMeasurement, ...]:
        ran.append([p.strategy for p in plans])
        return tuple(PlanMeasurement(p.strategy, p.slots, 2, 100.0, (50.0, 50.0)) for p in plans)

    monkeypatch.setattr(compare_module, "measure_plans", fake_measure)
    calibration = compare_module.calibrate(pair_ensemble, cpu, ProfileSetStub(), batch_size=2)
    assert ran == [["auto"], ["auto, calibrated"]]
    assert [m.name for m in calibration.plans] == ["auto", "auto, calibrated"]
    assert calibration.plans[1].slots == later.slots
    # the scales come from the settling runs: the follow-up (a worker plan) does not move them
    assert (calibration.time_scale, calibration.worker_time_scale) == (2.0, 1.0)
    assert asked[0].time_scale == 2.0 and len(asked[0].plans) == 1
    # nothing measured: no follow-up
    monkeypatch.setattr(compare_module, "measure_plans", lambda *a, **k: ())
    ran.clear()
    assert compare_module.calibrate(pair_ensemble, cpu, ProfileSetStub(), batch_size=2).plans == ()
    assert len(asked) == 1


def test_a_pair_calibration_run_that_broke_partway_gives_no_slowdown(
    cpu: Device, pair_ensemble: Ensemble, monkeypatch: pytest.MonkeyPatch
) -> None:
    # its latencies are those of the requests before it broke: no slowdown is taken from them
    def broke(plan: Plan, ensemble: Ensemble, settings: RunSettings, *, name: str | None = None) -> Any:
        run = fake_run(plan, 100.0)
        return PlanRun(
            dataclasses.replace(run.run, status="failed", errors=("WorkerFailedError: it broke",))
        ), None

    monkeypatch.setattr(compare_module, "run_plan", broke)
    with pytest.raises(ColocateError, match=r"calibration run of mlp, mobilenet failed: .*it broke"):
        compare_module._median_latency(
            three_plans(cpu)[0], pair_ensemble, RunSettings(), name="pair calibration"
        )
