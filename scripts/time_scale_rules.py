#!/usr/bin/env python3
"""Replay the calibration's time-scale rules on recorded packing runs (no device needed).

Each case of a ``benchmarks/packing.py`` result records the plans its calibration measured
(predicted and measured samples/s) and, per strategy, the uncalibrated prediction and the
measured throughput. This script asks, for each rule that turns those plan measurements into
the cost model's time scales, how far the strategies' predictions would then have been from
what they measured: the median absolute error per case, then the median and mean over cases.

The rules:

* ``all``: one scale, the median of predicted over measured over every measured plan (the
  rule before 2026-11-27 20:30 UTC).
* ``streams``: the scale from the plans of stream slots only, and a second factor for the
  members in worker slots (process, mps) from the plans of worker slots only.
* ``loop``: as ``streams``, but the scale from the one-slot plan holding every member (a
  Python loop) when it was measured: its prediction involves no concurrency model, so its
  ratio is only how fast the members run now (colocate's rule from 20:30 to 23:00 UTC).
* ``current``: as ``loop``, and a third factor for the members in a stream slot beside other
  slots, from the plans of several stream slots, when the loop was measured
  (``comparison._time_scales``: the rule colocate uses now).

Scaling an uncalibrated prediction by the factors is a linear approximation: the cost model
also has fixed costs (dispatch, combine) that the scales do not stretch. Strategies that mix
stream and worker slots, and ``auto`` (whose calibrated plan can differ from its
uncalibrated one), are left out; ``auto+backends`` is taken with the variants' calibration.

    python3 scripts/time_scale_rules.py benchmarks/results/*packing*.json [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from colocate import serde
from colocate.comparison import _predicted_over_measured, _time_scales
from colocate.planning.types import PlanMeasurement

RULES = ("all", "streams", "loop", "current")


def measurements(plans: Sequence[dict[str, Any]]) -> list[PlanMeasurement]:
    """A calibration's plans as recorded in a result JSON, read back."""
    return [serde.from_dict(PlanMeasurement, plan) for plan in plans]


def scales(plans: Sequence[PlanMeasurement], rule: str) -> tuple[float, float, float]:
    """``(time_scale, worker_time_scale, stream_time_scale)`` that ``rule`` takes from a
    calibration's plans.

    ``current`` is colocate's own rule (``comparison._time_scales``); ``all``, ``streams`` and
    ``loop`` are the earlier ones, kept here to compare against (``loop`` is ``current``
    without the third factor).
    """
    if rule == "current":
        return _time_scales(plans)  # a TimeScales, which is that tuple
    if rule == "loop":
        time_scale, worker_time_scale, _ = _time_scales(plans)
        return time_scale, worker_time_scale, 1.0

    every = _predicted_over_measured(plans)
    if not every:
        return 1.0, 1.0, 1.0
    streams = _predicted_over_measured([p for p in plans if all(s.kind == "stream" for s in p.slots)])
    if rule == "all" or not streams:
        return statistics.median(every), 1.0, 1.0
    workers = _predicted_over_measured([p for p in plans if all(s.kind != "stream" for s in p.slots)])
    time_scale = statistics.median(streams)
    return time_scale, (statistics.median(workers) / time_scale if workers else 1.0), 1.0


def case_errors(case: dict[str, Any]) -> dict[str, Any] | None:
    """The median absolute error per rule for one case (None when it has nothing to compare)."""
    plans = measurements((case.get("calibration") or {}).get("plans") or [])
    variant_plans = measurements((case.get("calibration_backends") or {}).get("plans") or [])
    by_rule = {rule: scales(plans, rule) for rule in RULES}
    variant_by_rule = {rule: scales(variant_plans, rule) for rule in RULES}
    errors: dict[str, list[float]] = {"uncalibrated": [], **{rule: [] for rule in RULES}}
    for row in case["strategies"]:
        measured, predicted = row.get("measured_sps"), row.get("predicted_uncalibrated_sps")
        name = row["strategy"]
        if not measured or not predicted or (name.startswith("auto") and not row.get("backends")):
            continue
        slots = row.get("slots") or ""
        worker = "process" in slots or "mps" in slots
        if worker and "stream" in slots:
            continue
        side_by_side = not worker and slots.count("stream") > 1
        with_backends = bool(row.get("backends"))
        if not (variant_plans if with_backends else plans):
            continue
        errors["uncalibrated"].append(abs(predicted / measured - 1.0))
        for rule in RULES:
            time_scale, worker_scale, stream_scale = (variant_by_rule if with_backends else by_rule)[rule]
            calibrated = predicted / time_scale / (worker_scale if worker else 1.0)
            calibrated /= stream_scale if side_by_side else 1.0
            errors[rule].append(abs(calibrated / measured - 1.0))
    if not errors["uncalibrated"]:
        return None
    return {
        "case": f"{case.get('ensemble_name', case.get('ensemble'))} b{case['batch_size']}",
        **{key: statistics.median(values) for key, values in errors.items()},
        **{f"scales_{rule}": by_rule[rule] for rule in RULES},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="packing result JSON files")
    parser.add_argument("--json", type=Path, default=None, help="write the per-case errors here")
    args = parser.parse_args(argv)
    rows = []
    for path in args.results:
        for case in json.loads(path.read_text()).get("cases", []):
            errors = case_errors(case)
            if errors is not None:
                rows.append({"file": path.name, **errors})
    if not rows:
        print("no case with calibrated plans and measured strategies", file=sys.stderr)
        return 1
    columns = ("uncalibrated", *RULES)
    print(f"{'file':44} {'case':22} " + " ".join(f"{c:>12}" for c in columns))
    for row in rows:
        print(f"{row['file'][:44]:44} {row['case'][:22]:22} " + " ".join(f"{row[c]:12.0%}" for c in columns))
    summary = {
        c: {"median": statistics.median(r[c] for r in rows), "mean": statistics.mean(r[c] for r in rows)}
        for c in columns
    }
    print(
        f"{len(rows)} cases; median of the cases' median errors: "
        + ", ".join(f"{c} {summary[c]['median']:.0%}" for c in columns)
        + "; mean: "
        + ", ".join(f"{c} {summary[c]['mean']:.0%}" for c in columns)
    )
    if args.json:
        command = "python3 scripts/time_scale_rules.py " + " ".join(str(p) for p in args.results)
        result = {
            "kind": "time-scale-rules",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "device": None,  # a replay of recorded results: nothing ran on a device
            "summary": summary,
            "cases": rows,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
