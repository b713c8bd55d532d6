"""A comparison of plans: one row per plan, measured next to predicted.

:class:`Report` is data (JSON round trip); :func:`render_table` draws it for the
terminal following fixed rules (rows are plans, the unit is stated once in the
header, the best measured throughput is marked ``*`` and plans statistically tied
with it ``~``, a plan measured in several rounds shows its median and spread
``412 ±6%``, a noisy latency is flagged ``(!)``), :func:`to_csv` and :func:`plot`
write the other forms.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from colocate._optional import optional_import
from colocate._timing import LatencyStats
from colocate.devices import Device
from colocate.execution.types import RunResult
from colocate.planning.cost import CostModel, PairKey
from colocate.planning.types import Plan, PlanMeasurement, SlotKind

PlanStatus = Literal["ok", "errors", "failed", "rejected"]


@dataclass(frozen=True)
class PairMeasurement:
    """Two members measured alone and side by side, each in a slot of ``kind``. Times in seconds.

    ``kind`` is the slot kind of the plans the measurement serves: ``stream`` (two threads of one
    process) or ``process`` (two worker processes; it also serves mps slots). The cost model
    applies it only to the pair in slots of that kind. Files written before kinds existed load
    as ``stream``, which is how they were measured.
    """

    a: str
    b: str
    alone_a_s: float  # median request latency with only `a` (in one slot of `kind`)
    alone_b_s: float  # median request latency with only `b`
    together_s: float  # median request latency with both, each in its own slot of `kind`
    slowdown: float  # together / max(alone): how much the pair stretches the slower of the two
    predicted_slowdown: float  # what the cost model predicted for the pair in slots of `kind`
    kind: SlotKind = "stream"  # the slot kind both ran in


@dataclass(frozen=True)
class Calibration:
    """What was measured for the planner on one ensemble, device and batch size; reusable (JSON).

    ``pairs``: member pairs alone and side by side (measured slowdowns for the cost model).
    ``plans``: candidate plans predicted too close to call and the plans made by hand, run a
    few rounds each; ``auto`` planning picks the measured-best of them (see
    :func:`colocate.planning.plan`). Files written before plan measurements existed load with none.
    """

    ensemble: str
    device: Device
    batch_size: int
    pairs: tuple[PairMeasurement, ...]
    created: str = ""
    plans: tuple[PlanMeasurement, ...] = ()
    # how much slower (>1) or faster the members run now than their profiles say: predicted
    # over measured throughput of the one-slot loop among ``plans`` (else the median over the
    # plans of stream slots, then over all); profiles taken on a quieter or busier machine, at
    # other clocks. 1 where no plan was measured (comparison._time_scales gives the rules)
    time_scale: float = 1.0
    # how much faster (<1) or slower the plans of worker processes (process, mps slots) ran
    # than the model predicts once ``time_scale`` is applied: the median of their predicted
    # over measured throughput, over ``time_scale``; 1 unless such a plan and a plan of stream
    # slots were both measured (files written before it existed load with 1)
    worker_time_scale: float = 1.0
    # how much slower (>1) or faster the plans of several stream slots ran than the model
    # predicts once ``time_scale`` is applied: the median of their predicted over measured
    # throughput, over ``time_scale``; 1 unless such a plan and the loop were both measured
    # (files written before it existed load with 1)
    stream_time_scale: float = 1.0

    def model(self, base: CostModel | None = None) -> CostModel:
        """The cost model this calibration implies: ``base`` (default constants) with the
        measured pair slowdowns and the time scales."""
        chosen = base or CostModel()
        return dataclasses.replace(
            chosen,
            interference=self.interference(),
            time_scale=self.time_scale,
            worker_time_scale=self.worker_time_scale,
            stream_time_scale=self.stream_time_scale,
        )

    def interference(self) -> dict[PairKey, float]:
        """The table the planner takes: ``{(a, b): slowdown}`` for pairs measured in stream
        slots, ``{(a, b, kind): slowdown}`` for pairs measured in another kind."""
        table: dict[PairKey, float] = {}
        for p in self.pairs:
            table[(p.a, p.b) if p.kind == "stream" else (p.a, p.b, p.kind)] = p.slowdown
        return table

    def measured_plans(self) -> tuple[PlanMeasurement, ...]:
        """The plan measurements that ran (what planning takes as ``measured_plans``)."""
        return tuple(p for p in self.plans if p.measured_sps is not None)


@dataclass(frozen=True)
class RatePoint:
    """One plan under an offered load: requests arriving at a fixed rate (open loop)."""

    rate_rps: float  # offered requests per second
    completed: int  # answered with a prediction
    failed: int  # answered with an error
    latency_p50_s: float | None  # median request latency at this load
    latency_p99_s: float | None  # tail request latency at this load


@dataclass(frozen=True)
class PlanRun:
    """What running one plan measured: the closed-loop run and the latency-versus-load points."""

    run: RunResult
    rates: tuple[RatePoint, ...] = ()


@dataclass(frozen=True)
class PlanResult:
    """One plan in a comparison: the plan, what running it measured, or why it did not run."""

    name: str  # label in the report, e.g. the strategy name
    status: PlanStatus  # "ok"; "errors" (some requests failed); "failed" (broke); "rejected" (not run)
    reason: str | None  # why it failed or was rejected
    plan: Plan | None  # None when no plan could be made
    run: RunResult | None  # None when it did not run
    speedup: float | None  # median measured throughput / the baseline's median measured throughput
    uncalibrated_sps: float | None = None  # the model's prediction without measured pairs, if used
    rates: tuple[RatePoint, ...] = ()  # latency at offered loads, when a rate sweep was asked for
    round_sps: tuple[float, ...] = ()  # measured samples/s of each round that ran, in round order
    round_p99_s: tuple[float, ...] = ()  # p99 request latency of each round that ran
    # `run` is the round with the median throughput; reports written before rounds existed have
    # one run and no round figures
    round_p50_s: tuple[float, ...] = ()  # median request latency of each round that ran (reports
    # written before it existed load with none: their p50 is then the one `run`'s)

    @property
    def measured_sps(self) -> float | None:
        """Samples/s: the median over the rounds, or the one run's."""
        if self.round_sps:
            return float(statistics.median(self.round_sps))
        return self.run.throughput_sps if self.run is not None and self.run.requests_completed else None

    @property
    def ran(self) -> bool:
        """It ran and did not break: its figures count (best plan, speed-ups, Pareto set). A
        plan that broke partway keeps the throughput of the requests it finished, which says
        nothing of how it serves."""
        return self.measured_sps is not None and self.status in ("ok", "errors")

    @property
    def measured_range_sps(self) -> tuple[float, float] | None:
        """(lowest, highest) samples/s over the rounds; one run gives (x, x); None if none ran."""
        if self.round_sps:
            return min(self.round_sps), max(self.round_sps)
        measured = self.measured_sps
        return (measured, measured) if measured is not None else None

    @property
    def spread(self) -> float | None:
        """Half the range of the rounds' samples/s over their median (``±`` in the table);
        None with fewer than two rounds."""
        measured = self.measured_sps
        if len(self.round_sps) < 2 or not measured:
            return None
        return (max(self.round_sps) - min(self.round_sps)) / (2.0 * measured)

    @property
    def latency_p50_s(self) -> float | None:
        """Median request latency: the median over the rounds of each round's p50, or the one
        run's (the same basis as :attr:`latency_p99_s`, so the two columns compare)."""
        if self.round_p50_s:
            return float(statistics.median(self.round_p50_s))
        if len(self.round_p99_s) > 1:
            return None  # a report from before round p50s: none on the basis of its p99
        latency = self.run.latency if self.run is not None else None
        return latency.median_s if latency is not None else None

    @property
    def latency_p99_s(self) -> float | None:
        """p99 request latency: the median over the rounds, or the one run's."""
        if self.round_p99_s:
            return float(statistics.median(self.round_p99_s))
        latency = self.run.latency if self.run is not None else None
        return latency.p99_s if latency is not None else None

    @property
    def predicted_sps(self) -> float | None:
        return self.plan.prediction.throughput_sps if self.plan is not None else None

    @property
    def prediction_error(self) -> float | None:
        """(predicted - measured) / measured throughput, or None."""
        measured, predicted = self.measured_sps, self.predicted_sps
        if measured is None or predicted is None or measured <= 0:
            return None
        return (predicted - measured) / measured


@dataclass(frozen=True)
class Report:
    """Plans run the same way on one ensemble, device and batch size."""

    ensemble: str
    device: Device
    batch_size: int
    baseline: str  # the plan the speed-ups are relative to (normally "sequential")
    results: tuple[PlanResult, ...]
    settings: dict[str, str] = field(default_factory=dict)  # requests/seconds, concurrency, warm-up
    calibrated: bool = False  # the planner used measured pair slowdowns
    created: str = ""  # ISO date-time
    versions: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    calibration: Calibration | None = None  # the measured pairs the planner used, if any

    def result(self, name: str) -> PlanResult | None:
        for r in self.results:
            if r.name == name:
                return r
        return None

    def model_error(self, *, calibrated: bool = True) -> float | None:
        """Median |predicted - measured| / measured throughput over the plans that ran.

        ``calibrated=False`` uses the predictions without measured pair slowdowns (None when
        the report was not calibrated).
        """
        errors = []
        for r in self.results:
            measured = r.measured_sps
            predicted = r.predicted_sps if calibrated else r.uncalibrated_sps
            if measured and predicted is not None:
                errors.append(abs(predicted - measured) / measured)
        if not errors or (not calibrated and not self.calibrated):
            return None
        return float(statistics.median(errors))

    @property
    def best(self) -> PlanResult | None:
        """The plan with the highest (median) measured throughput among those that ran."""
        ran = [r for r in self.results if r.ran]
        return max(ran, key=lambda r: r.measured_sps or 0.0) if ran else None

    def tied_with_best(self) -> tuple[str, ...]:
        """Plans statistically tied with the best: their range over the rounds overlaps the best's.

        With one round a plan's range is its one figure, so only an equal figure ties; more
        rounds (``RunSettings.repeats``) make the ranges, and so the ties, meaningful.
        """
        best = self.best
        if best is None or best.measured_range_sps is None:
            return ()
        best_low = best.measured_range_sps[0]
        tied = []
        for r in self.results:
            if r is best or r.status not in ("ok", "errors") or r.measured_range_sps is None:
                continue
            if r.measured_range_sps[1] >= best_low:
                tied.append(r.name)
        return tuple(tied)

    @property
    def rounds(self) -> int:
        """The most rounds any plan ran (1 for reports from before rounds existed)."""
        return max((len(r.round_sps) for r in self.results), default=0) or 1


COLUMNS = (
    "plan",
    "slots",
    "status",
    "pred. samples/s",
    "meas. samples/s",
    "pred. err",
    "p50 ms",
    "p99 ms",
    "peak MiB",
    "GPU busy",
    "speed-up",
)


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _p99(result: PlanResult, latency: LatencyStats | None) -> str:
    p99 = result.latency_p99_s
    if p99 is None:
        return "-"
    return f"{p99 * 1e3:.2f}" + (" (!)" if latency is not None and latency.high_variance else "")


def measured_text(result: PlanResult) -> str:
    """The measured samples/s cell: ``"412"``, or ``"412 ±6%"`` over several rounds."""
    measured = result.measured_sps
    if measured is None:
        return "-"
    spread = result.spread
    return _fmt(measured) + ("" if spread is None else f" ±{spread:.0%}")


def table_rows(report: Report) -> list[list[str]]:
    """The table's rows as strings (one per plan, in report order); the best is marked ``*``,
    plans tied with it ``~``."""
    best = report.best
    tied = set(report.tied_with_best())
    rows = []
    for r in report.results:
        run = r.run
        latency = run.latency if run is not None else None
        slots = (
            "; ".join(run.slots)
            if run is not None
            else ("; ".join(f"{s.kind}: {', '.join(s.members)}" for s in r.plan.slots) if r.plan else "-")
        )
        peak = run.peak_memory_bytes if run is not None else None
        err = r.prediction_error
        status = r.status if not r.reason else f"{r.status}: {r.reason[:60]}"
        rows.append(
            [
                r.name + (" *" if best is not None and r is best else " ~" if r.name in tied else ""),
                slots,
                status,
                _fmt(r.predicted_sps),
                measured_text(r),
                "-" if err is None else f"{err:+.0%}",
                "-" if r.latency_p50_s is None else f"{r.latency_p50_s * 1e3:.2f}",
                _p99(r, latency),
                "-" if peak is None else f"{peak / 2**20:,.0f}",
                "-" if run is None or run.utilization_pct is None else f"{run.utilization_pct:.0f}%",
                "-" if r.speedup is None else f"{r.speedup:.2f}x",
            ]
        )
    return rows


#: fewer requests than this at a load, and its p99 is about the slowest of them: the cell says n
FEW_FOR_P99 = 100


def rate_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    """Latency versus offered load: columns "plan" then one per rate, cells "p50 / p99 ms"
    (with ``n=`` the requests answered, when fewer than :data:`FEW_FOR_P99`)."""
    rates = sorted({p.rate_rps for r in report.results for p in r.rates})
    columns = ["plan"] + [f"{rate:g} req/s" for rate in rates]
    rows = []
    for r in report.results:
        if not r.rates:
            continue
        by_rate = {p.rate_rps: p for p in r.rates}
        cells = [r.name]
        for rate in rates:
            point = by_rate.get(rate)
            if point is None or point.latency_p99_s is None or point.latency_p50_s is None:
                cells.append("-")
                continue
            failed = f", {point.failed} failed" if point.failed else ""
            few = f" (n={point.completed})" if point.completed < FEW_FOR_P99 else ""
            cells.append(f"{point.latency_p50_s * 1e3:.1f} / {point.latency_p99_s * 1e3:.1f}{few}{failed}")
        rows.append(cells)
    return columns, rows


def render_table(report: Report) -> Any:
    """A rich Table of the report."""
    from rich.table import Table

    rounds = report.rounds
    how = (
        f"median of {rounds} interleaved rounds ± half their range; * = best measured, "
        "~ = tied with it (ranges overlap)"
        if rounds > 1
        else "* = best measured"
    )
    title = (
        f"{report.ensemble} on {report.device.name}, batch {report.batch_size}: "
        f"speed-up vs {report.baseline} ({how})"
    )
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("plan", "slots", "status") else "right")
    for row in table_rows(report):
        table.add_row(*row)
    return table


def to_csv(report: Report) -> str:
    """The report as CSV (one row per plan, raw numbers in SI units)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        [
            "plan",
            "status",
            "reason",
            "batch_size",
            "predicted_sps",
            "measured_sps",
            "prediction_error",
            "latency_p50_s",
            "latency_p99_s",
            "peak_memory_bytes",
            "utilization_pct",
            "speedup",
            "slots",
            "rounds",
            "measured_min_sps",
            "measured_max_sps",
            "round_sps",
            "tied_with_best",
        ]
    )
    tied = set(report.tied_with_best())
    for r in report.results:
        run = r.run
        span = r.measured_range_sps
        rounds = len(r.round_sps) or (1 if r.measured_sps is not None else 0)
        writer.writerow(
            [
                r.name,
                r.status,
                r.reason or "",
                report.batch_size,
                r.predicted_sps or "",
                r.measured_sps or "",
                "" if r.prediction_error is None else r.prediction_error,
                r.latency_p50_s or "",
                r.latency_p99_s or "",
                (run.peak_memory_bytes if run else None) or "",
                (run.utilization_pct if run else None) or "",
                r.speedup or "",
                " | ".join(run.slots) if run else "",
                rounds,
                span[0] if span else "",
                span[1] if span else "",
                " ".join(f"{v:.6g}" for v in r.round_sps),
                r.name in tied,
            ]
        )
    return out.getvalue()


def plot(report: Report, path: str | Path) -> Path:
    """A PNG with measured vs predicted throughput and p99 latency per plan."""
    matplotlib = optional_import("matplotlib", purpose="the comparison plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in report.results]
    measured = [r.measured_sps or 0.0 for r in report.results]
    predicted = [r.predicted_sps or 0.0 for r in report.results]
    p99 = [(r.latency_p99_s or 0.0) * 1e3 for r in report.results]
    x = list(range(len(names)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8.0, 1.6 * len(names) + 4), 4.5))
    width = 0.4
    left.bar([i - width / 2 for i in x], predicted, width, label="predicted", color="#9ecae1")
    spans = [r.measured_range_sps for r in report.results]
    errors = [
        [m - (span[0] if span else m) for m, span in zip(measured, spans, strict=True)],
        [(span[1] if span else m) - m for m, span in zip(measured, spans, strict=True)],
    ]
    left.bar(
        [i + width / 2 for i in x],
        measured,
        width,
        yerr=errors if report.rounds > 1 else None,
        capsize=3,
        label="measured" + (f" (median, range of {report.rounds} rounds)" if report.rounds > 1 else ""),
        color="#3182bd",
    )
    left.set_xticks(x, names, rotation=30, ha="right")
    left.set_ylabel("samples / s")
    left.set_title("throughput")
    left.legend()
    right.bar(x, p99, color="#e6550d")
    right.set_xticks(x, names, rotation=30, ha="right")
    right.set_ylabel("ms")
    right.set_title("p99 request latency (measured)")
    for r, i in zip(report.results, x, strict=True):
        if r.status in ("failed", "rejected"):
            left.annotate(r.status, (i, 0), ha="center", va="bottom", rotation=90, fontsize=8)
    fig.suptitle(f"{report.ensemble} on {report.device.name}, batch {report.batch_size}")
    fig.tight_layout()
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    plt.close(fig)
    return target
