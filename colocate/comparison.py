"""Run several plans the same way and put them side by side; calibrate the planner.

:func:`compare` plans each strategy (or takes the plans given), runs every plan in a
fresh executor with the same batch, warm-up, duration and concurrency, and returns a
:class:`~colocate.report.Report`. With ``RunSettings(repeats=N)`` the plans run in N
interleaved rounds (every plan once per round, the order rotated each round) and the
report gives each plan's median and range. A plan that cannot be made is ``rejected``,
one that breaks while running is ``failed``; the others still run. :func:`calibrate`
measures a few member pairs side by side, so the planner uses measured slowdowns
instead of predicted ones for them, and runs the best candidate plans (those predicted too
close to call) and the plans made by hand briefly, so ``auto`` picks the measured-best.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import gc
import itertools
import multiprocessing
import pickle
import statistics
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

from colocate import serde
from colocate.devices import Device, mps_available, mps_daemon_running
from colocate.ensemble import Ensemble
from colocate.errors import ColocateError, InvalidInputError, PlanInfeasibleError, os_error_reason
from colocate.execution import Executor, run_at_rate, run_requests
from colocate.execution.front import ReplyWait, check_reply_wait
from colocate.execution.types import RunResult
from colocate.planning import CostModel, member_demands, plan_all
from colocate.planning import plan as make_plan
from colocate.planning.cost import InterferenceTable, cpu_threads_per_slot
from colocate.planning.search import SETTLE_WITHIN
from colocate.planning.types import Plan, PlanMeasurement, Prediction, Slot, SlotKind
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

#: called after every plan run with (label, plan, what it measured or None, why it failed or None)
RunObserver = Callable[[str, Plan, PlanRun | None, str | None], None]
_RUN_OBSERVERS: ContextVar[tuple[RunObserver, ...]] = ContextVar("colocate_run_observers", default=())


def run_record(label: str, plan: Plan, measured: PlanRun | None, failure: str | None) -> dict[str, object]:
    """One plan run as a plain dict for a log (what a :data:`RunObserver` is given): its label,
    slots, status, failure, samples/s, median and p99 latency and completed requests."""
    run = measured.run if measured is not None else None
    latency = run.latency if run is not None else None
    return {
        "label": label,
        "batch_size": plan.batch_size,
        "slots": [f"{slot.kind}: {', '.join(slot.members)}" for slot in plan.slots],
        "status": run.status if run is not None else "failed",
        "failure": failure,
        "measured_sps": run.throughput_sps if run is not None else None,
        "latency_p50_s": latency.median_s if latency is not None else None,
        "latency_p99_s": latency.p99_s if latency is not None else None,
        "requests_completed": run.requests_completed if run is not None else None,
    }


@contextlib.contextmanager
def observing_runs(observer: RunObserver) -> Iterator[None]:
    """Call ``observer(label, plan, measured, failure)`` after every plan run inside the block.

    Every run counts: the plans :func:`compare` runs, and those :func:`calibrate` and
    :func:`calibrate_backends` run (members alone, pairs, candidate plans). A benchmark
    saves each as it comes, so that a run stopped by a time limit keeps what it measured
    (on a rarely lent GPU, minutes of it). Blocks nest; the observers of every enclosing
    block are called, outermost first. An observer's exception propagates.
    """
    token = _RUN_OBSERVERS.set((*_RUN_OBSERVERS.get(), observer))
    try:
        yield
    finally:
        _RUN_OBSERVERS.reset(token)


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
    # rounds: every plan runs once per round, in an order rotated each round, and the report
    # gives the median and range over the rounds (the rate sweep runs in the first round only)
    repeats: int = 1
    # how a request waits for worker processes' replies when one is in flight at a time
    # (Executor's reply_wait: "auto", "spin" or "block")
    reply_wait: ReplyWait = "auto"

    def __post_init__(self) -> None:
        if self.requests is None and self.seconds is None:
            raise InvalidInputError("give requests or seconds for each plan's run")
        check_reply_wait(self.reply_wait)
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or self.repeats < 1:
            raise InvalidInputError(
                f"repeats must be a whole number of rounds >= 1, got {self.repeats!r} "
                "(2-5 rounds separate plans that differ by more than the run-to-run noise)"
            )


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
    outcome: tuple[PlanRun | None, str | None] | None = None
    if settings.isolated:
        try:
            pickle.dumps((plan, ensemble, settings))
        except Exception:
            pass  # a member made of a lambda or a closure: run it here instead
        else:
            outcome = _run_plan_in_child(plan, ensemble, settings)
    if outcome is None:
        outcome = _run_plan_here(plan, ensemble, settings)
    for observer in _RUN_OBSERVERS.get():
        observer(name or plan.strategy, plan, *outcome)
    return outcome


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
        plan,
        ensemble,
        allow_mps_start=settings.allow_mps_start,
        cuda_graphs=settings.cuda_graphs,
        reply_wait=settings.reply_wait,
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


Attempt = tuple[PlanRun | None, str | None]
"""One run of a plan: (what it measured, None) or (None, why it failed)."""


def rotated(items: Sequence[str], round_index: int) -> list[str]:
    """``items`` in the order of round ``round_index``: rotated by one place per round, so over
    ``len(items)`` rounds every item runs once in every position (drift favours none)."""
    if not items:
        return []
    shift = round_index % len(items)
    return [*items[shift:], *items[:shift]]


def run_rounds(
    plans: Sequence[tuple[str, Plan]],
    ensemble: Ensemble,
    settings: RunSettings,
    *,
    rounds: int | None = None,
    progress: Progress | None = None,
) -> dict[str, list[Attempt]]:
    """Run every plan once per round, ``rounds`` rounds (default ``settings.repeats``), interleaved.

    Round ``r`` runs the plans in the order :func:`rotated` gives, each with :func:`run_plan`
    (a fresh child process by default). The rate sweep of ``settings.rates`` runs in the first
    round only. Returns each label's attempts in round order.
    """
    count = settings.repeats if rounds is None else rounds
    if count < 1:
        raise InvalidInputError(f"rounds must be >= 1, got {count}")
    say = progress or (lambda _line: None)
    by_label = dict(plans)
    if len(by_label) != len(plans):
        raise InvalidInputError(f"plan labels must be unique, got {[label for label, _ in plans]}")
    attempts: dict[str, list[Attempt]] = {label: [] for label in by_label}
    later = dataclasses.replace(settings, rates=())
    for r in range(count):
        for label in rotated(list(by_label), r):
            plan = by_label[label]
            where = f" (round {r + 1} of {count})" if count > 1 else ""
            say(f"running plan '{label}' ({len(plan.slots)} slot(s)){where}")
            attempts[label].append(run_plan(plan, ensemble, settings if r == 0 else later, name=label))
    return attempts


_SEVERITY: dict[str, int] = {"ok": 0, "errors": 1, "failed": 2}


@dataclass(frozen=True)
class RoundsSummary:
    """A plan's rounds folded into one row: the median round's run and every round's figures."""

    run: RunResult | None  # the round with the median throughput (None when no round ran)
    status: PlanStatus  # the worst round's status
    reason: str | None  # the first failure or error, naming its round when there are several
    round_sps: tuple[float, ...]  # samples/s of each round that completed requests
    round_p99_s: tuple[float, ...]  # p99 latency of each such round
    rates: tuple[RatePoint, ...]  # the first round's rate sweep
    round_p50_s: tuple[float, ...] = ()  # median latency of each such round


def summarize_rounds(attempts: Sequence[Attempt]) -> RoundsSummary:
    """Fold a plan's attempts (one per round) into a :class:`RoundsSummary`."""
    runs: list[RunResult] = []
    status: PlanStatus = "ok"
    reason: str | None = None
    rates: tuple[RatePoint, ...] = ()
    for i, (measured, failure) in enumerate(attempts):
        run = measured.run if measured is not None else None
        if i == 0 and measured is not None:
            rates = measured.rates
        this = _status_of(run)
        if _SEVERITY[this] > _SEVERITY[status]:
            status = this
        why = failure or (run.errors[0] if run is not None and run.errors else None)
        if why and reason is None:
            reason = why if len(attempts) == 1 else f"round {i + 1} of {len(attempts)}: {why}"
        if run is not None and run.requests_completed:
            runs.append(run)
    if not attempts:
        status, reason = "failed", "it did not run"
    kept: RunResult | None = None
    if runs:
        middle = statistics.median_low([r.throughput_sps for r in runs])
        kept = next(r for r in runs if r.throughput_sps == middle)
    elif attempts and attempts[-1][0] is not None:
        last = attempts[-1][0]
        kept = last.run if last is not None else None
    return RoundsSummary(
        run=kept,
        status=status,
        reason=reason,
        round_sps=tuple(r.throughput_sps for r in runs),
        round_p99_s=tuple(r.latency.p99_s for r in runs if r.latency is not None),
        rates=rates,
        round_p50_s=tuple(r.latency.median_s for r in runs if r.latency is not None),
    )


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
        settings: how each plan runs (defaults: 3 s per plan, two requests in flight per slot,
            one round; ``repeats=N`` runs the plans in N interleaved rounds and reports medians).
        calibration: what was measured for the planner (see :func:`calibrate`); ``"auto"`` (the
            default) measures now when the ``auto`` strategy is compared: a few member pairs,
            then the best candidate plans (those predicted too close to call) and the plans
            made by hand, so the planner's pick rests on measurement; None plans from the
            model alone.
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
            calibration = calibrate(
                ensemble, device, as_given, batch_size=batch_size, run_settings=chosen, progress=say
            )
            calibrated_now = True
    if calibration is not None and not calibrated_now:
        check_calibration_fits(calibration, ensemble.name, batch_size)
    interference = calibration.interference() if calibration is not None else None
    measured_plans = calibration.measured_plans() if calibration is not None else ()
    calibrated_model = calibration.model() if calibration is not None else None

    planned: list[tuple[str, Plan | None, str | None]] = []
    variant_notes: list[str] = []
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
                    model=calibrated_model,  # the measured pairs and the time scale
                    backends=(backends or "auto") if variants else None,
                    measured_plans=measured_plans,
                )
                if (
                    variants
                    and calibrated_now
                    and variant_key(made)  # some member runs as another variant
                    and isinstance(profiles, VariantProfiles)
                ):
                    # the calibration above measured the members as given; measure these variants
                    made, variant_calibration = calibrate_backends(
                        ensemble,
                        device,
                        profiles,
                        made,
                        batch_size=batch_size,
                        run_settings=chosen,
                        progress=say,
                    )
                    pairs, runs = len(variant_calibration.pairs), len(variant_calibration.plans)
                    variant_notes.append(
                        f"'{label}': the variants it chose were calibrated as they run ({pairs} pair(s), "
                        f"{runs} plan(s) measured, time scale {variant_calibration.time_scale:.2f}, "
                        f"worker slots x{variant_calibration.worker_time_scale:.2f}, "
                        f"stream slots side by side x{variant_calibration.stream_time_scale:.2f}) "
                        "and its slots laid out again"
                    )
                planned_entry = (label, made, None)
            except ColocateError as exc:
                planned_entry = (label, None, str(exc))
        while label in seen:
            label += "'"
        seen.add(label)
        planned.append((label, planned_entry[1], planned_entry[2]))

    runnable = [(label, plan) for label, plan, _ in planned if plan is not None]
    attempts = run_rounds(runnable, ensemble, chosen, progress=say)
    summaries = {label: summarize_rounds(tries) for label, tries in attempts.items()}

    baseline = summaries.get(BASELINE)
    baseline_sps = None
    baseline_note = None
    if baseline is not None and baseline.status != "failed" and baseline.round_sps:
        baseline_sps = statistics.median(baseline.round_sps)
    elif baseline is not None:  # a baseline that broke partway would inflate every speed-up
        baseline_note = f"no speed-ups: the baseline '{BASELINE}' did not run to its end" + (
            f" ({baseline.reason})" if baseline.reason else ""
        )
    results = []
    for label, plan, reason in planned:
        if plan is None:
            results.append(PlanResult(label, "rejected", reason, None, None, None))
            continue
        summary = summaries[label]
        speedup = None
        if summary.round_sps and baseline_sps:
            speedup = statistics.median(summary.round_sps) / baseline_sps
        uncalibrated = None
        if interference is not None and profiles is not None:
            uncalibrated = _uncalibrated_sps(plan, ensemble, profiles)
        results.append(
            PlanResult(
                label,
                summary.status,
                summary.reason,
                plan,
                summary.run,
                speedup,
                uncalibrated,
                summary.rates,
                round_sps=summary.round_sps,
                round_p99_s=summary.round_p99_s,
                round_p50_s=summary.round_p50_s,
            )
        )
    from colocate.profiling.profiler import versions_for

    notes: list[str] = [baseline_note] if baseline_note else []
    if chosen.repeats > 1:
        notes.append(
            f"every plan ran in {chosen.repeats} interleaved rounds (order rotated each round); "
            "measured samples/s are medians, ± half the range; ~ marks plans whose range overlaps the best's"
        )
    if calibration is not None:
        how = "measured now" if calibrated_now else "given"
        notes.append(f"the planner used {len(calibration.pairs)} measured pair slowdown(s) ({how})")
        settled = calibration.measured_plans()
        if settled:
            figures = ", ".join(f"{m.name} {m.measured_sps or 0.0:,.0f}" for m in settled)
            notes.append(
                f"the calibration ran {len(settled)} candidate plans, those predicted too close to call "
                f"and those made by hand ({how}): "
                f"{figures} samples/s; 'auto' takes the measured-best of them when its own pick is "
                "among them or was predicted below it (its explanation says 'settled by measurement')"
            )
    notes.extend(variant_notes)

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
            "warmup": "executor default" if chosen.warmup is None else str(chosen.warmup),
            "repeats": str(chosen.repeats),
            "reply_wait": chosen.reply_wait,
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
    """Write ``report.json``, ``report.csv``, ``report.txt`` (the table) and ``report.png``.

    Raises:
        InvalidInputError: ``out_dir`` cannot be written (a file of that name, no permission);
            the message names the path.
    """
    from rich.console import Console

    target = Path(out_dir)
    try:
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
    except OSError as exc:
        raise InvalidInputError(
            f"cannot write the report to {target}: {os_error_reason(exc)}; give a folder you can "
            "write to (it is made when missing)"
        ) from exc
    return written


# --- calibration ---------------------------------------------------------------------------

RUNNER_UP_WITHIN = 0.15
"""Candidate plans predicted within this share of ``auto``'s pick lend their pairs to a calibration
that has room for more pairs than ``auto``'s own plan has (e.g. when it picks ``sequential``)."""
SETTLE_PLANS = 3
"""Most candidate plans a calibration runs to settle a near-tie (plus the by-hand plans)."""
BY_HAND_STRATEGIES = ("sequential", "streams", "processes")
"""The plans a user makes by hand: a loop over the members, a thread each, a process each."""
MPS_BASELINE = "mps"
"""Where mps slots can run, an MPS worker per member is measured beside the by-hand plans.

The cost model cannot rank it against a process per member: on a GPU ``CostModel.trust_mps_overlap``
is off until a device shows MPS workers overlapping, and on the CPU both are worker processes
of the same predicted speed (one pinned to its share of the cores). On a lent H100 it measured
179 samples/s against 152 for a process per member and 44 for a loop (8 small members, batch
1), and on this project's 2-core VM 101 against 86 (same case): a plan ``auto`` never measured
could not be picked, and left a 15 % regret on the H100."""
SETTLE_ROUNDS = 2
"""Interleaved rounds each of those plans runs."""


def _calibration_plan(
    device: Device, batch_size: int, groups: Sequence[Sequence[str]], kind: SlotKind
) -> Plan:
    """Slots of ``kind``, one per group, for a calibration run (CPU slots share the cores as a
    planned plan's would)."""
    threads = cpu_threads_per_slot(device.cpu_cores, len(groups)) if device.kind == "cpu" else None
    slots = tuple(
        Slot(name=f"s{i}", kind=kind, members=tuple(g), cpu_threads=threads) for i, g in enumerate(groups)
    )
    empty = Prediction(0.0, 0.0, 0.0, 0, groups[0][0], "calibration", ())
    return Plan(device=device, batch_size=batch_size, slots=slots, prediction=empty, strategy="calibration")


def pair_kind(kind_a: str, kind_b: str) -> SlotKind | None:
    """The slot kind to measure a pair in when its members run in slots of these kinds.

    Two stream slots: ``stream``. Two worker slots (``process`` or ``mps``): ``process`` (a
    worker per member, each with its own interpreter; the cost model applies it to mps slots
    too). A stream beside a worker: None (no two-slot measurement of one kind reproduces it).
    """
    if kind_a == "stream" and kind_b == "stream":
        return "stream"
    if kind_a != "stream" and kind_b != "stream":
        return "process"
    return None


def pairs_to_measure(chosen: Plan, limit: int) -> list[tuple[str, str, SlotKind]]:
    """The pairs that matter most to ``chosen``, each with the slot kind to measure it in.

    A pair runs side by side only when its members are in different slots; of those, the ones
    with the most predicted device time together (and the critical member's pairs) decide the
    plan's throughput, so their slowdown is worth measuring. The kind is :func:`pair_kind` of
    the two slots; pairs of a stream and a worker slot are left out.
    """
    finish = {m.member: m.finish_s - m.start_s for m in chosen.prediction.members}
    critical = chosen.prediction.critical_member
    candidates: list[tuple[str, str, SlotKind]] = []
    for a, b in itertools.combinations(sorted(chosen.members), 2):
        slot_a, slot_b = chosen.slot_of(a), chosen.slot_of(b)
        kind = pair_kind(slot_a.kind, slot_b.kind)
        if slot_a.name != slot_b.name and kind is not None:
            candidates.append((a, b, kind))
    candidates.sort(
        key=lambda ab: (critical not in ab[:2], -(finish.get(ab[0], 0.0) + finish.get(ab[1], 0.0)))
    )
    return candidates[: max(0, limit)]


def _layout_key(plan: Plan | PlanMeasurement) -> frozenset[tuple[str, frozenset[str]]]:
    return frozenset((s.kind, frozenset(s.members)) for s in plan.slots)


def candidate_plans(
    ensemble: Ensemble,
    device: Device,
    profiles: ProfileSet,
    *,
    batch_size: int,
    within: float,
    interference: InterferenceTable | None = None,
) -> tuple[Plan, list[Plan]]:
    """``auto``'s pick, and the other distinct plans of every strategy predicted within ``within``
    (a share) of its throughput, best predicted first (the runners-up of a close call).

    Plans with the same slots are one (named ``a=b`` as in :func:`dedupe_plans`).
    """
    every = plan_all(ensemble, device, profiles, batch_size=batch_size, interference=interference)
    by_strategy = {p.strategy: p for p in every}
    if "auto" not in by_strategy:
        raise PlanInfeasibleError(every.skipped.get("auto", f"no 'auto' plan at batch {batch_size}"))
    unique = dedupe_plans(list(every))
    chosen_key = _layout_key(by_strategy["auto"])
    chosen = next(p for p in unique if _layout_key(p) == chosen_key)
    floor = (1.0 - within) * chosen.prediction.throughput_sps
    runners = [p for p in unique if _layout_key(p) != chosen_key and p.prediction.throughput_sps >= floor]
    runners.sort(key=lambda p: p.prediction.throughput_sps, reverse=True)
    return chosen, runners


def by_hand_plans(
    ensemble: Ensemble,
    device: Device,
    profiles: ProfileSet,
    *,
    batch_size: int,
    interference: InterferenceTable | None = None,
) -> list[Plan]:
    """The distinct plans a user makes by hand (:data:`BY_HAND_STRATEGIES`) that fit, in that order.

    Plans with the same slots are one (named ``a=b`` as in :func:`dedupe_plans`).
    """
    made = plan_all(
        ensemble,
        device,
        profiles,
        strategies=BY_HAND_STRATEGIES,
        batch_size=batch_size,
        interference=interference,
    )
    return dedupe_plans(list(made))


def mps_can_run(device: Device, settings: RunSettings) -> bool:
    """Whether a calibration on ``device`` can run mps plans: the CPU (an mps slot is a worker
    pinned to its share of the cores), or a real GPU with an MPS daemon running, or one the runs
    may start (``settings.allow_mps_start``, with ``nvidia-cuda-mps-control`` on the PATH);
    never a simulated device."""
    if device.kind == "cpu":
        return True
    if device.kind != "cuda":
        return False
    return mps_daemon_running() or (settings.allow_mps_start and mps_available())


def baseline_plans(
    ensemble: Ensemble,
    device: Device,
    profiles: ProfileSet,
    *,
    batch_size: int,
    interference: InterferenceTable | None = None,
    with_mps: bool = False,
) -> list[Plan]:
    """The plans a calibration always measures, whatever their prediction: the by-hand plans
    (:func:`by_hand_plans`), then, with ``with_mps``, an MPS worker per member
    (:data:`MPS_BASELINE`) when it fits. Plans with the same slots are one."""
    made = by_hand_plans(ensemble, device, profiles, batch_size=batch_size, interference=interference)
    if not with_mps:
        return made
    mps = plan_all(
        ensemble,
        device,
        profiles,
        strategies=(MPS_BASELINE,),
        batch_size=batch_size,
        interference=interference,
    )
    return dedupe_plans([*made, *mps])


def calibrate_backends(
    ensemble: Ensemble,
    device: Device,
    profiles: VariantProfiles,
    chosen: Plan,
    *,
    batch_size: int = 8,
    max_pairs: int = 3,
    seconds: float = 1.0,
    max_plans: int = SETTLE_PLANS,
    plan_rounds: int = SETTLE_ROUNDS,
    run_settings: RunSettings | None = None,
    progress: Progress | None = None,
) -> tuple[Plan, Calibration]:
    """Calibrate the backend variants ``chosen`` runs, and lay them out again with that calibration.

    :func:`calibrate` measures the members as given; a ``+backends`` plan that runs them as
    other variants (say, every member on ONNX Runtime) would otherwise be predicted with
    pair slowdowns and a time scale measured on other code. This keeps ``chosen``'s backend
    for each member, builds the ensemble as it runs (:func:`colocate.variants.variant_member`,
    same names), calibrates that ensemble on the variants' profiles (pairs, close calls, time
    scale: as :func:`calibrate`), and plans ``auto`` for it with the result. The plan returned
    has ``chosen``'s backends and strategy name, and that calibrated layout and prediction.

    Returns:
        The plan, and the calibration of the variants (its pairs name the members).
    """
    from colocate.variants import variant_member

    if not chosen.backends:
        raise InvalidInputError(
            f"plan '{chosen.strategy}' chose no backend variants; calibrate it with calibrate()"
        )
    assignment = {b.member: b.label for b in chosen.backends}
    as_run = dataclasses.replace(
        ensemble,
        members=tuple(
            variant_member(m, assignment[m.name], device) if m.name in assignment else m
            for m in ensemble.members
        ),
    )
    run_profiles = profiles.for_assignment(assignment)
    say = progress or (lambda _line: None)
    say(
        "calibrating the backend variants '"
        + chosen.strategy
        + "' chose: "
        + ", ".join(f"{b.member} as {b.label}" for b in chosen.backends if b.label != b.default)
    )
    calibration = calibrate(
        as_run,
        device,
        run_profiles,
        batch_size=batch_size,
        max_pairs=max_pairs,
        seconds=seconds,
        max_plans=max_plans,
        plan_rounds=plan_rounds,
        run_settings=run_settings,
        progress=progress,
    )
    laid_out = _auto_with(calibration, as_run, device, run_profiles, batch_size)
    plan = dataclasses.replace(
        laid_out,
        strategy=chosen.strategy,
        backends=chosen.backends,
        explanation=(
            *chosen.explanation,
            "slots laid out again after calibrating these backend variants:",
            *laid_out.explanation,
        ),
    )
    return plan, calibration


def calibrate(
    ensemble: Ensemble,
    device: Device,
    profiles: ProfileSet,
    *,
    batch_size: int = 8,
    max_pairs: int = 3,
    seconds: float = 1.0,
    max_plans: int = SETTLE_PLANS,
    plan_rounds: int = SETTLE_ROUNDS,
    settle_within: float = SETTLE_WITHIN,
    run_settings: RunSettings | None = None,
    progress: Progress | None = None,
) -> Calibration:
    """Measure what the planner needs to pick well: a few member pairs, then a close call.

    1. **Pairs.** Up to ``max_pairs`` pairs of the ``auto`` plan whose overlap matters most
       (see :func:`pairs_to_measure`); when that plan has fewer (``sequential`` has none), pairs
       of the runner-up plans predicted within :data:`RUNNER_UP_WITHIN` of it, best first. Each
       member alone and each pair run for ``seconds`` in slots of the pair's kind
       (:func:`pair_kind`: stream slots, or worker processes for process and mps plans); the
       slowdown is the pair's median request latency over the slower member's alone (>= 1).
    2. **Close calls, and the bar to clear.** Planned again with the measured pairs, the pick,
       the best of the other plans still predicted within ``settle_within`` of it (at most
       ``max_plans`` in all) and every plan a user makes by hand (:func:`by_hand_plans`: a
       loop, a thread or a process per member, whatever their prediction; where mps slots can
       run, an MPS worker per member too: :func:`baseline_plans`) run ``plan_rounds``
       interleaved rounds of ``seconds`` each (with ``run_settings``' concurrency, MPS and
       CUDA-graph switches). ``auto`` planning with this calibration then picks the
       measured-best of them, so it never picks a plan that measured slower than one made by hand.
    3. **How fast plans run now** (:func:`_time_scales`): the loop's ratio of predicted to
       measured throughput gives ``time_scale``, the plans of worker slots ``worker_time_scale``,
       the plans of several stream slots ``stream_time_scale``.
    4. **The calibrated pick, measured.** Planned again with all of that, ``auto`` can pick slots
       no run had, predicted above every measurement (the scales move the balance between
       plans). That plan then runs ``plan_rounds`` rounds too, so that ``auto`` settles on a
       measured plan rather than on a prediction (found on this project's 2-core VM: such a
       pick, predicted at 100 samples/s, ran at 90 beside an MPS worker per member at 101).

    ``max_plans=0`` (or 1) measures pairs only, as before plan measurements existed.
    """
    say = progress or (lambda _line: None)
    base = run_settings or RunSettings()
    chosen, runners = candidate_plans(
        ensemble, device, profiles, batch_size=batch_size, within=RUNNER_UP_WITHIN
    )
    picks = pairs_to_measure(chosen, max_pairs)
    for runner in runners:
        if len(picks) >= max_pairs:
            break
        for pick in pairs_to_measure(runner, max_pairs):
            if pick not in picks and len(picks) < max_pairs:
                say(f"calibrating: '{pick[0]}' and '{pick[1]}' from runner-up plan '{runner.strategy}'")
                picks.append(pick)
    pair_settings = RunSettings(
        seconds=seconds,
        concurrency=1,
        warmup=2,
        allow_mps_start=base.allow_mps_start,
        cuda_graphs=base.cuda_graphs,
        isolated=base.isolated,
    )
    measured = _measure_pairs(ensemble, device, profiles, batch_size, picks, pair_settings, say)
    plans: tuple[PlanMeasurement, ...] = ()
    if max_plans >= 2 and plan_rounds >= 1:
        table: dict[tuple[str, str, str], float] = {(p.a, p.b, p.kind): p.slowdown for p in measured}
        settled_pick, close = candidate_plans(
            ensemble,
            device,
            profiles,
            batch_size=batch_size,
            within=settle_within,
            interference=table or None,
        )
        contenders = [settled_pick, *close[: max_plans - 1]]
        # what a user would do by hand is the bar auto must clear: those plans run as well, even
        # past max_plans and whatever their prediction (a pair measured badly can put one far
        # below the pick while it runs faster)
        taken = {_layout_key(p) for p in contenders}
        made_by_hand = baseline_plans(
            ensemble,
            device,
            profiles,
            batch_size=batch_size,
            interference=table or None,
            with_mps=mps_can_run(device, base),
        )
        for by_hand in made_by_hand:
            key = _layout_key(by_hand)
            if key not in taken:
                taken.add(key)
                contenders.append(by_hand)
        plan_settings = dataclasses.replace(
            base, seconds=seconds, requests=None, rates=(), repeats=plan_rounds
        )
        if len(contenders) >= 2:
            names = ", ".join(f"'{c.strategy}' {c.prediction.throughput_sps:,.0f}" for c in contenders)
            say(
                f"calibrating: running {len(contenders)} plans to settle the pick, those predicted "
                f"within {settle_within:.0%} of it and those made by hand ({names} samples/s predicted)"
            )
        else:
            say(f"calibrating: running '{settled_pick.strategy}' to see how fast plans run now")
        plans = measure_plans(contenders, ensemble, plan_settings, progress=say)
    time_scale, worker_time_scale, stream_time_scale = _time_scales(plans)
    if abs(time_scale - 1.0) > 0.05:
        say(
            f"calibrating: plans ran {1 / time_scale:.2f}x the throughput the profiles predict; "
            "the planner scales the members' times by that"
        )
    if abs(worker_time_scale - 1.0) > 0.05:
        say(
            f"calibrating: plans of worker processes ran {1 / worker_time_scale:.2f}x the throughput "
            "the model predicts beside plans of stream slots; the planner scales the members' "
            "times in worker slots by that"
        )
    if abs(stream_time_scale - 1.0) > 0.05:
        say(
            f"calibrating: plans of several stream slots ran {1 / stream_time_scale:.2f}x the "
            "throughput the model predicts beside the loop; the planner scales the members' times "
            "in a stream slot beside other slots by that"
        )
    calibration = Calibration(
        ensemble=ensemble.name,
        device=device,
        batch_size=batch_size,
        pairs=tuple(measured),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        plans=plans,
        time_scale=time_scale,
        worker_time_scale=worker_time_scale,
        stream_time_scale=stream_time_scale,
    )
    if not calibration.measured_plans():
        return calibration
    follow_up = _unmeasured_pick(ensemble, device, profiles, batch_size, calibration)
    if follow_up is None:
        return calibration
    say(
        f"calibrating: planned again with these measurements, 'auto' picks slots no run had "
        f"({follow_up.prediction.throughput_sps:,.0f} samples/s predicted); running them too"
    )
    plan_settings = dataclasses.replace(base, seconds=seconds, requests=None, rates=(), repeats=plan_rounds)
    extra = measure_plans(
        [dataclasses.replace(follow_up, strategy=f"{follow_up.strategy}, calibrated")],
        ensemble,
        plan_settings,
        progress=say,
    )
    return dataclasses.replace(calibration, plans=(*plans, *extra))


def _auto_with(
    calibration: Calibration, ensemble: Ensemble, device: Device, profiles: ProfileSet, batch_size: int
) -> Plan:
    """``auto``'s plan with ``calibration``: its pairs and time scales, settled by its measured plans."""
    return make_plan(
        ensemble,
        device,
        profiles,
        strategy="auto",
        batch_size=batch_size,
        model=calibration.model(),
        measured_plans=calibration.measured_plans(),
    )


def _unmeasured_pick(
    ensemble: Ensemble, device: Device, profiles: ProfileSet, batch_size: int, calibration: Calibration
) -> Plan | None:
    """``auto``'s plan with ``calibration``, when none of its measured plans has its slots."""
    try:
        pick = _auto_with(calibration, ensemble, device, profiles, batch_size)
    except ColocateError:
        return None
    measured = {_layout_key(m) for m in calibration.measured_plans()}
    return None if _layout_key(pick) in measured else pick


def _predicted_over_measured(plans: Sequence[PlanMeasurement]) -> list[float]:
    """Predicted over measured throughput of each plan that ran (the time scales' ratios)."""
    return [
        p.predicted_sps / measured
        for p in plans
        if (measured := p.measured_sps) is not None and measured > 0 and p.predicted_sps > 0
    ]


class TimeScales(NamedTuple):
    """What a calibration's plan measurements say about the cost model (see :func:`_time_scales`)."""

    time_scale: float
    worker_time_scale: float
    stream_time_scale: float


def _time_scales(plans: Sequence[PlanMeasurement]) -> TimeScales:
    """How much slower than predicted the measured plans ran.

    ``time_scale`` is how fast the members run now against their profiles (which may come from
    a quieter or busier moment, or other clocks): predicted over measured throughput of the
    plan that runs every member in one stream slot (a Python loop), whose prediction involves
    no concurrency model; without it, the median over the plans of stream slots only, then
    over every plan (1 without measurements). ``worker_time_scale`` is the median of the same
    ratio over the plans of worker slots only (process, mps), divided by ``time_scale``: what
    the model gets wrong about worker processes (on a GPU, how finely it time-slices their
    contexts; on the CPU, the workers' own costs). It is 1 unless a plan of stream slots ran
    too. ``stream_time_scale`` is the same over the plans of several stream slots, when the
    loop ran too: what the model gets wrong about stream slots side by side (on a lent H100,
    CUDA-graph members a thread each ran at a quarter of the predicted speed). Plans that mix
    the kinds inform none. ``scripts/time_scale_rules.py`` replays these rules and the
    earlier ones on recorded runs.
    """

    def only_streams(p: PlanMeasurement) -> bool:
        return all(s.kind == "stream" for s in p.slots)

    every = _predicted_over_measured(plans)
    streams = _predicted_over_measured([p for p in plans if only_streams(p)])
    if not streams:
        return TimeScales((float(statistics.median(every)) if every else 1.0), 1.0, 1.0)
    loop = _predicted_over_measured([p for p in plans if only_streams(p) and len(p.slots) == 1])
    time_scale = float(statistics.median(loop or streams))
    workers = _predicted_over_measured([p for p in plans if all(s.kind != "stream" for s in p.slots)])
    side_by_side = (
        _predicted_over_measured([p for p in plans if only_streams(p) and len(p.slots) > 1]) if loop else []
    )
    return TimeScales(
        time_scale,
        float(statistics.median(workers)) / time_scale if workers else 1.0,
        float(statistics.median(side_by_side)) / time_scale if side_by_side else 1.0,
    )


def _measure_pairs(
    ensemble: Ensemble,
    device: Device,
    profiles: ProfileSet,
    batch_size: int,
    picks: Sequence[tuple[str, str, SlotKind]],
    settings: RunSettings,
    say: Progress,
) -> list[PairMeasurement]:
    engine = CostModel().engine(member_demands(ensemble, device, profiles, batch_size))
    alone: dict[tuple[str, str], float] = {}
    measured: list[PairMeasurement] = []
    sub = {m.name: m for m in ensemble.members}
    for a, b, kind in picks:
        where = "a stream slot" if kind == "stream" else "a worker process"
        for name in (a, b):
            if (name, kind) not in alone:
                say(f"calibrating: '{name}' alone in {where}")
                alone[(name, kind)] = _median_latency(
                    _calibration_plan(device, batch_size, [[name]], kind),
                    Ensemble((sub[name],), name=f"{ensemble.name}:{name}"),
                    settings,
                    name=f"pair calibration: {name} alone ({kind})",
                )
        say(f"calibrating: '{a}' beside '{b}', each in {where}")
        together = _median_latency(
            _calibration_plan(device, batch_size, [[a], [b]], kind),
            Ensemble((sub[a], sub[b]), name=f"{ensemble.name}:{a}+{b}"),
            settings,
            name=f"pair calibration: {a} beside {b} ({kind})",
        )
        first, second = min(a, b), max(a, b)
        slowdown = max(1.0, together / max(alone[(a, kind)], alone[(b, kind)]))
        measured.append(
            PairMeasurement(
                a=first,
                b=second,
                alone_a_s=alone[(first, kind)],
                alone_b_s=alone[(second, kind)],
                together_s=together,
                slowdown=slowdown,
                predicted_slowdown=engine.pair_slowdown(a, b, kind),
                kind=kind,
            )
        )
    return measured


def measure_plans(
    plans: Sequence[Plan],
    ensemble: Ensemble,
    settings: RunSettings,
    *,
    progress: Progress | None = None,
) -> tuple[PlanMeasurement, ...]:
    """Run ``plans`` in ``settings.repeats`` interleaved rounds; one :class:`PlanMeasurement` each
    (named by the plan's strategy; a plan that fails has no rounds and says why)."""
    labelled: list[tuple[str, Plan]] = []
    for plan in plans:
        label = plan.strategy
        while label in {existing for existing, _ in labelled}:
            label += "'"
        labelled.append((label, plan))
    attempts = run_rounds(labelled, ensemble, settings, progress=progress)
    out = []
    for label, plan in labelled:
        summary = summarize_rounds(attempts[label])
        ran = summary.status != "failed" and bool(summary.round_sps)  # a round that broke: unreliable
        out.append(
            PlanMeasurement(
                name=label,
                slots=plan.slots,
                batch_size=plan.batch_size,
                predicted_sps=plan.prediction.throughput_sps,
                round_sps=summary.round_sps if ran else (),
                failure=None if ran else (summary.reason or "no request completed"),
            )
        )
    return tuple(out)


def _median_latency(plan: Plan, ensemble: Ensemble, settings: RunSettings, *, name: str) -> float:
    measured, failure = run_plan(plan, ensemble, settings, name=name)
    run = measured.run if measured is not None else None
    if run is not None and run.status == "failed":  # it broke partway: its latencies say little
        failure = failure or (run.errors[0] if run.errors else "it broke partway")
        run = None
    if run is None or run.latency is None:
        raise ColocateError(f"calibration run of {', '.join(plan.members)} failed: {failure}")
    return run.latency.median_s


def load_calibration(path: str | Path) -> Calibration:
    """A calibration saved with ``colocate.serde.save``."""
    return serde.load(Calibration, path)


# --- regime map ----------------------------------------------------------------------------


def check_calibration_fits(calibration: Calibration, ensemble: str, batch_size: int) -> None:
    """Refuse a calibration measured on another ensemble or at another batch size: its time
    scales and pair slowdowns would rescale predictions they were not measured for.

    Raises:
        InvalidInputError: naming what differs and what to do.
    """
    if calibration.batch_size != batch_size:
        raise InvalidInputError(
            f"the calibration was measured at batch size {calibration.batch_size}, not {batch_size}: "
            f"its time scales and pair slowdowns do not carry over; compare at batch size "
            f"{calibration.batch_size}, or let this comparison calibrate (no calibration given)"
        )
    if calibration.ensemble != ensemble:
        raise InvalidInputError(
            f"the calibration was measured on ensemble '{calibration.ensemble}', not '{ensemble}'; "
            "give one measured on this ensemble, or let this comparison calibrate"
        )


def pareto_set(report: Report) -> list[str]:
    """Plans not dominated on (higher throughput, lower p99 latency, lower peak memory)."""
    ran = [r for r in report.results if r.ran and r.run is not None and r.run.latency is not None]

    def point(r: PlanResult) -> tuple[float, float, float]:
        assert r.run is not None and r.run.latency is not None
        memory = r.run.peak_memory_bytes
        return (-(r.measured_sps or 0.0), r.latency_p99_s or r.run.latency.p99_s, float(memory or 0))

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
    "MPS_BASELINE",
    "RUNNER_UP_WITHIN",
    "SETTLE_PLANS",
    "SETTLE_ROUNDS",
    "SETTLE_WITHIN",
    "Calibration",
    "PairMeasurement",
    "PlanMeasurement",
    "RoundsSummary",
    "RunObserver",
    "RunSettings",
    "baseline_plans",
    "by_hand_plans",
    "calibrate",
    "calibrate_backends",
    "candidate_plans",
    "check_calibration_fits",
    "compare",
    "dedupe_plans",
    "execute",
    "load_calibration",
    "measure_plans",
    "mps_can_run",
    "observing_runs",
    "pair_kind",
    "pairs_to_measure",
    "pareto_set",
    "profiles_for_plan",
    "regime_rows",
    "rotated",
    "run_plan",
    "run_record",
    "run_rounds",
    "save_report",
    "summarize_rounds",
    "variant_key",
]
