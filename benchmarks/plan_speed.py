#!/usr/bin/env python3
"""Time ``plan(strategy="auto")`` for synthetic ensembles on a simulated H100, and write the result.

    python benchmarks/plan_speed.py                      # 16, 64 and 256 members, median of 5 runs
    python benchmarks/plan_speed.py --sizes 16,64,128 --runs 3 --out result.json
    python benchmarks/plan_speed.py --smoke --out /tmp/plan-speed.json   # 16 members, one run
    python benchmarks/plan_speed.py --strategy exhaustive --sizes 6,7,8 --runs 3
    python benchmarks/plan_speed.py --strategy all --sizes 8 --device cpu   # what a calibration plans
    python benchmarks/plan_speed.py --strategy all --sizes 8 --batch-size 8 \
        --profiles benchmarks/results/20261127T1959-nvidia-h100-80gb-hbm3-profile-default-ensemble.json

``--strategy`` times another strategy instead (the targets are auto's), or ``all``: every
strategy in one ``plan_all``, as a calibration plans its candidates twice (on 8 members that
includes ``exhaustive``'s 175,696 layouts).

``--profiles`` plans from recorded profiles instead of synthetic ones (a ProfileSet or
VariantProfiles file, or a ``profile_default_ensemble.py`` result, e.g. a lent GPU's): for the
device they were taken on, at ``--batch-size``, with the recorded members repeated under new
names (``resnet-0``, ``mobilenet-1``, ..., ``resnet-5``) to make each size.

The members are drawn by ``colocate.planning.synthetic.synthetic_profiles`` (seeded): latencies
0.3-30 ms, GPU busy 10-95 %, SM fill 0.3-1, host share 0.05-1, up to 1.5 GiB each. Targets:
16 members under 1 s, 64 under 10 s, 256 under 60 s. Planning runs on the CPU only; no GPU is
used. Each timed run also records where the time went: each strategy's candidates (proposed
and evaluated), the local search, the explanation, and the rest (demands, cost engine); the
medians over runs are printed and saved. A PNG beside the JSON shows the planning time per
size against its target and the share of each phase.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, save_figure, write_result
from colocate import devices
from colocate.planning import STRATEGIES, plan, plan_all
from colocate.planning import search as _search_module
from colocate.planning.strategies import STRATEGY_FUNCTIONS
from colocate.planning.synthetic import synthetic_profiles
from colocate.profiling.types import ProfileSet

_search: Any = _search_module  # patched by phase_timer, restored after

TARGETS_S = {16: 1.0, 64: 10.0, 256: 60.0}
LOCAL_SEARCH = "local search"
EXPLAIN = "explanation"
OTHER = "other (demands, engine, choice)"


@contextlib.contextmanager
def phase_timer(phases: dict[str, float]) -> Iterator[None]:
    """Time each strategy's candidate stream, the local search and the explanation of one plan().

    The search module looks these up at call time, so wrapping them here (and restoring them
    after) measures ``auto`` as it runs, without changing it. A strategy's time runs from its
    first candidate to its last, so it includes the evaluation of its candidates.
    """
    originals = dict(STRATEGY_FUNCTIONS)
    local_search, explain = _search.local_search, _search.explain

    def timed_strategy(name: str, fn: Any) -> Any:
        def wrapper(ctx: Any) -> Iterator[Any]:
            start = time.perf_counter()
            try:
                yield from fn(ctx)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    def timed(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    for name, fn in originals.items():
        STRATEGY_FUNCTIONS[name] = timed_strategy(name, fn)
    _search.local_search = timed(LOCAL_SEARCH, local_search)
    _search.explain = timed(EXPLAIN, explain)
    try:
        yield
    finally:
        STRATEGY_FUNCTIONS.update(originals)
        _search.local_search = local_search
        _search.explain = explain


def plot(results: list[dict[str, Any]], title: str, path: Path, strategy: str = "auto") -> Path:
    """Left: median planning time per size (log scale) with its target; right: share of each phase."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(r["members"]) for r in results]
    x = list(range(len(results)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.bar(x, [r["median_s"] for r in results], color="#3182bd", label="median")
    targets = [(i, r["target_s"]) for i, r in zip(x, results, strict=True) if r["target_s"] is not None]
    if targets:
        left.scatter(
            [i for i, _ in targets],
            [t for _, t in targets],
            marker="_",
            s=900,
            color="#e6550d",
            label="target",
            zorder=3,
        )
    left.set_yscale("log")
    left.set_xticks(x, labels)
    left.set_xlabel("members")
    left.set_ylabel("seconds")
    left.set_title(f"planning time of {strategy}")
    left.legend()
    phases = list(dict.fromkeys(p for r in results for p in r["phases_s"]))
    bottom = [0.0] * len(results)
    for phase in phases:
        shares = [
            r["phases_s"].get(phase, 0.0) / r["median_s"] * 100.0 if r["median_s"] > 0 else 0.0
            for r in results
        ]
        right.bar(x, shares, bottom=bottom, label=phase)
        bottom = [b + s for b, s in zip(bottom, shares, strict=True)]
    right.set_xticks(x, labels)
    right.set_xlabel("members")
    right.set_ylabel("% of the median time")
    right.set_title("where the time goes")
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def recorded_profiles(path: Path) -> ProfileSet:
    """The profiles of a recorded run (each member under its default backend)."""
    from benchmarks.model_replay import load_profiles

    loaded = load_profiles(path)
    return loaded if isinstance(loaded, ProfileSet) else loaded.default_set


def repeated_members(recorded: ProfileSet, count: int) -> ProfileSet:
    """``count`` members: the recorded ones in turn, each copy named ``<member>-<i>``."""
    members = recorded.members
    return ProfileSet(
        tuple(
            dataclasses.replace(p, member=f"{members[i % len(members)]}-{i}")
            for i in range(count)
            for p in recorded.profiles
            if p.member == members[i % len(members)]
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        "--members",
        dest="sizes",
        default=None,
        help="comma list of ensemble sizes (default 16,64,256)",
    )
    parser.add_argument(
        "--runs", type=int, default=None, help="timed runs per size (median reported; default 5)"
    )
    parser.add_argument("--device", default="h100", help="device to plan for (a preset or spec file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--strategy",
        default="auto",
        choices=[*STRATEGIES, "all"],
        help="strategy to time (default auto; 'all': every strategy in one plan_all, as a calibration does)",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the synthetic profiles")
    parser.add_argument("--smoke", action="store_true", help="16 members, one run")
    parser.add_argument(
        "--profiles",
        default=None,
        help="plan from recorded profiles (repeated under new names to make each size) on the "
        "device they were taken on, instead of synthetic ones",
    )
    parser.add_argument(
        "--out", default=None, help="result JSON (default: benchmarks/results/<date>-cpu-plan-speed.json)"
    )
    args = parser.parse_args()

    recorded = recorded_profiles(Path(args.profiles)) if args.profiles else None
    device = recorded.profiles[0].device if recorded is not None else devices.find_device(args.device)
    sizes = [int(n) for n in (args.sizes or ("16" if args.smoke else "16,64,256")).split(",")]
    runs = args.runs or (1 if args.smoke else 5)
    load_before = os.getloadavg()
    results = []
    for n in sizes:
        if recorded is not None:
            profiles = repeated_members(recorded, n)
        else:
            profiles = synthetic_profiles(n, device, seed=args.seed, batch_size=args.batch_size)
        names = profiles.members
        times = []
        run_phases: list[dict[str, float]] = []
        chosen = None
        for _ in range(runs):
            phases: dict[str, float] = {}
            with phase_timer(phases):
                start = time.perf_counter()
                if args.strategy == "all":
                    made = plan_all(names, device, profiles, batch_size=args.batch_size)
                    chosen = next(p for p in made if p.strategy == "auto")
                else:
                    chosen = plan(names, device, profiles, strategy=args.strategy, batch_size=args.batch_size)
                elapsed = time.perf_counter() - start
            phases[OTHER] = max(0.0, elapsed - sum(phases.values()))
            times.append(elapsed)
            run_phases.append(phases)
        assert chosen is not None
        median = statistics.median(times)
        target = TARGETS_S.get(n) if args.strategy == "auto" else None
        kinds: dict[str, int] = {}
        for slot in chosen.slots:
            kinds[slot.kind] = kinds.get(slot.kind, 0) + 1
        phase_names = list(dict.fromkeys(p for ph in run_phases for p in ph))
        phase_medians = {p: statistics.median(ph.get(p, 0.0) for ph in run_phases) for p in phase_names}
        dominant = max(phase_medians, key=lambda p: phase_medians[p])
        results.append(
            {
                "members": n,
                "runs": runs,
                "median_s": median,
                "min_s": min(times),
                "max_s": max(times),
                "times_s": times,
                "target_s": target,
                "within_target": None if target is None else median < target,
                "phases_s": phase_medians,
                "phases_s_runs": run_phases,
                "dominant_phase": dominant,
                "plan_slots": kinds,
                "plan_throughput_sps": chosen.prediction.throughput_sps,
                "plan_latency_s": chosen.prediction.latency_s,
                "plan_from": chosen.explanation[0] if chosen.explanation else "",
            }
        )
        verdict = ""
        if target is not None:
            verdict = f" (target < {target:.0f} s: {'ok' if median < target else 'MISSED'})"
        print(
            f"{args.strategy}, {n:3d} members on {device.name}: median {median:.3f} s over {runs} runs "
            f"(min {min(times):.3f}, max {max(times):.3f}){verdict}; "
            f"plan: {', '.join(f'{v} {k}' for k, v in kinds.items())}, "
            f"{chosen.prediction.throughput_sps:.0f} samples/s",
            flush=True,
        )
        ordered = sorted(phase_medians.items(), key=lambda kv: -kv[1])
        print(
            "    time by phase (median): "
            + ", ".join(f"{p} {t:.3f} s" for p, t in ordered)
            + f"; most: {dominant}",
            flush=True,
        )
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{stamp}-cpu-plan-speed.json"
    png = plot(
        results,
        f"{args.strategy} on {device.name} "
        f"({'recorded' if recorded is not None else 'synthetic'} members, planned on the CPU)",
        out.with_suffix(".png"),
        args.strategy,
    )
    write_result(
        out,
        "plan-speed",
        device,
        {
            "strategy": args.strategy,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "profiles": args.profiles,  # None: synthetic members
            "planning_host": "cpu",
            "smoke": args.smoke,
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
            "phases_note": (
                "a strategy's time includes evaluating its candidates; 'other' is the rest of plan()"
            ),
            "results": results,
            "plot": png.name,
        },
    )
    print(f"wrote {out} and {png.name}")
    return 0 if all(r["within_target"] in (None, True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
