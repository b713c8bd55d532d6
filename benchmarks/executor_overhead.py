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

``--reply-wait`` sets how the executor's ``predict`` waits for a process or mps slot's reply
(:class:`~colocate.execution.Executor`'s ``reply_wait``; ``auto`` polls near the expected
reply only when the worker leaves a core free, e.g. with ``--threads 1``); each run records
what it decided (``reply_polling``).

Every configuration runs in a fresh child process, so that no earlier work in the same
process (loaded models, torch's thread pools) affects it: docs/results.md records a plan run
slowed by the profiling done before it in the same process. Each runs ``--rounds`` times, in
a rotating order. Per request: time = wall time / requests; overhead = executor time - direct
time, also per member (divided by the number of members); throughput loss = 1 - executor
throughput / direct throughput. Targets: at most 50 µs per member per request and 3 %.

Three estimates are reported. *Dispatch (timed)*: the executor times every request itself
(:class:`~colocate.execution.EnsembleResult`: each slot's compute between clock readings taken
where the members ran, in the worker for process slots, and the combine), so its
``overhead_s`` (latency - the members' compute - the combine) is what it adds around the
members, measured per request and free of the members' run-to-run noise; the median per run,
then over rounds. It leaves out one thing: whether the members compute slower in their slot
than in the caller, which the interleaved runs report as "compute" (slot - direct).
*Separate processes*: the medians over rounds of each
configuration's own run, compared; on a small shared machine their run-to-run spread (printed
as "noise") can be far above the target. *Interleaved*: after its own run, each executor's
child loads the members' runners itself (after the executor started, so no torch work precedes
it) and alternates ``--interleave`` blocks of executor requests and direct requests; the
median of the per-block differences, then over rounds. Both sides then run seconds apart in
the same process, which resolves overheads far below the separate-process noise, though on
a small shared machine not always to the target's 50 µs.

Each executor's child also splits a request's latency (``predict_result``, a third as many
requests again): the time until the slot began (queued: checks, staging, the hand-off), the
members' compute, the time back (returned), the combine and the overhead; and the parent
measures the floor under any worker-process dispatch on this machine: a bare pipe round trip
to a spawned process that busy-waits the direct request's time (``pipe_floor``), and how much
slower a thread runs a front's reply-reading code right after idling (``idle_penalty``).

On the CPU the stream slot's interleaved figure is left out: its interleaved blocks
would run torch in two threads of one process (the slot's and the direct loop's), and with
torch's OpenMP pools that makes both sides about 3x slower here (28-33 ms against 10 ms a
request in the runs of 11:12 and 11:19 on 2026-11-27), which measures that effect, not
the executor. The process and mps fronts run no torch, so their interleaved figure stands.

Writes JSON with the device, versions, date and command (default
``benchmarks/results/<UTC stamp>-<device>-executor-overhead.json``) and a PNG beside it:
overhead per member per request and throughput loss, by slot kind.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import ROOT, device_tag, save_figure, write_result
from colocate import devices
from colocate.devices import Device
from colocate.execution.front import REPLY_WAITS

TARGET_US_PER_MEMBER = 50.0
TARGET_LOSS_PCT = 3.0
EXECUTOR_KINDS: tuple[str, ...] = ("stream", "process", "mps")
MODES: tuple[str, ...] = ("direct", *EXECUTOR_KINDS)
# the parts of a request's time, from its EnsembleResult (one slot), with their column widths
BREAKDOWN_PARTS: tuple[tuple[str, Callable[[Any], float], int], ...] = (
    ("latency", lambda r: r.latency_s, 9),
    ("queued", lambda r: r.slots[-1].queued_s, 8),
    ("compute", lambda r: r.slots[-1].compute_s, 9),
    ("returned", lambda r: r.slots[-1].returned_s, 9),
    ("combine", lambda r: r.combine_s, 8),
    ("overhead", lambda r: r.overhead_s, 9),
)
BREAKDOWN_KEYS: tuple[str, ...] = tuple(f"breakdown_{name}_s" for name, _, _ in BREAKDOWN_PARTS)


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


def _direct_threads(device: Device, threads: int | None) -> None:
    """Give torch in this process the threads one stream slot gets (--threads, else the executor's share)."""
    from colocate.execution.base import set_torch_threads
    from colocate.execution.mps import usable_cores
    from colocate.planning.cost import cpu_threads_per_slot

    if device.kind == "cpu":
        set_torch_threads(threads or cpu_threads_per_slot(len(usable_cores()), 1))


def _load_runners(device: Device, ensemble: Any) -> list[Any]:
    """Every member's runner, activated, on one slot-like stream (None on the CPU)."""
    from colocate.backends import create_runner
    from colocate.execution.base import make_slot_stream

    stream = make_slot_stream(device)
    runners = [create_runner(m, device, stream=stream) for m in ensemble.members]
    for runner in runners:
        runner.activate()
    return runners


def _direct_request(
    runners: list[Any], ensemble: Any, batch: Any, prepared: list[Any] | None = None
) -> tuple[float, float]:
    """One request without colocate: prepare + run every member (all enqueued first), then sync and
    fetch, then combine. Returns (compute seconds, combine seconds)."""
    start = time.perf_counter()
    if prepared is None:
        launched = [(r, r.run(r.prepare(batch))) for r in runners]
    else:
        launched = [(r, r.run(p)) for r, p in zip(runners, prepared, strict=True)]
    outputs = {}
    for r, handle in launched:
        r.synchronize()
        outputs[r.member.name] = r.to_numpy(handle)
    computed = time.perf_counter()
    ensemble.combine_outputs(outputs)
    return computed - start, time.perf_counter() - computed


def _direct(
    device: Device, ensemble: Any, batch: Any, requests: int, warmup: int, threads: int | None
) -> dict[str, Any]:
    """The members' runners called in a loop of this thread: the same work as one stream slot."""
    _direct_threads(device, threads)
    t0 = time.perf_counter()
    runners = _load_runners(device, ensemble)
    load_s = time.perf_counter() - t0
    try:
        for _ in range(warmup):
            _direct_request(runners, ensemble, batch)
        latencies = []
        start = time.perf_counter()
        for _ in range(requests):
            t = time.perf_counter()
            _direct_request(runners, ensemble, batch)
            latencies.append(time.perf_counter() - t)
        wall = time.perf_counter() - start
        # the same loop with the batch prepared once (no per-request input check and staging)
        prepared = [r.prepare(batch) for r in runners]
        once_start = time.perf_counter()
        for _ in range(requests):
            _direct_request(runners, ensemble, batch, prepared)
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


def _interleaved(
    executor: Any, device: Device, ensemble: Any, batch: Any, blocks: int, per_block: int, threads: int | None
) -> dict[str, Any]:
    """Blocks of executor requests and of direct requests, alternating, in the executor's process.

    The direct runners are loaded only now, after the executor has started and been measured,
    so no torch work precedes the executor's own start. Both sides see the same machine state
    within seconds, which removes most of the run-to-run noise of comparing separate processes.
    """
    _direct_threads(device, threads)
    runners = _load_runners(device, ensemble)
    try:
        for _ in range(3):
            _direct_request(runners, ensemble, batch)
            executor.predict(batch)
        executor_s, direct_s = [], []
        slot_compute, direct_compute = [], []
        for _ in range(blocks):
            t = time.perf_counter()
            for _ in range(per_block):
                result = executor.predict_result(batch)
                slot_compute.append(result.slots[-1].compute_s)
            executor_s.append((time.perf_counter() - t) / per_block)
            t = time.perf_counter()
            for _ in range(per_block):
                direct_compute.append(_direct_request(runners, ensemble, batch)[0])
            direct_s.append((time.perf_counter() - t) / per_block)
    finally:
        for runner in runners:
            runner.deactivate()
    diffs = [e - d for e, d in zip(executor_s, direct_s, strict=True)]
    return {
        "interleaved_blocks": blocks,
        "interleaved_requests_per_block": per_block,
        "interleaved_executor_s_blocks": executor_s,
        "interleaved_direct_s_blocks": direct_s,
        "interleaved_overhead_s": statistics.median(diffs),
        # the members' own time: in the slot (the slot's clock readings) and called directly
        "interleaved_slot_compute_s": statistics.median(slot_compute),
        "interleaved_direct_compute_s": statistics.median(direct_compute),
    }


def _breakdown(executor: Any, batch: Any, requests: int) -> dict[str, Any]:
    """Where one request's time goes (medians over ``requests`` predict_result calls, one slot)."""
    results = [executor.predict_result(batch) for _ in range(requests)]
    parts = {
        key: statistics.median([part(r) for r in results])
        for key, (_, part, _) in zip(BREAKDOWN_KEYS, BREAKDOWN_PARTS, strict=True)
    }
    return {"breakdown_requests": requests, **parts}


def _executor(
    kind: str,
    device: Device,
    ensemble: Any,
    batch: Any,
    requests: int,
    warmup: int,
    allow_mps_start: bool,
    threads: int | None,
    interleave_blocks: int,
    reply_wait: Any = "auto",
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
    with Executor(
        plan,
        ensemble,
        allow_mps_start=allow_mps_start,
        reply_wait=reply_wait,
    ) as executor:
        load_s = time.perf_counter() - t0
        reply_polling = executor.reply_polling
        result = run_requests(executor, requests=requests, batch=batch, concurrency=1, warmup=warmup)
        breakdown = _breakdown(executor, batch, max(5, requests // 3)) if result.status == "ok" else {}
        paired: dict[str, Any] = {}
        if kind == "stream" and device.kind == "cpu":
            interleave_blocks = 0  # two torch threads in one process: see the module doc
        if interleave_blocks > 0 and result.status == "ok":
            per_block = max(5, requests // interleave_blocks)
            paired = _interleaved(executor, device, ensemble, batch, interleave_blocks, per_block, threads)
    samples = list(result.latency.samples_s) if result.latency is not None else []
    overhead = result.overhead
    return {
        # what the executor's own timing says of each request: latency - member compute - combine
        "dispatch_overhead_p50_s": overhead.median_s if overhead is not None else None,
        "dispatch_overhead_p90_s": overhead.p90_s if overhead is not None else None,
        **breakdown,
        "reply_polling": reply_polling,  # how predict() waited for the worker's replies
        "status": result.status,
        "error": "; ".join(result.errors) or None,
        "requests_completed": result.requests_completed,
        "requests_failed": result.requests_failed,
        "wall_s": result.wall_s,
        "load_s": load_s,
        **_latency_fields(samples),
        **paired,
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
                args.interleave,
                args.reply_wait,
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


# --- the floor: what any process-based server pays per request on this machine ------------------


def _busy_wait(seconds: float) -> None:
    """Keep this thread on its core for ``seconds`` (no sleep, so the core never idles)."""
    until = time.perf_counter() + seconds
    while time.perf_counter() < until:
        pass


def _busy_worker(conn: Any, busy_s: float) -> None:
    """Answer each message after busy-waiting ``busy_s`` (a stand-in for the members' compute)."""
    while True:
        message = conn.recv_bytes()
        if message == b"stop":
            return
        _busy_wait(busy_s)
        conn.send_bytes(b"done")


def pipe_floor(busy_s: float, requests: int = 200) -> dict[str, Any]:
    """A bare pipe round trip to a spawned process that busy-waits ``busy_s`` per request.

    Both sides idle through the wait, as a process slot's front and worker do, so this is the
    cost of the two wake-ups and the pipe alone: the floor under any worker-process dispatch
    here (colocate's process slots, one process per model by hand, a server's worker pool).
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    worker = context.Process(target=_busy_worker, args=(theirs, busy_s), daemon=True)
    worker.start()
    try:
        extra = []
        for i in range(requests + 10):
            t = time.perf_counter()
            ours.send_bytes(b"run")
            ours.recv_bytes()
            if i >= 10:  # the first ones warm up
                extra.append(time.perf_counter() - t - busy_s)
        ours.send_bytes(b"stop")
    finally:
        worker.join(timeout=10.0)
        if worker.is_alive():
            worker.kill()
    return {
        "busy_s": busy_s,
        "requests": requests,
        "round_trip_extra_p50_s": statistics.median(extra),
        "round_trip_extra_p90_s": statistics.quantiles(extra, n=10)[-1],
    }


def idle_penalty(idle_s: float = 0.01, repeats: int = 300) -> dict[str, Any]:
    """How much slower a thread runs the same short code right after waiting ``idle_s``.

    The code is what a front does with a reply: read one small message from a pipe and
    unpickle it. Run back to back, after sleeping ``idle_s`` (the thread idles, as a front
    does while its worker computes), and after busy-waiting as long (the thread stays on
    its core). On a virtual machine the sleep can cost far more than the wake-up itself:
    caches and TLBs go cold while the core idles, which slows every hand-off that follows a wait.
    """
    import multiprocessing
    import pickle
    import select

    ours, theirs = multiprocessing.Pipe()
    ready = select.poll()
    ready.register(ours.fileno(), select.POLLIN)
    message = pickle.dumps(("ok", 1, [(f"m{i}", (4, 10), "<f4", bytes(160)) for i in range(5)], 0.0, 0.0))

    def read_one(wait: str) -> float:
        if wait == "sleep":
            time.sleep(idle_s)
        elif wait == "spin":
            _busy_wait(idle_s)
        theirs.send_bytes(message)
        start = time.perf_counter()
        while ready.poll(0):
            pickle.loads(ours.recv_bytes())
        return time.perf_counter() - start

    try:
        medians = {
            wait: statistics.median([read_one(wait) for _ in range(repeats)])
            for wait in ("back_to_back", "sleep", "spin")
        }
    finally:
        ours.close()
        theirs.close()
    return {
        "idle_s": idle_s,
        "repeats": repeats,
        "read_back_to_back_s": medians["back_to_back"],
        "read_after_sleep_s": medians["sleep"],
        "read_after_spin_s": medians["spin"],
    }


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
        command.extend(["--interleave", str(args.interleave), "--reply-wait", args.reply_wait])
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
    """Per mode, two estimates of the overhead against ``direct``.

    Separate processes (the configurations' own runs): the difference of the medians over rounds
    of the per-request time; ``paired_*`` is the median of each round's difference (the executor
    run against the direct run of the same round). ``noise_per_member_us`` is half the range of
    the direct runs over the rounds, per member: a difference below it is not resolved.

    Interleaved (``interleaved_*``): in each executor's process, blocks of executor requests and
    of direct requests alternated; the median over blocks of (executor - direct), then the
    median over rounds. Both sides run seconds apart, in the same process: the precise figure.
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
        inter = [r for r in mine if r.get("interleaved_overhead_s") is not None]
        inter_overhead = [r["interleaved_overhead_s"] for r in inter]
        inter_loss = []
        for r in inter:
            e = statistics.median(r["interleaved_executor_s_blocks"])
            d = statistics.median(r["interleaved_direct_s_blocks"])
            inter_loss.append((1.0 - d / e) * 100.0 if e > 0 else 0.0)
        dispatch = [
            (r["dispatch_overhead_p50_s"], r["latency_p50_s"])
            for r in mine
            if _per_request(r) is not None and r.get("dispatch_overhead_p50_s") is not None
        ]
        dispatch_us = [o / members * 1e6 for o, _ in dispatch]
        dispatch_loss = [o / lat * 100.0 for o, lat in dispatch if lat]
        compute_diff_us = [
            (r["interleaved_slot_compute_s"] - r["interleaved_direct_compute_s"]) / members * 1e6
            for r in inter
            if r.get("interleaved_slot_compute_s") is not None
        ]
        breakdown = {
            key: statistics.median(values)
            for key in BREAKDOWN_KEYS
            if (values := [r[key] for r in mine if r.get(key) is not None])
        }
        per_mode[mode] = {
            "mode": mode,
            "breakdown_s": breakdown,
            "reply_polling": sorted({r["reply_polling"] for r in mine if r.get("reply_polling")}),
            "dispatch_overhead_per_member_us": statistics.median(dispatch_us) if dispatch_us else None,
            "dispatch_overhead_per_member_us_rounds": dispatch_us,
            "dispatch_throughput_loss_pct": statistics.median(dispatch_loss) if dispatch_loss else None,
            "compute_difference_per_member_us": (
                statistics.median(compute_diff_us) if compute_diff_us else None
            ),
            "compute_difference_per_member_us_rounds": compute_diff_us,
            "rounds_ok": len(per_request),
            "rounds": len(mine),
            "per_request_s": statistics.median(per_request) if per_request else None,
            "per_request_s_rounds": per_request,
            "throughput_sps": batch_size / statistics.median(per_request) if per_request else None,
            "latency_p50_s": statistics.median(p50) if p50 else None,
            "paired_overhead_s_rounds": paired,
            "interleaved_overhead_s_rounds": inter_overhead,
            "interleaved_overhead_per_member_us": (
                statistics.median(inter_overhead) / members * 1e6 if inter_overhead else None
            ),
            "interleaved_overhead_per_member_us_rounds": [x / members * 1e6 for x in inter_overhead],
            "interleaved_throughput_loss_pct": statistics.median(inter_loss) if inter_loss else None,
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
        inter_us, inter_loss_pct = (
            row["interleaved_overhead_per_member_us"],
            row["interleaved_throughput_loss_pct"],
        )
        dispatch_us, dispatch_loss_pct = (
            row["dispatch_overhead_per_member_us"],
            row["dispatch_throughput_loss_pct"],
        )
        row["dispatch_within_target"] = (
            None
            if dispatch_us is None or dispatch_loss_pct is None
            else dispatch_us <= TARGET_US_PER_MEMBER and dispatch_loss_pct <= TARGET_LOSS_PCT
        )
        row["interleaved_within_target"] = (
            None
            if inter_us is None or inter_loss_pct is None
            else inter_us <= TARGET_US_PER_MEMBER and inter_loss_pct <= TARGET_LOSS_PCT
        )
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


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("ok" if ok else "MISSED")


def print_table(rows: list[dict[str, Any]]) -> None:
    print(
        f"{'mode':<8} {'ms/request':>10} {'samples/s':>9} | {'µs/member':>9} {'loss %':>7} | "
        f"{'µs/member':>9} {'loss %':>7} {'compute':>8} | {'µs/member':>9} {'noise':>6} {'loss %':>7}  "
        f"target ≤{TARGET_US_PER_MEMBER:.0f} µs and ≤{TARGET_LOSS_PCT:.0f} %"
    )
    print(
        f"{'':<8} {'':>10} {'':>9} | {'dispatch (timed)':<17} | {'interleaved':<26} | "
        f"{'separate processes':<25}"
    )
    for row in rows:
        if row["per_request_s"] is None:
            verdict = "failed: " + "; ".join(row["errors"])[:80]
        elif row["mode"] == "direct":
            verdict = ""
        else:
            verdict = (
                f"dispatch: {_verdict(row['dispatch_within_target'])}; "
                f"interleaved: {_verdict(row['interleaved_within_target'])}; "
                f"separate: {_verdict(row['within_target'])}"
            )
            if row["resolved"] is False:
                verdict += " (within the noise)"
        cells = [
            _fmt(row["per_request_s"], 1e3, "10.3f"),
            _fmt(row["throughput_sps"], 1, "9.1f"),
            "|",
            _fmt(row["dispatch_overhead_per_member_us"], 1, "9.1f"),
            _fmt(row["dispatch_throughput_loss_pct"], 1, "7.2f"),
            "|",
            _fmt(row["interleaved_overhead_per_member_us"], 1, "9.1f"),
            _fmt(row["interleaved_throughput_loss_pct"], 1, "7.2f"),
            _fmt(row["compute_difference_per_member_us"], 1, "8.1f"),
            "|",
            _fmt(row["overhead_per_member_us"], 1, "9.1f"),
            _fmt(row["noise_per_member_us"], 1, "6.0f"),
            _fmt(row["throughput_loss_pct"], 1, "7.2f"),
        ]
        print(f"{row['mode']:<8} " + " ".join(cells) + f"  {verdict}")
    print(
        "dispatch: the executor's own timing of each request (latency - the members' compute in the "
        "slot - the combine), medians; interleaved: executor and direct blocks alternated in one "
        "process ('compute': the members' time in the slot - called directly); separate: fresh "
        "processes compared, 'noise' half the direct runs' range. All per member per request."
    )


_ESTIMATES: tuple[tuple[str, str, str, str, str], ...] = (
    # (label, µs/member key, its rounds, loss % key, colour)
    (
        "dispatch (timed)",
        "dispatch_overhead_per_member_us",
        "dispatch_overhead_per_member_us_rounds",
        "dispatch_throughput_loss_pct",
        "#08519c",
    ),
    (
        "interleaved",
        "interleaved_overhead_per_member_us",
        "interleaved_overhead_per_member_us_rounds",
        "interleaved_throughput_loss_pct",
        "#6baed6",
    ),
    (
        "separate processes",
        "overhead_per_member_us",
        "overhead_per_member_us_rounds",
        "throughput_loss_pct",
        "#c6dbef",
    ),
)


def print_breakdown(rows: list[dict[str, Any]], floor: dict[str, Any] | None) -> None:
    """Where a request's time goes in each slot kind (µs per request, medians over rounds)."""
    header = " ".join(f"{name:>{width}}" for name, _, width in BREAKDOWN_PARTS)
    print(f"\n{'mode':<8} {header}   µs per request (the executor's own timing, medians over rounds)")
    for row in rows:
        parts = row.get("breakdown_s") or {}
        if not parts:
            continue
        cells = [
            _fmt(parts.get(key), 1e6, f"{width}.0f")
            for key, (_, _, width) in zip(BREAKDOWN_KEYS, BREAKDOWN_PARTS, strict=True)
        ]
        polling = ", ".join(row.get("reply_polling") or [])
        waits = f"   replies awaited: {polling}" if polling and row["mode"] != "stream" else ""
        print(f"{row['mode']:<8} " + " ".join(cells) + waits)
    if floor is not None:
        p50_us, p90_us = floor["round_trip_extra_p50_s"] * 1e6, floor["round_trip_extra_p90_s"] * 1e6
        print(
            f"floor: a bare pipe round trip to a process busy for {floor['busy_s'] * 1e3:.2f} ms adds "
            f"{p50_us:.0f} µs (p90 {p90_us:.0f}): what any worker-process dispatch pays here"
        )


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Bars by slot kind: overhead µs per member per request and throughput loss, three estimates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [r for r in rows if r["mode"] != "direct"]
    x = list(range(len(kinds)))
    width = 0.27
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for n, (label, key, rounds_key, loss_key, color) in enumerate(_ESTIMATES):
        offset = (n - 1) * width
        values = [r[key] or 0.0 for r in kinds]
        low = [max(0.0, v - min(r[rounds_key] or [v])) for v, r in zip(values, kinds, strict=True)]
        high = [max(0.0, max(r[rounds_key] or [v]) - v) for v, r in zip(values, kinds, strict=True)]
        left.bar(
            [i + offset for i in x], values, width, yerr=[low, high], capsize=3, color=color, label=label
        )
        right.bar(
            [i + offset for i in x], [r[loss_key] or 0.0 for r in kinds], width, color=color, label=label
        )
    left.axhline(
        TARGET_US_PER_MEMBER, color="#e6550d", linestyle="--", label=f"target {TARGET_US_PER_MEMBER:.0f} µs"
    )
    right.axhline(TARGET_LOSS_PCT, color="#e6550d", linestyle="--", label=f"target {TARGET_LOSS_PCT:.0f} %")
    for axis in (left, right):
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xticks(x, [r["mode"] for r in kinds])
        axis.legend(fontsize=8)
    left.set_ylabel("µs per member per request")
    left.set_title("overhead over calling the runners directly\n(bars: median; whiskers: range over rounds)")
    right.set_ylabel("%")
    right.set_title("throughput loss")
    for i, r in enumerate(kinds):
        if r["per_request_s"] is None:
            left.annotate("failed", (i, 0), ha="center", va="bottom", rotation=90)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


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
    parser.add_argument(
        "--interleave",
        type=int,
        default=None,
        help="blocks of executor and direct requests alternated in each executor's process after its "
        "run (default 10; 0: none)",
    )
    parser.add_argument(
        "--reply-wait",
        choices=REPLY_WAITS,
        default="auto",
        help="how predict() waits for a process or mps slot's replies (Executor's reply_wait; "
        "auto: polls near the expected reply when the worker leaves a core free, e.g. --threads 1)",
    )
    parser.add_argument("--allow-mps-start", action="store_true", help="GPU: run the mps slot, starting MPS")
    parser.add_argument("--child-timeout", type=float, default=600.0)
    parser.add_argument(
        "--smoke", action="store_true", help="tiny ensemble, few requests, one round (CPU: 1 thread)"
    )
    parser.add_argument("--out", default=None, help="result JSON (the PNG goes beside it)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        args.requests = args.requests or 1
        args.warmup = args.warmup if args.warmup is not None else 0
        args.interleave = args.interleave or 0
        return child(args)

    device = devices.find_device(args.device)
    if not device.can_execute:
        raise SystemExit(f"device {device.name} cannot run models; use the CPU or a real GPU")
    gpu = device.kind == "cuda"
    scale = args.scale or ("tiny" if args.smoke else ("large" if gpu else "small"))
    requests = args.requests or (20 if args.smoke else 300)
    warmup = args.warmup if args.warmup is not None else (3 if args.smoke else 20)
    rounds = args.rounds or (1 if args.smoke else 5)
    args.interleave = args.interleave if args.interleave is not None else (2 if args.smoke else 10)
    if args.smoke and args.threads is None and device.kind == "cpu":
        args.threads = 1  # smoke runs check the plumbing; one thread is robust to a busy machine
    modes = [m.strip() for m in args.modes.split(",")] if args.modes else list(MODES)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    if "direct" not in modes:
        modes.insert(0, "direct")
    notes = [
        "each configuration runs in a fresh child process; the direct baseline never shares a "
        "process with an executor",
        "interleaved: in each executor's child, after its own run, direct runners are loaded and "
        "blocks of executor.predict and of the direct loop alternate; the direct side there runs in a "
        "process that holds a started executor",
        "direct: prepare + run per member (all enqueued first), then synchronize + to_numpy, then "
        "combine_outputs, per request; 'prepared_once_per_request_s' is the same loop with the batch "
        "prepared once",
    ]
    if not gpu:
        notes.append(
            "CPU stream slot: no interleaved figure (torch in two threads of one process makes both "
            "sides about 3x slower); judge it by the separate-process figure"
        )
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
    suffix = ("" if args.threads is None else f"-t{args.threads}") + (
        "" if args.reply_wait == "auto" else f"-{args.reply_wait}"
    )
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
    rows = summarise(runs, modes, members, args.batch_size)
    direct_s = next((r["per_request_s"] for r in rows if r["mode"] == "direct"), None)
    # each probe about 2 s: the floor's requests take the direct request's time each
    floor_requests = 40 if args.smoke else min(200, max(40, int(2.0 / direct_s))) if direct_s else 0
    floor = pipe_floor(direct_s, requests=floor_requests) if direct_s else None
    penalty = idle_penalty(repeats=30 if args.smoke else 100)
    wall = time.perf_counter() - start
    print(
        f"\ndefault ensemble '{scale}' ({members} members) on {device.name}, batch {args.batch_size}, "
        f"{requests} requests x {rounds} round(s), concurrency 1, medians over rounds"
    )
    print_table(rows)
    print_breakdown(rows, floor)
    hot_us, slept_us, spun_us = (
        penalty[key] * 1e6 for key in ("read_back_to_back_s", "read_after_sleep_s", "read_after_spin_s")
    )
    print(
        f"after idling: reading a small reply takes {hot_us:.1f} µs back to back, {slept_us:.1f} µs after "
        f"sleeping {penalty['idle_s'] * 1e3:.0f} ms, {spun_us:.1f} µs after busy-waiting as long"
    )
    png = plot(
        rows,
        f"executor overhead: '{scale}' ensemble on {device.name}, batch {args.batch_size}"
        + ("" if args.threads is None else f", {args.threads} thread(s)")
        + f", reply_wait={args.reply_wait}",
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
            "reply_wait": args.reply_wait,
            "targets": {
                "us_per_member_per_request": TARGET_US_PER_MEMBER,
                "throughput_loss_pct": TARGET_LOSS_PCT,
            },
            "skipped": skipped,
            "notes": notes,
            "wall_s": wall,
            "load_average": {"before": list(load_before), "after": list(os.getloadavg())},
            "summary": rows,
            "pipe_floor": floor,
            "idle_penalty": penalty,
            "runs": runs,
            "plot": png.name,
        },
    )
    print(f"wrote {out} and {png.name} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
