"""Readable reasons for a plan, and the message when nothing fits.

Every line is written from the plan's own numbers: which member is critical and why it is
alone or shares, why members share a slot (the pair slowdown the cost model predicts for them
side by side, the contexts saved), why these slot kinds, what limits the throughput, and how
the memory adds up. Notes say which figures are measured and which are estimated.
"""

from __future__ import annotations

from colocate.planning.cost import CostModel, Engine, Evaluation, Layout, slot_name
from colocate.planning.demands import DemandSet
from colocate.planning.strategies import DESCRIPTIONS, Candidate, Context

_GIB = 1 << 30
_MIB = 1 << 20
HOST_BOUND_SHARE = 0.8
"""A member whose host share is at least this is called host-bound in explanations."""
CONFLICT_SLOWDOWN = 1.15
"""A pair slowdown at least this is called a conflict in explanations."""


def size_text(value: int) -> str:
    """Bytes as ``"1.23 GiB"`` or ``"456 MiB"``."""
    if value >= _GIB:
        return f"{value / _GIB:.2f} GiB"
    return f"{value / _MIB:.0f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1e-2 else f"{seconds * 1e3:.1f} ms"


def _process_word(demands: DemandSet) -> str:
    return "CUDA context" if demands.is_gpu else "worker process"


def _process_costs(model: CostModel, layout: Layout, demands: DemandSet) -> str:
    """What a layout's processes cost, e.g. ``"1 x 1001 MiB per CUDA context and 8 x 370 MiB
    per MPS client"``."""
    processes = model.processes(layout, demands)
    if not demands.is_gpu:
        size = size_text(demands.process_bytes)
        return f"{processes} x {size} per process (the serving process and each worker)"
    clients = sum(1 for s in layout if s.kind == "mps")
    parts = []
    if processes - clients:
        parts.append(f"{processes - clients} x {size_text(demands.process_bytes)} per CUDA context")
    if clients:
        parts.append(f"{clients} x {size_text(demands.mps_client_bytes)} per MPS client")
    return " and ".join(parts) or "no process cost"


def explain(
    ev: Evaluation,
    candidate: Candidate,
    *,
    strategy: str,
    ctx: Context,
    sequential: Evaluation,
    objective: str,
    latency_bound_s: float | None,
    considered: int,
    rejected: int,
    batch_note: str,
    settled: str | None = None,
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The explanation lines and the notes of a plan (``settled``: how measurement decided it)."""
    demands = ctx.demands
    engine = ctx.engine
    lines: list[str] = []
    layout = ev.layout
    if strategy == "auto" and settled:
        lines.append(
            f"auto: of {considered} feasible candidate layouts evaluated from every strategy, the "
            f"measured-best of those a calibration ran; it came from '{candidate.strategy}' "
            f"({DESCRIPTIONS[candidate.strategy]})"
        )
    elif strategy == "auto":
        lines.append(
            f"auto: the best predicted of {considered} feasible candidate layouts evaluated from every "
            f"strategy; it came from '{candidate.strategy}' ({DESCRIPTIONS[candidate.strategy]})"
        )
    else:
        lines.append(f"{strategy}: {DESCRIPTIONS[strategy]}")
    if settled:
        lines.append(settled)
    lines.extend(candidate.why)
    if rejected:
        lines.append(f"{rejected} candidate layout(s) were rejected: they do not fit in memory")
    if objective == "throughput":
        lines.append(f"chosen for throughput: {ev.throughput_sps:.0f} samples/s predicted")
    elif objective == "latency":
        lines.append(f"chosen for latency: {_ms(ev.latency_s)} median predicted")
    else:
        bound = latency_bound_s or 0.0
        lines.append(
            f"chosen for throughput with a median latency of at most {_ms(bound)}: "
            f"{ev.throughput_sps:.0f} samples/s at {_ms(ev.latency_s)}"
        )
    if layout != sequential.layout:
        lines.append(
            f"{ev.throughput_sps / sequential.throughput_sps:.2f}x the throughput of running the members one "
            f"after another ({sequential.throughput_sps:.0f} samples/s); latency {_ms(ev.latency_s)} instead "
            f"of {_ms(sequential.latency_s)}"
        )
    else:
        lines.append("this is the sequential baseline: no layout was predicted to do better")
    lines.extend(_critical_lines(ev, ctx))
    lines.extend(_slot_lines(ev, ctx))
    lines.extend(_kind_lines(ev, ctx))
    lines.append(_bound_line(ev, ctx))
    limit = engine.limit
    lines.append(
        f"peak memory {size_text(ev.peak_memory_bytes)} of {size_text(limit)} usable "
        f"({size_text(demands.memory_available_bytes)} free minus the {engine.model.safety_margin:.0%} "
        f"safety margin): per slot the weights plus its largest activation plus "
        f"{engine.model.allocator_margin:.0%}, and {_process_costs(engine.model, layout, demands)}"
    )
    return tuple(lines), _notes(ctx, batch_note, settled=settled is not None)


def _critical_lines(ev: Evaluation, ctx: Context) -> list[str]:
    layout = ev.layout
    c = ev.critical_slot
    slot = layout[c]
    member = ev.critical_member
    d = ctx.demands[member]
    j = slot.members.index(member)
    finish = ev.finishes_s[c][j]
    start = ev.starts_s[c][j]
    stretch = (finish - start) / d.latency_s
    head = (
        f"critical member: {member} finishes last, at {_ms(finish)} ({_ms(d.latency_s)} alone, "
        f"x{stretch:.2f} beside the other slots); a request is done when its slowest member is"
    )
    if len(slot.members) == 1:
        return [f"{head}; it runs alone in {slot_name(c)}, with nothing queued before it"]
    before = [m for m in slot.members if m != member]
    return [f"{head}; in {slot_name(c)} it runs after {', '.join(before)}"]


def _slot_lines(ev: Evaluation, ctx: Context) -> list[str]:
    lines: list[str] = []
    demands = ctx.demands
    engine = ctx.engine
    latest = max(ev.slot_end_s)
    straggler = ctx.straggler()
    for i, slot in enumerate(ev.layout):
        name = slot_name(i)
        if len(slot.members) == 1:
            m = slot.members[0]
            if m == straggler and m != ev.critical_member:
                lines.append(
                    f"{m} runs alone in {name}: it is the straggler ({_ms(demands[m].latency_s)} "
                    "alone), so no other member waits behind it"
                )
            continue
        serial = sum(demands[m].latency_s for m in slot.members)
        worst = 1.0
        pair = ("", "")
        members = slot.members
        for a_i, a in enumerate(members):
            for b in members[a_i + 1 :]:
                measured = engine.measured_pair(a, b, slot.kind)
                kind = (
                    "process" if slot.kind == "process" else "stream"
                )  # mps partitions overlap like streams
                value = measured if measured is not None else engine.pair_slowdown(a, b, kind)
                if value > worst:
                    worst, pair = value, (a, b)
        reasons: list[str] = []
        if worst >= CONFLICT_SLOWDOWN:
            reasons.append(f"side by side {pair[0]} and {pair[1]} would slow each other {worst:.2f}x")
        if ev.slot_end_s[i] < 0.97 * latest:
            reasons.append(
                f"together they finish at {_ms(ev.slot_end_s[i])}, before the request's {_ms(latest)}"
            )
        if slot.kind != "stream":
            word = "MPS client" if slot.kind == "mps" and demands.is_gpu else _process_word(demands)
            reasons.append(
                f"one {slot.kind} slot costs one {word} ({size_text(demands.worker_bytes(slot.kind))}) "
                f"instead of {len(members)}"
            )
        elif demands.is_gpu and all(demands[m].host_share >= HOST_BOUND_SHARE for m in members):
            reasons.append(
                "they are host-bound, so separate streams would wait for the same interpreter anyway"
            )
        text = "; ".join(reasons) if reasons else "the cost model predicts this grouping best"
        lines.append(f"{name} runs {', '.join(members)} one after another ({_ms(serial)} alone): {text}")
    return lines


def _kind_lines(ev: Evaluation, ctx: Context) -> list[str]:
    demands = ctx.demands
    layout = ev.layout
    lines: list[str] = []
    kinds = {s.kind for s in layout}
    if not demands.is_gpu:
        lines.append(
            "on the CPU a stream slot is a thread of the serving process, a process slot a worker process, "
            "an mps slot a worker process pinned to its share of the cores"
        )
    if "process" in kinds and demands.is_gpu:
        members = [m for s in layout if s.kind == "process" for m in s.members]
        host_bound = [m for m in members if demands[m].host_share >= HOST_BOUND_SHARE]
        if host_bound:
            verb = "is" if len(host_bound) == 1 else "are"
            lines.append(
                f"process slots: {', '.join(host_bound)} {verb} host-bound (host share >= "
                f"{HOST_BOUND_SHARE:.0%}); separate interpreters dispatch their work in parallel, where "
                "streams would take turns on one GIL; their kernels time-slice the GPU"
            )
        else:
            lines.append(
                "process slots: separate interpreters dispatch in parallel; their kernels time-slice the GPU"
            )
    streams = [s for s in layout if s.kind == "stream"]
    if len(streams) > 1 and demands.is_gpu:
        demand = sum(demands[m].busy_fraction * demands[m].sm_fill for s in streams for m in s.members[:1])
        lines.append(
            f"{len(streams)} stream slots share the serving process: their kernels overlap on the SMs "
            f"(their first members alone would use {demand:.2f} of the GPU at once); their host dispatch "
            "takes turns on one interpreter"
        )
    if "mps" in kinds:
        shares = ", ".join(
            f"{slot_name(i)} {s.percent:g} %" for i, s in enumerate(layout) if s.kind == "mps" and s.percent
        )
        if demands.is_gpu:
            lines.append(
                f"MPS partitions ({shares}): shares proportional to each slot's SM work (busy x fill x "
                "latency), capped at its widest member's fill; each client's memory limit is its need plus "
                f"its context, + {ctx.model.mps_limit_headroom:.0%}"
            )
        else:
            lines.append(f"core partitions ({shares}): shares proportional to each slot's core work")
    return lines


def _bound_line(ev: Evaluation, ctx: Context) -> str:
    value = dict(ev.bounds_s)[ev.bound]
    if ev.bound == "critical path":
        c = ev.critical_slot
        return (
            f"throughput is limited by the slowest slot, {slot_name(c)} ({_ms(value)} per request): requests "
            "are pipelined and each slot takes one at a time"
        )
    if ev.bound in ("SM time", "core time"):
        what = "the whole GPU" if ctx.demands.is_gpu else "all the cores"
        return (
            f"throughput is limited by {ev.bound}: the members' work needs {_ms(value)} of {what} "
            "per request; more concurrency cannot beat it (a larger batch, CUDA graphs or a lower "
            "precision can)"
        )
    if ev.bound == "time slicing":
        return (
            "throughput is limited by time slicing: without MPS the processes' kernels take turns "
            f"on the GPU ({_ms(value)} per request)"
        )
    if ev.bound == "host (GIL)":
        return (
            f"throughput is limited by the serving process's interpreter: {_ms(value)} of host dispatch per "
            "request under one GIL (worker processes or CUDA graphs would lift it)"
        )
    cores = ctx.demands.host_cores
    return f"throughput is limited by the host's {cores} cores: {_ms(value)} of host work per request"


def _notes(ctx: Context, batch_note: str, *, settled: bool = False) -> tuple[str, ...]:
    demands = ctx.demands
    notes: list[str] = []
    if batch_note:
        notes.append(batch_note)
    worker_note = _uncalibrated_workers_note(ctx, settled)
    if worker_note:
        notes.append(worker_note)
    if demands.device.kind == "simulated":
        notes.append(f"{demands.device.name} is simulated: every figure is a prediction")
    estimated = [d for d in demands.members if not d.measured]
    if estimated:
        measured = [d.member for d in demands.members if d.measured]
        notes.append(
            f"measured on this device at batch {demands.batch_size}: {', '.join(measured) or 'none'}; "
            f"estimated: {', '.join(d.member for d in estimated)}"
        )
        for d in estimated:
            notes.append(f"{d.member}: {d.source}")
    notes.append(f"per-process cost: {demands.process_bytes_source}")
    notes.extend(demands.notes)
    notes.append(
        "latency is for one request with the others idle; p99 adds the tail (p99 - median) of the "
        "members of the slots that finish last, independent tails adding in quadrature"
    )
    return tuple(dict.fromkeys(notes))


def _uncalibrated_workers_note(ctx: Context, settled: bool) -> str | None:
    """A caveat where the model alone decides between stream and worker slots and is least sure.

    On a GPU the model bounds worker processes of host-bound members by time slicing (their
    latencies add up). The lent GPUs measured such plans on both sides of the loop: about 0.4x
    for the default ensemble's five large members (H100 at batch 1 and 8, H200 at batch 8), 3.4x
    for eight small members at batch 1 (H100; docs/results.md). Only measuring tells which
    applies.
    """
    demands = ctx.demands
    if settled or not demands.is_gpu or ctx.model.worker_time_scale != 1.0:
        return None
    host_bound = [d.member for d in demands.members if d.host_share >= HOST_BOUND_SHARE]
    if len(host_bound) < 2:
        return None
    return (
        f"uncalibrated for worker processes: {len(host_bound)} members are host-bound (host share >= "
        f"{HOST_BOUND_SHARE:.0%}), and for such members the model bounds a process or MPS worker each "
        "by time slicing; lent GPUs measured those plans at 0.4x (five large members) to 3.4x (eight "
        "small members) a Python loop, so measure on the GPU before choosing between stream and worker "
        "slots: `colocate compare` there calibrates, and its calibration.json feeds "
        "`colocate plan --calibration`"
    )


def infeasible_message(strategy: str, demands: DemandSet, engine: Engine, smallest: Evaluation | None) -> str:
    """Why nothing fits: the memory available, the smallest need tried, and each member's need."""
    limit = engine.limit
    model = engine.model
    who = "no plan" if strategy == "auto" else f"strategy '{strategy}' has no plan that"
    parts = [
        f"{who} fits in memory on {demands.device.name} at batch {demands.batch_size}: "
        f"{size_text(limit)} usable ({size_text(demands.memory_available_bytes)} free minus the "
        f"{model.safety_margin:.0%} safety margin)"
    ]
    if smallest is not None:
        parts.append(
            f"the smallest candidate needs {size_text(smallest.peak_memory_bytes)} "
            f"({len(smallest.layout)} slot(s), {_process_costs(model, smallest.layout, demands)})"
        )
    needs = sorted(demands.members, key=lambda d: -d.memory_bytes)
    parts.append(
        "each member needs (weights + peak activations): "
        + ", ".join(
            f"{d.member} {size_text(d.memory_bytes)} ({size_text(d.weights_bytes)} + "
            f"{size_text(d.activation_bytes)})"
            for d in needs
        )
    )
    alone = [
        d.member
        for d in needs
        if engine.slot_memory((d.member,)) + (demands.process_bytes if demands.is_gpu else 0) > limit
    ]
    if alone:
        parts.append(f"{', '.join(alone)} alone need(s) more than is available")
    hint = "use a smaller batch size, fewer members, or a device with more free memory"
    if strategy not in ("auto", "sequential"):
        hint += "; or strategy 'sequential' or 'auto' (fewer processes, one slot's activations at a time)"
    parts.append(hint)
    return "; ".join(parts)


__all__ = ["explain", "infeasible_message", "size_text"]
