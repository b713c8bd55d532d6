#!/usr/bin/env python3
"""Executor overhead: what colocate adds per request over calling the backends directly.

    python benchmarks/executor_overhead.py                        # the best device, its defaults
    python benchmarks/executor_overhead.py --device cpu --requests 300 --rounds 3
    python benchmarks/executor_overhead.py --smoke --device cpu --out /tmp/overhead.json

The default ensemble (``small`` on the CPU, ``large`` on a GPU, ``tiny`` with ``--smoke``)
answers ``--requests`` requests of ``--batch-size`` at concurrency 1, in these ways:

- ``direct``: the baseline. Each member's runner is created and activated once; per request
  every member is prepared and run (all enqueued first, as a slot does), then synchronised
  and fetched with ``to_numpy``, and ``Ensemble.combine_outputs`` combines them, in a plain
  loop of the calling thread. On the CPU torch gets the thread count a single slot gets.
- ``stream``: an :class:`~colocate.execution.Executor` with one stream slot holding every
  member (the same work as the loop, behind the executor's front).
- ``process``: one process slot holding every member (a spawned worker; the batch goes
  through shared memory).
- ``mps``: one mps slot at 100 % (on the CPU: a worker pinned to every core; on a GPU only
  with ``--allow-mps-start``, which lets the executor start a private MPS daemon).

Every configuration runs in a fresh child process, so that no earlier work in the same
process (loaded models, torch's thread pools) affects it: docs/results.md records a plan run
slowed by the profiling done before it in the same process. Each runs ``--rounds`` times, in
a rotating order; the medians are compared. Per request: time = wall time / requests;
overhead = executor time - direct time, also per member (divided by the number of members);
throughput loss = 1 - executor throughput / direct throughput. Targets: at most 50 µs per
member per request and 3 % throughput.

Writes JSON with the device, versions, date and command (default
``benchmarks/results/<UTC stamp>-<device>-executor-overhead.json``) and a PNG beside it:
overhead per member per request and throughput loss, by slot kind.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, write_result
from colocate import devices
from colocate.devices import Device

TARGET_US_PER_MEMBER = 50.0
TARGET_LOSS_PCT = 3.0
EXECUTOR_KINDS: tuple[str, ...] = ("stream", "process", "mps")
MODES: tuple[str, ...] = ("direct", *EXECUTOR_KINDS)


def device_tag(device: Device) -> str:
    """``cpu`` or the GPU's name as a file-name slug (e.g. ``nvidia-h200``)."""
    if device.kind == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device.name.lower()).strip("-") or device.kind


# --- the child: one configuration, in a fresh process ---------------------------------------------


def _latency_fields(samples: list[float]) -> dict[str, Any]:
    from colocate._timing import LatencyStats, percentile

    if not samples:
        return {"latency_p50_s": None, "latency_p95_s": None, "latency_p99_s": None, "latency_mean_s": None}
    stats = LatencyStats.from_samples(samples)
    return {
        "latency_p50_s": stats.median_s,
        "latency_p95_s": percentile(sorted(samples), 95),
        "latency_p99_s": stats.p99_s,
        "latency_mean_s": stats.mean_s,
    }


def _direct(
    device: Device, ensemble: Any, batch: Any, requests: int, warmup: int, threads: int | None
) -> dict[str, Any]:
    """The members' runners called in a loop of this thread: the same work as one stream slot."""
    from colocate.backends import create_runner
    from colocate.execution.base import make_slot_stream, set_torch_threads
    from colocate.execution.mps import usable_cores
    from colocate.planning.cost import cpu_threads_per_slot

    if device.kind == "cpu":
        # what one stream slot gets: --threads, else the executor's share of the cores for one slot
        set_torch_threads(threads or cpu_threads_per_slot(len(usable_cores()), 1))
    stream = make_slot_stream(device)
    runners = [create_runner(m, device, stream=stream) for m in ensemble.members]
    t0 = time.perf_counter()
    for runner in runners:
        runner.activate()
    load_s = time.perf_counter() - t0
    try:

        def one_request() -> None:
            launched = [(r, r.run(r.prepare(batch))) for r in runners]
            outputs = {}
            for r, handle in launched:
                r.synchronize()
                outputs[r.member.name] = r.to_numpy(handle)
            ensemble.combine_outputs(outputs)

        for _ in range(warmup):
            one_request()
        latencies = []
        start = time.perf_counter()
        for _ in range(requests):
            t = time.perf_counter()
            one_request()
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start

        # the same loop with each batch prepared once (no per-request input check and staging)
        prepared = [r.prepare(batch) for r in runners]
        once_start = time.perf_counter()
        for _ in range(requests):
            handles = [(r, r.run(p)) for r, p in zip(runners, prepared, strict=True)]
            outs = {}
            for r, handle in handles:
                r.synchronize()
                outs[r.member.name] = r.to_numpy(handle)
            ensemble.combine_outputs(outs)
        once_wall = time.perf_counter() - once_start
    finally:
        for runner in runners:
            runner.deactivate()
    return {
        "status": "ok",
        "error": None,
        "requests_completed": requests,
        "requests_failed": 0,
        "wall_s": wall,
        "load_s": load_s,
        "prepared_once_per_request_s": once_wall / requests,
        **_latency_fields(latencies),
    }


def _executor(
    kind: str,
    device: Device,
    ensemble: Any,
    batch: Any,
    requests: int,
    warmup: int,
    allow_mps_start: bool,
    threads: int | None,
) -> dict[str, Any]:
    from colocate.execution import Executor, run_requests
    from colocate.execution.mps import usable_cores
    from colocate.planning.types import Plan, Prediction, Slot

    members = ensemble.member_names
    if kind == "mps":
        # 100 %, or (CPU, --threads) the share of the cores that gives the worker that many threads
        share = 100.0 if threads is None else min(100.0, 100.0 * threads / len(usable_cores()))
        slot = Slot(name="s0", kind="mps", members=members, thread_percentage=share)
    else:
        slot = Slot(name="s0", kind=kind, members=members, cpu_threads=threads)  # type: ignore[arg-type]
    plan = Plan(
        device=device,
        batch_size=int(batch.shape[0]),
        slots=(slot,),
        prediction=Prediction(0.0, 0.0, 0.0, 0, members[0], "benchmark", ()),
        strategy=f"one {kind} slot",
    )
    t0 = time.perf_counter()
    with Executor(plan, ensemble, allow_mps_start=allow_mps_start) as executor:
        load_s = time.perf_counter() - t0
        result = run_requests(executor, requests=requests, batch=batch, concurrency=1, warmup=warmup)
    samples = list(result.latency.samples_s) if result.latency is not None else []
    return {
        "status": result.status,
        "error": "; ".join(result.errors) or None,
        "requests_completed": result.requests_completed,
        "requests_failed": result.requests_failed,
        "wall_s": result.wall_s,
        "load_s": load_s,
        **_latency_fields(samples),
    }


def child(args: argparse.Namespace) -> int:
    from colocate import zoo
    from colocate.execution import default_batch

    device = devices.find_device(args.device)
    ensemble = zoo.default_ensemble(scale=args.scale)
    batch = default_batch(ensemble, args.batch_size)
    try:
        if args.child == "direct":
            got = _direct(device, ensemble, batch, args.requests, args.warmup, args.threads)
        else:
            got = _executor(
                args.child,
                device,
                ensemble,
                batch,
                args.requests,
                args.warmup,
                args.allow_mps_start,
                args.threads,
            )
    except Exception as exc:
        got = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}",
            "requests_completed": 0,
            "wall_s": 0.0,
        }
    Path(args.child_out).write_text(json.dumps(got))
    return 0


# --- the parent: run every configuration in children, compare ------------------------------------


def _run_child(mode: str, args: argparse.Namespace, scale: str, requests: int, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="colocate-overhead-") as tmp:
        out = Path(tmp) / "child.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            mode,
            "--child-out",
            str(out),
            "--device",
            args.device,
            "--scale",
            scale,
            "--batch-size",
            str(args.batch_size),
            "--requests",
            str(requests),
            "--warmup",
            str(warmup),
        ]
        if args.allow_mps_start:
            command.append("--allow-mps-start")
        if args.threads is not None:
            command.extend(["--threads", str(args.threads)])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=args.child_timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return {
                "status": "failed",
                "error": f"child timed out after {args.child_timeout} s",
                "requests_completed": 0,
                "wall_s": 0.0,
                "child_s": time.perf_counter() - t0,
            }
        child_s = time.perf_counter() - t0
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            return {
                "status": "failed",
                "error": f"child exited {proc.returncode}: {' | '.join(tail)}",
                "requests_completed": 0,
                "wall_s": 0.0,
                "child_s": child_s,
            }
        got: dict[str, Any] = json.loads(out.read_text())
    got["child_s"] = child_s
    return got


def _per_request(run: dict[str, Any]) -> float | None:
    if run.get("status") != "ok" or not run.get("requests_completed"):
        return None
    return float(run["wall_s"]) / int(run["requests_completed"])


def summarise(
    runs: list[dict[str, Any]], modes: list[str], members: int, batch_size: int
) -> list[dict[str, Any]]:
    """Per mode: median per-request time and throughput over rounds, overhead against ``direct``.

    The overhead is the difference of the medians over rounds; ``paired_*`` is the median of
    each round's difference (the executor run against the direct run of the same round, minutes
    apart at most). ``noise_per_member_us`` is half the range of the direct runs' per-request
    times over the rounds, per member: an overhead below it is not resolved by this run.
    """
    per_mode: dict[str, dict[str, Any]] = {}
    direct_by_round = {r["round"]: _per_request(r) for r in runs if r["mode"] == "direct"}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        per_request = [t for t in (_per_request(r) for r in mine) if t is not None]
        p50 = [r["latency_p50_s"] for r in mine if _per_request(r) is not None and r.get("latency_p50_s")]
        paired = []
        for r in mine:
            t, base = _per_request(r), direct_by_round.get(r["round"])
            if t is not None and base is not None:
                paired.append(t - base)
        per_mode[mode] = {
            "mode": mode,
            "rounds_ok": len(per_request),
            "rounds": len(mine),
            "per_request_s": statistics.median(per_request) if per_request else None,
            "per_request_s_rounds": per_request,
            "throughput_sps": batch_size / statistics.median(per_request) if per_request else None,
            "latency_p50_s": statistics.median(p50) if p50 else None,
            "paired_overhead_s_rounds": paired,
            "errors": sorted({r["error"] for r in mine if r.get("error")}),
        }
    direct = per_mode.get("direct", {})
    base = direct.get("per_request_s")
    base_p50 = direct.get("latency_p50_s")
    base_rounds = direct.get("per_request_s_rounds") or []
    noise_us = (max(base_rounds) - min(base_rounds)) / 2 / members * 1e6 if len(base_rounds) > 1 else None
    rows = []
    for mode in modes:
        row = per_mode[mode]
        row["noise_per_member_us"] = noise_us
        t = row["per_request_s"]
        if mode == "direct" or t is None or base is None:
            row.update(
                overhead_per_request_s=None,
                overhead_per_member_us=None,
                overhead_per_member_us_rounds=[],
                paired_overhead_per_member_us=None,
                p50_overhead_per_member_us=None,
                throughput_loss_pct=None,
                within_target=None,
                resolved=None,
            )
        else:
            overhead = t - base
            per_member_us = overhead / members * 1e6
            loss = (1.0 - base / t) * 100.0  # 1 - executor throughput / direct throughput
            paired = row["paired_overhead_s_rounds"]
            row.update(
                overhead_per_request_s=overhead,
                overhead_per_member_us=per_member_us,
                overhead_per_member_us_rounds=[
                    (x - base) / members * 1e6 for x in row["per_request_s_rounds"]
                ],
                paired_overhead_per_member_us=(statistics.median(paired) / members * 1e6 if paired else None),
                p50_overhead_per_member_us=(
                    (row["latency_p50_s"] - base_p50) / members * 1e6
                    if row["latency_p50_s"] is not None and base_p50 is not None
                    else None
                ),
                throughput_loss_pct=loss,
                within_target=per_member_us <= TARGET_US_PER_MEMBER and loss <= TARGET_LOSS_PCT,
                resolved=None if noise_us is None else abs(per_member_us) > noise_us,
            )
        rows.append(row)
    return rows


def _fmt(value: float | None, scale_by: float, spec: str) -> str:
    return "-".rjust(int(spec.split(".")[0])) if value is None else format(value * scale_by, spec)


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Bars: overhead µs per member per request (rounds as error bars), and throughput loss %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [r for r in rows if r["mode"] != "direct"]
    names = [r["mode"] for r in kinds]
    values = [r["overhead_per_member_us"] or 0.0 for r in kinds]
    low = [
        max(0.0, v - min(r["overhead_per_member_us_rounds"] or [v]))
        for v, r in zip(values, kinds, strict=True)
    ]
    high = [
        max(0.0, max(r["overhead_per_member_us_rounds"] or [v]) - v)
        for v, r in zip(values, kinds, strict=True)
    ]
    loss = [r["throughput_loss_pct"] or 0.0 for r in kinds]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    x = list(range(len(names)))
    left.bar(x, values, yerr=[low, high], capsize=4, color="#3182bd")
    left.axhline(
        TARGET_US_PER_MEMBER, color="#e6550d", linestyle="--", label=f"target {TARGET_US_PER_MEMBER:.0f} µs"
    )
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_xticks(x, names)
    left.set_ylabel("µs per member per request")
    left.set_title("overhead over calling the runners directly")
    left.legend()
    right.bar(x, loss, color="#9ecae1")
    right.axhline(TARGET_LOSS_PCT, color="#e6550d", linestyle="--", label=f"target {TARGET_LOSS_PCT:.0f} %")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xticks(x, names)
    right.set_ylabel("%")
    right.set_title("throughput loss")
    right.legend()
    for i, r in enumerate(kinds):
        if r["per_request_s"] is None:
            left.annotate("failed", (i, 0), ha="center", va="bottom", rotation=90)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="best")
    parser.add_argument("--scale", default=None, help="zoo scale (default: large on a GPU, small on the CPU)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--requests", type=int, default=None, help="counted requests per run (default 300)")
    parser.add_argument("--warmup", type=int, default=None, help="uncounted requests first (default 20)")
    parser.add_argument("--rounds", type=int, default=None, help="runs of each configuration (default 5)")
    parser.add_argument("--modes", default=None, help=f"comma list of {', '.join(MODES)} (default all)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU: torch threads of the loop and of every slot (mps: that many cores); "
        "default: what the executor gives one slot (all usable cores)",
    )
    parser.add_argument("--allow-mps-start", action="store_true", help="GPU: run the mps slot, starting MPS")
    parser.add_argument("--child-timeout", type=float, default=600.0)
    parser.add_argument("--smoke", action="store_true", help="tiny ensemble, few requests, one round")
    parser.add_argument("--out", default=None, help="result JSON (the PNG goes beside it)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        args.requests = args.requests or 1
        args.warmup = args.warmup if args.warmup is not None else 0
        return child(args)

    device = devices.find_device(args.device)
    if not device.can_execute:
        raise SystemExit(f"device {device.name} cannot run models; use the CPU or a real GPU")
    gpu = device.kind == "cuda"
    scale = args.scale or ("tiny" if args.smoke else ("large" if gpu else "small"))
    requests = args.requests or (20 if args.smoke else 300)
    warmup = args.warmup if args.warmup is not None else (3 if args.smoke else 20)
    rounds = args.rounds or (1 if args.smoke else 5)
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else list(MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if "direct" not in modes:
        modes.insert(0, "direct")
    notes = [
        "each configuration runs in a fresh child process; the direct baseline never shares a "
        "process with an executor",
        "direct: prepare + run per member (all enqueued first), then synchronize + to_numpy, then "
        "combine_outputs, per request; 'prepared_once_per_request_s' is the same loop with the batch "
        "prepared once",
    ]
    if gpu and args.threads is not None:
        notes.append("--threads is for the CPU; on a GPU it sets only the slots' cpu_threads")
    notes.append(
        "threads: "
        + (
            f"{args.threads} (torch in the loop and in every slot; the mps worker on that many cores)"
            if args.threads is not None
            else "the executor's default for one slot (all usable cores)"
        )
    )
    skipped: dict[str, str] = {}
    if gpu and "mps" in modes and not args.allow_mps_start:
        modes.remove("mps")
        skipped["mps"] = "on a GPU the mps slot runs only with --allow-mps-start"
    from colocate import zoo

    members = len(zoo.ARCHITECTURES)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M")
    suffix = "" if args.threads is None else f"-t{args.threads}"
    out = (
        Path(args.out)
        if args.out
        else ROOT / "benchmarks" / "results" / f"{stamp}-{device_tag(device)}-executor-overhead{suffix}.json"
    )
    for mode, why in skipped.items():
        print(f"skipped {mode}: {why}", flush=True)
    load_before = os.getloadavg()
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]  # rotate: no mode always first
        for mode in order:
            got = _run_child(mode, args, scale, requests, warmup)
            got.update(mode=mode, round=r)
            runs.append(got)
            if got["status"] == "ok" and got.get("requests_completed"):
                per = got["wall_s"] / got["requests_completed"]
                print(
                    f"round {r + 1}/{rounds} {mode:>8}: {per * 1e3:8.3f} ms per request, "
                    f"{args.batch_size / per:8.1f} samples/s (child {got['child_s']:.1f} s)",
                    flush=True,
                )
            else:
                print(f"round {r + 1}/{rounds} {mode:>8}: {got['status']}: {got.get('error')}", flush=True)
    wall = time.perf_counter() - start
    rows = summarise(runs, modes, members, args.batch_size)
    print(
        f"\ndefault ensemble '{scale}' ({members} members) on {device.name}, batch {args.batch_size}, "
        f"{requests} requests x {rounds} round(s), concurrency 1, medians over rounds"
    )
    print(
        f"{'mode':<8} {'ms/request':>11} {'samples/s':>10} {'overhead ms':>12} {'µs/member':>10} "
        f"{'paired µs/m.':>12} {'p50 µs/m.':>10} {'noise µs/m.':>11} {'loss %':>7}  "
        f"target (≤{TARGET_US_PER_MEMBER:.0f} µs, ≤{TARGET_LOSS_PCT:.0f} %)"
    )
    for row in rows:
        verdict = "" if row["within_target"] is None else ("ok" if row["within_target"] else "MISSED")
        if row["resolved"] is False:
            verdict += " (within the run-to-run noise)"
        if row["per_request_s"] is None:
            verdict = "failed: " + "; ".join(row["errors"])[:80]
        cells = [
            _fmt(row["per_request_s"], 1e3, "11.3f"),
            _fmt(row["throughput_sps"], 1, "10.1f"),
            _fmt(row["overhead_per_request_s"], 1e3, "12.3f"),
            _fmt(row["overhead_per_member_us"], 1, "10.1f"),
            _fmt(row["paired_overhead_per_member_us"], 1, "12.1f"),
            _fmt(row["p50_overhead_per_member_us"], 1, "10.1f"),
            _fmt(row["noise_per_member_us"], 1, "11.1f"),
            _fmt(row["throughput_loss_pct"], 1, "7.2f"),
        ]
        print(f"{row['mode']:<8} " + " ".join(cells) + f"  {verdict}")
    png = plot(
        rows,
        f"executor overhead: '{scale}' ensemble on {device.name}, batch {args.batch_size}"
        + ("" if args.threads is None else f", {args.threads} thread(s)"),
        out.with_suffix(".png"),
    )
    write_result(
        out,
        "executor-overhead",
        device,
        {
            "smoke": args.smoke,
            "scale": scale,
            "members": members,
            "batch_size": args.batch_size,
            "requests": requests,
            "warmup": warmup,
            "rounds": rounds,
            "concurrency": 1,
            "threads": args.threads,
            "targets": {
                "us_per_member_per_request": TARGET_US_PER_MEMBER,
                "throughput_loss_pct": TARGET_LOSS_PCT,
            },
            "skipped": skipped,
            "notes": notes,
            "wall_s": wall,
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
            "summary": rows,
            "runs": runs,
            "plot": png.name,
        },
    )
    print(f"wrote {out} and {png.name} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
