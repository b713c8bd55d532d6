#!/usr/bin/env python3
"""Packing strategies against each other and against hand-made baselines; planner quality.

    python benchmarks/packing.py                       # best device, the full matrix
    python benchmarks/packing.py --device cpu --sizes 2,4 --batch-sizes 1,8 --seconds 1
    python benchmarks/packing.py --smoke --device cpu --out /tmp/p.json   # the CI smoke run
    python benchmarks/packing.py --backends auto       # also auto+backends: each member's backend chosen

For each case (an ensemble at a batch size) the ensemble's plans run one after another, each
in a fresh process, the same way (same batch, warm-up, duration and requests in flight), and
throughput and p99 request latency are reported as ratios against ``sequential``. The
baselines a user would write by hand are strategies too: a Python loop over the members is
``sequential``, one thread per member is ``streams`` (on a GPU each thread has its own CUDA
stream), one process per member is ``processes``.

The ensembles are the default ensemble ("default": ``small`` on the CPU, ``large`` on a GPU)
and synthetic ensembles of ``--sizes`` members cycling through the zoo's architectures with
alternating sizes (``--scale`` and half of it, so every member takes the same input shape;
``tiny`` and ``large`` have no same-shape partner and do not alternate), distinct seeds and
names such as ``resnet-0``, ``mobilenet-1``. The ensemble of N members is the first N of the
largest one.

Planner quality comes from the same run: when ``auto`` is compared, a few member pairs are
measured first (:func:`colocate.comparison.calibrate`) and every plan is predicted with and
without those measurements. ``regret`` is how much slower the plan ``auto`` chose ran than
the best plan measured (of the plans that run every member as given); the cost model's
error is the median over the plans that ran of
``|predicted - measured| / measured`` throughput (and peak memory), before and after
calibration. Plans with the same slots are run once and share the measurement.

With ``--backends`` (``auto``, or labels such as ``torch,onnxruntime``) every member is also
profiled under each backend variant (:mod:`colocate.variants`: ``torch+cudagraph`` on a GPU,
``onnxruntime``, ...) and each case adds the plan ``auto+backends``: ``auto`` with each member's
variant chosen by the cost model. It runs like the others (its row gives the variants chosen);
the planner record adds its regret against the best measured plan and its speed-up over ``auto``.

The JSON (default ``benchmarks/results/<UTC stamp>-<device>-packing.json``) holds the
device, versions, date and command, one record per case, and a summary; a PNG beside it
plots speed-up and p99 ratio per case and strategy, and regret and model error per case.
The profiles the run planned from are written beside it (``<out stem>-profiles.json``, named
in the JSON's ``profiles_file``) before the first case runs, and every plan run carries its
slots and variants, so ``benchmarks/model_replay.py`` can predict the measured plans again
with a later cost model, on any machine.
Each case also lists every plan run it made (``runs``: calibration and comparison, in
order), and the JSON is written again after each of them, the case under way in
``case_in_progress``: a run stopped by a time limit (a lent GPU's minutes) keeps every
measurement it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, device_tag, int_list, save_figure, word_list, write_result
from colocate import devices, serde, zoo
from colocate.comparison import (
    BASELINE,
    SETTLE_PLANS,
    SETTLE_ROUNDS,
    RunSettings,
    calibrate,
    calibrate_backends,
    compare,
    observing_runs,
    run_record,
    variant_key,
)
from colocate.devices import Device
from colocate.ensemble import Ensemble, Member
from colocate.errors import ColocateError
from colocate.planning import STRATEGIES
from colocate.planning import plan as make_plan
from colocate.planning.types import Plan
from colocate.profiling import (
    ProfileCache,
    ProfileSet,
    ProfileSettings,
    VariantProfiles,
    model_hash,
    profile_isolated,
    profile_variants,
)
from colocate.profiling.cache import cache_key
from colocate.report import Calibration, PlanResult, PlanRun, Report

KIND = "packing"
DEFAULT_STRATEGIES = ("sequential", "streams", "processes", "mps", "coloring", "packing", "auto")
SMOKE_STRATEGIES = ("sequential", "streams", "auto")
WITH_BACKENDS = "auto+backends"
"""The plan of ``auto`` with each member's backend variant chosen (``--backends``)."""
#: what a user would write by hand, and the strategy that is the same thing
BY_HAND = {
    "sequential": "a Python loop over the members",
    "streams": "one thread per member",
    "processes": "one process per member",
}
_MIB = float(1 << 20)


def _scale(text: str) -> str | float:
    """A zoo preset name, or a float scale."""
    if text in zoo.SCALES:
        return text
    try:
        return float(text)
    except ValueError:
        raise SystemExit(
            f"--scale: {text!r} is neither one of {', '.join(zoo.SCALES)} nor a number"
        ) from None


def alternating_scales(scale: str | float) -> tuple[str | float, ...]:
    """The sizes a synthetic ensemble alternates between: ``scale`` and half of it.

    Every member must take the same input shape: ``small`` and float scales are all 64x64
    (a float multiplies the widths of ``small``), so ``small`` alternates with 0.5 and a
    float ``s`` with ``s / 2``; ``tiny`` (32x32) and ``large`` (224x224) are alone at their
    shape, so their members differ only in architecture and seed.
    """
    if scale == "small":
        return ("small", 0.5)
    if isinstance(scale, float):
        return (scale, scale / 2)
    return (scale,)


def synthetic_members(count: int, scale: str | float) -> list[Member]:
    """``count`` zoo members: architectures in turn, sizes alternating, seed = position."""
    sizes = alternating_scales(scale)
    members = []
    for i in range(count):
        arch = zoo.ARCHITECTURES[i % len(zoo.ARCHITECTURES)]
        members.append(zoo.member(arch, scale=sizes[i % len(sizes)], seed=i, name=f"{arch}-{i}"))
    return members


def _scale_label(scale: str | float) -> str:
    return scale if isinstance(scale, str) else f"x{scale:g}"


def _layout_key(plan: Plan) -> tuple[Any, ...]:
    return (
        tuple(
            (s.kind, s.members, s.thread_percentage, s.cpu_threads, s.memory_limit_bytes) for s in plan.slots
        ),
        variant_key(plan),
    )


def _measured(calibration: Calibration | None) -> dict[str, Any]:
    """What a calibration measured, for the result JSON (empty figures without one)."""
    if calibration is None:
        return {
            "pairs": [],
            "plans": [],
            "time_scale": None,
            "worker_time_scale": None,
            "stream_time_scale": None,
        }
    return {
        "pairs": serde.to_dict(calibration.pairs),
        "plans": serde.to_dict(calibration.plans),
        "time_scale": calibration.time_scale,
        "worker_time_scale": calibration.worker_time_scale,
        "stream_time_scale": calibration.stream_time_scale,
    }


def _backends_text(plan: Plan | None) -> str | None:
    """The variants a plan changed, e.g. ``"resnet: onnxruntime, vit: onnxruntime"``; None if none."""
    if plan is None or not plan.backends:
        return None
    changed = [f"{member}: {label}" for member, label in variant_key(plan)]
    return ", ".join(changed) if changed else "every member as given"


def _slots_text(plan: Plan | None) -> str:
    if plan is None:
        return "-"
    parts = []
    for s in plan.slots:
        extra = f" {s.thread_percentage:.0f}%" if s.thread_percentage is not None else ""
        threads = f" {s.cpu_threads}t" if s.cpu_threads is not None else ""
        parts.append(f"{s.kind}{extra}{threads}: {', '.join(s.members)}")
    return "; ".join(parts)


def _rel_error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or measured is None or measured <= 0:
        return None
    return (predicted - measured) / measured


def round_spread(calibration: Calibration | None) -> float | None:
    """How far one run of a plan is from another here: the median, over the plans the
    calibration ran in two or more rounds, of (fastest - slowest round) / their median. A
    regret below it is within what running the same plan again can change (None without
    such plans)."""
    if calibration is None:
        return None
    spreads = [
        (max(p.round_sps) - min(p.round_sps)) / statistics.median(p.round_sps)
        for p in calibration.plans
        if len(p.round_sps) >= 2 and statistics.median(p.round_sps) > 0
    ]
    return float(statistics.median(spreads)) if spreads else None


def pooled_regret(
    runs: Sequence[dict[str, Any]], auto_slots: str | None, member_count: int
) -> dict[str, Any]:
    """auto's regret from every run of each layout, calibration's and comparison's pooled.

    The comparison runs each plan once; the calibration has often run the same layouts before
    (its settling rounds), each run a fresh process with the same batch. Pooling takes, per
    layout (slots as run, every member as given, all members), the median over all its runs:
    more measurements of the plans that matter at no extra device time. ``regret`` is
    (best pooled - auto's pooled) / best pooled; None when auto did not run.
    """
    pooled: dict[str, list[float]] = {}
    for run in runs:
        measured = run.get("measured_sps")
        members = sum(len(slot["members"]) for slot in run.get("plan_slots", []))
        if not measured or run.get("status") == "failed" or members != member_count:
            continue
        if run.get("backends") not in (None, "every member as given"):
            continue  # another backend: outside auto's space
        pooled.setdefault(run["slots"], []).append(float(measured))
    medians = {slots: float(statistics.median(values)) for slots, values in pooled.items()}
    if auto_slots is None or auto_slots not in medians:
        return {"regret": None, "auto_runs": 0, "best": None, "best_runs": 0, "layouts": len(medians)}
    best = max(medians, key=lambda slots: medians[slots])
    return {
        "regret": max(0.0, (medians[best] - medians[auto_slots]) / medians[best]),
        "auto_runs": len(pooled[auto_slots]),
        "best": best,
        "best_runs": len(pooled[best]),
        "layouts": len(medians),
    }


def _median_abs(values: Sequence[float | None]) -> float | None:
    known = [abs(v) for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(known)) if known else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def relabel(profiles: ProfileSet, members: Sequence[Member], batch_sizes: Sequence[int]) -> ProfileSet:
    """Name each profile after the member it was measured for.

    The profile cache is keyed by the model, not the name: a member whose model was profiled
    before under another name (``resnet`` of the default ensemble and ``resnet-0`` at the same
    scale and seed) comes back under the old name. Profiles come member by member, each at
    every batch size in ascending order.
    """
    items = profiles.profiles
    per_member = len(set(batch_sizes))
    if len(items) != per_member * len(members):
        return profiles
    return ProfileSet(
        tuple(dataclasses.replace(p, member=members[i // per_member].name) for i, p in enumerate(items))
    )


def _profiled_latency(profiles: ProfileSet, member: str, batch_size: int) -> float | None:
    found = profiles.get(member, batch_size)
    return found.latency.median_s if found is not None and found.latency is not None else None


def suspect_profiles(profiles: ProfileSet, factor: float = 3.0) -> list[tuple[str, int, str]]:
    """Profiles that look disturbed by other work on the machine: (member, batch size, why).

    Two signs, each ``factor`` x or more: the time at the profile's thread count against its
    time at one thread (more intra-op threads are rarely that much slower on their own), and
    the time per sample against the member's time per sample at its smallest profiled batch
    (a larger batch is rarely slower per sample). On this project's 2-core machine, with another
    process busy on one core, torch at 2 threads took 0.5 s a call instead of 2 ms at 1; such a
    profile misleads the planner in every case its member is in.
    """
    smallest: dict[str, tuple[int, float]] = {}
    for p in profiles.profiles:
        if p.latency is not None and (p.member not in smallest or p.batch_size < smallest[p.member][0]):
            smallest[p.member] = (p.batch_size, p.latency.median_s / p.batch_size)
    found = []
    for p in profiles.profiles:
        reasons = []
        if p.cpu is not None and p.cpu.thread_scaling:
            times = dict(p.cpu.thread_scaling)
            one, used = times.get(1), times.get(p.cpu.threads)
            if one and used and used > factor * one:
                reasons.append(f"{used * 1e3:.1f} ms at {p.cpu.threads} threads, {one * 1e3:.1f} ms at 1")
        base = smallest.get(p.member)
        if p.latency is not None and base is not None and p.batch_size > base[0]:
            per_sample = p.latency.median_s / p.batch_size
            if per_sample > factor * base[1]:
                reasons.append(
                    f"{per_sample * 1e3:.2f} ms a sample, {base[1] * 1e3:.2f} ms at batch {base[0]}"
                )
        if reasons:
            found.append(
                (p.member, p.batch_size, f"{p.member} at batch {p.batch_size}: " + "; ".join(reasons))
            )
    return found


def reprofile(
    profiles: ProfileSet,
    members: dict[str, Member],
    suspects: Sequence[tuple[str, int, str]],
    device: Device,
    settings: ProfileSettings,
) -> ProfileSet:
    """Measure the suspect (member, batch size) profiles again, dropping their cache entries first."""
    cache = ProfileCache()
    names = list(dict.fromkeys(name for name, _, _ in suspects))
    sizes = sorted({b for _, b, _ in suspects})
    for name, batch, _ in suspects:
        member = members[name]
        cache.path_for(cache_key(member, device, batch, model_hash(member))).unlink(missing_ok=True)
    chosen = [members[name] for name in names]
    fresh = relabel(profile_isolated(chosen, device, sizes, settings=settings), chosen, sizes)
    again = {(name, batch) for name, batch, _ in suspects}
    replaced = {(p.member, p.batch_size): p for p in fresh.profiles if (p.member, p.batch_size) in again}
    return ProfileSet(tuple(replaced.get((p.member, p.batch_size), p) for p in profiles.profiles))


def short_command(args: Sequence[str]) -> str:
    """A process's program and script, without the rest of its command line (which may hold
    paths, options or an environment): ``python executor_overhead.py``, ``python -c``,
    ``python -m pytest``, ``bash``."""
    if not args:
        return ""
    program = os.path.basename(args[0])
    if not program.startswith("python"):
        return program[:40]
    for i, arg in enumerate(args[1:], start=1):
        if arg in ("-c", "-m"):
            module = args[i + 1] if arg == "-m" and i + 1 < len(args) else ""
            return f"{program} {arg} {module}".strip()[:60]
        if not arg.startswith("-"):
            return f"{program} {os.path.basename(arg)}"[:60]
    return program[:40]


class OtherLoad:
    """CPU time used by processes outside this one's process tree, sampled from ``/proc``.

    Other work on the machine distorts every figure here (see :func:`suspect_profiles`), so
    each case records how much CPU other processes took while it ran. Linux only (elsewhere
    ``available`` is False and every figure is None); kernel threads are left out, and a
    process that starts and ends between two samples is missed, so it is a lower bound.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self.available = os.path.isfile("/proc/self/stat") and os.path.isfile("/proc/uptime")
        self.interval_s = interval_s
        self.total_s = 0.0
        self.by_command: dict[str, float] = {}
        self._tick = os.sysconf("SC_CLK_TCK") if self.available else 100
        self._root = os.getpid()
        self._last: dict[int, float] = {}
        self._last_uptime = self._uptime()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _uptime(self) -> float:
        try:
            with open("/proc/uptime", encoding="ascii") as f:
                return float(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return 0.0

    def _scan(self) -> None:
        now = self._uptime()
        procs: dict[int, tuple[int, float, float]] = {}  # pid -> (ppid, cpu s, start s since boot)
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                    text = f.read()
                fields = text[text.rindex(")") + 2 :].split()
                ppid, cpu = int(fields[1]), (int(fields[11]) + int(fields[12])) / self._tick
                procs[int(entry.name)] = (ppid, cpu, int(fields[19]) / self._tick)
            except (OSError, ValueError, IndexError):
                continue
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)
        inside, frontier = {self._root}, [self._root]
        while frontier:
            for child in children.get(frontier.pop(), []):
                if child not in inside:
                    inside.add(child)
                    frontier.append(child)
        current: dict[int, float] = {}
        with self._lock:
            for pid, (ppid, cpu, start) in procs.items():
                if pid in inside or pid == 2 or ppid == 2:  # this run, and kernel threads
                    continue
                current[pid] = cpu
                before = self._last.get(pid)
                if before is None:
                    before = 0.0 if start >= self._last_uptime else cpu  # new since the last scan
                used = cpu - before
                if used > 0:
                    self.total_s += used
                    command = self._command(pid)
                    self.by_command[command] = self.by_command.get(command, 0.0) + used
            self._last = current
            self._last_uptime = now

    @staticmethod
    def _command(pid: int) -> str:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
        except OSError:
            args = []
        return short_command(args) or f"pid {pid}"

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._scan()

    def start(self) -> OtherLoad:
        if self.available:
            self._scan()
            self.total_s, self.by_command = 0.0, {}
            self._thread = threading.Thread(target=self._loop, name="other-load", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._scan()

    def mark(self) -> tuple[float, dict[str, float]]:
        """The totals so far, to subtract later with :meth:`since`."""
        with self._lock:
            return self.total_s, dict(self.by_command)

    def since(self, mark: tuple[float, dict[str, float]], wall_s: float, cores: int) -> dict[str, Any]:
        """Other processes' CPU since ``mark``: seconds, share of the cores, the top commands."""
        if not self.available:
            return {"cpu_s": None, "share": None, "top": []}
        self._scan()
        with self._lock:
            used = self.total_s - mark[0]
            top = {c: v - mark[1].get(c, 0.0) for c, v in self.by_command.items()}
        ranked = sorted(((v, c) for c, v in top.items() if v >= 0.05), reverse=True)[:5]
        share = used / (wall_s * max(1, cores)) if wall_s > 0 else None
        return {"cpu_s": used, "share": share, "top": [{"command": c, "cpu_s": v} for v, c in ranked]}


# --- one case ------------------------------------------------------------------------------------


def run_case(
    ensemble: Ensemble,
    label: str,
    device: Device,
    profiles: ProfileSet | VariantProfiles,
    batch_size: int,
    strategies: Sequence[str],
    settings: RunSettings,
    *,
    calibrate_pairs: int,
    calibrate_seconds: float,
    say: Any,
    other: OtherLoad | None = None,
    backends: str | None = None,
    settle_plans: int = SETTLE_PLANS,
    settle_rounds: int = SETTLE_ROUNDS,
    checkpoint: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], Report | None]:
    """Plan every strategy, run the distinct plans once each, and measure the planner.

    ``auto+backends`` in ``strategies`` (with ``backends`` and :class:`VariantProfiles`) is
    ``auto`` with each member's backend variant chosen among ``backends``. Every plan run
    (calibration's too) is appended to the record's ``runs`` as it ends, and ``checkpoint``
    is then called with the record so far.
    """
    record: dict[str, Any] = {}
    phase = "calibration"  # read by ran(), set as the case moves on

    def ran(label: str, plan: Plan, measured: PlanRun | None, failure: str | None) -> None:
        record["runs"].append(run_entry(phase, label, plan, measured, failure, time.perf_counter() - started))
        if checkpoint is not None:
            checkpoint(record)

    started = time.perf_counter()
    with observing_runs(ran):
        as_given = profiles.default_set if isinstance(profiles, VariantProfiles) else profiles
        other_mark = other.mark() if other is not None else None
        record.update(
            {
                "ensemble": label,
                "ensemble_name": ensemble.name,
                "members": [
                    {
                        "name": m.name,
                        "arch": getattr(m.source, "arch", None),
                        "scale": getattr(m.source, "scale", None),
                        "seed": getattr(m.source, "seed", None),
                        "profiled_latency_s": _profiled_latency(as_given, m.name, batch_size),
                    }
                    for m in ensemble.members
                ],
                "member_count": len(ensemble.members),
                "batch_size": batch_size,
                # the machine's load before the case: other work on the CPU distorts every figure
                "loadavg_before": list(os.getloadavg()),
                "runs": [],  # every plan run, calibration's included, in order (see run_case)
            }
        )

        calibration: Calibration | None = None
        calibration_error = None
        calibration_s = 0.0
        # the same for the members as given and for the variants auto+backends chooses
        calibrating: dict[str, Any] = {
            "batch_size": batch_size,
            "max_pairs": calibrate_pairs,
            "seconds": calibrate_seconds,
            "max_plans": settle_plans,
            "plan_rounds": settle_rounds,
            "run_settings": settings,
            "progress": say,
        }
        if "auto" in strategies and calibrate_pairs > 0:
            say(f"calibrating: up to {calibrate_pairs} member pair(s) that matter most to 'auto'")
            t0 = time.perf_counter()
            try:
                calibration = calibrate(ensemble, device, as_given, **calibrating)
            except ColocateError as exc:
                calibration_error = f"{type(exc).__name__}: {exc}"
                say(f"calibration failed, planning from the model alone: {calibration_error}")
            calibration_s = time.perf_counter() - t0
        interference = calibration.interference() if calibration is not None else None
        measured_plans = calibration.measured_plans() if calibration is not None else ()
        record["calibration"] = {
            "ran": calibration is not None,
            "error": calibration_error,
            "wall_s": calibration_s,
            **_measured(calibration),
        }

        # plan every strategy; identical slot layouts run once under a joined label
        planned: dict[str, Plan | None] = {}
        rejected: dict[str, str] = {}
        for name in strategies:
            chooses = name == WITH_BACKENDS
            try:
                planned[name] = make_plan(
                    ensemble,
                    device,
                    profiles,
                    strategy="auto" if chooses else name,
                    batch_size=batch_size,
                    model=calibration.model() if calibration is not None else None,
                    backends=(backends or "auto") if chooses else None,
                    measured_plans=measured_plans,
                )
            except ColocateError as exc:
                planned[name] = None
                rejected[name] = f"{type(exc).__name__}: {exc}"
        # the members' calibration measured them as given: measure the variants auto+backends chose
        phase = "calibration of the variants"
        record["calibration_backends"] = None
        chose = planned.get(WITH_BACKENDS)
        if (
            chose is not None
            and variant_key(chose)  # some member runs as another variant
            and calibration is not None
            and isinstance(profiles, VariantProfiles)
        ):
            t0 = time.perf_counter()
            try:
                planned[WITH_BACKENDS], variant_calibration = calibrate_backends(
                    ensemble, device, profiles, chose, **calibrating
                )
                record["calibration_backends"] = {
                    "error": None,
                    "wall_s": time.perf_counter() - t0,
                    **_measured(variant_calibration),
                }
            except ColocateError as exc:
                say(f"calibrating the variants failed, keeping the plan as chosen: {exc}")
                record["calibration_backends"] = {"error": f"{type(exc).__name__}: {exc}"}
        groups: dict[tuple[Any, ...], list[str]] = {}
        for name, made in planned.items():
            if made is not None:
                groups.setdefault(_layout_key(made), []).append(name)
        run_label: dict[str, str] = {}
        unique: list[Plan] = []
        for names in groups.values():
            joined = BASELINE if BASELINE in names else "=".join(names)
            for name in names:
                run_label[name] = joined
            first = planned[names[0]]
            assert first is not None
            unique.append(dataclasses.replace(first, strategy=joined))

        # what auto picks without the measured pairs (not run unless another strategy has its slots)
        auto_uncalibrated: Plan | None = None
        if "auto" in strategies and interference is not None:
            try:
                auto_uncalibrated = make_plan(
                    ensemble, device, profiles, strategy="auto", batch_size=batch_size
                )
            except ColocateError:
                auto_uncalibrated = None

        report: Report | None = None
        results: dict[str, PlanResult] = {}
        phase = "comparison"
        if unique:
            report = compare(
                ensemble,
                device,
                unique,
                profiles=profiles,
                batch_size=batch_size,
                settings=settings,
                calibration=calibration,
                progress=say,
            )
            results = {r.name: r for r in report.results}

        base = results.get(BASELINE)
        base_sps = base.measured_sps if base is not None else None
        base_p99 = base.run.latency.p99_s if base is not None and base.run and base.run.latency else None
        rows: list[dict[str, Any]] = []
        for name in strategies:
            made = planned.get(name)
            result = results.get(run_label.get(name, ""))
            run = result.run if result is not None else None
            latency = run.latency if run is not None else None
            measured = result.measured_sps if result is not None else None
            predicted = made.prediction.throughput_sps if made is not None else None
            uncalibrated = (
                result.uncalibrated_sps if result is not None and interference is not None else predicted
            )
            mem_pred = made.prediction.peak_memory_bytes if made is not None else None
            mem_meas = run.peak_memory_bytes if run is not None else None
            p99 = latency.p99_s if latency is not None else None
            status: str
            reason: str | None
            if result is None:
                status, reason = "rejected", rejected.get(name, "not run")
            else:
                status, reason = result.status, result.reason
            rows.append(
                {
                    "strategy": name,
                    "by_hand": BY_HAND.get(name),
                    "ran_as": run_label.get(name),
                    "status": status,
                    "reason": reason,
                    "slots": _slots_text(made),
                    "backends": _backends_text(made),
                    "slot_count": len(made.slots) if made is not None else None,
                    "slot_kinds": sorted({s.kind for s in made.slots}) if made is not None else [],
                    "measured_sps": measured,
                    "latency_p50_s": latency.median_s if latency is not None else None,
                    "latency_p99_s": p99,
                    "latency_high_variance": latency.high_variance if latency is not None else None,
                    "requests_completed": run.requests_completed if run is not None else None,
                    "concurrency": run.concurrency if run is not None else None,
                    "speedup": _ratio(measured, base_sps),
                    "p99_ratio": _ratio(p99, base_p99),
                    "predicted_sps": predicted,
                    "predicted_uncalibrated_sps": uncalibrated,
                    "throughput_error": _rel_error(predicted, measured),
                    "throughput_error_uncalibrated": _rel_error(uncalibrated, measured),
                    "predicted_latency_p99_s": made.prediction.latency_p99_s if made is not None else None,
                    "predicted_peak_memory_bytes": mem_pred,
                    "measured_peak_memory_bytes": mem_meas,
                    "memory_error": _rel_error(
                        float(mem_pred) if mem_pred is not None else None,
                        float(mem_meas) if mem_meas is not None else None,
                    ),
                }
            )
        record["strategies"] = rows

        # planner quality: one entry per distinct run (shared runs counted once)
        distinct = {r["ran_as"]: r for r in rows if r["ran_as"] is not None}.values()
        best = report.best if report is not None else None
        overall_best_sps = best.measured_sps if best is not None else None
        # auto's regret is against the plans of its own space (every member as given): auto+backends,
        # which may change the members' backends, is measured against everything
        # a plan that broke partway counts nowhere (as in Report.best): its throughput is that of
        # the requests it finished before it broke
        def counted(row: dict[str, Any]) -> bool:
            return row["measured_sps"] is not None and row["status"] in ("ok", "errors")

        same_space = [r["measured_sps"] for r in rows if r["strategy"] != WITH_BACKENDS and counted(r)]
        best_sps = max(same_space) if same_space else None
        auto_row = next((r for r in rows if r["strategy"] == "auto"), None)
        auto_sps = auto_row["measured_sps"] if auto_row is not None and counted(auto_row) else None
        regret = None
        if auto_row is not None and best_sps and auto_sps is not None:
            regret = max(0.0, (best_sps - auto_sps) / best_sps)
        uncal_regret = None
        uncal_same_as = None
        if auto_uncalibrated is not None and best_sps:
            key = _layout_key(auto_uncalibrated)
            for names in groups.values():
                made = planned[names[0]]
                if made is not None and _layout_key(made) == key:
                    uncal_same_as = run_label[names[0]]
            if uncal_same_as is not None:
                same = results.get(uncal_same_as)
                if same is not None and same.measured_sps is not None:
                    uncal_regret = max(0.0, (best_sps - same.measured_sps) / best_sps)
        # the bar a user sets: the best of the plans made by hand (a loop, a thread or a process each)
        by_hand = [r for r in rows if r["strategy"] in BY_HAND and counted(r)]
        best_by_hand = max(by_hand, key=lambda r: r["measured_sps"]) if by_hand else None
        with_backends = next((r for r in rows if r["strategy"] == WITH_BACKENDS), None)
        backends_sps = with_backends["measured_sps"] if with_backends is not None else None
        regret_backends = None
        if with_backends is not None and overall_best_sps and backends_sps is not None:
            regret_backends = max(0.0, (overall_best_sps - backends_sps) / overall_best_sps)
        spread = round_spread(calibration)
        pooled = pooled_regret(
            record["runs"],
            auto_row["slots"] if auto_row is not None and auto_row["measured_sps"] is not None else None,
            len(ensemble.members),
        )
        error_after = _median_abs([r["throughput_error"] for r in distinct]) if interference else None
        error_before = _median_abs([r["throughput_error_uncalibrated"] for r in distinct])
        record["planner"] = {
            "best": best.name if best is not None else None,
            "best_sps": overall_best_sps,
            "best_as_given_sps": best_sps,
            "auto": auto_row["ran_as"] if auto_row is not None else None,
            "auto_slots": auto_row["slots"] if auto_row is not None else None,
            "auto_sps": auto_sps,
            "auto_status": auto_row["status"] if auto_row is not None else None,
            "regret": regret,
            # run-to-run spread of the calibration's plans: a regret below it is within the noise
            "round_spread": spread,
            "regret_within_spread": (regret <= spread) if regret is not None and spread is not None else None,
            # the same from every run of each layout, calibration's included (medians per layout)
            "regret_pooled": pooled["regret"],
            "pooled": pooled,
            "best_by_hand": best_by_hand["strategy"] if best_by_hand is not None else None,
            "best_by_hand_sps": best_by_hand["measured_sps"] if best_by_hand is not None else None,
            "auto_vs_by_hand": _ratio(auto_sps, best_by_hand["measured_sps"]) if best_by_hand else None,
            "auto_uncalibrated_slots": _slots_text(auto_uncalibrated)
            if auto_uncalibrated is not None
            else None,
            "auto_uncalibrated_same_as": uncal_same_as,
            "regret_uncalibrated": uncal_regret,
            "calibrated": bool(interference),
            "calibration_pairs": len(interference or {}),
            "model_error_before": error_before,
            "model_error_after": error_after,
            "report_model_error": report.model_error(calibrated=True) if report is not None else None,
            "report_model_error_uncalibrated": (
                report.model_error(calibrated=False) if report is not None else None
            ),
            "memory_error": _median_abs([r["memory_error"] for r in distinct]),
            "auto_backends": with_backends["ran_as"] if with_backends is not None else None,
            "auto_backends_variants": with_backends["backends"] if with_backends is not None else None,
            "auto_backends_sps": backends_sps,
            "auto_backends_status": with_backends["status"] if with_backends is not None else None,
            "regret_backends": regret_backends,
            "backends_vs_auto": _ratio(backends_sps, auto_sps),
        }
        record["wall_s"] = time.perf_counter() - started
        if other is not None and other_mark is not None:
            record["other_load"] = other.since(other_mark, record["wall_s"], device.cpu_cores)
        return record, report


def run_entry(
    phase: str, label: str, plan: Plan, measured: PlanRun | None, failure: str | None, at_s: float
) -> dict[str, Any]:
    """One plan run as the JSON's ``runs`` lists it (:func:`colocate.comparison.run_record`,
    with the phase, the slots as the case's rows write them and when it ended)."""
    return {
        "phase": phase,
        **run_record(label, plan, measured, failure),
        "slots": _slots_text(plan),
        "backends": _backends_text(plan),
        "ended_at_s": at_s,
        # the plan as it ran, structured, with what the cost model predicted for it then: with
        # the profiles file (``profiles_file``), benchmarks/model_replay.py predicts it again
        "plan_slots": serde.to_dict(plan.slots),
        "plan_backends": serde.to_dict(plan.backends),
        "predicted_sps": plan.prediction.throughput_sps,
    }


# --- output --------------------------------------------------------------------------------------


def _pct(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.0%}" if signed else f"{value:.0%}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def case_table(record: dict[str, Any], device: Device) -> Any:
    from rich.table import Table

    title = (
        f"{record['ensemble']} ({record['member_count']} members), batch {record['batch_size']} "
        f"on {device.name}: ratios vs sequential"
    )
    table = Table(title=title)
    for column in (
        "strategy",
        "slots",
        "status",
        "samples/s",
        "speed-up",
        "p99 ms",
        "p99 ratio",
        "pred. (calib.)",
        "pred. (model)",
        "err after",
        "err before",
        "peak MiB pred/meas",
    ):
        table.add_column(column, justify="left" if column in ("strategy", "slots", "status") else "right")
    best = record["planner"]["best"]
    for r in record["strategies"]:
        name = r["strategy"]
        if r["by_hand"]:
            name += f"\n({r['by_hand']})"
        if r["ran_as"] and r["ran_as"] == best:
            name += " *"
        status = r["status"] if not r["reason"] else f"{r['status']}: {r['reason'][:50]}"
        if r["ran_as"] and r["ran_as"] != r["strategy"]:
            status += f" (ran as {r['ran_as']})"
        mem_pred, mem_meas = r["predicted_peak_memory_bytes"], r["measured_peak_memory_bytes"]
        memory = " / ".join(_num(v / _MIB if v else None, 0) for v in (mem_pred, mem_meas))
        slots = r["slots"] + (f"\nbackends: {r['backends']}" if r.get("backends") else "")
        table.add_row(
            name,
            slots,
            status,
            _num(r["measured_sps"]),
            "-" if r["speedup"] is None else f"{r['speedup']:.2f}x",
            _num(r["latency_p99_s"] * 1e3 if r["latency_p99_s"] is not None else None, 2)
            + (" (!)" if r["latency_high_variance"] else ""),
            "-" if r["p99_ratio"] is None else f"{r['p99_ratio']:.2f}x",
            _num(r["predicted_sps"]),
            _num(r["predicted_uncalibrated_sps"]),
            _pct(r["throughput_error"], signed=True),
            _pct(r["throughput_error_uncalibrated"], signed=True),
            memory,
        )
    return table


def summary_rows(cases: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for c in cases:
        p = c["planner"]
        best_row = next((r for r in c["strategies"] if r["ran_as"] == p["best"]), None)
        speedup = best_row["speedup"] if best_row is not None else None
        before, after = p["model_error_before"], p["model_error_after"]
        rows.append(
            [
                f"{c['ensemble']} b{c['batch_size']}",
                (p["best"] or "-") + (f" ({speedup:.2f}x)" if speedup is not None else ""),
                p["auto"] or "-",
                _regret_text(p),
                _versus_by_hand(p),
                _pct(p["regret_uncalibrated"])
                if p["regret_uncalibrated"] is not None
                else ("not run" if p["auto_uncalibrated_slots"] else "-"),
                f"{_pct(before)} -> {_pct(after)}" if after is not None else _pct(before),
                _pct(p["memory_error"]),
                _backends_summary(p),
                _other_text(c),
            ]
        )
    return rows


def _regret_text(planner: dict[str, Any]) -> str:
    """``"6% (runs spread 15%)"``: auto's regret and the calibration's run-to-run spread."""
    if planner["regret"] is None:
        return str(planner["auto_status"] or "-")
    notes = []
    if planner.get("round_spread") is not None:
        notes.append(f"runs spread {_pct(planner['round_spread'])}")
    pooled = planner.get("pooled") or {}
    if planner.get("regret_pooled") is not None and pooled.get("auto_runs", 0) > 1:
        notes.append(f"pooled {_pct(planner['regret_pooled'])}")
    return _pct(planner["regret"]) + (f" ({'; '.join(notes)})" if notes else "")


def _versus_by_hand(planner: dict[str, Any]) -> str:
    ratio, name = planner.get("auto_vs_by_hand"), planner.get("best_by_hand")
    return f"{ratio:.2f}x ({name})" if ratio is not None else "-"


def _backends_summary(planner: dict[str, Any]) -> str:
    if not planner.get("auto_backends"):
        return "-"
    regret, versus = planner.get("regret_backends"), planner.get("backends_vs_auto")
    if regret is None:
        return planner.get("auto_backends_status") or "-"
    return f"{_pct(regret)}, {versus:.2f}x" if versus is not None else _pct(regret)


SUMMARY_COLUMNS = (
    "case",
    "best measured (vs seq.)",
    "auto chose",
    "regret",
    "auto vs best by hand",
    "regret uncalib.",
    "model err before -> after",
    "mem err",
    "auto+backends: regret, vs auto",
    "other CPU",
)

#: other processes' share of the cores above which a case is flagged as disturbed
OTHER_LOAD_FLAG = 0.05


def _other_share(case: dict[str, Any]) -> float | None:
    load = case.get("other_load") or {}
    share = load.get("share")
    return float(share) if share is not None else None


def _other_text(case: dict[str, Any]) -> str:
    share = _other_share(case)
    if share is None:
        return "-"
    return f"{share:.0%}" + (" (!)" if share > OTHER_LOAD_FLAG else "")


def summary_table(cases: Sequence[dict[str, Any]], device: Device) -> Any:
    from rich.table import Table

    table = Table(title=f"planner quality on {device.name} (regret: best measured vs auto's plan)")
    for column in SUMMARY_COLUMNS:
        table.add_column(
            column, justify="left" if column in ("case", "best measured (vs seq.)", "auto chose") else "right"
        )
    for row in summary_rows(cases):
        table.add_row(*row)
    return table


def plot(cases: Sequence[dict[str, Any]], strategies: Sequence[str], device: Device, path: Path) -> Path:
    """Speed-up and p99 ratio vs sequential per case and strategy; regret and model error per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    labels = [
        f"{c['ensemble']}\nb{c['batch_size']}"
        + (f"\nother CPU {_other_share(c):.0%}" if (_other_share(c) or 0.0) > OTHER_LOAD_FLAG else "")
        for c in cases
    ]
    x = list(range(len(cases)))
    shown = [s for s in strategies if s != BASELINE]
    width = 0.8 / max(1, len(shown))
    fig, axes = plt.subplots(3, 1, figsize=(min(30.0, max(10.0, 0.2 * len(cases) * len(shown) + 5)), 12))
    colours = plt.get_cmap("tab10")
    for panel, field, title in (
        (axes[0], "speedup", "throughput vs sequential (higher is better)"),
        (axes[1], "p99_ratio", "p99 latency vs sequential (lower is better)"),
    ):
        for k, name in enumerate(shown):
            values = []
            for c in cases:
                row = next((r for r in c["strategies"] if r["strategy"] == name), None)
                values.append(row[field] if row is not None and row[field] is not None else float("nan"))
            offsets = [i - 0.4 + width * (k + 0.5) for i in x]
            legend = name + (f" ({BY_HAND[name]})" if name in BY_HAND else "")
            panel.bar(offsets, values, width, label=legend, color=colours(k % 10))
        panel.axhline(1.0, color="black", linewidth=0.8)
        panel.set_xticks(x, labels, fontsize=8)
        panel.set_title(title)
        panel.set_ylabel("ratio (sequential = 1)")
    axes[1].set_yscale("log", base=2)
    axes[1].yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axes[1].yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    quality = axes[2]
    series = (
        ("regret", "auto's regret", "#d62728"),
        ("model_error_before", "model error, uncalibrated", "#9ecae1"),
        ("model_error_after", "model error, calibrated", "#3182bd"),
    )
    w = 0.8 / len(series)
    for k, (field, legend, colour) in enumerate(series):
        values = [
            100 * c["planner"][field] if c["planner"][field] is not None else float("nan") for c in cases
        ]
        quality.bar([i - 0.4 + w * (k + 0.5) for i in x], values, w, label=legend, color=colour)
    quality.set_xticks(x, labels, fontsize=8)
    quality.set_ylabel("%")
    quality.set_title("planner quality: regret of auto, median throughput error of the cost model")
    quality.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    fig.suptitle(f"packing strategies on {device.name}")
    fig.tight_layout()
    return save_figure(fig, path)


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="best", help="cpu, cuda, cuda:N or best")
    parser.add_argument("--sizes", default="2,4,8,16", help="synthetic ensemble sizes (plus 'default')")
    parser.add_argument("--no-default", action="store_true", help="leave out the default ensemble")
    parser.add_argument("--batch-sizes", default="1,8,64")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="measured seconds per plan (default 2 on a GPU, 1.5 on the CPU)",
    )
    parser.add_argument("--requests", type=int, default=None, help="counted requests per plan instead")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="requests in flight, the same for every plan (0: the executor's default, two per slot)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="uncounted requests first (default: concurrency)"
    )
    parser.add_argument(
        "--scale",
        default=None,
        help="synthetic members' size: they alternate between it and half of it "
        "(default 0.5 on the CPU, small on a GPU; tiny and large do not alternate)",
    )
    parser.add_argument(
        "--default-scale", default=None, help="default ensemble's scale (small on CPU, large on GPU)"
    )
    parser.add_argument(
        "--calibrate-pairs",
        type=int,
        default=None,
        help="pairs measured for auto (0: none; default 3 on a GPU, 2 on the CPU)",
    )
    parser.add_argument("--calibrate-seconds", type=float, default=1.0, help="seconds per calibration run")
    parser.add_argument(
        "--settle-rounds",
        type=int,
        default=SETTLE_ROUNDS,
        help="interleaved rounds each plan the calibration settles among runs (default 2; the smoke run 1)",
    )
    parser.add_argument(
        "--settle-plans",
        type=int,
        default=SETTLE_PLANS,
        help="most candidate plans the calibration runs (2 rounds each) when they are predicted within "
        "20 %% of auto's pick; the plans made by hand run as well; auto picks the measured-best "
        "(0: pairs only)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of every plan, interleaved and rotated; medians are reported",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny and quick: the CI check that it works")
    parser.add_argument(
        "--allow-mps-start",
        action="store_true",
        help="GPU: mps plans may start a private MPS daemon (else they fail when none runs)",
    )
    parser.add_argument(
        "--backends",
        default=None,
        help="also plan auto+backends: each member's backend variant chosen among these "
        "(auto, or e.g. torch,onnxruntime); every member is profiled under each variant",
    )
    parser.add_argument("--out", default=None, help="result JSON; the PNG goes beside it")
    args = parser.parse_args()

    started = time.perf_counter()
    load_at_start = os.getloadavg()
    device = devices.find_device(args.device)
    if not device.can_execute:
        raise SystemExit(f"{device.name} cannot run members; give --device cpu or cuda")
    gpu = device.kind == "cuda"
    sizes = int_list(args.sizes)
    batch_sizes = int_list(args.batch_sizes)
    strategies = word_list(args.strategies)
    seconds: float | None = args.seconds if args.seconds is not None else (2.0 if gpu else 1.5)
    requests: int | None = args.requests
    synth_scale = _scale(args.scale) if args.scale else ("small" if gpu else 0.5)
    default_scale = _scale(args.default_scale) if args.default_scale else ("large" if gpu else "small")
    calibrate_pairs = args.calibrate_pairs if args.calibrate_pairs is not None else (3 if gpu else 2)
    profile_settings = ProfileSettings()
    smoke_cache: str | None = None
    if args.smoke:
        sizes, batch_sizes, strategies = [2], [1], list(SMOKE_STRATEGIES)
        seconds, requests = None, 4
        synth_scale = default_scale = "tiny"
        calibrate_pairs = args.calibrate_pairs or 0  # the CI smoke passes 1 to check calibration too
        args.calibrate_seconds = min(args.calibrate_seconds, 0.3)
        args.settle_plans = min(args.settle_plans, 2)
        args.settle_rounds = 1
        profile_settings = ProfileSettings(
            warmup=1,
            repeats=3,
            max_time_s=0.2,
            trace_batches=1,
            kernels=False,
            thread_scaling=False,
            energy=False,
        )
        # quick profiles must not land in the user's cache, where a full run would find them
        smoke_cache = tempfile.mkdtemp(prefix="colocate-packing-smoke-")
        os.environ["COLOCATE_CACHE_DIR"] = smoke_cache
    if requests is not None:
        seconds = None
    for name in strategies:
        if name not in STRATEGIES:
            raise SystemExit(f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}")
    if BASELINE not in strategies:
        strategies.insert(0, BASELINE)
    if args.backends:
        from colocate.variants import parse_backends

        try:
            parse_backends(args.backends)
        except ColocateError as exc:
            raise SystemExit(f"--backends: {exc}") from None
        strategies.append(WITH_BACKENDS)
    settings = RunSettings(
        requests=requests,
        seconds=seconds,
        concurrency=args.concurrency or None,
        warmup=args.warmup,
        allow_mps_start=args.allow_mps_start,
        repeats=args.repeats,
    )

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M")
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / f"{stamp}-{device_tag(device)}-packing.json"
    )
    png = out.with_suffix(".png")

    from rich.console import Console

    console = Console(width=220)

    def say(line: str) -> None:
        console.print(f"[dim]{time.perf_counter() - started:7.1f}s[/dim] {line}", highlight=False)

    ensembles: list[tuple[str, Ensemble]] = []
    if not args.no_default:
        ensembles.append(("default", zoo.default_ensemble(scale=default_scale)))
    pool = synthetic_members(max(sizes), synth_scale) if sizes else []
    for n in sizes:
        ensembles.append(
            (f"mixed-{n}", Ensemble(tuple(pool[:n]), name=f"mixed-{n}-{_scale_label(synth_scale)}"))
        )
    console.print(
        f"packing on {device.name}: {len(ensembles)} ensemble(s) x batch {batch_sizes}; "
        f"strategies {', '.join(strategies)}; "
        + "; ".join(f"{k} = {v}" for k, v in BY_HAND.items() if k in strategies),
        highlight=False,
    )

    # profile every member once (at every batch size) in a child process
    unique_members: dict[str, Member] = {}
    for _, ens in ensembles:
        for m in ens.members:
            unique_members.setdefault(m.name, m)
    say(f"profiling {len(unique_members)} member(s) at batch {batch_sizes}")
    other = OtherLoad().start()
    other_mark = other.mark()
    t0 = time.perf_counter()
    variants: VariantProfiles | None = None
    if args.backends:
        variants = profile_variants(
            list(unique_members.values()),
            device,
            batch_sizes,
            backends=args.backends,
            settings=profile_settings,
        )
        profiles = variants.default_set
        counts = ", ".join(f"{k} ({len(v.members)} members)" for k, v in variants.sets.items())
        say(f"backend variants profiled: {counts}")
    else:
        profiles = relabel(
            profile_isolated(list(unique_members.values()), device, batch_sizes, settings=profile_settings),
            list(unique_members.values()),
            batch_sizes,
        )
    profile_s = time.perf_counter() - t0
    say(f"profiled in {profile_s:.1f}s")
    suspects = suspect_profiles(profiles)
    for _, _, line in suspects:
        say(f"[yellow]suspect profile (is other work running on this machine?)[/yellow] {line}")
    still_suspect = suspects
    if suspects and variants is not None:
        say("with --backends the suspect profiles are kept (not measured again)")
    elif suspects:
        say(f"profiling the {len(suspects)} suspect profile(s) again")
        t0 = time.perf_counter()
        profiles = reprofile(profiles, unique_members, suspects, device, profile_settings)
        profile_s += time.perf_counter() - t0
        still_suspect = suspect_profiles(profiles)
        for _, _, line in still_suspect:
            say(f"[yellow]still suspect, kept:[/yellow] {line}")
    other_profiling = other.since(other_mark, profile_s, device.cpu_cores)
    # the profiles every prediction here came from, written before any case runs, so that a run
    # cut short keeps them too: benchmarks/model_replay.py predicts the measured plans again from
    # them with a later cost model, without the device
    profiles_path = out.with_name(f"{out.stem}-profiles.json")
    serde.save(variants if variants is not None else profiles, profiles_path)

    cases: list[dict[str, Any]] = []
    payload: dict[str, Any] = {}

    def save(finished: bool, in_progress: dict[str, Any] | None = None) -> None:
        payload.update(
            {
                "finished": finished,
                # the case being measured when this was written: its runs so far (None when done)
                "case_in_progress": in_progress,
                "smoke": args.smoke,
                "by_hand": BY_HAND,
                "strategies": strategies,
                "backends": args.backends,
                "variant_labels": list(variants.labels) if variants is not None else None,
                "ensemble_sizes": sizes,
                "batch_sizes": batch_sizes,
                "synthetic_scale": synth_scale,
                "default_scale": default_scale,
                "settings": {
                    "seconds": settings.seconds,
                    "requests": settings.requests,
                    "concurrency": settings.concurrency or "2 per slot",
                    "warmup": settings.warmup if settings.warmup is not None else "concurrency (at least 2)",
                    "isolated": settings.isolated,
                    "calibrate_pairs": calibrate_pairs,
                    "calibrate_seconds": args.calibrate_seconds,
                    "settle_plans": args.settle_plans,
                    "settle_rounds": args.settle_rounds,
                    "repeats": settings.repeats,
                    "profile": serde.to_dict(profile_settings),
                },
                "profile_wall_s": profile_s,
                "profiles_file": profiles_path.name,
                "loadavg_at_start": list(load_at_start),
                "suspect_profiles": [line for _, _, line in suspects],
                "suspect_profiles_after_retry": [line for _, _, line in still_suspect],
                "other_load_profiling": other_profiling,
                "other_load_flag": OTHER_LOAD_FLAG,
                "wall_s": time.perf_counter() - started,
                "cases": cases,
                "summary": {
                    "columns": list(SUMMARY_COLUMNS),
                    "rows": summary_rows(cases),
                },
            }
        )
        write_result(out, KIND, device, payload)

    try:
        for label, ens in ensembles:
            for batch in batch_sizes:
                say(f"case {label} ({len(ens.members)} members), batch {batch}")
                record, _ = run_case(
                    ens,
                    label,
                    device,
                    variants if variants is not None else profiles,
                    batch,
                    strategies,
                    settings,
                    calibrate_pairs=calibrate_pairs,
                    calibrate_seconds=args.calibrate_seconds,
                    say=say,
                    other=other,
                    backends=args.backends,
                    settle_plans=args.settle_plans,
                    settle_rounds=args.settle_rounds,
                    checkpoint=lambda partial: save(finished=False, in_progress=partial),
                )
                cases.append(record)
                console.print(case_table(record, device))
                save(finished=False)  # a run cut short keeps the cases done
        save(finished=True)
        if cases:
            plot(cases, strategies, device, png)
    finally:
        other.stop()
        if smoke_cache is not None:
            shutil.rmtree(smoke_cache, ignore_errors=True)
    console.print(summary_table(cases, device))
    console.print(
        "regret = (best measured - auto measured) / best measured (runs spread: the median over the "
        "calibration's plans of (fastest - slowest round) / median, what running a plan again can "
        "change); model error = median over the plans "
        "that ran of |predicted - measured| / measured throughput (before -> after calibration)",
        highlight=False,
    )
    disturbed = [c for c in cases if (_other_share(c) or 0.0) > OTHER_LOAD_FLAG]
    if disturbed:
        console.print(
            f"[yellow]other processes used over {OTHER_LOAD_FLAG:.0%} of the cores during "
            f"{len(disturbed)} case(s), marked (!): their figures are disturbed[/yellow] "
            + ", ".join(f"{c['ensemble']} b{c['batch_size']}" for c in disturbed),
            highlight=False,
        )
    if still_suspect:
        console.print(
            f"[yellow]{len(still_suspect)} profile(s) still look disturbed by other work on the machine; "
            "the predictions for cases with those members are suspect:[/yellow] "
            + "; ".join(line for _, _, line in still_suspect),
            highlight=False,
        )
    console.print(f"wrote {out} and {png} in {time.perf_counter() - started:.0f}s", highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
