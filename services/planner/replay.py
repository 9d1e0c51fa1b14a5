"""Replaying recorded events through the planner's core, exactly as the service would decide.

`replay` folds envelopes in order and asks `decide` at every event time and whenever a batch
window closes before the next event, so a recorded stream gives back the decisions the planner
made (or would make now). It is what `mpsflow replay` prints and what the golden tests compare.
Pure: the clock is the events' own time.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

from events.envelope import Envelope
from events.plans import PlanComputed
from events.pods import PodReleased
from services.planner.core.state import (
    ClusterState,
    IncrementalPlanner,
    NothingToDo,
    PlannerSettings,
    PublishPlan,
    WaitUntil,
    decide,
)

# What the planner reads from others. Its own words (node layouts, releases) are not read back:
# the replay's own decisions stand for them.
PLANNER_KINDS = frozenset(
    {
        "PodObserved",
        "PodRejected",
        "PodDeleted",
        "NodeObserved",
        "NodeOptedOut",
        "NodeGpusReported",
        "NodeConfigApplied",
        "NodeConfigFailed",
    }
)


@dataclass(frozen=True)
class ReplayedPlan:
    """One decision that published something: the plan in force then, and the pods it released."""

    at: datetime
    plan: PlanComputed
    released: tuple[PodReleased, ...] = ()

    def summary(self) -> dict[str, object]:
        """A compact, stable line for people and golden files."""
        return {
            "at": self.at.isoformat(),
            "plan_id": self.plan.plan_id,
            "nodes": {
                name: {
                    str(i): [f"{s.size_gb}{'u' if s.used else ''}" for s in slices]
                    for i, slices in sorted(layout.gpus.items())
                }
                for name, layout in sorted(self.plan.nodes.items())
            },
            "placed": {key: f"{p.node}/{p.gpu}" for key, p in sorted(self.plan.placed.items())},
            "unplaced": dict(sorted(self.plan.unplaced.items())),
            "excluded_nodes": dict(sorted(self.plan.excluded_nodes.items())),
            "released": {r.key: r.node for r in sorted(self.released, key=lambda r: r.key)},
        }


def replay(envelopes: Iterable[Envelope], settings: PlannerSettings | None = None) -> Iterator[ReplayedPlan]:
    settings = settings or PlannerSettings()
    state = ClusterState()
    planner = IncrementalPlanner(settings)
    wake: datetime | None = None

    def settle(now: datetime) -> Iterator[ReplayedPlan]:
        nonlocal wake
        decision = decide(state, now, settings, planner)
        wake = None
        if isinstance(decision, PublishPlan):
            state.commit(decision)
            if decision.plan_is_new or decision.releases:
                yield ReplayedPlan(now, decision.plan, decision.releases)
        elif isinstance(decision, WaitUntil):
            wake = decision.when
        elif isinstance(decision, NothingToDo) and decision.planned is not None:
            state.mark_planned(decision.planned.plan_id, decision.at_revision)

    seen_until: datetime | None = None

    def timers_until(moment: datetime) -> Iterator[ReplayedPlan]:
        """Batch windows closing and reports going stale before `moment`, in time order."""
        nonlocal seen_until
        while seen_until is not None:
            stale = state.next_staleness(seen_until, settings.report_stale_after)
            due = [t for t in (wake, stale) if t is not None and t <= moment]
            if not due:
                return
            seen_until = min(due)
            if seen_until == stale:
                state.report_went_stale(seen_until)
            yield from settle(seen_until)

    for envelope in envelopes:
        if envelope.kind not in PLANNER_KINDS:
            continue
        yield from timers_until(envelope.time)
        state.apply(envelope)
        seen_until = envelope.time
        yield from settle(envelope.time)
    while wake is not None:  # the last window closes; the recording says nothing of later silence
        yield from settle(wake)
