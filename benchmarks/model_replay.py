#!/usr/bin/env python3
"""Replay the cost model on recorded runs: predict every measured plan again, without the device.

    python benchmarks/model_replay.py                       # the recorded GPU runs (see SOURCES)
    python benchmarks/model_replay.py --source benchmarks/results/X-packing.json
    python benchmarks/model_replay.py --source R-compare-report.json:R-profile-default-ensemble.json

A lent GPU is rare, and every plan it ran is a measurement the cost model can be checked
against long after: this script takes a run's recorded plans (their slots, variants and
measured samples/s) and the profiles that run planned from, and asks today's cost model what
it predicts for each. Per case (a run at one batch size) it reports, for each model below, the
median of ``|predicted - measured| / measured``, Spearman's rank correlation between predicted
and measured throughput, and the model's pick: the measured plan it predicts fastest, and its
regret (how far that plan measured behind the best measured plan). The pick is what matters for
planning; the error also holds how much slower or faster the machine ran than when profiled.

- ``then``: the prediction recorded with the run (the cost model of that day, calibrated as
  the run was).
- ``model``: today's cost model, uncalibrated.
- ``+pairs``: today's model with the member pairs the run measured (its interference table).
- ``calibrated``: ``+pairs`` with the time scales (``comparison._time_scales``) fitted on the
  plans the run's calibration measured, each predicted again by ``+pairs``, and judged on the
  other plans only (held out; ``n/a`` when the calibration measured every plan or none).
- ``what-if`` (with ``--what-if NAME=VALUE``, repeatable): ``+pairs`` with those
  :class:`~colocate.planning.CostModel` fields changed, to try a constant on every recorded
  run before changing it, e.g. ``--what-if time_slice_overhead=0.5``.

Sources:

- a ``benchmarks/packing.py`` result: its ``profiles_file`` (written beside it since
  2026-11-28) and the structured slots of every plan run (``runs[].plan_slots``); an older
  result takes its profiles file after a colon (``RESULT:PROFILES``), and its strategies' rows
  (slots read from their text, MPS shares rounded to whole percent) and calibration plans,
  for the cases whose members those profiles cover;
- a ``colocate compare`` report (``*-compare-report.json``) with a profiles file given after a
  colon: a ProfileSet / VariantProfiles JSON or a ``benchmarks/profile_default_ensemble.py``
  result (its fp32 profiles). The recorded GPU reports were profiled again by the comparison
  itself, minutes after the gpu-check's profiles used here, on the same machine.

Without ``--source`` it replays :data:`SOURCES` (the GPU runs recorded before packing results
carried their profiles) and every GPU packing result under ``benchmarks/results/`` that names
its profiles file (``--cpu`` adds the CPU ones). Writes JSON (default
``benchmarks/results/<UTC stamp>-model-replay.json``) and a PNG beside it: predicted against
measured samples/s per model.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, save_figure, write_result
from colocate import devices, serde
from colocate.comparison import _time_scales
from colocate.devices import Device
from colocate.errors import ColocateError, InvalidInputError
from colocate.planning import CostModel, member_demands
from colocate.planning.types import MemberBackend, PlanMeasurement, Slot
from colocate.profiling.types import ProfileSet, VariantProfiles
from colocate.report import Calibration, PairMeasurement, Report

KIND = "model-replay"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ("then", "model", "+pairs", "calibrated")
WHAT_IF = "what-if"  # +pairs with the CostModel fields given by --what-if
# GPU comparisons recorded before packing results carried their profiles: (report, profiles of
# the same gpu-check, minutes earlier on the same machine)
SOURCES: tuple[tuple[str, str], ...] = (
    (
        "20261127T0537-nvidia-h200-compare-report.json",
        "20261127T0537-nvidia-h200-profile-default-ensemble.json",
    ),
    (
        "20261127T0801-nvidia-h100-80gb-hbm3-compare-report.json",
        "20261127T0801-nvidia-h100-80gb-hbm3-profile-default-ensemble.json",
    ),
    # its default-ensemble cases (batch 1, 8, 64); its mixed-4 members were not kept
    (
        "20261127T0801-nvidia-h100-80gb-hbm3-packing.json",
        "20261127T0801-nvidia-h100-80gb-hbm3-profile-default-ensemble.json",
    ),
)


@dataclass(frozen=True)
class MeasuredPlan:
    """One layout a run measured: the median of its runs (a layout can run in several phases)."""

    label: str  # the name it first ran under
    phases: tuple[str, ...]  # "comparison", "calibration", ...
    slots: tuple[Slot, ...]
    backends: tuple[MemberBackend, ...]
    measured_sps: float
    runs: int
    predicted_then_sps: float | None


@dataclass(frozen=True)
class Case:
    """A run at one batch size: its measured plans, what its calibration measured, its profiles."""

    source: str
    profiles_source: str
    ensemble: str
    device: Device
    batch_size: int
    profiles: ProfileSet | VariantProfiles
    plans: tuple[MeasuredPlan, ...]
    interference: dict[Any, float] = field(default_factory=dict)
    calibration_plans: tuple[PlanMeasurement, ...] = ()


# --- reading recorded runs -------------------------------------------------------------------------


def load_profiles(path: Path) -> ProfileSet | VariantProfiles:
    """A ProfileSet / VariantProfiles file, or a profile_default_ensemble.py result (fp32)."""
    if not path.is_file():
        raise InvalidInputError(f"{path}: no such profiles file")
    data = json.loads(path.read_text())
    if data.get("type") == "VariantProfiles":
        return serde.load(VariantProfiles, path)
    if data.get("type") == "ProfileSet":
        return serde.load(ProfileSet, path)
    runs = data.get("runs")
    if isinstance(runs, dict) and runs:
        run = runs.get("fp32") or next(iter(runs.values()))
        return serde.from_dict(ProfileSet, run["profile_set"], where=str(path))
    raise InvalidInputError(
        f"{path}: not a profiles file (a ProfileSet or VariantProfiles JSON, or a "
        "benchmarks/profile_default_ensemble.py result)"
    )


def _layout_key(slots: Sequence[Slot], backends: Sequence[MemberBackend]) -> tuple[Any, ...]:
    return (
        tuple((s.kind, s.members, s.thread_percentage, s.cpu_threads) for s in slots),
        tuple(sorted((b.member, b.label) for b in backends if b.label != b.default)),
    )


Row = tuple[str, str, tuple[Slot, ...], tuple[MemberBackend, ...], float, float | None]


def _merge(rows: Sequence[Row]) -> tuple[MeasuredPlan, ...]:
    """(label, phase, slots, backends, measured, predicted then) rows -> one plan per layout,
    measured as the median of its runs, of the plans that run every member."""
    # only plans of every member: a calibration's pair runs (one or two members) are left out
    everyone = max(
        (frozenset(m for s in row[2] for m in s.members) for row in rows), key=len, default=frozenset()
    )
    grouped: dict[tuple[Any, ...], list[Any]] = {}
    for row in rows:
        if frozenset(m for s in row[2] for m in s.members) == everyone:
            grouped.setdefault(_layout_key(row[2], row[3]), []).append(row)
    plans = []
    for items in grouped.values():
        first = items[0]
        phases = tuple(dict.fromkeys(item[1] for item in items))
        plans.append(
            MeasuredPlan(
                label=first[0],
                phases=phases,
                slots=first[2],
                backends=first[3],
                measured_sps=float(statistics.median(item[4] for item in items)),
                runs=len(items),
                predicted_then_sps=first[5] or None,  # 0: a plan made to measure, never predicted
            )
        )
    return tuple(plans)


def report_cases(report_path: Path, profiles_path: Path) -> list[Case]:
    """The case of a ``colocate compare`` report: its plans that ran, and its calibration."""
    report = serde.load(Report, report_path)
    profiles = load_profiles(profiles_path)
    rows = [
        (
            r.name,
            "comparison",
            r.plan.slots,
            r.plan.backends,
            r.run.throughput_sps,
            r.plan.prediction.throughput_sps,
        )
        for r in report.results
        if r.plan is not None and r.run is not None and r.run.status != "failed" and r.run.throughput_sps > 0
    ]
    calibration = report.calibration
    calibration_plans = calibration.measured_plans() if calibration is not None else ()
    rows += [
        (p.name, "calibration", p.slots, (), float(p.measured_sps or 0.0), p.predicted_sps)
        for p in calibration_plans
    ]
    return [
        Case(
            source=report_path.name,
            profiles_source=profiles_path.name,
            ensemble=report.ensemble,
            device=report.device,
            batch_size=report.batch_size,
            profiles=profiles,
            plans=_merge(rows),
            interference=calibration.interference() if calibration is not None else {},
            calibration_plans=calibration_plans,
        )
    ]


def profiles_beside(result: Path, recorded_name: str) -> Path:
    """The profiles file of a packing result: ``<its stem>-profiles.json`` when it lies beside
    it (a result and its profiles renamed together, as ``make gpu-check`` does when it files
    them under benchmarks/results/), else the name the result recorded."""
    renamed = result.with_name(f"{result.stem}-profiles.json")
    return renamed if renamed.is_file() else result.with_name(recorded_name)


def parse_slots(text: str) -> tuple[Slot, ...]:
    """Slots from the text a packing result's rows give (``"stream: a, b; mps 14%: c"``); an mps
    share comes back rounded to a whole percent, as the text has it."""
    slots = []
    for i, part in enumerate(text.split("; ")):
        head, _, members = part.partition(": ")
        words = head.split(" ")
        share = next((float(w[:-1]) for w in words[1:] if w.endswith("%")), None)
        threads = next((int(w[:-1]) for w in words[1:] if w.endswith("t")), None)
        if words[0] not in ("stream", "process", "mps") or not members:
            raise InvalidInputError(f"cannot read slots from {text!r}")
        slots.append(
            Slot(f"s{i}", words[0], tuple(members.split(", ")), thread_percentage=share, cpu_threads=threads)  # type: ignore[arg-type]
        )
    return tuple(slots)


def _rows_from_strategies(record: dict[str, Any], calibration: Calibration) -> list[Row]:
    """A result written before runs carried their plans: its strategies' rows (slots read from
    their text, members as given) and its calibration's plans."""
    rows: list[Row] = []
    seen: set[str] = set()
    for row in record.get("strategies", []):
        measured = row.get("measured_sps")
        if not measured or row.get("backends") not in (None, "every member as given"):
            continue
        if row["ran_as"] in seen:
            continue  # strategies that gave the same slots share one run
        seen.add(row["ran_as"])
        rows.append(
            (
                row["ran_as"] or row["strategy"],
                "comparison",
                parse_slots(row["slots"]),
                (),
                float(measured),
                row.get("predicted_sps"),
            )
        )
    for measurement in calibration.plans:
        if measurement.measured_sps:
            rows.append(
                (
                    measurement.name,
                    "calibration",
                    measurement.slots,
                    (),
                    measurement.measured_sps,
                    measurement.predicted_sps,
                )
            )
    return rows


def packing_cases(path: Path, profiles_path: Path | None = None) -> list[Case]:
    """The cases of a ``benchmarks/packing.py`` result, from the profiles file it names, or from
    ``profiles_path`` (for results written before they named one: the cases whose members those
    profiles cover)."""
    data = json.loads(path.read_text())
    if data.get("kind") != "packing":
        raise InvalidInputError(f"{path}: not a benchmarks/packing.py result (kind {data.get('kind')!r})")
    name = data.get("profiles_file")
    if profiles_path is None and not name:
        raise InvalidInputError(
            f"{path}: names no profiles file (packing results carry one since 2026-11-28); give the "
            "profiles the run planned from as RESULT:PROFILES"
        )
    if profiles_path is None:
        profiles_path = profiles_beside(path, name)
    profiles = load_profiles(profiles_path)
    device = serde.from_dict(Device, data["device"], where=str(path))
    cases = []
    records = list(data.get("cases", []))
    if data.get("case_in_progress"):
        records.append(data["case_in_progress"])  # a run cut short: the runs it finished
    for record in records:
        rows: list[Row] = []
        for run in record.get("runs", []):
            measured = run.get("measured_sps")
            if "plan_slots" not in run or not measured or run.get("status") == "failed":
                continue
            slots = serde.from_dict(tuple[Slot, ...], run["plan_slots"], where=str(path))
            backends = serde.from_dict(tuple[MemberBackend, ...], run["plan_backends"], where=str(path))
            rows.append(
                (run["label"], run["phase"], slots, backends, float(measured), run.get("predicted_sps"))
            )
        recorded = record.get("calibration") or {}
        calibration = Calibration(
            ensemble=record.get("ensemble_name") or record.get("ensemble", "?"),
            device=device,
            batch_size=int(record["batch_size"]),
            pairs=serde.from_dict(tuple[PairMeasurement, ...], recorded.get("pairs") or [], where=str(path)),
            plans=serde.from_dict(tuple[PlanMeasurement, ...], recorded.get("plans") or [], where=str(path)),
        )
        if not rows:
            rows = _rows_from_strategies(record, calibration)
        covered = set(profiles.members)
        if not all(m in covered for row in rows for slot in row[2] for m in slot.members):
            continue  # members these profiles do not have (another ensemble of the run)
        if rows:
            cases.append(
                Case(
                    source=path.name,
                    profiles_source=profiles_path.name,
                    ensemble=calibration.ensemble,
                    device=device,
                    batch_size=calibration.batch_size,
                    profiles=profiles,
                    plans=_merge(rows),
                    interference=calibration.interference(),
                    calibration_plans=calibration.measured_plans(),
                )
            )
    return cases


def discover(include_cpu: bool) -> list[tuple[Path, Path | None]]:
    """:data:`SOURCES`, then every packing result under benchmarks/results/ with a profiles file."""
    found: list[tuple[Path, Path | None]] = [(RESULTS / r, RESULTS / p) for r, p in SOURCES]
    for path in sorted(RESULTS.glob("*-packing*.json")):
        if path.name.endswith("-profiles.json"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if data.get("profiles_file") and (include_cpu or data.get("device", {}).get("kind") != "cpu"):
            found.append((path, None))
    return found


def load_cases(source: Path, profiles: Path | None) -> list[Case]:
    """The cases of one source: a packing result, or a compare report with ``profiles``."""
    if profiles is not None and json.loads(source.read_text()).get("kind") == "packing":
        return packing_cases(source, profiles)
    if profiles is not None:
        return report_cases(source, profiles)
    return packing_cases(source)


# --- predicting ------------------------------------------------------------------------------------


def _profiles_for(case: Case, backends: Sequence[MemberBackend]) -> ProfileSet:
    if isinstance(case.profiles, ProfileSet):
        return case.profiles
    return case.profiles.for_assignment({b.member: b.label for b in backends})


def predict(model: CostModel, case: Case, slots: Sequence[Slot], backends: Sequence[MemberBackend]) -> float:
    """``model``'s throughput for ``slots`` from the case's profiles (the variants ``backends`` chose)."""
    members = [m for s in slots for m in s.members]
    demands = member_demands(members, case.device, _profiles_for(case, backends), case.batch_size)
    return model.predict(slots, demands).throughput_sps


def calibrated_model(case: Case, paired: CostModel) -> CostModel | None:
    """``paired`` with the time scales fitted, by today's rule, on the case's calibration plans."""
    if not case.calibration_plans:
        return None
    again = [replace(p, predicted_sps=predict(paired, case, p.slots, ())) for p in case.calibration_plans]
    scales = _time_scales(again)
    return replace(
        paired,
        time_scale=scales.time_scale,
        worker_time_scale=scales.worker_time_scale,
        stream_time_scale=scales.stream_time_scale,
    )


def _ranks(values: Sequence[float]) -> list[float]:
    """Ranks from 1, ties given the average of the ranks they span."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def _spearman(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Spearman's rank correlation (numpy only: scipy is not installed where this runs)."""
    if len(predicted) < 3 or len(set(predicted)) < 2 or len(set(measured)) < 2:
        return None
    import numpy as np

    return float(np.corrcoef(_ranks(predicted), _ranks(measured))[0, 1])


def model_summary(plans: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """Median |error|, rank correlation and pick (with its regret) of one model over a case's plans."""
    judged = [p for p in plans if p.get(key) is not None]
    if not judged:
        return {"plans": 0, "median_abs_error": None, "spearman": None, "pick": None, "pick_regret": None}
    best = max(p["measured_sps"] for p in judged)
    pick = max(judged, key=lambda p: p[key])
    return {
        "plans": len(judged),
        "median_abs_error": float(statistics.median(abs(p[key] / p["measured_sps"] - 1.0) for p in judged)),
        "spearman": _spearman([p[key] for p in judged], [p["measured_sps"] for p in judged]),
        "pick": pick["label"],
        "pick_regret": (best - pick["measured_sps"]) / best,
    }


def what_if_model(settings: Sequence[str]) -> dict[str, float | bool]:
    """``["time_slice_overhead=1.0", "trust_mps_overlap=true"]`` -> CostModel field values, checked."""
    numeric = {
        f.name: f.type
        for f in fields(CostModel)
        if f.name not in ("interference", "time_scale", "worker_time_scale", "stream_time_scale")
    }
    chosen: dict[str, float | bool] = {}
    for setting in settings:
        name, _, text = setting.partition("=")
        name = name.strip()
        if name not in numeric or not text:
            raise InvalidInputError(
                f"--what-if {setting!r}: give NAME=VALUE with NAME one of {', '.join(sorted(numeric))}"
            )
        if "bool" in str(numeric[name]):
            if text.strip().lower() not in ("true", "false"):
                raise InvalidInputError(f"--what-if {setting!r}: {name} is true or false")
            chosen[name] = text.strip().lower() == "true"
        else:
            try:
                chosen[name] = float(text)
            except ValueError:
                raise InvalidInputError(f"--what-if {setting!r}: {name} takes a number") from None
    CostModel(**chosen)  # type: ignore[arg-type]  # its own checks (ranges)
    return chosen


def replay_case(case: Case, what_if: Mapping[str, float | bool] | None = None) -> dict[str, Any]:
    """Every measured plan of ``case`` predicted by each model, and each model's summary;
    ``what_if``: CostModel fields for one more model, ``what-if`` (``+pairs`` with those)."""
    base = CostModel()
    paired = replace(base, interference=case.interference) if case.interference else None
    alternative = replace(paired or base, **what_if) if what_if else None  # type: ignore[arg-type]
    keys = (*MODELS, WHAT_IF) if alternative is not None else MODELS
    calibrated = calibrated_model(case, paired or base)
    calibrated_on = {_layout_key(p.slots, ()) for p in case.calibration_plans}
    rows = []
    for plan in case.plans:
        row: dict[str, Any] = {
            "label": plan.label,
            "phases": list(plan.phases),
            "slots": [f"{s.kind}{_share(s)}: {', '.join(s.members)}" for s in plan.slots],
            "backends": {b.member: b.label for b in plan.backends if b.label != b.default},
            "runs": plan.runs,
            "measured_sps": plan.measured_sps,
            "then": plan.predicted_then_sps,
            "error": None,
        }
        try:
            row["model"] = predict(base, case, plan.slots, plan.backends)
            row["+pairs"] = predict(paired, case, plan.slots, plan.backends) if paired is not None else None
            held_out = _layout_key(plan.slots, plan.backends) not in calibrated_on
            row["calibrated"] = (
                predict(calibrated, case, plan.slots, plan.backends)
                if calibrated is not None and held_out
                else None
            )
            if alternative is not None:
                row[WHAT_IF] = predict(alternative, case, plan.slots, plan.backends)
        except ColocateError as exc:
            row.update({key: None for key in keys if key != "then"} | {"error": str(exc)})
        rows.append(row)
    return {
        "source": case.source,
        "profiles": case.profiles_source,
        "ensemble": case.ensemble,
        "device": case.device.name,
        "batch_size": case.batch_size,
        "pairs": len(case.interference),
        "calibration_plans": len(case.calibration_plans),
        "time_scales": (
            {
                "time_scale": calibrated.time_scale,
                "worker_time_scale": calibrated.worker_time_scale,
                "stream_time_scale": calibrated.stream_time_scale,
            }
            if calibrated is not None
            else None
        ),
        "plans": rows,
        "what_if": dict(what_if) if what_if else None,
        "models": {key: model_summary(rows, key) for key in keys},
    }


def _share(slot: Slot) -> str:
    return f" {slot.thread_percentage:.0f}%" if slot.thread_percentage is not None else ""


# --- output ----------------------------------------------------------------------------------------


def _num(value: float | None, spec: str = ",.1f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def print_case(console: Any, case: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(
        title=(
            f"{case['ensemble']} on {case['device']}, batch {case['batch_size']} "
            f"({case['source']}; {case['pairs']} measured pair(s), "
            f"{case['calibration_plans']} calibration plan(s))"
        )
    )
    keys = list(case["models"])
    for column in ("plan", "slots", "runs", "measured", *keys):
        table.add_column(column, justify="left" if column in ("plan", "slots") else "right")
    for row in sorted(case["plans"], key=lambda r: -r["measured_sps"]):
        cells = []
        for key in keys:
            value = row.get(key)
            cells.append("-" if value is None else f"{value:,.1f} ({value / row['measured_sps'] - 1.0:+.0%})")
        table.add_row(
            row["label"] + ("" if row["error"] is None else f" [red]{row['error']}[/red]"),
            "; ".join(row["slots"])
            + (f" [{', '.join(f'{m}: {b}' for m, b in row['backends'].items())}]" if row["backends"] else ""),
            str(row["runs"]),
            _num(row["measured_sps"]),
            *cells,
        )
    console.print(table)


SUMMARY_COLUMNS = ("case", "model", "plans", "median |error|", "Spearman", "pick", "pick's regret")


def summary_rows(cases: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for case in cases:
        label = f"{case['device']} {case['ensemble']} b{case['batch_size']}"
        for key, s in case["models"].items():
            if not s["plans"]:
                continue
            rows.append(
                [
                    label,
                    key,
                    str(s["plans"]),
                    _pct(s["median_abs_error"]),
                    _num(s["spearman"], ".2f"),
                    s["pick"] or "-",
                    _pct(s["pick_regret"]),
                ]
            )
            label = ""
    return rows


def plot(cases: Sequence[dict[str, Any]], path: Path) -> Path:
    """Predicted against measured samples/s, one panel per model, one colour per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, ScalarFormatter

    # on a log axis label the minor ticks at 2 and 5 (x 10^k) only, so the labels do not collide
    minor = FuncFormatter(lambda value, _: f"{value:.0f}" if f"{value:.0f}"[0] in "25" else "")

    every = list(dict.fromkeys(key for case in cases for key in case["models"]))
    shown = [key for key in every if any(r.get(key) for c in cases for r in c["plans"])] or ["model"]
    fig, axes = plt.subplots(1, len(shown), figsize=(4.4 * len(shown), 4.6), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key in zip(axes[0], shown, strict=True):
        low, high = float("inf"), 0.0
        for i, case in enumerate(cases):
            points = [(r["measured_sps"], r[key]) for r in case["plans"] if r.get(key)]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            low, high = min(low, *xs, *ys), max(high, *xs, *ys)
            ax.scatter(
                xs,
                ys,
                s=22,
                color=colours[i % len(colours)],
                label=f"{case['device'].replace('NVIDIA ', '')} {case['ensemble']} b{case['batch_size']}",
            )
        if high > 0:
            span = (low * 0.8, high * 1.25)
            ax.plot(span, span, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlim(*span)
            ax.set_ylim(*span)
            for axis in (ax.xaxis, ax.yaxis):
                axis.set_major_formatter(ScalarFormatter())
                axis.set_minor_formatter(minor)
        ax.set_title(key)
        ax.set_xlabel("measured samples/s")
        ax.set_ylabel("predicted samples/s")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8)
    fig.suptitle("cost model replayed on recorded runs: predicted vs measured throughput")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    return save_figure(fig, path)


# --- main ------------------------------------------------------------------------------------------


def _source(text: str) -> tuple[Path, Path | None]:
    # a colon separates a compare report from its profiles; paths here have no colons
    report, _, profiles = text.partition(":")
    return Path(report), (Path(profiles) if profiles else None)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="RESULT[:PROFILES]",
        help="a packing result (it names its profiles file), or a compare report and its profiles "
        "file; repeat for several (default: the recorded GPU runs)",
    )
    parser.add_argument("--cpu", action="store_true", help="with no --source: the CPU packing results too")
    parser.add_argument(
        "--out", default=None, help="result JSON (default benchmarks/results/<stamp>-model-replay.json)"
    )
    parser.add_argument(
        "--what-if",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="one more model: +pairs with this CostModel field changed (repeat for several), e.g. "
        "time_slice_overhead=0.5 or trust_mps_overlap=true",
    )
    args = parser.parse_args(argv)
    try:
        what_if = what_if_model(args.what_if)
    except InvalidInputError as exc:
        parser.error(str(exc))

    from rich.console import Console

    console = Console(width=200)
    sources = [_source(s) for s in args.source] if args.source else discover(args.cpu)
    replayed: list[dict[str, Any]] = []
    for source, profiles in sources:
        try:
            cases = load_cases(source, profiles)
        except (ColocateError, OSError, ValueError, KeyError) as exc:
            raise SystemExit(f"model_replay: cannot read {source}: {exc}") from exc
        for case in cases:
            record = replay_case(case, what_if)
            print_case(console, record)
            replayed.append(record)
    if not replayed:
        raise SystemExit("model_replay: no measured plans to replay in the sources given")

    from rich.table import Table

    summary = Table(
        title="the cost model on recorded runs (regret: the model's pick against the best measured)"
    )
    for column in SUMMARY_COLUMNS:
        summary.add_column(column, justify="left" if column in ("case", "model", "pick") else "right")
    for row in summary_rows(replayed):
        summary.add_row(*row)
    console.print(summary)

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M")
    out = Path(args.out) if args.out else RESULTS / f"{stamp}-model-replay.json"
    write_result(
        out,
        KIND,
        devices.find_device("cpu"),  # the machine that replayed; each case names its own device
        {
            "sources": [[str(s), str(p) if p else None] for s, p in sources],
            "models": list(MODELS) + ([WHAT_IF] if what_if else []),
            "what_if": what_if or None,
            "cases": replayed,
            "summary": {"columns": list(SUMMARY_COLUMNS), "rows": summary_rows(replayed)},
        },
    )
    png = plot(replayed, out.with_suffix(".png"))
    console.print(f"wrote {out} and {png}", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
