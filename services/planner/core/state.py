"""The planner's state, folded from events, and `decide`: the planner service's whole brain.

`ClusterState.apply(envelope)` folds one event in; the state is a set of levels keyed by pod and
node, so duplicates, redeliveries and interleavings that keep each key's own order give the
same state. `decide(state, now)` returns what to do: nothing, wait for the batch window to
close, or publish a plan. Time comes in as an argument and from event times, never from a
clock, so replaying a recorded stream reproduces every decision. Nothing here performs I/O.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from events.envelope import Envelope, content_id
from events.nodes import NodeGpusReported, NodeObserved, NodeOptedOut
from events.plans import NodeLayout, PlanComputed, SliceSpec
from events.plans import Placement as PlacementEvent
from events.pods import PodDeleted, PodObserved, PodRejected
from services.planner.core.model import Gpu, Node, PendingPod, PlanResult, PlanSettings, Slice
from services.planner.core.planning import plan_cluster
from services.planner.snapshot import plan_document


@dataclass(frozen=True)
class BatchWindow:
    """Wait until no new event came for `idle`, but never longer than `maximum` after the first."""

    idle: timedelta = timedelta(milliseconds=40)
    maximum: timedelta = timedelta(milliseconds=250)


@dataclass(frozen=True)
class PlannerSettings:
    plan: PlanSettings = field(default_factory=PlanSettings)
    window: BatchWindow = field(default_factory=BatchWindow)
    report_stale_after: timedelta = timedelta(seconds=45)


@dataclass
class _NodeLevel:
    observed: NodeObserved | None = None
    report: NodeGpusReported | None = None
    reported_at: datetime | None = None


@dataclass
class ClusterState:
    """Levels of pods and nodes, plus the times that drive the batch window."""

    pods: dict[str, PodObserved] = field(default_factory=dict)
    nodes: dict[str, _NodeLevel] = field(default_factory=dict)
    first_unplanned_change: datetime | None = None
    last_change: datetime | None = None
    last_plan_id: str | None = None

    def apply(self, envelope: Envelope) -> None:
        """Fold one event in; events that change nothing the planner uses leave the window alone."""
        event = envelope.event
        changed = True
        if isinstance(event, PodObserved):
            previous = self.pods.get(event.key)
            changed = previous is None or _planned_fields(previous) != _planned_fields(event)
            self.pods[event.key] = event
        elif isinstance(event, PodDeleted | PodRejected):
            changed = self.pods.pop(event.key, None) is not None
        elif isinstance(event, NodeObserved):
            level = self.nodes.setdefault(event.name, _NodeLevel())
            changed = level.observed != event
            level.observed = event
        elif isinstance(event, NodeOptedOut):
            # Only the opt-in goes: the agent's report travels on its own subject, in no fixed
            # order with this one, and stays true of the node.
            known = self.nodes.get(event.name)
            changed = known is not None and known.observed is not None
            if known is not None:
                known.observed = None
        elif isinstance(event, NodeGpusReported):
            level = self.nodes.setdefault(event.node, _NodeLevel())
            changed = level.report is None or level.report.gpus != event.gpus
            level.report = event
            if level.reported_at is None or envelope.time > level.reported_at:
                level.reported_at = envelope.time
        else:
            changed = False
        if changed:
            self._touch(envelope.time)

    def _touch(self, when: datetime) -> None:
        if self.first_unplanned_change is None or when < self.first_unplanned_change:
            self.first_unplanned_change = when
        if self.last_change is None or when > self.last_change:
            self.last_change = when

    def mark_planned(self, plan_id: str) -> None:
        """The state so far is served by `plan_id` (just published, or published before)."""
        self.last_plan_id = plan_id
        self.first_unplanned_change = None


def _planned_fields(pod: PodObserved) -> tuple[object, ...]:
    """What of a pod the planner uses: a new resourceVersion alone changes nothing."""
    return (pod.size_gb, pod.priority, pod.created, pod.phase, pod.node)


@dataclass(frozen=True)
class NothingToDo:
    """No plan to publish. `planned` names the plan that already serves the state when one was
    computed: the caller marks it (`ClusterState.mark_planned`) so the next batch window starts afresh."""

    planned: str | None = None


@dataclass(frozen=True)
class WaitUntil:
    when: datetime


@dataclass(frozen=True)
class PublishPlan:
    plan: PlanComputed


Decision = NothingToDo | WaitUntil | PublishPlan


def decide(state: ClusterState, now: datetime, settings: PlannerSettings) -> Decision:
    if state.first_unplanned_change is None or state.last_change is None:
        return NothingToDo()
    window_closes = min(
        state.last_change + settings.window.idle, state.first_unplanned_change + settings.window.maximum
    )
    if now < window_closes:
        return WaitUntil(window_closes)
    plan = compute_plan(state, now, settings)
    if plan.plan_id == state.last_plan_id:
        return NothingToDo(planned=plan.plan_id)
    return PublishPlan(plan)


def compute_plan(state: ClusterState, now: datetime, settings: PlannerSettings) -> PlanComputed:
    nodes, waiting_for_report = planning_nodes(state, now, settings)
    pending = [
        PendingPod(p.namespace, p.name, p.size_gb, p.priority, p.created)
        for p in state.pods.values()
        if p.waits_for_slice
    ]
    result = plan_cluster(nodes, pending, settings.plan)
    excluded = dict(result.excluded_nodes)
    for name in waiting_for_report:
        excluded[name] = "waiting for the node agent's first GPU report"
    if waiting_for_report and not nodes:
        result = PlanResult(
            layouts=result.layouts,
            placed=result.placed,
            unplaced={
                key: f"waiting for GPU reports from {len(waiting_for_report)} opted-in node(s)"
                if "no opted-in node" in reason
                else reason
                for key, reason in result.unplaced.items()
            },
            excluded_nodes=excluded,
        )
    else:
        result = PlanResult(result.layouts, result.placed, result.unplaced, excluded)
    document = plan_document(result)
    return PlanComputed(
        plan_id=content_id(json.dumps(document, sort_keys=True)),
        nodes={
            name: NodeLayout(
                gpus={
                    i: tuple(SliceSpec(size_gb=s.size_gb, used=s.used) for s in slices)
                    for i, slices in gpus.items()
                }
            )
            for name, gpus in result.layouts.items()
        },
        placed={
            key: PlacementEvent(node=p.node, gpu=p.gpu, size_gb=p.size_gb) for key, p in result.placed.items()
        },
        unplaced=result.unplaced,
        excluded_nodes=result.excluded_nodes,
    )


def planning_nodes(
    state: ClusterState, now: datetime, settings: PlannerSettings
) -> tuple[list[Node], list[str]]:
    """Opted-in nodes with their reported GPUs, and the names of those that never reported.

    A slice counts as used when the agent says so, and also when a pod bound to the node holds
    it but the agent has not seen its allocation yet: the scheduler already promised it.
    """
    holders: dict[str, Counter[int]] = {}
    for pod in state.pods.values():
        if pod.holds_slice and pod.node is not None:
            holders.setdefault(pod.node, Counter())[pod.size_gb] += 1
    nodes: list[Node] = []
    never_reported: list[str] = []
    for name, level in sorted(state.nodes.items()):
        if level.observed is None:
            continue
        if level.report is None or level.reported_at is None:
            never_reported.append(name)
            continue
        fresh = now - level.reported_at <= settings.report_stale_after
        gpus = _with_bound_pods(level.report, holders.get(name, Counter()))
        nodes.append(Node(name=name, gpus=gpus, can_carve=fresh and not level.observed.unschedulable))
    return nodes, never_reported


def _with_bound_pods(report: NodeGpusReported, bound: Counter[int]) -> tuple[Gpu, ...]:
    reported_used = Counter(s.size_gb for g in report.gpus for s in g.slices if s.used)
    to_mark = Counter(
        {size: count - reported_used[size] for size, count in bound.items() if count > reported_used[size]}
    )
    gpus: list[Gpu] = []
    for gpu in sorted(report.gpus, key=lambda g: g.index):
        if gpu.mig_enabled:
            continue
        slices: list[Slice] = []
        for s in gpu.slices:
            used = s.used
            if not used and to_mark[s.size_gb] > 0:
                to_mark[s.size_gb] -= 1
                used = True
            slices.append(Slice(size_gb=s.size_gb, used=used))
        gpus.append(
            Gpu(
                index=gpu.index,
                model=gpu.model,
                memory_mib=gpu.memory_mib,
                slices=tuple(slices),
                max_slices=gpu.max_slices,
            )
        )
    return tuple(gpus)
