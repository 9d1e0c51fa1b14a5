"""The planner's state, folded from events, and `decide`: the planner service's whole brain.

`ClusterState.apply(envelope)` folds one event in; the state is a set of levels keyed by pod and
node, so duplicates, redeliveries and interleavings that keep each key's own order give the
same state. Besides what the pod watcher and the node agents report, the state holds what the
planner itself asked (each node's layout, the pods it released) and what each node answered
(the layout it applied or refused). `decide(state, now)` returns what to do: nothing, wait for the
batch window to close, or publish what changed (node layouts, the plan, pod releases, reasons).

How it never fails a pod: a gated pod is released only to a node whose agent reports a free slice
of its size that the kubelet lists; a node gets one layout change at a time; a free slice that a
pod outside the planner's control may be bound to is never reclaimed (`planning_nodes`), nor
withdrawn from a GPU that cannot serve slices (`_withdrawn_gpus`); a layout a node refused is not
asked again while its report stays the same. Time comes in as an argument
and from event times, never from a clock, so replaying a recorded stream reproduces every
decision. Nothing here performs I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from events.envelope import Envelope, content_id
from events.nodes import NodeGpusReported, NodeObserved, NodeOptedOut
from events.plans import NodeConfigApplied, NodeConfigFailed, NodeLayout, NodePlanned, PlanComputed, SliceSpec
from events.plans import Placement as PlacementEvent
from events.pods import NodeRules, PodDeleted, PodObserved, PodRejected, PodReleased, PodUnplaced
from services.planner.core.eligibility import admits, has_effect
from services.planner.core.model import Gpu, Node, PendingPod, Placement, PlanSettings, Slice
from services.planner.core.run import PlanRun, extend_run, plan_run
from services.planner.core.strategy import NO_OPTED_IN_NODE, pod_order


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
    # Pods are released only to a node whose agent reported this recently (a few heartbeats): an
    # agent that stopped may have taken its slices away from the kubelet with it.
    release_report_age: timedelta = timedelta(seconds=25)
    # While some node applies a layout, a pod is told why it waits only once it has waited this long.
    reason_patience: timedelta = timedelta(seconds=30)


Layout = dict[int, tuple[int, ...]]
"""Slice sizes per GPU index, each GPU's sizes sorted: what a node config asks, compared as a value."""


def layout_of(gpus: Mapping[int, Iterable[int]]) -> Layout:
    return {index: tuple(sorted(sizes)) for index, sizes in gpus.items()}


def _asks_for(desired: Layout, actual: Layout) -> bool:
    """Whether `actual` has exactly the slices `desired` asks for on every GPU it names."""
    return all(actual.get(index, ()) == sizes for index, sizes in desired.items())


def _reported_layout(report: NodeGpusReported) -> Layout:
    return layout_of({gpu.index: (s.size_gb for s in gpu.slices) for gpu in report.gpus})


@dataclass(frozen=True)
class Asked:
    """A layout the planner asked of a node, and the plan it asked it in."""

    layout: Layout
    plan_id: str


@dataclass(frozen=True)
class Answer:
    """What a node's agent said of the config of a plan: applied, or refused against the report it
    had then (`report_revision`)."""

    plan_id: str
    layout: Layout
    refused: bool
    report_revision: int


@dataclass
class _NodeLevel:
    observed: NodeObserved | None = None
    report: NodeGpusReported | None = None
    reported_at: datetime | None = None
    report_revision: int = 0
    desired: Asked | None = None  # the last layout the planner asked of the node
    answer: Answer | None = None  # the agent's last word on a config
    refusal: Answer | None = None  # the last config it refused

    @property
    def answered(self) -> bool:
        """The agent has applied or refused the last layout asked of it."""
        return (
            self.desired is not None
            and self.answer is not None
            and self.answer.plan_id == self.desired.plan_id
        )

    @property
    def applying(self) -> bool:
        """A layout asked of the node is neither answered nor shown by its report: one change at a time."""
        if self.desired is None or self.answered:
            return False
        return self.report is None or not _asks_for(self.desired.layout, _reported_layout(self.report))

    def refused(self, layout: Layout) -> bool:
        """The agent refused exactly this layout, and nothing it reported has changed since."""
        return (
            self.refusal is not None
            and self.refusal.report_revision == self.report_revision
            and self.refusal.layout == layout
        )


@dataclass
class ClusterState:
    """Levels of pods and nodes, what the planner asked of nodes and pods, and the times that drive
    the batch window."""

    pods: dict[str, PodObserved] = field(default_factory=dict)
    nodes: dict[str, _NodeLevel] = field(default_factory=dict)
    releases: dict[str, PodReleased] = field(default_factory=dict)  # decided, not yet seen on the pod
    unplaced_published: dict[str, str] = field(default_factory=dict)  # pod uid -> reason
    first_unplanned_change: datetime | None = None
    last_change: datetime | None = None
    last_plan_id: str | None = None
    # Bookkeeping for IncrementalPlanner: when pods arrived, and the last change of anything else.
    revision: int = field(default=0, compare=False)
    pod_revisions: dict[str, int] = field(default_factory=dict, compare=False)
    structure_revision: int = field(default=0, compare=False)

    def apply(self, envelope: Envelope) -> None:
        """Fold one event in; events that change nothing the planner uses leave the window alone."""
        event = envelope.event
        arrival = False
        if isinstance(event, PodObserved):
            previous = self.pods.get(event.key)
            changed = previous is None or _planned_fields(previous) != _planned_fields(event)
            arrival = previous is None and event.waits_for_slice
            self.pods[event.key] = event
            release = self.releases.get(event.key)
            if release is not None and (
                release.uid != event.uid or not (event.gated and event.waits_for_slice)
            ):
                # The pod shows the release, or someone else lifted the gate, or it is another pod.
                del self.releases[event.key]
        elif isinstance(event, PodDeleted | PodRejected):
            gone = self.pods.pop(event.key, None)
            self.releases.pop(event.key, None)
            if gone is not None:
                self.unplaced_published.pop(gone.uid, None)
            changed = gone is not None
        elif isinstance(event, PodReleased):
            # Folded whether or not the pod is known yet: on a rebuild, its latest level (still
            # gated if the pod changed before the pod watcher lifted the gate) may come after.
            pod = self.pods.get(event.key)
            superseded = pod is not None and (pod.uid != event.uid or not (pod.gated and pod.waits_for_slice))
            changed = not superseded and self.releases.get(event.key) != event
            if changed:
                self.releases[event.key] = event
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
            changed = (
                level.report is None
                or level.report.mps_ipc != event.mps_ipc
                or [g.planned_fields() for g in level.report.gpus] != [g.planned_fields() for g in event.gpus]
            )
            level.report = event
            if changed:
                level.report_revision += 1
            if level.reported_at is None or envelope.time > level.reported_at:
                level.reported_at = envelope.time
        elif isinstance(event, NodePlanned):
            # The planner's own word, read back when it rebuilds its state after a restart.
            level = self.nodes.setdefault(event.node, _NodeLevel())
            changed = level.desired is None
            if changed:
                level.desired = Asked(layout_of(event.layout.sizes()), event.plan_id)
        elif isinstance(event, NodeConfigApplied | NodeConfigFailed):
            level = self.nodes.setdefault(event.node, _NodeLevel())
            answer = Answer(
                event.plan_id,
                layout_of(event.gpus),
                isinstance(event, NodeConfigFailed),
                level.report_revision,
            )
            changed = level.answer != answer
            level.answer = answer
            if answer.refused:
                level.refusal = answer
        else:
            changed = False
        if changed:
            self.revision += 1
            if arrival and isinstance(event, PodObserved):
                self.pod_revisions[event.key] = self.revision
            else:
                self.structure_revision = self.revision
                if isinstance(event, PodObserved | PodDeleted | PodRejected):
                    self.pod_revisions.pop(event.key, None)
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
        self.structure_revision = self.revision
        self._touch(when)

    def mark_planned(self, plan_id: str, at_revision: int) -> None:
        """The state as of `at_revision` is served by `plan_id` (just published, or before).

        A change folded in since (while the plan was being published) keeps its batch window open.
        """
        self.last_plan_id = plan_id
        if self.revision == at_revision:
            self.first_unplanned_change = None

    def commit(self, decision: PublishPlan) -> None:
        """Everything `decision` said was published: remember what was asked of nodes and pods."""
        for planned in decision.node_plans:
            asked = Asked(layout_of(planned.layout.sizes()), planned.plan_id)
            self.nodes.setdefault(planned.node, _NodeLevel()).desired = asked
        for release in decision.releases:
            self.releases[release.key] = release
        for told in decision.unplaced:
            self.unplaced_published[told.uid] = told.reason
        if decision.unplaced_settled:  # forget pods no longer waiting: told again if they wait again
            waiting = {self.pods[key].uid for key in decision.plan.unplaced if key in self.pods}
            self.unplaced_published = {
                uid: reason for uid, reason in self.unplaced_published.items() if uid in waiting
            }
        if decision.node_plans or decision.releases:
            self.structure_revision = self.revision
        self.mark_planned(decision.plan.plan_id, decision.at_revision)

    def holders(self) -> dict[str, list[PodObserved]]:
        """Per node, the pods that hold one of its slices or are about to: bound and not finished, or
        released there (by the pod's own word, or by a release not yet seen on the pod)."""
        found: dict[str, list[PodObserved]] = {}
        for key, pod in sorted(self.pods.items()):
            release = self.releases.get(key)
            node = pod.holder_node or (release.node if release is not None else None)
            if node is not None:
                found.setdefault(node, []).append(pod)
        return found

    def waiting(self) -> list[PodObserved]:
        """Pods the planner has yet to provide for."""
        return [
            pod for key, pod in sorted(self.pods.items()) if pod.waits_for_slice and key not in self.releases
        ]


def _planned_fields(pod: PodObserved) -> tuple[object, ...]:
    """What of a pod the planner uses: a new resourceVersion alone changes nothing."""
    return (pod.size_gb, pod.priority, pod.created, pod.phase, pod.node, pod.gated, pod.released_to)


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
    """Publish what changed, then `ClusterState.commit` the decision.

    In this order: `node_plans` (each node whose layout must change, on its own subject; never a
    node still applying its last one), `plan` itself when `plan_is_new`, `releases` (gated pods
    whose slice is ready and listed by their node's kubelet), and `unplaced` (reasons not yet told:
    while no node is applying a layout, so that a pod is told a settled reason, or once the pod has
    waited `PlannerSettings.reason_patience`, so that a busy cluster tells its reasons too).
    """

    plan: PlanComputed
    at_revision: int
    plan_is_new: bool = True
    node_plans: tuple[NodePlanned, ...] = ()
    releases: tuple[PodReleased, ...] = ()
    unplaced: tuple[PodUnplaced, ...] = ()
    unplaced_settled: bool = False


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
    node_plans = tuple(_node_plans(state, plan))
    releases = tuple(_releases(state, plan, now, settings, {planned.node for planned in node_plans}))
    settled = not any(level.applying for level in state.nodes.values() if level.observed is not None)
    unplaced = tuple(_unplaced(state, plan, now - settings.reason_patience, settled))
    plan_is_new = plan.plan_id != state.last_plan_id
    if not (plan_is_new or node_plans or releases or unplaced):
        return NothingToDo(planned=plan, at_revision=state.revision)
    return PublishPlan(plan, state.revision, plan_is_new, node_plans, releases, unplaced, settled)


def _node_plans(state: ClusterState, plan: PlanComputed) -> Iterator[NodePlanned]:
    """Each node whose planned slices differ from what was last asked of it (or, never asked, from
    what it has), unless it is still applying what was last asked; and a node that refused what was
    last asked, when that is wanted again now that its report changed (asked again, in a new plan)."""
    for name, layout in plan.nodes.items():
        level = state.nodes[name]
        if level.applying or level.report is None:
            continue
        wanted = layout_of(layout.sizes())
        asked = level.desired.layout if level.desired is not None else _reported_layout(level.report)
        refused_last = level.answered and level.answer is not None and level.answer.refused
        if wanted != asked:
            yield NodePlanned(node=name, plan_id=plan.plan_id, layout=layout)
        elif refused_last and level.answer is not None and not level.refused(wanted):
            # The same layout asked again gets an id of its own, so that its answer tells.
            again = content_id("asked again", plan.plan_id, level.answer.plan_id)
            yield NodePlanned(node=name, plan_id=again, layout=layout)


def _releases(
    state: ClusterState, plan: PlanComputed, now: datetime, settings: PlannerSettings, changing: set[str]
) -> Iterator[PodReleased]:
    """Gated pods the plan places on a node that has a free slice of their size for them now.

    A slice counts when the node's report shows it free and listed by the kubelet, less one for each
    pod holding or about to hold a slice of that size there that the report does not name yet (the
    kubelet may give it any free slice of the size). Nodes applying a layout release nothing, nor do
    those `changing` now: the kubelet may give a pod released there the very slice the change takes.
    And the node's allocatable in the API must have room for the pod beside every pod bound or
    released there: the scheduler binds it at once then, and never finds it unschedulable, which
    would make kube-scheduler look for pods to preempt on that node.
    """
    holders = state.holders()
    available: dict[tuple[str, int], int] = {}
    ordered = sorted(
        (state.pods[key] for key in plan.placed if key in state.pods),
        key=lambda p: pod_order(PendingPod(p.namespace, p.name, p.size_gb, p.priority, p.created)),
    )
    for pod in ordered:
        if not pod.gated or not pod.waits_for_slice or pod.key in state.releases:
            continue
        node = plan.placed[pod.key].node
        level = state.nodes.get(node)
        if (
            level is None
            or level.observed is None
            or level.reported_at is None
            or now - level.reported_at > settings.release_report_age
            or node in changing
            or not _can_host(level, now, settings)
            or level.applying
            or level.report is None
        ):
            continue
        slot = (node, pod.size_gb)
        if slot not in available:
            there = holders.get(node, [])
            scheduler_room = level.observed.allocatable.get(pod.size_gb, 0) - sum(
                1 for holder in there if holder.size_gb == pod.size_gb
            )
            available[slot] = min(_ready_slices(level.report, there, pod.size_gb), scheduler_room)
        if available[slot] > 0:
            available[slot] -= 1
            yield PodReleased(
                namespace=pod.namespace,
                name=pod.name,
                uid=pod.uid,
                node=node,
                size_gb=pod.size_gb,
                plan_id=plan.plan_id,
            )


def _ready_slices(report: NodeGpusReported, holders: Iterable[PodObserved], size_gb: int) -> int:
    """Free slices of `size_gb` that the kubelet lists, less those that unnamed holders may take."""
    free = sum(
        1
        for gpu in report.gpus
        if gpu.serves_slices
        for s in gpu.slices
        if s.size_gb == size_gb and not s.used and s.listed_by_kubelet
    )
    named = {s.holder for gpu in report.gpus for s in gpu.slices if s.holder is not None}
    unnamed = sum(1 for pod in holders if pod.size_gb == size_gb and pod.key not in named)
    return free - unnamed


def _unplaced(
    state: ClusterState, plan: PlanComputed, created_before: datetime, settled: bool
) -> Iterator[PodUnplaced]:
    """Why each pod waits, once per pod (by uid, so a re-created pod is told again) and reason; while
    a node applies a layout, only for pods created before `created_before`."""
    for key, reason in plan.unplaced.items():
        pod = state.pods.get(key)
        if pod is None or not (settled or pod.created < created_before):
            continue
        if state.unplaced_published.get(pod.uid) != reason:
            yield PodUnplaced(namespace=pod.namespace, name=pod.name, uid=pod.uid, reason=reason)


def _can_host(level: _NodeLevel, now: datetime, settings: PlannerSettings) -> bool:
    """The node is opted in, schedulable and its report is fresh."""
    return (
        level.observed is not None
        and not level.observed.unschedulable
        and level.reported_at is not None
        and now - level.reported_at <= settings.report_stale_after
    )


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
    can_host: dict[str, bool]
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
        self.last_mode = "full"
        """`incremental` when the last plan extended the one before, `full` when computed afresh."""
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
        extended = self._extended(state, now)
        self.last_mode = "full" if extended is None else "incremental"
        return extended or self._full(state, now)

    def _full(self, state: ClusterState, now: datetime) -> PlanComputed:
        nodes, waiting_for_report, pinned = planning_nodes(state, now, self.settings)
        pending = [*_pending_pods(state, state.waiting()), *pinned]
        run = plan_run(nodes, pending, self.settings.plan)
        # A layout a node refused is never asked of it again while its report stays as it was: that
        # node keeps what it has in this plan.
        refused = {
            name
            for name, gpus in run.result.layouts.items()
            if state.nodes[name].refused(layout_of({i: (s.size_gb for s in g) for i, g in gpus.items()}))
        }
        if refused:
            nodes = [replace(n, can_carve=False) if n.name in refused else n for n in nodes]
            run = plan_run(nodes, pending, self.settings.plan)
            run.extendable = False
        result = run.result
        excluded = dict(result.excluded_nodes)
        for name in waiting_for_report:
            excluded[name] = "waiting for the node agent's first GPU report"
        unplaced = result.unplaced
        if waiting_for_report and not nodes:
            unplaced = {
                key: f"waiting for GPU reports from {len(waiting_for_report)} opted-in node(s)"
                if reason == NO_OPTED_IN_NODE
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
        can_host = {node.name: node.can_host for node in nodes}
        self._basis = _Basis(
            run, state.revision, can_host, {p.key for p in pending}, digest, node_items, plan
        )
        return plan

    def _extended(self, state: ClusterState, now: datetime) -> PlanComputed | None:
        basis, self._basis = self._basis, None
        if basis is None or state.structure_revision > basis.revision:
            return None
        for name, can_host in basis.can_host.items():
            level = state.nodes[name]
            if (level.report is not None and _can_host(level, now, self.settings)) != can_host:
                return None
        arrived = [key for key, revision in state.pod_revisions.items() if revision > basis.revision]
        if any(key in basis.pending or not state.pods[key].waits_for_slice for key in arrived):
            return None
        extension = extend_run(basis.run, _pending_pods(state, (state.pods[key] for key in arrived)))
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


NO_RULES = NodeRules()


def _pending_pods(state: ClusterState, pods: Iterable[PodObserved]) -> list[PendingPod]:
    """`pods` as pods waiting for a slice, each with the nodes its rules let it run on when not all
    (a pod that tolerates the taint every GPU node carries is as free as one without rules). A pod
    without `hostIPC` may run only on nodes whose agents report the `shm-directory` IPC mode: in the
    `host` mode its MPS client could not reach the server's shared memory."""
    observed = {name: level.observed for name, level in state.nodes.items() if level.observed is not None}
    shm_directory = frozenset(
        name
        for name, level in state.nodes.items()
        if level.observed is not None and level.report is not None and level.report.mps_ipc == "shm-directory"
    )
    eligible: dict[tuple[str, bool], frozenset[str] | None] = {}  # most pods share their rules
    pending = []
    for pod in pods:
        key = (pod.rules.model_dump_json() if pod.rules != NO_RULES else "", pod.host_ipc)
        if key not in eligible:
            allowed = (
                frozenset(name for name, node in observed.items() if admits(pod.rules, node))
                if has_effect(pod.rules, observed)
                else None
            )
            if not pod.host_ipc:
                allowed = shm_directory if allowed is None else allowed & shm_directory
            eligible[key] = None if allowed is not None and len(allowed) == len(observed) else allowed
        pending.append(
            PendingPod(
                pod.namespace,
                pod.name,
                pod.size_gb,
                pod.priority,
                pod.created,
                eligible=eligible[key],
                needs_shm_directory=not pod.host_ipc,
            )
        )
    return pending


def planning_nodes(
    state: ClusterState, now: datetime, settings: PlannerSettings
) -> tuple[list[Node], list[str], list[PendingPod]]:
    """Opted-in nodes as the planner may use them, the names of those that never reported, and the
    pods released to a node that has no slice left for them (they are planned there again).

    A node is seen as its agent reports it, or, while it applies a layout asked earlier, as that
    layout with the slices its agent reports used. A pod bound (or released) to the node holds one of
    its slices; until the report names the pod, one more free slice of its size counts as used and no
    free slice of its size may be reclaimed there, since the kubelet may give the pod any of them.
    No free slice of a size that a pod outside the scheduling gate waits for may be reclaimed
    anywhere: the scheduler may bind that pod to it at any moment.
    """
    holders = state.holders()
    ungated = frozenset(pod.size_gb for pod in state.waiting() if not pod.gated)
    nodes: list[Node] = []
    never_reported: list[str] = []
    pinned: list[PendingPod] = []
    for name, pods in sorted(holders.items()):
        level = state.nodes.get(name)
        if level is None or level.observed is None or level.report is None:
            # Released to a node mpsflow does not plan on now: they wait for it, and say so.
            pinned.extend(_pinned(pod, name) for pod in pods if pod.node is None)
    for name, level in sorted(state.nodes.items()):
        if level.observed is None:
            continue
        if level.report is None or level.reported_at is None:
            never_reported.append(name)
            continue
        named = {s.holder for g in level.report.gpus for s in g.slices if s.holder is not None}
        unnamed = [pod for pod in holders.get(name, []) if pod.key not in named]
        desired = level.desired.layout if level.applying and level.desired is not None else None
        gpus, without_slice = _expected_gpus(level.report, desired, Counter(p.size_gb for p in unnamed))
        for pod in unnamed:
            if without_slice[pod.size_gb] > 0 and pod.node is None:
                without_slice[pod.size_gb] -= 1
                pinned.append(_pinned(pod, name))
        can_host = _can_host(level, now, settings)
        can_carve = can_host and not level.applying
        protected = ungated | {pod.size_gb for pod in unnamed}
        nodes.append(
            Node(
                name=name,
                gpus=gpus,
                can_carve=can_carve,
                can_host=can_host,
                protected=protected,
                withdrawn=_withdrawn_gpus(level.report, protected if can_carve else None),
            )
        )
    return nodes, never_reported, pinned


def _withdrawn_gpus(report: NodeGpusReported, keep_free: frozenset[int] | None) -> tuple[Gpu, ...]:
    """The node's GPUs that cannot serve slices now (a daemon that does not answer, a fault), each
    with the slices it keeps: the used ones, and the free ones of the sizes in `keep_free` (sizes
    a pod the planner does not place may be given; None: every free slice, as the node cannot
    change its layout now). A GPU in MIG mode is left out: mpsflow never asks anything of it.

    Withdrawing a free slice goes through a layout like any other removal, so the kubelet never
    loses a slice that a pod bound to the node may be given; the agent marks the used ones
    Unhealthy itself.
    """
    withdrawn: list[Gpu] = []
    for gpu in sorted(report.gpus, key=lambda g: g.index):
        if gpu.serves_slices or gpu.mig_enabled:
            continue
        kept = tuple(
            Slice(size_gb=s.size_gb, used=s.used)
            for s in sorted(gpu.slices, key=lambda s: s.size_gb)
            if s.used or keep_free is None or s.size_gb in keep_free
        )
        withdrawn.append(
            Gpu(
                index=gpu.index,
                model=gpu.model,
                memory_mib=gpu.memory_mib,
                slices=kept,
                max_slices=gpu.max_slices,
            )
        )
    return tuple(withdrawn)


def _pinned(pod: PodObserved, node: str) -> PendingPod:
    return PendingPod(pod.namespace, pod.name, pod.size_gb, pod.priority, pod.created, node)


def _expected_gpus(
    report: NodeGpusReported, desired: Layout | None, unnamed: Counter[int]
) -> tuple[tuple[Gpu, ...], Counter[int]]:
    """The node's GPUs as the planner counts them, and per size the unnamed holders left without a
    free slice to count as theirs.

    Slices are the reported ones, or those of `desired` (a layout being applied) with the reported
    used ones kept. Used slices the report does not tie to a pod may be the unnamed holders' own;
    beyond those, one free slice per unnamed holder counts as used, GPU by GPU.
    """
    untied_used = Counter(s.size_gb for g in report.gpus for s in g.slices if s.used and s.holder is None)
    to_mark = Counter({size: count - untied_used[size] for size, count in unnamed.items()})
    gpus: list[Gpu] = []
    for gpu in sorted(report.gpus, key=lambda g: g.index):
        if not gpu.serves_slices:  # no MPS to serve slices on it now: see `_withdrawn_gpus`
            continue
        used = Counter(s.size_gb for s in gpu.slices if s.used)
        if desired is not None and gpu.index in desired:
            wanted = Counter(desired[gpu.index])
            sizes = sorted((wanted | used).elements())
        else:
            sizes = sorted(s.size_gb for s in gpu.slices)
        slices: list[Slice] = []
        for size in sizes:
            if used[size] > 0:
                used[size] -= 1
                slices.append(Slice(size_gb=size, used=True))
            elif to_mark[size] > 0:
                to_mark[size] -= 1
                slices.append(Slice(size_gb=size, used=True))
            else:
                slices.append(Slice(size_gb=size, used=False))
        gpus.append(
            Gpu(
                index=gpu.index,
                model=gpu.model,
                memory_mib=gpu.memory_mib,
                slices=tuple(slices),
                max_slices=gpu.max_slices,
                reserved_mib=gpu.reserved_mib,
            )
        )
    return tuple(gpus), +to_mark
