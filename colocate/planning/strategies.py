"""Strategies: each proposes candidate slot layouts; the search keeps the best predicted one.

=============  ==================================================================================
name           what it proposes
=============  ==================================================================================
sequential     one stream slot running every member one after another: the baseline
streams        one stream slot per member, all in the serving process
processes      one worker process per member (time-sliced on a GPU)
mps            one MPS partition per member, shares proportional to SM work
coloring       colour the compatibility graph (pairs that overlap well): each colour is a slot of
               members that hurt each other, run one after another; the straggler split out
packing        first-fit decreasing of members into K slots (K = 1..N) by latency and memory, the
               straggler first so it gets its own slot, smaller members filling up to its time
exhaustive     every partition of the members into slots, every slot kind (small ensembles only)
auto           the best of all of the above (exhaustive only up to 6 members), then a local search
=============  ==================================================================================

Slots of one plan are either streams and processes, or streams and MPS partitions (under MPS
every CUDA process is an MPS client), never processes and MPS partitions together.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx

from colocate.errors import InvalidInputError
from colocate.planning.cost import CostModel, Engine, Layout, SlotSpec, mps_percentages
from colocate.planning.demands import DemandSet
from colocate.planning.graph import compatibility_graph, conflict_graph

MAX_EXHAUSTIVE_MEMBERS = 8
"""Largest ensemble ``exhaustive`` accepts (8 members: 175,696 layouts)."""
AUTO_EXHAUSTIVE_MEMBERS = 6
"""``auto`` adds the exhaustive search up to this many members (6 members: 4,657 layouts)."""
COLORING_THRESHOLDS = (1.05, 1.15, 1.3, 1.6, 2.0)
"""Pair slowdowns above which ``coloring`` keeps two members out of concurrent slots."""
WORKER_KINDS = ("process", "mps")


@dataclass(frozen=True)
class Candidate:
    """A layout a strategy proposes, with the strategy's reason for it."""

    layout: Layout
    strategy: str
    why: tuple[str, ...] = ()


class Context:
    """What strategies read: the demands, the cost engine, conflict graphs (built once, lazily)."""

    def __init__(self, demands: DemandSet, engine: Engine) -> None:
        self.demands = demands
        self.engine = engine
        self.model: CostModel = engine.model
        self.order = {name: i for i, name in enumerate(demands.names)}
        self._graphs: dict[str, Any] = {}
        self._mps_shares: dict[tuple[tuple[str, ...], ...], tuple[float, ...]] = {}
        # set by a search while it runs: whether layouts no better than (throughput, latency)
        # could still win, so that ``exhaustive`` skips the sets of layouts bounded by that
        self.could_win: Callable[[float, float], bool] | None = None

    def graph(self, kind: str = "stream") -> Any:
        """The conflict graph for pairs in slots of ``kind``."""
        if kind not in self._graphs:
            self._graphs[kind] = conflict_graph(self.demands, kind=kind, engine=self.engine)
        return self._graphs[kind]

    def latency(self, member: str) -> float:
        return self.demands[member].latency_s

    def straggler(self) -> str:
        """The member with the longest latency alone."""
        return max(self.demands.names, key=lambda m: (self.latency(m), -self.order[m]))

    def layout(self, groups: Iterable[Sequence[str]], kinds: str | Sequence[str]) -> Layout:
        """A canonical layout of ``groups``, each of ``kinds`` (one kind, or one per group)."""
        members = [tuple(g) for g in groups if g]
        kind_list = [kinds] * len(members) if isinstance(kinds, str) else list(kinds)
        return self.canonical(tuple(SlotSpec(k, g) for g, k in zip(members, kind_list, strict=True)))

    def canonical(self, layout: Layout) -> Layout:
        """Members of each slot in ensemble order, slots by their first member; MPS shares set."""
        slots = [
            SlotSpec(s.kind, tuple(sorted(s.members, key=self.order.__getitem__)), s.percent)
            for s in layout
            if s.members
        ]
        slots.sort(key=lambda s: self.order[s.members[0]])
        return self.with_mps_shares(slots)

    def with_mps_shares(self, slots: list[SlotSpec]) -> Layout:
        """``slots`` (already in canonical order) with their MPS shares set."""
        mps = [i for i, s in enumerate(slots) if s.kind == "mps"]
        if mps:
            groups = tuple(slots[i].members for i in mps)
            shares = self._mps_shares.get(groups)
            if shares is None:
                shares = mps_percentages(groups, self.demands)
                self._mps_shares[groups] = shares
            for i, share in zip(mps, shares, strict=True):
                slots[i] = SlotSpec("mps", slots[i].members, share)
        return tuple(slots)


StrategyFn = Callable[[Context], Iterator[Candidate]]


def _sequential(ctx: Context) -> Iterator[Candidate]:
    yield Candidate(
        ctx.layout([ctx.demands.names], "stream"),
        "sequential",
        ("one slot runs every member one after another: the baseline every user has",),
    )


def _streams(ctx: Context) -> Iterator[Candidate]:
    yield Candidate(
        ctx.layout([[m] for m in ctx.demands.names], "stream"),
        "streams",
        (
            "one stream per member in the serving process: kernels overlap, "
            "host dispatch shares one interpreter",
        ),
    )


def _processes(ctx: Context) -> Iterator[Candidate]:
    yield Candidate(
        ctx.layout([[m] for m in ctx.demands.names], "process"),
        "processes",
        ("one worker process per member: host work runs in parallel, the GPU time-slices between them",),
    )


def _mps(ctx: Context) -> Iterator[Candidate]:
    yield Candidate(
        ctx.layout([[m] for m in ctx.demands.names], "mps"),
        "mps",
        (
            "one MPS partition per member, its share of the SMs proportional to its SM work "
            "(busy x fill x latency), so the straggler gets the largest",
        ),
    )


def _split_straggler(ctx: Context, groups: list[list[str]]) -> list[list[str]] | None:
    """Fork-join rule: the straggler runs alone when its slot takes notably longer than it does."""
    straggler = ctx.straggler()
    for g in groups:
        if straggler in g and len(g) > 1:
            serial = sum(ctx.latency(m) for m in g)
            if serial > 1.1 * ctx.latency(straggler):
                rest = [m for m in g if m != straggler]
                return [*[x for x in groups if x is not g], [straggler], rest]
    return None


def _coloring(ctx: Context) -> Iterator[Candidate]:
    for kind in ("stream", "process", "mps"):
        # MPS partitions interfere like streams (their kernels overlap); their share caps are set after
        conflicts = ctx.graph("process" if kind == "process" else "stream")
        for threshold in COLORING_THRESHOLDS:
            compatible = compatibility_graph(conflicts, threshold)
            colours = nx.greedy_color(compatible, strategy="DSATUR")
            classes: dict[int, list[str]] = {}
            for member in ctx.demands.names:
                classes.setdefault(int(colours[member]), []).append(member)
            groups = list(classes.values())
            why = (
                f"members whose pair slowdown side by side exceeds {threshold:.2f}x share a {kind} slot "
                "and run one after another (colour classes of the compatibility graph)",
            )
            yield Candidate(ctx.layout(groups, kind), "coloring", why)
            split = _split_straggler(ctx, groups)
            if split is not None:
                yield Candidate(
                    ctx.layout(split, kind),
                    "coloring",
                    (*why, f"the straggler {ctx.straggler()} was given its own slot (fork-join)"),
                )


def _slot_counts(n: int) -> list[int]:
    counts = {1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, n}
    return sorted(k for k in counts if 1 <= k <= n)


def pack(ctx: Context, kind: str, slots: int, order: Sequence[str]) -> list[list[str]] | None:
    """First-fit decreasing of ``order`` into at most ``slots`` slots of ``kind``; None if memory fails.

    Each slot may take up to the target time ``max(longest member, total / slots)`` of serial
    work; a member goes to the first slot where it fits in time and memory, else to a new slot
    while there are fewer than ``slots`` and memory allows one (leaving room for the weights of
    the members still to place), else to the least loaded slot that has the memory.
    """
    engine = ctx.engine
    demands = ctx.demands
    target = max(max(ctx.latency(m) for m in order), sum(ctx.latency(m) for m in order) / slots) * 1.0001
    per_process = demands.worker_bytes(kind)  # 0 for a stream slot
    worker = kind != "stream"
    serving = demands.process_bytes if demands.is_gpu and not worker else 0
    bins: list[list[str]] = []
    times: list[float] = []
    mems: list[int] = []
    total = serving
    margin = 1.0 + ctx.model.allocator_margin
    # weights of the members still to place: a new slot must leave room for them
    reserve = [0.0] * (len(order) + 1)
    for i in range(len(order) - 1, -1, -1):
        reserve[i] = reserve[i + 1] + demands[order[i]].weights_bytes * margin
    for index, m in enumerate(order):
        lm = ctx.latency(m)
        placed = False
        for i, b in enumerate(bins):
            if times[i] + lm <= target:
                new = engine.slot_memory((*b, m))
                if total - mems[i] + new <= engine.limit:
                    b.append(m)
                    times[i] += lm
                    total += new - mems[i]
                    mems[i] = new
                    placed = True
                    break
        if placed:
            continue
        own = engine.slot_memory((m,)) + (per_process if worker else 0)
        if len(bins) < slots and total + own + reserve[index + 1] <= engine.limit:
            bins.append([m])
            times.append(lm)
            mems.append(own - (per_process if worker else 0))
            total += own
            continue
        fitting = []
        for i, b in enumerate(bins):
            new = engine.slot_memory((*b, m))
            if total - mems[i] + new <= engine.limit:
                fitting.append((times[i], i, new))
        if not fitting:
            return None
        _, i, new = min(fitting)
        bins[i].append(m)
        times[i] += lm
        total += new - mems[i]
        mems[i] = new
    return bins


def _packing(ctx: Context) -> Iterator[Candidate]:
    names = ctx.demands.names
    by_time = sorted(names, key=lambda m: (-ctx.latency(m), -ctx.demands[m].memory_bytes, ctx.order[m]))
    by_memory = sorted(names, key=lambda m: (-ctx.demands[m].memory_bytes, -ctx.latency(m), ctx.order[m]))
    for kind in ("stream", "process", "mps"):
        for slots in _slot_counts(len(names)):
            for label, order in (("latency", by_time), ("memory", by_memory)):
                groups = pack(ctx, kind, slots, order)
                if groups is None:
                    continue
                yield Candidate(
                    ctx.layout(groups, kind),
                    "packing",
                    (
                        f"first-fit decreasing by {label} into at most {slots} {kind} slot(s) of up to "
                        "the straggler's time each, within memory: the straggler first, small members "
                        "packed together after it",
                    ),
                )


# ---------------------------------------------------------------------------
# Exhaustive
# ---------------------------------------------------------------------------


def _stirling2(n: int, k: int) -> int:
    row = [1] + [0] * k
    for i in range(1, n + 1):
        for j in range(min(i, k), 0, -1):
            row[j] = j * row[j] + row[j - 1]
        row[0] = 0
    return row[k]


def bell_number(n: int) -> int:
    """Number of partitions of ``n`` members into slots."""
    return sum(_stirling2(n, k) for k in range(n + 1))


def exhaustive_count(n: int) -> int:
    """Layouts ``exhaustive`` evaluates for ``n`` members: partitions x kind assignments.

    A partition into ``k`` slots has ``2^(k+1) - 1`` kind assignments: each slot a stream or a
    process, or each a stream or an MPS partition (all-stream counted once).
    """
    return sum(_stirling2(n, k) * (2 ** (k + 1) - 1) for k in range(1, n + 1))


def check_exhaustive(n: int) -> None:
    """Raise :class:`InvalidInputError` when ``n`` members are too many for ``exhaustive``."""
    if n > MAX_EXHAUSTIVE_MEMBERS:
        raise InvalidInputError(
            f"strategy 'exhaustive' refuses {n} members: it would evaluate {exhaustive_count(n):,} layouts "
            f"(Bell({n}) = {bell_number(n):,} partitions into slots, times the slot kinds); it takes at most "
            f"{MAX_EXHAUSTIVE_MEMBERS} members. Use strategy 'auto' (heuristics plus a local search)"
        )


def set_partitions(items: Sequence[str]) -> Iterator[list[list[str]]]:
    """Every partition of ``items`` into non-empty groups (restricted growth strings)."""
    n = len(items)
    if n == 0:
        return
    codes = [0] * n
    maxes = [0] * n  # maxes[i] = max(codes[:i]) (for i >= 1)
    while True:
        groups: list[list[str]] = [[] for _ in range(max(codes) + 1)]
        for item, c in zip(items, codes, strict=True):
            groups[c].append(item)
        yield groups
        i = n - 1
        while i > 0 and codes[i] > maxes[i]:
            i -= 1
        if i == 0:
            return
        codes[i] += 1
        for j in range(i + 1, n):
            codes[j] = 0
            maxes[j] = max(maxes[j - 1], codes[j - 1])


def _kind_assignments(k: int) -> Iterator[tuple[str, ...]]:
    yield ("stream",) * k
    for worker in WORKER_KINDS:
        for mask in range(1, 2**k):
            yield tuple(worker if mask >> i & 1 else "stream" for i in range(k))


def _exhaustive(ctx: Context) -> Iterator[Candidate]:
    names = ctx.demands.names
    check_exhaustive(len(names))
    why = (
        f"the best of all {exhaustive_count(len(names)):,} layouts: every partition of the members into "
        "slots, every slot kind",
    )
    could_win = ctx.could_win
    for groups in set_partitions(names):
        # set_partitions gives the groups in canonical order already (members in ensemble order,
        # groups by their first member), so only the MPS shares are left to set
        members = [tuple(g) for g in groups]
        if could_win is not None and not could_win(*ctx.engine.partition_lower_bound(members)):
            continue
        specs = {kind: [SlotSpec(kind, g) for g in members] for kind in ("stream", *WORKER_KINDS)}
        assignments = (
            _kind_assignments(len(members))
            if could_win is None
            else _promising_kind_assignments(ctx.engine, members, could_win)
        )
        for kinds in assignments:
            slots = [specs[k][i] for i, k in enumerate(kinds)]
            yield Candidate(ctx.with_mps_shares(slots), "exhaustive", why)


def _promising_kind_assignments(
    engine: Engine, members: Sequence[tuple[str, ...]], could_win: Callable[[float, float], bool]
) -> Iterator[tuple[str, ...]]:
    """:func:`_kind_assignments` of these slots, in the same order, less those a bound shows
    cannot win: a depth-first walk over the worker slots' mask from its highest bit (so the
    masks come in increasing order), each subtree skipped when its bound cannot win. The bound
    takes the decided slots at their kind and the open ones at their more favourable kind
    (:meth:`Engine.slot_floor`), and on a GPU the time slicing of the decided slots alone
    (the open ones only add to it): no layout skipped could have won (its own bound is no
    better)."""
    k = len(members)
    count = sum(len(g) for g in members)
    overhead = 1.0 + engine.model.time_slice_overhead
    yield ("stream",) * k
    for worker in WORKER_KINDS:
        sliced = engine.time_sliced(worker)
        fixed = {kind: [engine.slot_floor(g, k, (kind,)) for g in members] for kind in ("stream", worker)}
        # a slot's (work, latency) at each kind, for the time-slicing bound
        sums = {
            kind: [engine.slot_sums(SlotSpec(kind, g, 100.0 if kind == "mps" else None), k) for g in members]
            for kind in ("stream", worker)
        }
        either = [engine.slot_floor(g, k, ("stream", worker)) for g in members]
        # the open slots are always 0..i: their floors' running maximum and sums
        open_floor = [(0.0, 0.0, 0.0, 0.0)]
        for f in either:
            s, w, p, h = open_floor[-1]
            open_floor.append((max(s, f[0]), w + f[1], p + f[2], h + f[3]))
        # (slot to decide next, mask so far, the decided slots' floor, and for time slicing
        # their stream work, stream latency (the longest), workers' sum and worker count)
        stack: list[tuple[int, int, tuple[float, float, float, float], float, float, float, int]] = [
            (k - 1, 0, (0.0, 0.0, 0.0, 0.0), 0.0, 0.0, 0.0, 0)
        ]
        while stack:
            i, mask, done, main_work, main_busy, workers_sum, workers = stack.pop()
            if i < 0:
                if mask:
                    yield tuple(worker if mask >> j & 1 else "stream" for j in range(k))
                continue
            o = open_floor[i + 1]
            bound = (max(done[0], o[0]), done[1] + o[1], done[2] + o[2], done[3] + o[3])
            domains = workers + (1 if main_busy > 0 else 0)
            slicing = (max(main_work, main_busy) + workers_sum) * overhead if sliced and domains > 1 else 0.0
            if not could_win(*engine.floor_bound(bound, count, slicing)):
                continue
            for bit, kind in ((1, worker), (0, "stream")):  # pushed so that stream (bit 0) pops first
                f = fixed[kind][i]
                work, _, latency = sums[kind][i]
                floor = (max(done[0], f[0]), done[1] + f[1], done[2] + f[2], done[3] + f[3])
                if bit:
                    state = (main_work, main_busy, workers_sum + max(work, latency), workers + 1)
                else:
                    state = (main_work + work, max(main_busy, latency), workers_sum, workers)
                stack.append((i - 1, mask | (bit << i), floor, *state))


STRATEGY_FUNCTIONS: dict[str, StrategyFn] = {
    "sequential": _sequential,
    "streams": _streams,
    "processes": _processes,
    "mps": _mps,
    "coloring": _coloring,
    "packing": _packing,
    "exhaustive": _exhaustive,
}
"""Strategy name -> function proposing candidates (``auto`` lives in the search)."""

STRATEGIES: tuple[str, ...] = (*STRATEGY_FUNCTIONS, "auto")
"""Every strategy name, for ``plan(strategy=...)``."""

DESCRIPTIONS: dict[str, str] = {
    "sequential": "one slot, members one after another (the baseline)",
    "streams": "one CUDA stream (CPU: thread) per member in the serving process",
    "processes": "one worker process per member",
    "mps": "one MPS partition per member, SM shares proportional to demand",
    "coloring": "colour the conflict graph: members that hurt each other share a slot",
    "packing": "memory-aware first-fit decreasing of members into slots",
    "exhaustive": "every partition of the members into slots and kinds",
    "auto": "the best predicted plan of all strategies, improved by a local search",
}
"""One line per strategy, for help texts and explanations."""


def check_strategy(name: str) -> None:
    """Raise :class:`InvalidInputError` unless ``name`` is a strategy."""
    if name not in STRATEGIES:
        raise InvalidInputError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}")


__all__ = [
    "AUTO_EXHAUSTIVE_MEMBERS",
    "DESCRIPTIONS",
    "MAX_EXHAUSTIVE_MEMBERS",
    "STRATEGIES",
    "STRATEGY_FUNCTIONS",
    "Candidate",
    "Context",
    "bell_number",
    "check_exhaustive",
    "check_strategy",
    "exhaustive_count",
    "pack",
    "set_partitions",
]
