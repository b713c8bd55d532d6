"""Run several plans the same way and put them side by side; calibrate the planner.

:func:`compare` plans each strategy (or takes the plans given), runs every plan
one after another in a fresh executor with the same batch, warm-up, duration and
concurrency, and returns a :class:`~colocate.report.Report`. A plan that cannot be
made is ``rejected``, one that breaks while running is ``failed``; the others still
run. :func:`calibrate` measures a few member pairs side by side, so the planner
uses measured slowdowns instead of predicted ones for them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import itertools
import multiprocessing
import pickle
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from colocate import serde
from colocate.devices import Device
from colocate.ensemble import Ensemble
from colocate.errors import ColocateError, InvalidInputError
from colocate.execution import Executor, run_at_rate, run_requests
from colocate.execution.types import RunResult
from colocate.planning import CostModel, member_demands
from colocate.planning import plan as make_plan
from colocate.planning.types import Plan, Prediction, Slot
from colocate.planning.variants import SUFFIX
from colocate.profiling import ProfileSet, VariantProfiles, profile_isolated, profile_variants
from colocate.report import (
    Calibration,
    PairMeasurement,
    PlanResult,
    PlanRun,
    PlanStatus,
    RatePoint,
    Report,
    plot,
    render_table,
    to_csv,
)

#: strategies compared by default: the baselines every user has, and the planner's pick
DEFAULT_STRATEGIES: tuple[str, ...] = ("sequential", "streams", "processes", "auto")
BASELINE = "sequential"

#: called with a line saying what is being done
Progress = Callable[[str], None]


@dataclass(frozen=True)
class RunSettings:
    """How each plan is run: the same for every plan of a comparison."""

    requests: int | None = None  # counted requests per plan (None: run for `seconds`)
    seconds: float | None = 3.0  # run each plan this long (None: run `requests`)
    concurrency: int | None = None  # requests in flight (None: two per slot)
    warmup: int | None = None  # requests first, not counted (None: the executor's default)
    allow_mps_start: bool = False  # mps slots may start a private MPS daemon
    cuda_graphs: bool = False  # torch members replay CUDA graphs on a GPU
    isolated: bool = True  # run each plan in a fresh child process (see run_plan)
    rates: tuple[float, ...] = ()  # offered loads (requests/s) for a latency sweep after the run
    rate_seconds: float = 2.0  # how long each offered load lasts

    def __post_init__(self) -> None:
        if self.requests is None and self.seconds is None:
            raise InvalidInputError("give requests or seconds for each plan's run")


def dedupe_plans(plans: Sequence[Plan]) -> list[Plan]:
    """One plan per distinct slot layout; strategies that agree are named together ("a=b").

    The baseline keeps its plain name ``sequential`` so speed-ups stay relative to it.
    """
    groups: dict[tuple[object, ...], list[Plan]] = {}
    for candidate in plans:
        layout = (
            tuple((s.kind, s.members, s.thread_percentage) for s in candidate.slots),
            variant_key(candidate),
        )
        groups.setdefault(layout, []).append(candidate)
    unique = []
    for group in groups.values():
        names = [p.strategy for p in group]
        label = BASELINE if BASELINE in names else "=".join(names)
        unique.append(dataclasses.replace(group[0], strategy=label))
    return unique


def variant_key(plan: Plan) -> tuple[tuple[str, str], ...]:
    """The backend variants ``plan`` runs that differ from the members as given (for grouping)."""
    return tuple(sorted((b.member, b.label) for b in plan.backends if b.label != b.default))


def profiles_for_plan(profiles: ProfileSet | VariantProfiles, plan: Plan) -> ProfileSet:
    """The profiles of the variants ``plan`` runs (each member's as given where it chose none)."""
    if isinstance(profiles, ProfileSet):
        return profiles
    return profiles.for_assignment({b.member: b.label for b in plan.backends})


def _fresh_state(device: Device) -> None:
    gc.collect()
    if device.kind == "cuda":
        import torch

        torch.cuda.synchronize(device.index)
        torch.cuda.empty_cache()


def run_plan(
    plan: Plan, ensemble: Ensemble, settings: RunSettings, *, name: str | None = None
) -> tuple[PlanRun | None, str | None]:
    """Run one plan in a fresh state; (result, None) or (None, why it failed).

    With ``settings.isolated`` (the default) the plan runs in a spawned child process of its
    own, so no plan inherits threads, thread pools, caches or a CUDA context from the one
    before (measured on the CPU: a sequential plan ran at a third of its speed in a process
    whose main thread had run the members before). Members that do not pickle run here.
    """
    if settings.isolated:
        try:
            pickle.dumps((plan, ensemble, settings))
        except Exception:
            pass  # a member made of a lambda or a closure: run it here instead
        else:
            return _run_plan_in_child(plan, ensemble, settings)
    return _run_plan_here(plan, ensemble, settings)


def execute(
    plan: Plan,
    ensemble: Ensemble,
    settings: RunSettings,
    *,
    progress: Callable[[int, int | None], None] | None = None,
) -> PlanRun:
    """Start an executor for ``plan`` in this process, run the requests ``settings`` asks for
    (then the offered loads of ``settings.rates``), close it, and return what was measured.
    Errors propagate."""
    with Executor(
        plan, ensemble, allow_mps_start=settings.allow_mps_start, cuda_graphs=settings.cuda_graphs
    ) as executor:
        run = run_requests(
            executor,
            requests=settings.requests,
            seconds=settings.seconds,
            concurrency=settings.concurrency,
            warmup=settings.warmup,
            progress=progress,
        )
        points = []
        for rate in settings.rates:
            done, failed, latency = run_at_rate(executor, rate, settings.rate_seconds)
            points.append(
                RatePoint(
                    rate_rps=rate,
                    completed=done,
                    failed=failed,
                    latency_p50_s=latency.median_s if latency else None,
                    latency_p99_s=latency.p99_s if latency else None,
                )
            )
    return PlanRun(run, tuple(points))


def _run_plan_here(
    plan: Plan, ensemble: Ensemble, settings: RunSettings
) -> tuple[PlanRun | None, str | None]:
    _fresh_state(plan.device)
    try:
        result = execute(plan, ensemble, settings)
    except ColocateError as exc:
        return None, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # a plan's crash must not end the comparison
        return None, f"unexpected {type(exc).__name__}: {exc}"
    return result, None


def _plan_child(plan: Plan, ensemble: Ensemble, settings: RunSettings, out_path: str) -> None:
    """Spawned child of :func:`run_plan`: run the plan here, write the result or the failure."""
    result, failure = _run_plan_here(plan, ensemble, settings)
    if result is not None:
        serde.save(result, out_path)
    else:
        Path(out_path).with_suffix(".error").write_text(failure or "unknown failure", encoding="utf-8")


def _run_plan_in_child(
    plan: Plan, ensemble: Ensemble, settings: RunSettings
) -> tuple[PlanRun | None, str | None]:
    # loading, warm-up and requests, generously
    budget = (settings.seconds or 0.0) + settings.rate_seconds * len(settings.rates) + 600.0
    with tempfile.TemporaryDirectory(prefix="colocate-run-") as tmp:
        out_path = Path(tmp) / "result.json"
        # not a daemon: the plan's own worker processes are this child's children
        child = multiprocessing.get_context("spawn").Process(
            target=_plan_child, args=(plan, ensemble, settings, str(out_path)), daemon=False
        )
        child.start()
        child.join(budget)
        if child.is_alive():
            child.terminate()
            child.join(5.0)
            if child.is_alive():
                child.kill()
            return None, f"WorkerFailedError: the plan's process did not finish within {budget:g} s"
        if out_path.is_file():
            return serde.load(PlanRun, out_path), None
        error = out_path.with_suffix(".error")
        if error.is_file():
            return None, error.read_text(encoding="utf-8")
        return None, f"WorkerFailedError: the plan's process died (exit code {child.exitcode})"


def _status_of(run: RunResult | None) -> PlanStatus:
    if run is None:
        return "failed"
    return run.status


def compare(
    ensemble: Ensemble,
    device: Device,
    plans_or_strategies: Sequence[Plan | str] = DEFAULT_STRATEGIES,
    *,
    profiles: ProfileSet | VariantProfiles | None = None,
    batch_size: int = 8,
    settings: RunSettings | None = None,
    calibration: Calibration | Literal["auto"] | None = "auto",
    progress: Progress | None = None,
    backends: str | Sequence[str] | None = None,
) -> Report:
    """Plan (where given strategy names) and run every plan the same way; report side by side.

    Args:
        ensemble: the ensemble to serve.
        device: where to run (the CPU or a CUDA GPU).
        plans_or_strategies: plans, or strategy names for :func:`colocate.planning.plan`;
            ``sequential`` is added first as the baseline when missing. A name ending in
            ``+backends`` (e.g. ``auto+backends``) also chooses each member's backend variant.
        profiles: the members' profiles (or their :class:`VariantProfiles`); measured now
            (cached) at ``batch_size`` when None.
        batch_size: samples per request (used when planning from strategy names).
        settings: how each plan runs (defaults: 3 s per plan, two requests in flight per slot).
        calibration: measured pair slowdowns for the planner (see :func:`calibrate`); ``"auto"``
            (the default) measures a few pairs now when the ``auto`` strategy is compared, so
            the planner's pick rests on measured interference; None plans from the model alone.
        progress: called with a line before each step.
        backends: the backend variants ``+backends`` plans choose among (``"auto"``: all usable;
            e.g. ``"torch,onnxruntime"``); given, ``auto+backends`` is compared too. Each member
            is then profiled under each variant (when ``profiles`` is None).
    """
    chosen = settings or RunSettings()
    say = progress or (lambda _line: None)
    entries = list(plans_or_strategies)
    if not entries:
        raise InvalidInputError("compare needs at least one plan or strategy name")
    if not any((e == BASELINE) or (isinstance(e, Plan) and e.strategy == BASELINE) for e in entries):
        entries.insert(0, BASELINE)
    if backends is not None and not any(isinstance(e, str) and e.endswith(SUFFIX) for e in entries):
        entries.append("auto" + SUFFIX)
    wants_variants = any(isinstance(e, str) and e.endswith(SUFFIX) for e in entries)
    if profiles is None and any(isinstance(e, str) for e in entries):
        # profile in a child process: this one goes on to run the plans, and framework work done
        # here first slows its stream slots (docs/execution.md, "Keep the serving process clean")
        if wants_variants:
            say(f"profiling {len(ensemble.members)} members under each backend variant at batch {batch_size}")
            profiles = profile_variants(ensemble, device, (batch_size,), backends=backends or "auto")
        else:
            say(f"profiling {len(ensemble.members)} members at batch {batch_size}")
            profiles = profile_isolated(ensemble, device, (batch_size,))
    as_given = profiles.default_set if isinstance(profiles, VariantProfiles) else profiles
    calibrated_now = False
    if calibration == "auto":
        calibration = None
        if "auto" in entries and as_given is not None:
            say("calibrating the planner: measuring the member pairs that matter most to 'auto'")
            calibration = calibrate(ensemble, device, as_given, batch_size=batch_size, progress=say)
            calibrated_now = True
    interference = calibration.interference() if calibration is not None else None

    planned: list[tuple[str, Plan | None, str | None]] = []
    seen: set[str] = set()
    for entry in entries:
        if isinstance(entry, Plan):
            label = entry.strategy
            planned_entry: tuple[str, Plan | None, str | None] = (label, entry, None)
        else:
            label = entry
            try:
                assert profiles is not None
                variants = entry.endswith(SUFFIX)
                made = make_plan(
                    ensemble,
                    device,
                    profiles,
                    strategy=entry[: -len(SUFFIX)] if variants else entry,
                    batch_size=batch_size,
                    interference=interference,
                    backends=(backends or "auto") if variants else None,
                )
                planned_entry = (label, made, None)
            except ColocateError as exc:
                planned_entry = (label, None, str(exc))
        while label in seen:
            label += "'"
        seen.add(label)
        planned.append((label, planned_entry[1], planned_entry[2]))

    runs: dict[str, tuple[PlanRun | None, str | None]] = {}
    for label, plan, _ in planned:
        if plan is None:
            continue
        say(f"running plan '{label}' ({len(plan.slots)} slot(s))")
        runs[label] = run_plan(plan, ensemble, chosen, name=label)

    baseline_measured = runs.get(BASELINE, (None, None))[0]
    baseline_run = baseline_measured.run if baseline_measured is not None else None
    baseline_sps = baseline_run.throughput_sps if baseline_run and baseline_run.requests_completed else None
    results = []
    for label, plan, reason in planned:
        if plan is None:
            results.append(PlanResult(label, "rejected", reason, None, None, None))
            continue
        measured, failure = runs[label]
        run = measured.run if measured is not None else None
        status = _status_of(run)
        why = failure or (run.errors[0] if run is not None and run.errors else None)
        speedup = None
        if run is not None and run.requests_completed and baseline_sps:
            speedup = run.throughput_sps / baseline_sps
        uncalibrated = None
        if interference is not None and profiles is not None:
            uncalibrated = _uncalibrated_sps(plan, ensemble, profiles)
        rates = measured.rates if measured is not None else ()
        results.append(PlanResult(label, status, why, plan, run, speedup, uncalibrated, rates))
    from colocate.profiling.profiler import versions_for

    notes: list[str] = []
    if calibration is not None:
        how = "measured now" if calibrated_now else "given"
        notes.append(f"the planner used {len(calibration.pairs)} measured pair slowdown(s) ({how})")

    return Report(
        ensemble=ensemble.name,
        device=device,
        batch_size=batch_size,
        baseline=BASELINE,
        results=tuple(results),
        settings={
            "requests": str(chosen.requests),
            "seconds": str(chosen.seconds),
            "concurrency": str(chosen.concurrency or "2 per slot"),
            "warmup": str(chosen.warmup or "executor default"),
        },
        calibrated=calibration is not None,
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        versions=versions_for(ensemble.members[0], device),
        notes=tuple(notes),
        calibration=calibration,
    )


def _uncalibrated_sps(plan: Plan, ensemble: Ensemble, profiles: ProfileSet | VariantProfiles) -> float | None:
    """What the cost model without measured pairs predicts for ``plan``'s slots (and variants)."""
    try:
        demands = member_demands(ensemble, plan.device, profiles_for_plan(profiles, plan), plan.batch_size)
        return CostModel().predict(plan.slots, demands).throughput_sps
    except ColocateError:
        return None


def save_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.json``, ``report.csv``, ``report.txt`` (the table) and ``report.png``."""
    from rich.console import Console

    target = Path(out_dir)
    target.mkdir(parents=True, exist_ok=True)
    written = {"json": serde.save(report, target / "report.json")}
    (target / "report.csv").write_text(to_csv(report), encoding="utf-8")
    written["csv"] = target / "report.csv"
    console = Console(record=True, width=200, file=open(target / "report.txt", "w", encoding="utf-8"))  # noqa: SIM115
    try:
        console.print(render_table(report))
    finally:
        console.file.close()
    written["txt"] = target / "report.txt"
    written["png"] = plot(report, target / "report.png")
    return written


# --- calibration ---------------------------------------------------------------------------


def _single_slot_plan(device: Device, batch_size: int, groups: Sequence[Sequence[str]]) -> Plan:
    slots = tuple(Slot(name=f"s{i}", kind="stream", members=tuple(g)) for i, g in enumerate(groups))
    empty = Prediction(0.0, 0.0, 0.0, 0, groups[0][0], "calibration", ())
    return Plan(device=device, batch_size=batch_size, slots=slots, prediction=empty, strategy="calibration")


def pairs_to_measure(chosen: Plan, limit: int) -> list[tuple[str, str]]:
    """The pairs that matter most to ``chosen``: members of different slots, heaviest first.

    A pair runs side by side only when its members are in different slots; of those, the ones
    with the most predicted device time together (and the critical member's pairs) decide
    the plan's throughput, so their slowdown is worth measuring.
    """
    finish = {m.member: m.finish_s - m.start_s for m in chosen.prediction.members}
    critical = chosen.prediction.critical_member
    candidates = [
        (a, b)
        for a, b in itertools.combinations(sorted(chosen.members), 2)
        if chosen.slot_of(a).name != chosen.slot_of(b).name
    ]
    candidates.sort(key=lambda ab: (critical not in ab, -(finish.get(ab[0], 0.0) + finish.get(ab[1], 0.0))))
    return candidates[:limit]


def calibrate(
    ensemble: Ensemble,
    device: Device,
    profiles: ProfileSet,
    *,
    batch_size: int = 8,
    max_pairs: int = 3,
    seconds: float = 1.0,
    progress: Progress | None = None,
) -> Calibration:
    """Measure up to ``max_pairs`` member pairs alone and side by side, for the planner.

    The pairs are those of the ``auto`` plan whose overlap matters most (see
    :func:`pairs_to_measure`). Each member alone and each pair in two stream slots run for
    ``seconds``; the slowdown is the pair's median request latency over the slower member's
    alone (at least 1).
    """
    say = progress or (lambda _line: None)
    chosen = make_plan(ensemble, device, profiles, strategy="auto", batch_size=batch_size)
    pairs = pairs_to_measure(chosen, max_pairs)
    settings = RunSettings(seconds=seconds, concurrency=1, warmup=2)
    engine = CostModel().engine(member_demands(ensemble, device, profiles, batch_size))
    alone: dict[str, float] = {}
    measured: list[PairMeasurement] = []
    sub = {m.name: m for m in ensemble.members}
    for a, b in pairs:
        for name in (a, b):
            if name not in alone:
                say(f"calibrating: '{name}' alone")
                alone[name] = _median_latency(
                    _single_slot_plan(device, batch_size, [[name]]),
                    Ensemble((sub[name],), name=f"{ensemble.name}:{name}"),
                    settings,
                )
        say(f"calibrating: '{a}' beside '{b}'")
        together = _median_latency(
            _single_slot_plan(device, batch_size, [[a], [b]]),
            Ensemble((sub[a], sub[b]), name=f"{ensemble.name}:{a}+{b}"),
            settings,
        )
        slowdown = max(1.0, together / max(alone[a], alone[b]))
        measured.append(
            PairMeasurement(
                a=min(a, b),
                b=max(a, b),
                alone_a_s=alone[min(a, b)],
                alone_b_s=alone[max(a, b)],
                together_s=together,
                slowdown=slowdown,
                predicted_slowdown=engine.pair_slowdown(a, b, "stream"),
            )
        )
    return Calibration(
        ensemble=ensemble.name,
        device=device,
        batch_size=batch_size,
        pairs=tuple(measured),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def _median_latency(plan: Plan, ensemble: Ensemble, settings: RunSettings) -> float:
    measured, failure = run_plan(plan, ensemble, settings)
    run = measured.run if measured is not None else None
    if run is None or run.latency is None:
        raise ColocateError(f"calibration run of {', '.join(plan.members)} failed: {failure}")
    return run.latency.median_s


def load_calibration(path: str | Path) -> Calibration:
    """A calibration saved with ``colocate.serde.save``."""
    return serde.load(Calibration, path)


# --- regime map ----------------------------------------------------------------------------


def pareto_set(report: Report) -> list[str]:
    """Plans not dominated on (higher throughput, lower p99 latency, lower peak memory)."""
    ran = [
        r
        for r in report.results
        if r.run is not None and r.run.latency is not None and r.measured_sps is not None
    ]

    def point(r: PlanResult) -> tuple[float, float, float]:
        assert r.run is not None and r.run.latency is not None
        memory = r.run.peak_memory_bytes
        return (-(r.measured_sps or 0.0), r.run.latency.p99_s, float(memory or 0))

    points = {r.name: point(r) for r in ran}
    front = []
    for name, mine in points.items():
        dominated = any(
            other != mine and all(o <= m for o, m in zip(other, mine, strict=True))
            for other_name, other in points.items()
            if other_name != name
        )
        if not dominated:
            front.append(name)
    return front


def regime_rows(reports: Sequence[Report]) -> list[list[str]]:
    """One row per batch size: the best measured plan, its speed-up, and the Pareto set."""
    rows = []
    for report in sorted(reports, key=lambda r: r.batch_size):
        best = report.best
        rows.append(
            [
                str(report.batch_size),
                best.name if best else "-",
                f"{best.speedup:.2f}x" if best is not None and best.speedup is not None else "-",
                ", ".join(pareto_set(report)) or "-",
            ]
        )
    return rows


__all__ = [
    "BASELINE",
    "DEFAULT_STRATEGIES",
    "Calibration",
    "PairMeasurement",
    "RunSettings",
    "calibrate",
    "compare",
    "dedupe_plans",
    "execute",
    "load_calibration",
    "pairs_to_measure",
    "pareto_set",
    "profiles_for_plan",
    "regime_rows",
    "run_plan",
    "save_report",
    "variant_key",
]
