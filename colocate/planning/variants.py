"""Choose each member's backend variant while planning (``plan(..., backends=...)``).

The members were profiled under several variants (:func:`colocate.profiling.profile_variants`:
``torch``, ``torch+cudagraph``, ``onnxruntime``, ...). Which one a member should run with is
not simply its fastest alone: a faster variant may need more memory (so the plan no longer
fits), or a member that is not critical gains nothing from it. So the choice goes through the
cost model, at the plan's batch size:

1. the strategy plans three assignments: every member as given (the default), every member on
   its fastest variant alone, and every member on its fastest variant whose memory fits the
   device alone; the best predicted plan that fits wins;
2. a greedy pass then keeps that plan's slots and tries each other variant of each member
   (the critical member first), keeping a change when the cost model predicts the same slots
   better with it and they still fit, until no change helps;
3. if it changed anything, the strategy plans the improved assignment once more.

A candidate must beat the default by more than the planner's tie margin to be chosen: with
equal predictions the members run as given. The plan records each member's variant
(:class:`~colocate.planning.types.MemberBackend`), its strategy reads ``<strategy>+backends``,
and its explanation says what each changed member gains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from colocate.devices import Device
from colocate.ensemble import Ensemble
from colocate.errors import ColocateError, InvalidInputError, PlanInfeasibleError
from colocate.planning.cost import CostModel, as_layout
from colocate.planning.demands import MemberDemand, member_demands
from colocate.planning.search import SIMPLER_WITHIN, Selector, _Session
from colocate.planning.types import MemberBackend, Plan
from colocate.profiling.types import VariantProfiles
from colocate.variants import BackendChoice, label_backend, label_options, parse_backends

GREEDY_MAX_ROUNDS = 4
"""Most passes of the greedy per-member improvement."""
SUFFIX = "+backends"
"""Appended to the strategy name of a plan whose backends were chosen."""

Assignment = dict[str, str]


def _key(assignment: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(assignment.items()))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


class _Chooser:
    """One planning problem over assignments member -> variant label."""

    def __init__(
        self,
        ensemble: Ensemble | Sequence[str],
        device: Device,
        profiles: VariantProfiles,
        allowed: tuple[str, ...] | None,
        batch_size: int | None,
        objective: str,
        latency_bound_s: float | None,
        model: CostModel,
    ) -> None:
        self.ensemble = ensemble
        self.device = device
        self.profiles = profiles
        self.objective = objective
        self.latency_bound_s = latency_bound_s
        self.model = model
        self.selector = Selector(objective, latency_bound_s)
        self.names = ensemble.member_names if isinstance(ensemble, Ensemble) else tuple(ensemble)
        missing = [m for m in self.names if m not in profiles.defaults]
        if missing:
            raise InvalidInputError(
                f"member(s) {', '.join(missing)} have no variant profiles; profile them with "
                "colocate.profiling.profile_variants"
            )
        self.default: Assignment = {m: profiles.defaults[m] for m in self.names}
        # the default's session fixes the batch size (and says why, when it chose it)
        self.base = self.session(self.default, batch_size)
        self.batch_size = self.base.demands.batch_size
        self.limit = self.base.engine.limit
        self.options: dict[str, dict[str, MemberDemand]] = {}
        self.skipped: dict[str, dict[str, str]] = {}
        for m in self.names:
            found: dict[str, MemberDemand] = {}
            for label in profiles.labels_of(m):
                if allowed is not None and label not in allowed and label != self.default[m]:
                    continue
                try:
                    found[label] = member_demands((m,), device, profiles.sets[label], self.batch_size)[m]
                except ColocateError as exc:  # out of memory at this batch, no usable profile
                    self.skipped.setdefault(m, {})[label] = str(exc)
            if self.default[m] not in found:
                found[self.default[m]] = self.base.demands[m]
            self.options[m] = found
        self._sessions: dict[tuple[tuple[str, str], ...], _Session] = {_key(self.default): self.base}

    def session(self, assignment: Mapping[str, str], batch_size: int | None) -> _Session:
        return _Session(
            self.ensemble,
            self.device,
            self.profiles.for_assignment(assignment),
            batch_size,
            self.objective,
            self.latency_bound_s,
            self.model,
        )

    def session_for(self, assignment: Mapping[str, str]) -> _Session:
        key = _key(assignment)
        found = self._sessions.get(key)
        if found is None:
            found = self.session(assignment, self.batch_size)
            self._sessions[key] = found
        return found

    def fits_alone(self, d: MemberDemand) -> bool:
        process = self.base.demands.process_bytes if self.base.demands.is_gpu else 0
        return d.memory_bytes * (1 + self.model.allocator_margin) + process <= self.limit

    def fastest(self, *, fitting: bool) -> Assignment:
        chosen: Assignment = {}
        for m in self.names:
            options = self.options[m]
            usable = {k: d for k, d in options.items() if not fitting or self.fits_alone(d)}
            if not usable:
                chosen[m] = self.default[m]
                continue
            chosen[m] = min(usable, key=lambda k: (usable[k].latency_s, k != self.default[m]))
        return chosen

    def greedy(self, start: Assignment, plan: Plan) -> tuple[Assignment, int]:
        """Keep ``plan``'s slots; switch one member's variant at a time while the model predicts better."""
        layout = as_layout(plan.slots)
        current = dict(start)
        engine = self.session_for(current).engine
        score = self.selector.of(engine.evaluate(layout))
        order = sorted(self.names, key=lambda m: -_finish(plan, m))
        changes = 0
        for _ in range(GREEDY_MAX_ROUNDS):
            improved = False
            for m in order:
                for label in self.options[m]:
                    if label == current[m]:
                        continue
                    trial = {**current, m: label}
                    try:
                        trial_engine = self.session_for(trial).engine
                    except ColocateError:
                        continue
                    if not trial_engine.fits(layout):
                        continue
                    trial_score = self.selector.of(trial_engine.evaluate(layout))
                    if Selector.better(trial_score, score, 1e-6):
                        current, score, improved = trial, trial_score, True
                        changes += 1
            if not improved:
                break
        return current, changes

    def run(self, strategy: str) -> Plan:
        tried: dict[tuple[tuple[str, str], ...], Plan | None] = {}
        failures: dict[tuple[tuple[str, str], ...], PlanInfeasibleError] = {}

        def attempt(assignment: Assignment) -> Plan | None:
            key = _key(assignment)
            if key in tried:
                return tried[key]
            try:
                made: Plan | None = self.session_for(assignment).run(strategy)
            except PlanInfeasibleError as exc:
                failures[key] = exc
                made = None
            tried[key] = made
            return made

        default_plan = attempt(self.default)
        attempt(self.fastest(fitting=False))
        attempt(self.fastest(fitting=True))
        best = self._best(tried)
        greedy_changes = 0
        if best is not None:
            improved, greedy_changes = self.greedy(dict(best[0]), best[1])
            if greedy_changes:
                attempt(improved)
                best = self._best(tried)
        if best is None:
            raise failures[_key(self.default)]
        key, chosen = best
        assignment = dict(key)
        return self._finish(chosen, assignment, strategy, default_plan, len(tried), greedy_changes)

    def _best(
        self, tried: Mapping[tuple[tuple[str, str], ...], Plan | None]
    ) -> tuple[tuple[tuple[str, str], ...], Plan] | None:
        """The best plan made; the default wins unless beaten by more than the tie margin."""
        best: tuple[tuple[tuple[str, str], ...], Plan] | None = None
        best_score = None
        for key, made in tried.items():  # the default first
            if made is None:
                continue
            score = self.selector.score(made.prediction.throughput_sps, made.prediction.latency_s)
            margin = SIMPLER_WITHIN if best is not None and best[0] == _key(self.default) else 1e-9
            if best_score is None or Selector.better(score, best_score, margin):
                best, best_score = (key, made), score
        return best

    def _finish(
        self,
        chosen: Plan,
        assignment: Assignment,
        strategy: str,
        default_plan: Plan | None,
        assignments_tried: int,
        greedy_changes: int,
    ) -> Plan:
        b = self.batch_size
        choices = []
        lines: list[str] = []
        labels = sorted({k for options in self.options.values() for k in options})
        head = (
            f"backends: each member's variant chosen among {', '.join(labels)} by the cost model at batch "
            f"{b} ({assignments_tried} assignment(s) planned"
            + (f", {greedy_changes} greedy change(s)" if greedy_changes else "")
            + ")"
        )
        if default_plan is None:
            head += "; with every member as given nothing fits"
        elif chosen is not default_plan:
            gain = chosen.prediction.throughput_sps / max(default_plan.prediction.throughput_sps, 1e-12)
            head += (
                f": {chosen.prediction.throughput_sps:.0f} samples/s predicted, {gain:.2f}x the "
                f"{default_plan.prediction.throughput_sps:.0f} with every member as given"
            )
        else:
            head += ": running every member as given is predicted best"
        lines.append(head)
        for m in self.names:
            label = assignment[m]
            default = self.default[m]
            options = self.options[m]
            d = options.get(label)
            base = options.get(default)
            speedup = base.latency_s / d.latency_s if d is not None and base is not None else 1.0
            choices.append(
                MemberBackend(
                    member=m,
                    label=label,
                    backend=label_backend(label),
                    options=label_options(label),
                    default=default,
                    speedup_alone=speedup,
                )
            )
            if label != default and d is not None and base is not None:
                lines.append(
                    f"{m}: {label}, {speedup:.1f}x {default}'s predicted throughput at batch {b} "
                    f"({_ms(d.latency_s)} alone instead of {_ms(base.latency_s)})"
                )
            fastest = min(options, key=lambda k: options[k].latency_s)
            if fastest != label and options[fastest].latency_s < 0.97 * options[label].latency_s:
                why = (
                    "it does not fit in memory"
                    if not self.fits_alone(options[fastest])
                    else "the plan is not predicted better with it"
                )
                lines.append(
                    f"{m}: kept on {label}; {fastest} is faster alone "
                    f"({options[label].latency_s / options[fastest].latency_s:.1f}x) but {why}"
                )
        notes = list(chosen.notes)
        for m, reasons in self.skipped.items():
            for label, text in reasons.items():
                notes.append(f"{m}: variant {label} not considered: {text}")
        if self.model.interference:
            notes.append("measured pair slowdowns apply to members whatever their backend variant")
        return dataclasses.replace(
            chosen,
            strategy=strategy + SUFFIX,
            explanation=(*lines, *chosen.explanation),
            notes=tuple(dict.fromkeys(notes)),
            backends=tuple(choices),
        )


def _finish(plan: Plan, member: str) -> float:
    for m in plan.prediction.members:
        if m.member == member:
            return m.finish_s
    return 0.0


def plan_with_backends(
    ensemble: Ensemble | Sequence[str],
    device: Device,
    profiles: VariantProfiles,
    *,
    backends: BackendChoice,
    strategy: str,
    batch_size: int | None,
    objective: str,
    latency_bound_s: float | None,
    model: CostModel,
) -> Plan:
    """The best plan of ``strategy`` with each member's backend variant chosen (module docstring)."""
    allowed = parse_backends(backends)
    chooser = _Chooser(ensemble, device, profiles, allowed, batch_size, objective, latency_bound_s, model)
    return chooser.run(strategy)


__all__ = ["SUFFIX", "plan_with_backends"]
