"""Smoke run of ``benchmarks/packing.py``: it runs end to end on tiny sizes and writes its JSON and PNG.

Timings are never asserted: only that the script exits 0, that its JSON carries the metadata
every result carries (kind, date, command, device, versions), one record per case with the
per-strategy fields, auto's regret and the cost model's error, and that the PNG is a PNG.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from colocate import serde
from colocate.profiling.types import VariantProfiles
from tests.scripts import BENCHMARKS, load_script

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METADATA = ("kind", "date", "command", "device", "versions")
STRATEGY_FIELDS = (
    "strategy",
    "by_hand",
    "ran_as",
    "status",
    "reason",
    "slots",
    "measured_sps",
    "latency_p99_s",
    "speedup",
    "p99_ratio",
    "predicted_sps",
    "predicted_uncalibrated_sps",
    "throughput_error",
    "throughput_error_uncalibrated",
    "predicted_peak_memory_bytes",
    "measured_peak_memory_bytes",
    "memory_error",
)
PLANNER_FIELDS = (
    "best",
    "best_sps",
    "auto",
    "auto_sps",
    "regret",
    "round_spread",
    "regret_within_spread",
    "regret_uncalibrated",
    "calibrated",
    "model_error_before",
    "model_error_after",
    "memory_error",
)

pytestmark = pytest.mark.slow


def test_packing_smoke(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "packing.py"),
        "--smoke",
        "--device",
        "cpu",
        "--backends",
        "torch,onnxruntime",
        "--calibrate-pairs",
        "1",
    ]
    proc = subprocess.run(
        [*command, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, f"exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "planner quality" in proc.stdout
    assert "a Python loop over the members" in proc.stdout

    png = out.with_suffix(".png")
    assert png.is_file()
    assert png.read_bytes()[:8] == PNG_MAGIC

    data: dict[str, Any] = json.loads(out.read_text())
    for key in METADATA:
        assert key in data, f"result JSON has no '{key}'"
    assert data["kind"] == "packing"
    assert data["device"]["kind"] == "cpu"
    assert data["versions"]["python"] and data["versions"]["torch"]
    assert "--smoke" in data["command"]
    assert data["finished"] is True
    assert data["case_in_progress"] is None  # every case finished
    assert data["by_hand"]["streams"] == "one thread per member"

    cases = data["cases"]
    assert [(c["ensemble"], c["batch_size"]) for c in cases] == [("default", 1), ("mixed-2", 1)]
    for case in cases:
        names = [row["strategy"] for row in case["strategies"]]
        assert names == ["sequential", "streams", "auto", "auto+backends"]
        for row in case["strategies"]:
            for key in STRATEGY_FIELDS:
                assert key in row, f"{case['ensemble']}/{row['strategy']}: no '{key}'"
            assert row["status"] in ("ok", "errors", "failed", "rejected")
        baseline = case["strategies"][0]
        assert baseline["status"] == "ok", baseline["reason"]
        assert baseline["speedup"] == pytest.approx(1.0)
        for key in PLANNER_FIELDS:
            assert key in case["planner"], f"{case['ensemble']}: planner has no '{key}'"
        planner = case["planner"]
        assert planner["best"] is not None
        if planner["regret"] is not None:
            assert 0.0 <= planner["regret"] <= 1.0
        # the smoke runs two by-hand plans (a loop, a thread each): auto is measured against the better
        by_hand = {
            r["strategy"]: r["measured_sps"]
            for r in case["strategies"]
            if r["strategy"] in ("sequential", "streams")
        }
        if all(v is not None for v in by_hand.values()) and planner["auto_sps"] is not None:
            best_name = max(by_hand, key=lambda n: by_hand[n])
            assert planner["best_by_hand"] == best_name
            assert planner["best_by_hand_sps"] == by_hand[best_name]
            assert planner["auto_vs_by_hand"] == pytest.approx(planner["auto_sps"] / by_hand[best_name])
        assert planner["model_error_before"] is None or planner["model_error_before"] >= 0.0
        assert set(case["other_load"]) == {"cpu_s", "share", "top"}
        # auto+backends ran like the others; its row names the variants it chose, e.g. "mlp: onnxruntime"
        with_backends = case["strategies"][-1]
        assert with_backends["status"] in ("ok", "errors"), with_backends["reason"]
        assert with_backends["backends"] is not None
        assert planner["auto_backends_status"] == with_backends["status"]
        for key in ("regret_backends", "backends_vs_auto", "auto_backends_sps"):
            assert key in planner
        if planner["regret_backends"] is not None:
            assert 0.0 <= planner["regret_backends"] <= 1.0
        # the variants auto+backends chose were calibrated as they run, when the members were
        variants = case["calibration_backends"]
        assert case["calibration"]["ran"], case["calibration"]["error"]
        if with_backends["backends"] != "every member as given":
            assert variants is not None and variants.get("error") is None, variants
            assert variants["time_scale"] is not None
        # every plan run is listed as it ended: calibration's, then the comparison's distinct plans
        phases = [r["phase"] for r in case["runs"]]
        assert phases[0] == "calibration" and phases[-1] == "comparison"
        compared = {r["label"] for r in case["runs"] if r["phase"] == "comparison"}
        assert compared == {row["ran_as"] for row in case["strategies"] if row["ran_as"]}
        members = case["members"]
        assert len(members) == case["member_count"]
        assert len({m["name"] for m in members}) == len(members)
    assert len(data["summary"]["rows"]) == len(cases)
    assert "other_load_profiling" in data
    assert "suspect_profiles" in data
    assert data["backends"] == "torch,onnxruntime"
    assert data["variant_labels"] == ["torch", "onnxruntime"]

    # the profiles it planned from lie beside it, and every run has its structured plan, so the
    # cost model can be replayed on the run later: the replay reads both back
    assert data["profiles_file"] == "p-profiles.json"
    variants = serde.load(VariantProfiles, out.with_name(data["profiles_file"]))
    assert set(variants.labels) == {"torch", "onnxruntime"}
    for case in cases:
        for run in case["runs"]:
            texts = run["slots"].split("; ")
            assert len(texts) == len(run["plan_slots"])
            for text, slot in zip(texts, run["plan_slots"], strict=True):
                assert text.startswith(slot["kind"]) and text.endswith(": " + ", ".join(slot["members"]))
            assert isinstance(run["plan_backends"], list)
    replay = load_script("model_replay", BENCHMARKS)
    replay_out = tmp_path / "replay.json"
    assert replay.main(["--source", str(out), "--out", str(replay_out)]) == 0
    replayed = json.loads(replay_out.read_text())
    assert replayed["kind"] == "model-replay"
    assert [(c["ensemble"], c["batch_size"]) for c in replayed["cases"]] == [
        (c["ensemble_name"], c["batch_size"]) for c in cases
    ]
    for case in replayed["cases"]:
        assert case["plans"], case
        for row in case["plans"]:
            assert row["error"] is None, row
            assert row["model"] > 0 and row["measured_sps"] > 0
        assert case["models"]["model"]["plans"] == len(case["plans"])
    assert replay_out.with_suffix(".png").read_bytes()[:8] == PNG_MAGIC
