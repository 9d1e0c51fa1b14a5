"""The planner's whole behaviour as one deterministic machine: events in, steps out.

`Planner.observe` folds an event into the state; `Planner.step(now)` says everything the shell
must do at `now`: the messages to publish, in order, each with its subject and de-duplication id,
and when to be asked again if nothing arrives before. Once the shell has published a step's
messages it calls `Planner.published(step)`, and only then is the step remembered, so a publish
that failed half-way is decided (and de-duplicated) again.

The planner service and `mpsflow replay` both drive this one machine, the service at wall-clock
moments and the replay at the recorded events' times, so the golden tests check every message
downstream consumes. Nothing here performs I/O or reads a clock: time is `now`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from events import subjects
from events.envelope import Envelope, Event, content_id
from events.plans import PlanComputed
from services.planner.core.state import (
    ClusterState,
    IncrementalPlanner,
    NothingToDo,
    PlannerSettings,
    PublishPlan,
    WaitUntil,
    decide,
)

WHOLE_PLAN_ITEMS = 2_000
"""Placements, reasons and GPU layouts a plan may hold and still travel whole (about 150 KiB of JSON)."""


@dataclass(frozen=True)
class Outgoing:
    """One message to publish: where, what, and the id that makes publishing it twice store it once."""

    subject: str
    event: Event
    message_id: str


@dataclass(frozen=True)
class Step:
    """What the planner must do now: publish `messages` in order (then call `Planner.published`),
    and be asked again at `wake_at` unless an event comes first (None: only an event wakes it)."""

    messages: tuple[Outgoing, ...] = ()
    wake_at: datetime | None = None
    decision: PublishPlan | None = None


def published_plan(plan: PlanComputed) -> PlanComputed:
    """The plan as it goes on the bus: whole while small, its id and excluded nodes when large.

    Node agents get their layouts from `NodePlanned` and pods their reasons from `PodUnplaced`, so
    the whole plan on the bus is for people and tools (`mpsflow record`); a large cluster's plan
    would outgrow a NATS message.
    """
    items = len(plan.placed) + len(plan.unplaced) + sum(len(layout.gpus) for layout in plan.nodes.values())
    if items <= WHOLE_PLAN_ITEMS:
        return plan
    return PlanComputed(plan_id=plan.plan_id, nodes={}, excluded_nodes=plan.excluded_nodes)


def messages_of(decision: PublishPlan) -> tuple[Outgoing, ...]:
    """The messages a decision publishes, in the order that `PublishPlan` gives.

    A plan and a node's layout are identified by their content and by the state revision they were
    decided at: the same decision published twice (a retry) is stored once, while the same plan
    decided again later (the cluster came back to where it was) is a new message. Its content alone
    would make the bus drop it as a duplicate, and a node asked again for a layout it had before
    would never hear of it.
    """
    plan = decision.plan
    at = str(decision.at_revision)
    out = [
        Outgoing(
            subjects.planned_subject(planned.node),
            planned,
            content_id("planned", planned.node, plan.plan_id, at),
        )
        for planned in decision.node_plans
    ]
    if decision.plan_is_new:
        out.append(
            Outgoing(subjects.plan_subject(), published_plan(plan), content_id("plan", plan.plan_id, at))
        )
    out.extend(
        Outgoing(
            subjects.release_subject(release.namespace, release.name),
            release,
            content_id("released", release.uid),
        )
        for release in decision.releases
    )
    out.extend(
        Outgoing(
            subjects.unplaced_subject(unplaced.namespace, unplaced.name),
            unplaced,
            content_id("unplaced", unplaced.uid, unplaced.reason),
        )
        for unplaced in decision.unplaced
    )
    return tuple(out)


class Planner:
    """The planner's state and decisions. The same events observed in the same order, stepped at
    the same moments, give the same steps, byte for byte."""

    def __init__(self, settings: PlannerSettings | None = None) -> None:
        self.settings = settings or PlannerSettings()
        self.state = ClusterState()
        self._plans = IncrementalPlanner(self.settings)
        self._time_seen: datetime | None = None

    def observe(self, envelope: Envelope) -> None:
        self.state.apply(envelope)

    @property
    def last_plan_mode(self) -> str:
        """How the last plan was computed: `incremental` on top of the one before, or `full`."""
        return self._plans.last_mode

    def recall_plan(self, plan: PlanComputed) -> None:
        """The plan published last (by this planner before it restarted): the same plan decided
        again is not published again, and its pods keep their free slices (`last_placed`)."""
        self.state.last_plan_id = plan.plan_id
        self.state.last_placed = plan.placed

    def step(self, now: datetime) -> Step:
        """What to do at `now`. Time passing is an input too: a node whose report went stale since
        the last step can no longer host new slices, and a pod left waiting that became overdue
        since is served first."""
        if self._time_seen is not None:
            moment = self._next_moment(self._time_seen)
            if moment is not None and moment <= now:
                self.state.time_passed(moment)
        self._time_seen = now
        decision = decide(self.state, now, self.settings, self._plans)
        if isinstance(decision, PublishPlan):
            return Step(messages_of(decision), wake_at=now, decision=decision)
        wake_at = decision.when if isinstance(decision, WaitUntil) else None
        if isinstance(decision, NothingToDo) and decision.planned is not None:
            self.state.mark_planned(decision.planned.plan_id, decision.at_revision)
        moment = self._next_moment(now)
        if moment is not None and (wake_at is None or moment < wake_at):
            wake_at = moment
        return Step(wake_at=wake_at)

    def _next_moment(self, after: datetime) -> datetime | None:
        """The next moment after `after` when time alone changes the plan (`ClusterState.time_passed`)."""
        stale = self.state.next_staleness(after, self.settings.report_stale_after)
        overdue = self._plans.next_overdue(after)
        return min((m for m in (stale, overdue) if m is not None), default=None)

    def published(self, step: Step) -> None:
        """Every message of `step` is on the bus: remember what was asked of nodes and pods."""
        if step.decision is not None:
            self.state.commit(step.decision)
            if self._time_seen is not None:
                self._plans.committed(self.state, step.decision, self._time_seen)
