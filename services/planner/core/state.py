"""The planner's state, folded from events, and `decide`: the planner service's whole brain.

`ClusterState.apply(envelope)` folds one event in; the state is a set of levels keyed by pod and
node, so duplicates, redeliveries and interleavings that keep each key's own order give the
same state. `decide(state, now)` returns what to do: nothing, wait for the batch window to
close, or publish a plan. Time comes in as an argument and from event times, never from a
clock, so replaying a recorded stream reproduces every decision. Nothing here performs I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from events.envelope import Envelope
from events.nodes import NodeGpusReported, NodeObserved, NodeOptedOut
from events.plans import NodeLayout, PlanComputed, SliceSpec
from events.plans import Placement as PlacementEvent
from events.pods import PodDeleted, PodObserved, PodRejected
from services.planner.core.model import Gpu, Node, PendingPod, Placement, PlanSettings, Slice
from services.planner.core.planning import PlanRun, extend_run, plan_run


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
    # Bookkeeping for IncrementalPlanner: which levels changed when (not part of the state's value).
    revision: int = field(default=0, compare=False)
    pod_revisions: dict[str, int] = field(default_factory=dict, compare=False)
    node_revisions: dict[str, int] = field(default_factory=dict, compare=False)
    last_removal: int = field(default=0, compare=False)

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
            changed = level.report is None or [g.planned_fields() for g in level.report.gpus] != [
                g.planned_fields() for g in event.gpus
            ]
            level.report = event
            if level.reported_at is None or envelope.time > level.reported_at:
                level.reported_at = envelope.time
        else:
            changed = False
        if changed:
            self.revision += 1
            if isinstance(event, PodObserved):
                self.pod_revisions[event.key] = self.revision
            elif isinstance(event, PodDeleted | PodRejected):
                self.pod_revisions.pop(event.key, None)
                self.last_removal = self.revision
            elif isinstance(event, NodeGpusReported):
                self.node_revisions[event.node] = self.revision
            elif isinstance(event, NodeObserved | NodeOptedOut):
                self.node_revisions[event.name] = self.revision
            self._touch(envelope.time)

    def _touch(self, when: datetime) -> None:
        if self.first_unplanned_change is None or when < self.first_unplanned_change:
            self.first_unplanned_change = when
        if self.last_change is None or when > self.last_change:
            self.last_change = when

    def next_staleness(self, after: datetime, stale_after: timedelta) -> datetime | None:
        """When the next opted-in node's report goes stale (after `after`), or None.

        Reports stopping is an event of its own: nothing arrives, so the caller wakes up then and
        calls `report_went_stale`.
        """
        deadlines = [
            level.reported_at + stale_after
            for level in self.nodes.values()
            if level.observed is not None and level.reported_at is not None
        ]
        return min((d for d in deadlines if d > after), default=None)

    def report_went_stale(self, when: datetime) -> None:
        """A node's report went stale at `when`: that changes where slices may be carved."""
        self.revision += 1
        self._touch(when)

    def mark_planned(self, plan_id: str, at_revision: int) -> None:
        """The state as of `at_revision` is served by `plan_id` (just published, or before).

        A change folded in since (while the plan was being published) keeps its batch window open.
        """
        self.last_plan_id = plan_id
        if self.revision == at_revision:
            self.first_unplanned_change = None


def _planned_fields(pod: PodObserved) -> tuple[object, ...]:
    """What of a pod the planner uses: a new resourceVersion alone changes nothing."""
    return (pod.size_gb, pod.priority, pod.created, pod.phase, pod.node)


@dataclass(frozen=True)
class NothingToDo:
    """No plan to publish. `planned` is the plan that already serves the state when one was
    computed: the caller marks it (`ClusterState.mark_planned`) so the next batch window starts afresh."""

    planned: PlanComputed | None = None
    at_revision: int = 0


@dataclass(frozen=True)
class WaitUntil:
    when: datetime


@dataclass(frozen=True)
class PublishPlan:
    """Publish `plan`, then mark it planned as of `at_revision`."""

    plan: PlanComputed
    at_revision: int


Decision = NothingToDo | WaitUntil | PublishPlan


def decide(
    state: ClusterState, now: datetime, settings: PlannerSettings, planner: IncrementalPlanner | None = None
) -> Decision:
    """What to do now. A long-lived `planner` makes repeated decisions cheap; the result is the same."""
    if state.first_unplanned_change is None or state.last_change is None:
        return NothingToDo()
    window_closes = min(
        state.last_change + settings.window.idle, state.first_unplanned_change + settings.window.maximum
    )
    if now < window_closes:
        return WaitUntil(window_closes)
    plan = (planner or IncrementalPlanner(settings)).compute(state, now)
    if plan.plan_id == state.last_plan_id:
        return NothingToDo(planned=plan, at_revision=state.revision)
    return PublishPlan(plan, state.revision)


def compute_plan(state: ClusterState, now: datetime, settings: PlannerSettings) -> PlanComputed:
    """The plan for `state` at `now`, computed from scratch."""
    return IncrementalPlanner(settings).compute(state, now)


class _PlanDigest:
    """A plan id that is a function of the plan's content and can be updated item by item.

    Each item (a node's layout, a placement, a reason) hashes on its own; the id is their sum,
    so adding or replacing one item costs one hash, whatever the size of the plan.
    """

    MODULUS = 2**128

    def __init__(self) -> None:
        self.total = 0

    @staticmethod
    def item(*parts: object) -> int:
        text = json.dumps(parts, separators=(",", ":"))
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "big")

    def add(self, item: int) -> None:
        self.total = (self.total + item) % self.MODULUS

    def remove(self, item: int) -> None:
        self.total = (self.total - item) % self.MODULUS

    @property
    def plan_id(self) -> str:
        return f"{self.total:032x}"[:24]


def _node_layout(gpus: dict[int, tuple[Slice, ...]]) -> NodeLayout:
    return NodeLayout.model_construct(
        gpus={
            index: tuple(SliceSpec.model_construct(size_gb=s.size_gb, used=s.used) for s in slices)
            for index, slices in sorted(gpus.items())
        }
    )


def _node_item(name: str, gpus: dict[int, tuple[Slice, ...]]) -> int:
    layout = [[index, [[s.size_gb, s.used] for s in slices]] for index, slices in sorted(gpus.items())]
    return _PlanDigest.item("node", name, layout)


def _placement(p: Placement) -> PlacementEvent:
    return PlacementEvent.model_construct(node=p.node, gpu=p.gpu, size_gb=p.size_gb)


@dataclass
class _Basis:
    """The last full computation, which pods that sort after all others can extend."""

    run: PlanRun
    revision: int
    can_carve: dict[str, bool]
    pending: set[str]
    digest: _PlanDigest
    node_items: dict[str, int]
    plan: PlanComputed


class IncrementalPlanner:
    """Computes plans, reusing the previous computation when only new pending pods arrived.

    The fast path applies only when nothing but new pending pods changed since the last
    computation, and `extend_run` guarantees that it decides exactly what a full pass would; in
    every other case the plan is computed from scratch. Either way the plan is a function of the
    state, identical byte for byte.
    """

    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = settings
        self._basis: _Basis | None = None
        self._rendered: dict[str, tuple[dict[int, tuple[Slice, ...]], NodeLayout, int]] = {}

    def _render(self, name: str, gpus: dict[int, tuple[Slice, ...]]) -> tuple[NodeLayout, int]:
        """A node's layout as an event value and its digest item, reused while the layout stays."""
        cached = self._rendered.get(name)
        if cached is not None and cached[0] == gpus:
            return cached[1], cached[2]
        layout, item = _node_layout(gpus), _node_item(name, gpus)
        self._rendered[name] = (gpus, layout, item)
        return layout, item

    def compute(self, state: ClusterState, now: datetime) -> PlanComputed:
        return self._extended(state, now) or self._full(state, now)

    def _full(self, state: ClusterState, now: datetime) -> PlanComputed:
        nodes, waiting_for_report = planning_nodes(state, now, self.settings)
        pending = [
            PendingPod(p.namespace, p.name, p.size_gb, p.priority, p.created)
            for p in state.pods.values()
            if p.waits_for_slice
        ]
        run = plan_run(nodes, pending, self.settings.plan)
        result = run.result
        excluded = dict(result.excluded_nodes)
        for name in waiting_for_report:
            excluded[name] = "waiting for the node agent's first GPU report"
        unplaced = result.unplaced
        if waiting_for_report and not nodes:
            unplaced = {
                key: f"waiting for GPU reports from {len(waiting_for_report)} opted-in node(s)"
                if "no opted-in node" in reason
                else reason
                for key, reason in unplaced.items()
            }
        digest = _PlanDigest()
        rendered = {name: self._render(name, gpus) for name, gpus in sorted(result.layouts.items())}
        node_items = {name: item for name, (_, item) in rendered.items()}
        for item in node_items.values():
            digest.add(item)
        for key, p in result.placed.items():
            digest.add(_PlanDigest.item("placed", key, p.node, p.gpu, p.size_gb))
        for key, reason in unplaced.items():
            digest.add(_PlanDigest.item("unplaced", key, reason))
        for name, reason in excluded.items():
            digest.add(_PlanDigest.item("excluded", name, reason))
        plan = PlanComputed.model_construct(
            kind="PlanComputed",
            plan_id=digest.plan_id,
            nodes={name: layout for name, (layout, _) in rendered.items()},
            placed={key: _placement(p) for key, p in sorted(result.placed.items())},
            unplaced=dict(sorted(unplaced.items())),
            excluded_nodes=dict(sorted(excluded.items())),
        )
        run.extendable = run.extendable and not waiting_for_report
        can_carve = {node.name: node.can_carve for node in nodes}
        self._basis = _Basis(
            run, state.revision, can_carve, {p.key for p in pending}, digest, node_items, plan
        )
        return plan

    def _extended(self, state: ClusterState, now: datetime) -> PlanComputed | None:
        basis, self._basis = self._basis, None
        if basis is None or state.last_removal > basis.revision:
            return None
        if any(revision > basis.revision for revision in state.node_revisions.values()):
            return None
        for name, can_carve in basis.can_carve.items():
            level = state.nodes[name]
            if level.reported_at is None or level.observed is None:
                return None
            fresh = now - level.reported_at <= self.settings.report_stale_after
            if (fresh and not level.observed.unschedulable) != can_carve:
                return None
        arrived = [key for key, revision in state.pod_revisions.items() if revision > basis.revision]
        if any(key in basis.pending or not state.pods[key].waits_for_slice for key in arrived):
            return None
        pods = [state.pods[key] for key in arrived]
        extension = extend_run(
            basis.run, [PendingPod(p.namespace, p.name, p.size_gb, p.priority, p.created) for p in pods]
        )
        if extension is None:
            return None
        digest = basis.digest
        nodes = dict(basis.plan.nodes)
        for name, gpus in extension.layouts.items():
            digest.remove(basis.node_items[name])
            nodes[name], basis.node_items[name] = self._render(name, gpus)
            digest.add(basis.node_items[name])
        for key, p in extension.placed.items():
            digest.add(_PlanDigest.item("placed", key, p.node, p.gpu, p.size_gb))
        for key, reason in extension.unplaced.items():
            digest.add(_PlanDigest.item("unplaced", key, reason))
        placed = {**basis.plan.placed, **{key: _placement(p) for key, p in extension.placed.items()}}
        plan = PlanComputed.model_construct(
            kind="PlanComputed",
            plan_id=digest.plan_id,
            nodes=dict(sorted(nodes.items())),
            placed=dict(sorted(placed.items())),
            unplaced=dict(sorted({**basis.plan.unplaced, **extension.unplaced}.items())),
            excluded_nodes=basis.plan.excluded_nodes,
        )
        basis.revision = state.revision
        basis.pending.update(arrived)
        basis.plan = plan
        self._basis = basis
        return plan


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
