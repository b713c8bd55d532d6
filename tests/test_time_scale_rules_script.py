"""The replay of the calibration's time-scale rules on recorded packing results."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

from colocate import serde
from colocate.planning.types import PlanMeasurement, Slot, SlotKind
from tests.scripts import load_script


@pytest.fixture(scope="module")
def rules() -> ModuleType:
    return load_script("time_scale_rules")


def _plan(kind: SlotKind, slots: int, predicted: float, *rounds: float) -> dict[str, object]:
    """A calibration's plan measurement as a result JSON records it."""
    layout = tuple(Slot(f"s{i}", kind, (f"m{i}",)) for i in range(slots))
    recorded: dict[str, object] = serde.to_dict(PlanMeasurement("p", layout, 1, predicted, rounds))
    return recorded


def _case() -> dict[str, object]:
    """The lent H100's batch-1 case in miniature: the loop as predicted, processes 10x."""
    return {
        "ensemble_name": "mini",
        "batch_size": 1,
        "calibration": {
            "plans": [
                _plan("stream", 1, 40.0, 40.0, 40.0),
                _plan("stream", 4, 40.0, 20.0),
                _plan("process", 4, 10.0, 100.0),
            ]
        },
        "strategies": [
            {
                "strategy": "sequential",
                "slots": "stream: a, b",
                "measured_sps": 40.0,
                "predicted_uncalibrated_sps": 40.0,
            },
            {
                "strategy": "processes",
                "slots": "process: a; process: b",
                "measured_sps": 100.0,
                "predicted_uncalibrated_sps": 10.0,
            },
            {
                "strategy": "streams",
                "slots": "stream: a; stream: b",
                "measured_sps": 20.0,
                "predicted_uncalibrated_sps": 40.0,
            },
            {
                "strategy": "auto",
                "slots": "stream: a, b",
                "measured_sps": 40.0,
                "predicted_uncalibrated_sps": 40.0,
            },
        ],
    }


def test_the_rules_take_their_scales_from_the_plans_they_name(rules: ModuleType) -> None:
    plans = rules.measurements(_case()["calibration"]["plans"])  # type: ignore[index]
    assert rules.scales(plans, "all") == (1.0, 1.0, 1.0)  # median of 1, 2, 0.1
    assert rules.scales(plans, "streams") == (pytest.approx(1.5), pytest.approx(0.1 / 1.5), 1.0)
    assert rules.scales(plans, "loop") == (1.0, pytest.approx(0.1), 1.0)
    # colocate's rule: the four stream slots ran at half their prediction beside the loop
    assert rules.scales(plans, "current") == (1.0, pytest.approx(0.1), pytest.approx(2.0))
    assert rules.scales([], "loop") == (1.0, 1.0, 1.0)
    assert rules.scales([], "current") == (1.0, 1.0, 1.0)


def test_case_errors_and_the_json(rules: ModuleType, tmp_path: Path) -> None:
    errors = rules.case_errors(_case())
    assert errors is not None and errors["case"] == "mini b1"
    # sequential exact under every rule but "streams"; processes 90 % low uncalibrated and with
    # one median, exact with the loop and the worker factor; streams 100 % high until the third
    # factor; auto is left out
    assert errors["uncalibrated"] == pytest.approx(0.9)  # median of 0, 0.9, 1.0
    assert errors["all"] == pytest.approx(0.9)
    assert errors["loop"] == pytest.approx(0.0)  # median of 0, 0, 1.0
    assert errors["current"] == pytest.approx(0.0)
    source = tmp_path / "p.json"
    source.write_text(json.dumps({"cases": [_case()]}))
    out = tmp_path / "rules.json"
    assert rules.main([str(source), "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["kind"] == "time-scale-rules" and written["device"] is None
    assert written["summary"]["current"]["median"] == pytest.approx(0.0)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"cases": []}))
    assert rules.main([str(empty)]) == 1
