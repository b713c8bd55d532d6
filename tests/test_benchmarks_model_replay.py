"""``benchmarks/model_replay.py``: the cost model predicted again on recorded GPU runs.

The recorded runs are real measurements committed under ``benchmarks/results/``; these tests
check that the replay reads them, predicts every plan, applies the run's measured pairs and
fits the calibration's time scales on the calibration's plans only, and that the pick and its
regret are computed as documented. They do not assert how good the model is.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from colocate.errors import InvalidInputError
from colocate.planning.types import PlanMeasurement
from tests.scripts import BENCHMARKS, load_script

replay = load_script("model_replay", BENCHMARKS)
REPORTS = replay.SOURCES[:2]  # the H200's and the H100's compare reports
H100 = replay.SOURCES[1]
PACKING = replay.SOURCES[2]  # the H100's packing run, before runs carried their plans


def _case(source: tuple[str, str]) -> Any:
    report, profiles = source
    (case,) = replay.load_cases(replay.RESULTS / report, replay.RESULTS / profiles)
    return case


@pytest.mark.parametrize("source", REPORTS, ids=lambda s: s[0].split("-compare")[0])
def test_every_recorded_gpu_plan_is_predicted_again(source: tuple[str, str]) -> None:
    case = _case(source)
    assert case.device.kind == "cuda" and case.batch_size == 8
    assert {p.label for p in case.plans} == {"sequential", "streams", "processes", "mps", "auto"}
    record = replay.replay_case(case)
    for row in record["plans"]:
        assert row["error"] is None, row
        assert row["model"] > 0 and row["then"] > 0 and row["measured_sps"] > 0
    summary = record["models"]["model"]
    assert summary["plans"] == 5
    assert summary["pick"] == max(record["plans"], key=lambda r: r["model"])["label"]


def test_the_runs_measured_pairs_change_the_plans_they_apply_to() -> None:
    case = _case(H100)
    assert len(case.interference) == 3  # efficientnet beside mobilenet, vit and mlp
    rows = {r["label"]: r for r in replay.replay_case(case)["plans"]}
    # a thread each: efficientnet overlaps the three it was measured beside, slower than modelled
    assert rows["streams"]["+pairs"] < rows["streams"]["model"]
    # a loop overlaps nothing: the pairs cannot apply
    assert rows["sequential"]["+pairs"] == pytest.approx(rows["sequential"]["model"])


def test_calibrated_predictions_are_judged_on_the_plans_the_calibration_did_not_run() -> None:
    case = _case(H100)
    loop = next(p for p in case.plans if p.label == "sequential")
    measured = PlanMeasurement("sequential", loop.slots, 8, 1.0, (loop.measured_sps,))
    calibrated_case = replace(case, calibration_plans=(measured,))
    record = replay.replay_case(calibrated_case)
    rows = {r["label"]: r for r in record["plans"]}
    assert rows["sequential"]["calibrated"] is None  # fitted on it: not judged on it
    # the loop's rule: time_scale = what +pairs predicts for the loop over what it measured
    scale = rows["sequential"]["+pairs"] / loop.measured_sps
    assert record["time_scales"]["time_scale"] == pytest.approx(scale)
    assert rows["streams"]["calibrated"] == pytest.approx(rows["streams"]["+pairs"] / scale, rel=0.02)
    assert record["models"]["calibrated"]["plans"] == 4


def test_model_summary_picks_the_highest_prediction_and_measures_its_regret() -> None:
    rows = [
        {"label": "a", "measured_sps": 100.0, "model": 90.0},
        {"label": "b", "measured_sps": 80.0, "model": 120.0},
        {"label": "c", "measured_sps": 50.0, "model": 60.0},
        {"label": "d", "measured_sps": 70.0, "model": None},
    ]
    summary = replay.model_summary(rows, "model")
    assert summary["plans"] == 3
    assert summary["pick"] == "b"
    assert summary["pick_regret"] == pytest.approx(0.2)  # b measured 80 against a's 100
    assert summary["median_abs_error"] == pytest.approx(0.2)  # 0.1, 0.5, 0.2
    assert summary["spearman"] == pytest.approx(0.5)
    assert replay.model_summary(rows, "then")["plans"] == 0


def test_unreadable_sources_say_what_is_missing(tmp_path: Path) -> None:
    bogus = tmp_path / "x.json"
    bogus.write_text(json.dumps({"kind": "packing", "cases": []}))
    with pytest.raises(InvalidInputError, match="names no profiles file"):
        replay.packing_cases(bogus)
    with pytest.raises(InvalidInputError, match="not a profiles file"):
        replay.load_profiles(bogus)
    with pytest.raises(InvalidInputError, match="no such profiles file"):
        replay.load_profiles(tmp_path / "missing.json")


def test_main_writes_json_and_png(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    assert replay.main(["--source", ":".join(str(replay.RESULTS / f) for f in H100), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    for key in ("kind", "date", "command", "device", "versions", "cases", "summary"):
        assert key in data
    assert data["cases"][0]["device"] == "NVIDIA H100 80GB HBM3"
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_result_renamed_with_its_profiles_finds_them(tmp_path: Path) -> None:
    # make gpu-check files "packing-b8.json" and "packing-b8-profiles.json" as
    # "<stamp>-<gpu>-packing-b8.json" and "<stamp>-<gpu>-packing-b8-profiles.json"; the result
    # still names "packing-b8-profiles.json"
    renamed = tmp_path / "20261128T0300-nvidia-h100-packing-b8.json"
    renamed.write_text("{}")
    (tmp_path / "20261128T0300-nvidia-h100-packing-b8-profiles.json").write_text("{}")
    assert replay.profiles_beside(renamed, "packing-b8-profiles.json").name == (
        "20261128T0300-nvidia-h100-packing-b8-profiles.json"
    )
    alone = tmp_path / "p.json"
    assert replay.profiles_beside(alone, "p-profiles.json") == tmp_path / "p-profiles.json"


def _all_recorded_cases() -> list[Any]:
    return [
        case
        for report, profiles in replay.SOURCES
        for case in replay.load_cases(replay.RESULTS / report, replay.RESULTS / profiles)
    ]


@pytest.mark.parametrize("case", _all_recorded_cases(), ids=lambda c: f"{c.source[:13]}-b{c.batch_size}")
def test_the_model_ranks_the_slot_kinds_as_the_gpus_measured_them(case: Any) -> None:
    # The lent H200 and H100 measured every plan of stream slots above every plan of worker
    # processes for the default ensemble at batch 1 and 8 (225-424 against 154-173 samples/s at
    # batch 8, 36-40 against 18 at batch 1). A change to the cost model that predicts otherwise
    # contradicts the GPU measurements there are.
    rows = replay.replay_case(case)["plans"]

    def kind_of(row: dict[str, Any]) -> str:
        kinds = {text.split(":")[0].split(" ")[0] for text in row["slots"]}
        return "stream" if kinds == {"stream"} else "worker" if "stream" not in kinds else "mixed"

    streams = [r for r in rows if kind_of(r) == "stream"]
    workers = [r for r in rows if kind_of(r) == "worker"]
    assert len(streams) >= 2 and len(workers) == 2
    assert min(r["measured_sps"] for r in streams) > max(r["measured_sps"] for r in workers)
    assert min(r["model"] for r in streams) > max(r["model"] for r in workers)


def test_an_older_packing_result_is_read_from_its_rows_with_the_profiles_given() -> None:
    cases = replay.load_cases(replay.RESULTS / PACKING[0], replay.RESULTS / PACKING[1])
    # the default ensemble at batch 1 and 8; the mixed-4 cases' members have no profiles here
    assert [(c.ensemble, c.batch_size) for c in cases] == [("default-large", 1), ("default-large", 8)]
    b8 = {p.label: p for p in cases[1].plans}
    assert b8["processes"].measured_sps == pytest.approx(159.7, abs=0.1)
    assert [s.thread_percentage for s in b8["mps"].slots] == [11.0, 13.0, 17.0, 52.0, 6.0]
    # at batch 1 auto chose the loop: the two rows share one run, counted once
    b1 = {p.label: p for p in cases[0].plans}
    assert set(b1) == {"sequential", "streams", "processes", "mps"} and b1["sequential"].runs == 1


def test_parse_slots_reads_what_packing_writes() -> None:
    slots = replay.parse_slots("stream: a, b; mps 14%: c; process 2t: d")
    assert [(s.kind, s.members, s.thread_percentage, s.cpu_threads) for s in slots] == [
        ("stream", ("a", "b"), None, None),
        ("mps", ("c",), 14.0, None),
        ("process", ("d",), None, 2),
    ]
    with pytest.raises(InvalidInputError, match="cannot read slots"):
        replay.parse_slots("thread: a")


def test_spearman_takes_ties_at_their_average_rank() -> None:
    assert replay._ranks([10.0, 30.0, 20.0, 30.0]) == [1.0, 3.5, 2.0, 3.5]
    assert replay._spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)
    assert replay._spearman([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    # scipy.stats.spearmanr([1, 2, 2, 4], [1, 3, 2, 4]) is 0.9486832980505138
    assert replay._spearman([1.0, 2.0, 2.0, 4.0], [1.0, 3.0, 2.0, 4.0]) == pytest.approx(0.9486832980505138)
    assert replay._spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def test_a_what_if_model_changes_the_fields_given_and_is_judged_like_the_others() -> None:
    assert replay.what_if_model(["time_slice_overhead=0.5", "trust_mps_overlap=true"]) == {
        "time_slice_overhead": 0.5,
        "trust_mps_overlap": True,
    }
    for bad, message in (
        ("bogus=1", "NAME one of"),
        ("time_scale=2", "NAME one of"),  # the calibration's, not a what-if
        ("time_slice_overhead=fast", "takes a number"),
        ("trust_mps_overlap=1", "true or false"),
        ("time_slice_overhead=-1", "must be >= 0"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            replay.what_if_model([bad])
    case = _case(replay.SOURCES[0])  # the H200
    record = replay.replay_case(case, {"time_slice_overhead": 0.0})
    rows = {r["label"]: r for r in record["plans"]}
    # without the time-slicing penalty, worker plans are predicted faster; the loop is unchanged
    assert rows["processes"]["what-if"] > rows["processes"]["model"]
    assert rows["sequential"]["what-if"] == pytest.approx(rows["sequential"]["model"])
    assert record["what_if"] == {"time_slice_overhead": 0.0}
    assert record["models"]["what-if"]["plans"] == 5
