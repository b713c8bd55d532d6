"""Plans as text: one plan in full (``render_plan``), several side by side (``plan_rows``)."""

from __future__ import annotations

from collections.abc import Sequence

from colocate.planning.explain import size_text
from colocate.planning.types import Plan, Slot

PLAN_COLUMNS: tuple[str, ...] = (
    "strategy",
    "slots",
    "samples/s",
    "p50 ms",
    "p99 ms",
    "memory",
    "limited by",
    "critical member",
)
"""Column titles of :func:`plan_rows`."""


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}"


def slot_kind_text(slot: Slot) -> str:
    """``"stream"``, ``"process"``, or ``"mps 40%"`` (with threads on the CPU)."""
    if slot.kind != "mps":
        return slot.kind
    text = f"mps {slot.thread_percentage:g}%" if slot.thread_percentage is not None else "mps"
    if slot.cpu_threads is not None:
        text += f" ({slot.cpu_threads} thr)"
    return text


def backend_text(plan: Plan, member: str) -> str:
    """The member's backend variant in ``plan``: ``"onnxruntime (4.1x torch)"``, ``"torch"``, or ``"-"``."""
    choice = plan.backend_of(member)
    if choice is None:
        return "-"
    if choice.label == choice.default or not choice.default:
        return choice.label
    return f"{choice.label} ({choice.speedup_alone:.1f}x {choice.default})"


def slots_summary(plan: Plan) -> str:
    """Counts of slots by kind, e.g. ``"3 stream + 2 process"``."""
    counts: dict[str, int] = {}
    for slot in plan.slots:
        counts[slot.kind] = counts.get(slot.kind, 0) + 1
    return " + ".join(f"{n} {kind}" for kind, n in counts.items())


def render_plan(plan: Plan) -> str:
    """A plan as readable text: header, prediction, slots, members, reasons and notes."""
    p = plan.prediction
    out: list[str] = []
    out.append(
        f"Plan for {plan.device.name}, batch {plan.batch_size}: strategy {plan.strategy}, "
        f"objective {plan.objective}"
    )
    out.append(
        f"Predicted: {p.throughput_sps:.0f} samples/s, latency p50 {_ms(p.latency_s)} ms, "
        f"p99 {_ms(p.latency_p99_s)} ms, peak memory {size_text(p.peak_memory_bytes)}; "
        f"limited by {p.bound}; critical member {p.critical_member}"
    )
    by_member = {m.member: m for m in p.members}
    out.append("")
    out.append("Slots (members run one after another within a slot; slots run concurrently):")
    width = max(len(slot_kind_text(s)) for s in plan.slots)
    for slot in plan.slots:
        members = []
        for name in slot.members:
            m = by_member.get(name)
            if m is None:
                members.append(name)
                continue
            members.append(f"{name} ({_ms(m.start_s)}-{_ms(m.finish_s)} ms, x{m.slowdown:.2f})")
        extra = ""
        if slot.memory_limit_bytes is not None:
            extra = f"  [memory limit {size_text(slot.memory_limit_bytes)}]"
        elif slot.cpu_threads is not None and slot.kind != "mps":
            extra = f"  [{slot.cpu_threads} threads]"
        out.append(f"  {slot.name:<4} {slot_kind_text(slot):<{width}}  {', '.join(members)}{extra}")
    out.append("")
    header: tuple[str, ...] = (
        "member",
        "slot",
        "alone ms",
        "start ms",
        "finish ms",
        "slowdown",
        "memory",
        "source",
    )
    if plan.backends:
        header = (*header[:2], "backend", *header[2:])
    rows = [
        (
            m.member,
            m.slot,
            *((backend_text(plan, m.member),) if plan.backends else ()),
            _ms(m.alone_s),
            _ms(m.start_s),
            _ms(m.finish_s),
            f"x{m.slowdown:.2f}",
            size_text(m.memory_bytes),
            "measured" if m.source == "measured" else "estimated",
        )
        for m in p.members
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    out.append("  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    for r in rows:
        marker = " *" if r[0] == p.critical_member else ""
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + marker)
    out.append("  (* critical member)")
    if plan.explanation:
        out.append("")
        out.append("Why:")
        out.extend(f"  - {line}" for line in plan.explanation)
    if plan.notes:
        out.append("")
        out.append("Notes:")
        out.extend(f"  - {line}" for line in plan.notes)
    return "\n".join(out)


def plan_rows(plans: Sequence[Plan]) -> list[list[str]]:
    """One row per plan for a comparison table, columns :data:`PLAN_COLUMNS` (no title row)."""
    rows: list[list[str]] = []
    for plan in plans:
        p = plan.prediction
        rows.append(
            [
                plan.strategy,
                slots_summary(plan),
                f"{p.throughput_sps:.0f}",
                _ms(p.latency_s),
                _ms(p.latency_p99_s),
                size_text(p.peak_memory_bytes),
                p.bound,
                p.critical_member,
            ]
        )
    return rows


__all__ = ["PLAN_COLUMNS", "backend_text", "plan_rows", "render_plan", "slot_kind_text", "slots_summary"]
