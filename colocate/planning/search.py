"""``plan()``: pick the demands, run the strategies, keep the best feasible plan for the objective.

Candidates that do not fit in memory are rejected before anything is compared. Among the
feasible ones the objective decides (``throughput``: most samples per second; ``latency``:
least median latency; ``throughput_under_latency``: most throughput among plans whose median
latency is within ``latency_bound_s``). Candidates within :data:`SIMPLER_WITHIN` of the best
are tied, and the tie goes to the simpler plan (fewer worker processes, then fewer slots):
the model is not that precise, and a simpler plan is cheaper to run. ``auto`` runs every
strategy (``exhaustive`` only up to 6 members), then improves its best candidates by a local
search that moves, swaps and regroups the members of the slot that finishes last, changes
slot kinds, and merges slots, keeping each move that the cost model predicts to be better.
Given plan measurements (``measured_plans``, from a calibration: the plans predicted within
:data:`SETTLE_WITHIN` of its pick and the plans made by hand), ``auto`` settles its pick by
them: the measured-best wins (docs/planning.md, "Settling near-ties by measurement").
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from colocate.devices import Device
from colocate.ensemble import Ensemble
from colocate.errors import InvalidInputError, PlanInfeasibleError
from colocate.planning.cost import (
    CostModel,
    Engine,
    Evaluation,
    InterferenceTable,
    Layout,
    SlotSpec,
    as_layout,
    cpu_threads_for,
    cpu_threads_per_slot,
    prediction_from,
    slot_name,
)
from colocate.planning.demands import DemandSet, member_demands, profiled_batch_sizes
from colocate.planning.explain import explain, infeasible_message
from colocate.planning.strategies import (
    AUTO_EXHAUSTIVE_MEMBERS,
    DESCRIPTIONS,
    STRATEGIES,
    STRATEGY_FUNCTIONS,
    Candidate,
    Context,
    check_exhaustive,
    check_strategy,
)
from colocate.planning.types import Plan, PlanMeasurement, Slot
from colocate.profiling.types import Profile, ProfileSet, VariantProfiles
from colocate.variants import BackendChoice

OBJECTIVES: tuple[str, ...] = ("throughput", "latency", "throughput_under_latency")
"""What a plan is chosen for."""
DEFAULT_MAX_BATCH = 32
"""Without ``batch_size``, the largest profiled batch size up to this that fits is used."""
SIMPLER_WITHIN = 0.005
"""Candidates predicted within this share of the best are tied; the simpler plan wins."""
LOCAL_SEARCH_STARTS = 3
"""``auto`` improves this many of its best distinct candidates."""
LOCAL_SEARCH_MAX_EVALUATIONS = 4000
"""Most cost-model evaluations one local search may spend (keeps ``auto`` fast for 64 members)."""
SETTLE_WITHIN = 0.20
"""A calibration runs the plans predicted within this share of ``auto``'s pick (and the plans made
by hand), and ``auto`` given those measurements picks the measured-best (the model cannot call
differences this small; measurements can). The cost model's median error on the CPU was
11-17 % per case (docs/results.md), so differences under 20 % are not the model's to call."""
BEST_IMPROVEMENT_MEMBERS = 24
"""Up to this many members the local search takes each round's best move; above, the first better
one (as good on large ensembles in our benchmarks, and about ten times faster at 64 members)."""

Score = tuple[int, float]


class PlanList(list[Plan]):
    """Plans, one per strategy, with ``skipped``: strategy -> why it gave no plan."""

    def __init__(self, plans: Iterable[Plan] = (), skipped: Mapping[str, str] | None = None) -> None:
        super().__init__(plans)
        self.skipped: dict[str, str] = dict(skipped or {})

    @property
    def rejected(self) -> tuple[str, ...]:
        """One ``"strategy: reason"`` line per skipped strategy, for printing."""
        return tuple(f"{name}: {why}" for name, why in self.skipped.items())


@dataclasses.dataclass(frozen=True)
class Selector:
    """Ranks evaluations for an objective: higher :meth:`score` is better."""

    objective: str
    latency_bound_s: float | None = None

    def score(self, throughput: float, latency: float) -> Score:
        if self.objective == "throughput":
            return (1, throughput)
        if self.objective == "latency":
            return (1, -latency)
        bound = self.latency_bound_s or 0.0
        if latency <= bound:
            return (1, throughput)
        return (0, -latency)

    def of(self, ev: Evaluation) -> Score:
        return self.score(ev.throughput_sps, ev.latency_s)

    @staticmethod
    def better(a: Score, b: Score, margin: float = 1e-9) -> bool:
        """Whether ``a`` beats ``b`` by more than ``margin`` (relative)."""
        if a[0] != b[0]:
            return a[0] > b[0]
        return a[1] - b[1] > margin * max(abs(a[1]), abs(b[1]))

    @staticmethod
    def close(a: Score, best: Score) -> bool:
        """Whether ``a`` is within :data:`SIMPLER_WITHIN` of ``best``."""
        return a[0] == best[0] and best[1] - a[1] <= SIMPLER_WITHIN * abs(best[1])


class Pool:
    """Feasible candidates near the best one, the few best distinct ones, and what was rejected."""

    def __init__(self, selector: Selector) -> None:
        self.selector = selector
        self.best: Score | None = None
        self.near: list[tuple[Evaluation, Candidate]] = []
        self.top: list[tuple[Score, int, Evaluation, Candidate]] = []  # min-heap of the best few
        self.by_strategy: dict[str, tuple[Score, Evaluation]] = {}
        self.seen: set[Layout] = set()
        self.evaluated = 0
        self.too_big = 0
        self.smallest_rejected: Evaluation | None = None
        self._counter = itertools.count()

    def raise_bar(self, score: Score) -> None:
        """Prune against ``score`` from the start, as if a candidate of that score had been kept.

        Only for a score some candidate still to be offered will reach: the choice is then
        the same as without the bar (a candidate within the tie window of the final best
        always passes :meth:`could_win` against a lower bar), and fewer candidates are
        evaluated on the way.
        """
        if self.best is None or Selector.better(score, self.best):
            self.best = score

    def bound_could_win(self, throughput: float, latency: float) -> bool:
        """Whether layouts no better than ``throughput`` and ``latency`` (a bound on a set of
        them, e.g. :meth:`Engine.partition_lower_bound`) could still reach the tie window of
        the best; when not, each of them would fail :meth:`could_win`."""
        if self.best is None:
            return True
        optimistic = self.selector.score(throughput, latency)
        return self.selector.close(optimistic, self.best) or Selector.better(optimistic, self.best)

    def could_win(self, engine: Engine, layout: Layout) -> bool:
        """Whether the layout's optimistic bound could still reach the tie window of the best."""
        if self.best is None:  # no bound needed
            return True
        return self.bound_could_win(*engine.lower_bound(layout))

    def offer(self, engine: Engine, candidate: Candidate, *, prune: bool = True) -> Evaluation | None:
        """Evaluate a candidate unless seen, too big, or unable to win; keep it if it is good."""
        layout = candidate.layout
        if layout in self.seen:
            return None
        self.seen.add(layout)
        if not engine.fits(layout):
            self.too_big += 1
            peak = engine.peak_memory(layout)
            if self.smallest_rejected is None or peak < self.smallest_rejected.peak_memory_bytes:
                self.smallest_rejected = engine.evaluate(layout)
            return None
        if prune and not self.could_win(engine, layout):
            return None
        # most layouts a search offers keep nothing: judge them on the two figures a score reads
        # and build the rest of their Evaluation only when the pool keeps it
        score = self.selector.score(*engine.throughput_and_latency(layout))
        return self._add(score, candidate, functools.cache(lambda: engine.evaluate(layout)))

    def add(self, ev: Evaluation, candidate: Candidate) -> None:
        self._add(self.selector.of(ev), candidate, lambda: ev)

    def _add(
        self, score: Score, candidate: Candidate, evaluation: Callable[[], Evaluation]
    ) -> Evaluation | None:
        """Keep what a candidate of ``score`` earns: its strategy's best, the best or a place
        near it, a place among the best few. ``evaluation()`` is called only for what is kept;
        returns the Evaluation when something was, else None."""
        self.evaluated += 1
        kept: Evaluation | None = None
        known = self.by_strategy.get(candidate.strategy)
        if known is None or Selector.better(score, known[0]):
            kept = evaluation()
            self.by_strategy[candidate.strategy] = (score, kept)
        if self.best is None or Selector.better(score, self.best):
            self.best = score
            self.near = [x for x in self.near if Selector.close(self.selector.of(x[0]), score)]
        if Selector.close(score, self.best):
            kept = evaluation()
            self.near.append((kept, candidate))
        if len(self.top) < LOCAL_SEARCH_STARTS or Selector.better(score, self.top[0][0]):
            kept = evaluation()
            entry = (score, next(self._counter), kept, candidate)
            if len(self.top) < LOCAL_SEARCH_STARTS:
                heapq.heappush(self.top, entry)
            else:
                heapq.heapreplace(self.top, entry)
        return kept

    def choose(self) -> tuple[Evaluation, Candidate] | None:
        """The best candidate, the simplest among those tied with it."""
        if not self.near:
            return None
        best = self.best
        assert best is not None
        tied = [x for x in self.near if Selector.close(self.selector.of(x[0]), best)]
        return min(
            tied,
            key=lambda x: (x[0].workers, len(x[0].layout), -self.selector.of(x[0])[1]),
        )

    def starts(self) -> list[tuple[Evaluation, Candidate]]:
        """The best few candidates, best first."""
        return [(e, c) for _, _, e, c in sorted(self.top, key=lambda x: (x[0], -x[1]), reverse=True)]


# ---------------------------------------------------------------------------
# Local search
# ---------------------------------------------------------------------------


def _worker_kinds(layout: Layout, gpu: bool) -> tuple[str, ...]:
    """Kinds a new or changed slot may take without mixing processes and MPS on a GPU."""
    if not gpu:
        return ("stream", "process", "mps")
    kinds = {s.kind for s in layout}
    if "process" in kinds:
        return ("stream", "process")
    if "mps" in kinds:
        return ("stream", "mps")
    return ("stream", "process", "mps")


def _neighbours(ev: Evaluation, ctx: Context) -> Iterator[Layout]:
    """Layouts one move away from ``ev``'s, the moves that can shorten the critical slot first."""
    layout = ev.layout
    gpu = ctx.demands.is_gpu
    c = ev.critical_slot
    crit = layout[c]
    others = [i for i in range(len(layout)) if i != c]
    others.sort(key=lambda i: ev.slot_end_s[i])  # least loaded first
    kinds = _worker_kinds(layout, gpu)
    members = sorted(crit.members, key=lambda m: -ctx.latency(m))

    def rebuilt(slots: list[SlotSpec]) -> Layout:
        return ctx.canonical(tuple(slots))

    # move a member of the critical slot to another slot, or to a new slot
    for m in members:
        rest = tuple(x for x in crit.members if x != m)
        for i in others:
            slots = list(layout)
            slots[i] = SlotSpec(slots[i].kind, (*slots[i].members, m), slots[i].percent)
            slots[c] = SlotSpec(crit.kind, rest, crit.percent)
            yield rebuilt(slots)
        for kind in kinds:
            if not rest and kind == crit.kind:
                continue
            slots = list(layout)
            slots[c] = SlotSpec(crit.kind, rest, crit.percent)
            slots.append(SlotSpec(kind, (m,)))
            yield rebuilt(slots)
    # swap a member of the critical slot with a shorter one elsewhere
    for m in members:
        for i in others:
            for o in layout[i].members:
                if ctx.latency(o) < ctx.latency(m):
                    slots = list(layout)
                    slots[c] = SlotSpec(
                        crit.kind, tuple(o if x == m else x for x in crit.members), crit.percent
                    )
                    slots[i] = SlotSpec(
                        layout[i].kind,
                        tuple(m if x == o else x for x in layout[i].members),
                        layout[i].percent,
                    )
                    yield rebuilt(slots)
    # change the kind of the critical slot, or of every slot
    for kind in kinds:
        if kind != crit.kind:
            slots = list(layout)
            slots[c] = SlotSpec(kind, crit.members)
            if _mixes_workers(slots, gpu):
                continue
            yield rebuilt(slots)
    for kind in ("stream", "process", "mps"):
        if any(s.kind != kind for s in layout):
            yield rebuilt([SlotSpec(kind, s.members) for s in layout])
    # merge the least loaded slot into another one
    if len(others) >= 1:
        small = others[0]
        for i in range(len(layout)):
            if i != small:
                slots = list(layout)
                slots[i] = SlotSpec(
                    slots[i].kind, (*slots[i].members, *layout[small].members), slots[i].percent
                )
                del slots[small]
                yield rebuilt(slots)


def _mixes_workers(slots: Sequence[SlotSpec], gpu: bool) -> bool:
    kinds = {s.kind for s in slots}
    return gpu and "process" in kinds and "mps" in kinds


def local_search(
    start: Evaluation,
    ctx: Context,
    selector: Selector,
    *,
    max_evaluations: int = LOCAL_SEARCH_MAX_EVALUATIONS,
    first_improvement: bool = False,
) -> tuple[Evaluation, int]:
    """Improve ``start`` one move at a time; returns the result and the number of moves made.

    Each round takes the best neighbour (or, with ``first_improvement``, the first better one in
    the order :func:`_neighbours` yields them: moves off the critical slot to the least loaded
    slots first), until no neighbour is better or ``max_evaluations`` are spent.
    """
    engine = ctx.engine
    current = start
    current_score = selector.of(start)
    moves = 0
    spent = 0
    seen: set[Layout] = {start.layout}
    while spent < max_evaluations:
        best: Evaluation | None = None
        best_score = current_score
        for layout in _neighbours(current, ctx):
            if layout in seen:
                continue
            seen.add(layout)
            if not engine.fits(layout):
                continue
            throughput, latency = engine.lower_bound(layout)
            if not Selector.better(selector.score(throughput, latency), best_score, 1e-6):
                continue
            ev = engine.evaluate(layout)
            spent += 1
            score = selector.of(ev)
            if Selector.better(score, best_score, 1e-6):
                best, best_score = ev, score
                if first_improvement:
                    break
            if spent >= max_evaluations:
                break
        if best is None:
            break
        current, current_score = best, best_score
        moves += 1
    return current, moves


# ---------------------------------------------------------------------------
# plan() and plan_all()
# ---------------------------------------------------------------------------


def _check_options(strategy: str, objective: str, latency_bound_s: float | None) -> None:
    check_strategy(strategy)
    if objective not in OBJECTIVES:
        raise InvalidInputError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if objective == "throughput_under_latency":
        if latency_bound_s is None:
            raise InvalidInputError(
                "objective 'throughput_under_latency' needs latency_bound_s (the most median latency "
                "a plan may have, in seconds)"
            )
        if (
            isinstance(latency_bound_s, bool)
            or not isinstance(latency_bound_s, (int, float))
            or not (latency_bound_s > 0)
        ):
            raise InvalidInputError(
                f"latency_bound_s must be a positive number of seconds, got {latency_bound_s!r}"
            )
    elif latency_bound_s is not None:
        raise InvalidInputError(
            f"latency_bound_s is only used with objective 'throughput_under_latency', not {objective!r}"
        )


class _Session:
    """One planning problem: demands, engine, strategy context, and the reasons for the choices."""

    def __init__(
        self,
        ensemble: Ensemble | Sequence[str],
        device: Device,
        profiles: ProfileSet | Sequence[Profile],
        batch_size: int | None,
        objective: str,
        latency_bound_s: float | None,
        model: CostModel,
        measured_plans: Sequence[PlanMeasurement] = (),
    ) -> None:
        self.device = device
        self.objective = objective
        self.measured_plans = tuple(measured_plans)
        self.selector = Selector(objective, latency_bound_s)
        self.model = model
        self.batch_note = ""
        if batch_size is None:
            self.demands, self.batch_note = _default_demands(ensemble, device, profiles, model)
        else:
            self.demands = member_demands(ensemble, device, profiles, batch_size)
        self.engine = model.engine(self.demands)
        self.ctx = Context(self.demands, self.engine)
        self._sequential: Evaluation | None = None

    @property
    def sequential(self) -> Evaluation:
        if self._sequential is None:
            self._sequential = self.engine.evaluate((SlotSpec("stream", self.demands.names),))
        return self._sequential

    def run(self, strategy: str) -> Plan:
        pool = Pool(self.selector)
        names: list[str]
        if strategy == "auto":
            names = [n for n in STRATEGY_FUNCTIONS if n != "exhaustive"]
            if len(self.demands.members) <= AUTO_EXHAUSTIVE_MEMBERS:
                names.append("exhaustive")
        else:
            if strategy == "exhaustive":
                check_exhaustive(len(self.demands.members))
                bar = self._exhaustive_bar()
                if bar is not None:
                    pool.raise_bar(bar)
            names = [strategy]
        # exhaustive skips layouts by bounds on whole sets of them, when no layout can be
        # rejected for memory (else the count and the smallest rejected layout, which explain
        # a plan or its absence, would miss the skipped ones)
        if "exhaustive" in names and self.engine.every_layout_fits():
            self.ctx.could_win = pool.bound_could_win
        try:
            for name in names:
                for candidate in STRATEGY_FUNCTIONS[name](self.ctx):
                    pool.offer(self.engine, candidate, prune=name == "exhaustive")
        finally:
            self.ctx.could_win = None
        improved_by = 0
        if strategy == "auto":
            for ev, candidate in pool.starts():
                better, moves = local_search(
                    ev,
                    self.ctx,
                    self.selector,
                    first_improvement=len(self.demands.members) > BEST_IMPROVEMENT_MEMBERS,
                )
                if moves:
                    why = (*candidate.why, f"then improved by a local search ({moves} move(s))")
                    pool.add(better, Candidate(better.layout, candidate.strategy, why))
                    improved_by = max(improved_by, moves)
        chosen = pool.choose()
        if chosen is None:
            raise PlanInfeasibleError(
                infeasible_message(strategy, self.demands, self.engine, pool.smallest_rejected)
            )
        ev, candidate = chosen
        settled: str | None = None
        if strategy == "auto" and self.measured_plans:
            ev, candidate, settled = self._settle(ev, candidate)
        if self.objective == "throughput_under_latency" and self.selector.of(ev)[0] == 0:
            bound = self.selector.latency_bound_s or 0.0
            raise PlanInfeasibleError(
                f"no plan meets the latency bound of {bound * 1e3:.3f} ms at batch "
                f"{self.demands.batch_size}: "
                f"the lowest predicted median latency is {ev.latency_s * 1e3:.3f} ms "
                f"(strategy '{candidate.strategy}'); relax the bound or use a smaller batch size"
            )
        return self._plan(ev, candidate, strategy, pool, settled)

    def _exhaustive_bar(self) -> Score | None:
        """The best score of the other strategies' candidates that ``exhaustive`` also proposes
        (every layout but those mixing process and mps slots), to prune its search from the
        start instead of from its first layouts (on 8 members, 176k of them)."""
        bar: Score | None = None
        for name, propose in STRATEGY_FUNCTIONS.items():
            if name == "exhaustive":
                continue
            for candidate in propose(self.ctx):
                layout = self.ctx.canonical(candidate.layout)
                kinds = {s.kind for s in layout}
                if {"process", "mps"} <= kinds or not self.engine.fits(layout):
                    continue
                score = self.selector.score(*self.engine.throughput_and_latency(layout))
                if bar is None or Selector.better(score, bar):
                    bar = score
        return bar

    def _settle(self, ev: Evaluation, candidate: Candidate) -> tuple[Evaluation, Candidate, str | None]:
        """Of the measured plans that fit, the measured-best, whatever its prediction (they ran in
        the same interleaved rounds as the pick). When the pick itself was not measured (planned
        again with the calibration's time scale, the model can pick slots no calibration run
        had), its prediction stands in for a measurement: the measured-best wins when it
        measured more than the pick is predicted to give. Objectives other than throughput are
        not settled."""
        if self.objective != "throughput":
            return ev, candidate, None
        pick = _membership(ev.layout)
        names = sorted(self.demands.names)
        contenders: list[tuple[float, PlanMeasurement, Evaluation]] = []
        pick_measured = False
        seen: set[frozenset[tuple[str, frozenset[str]]]] = set()
        for measurement in self.measured_plans:
            sps = measurement.measured_sps
            if sps is None or measurement.batch_size != self.demands.batch_size:
                continue
            if sorted(measurement.members) != names:
                continue
            layout = as_layout(measurement.slots)
            key = _membership(layout)
            if key in seen:
                continue
            if key == pick:
                measured_ev = ev
                pick_measured = True
            else:
                kinds = {s.kind for s in layout}
                if self.demands.is_gpu and {"process", "mps"} <= kinds:
                    continue
                if not self.engine.fits(layout):
                    continue
                measured_ev = self.engine.evaluate(layout)
            seen.add(key)
            contenders.append((sps, measurement, measured_ev))
        contenders.sort(key=lambda c: c[0], reverse=True)
        if not pick_measured:
            return self._settle_unmeasured(ev, candidate, contenders)
        if len(contenders) < 2:
            return ev, candidate, None
        best_sps, best, best_ev = contenders[0]
        others = ", ".join(f"{m.name} {sps:,.0f}" for sps, m, _ in contenders[1:])
        verdict = (
            "the model's pick"
            if best_ev is ev
            else f"instead of the model's pick ({ev.throughput_sps:,.0f} samples/s predicted)"
        )
        line = (
            f"settled by measurement: {best.name} measured {best_sps:,.0f} vs {others} samples/s, "
            f"{verdict}; they ran side by side in interleaved rounds, and a measurement outranks "
            "the cost model's prediction"
        )
        if best_ev is ev:
            return ev, candidate, line
        return best_ev, _measured_candidate(best, best_ev, candidate), line

    def _settle_unmeasured(
        self,
        ev: Evaluation,
        candidate: Candidate,
        contenders: Sequence[tuple[float, PlanMeasurement, Evaluation]],
    ) -> tuple[Evaluation, Candidate, str | None]:
        """The pick was not measured: a measured plan that ran faster than the pick is predicted to
        run wins (a measurement beats a promise it already exceeds); else the pick stays."""
        if not contenders or contenders[0][0] <= ev.throughput_sps:
            return ev, candidate, None
        best_sps, best, best_ev = contenders[0]
        others = "".join(f", {m.name} {sps:,.0f}" for sps, m, _ in contenders[1:])
        line = (
            f"settled by measurement: {best.name} measured {best_sps:,.0f}{others} samples/s; the "
            f"model's pick was not measured, and it is predicted to give {ev.throughput_sps:,.0f}: "
            "a measurement outranks a prediction it already beats"
        )
        return best_ev, _measured_candidate(best, best_ev, candidate), line

    def _plan(
        self, ev: Evaluation, candidate: Candidate, strategy: str, pool: Pool, settled: str | None = None
    ) -> Plan:
        demands = self.demands
        slots = []
        for i, s in enumerate(ev.layout):
            mps = s.kind == "mps"
            slots.append(
                Slot(
                    name=slot_name(i),
                    kind=s.kind,  # type: ignore[arg-type]
                    members=s.members,
                    thread_percentage=s.percent if mps else None,
                    memory_limit_bytes=(
                        self.model.mps_memory_limit_bytes(s.members, demands)
                        if mps and demands.is_gpu
                        else None
                    ),
                    cpu_threads=None
                    if demands.is_gpu
                    else (
                        cpu_threads_for(s.percent, demands.cores)
                        if mps
                        else cpu_threads_per_slot(demands.cores, len(ev.layout))
                    ),
                )
            )
        prediction = prediction_from(ev, self.engine)
        explanation, notes = explain(
            ev,
            candidate,
            strategy=strategy,
            ctx=self.ctx,
            sequential=self.sequential,
            objective=self.objective,
            latency_bound_s=self.selector.latency_bound_s,
            considered=pool.evaluated,
            rejected=pool.too_big,
            batch_note=self.batch_note,
            settled=settled,
        )
        return Plan(
            device=self.device,
            batch_size=demands.batch_size,
            slots=tuple(slots),
            prediction=prediction,
            strategy=strategy,
            objective=self.objective,
            explanation=explanation,
            notes=notes,
        )


def _default_demands(
    ensemble: Ensemble | Sequence[str],
    device: Device,
    profiles: ProfileSet | Sequence[Profile],
    model: CostModel,
) -> tuple[DemandSet, str]:
    common, union = profiled_batch_sizes(ensemble, profiles)
    sizes = common or union
    if not sizes:
        return member_demands(ensemble, device, profiles, 1), ""  # raises, naming the member
    candidates = sorted((b for b in sizes if b <= DEFAULT_MAX_BATCH), reverse=True) or [min(sizes)]
    last_error: PlanInfeasibleError | None = None
    for b in candidates:
        try:
            demands = member_demands(ensemble, device, profiles, b)
        except PlanInfeasibleError as exc:
            last_error = exc
            continue
        engine = model.engine(demands)
        if engine.fits((SlotSpec("stream", demands.names),)):
            which = "every member" if common else "some member"
            return demands, (
                f"batch size {b}: the largest batch size up to {DEFAULT_MAX_BATCH} profiled for {which} "
                "at which the ensemble fits (pass batch_size to choose another)"
            )
        last_error = PlanInfeasibleError(
            infeasible_message("auto", demands, engine, engine.evaluate((SlotSpec("stream", demands.names),)))
        )
    assert last_error is not None
    raise last_error


def _membership(layout: Layout) -> frozenset[tuple[str, frozenset[str]]]:
    """A layout's slots as (kind, members) regardless of order: to match measured plans."""
    return frozenset((s.kind, frozenset(s.members)) for s in layout)


def _model_for(model: CostModel | None, interference: InterferenceTable | None) -> CostModel:
    base = model or CostModel()
    if interference is not None:
        base = dataclasses.replace(base, interference=interference)
    return base


def plan(
    ensemble: Ensemble | Sequence[str],
    device: Device,
    profiles: ProfileSet | Sequence[Profile] | VariantProfiles,
    *,
    strategy: str = "auto",
    batch_size: int | None = None,
    objective: str = "throughput",
    latency_bound_s: float | None = None,
    interference: InterferenceTable | None = None,
    model: CostModel | None = None,
    backends: BackendChoice | None = None,
    measured_plans: Sequence[PlanMeasurement] = (),
) -> Plan:
    """Plan how to co-locate the ensemble's members on ``device``.

    Args:
        ensemble: the ensemble, or its member names (then input sizes are unknown: no copy cost).
        device: the target device: a GPU, a simulated GPU (``find_device("h100")``), or the CPU.
        profiles: the members' profiles, on this device or another (figures from another GPU or
            the CPU, and for batch sizes not profiled, are estimated and marked so); or their
            profiles under several backend variants (:class:`VariantProfiles`, from
            :func:`colocate.profiling.profile_variants`).
        strategy: one of :data:`STRATEGIES` (default ``"auto"``: the best of all).
        batch_size: the request batch size; default: the largest profiled size up to 32 at which
            the ensemble fits (the plan's notes say so).
        objective: ``"throughput"``, ``"latency"`` or ``"throughput_under_latency"``.
        latency_bound_s: the most median latency, for ``"throughput_under_latency"``.
        interference: measured pairwise slowdowns overriding the model: ``{(a, b): factor}`` for
            pairs measured in two stream slots, ``{(a, b, kind): factor}`` for another slot kind
            (``Calibration.interference()`` gives this table).
        model: the cost model (default constants when None).
        backends: choose each member's backend variant among these labels (``"auto"``: every
            variant profiled; e.g. ``("torch", "onnxruntime")``): the fastest per the cost model
            at the plan's batch size that fits (see :mod:`colocate.planning.variants`). Needs
            ``VariantProfiles``. The plan records the choice (``Plan.backends``) and its strategy
            reads ``"<strategy>+backends"``. None: every member runs as given.
        measured_plans: candidate plans run for real (``Calibration.plans``): ``auto`` picks the
            measured-best of those that fit when its own pick is among them, and when it is not,
            the measured-best if that measured more than the pick is predicted to give (the
            explanation says "settled by measurement"). Only for the ``throughput`` objective
            and plans measured at this batch size.

    Returns:
        The best predicted :class:`Plan` that fits in memory, with its prediction, explanation
        and notes.

    Raises:
        InvalidInputError: unknown strategy or objective, a missing latency bound, a member
            without profiles, ``exhaustive`` on too many members.
        PlanInfeasibleError: nothing fits in memory (the message lists each member's need and the
            memory available), or no plan meets the latency bound (it gives the best latency).
    """
    _check_options(strategy, objective, latency_bound_s)
    chosen_model = _model_for(model, interference)
    as_given = _single_set(profiles)
    if backends is not None:
        chosen = _plan_with_backends(
            ensemble,
            device,
            profiles,
            backends,
            strategy,
            batch_size,
            objective,
            latency_bound_s,
            chosen_model,
        )
    else:
        session = _Session(
            ensemble, device, as_given, batch_size, objective, latency_bound_s, chosen_model, measured_plans
        )
        chosen = session.run(strategy)
    return _with_model_hashes(chosen, as_given)


def _with_model_hashes(chosen: Plan, profiles: ProfileSet | Sequence[Profile]) -> Plan:
    """``chosen`` recording the model hash of each member's profiles (the member as given)."""
    hashes: dict[str, str] = {}
    for profile in profiles.profiles if isinstance(profiles, ProfileSet) else profiles:
        if profile.member in chosen.members and profile.model_hash:
            hashes.setdefault(profile.member, profile.model_hash)
    return dataclasses.replace(chosen, model_hashes=tuple(sorted(hashes.items())))


def _measured_candidate(measured: PlanMeasurement, ev: Evaluation, pick: Candidate) -> Candidate:
    """The candidate a settled plan stands for, named after the strategy that proposed it when
    it was measured (else the model's pick's)."""
    proposed = [n for n in measured.name.split("=") if n in DESCRIPTIONS]
    return Candidate(ev.layout, proposed[0] if proposed else pick.strategy, ())


def _single_set(profiles: ProfileSet | Sequence[Profile] | VariantProfiles) -> ProfileSet | Sequence[Profile]:
    """The profiles to plan with when backends are not chosen: each member's as given."""
    return profiles.default_set if isinstance(profiles, VariantProfiles) else profiles


def _plan_with_backends(
    ensemble: Ensemble | Sequence[str],
    device: Device,
    profiles: ProfileSet | Sequence[Profile] | VariantProfiles,
    backends: BackendChoice,
    strategy: str,
    batch_size: int | None,
    objective: str,
    latency_bound_s: float | None,
    model: CostModel,
) -> Plan:
    from colocate.planning.variants import plan_with_backends

    if not isinstance(profiles, VariantProfiles):
        raise InvalidInputError(
            f"backends={backends!r} needs the members' profiles under each backend variant: "
            "colocate.profiling.profile_variants(...) (or colocate profile --backends ...)"
        )
    return plan_with_backends(
        ensemble,
        device,
        profiles,
        backends=backends,
        strategy=strategy,
        batch_size=batch_size,
        objective=objective,
        latency_bound_s=latency_bound_s,
        model=model,
    )


def plan_all(
    ensemble: Ensemble | Sequence[str],
    device: Device,
    profiles: ProfileSet | Sequence[Profile] | VariantProfiles,
    *,
    strategies: Sequence[str] | None = None,
    batch_size: int | None = None,
    objective: str = "throughput",
    latency_bound_s: float | None = None,
    interference: InterferenceTable | None = None,
    model: CostModel | None = None,
    backends: BackendChoice | None = None,
    measured_plans: Sequence[PlanMeasurement] = (),
) -> PlanList:
    """One plan per strategy (default: all of :data:`STRATEGIES`), for a comparison.

    A strategy with no feasible plan (nothing fits, the latency bound is unmet, ``exhaustive``
    on too many members) is skipped; ``result.skipped`` maps it to the reason. The arguments are those of
    :func:`plan`. With
    ``backends`` (see :func:`plan`), ``auto`` also gives an ``auto+backends`` plan whose members'
    backend variants are chosen.
    """
    wanted = list(strategies) if strategies is not None else list(STRATEGIES)
    for name in wanted:
        check_strategy(name)
    _check_options("auto", objective, latency_bound_s)
    chosen_model = _model_for(model, interference)
    as_given = _single_set(profiles)
    session = _Session(
        ensemble, device, as_given, batch_size, objective, latency_bound_s, chosen_model, measured_plans
    )
    result = PlanList()
    for name in wanted:
        try:
            result.append(_with_model_hashes(session.run(name), as_given))
        except (PlanInfeasibleError, InvalidInputError) as exc:
            result.skipped[name] = str(exc)
    if backends is not None and "auto" in wanted:
        try:
            with_backends = _plan_with_backends(
                ensemble,
                device,
                profiles,
                backends,
                "auto",
                batch_size,
                objective,
                latency_bound_s,
                chosen_model,
            )
            result.append(_with_model_hashes(with_backends, as_given))
        except (PlanInfeasibleError, InvalidInputError) as exc:
            result.skipped["auto+backends"] = str(exc)
    return result


__all__ = [
    "DEFAULT_MAX_BATCH",
    "OBJECTIVES",
    "SETTLE_WITHIN",
    "PlanList",
    "Pool",
    "Selector",
    "local_search",
    "plan",
    "plan_all",
]
