#!/usr/bin/env python3
"""Time ``plan(strategy="auto")`` for synthetic ensembles on a simulated H100, and write the result.

    python benchmarks/plan_speed.py                      # 16 and 64 members, median of 5 runs
    python benchmarks/plan_speed.py --members 16,64,128 --runs 3 --out result.json

The members are drawn by ``colocate.planning.synthetic.synthetic_profiles`` (seeded): latencies
0.3-30 ms, GPU busy 10-95 %, SM fill 0.3-1, host share 0.05-1, up to 1.5 GiB each. Targets:
16 members under 1 s, 64 under 10 s. Planning runs on the CPU only; no GPU is used.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, write_result
from colocate import devices
from colocate.planning import plan
from colocate.planning.synthetic import synthetic_profiles

TARGETS_S = {16: 1.0, 64: 10.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", default="16,64", help="comma list of ensemble sizes")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per size (median reported)")
    parser.add_argument("--device", default="h100", help="device to plan for (a preset or spec file)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", default=None, help="result JSON (default: benchmarks/results/<date>-cpu-plan-speed.json)"
    )
    args = parser.parse_args()

    device = devices.find_device(args.device)
    sizes = [int(n) for n in args.members.split(",")]
    results = []
    for n in sizes:
        profiles = synthetic_profiles(n, device, seed=args.seed)
        names = profiles.members
        times = []
        chosen = None
        for _ in range(args.runs):
            start = time.perf_counter()
            chosen = plan(names, device, profiles)
            times.append(time.perf_counter() - start)
        assert chosen is not None
        median = statistics.median(times)
        target = TARGETS_S.get(n)
        kinds: dict[str, int] = {}
        for slot in chosen.slots:
            kinds[slot.kind] = kinds.get(slot.kind, 0) + 1
        results.append(
            {
                "members": n,
                "runs": args.runs,
                "median_s": median,
                "min_s": min(times),
                "max_s": max(times),
                "times_s": times,
                "target_s": target,
                "within_target": None if target is None else median < target,
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
            f"auto, {n:3d} members on {device.name}: median {median:.3f} s over {args.runs} runs "
            f"(min {min(times):.3f}, max {max(times):.3f}){verdict}; "
            f"plan: {', '.join(f'{v} {k}' for k, v in kinds.items())}, "
            f"{chosen.prediction.throughput_sps:.0f} samples/s",
            flush=True,
        )
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"{stamp}-cpu-plan-speed.json"
    write_result(
        out,
        "plan-speed",
        device,
        {"strategy": "auto", "seed": args.seed, "planning_host": "cpu", "results": results},
    )
    print(f"wrote {out}")
    return 0 if all(r["within_target"] in (None, True) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
