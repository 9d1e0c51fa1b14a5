"""The planner's state, folded from events, and `decide`: the planner service's whole brain.

`ClusterState.apply(envelope)` folds one event in; the state is a set of levels keyed by pod and
node, so duplicates, redeliveries and interleavings that keep each key's own order give the
same state. Besides what the pod watcher and the node agents report, the state holds what the
planner itself asked (each node's layout, the pods it released) and what each node answered
(the layout it applied or refused). `decide(state, now)` returns what to do: nothing, wait for the
batch window to close, or publish what changed (node layouts, the plan, pod releases, reasons).

How it never fails a pod: a gated pod is released only to a node whose agent reports a free slice
of its size that the kubelet lists; a node gets one layout change at a time, except that changes
that only add slices may follow each other without waiting for the node (nothing in flight then
takes a slice away); a free slice that a pod outside the planner's control may be bound to is never
reclaimed (`planning_nodes`), nor withdrawn from a GPU that cannot serve slices (`_withdrawn_gpus`);
a layout a node refused is not asked again while its report stays the same. Time comes in as an
argument and from event times, never from a clock, so replaying a recorded stream reproduces every
decision. Nothing here performs I/O.
"""

from __future__ import annotations

import hashlib
import json
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from json.encoder import encode_basestring_ascii as _quoted
from operator import attrgetter
from typing import TypeVar

from events.envelope import Envelope, content_id
from events.nodes import NodeGpusReported, NodeObserved, NodeOptedOut
from events.plans import NodeConfigApplied, NodeConfigFailed, NodeLayout, NodePlanned, PlanComputed, SliceSpec
from events.plans import Placement as PlacementEvent
from events.pods import NodeRules, PodDeleted, PodObserved, PodRejected, PodReleased, PodUnplaced
from events.vocabulary import (
    GFD_REPLICAS_LABEL,
    GFD_SHARING_STRATEGY_LABEL,
    REPLICAS_LABEL,
    SHARING_STRATEGY_LABEL,
)
from services.planner.core.cluster import GpuPlan
from services.planner.core.eligibility import admits, has_effect
from services.planner.core.model import (
    SHARED_SLICES,
    Gpu,
    Node,
    PendingPod,
    Placement,
    PlanSettings,
    Slice,
    slice_of,
)
from services.planner.core.run import PlanRun, extend_run, plan_run
from services.planner.core.strategy import NO_OPTED_IN_NODE, PodOrder


@dataclass(frozen=True)
class BatchWindow:
    """Wait until no new event came for `idle`, but never longer than `maximum` after the first.

    In a burst, events come every few milliseconds, so the idle wait never ends and the maximum sets
    the pace: a pod waits half of it on average before a decision takes it in. A decision that adds
    a few pods to the last one takes a millisecond or two; the maximum keeps a burst from being
    decided, and its nodes asked to change, one pod at a time."""

    idle: timedelta = timedelta(milliseconds=25)
    maximum: timedelta = timedelta(milliseconds=100)


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
    # A pod that fits nowhere and has waited this long since it was created is served before the pods
    # that came after it, and a GPU is held for it that they may not take (`PendingPod.overdue`):
    # pods arriving in a burst get this long to be placed the usual way, which serves the most pods.
    hold_after: timedelta = timedelta(seconds=2)


Layout = dict[int, tuple[int, ...]]
"""Slice sizes per GPU index, each GPU's sizes sorted: what a node config asks, compared as a value."""


def layout_of(gpus: Mapping[int, Iterable[int]]) -> Layout:
    return {index: tuple(sorted(sizes)) for index, sizes in gpus.items()}


def _asks_for(desired: Layout, actual: Layout) -> bool:
    """Whether `actual` has exactly the slices `desired` asks for on every GPU it names."""
    return all(actual.get(index, ()) == sizes for index, sizes in desired.items())


def _only_adds(changed: Layout, base: Layout) -> bool:
    """Whether `changed` keeps every slice of `base`, GPU by GPU (it may add slices, never take one)."""
    for index, sizes in base.items():
        kept = Counter(changed.get(index, ()))
        kept.subtract(sizes)
        if any(count < 0 for count in kept.values()):
            return False
    return True


_Expected = tuple[tuple[Gpu, ...], Counter[int]]
"""A node's GPUs as the planner counts them, and the unnamed holders left without a free slice."""


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
    # Values computed from the (immutable) report, kept while the report stays the same object: a
    # large cluster's nodes mostly keep their reports from one decision to the next.
    _reported: tuple[NodeGpusReported, Layout] | None = field(default=None, compare=False, repr=False)
    _expected: tuple[NodeGpusReported, object, _Expected] | None = field(
        default=None, compare=False, repr=False
    )
    _withdrawn: tuple[NodeGpusReported, frozenset[int] | None, tuple[Gpu, ...]] | None = field(
        default=None, compare=False, repr=False
    )
    _applying: tuple[Asked | None, Answer | None, NodeGpusReported | None, bool] | None = field(
        default=None, compare=False, repr=False
    )

    def reported_layout(self, report: NodeGpusReported) -> Layout:
        """`_reported_layout(report)`, computed once per report."""
        memo = self._reported
        if memo is None or memo[0] is not report:
            memo = self._reported = (report, _reported_layout(report))
        return memo[1]

    def expected_gpus(
        self, report: NodeGpusReported, desired: Layout | None, unnamed: Counter[int]
    ) -> _Expected:
        """`_expected_gpus(report, desired, unnamed)`, computed again only when an input changed."""
        memo = self._expected
        if memo is None or memo[0] is not report or memo[1] != (desired, unnamed):
            memo = self._expected = (report, (desired, unnamed), _expected_gpus(report, desired, unnamed))
        gpus, without_slice = memo[2]
        return gpus, Counter(without_slice)

    def withdrawn_gpus(self, report: NodeGpusReported, keep_free: frozenset[int] | None) -> tuple[Gpu, ...]:
        """`_withdrawn_gpus(report, keep_free)`, computed again only when an input changed."""
        memo = self._withdrawn
        if memo is None or memo[0] is not report or memo[1] != keep_free:
            memo = self._withdrawn = (report, keep_free, _withdrawn_gpus(report, keep_free))
        return memo[2]

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
        """A layout asked of the node is neither answered nor shown by its report."""
        if self.desired is None:
            return False
        memo = self._applying
        if (
            memo is None
            or memo[0] is not self.desired
            or memo[1] is not self.answer
            or memo[2] is not self.report
        ):
            memo = self._applying = (self.desired, self.answer, self.report, self._is_applying())
        return memo[3]

    def _is_applying(self) -> bool:
        if self.desired is None or self.answered:
            return False
        return self.report is None or not _asks_for(self.desired.layout, self.reported_layout(self.report))

    @property
    def adding(self) -> bool:
        """It is applying a layout that only adds slices to what it reports: nothing in flight to it
        takes a slice away, so another change that only adds may follow at once, and pods may be
        released onto the free slices it reports."""
        return (
            self.applying
            and self.desired is not None
            and self.report is not None
            and _only_adds(self.desired.layout, self.reported_layout(self.report))
        )

    def may_ask(self, layout: Layout) -> bool:
        """Whether `layout` may be asked of the node now: it is not applying a layout asked earlier,
        or both that one and `layout` only add slices (to what it reports, and to that one)."""
        if not self.applying:
            return True
        return self.adding and self.desired is not None and _only_adds(layout, self.desired.layout)

    def only_adds(self, layout: Layout) -> bool:
        """Whether `layout` keeps every slice the node reports."""
        return self.report is not None and _only_adds(layout, self.reported_layout(self.report))

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
    first_seen: dict[str, datetime] = field(default_factory=dict)
    """Per pod, the earliest time of the events that observed it (of its uid): when it arrived."""
    nodes: dict[str, _NodeLevel] = field(default_factory=dict)
    releases: dict[str, PodReleased] = field(default_factory=dict)  # decided, not yet seen on the pod
    unplaced_published: dict[str, str] = field(default_factory=dict)  # pod uid -> reason
    first_unplanned_change: datetime | None = None
    last_change: datetime | None = None
    last_plan_id: str | None = None
    last_placed: Mapping[str, PlacementEvent] = field(default_factory=dict, compare=False)
    """Where the last plan published (or recalled on a rebuild) placed each pod: a pod keeps a free
    slice there in the plans after (`PendingPod.planned`). A rebuild whose last plan went out
    without its placements (a large cluster's: `step.published_plan`) starts without them."""
    # Bookkeeping for IncrementalPlanner: when pods arrived (in the order they did), and how many
    # changes of anything else there were: events, reports going stale, and decisions that asked
    # something of nodes or pods (what was asked changes what the next plan starts from); not a
    # node's allocatable or sharing labels (`_for_releases_only`), which only releases read.
    revision: int = field(default=0, compare=False)
    pod_revisions: dict[str, int] = field(default_factory=dict, compare=False)
    structure_changes: int = field(default=0, compare=False)
    # An index, so that `holders` need not go through every pod: the keys of the pods that hold a
    # slice of a node or are about to (`PodObserved.holder_node`).
    holding: set[str] = field(default_factory=set, compare=False)
    # The keys of the pods that wait for a slice (`PodObserved.waits_for_slice`), for `waiting`.
    waits: set[str] = field(default_factory=set, compare=False)
    # The keys of the pods whose rules name a label the config publisher writes (`SHARING_LABELS`):
    # while there are none, a node whose labels change only there plans as before.
    sharing_label_rules: set[str] = field(default_factory=set, compare=False)
    # `holders()` as last computed, and a count of the changes to what it depends on.
    _holders: tuple[int, dict[str, list[PodObserved]]] | None = field(default=None, compare=False, repr=False)
    _holder_changes: int = field(default=0, compare=False, repr=False)
    _settled: tuple[int, bool] | None = field(default=None, compare=False, repr=False)

    def apply(self, envelope: Envelope) -> None:
        """Fold one event in; events that change nothing the planner uses leave the window alone."""
        event = envelope.event
        arrival = False
        structural = True  # the change may change what a plan starts from (see `structure_changes`)
        if isinstance(event, PodObserved | PodDeleted | PodRejected | PodReleased):
            self._holder_change(event.key)
        if isinstance(event, PodObserved):
            previous = self.pods.get(event.key)
            changed = previous is None or _planned_fields(previous) != _planned_fields(event)
            arrival = previous is None and event.waits_for_slice
            seen = self.first_seen.get(event.key)
            if previous is None or previous.uid != event.uid or seen is None or envelope.time < seen:
                self.first_seen[event.key] = envelope.time
            self.pods[event.key] = event
            self._index(event)
            release = self.releases.get(event.key)
            if release is not None and (
                release.uid != event.uid or not (event.gated and event.waits_for_slice)
            ):
                # The pod shows the release, or someone else lifted the gate, or it is another pod.
                del self.releases[event.key]
        elif isinstance(event, PodDeleted | PodRejected):
            gone = self.pods.pop(event.key, None)
            self.first_seen.pop(event.key, None)
            self.holding.discard(event.key)
            self.waits.discard(event.key)
            self.sharing_label_rules.discard(event.key)
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
            structural = changed and (
                level.observed is None
                or not _for_releases_only(level.observed, event)
                or bool(self.sharing_label_rules)
            )
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
        if isinstance(event, PodObserved | PodDeleted | PodRejected | PodReleased):
            self._holder_change(event.key)
        if changed:
            self.revision += 1
            if arrival and isinstance(event, PodObserved):
                self.pod_revisions.pop(event.key, None)  # so that the order of keys is that of revisions
                self.pod_revisions[event.key] = self.revision
            elif structural:  # else only releases may see the change: a plan starts from what it did
                self.structure_changes += 1
                if isinstance(event, PodObserved | PodDeleted | PodRejected):
                    self.pod_revisions.pop(event.key, None)
            self._touch(envelope.time)

    def _holder_change(self, key: str) -> None:
        """The pod `key` is about to change or just did: `holders()` must look again if it holds a slice."""
        if key in self.holding or key in self.releases:
            self._holder_changes += 1

    def _index(self, pod: PodObserved) -> None:
        """Keep `holding`, `waits` and `sharing_label_rules` true of `pod`, just folded in."""
        (self.holding.add if pod.holder_node is not None else self.holding.discard)(pod.key)
        (self.waits.add if pod.waits_for_slice else self.waits.discard)(pod.key)
        names = pod.rules.__dict__ != NO_RULES.__dict__ and _names_sharing_label(pod.rules)
        (self.sharing_label_rules.add if names else self.sharing_label_rules.discard)(pod.key)

    def _touch(self, when: datetime) -> None:
        if self.first_unplanned_change is None or when < self.first_unplanned_change:
            self.first_unplanned_change = when
        if self.last_change is None or when > self.last_change:
            self.last_change = when

    def next_staleness(self, after: datetime, stale_after: timedelta) -> datetime | None:
        """When the next opted-in node's report goes stale (after `after`), or None.

        Reports stopping is an event of its own: nothing arrives, so the caller wakes up then and
        calls `time_passed`.
        """
        deadlines = [
            level.reported_at + stale_after
            for level in self.nodes.values()
            if level.observed is not None and level.reported_at is not None
        ]
        return min((d for d in deadlines if d > after), default=None)

    def time_passed(self, when: datetime) -> None:
        """Time alone changed what the plan must be at `when`: a node's report went stale (its slices
        may no longer be carved or handed out), or a pod left waiting became overdue."""
        self.revision += 1
        self.structure_changes += 1
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
            self._holder_changes += 1
        for told in decision.unplaced:
            self.unplaced_published[told.uid] = told.reason
        if decision.unplaced_settled:  # forget pods no longer waiting: told again if they wait again
            waiting = {self.pods[key].uid for key in decision.plan.unplaced if key in self.pods}
            self.unplaced_published = {
                uid: reason for uid, reason in self.unplaced_published.items() if uid in waiting
            }
        if decision.node_plans or decision.releases:
            self.structure_changes += 1
        self.last_placed = decision.plan.placed
        self.mark_planned(decision.plan.plan_id, decision.at_revision)

    def holders(self) -> dict[str, list[PodObserved]]:
        """Per node, the pods that hold one of its slices or are about to: bound and not finished, or
        released there (by the pod's own word, or by a release not yet seen on the pod). Computed
        again only after such a pod changed: the caller must not change what it returns."""
        if self._holders is not None and self._holders[0] == self._holder_changes:
            return self._holders[1]
        found: dict[str, list[PodObserved]] = {}
        for key in sorted(self.holding.union(self.releases)):
            pod = self.pods.get(key)
            if pod is None:
                continue
            release = self.releases.get(key)
            node = pod.holder_node or (release.node if release is not None else None)
            if node is not None:
                found.setdefault(node, []).append(pod)
        self._holders = (self._holder_changes, found)
        return found

    def settled(self) -> bool:
        """No opted-in node is applying a layout asked of it. Only a structure change (an event that
        changed a node, or a decision that asked nodes for layouts) can change that."""
        if self._settled is None or self._settled[0] != self.structure_changes:
            applying = any(level.applying for level in self.nodes.values() if level.observed is not None)
            self._settled = (self.structure_changes, not applying)
        return self._settled[1]

    def arrivals(self, since: int) -> list[str]:
        """The keys of the pods that arrived waiting after revision `since` and have not changed since."""
        keys: list[str] = []
        for key, revision in reversed(self.pod_revisions.items()):
            if revision <= since:
                break
            keys.append(key)
        return keys

    def waiting(self) -> list[PodObserved]:
        """Pods the planner has yet to provide for."""
        return [self.pods[key] for key in sorted(self.waits) if key not in self.releases]


SHARING_LABELS = frozenset(
    {SHARING_STRATEGY_LABEL, REPLICAS_LABEL, GFD_SHARING_STRATEGY_LABEL, GFD_REPLICAS_LABEL}
)
"""Node labels that say how a node's GPUs are shared: the config publisher writes them as configs
change, GPU Feature Discovery writes GFD's on nodes where it runs."""


def _for_releases_only(before: NodeObserved, after: NodeObserved) -> bool:
    """Whether what changed of a node matters only to releases: its allocatable (which only
    `_releases` reads) and the labels in `SHARING_LABELS` (which only rules naming them read)."""
    if (before.unschedulable, before.gfd, before.gfd_problem, before.taints) != (
        after.unschedulable,
        after.gfd,
        after.gfd_problem,
        after.taints,
    ):
        return False
    keys = before.labels.keys() | after.labels.keys()
    return all(before.labels.get(key) == after.labels.get(key) for key in keys - SHARING_LABELS)


def _names_sharing_label(rules: NodeRules) -> bool:
    """Whether `rules` name a label of `SHARING_LABELS`."""
    named = set(rules.node_selector)
    named.update(req.key for term in rules.required_terms for req in term.expressions)
    return not named.isdisjoint(SHARING_LABELS)


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
    planner = planner or IncrementalPlanner(settings)
    plan = planner.compute(state, now)
    node_plans = tuple(planner.node_plans(state, plan))
    changing = {p.node for p in node_plans if not state.nodes[p.node].only_adds(layout_of(p.layout.sizes()))}
    releases = tuple(_releases(state, plan, now, settings, changing, planner.release_candidates(state, plan)))
    settled = state.settled()
    unplaced = tuple(_unplaced(state, plan, now - settings.reason_patience, settled))
    plan_is_new = plan.plan_id != state.last_plan_id
    if not (plan_is_new or node_plans or releases or unplaced):
        return NothingToDo(planned=plan, at_revision=state.revision)
    return PublishPlan(plan, state.revision, plan_is_new, node_plans, releases, unplaced, settled)


_Verdicts = dict[
    str,
    tuple[NodeLayout, Asked | None, Answer | None, Answer | None, int, NodeGpusReported | None, str | None],
]
"""Per node, what `_node_plans` last made of it (`_verdict`) and the values it made it of."""


def _node_plans(
    state: ClusterState, plan: PlanComputed, verdicts: _Verdicts | None = None
) -> Iterator[NodePlanned]:
    """Each node whose planned slices differ from what was last asked of it (or, never asked, from
    what it has), unless it is still applying what was last asked; and a node that refused what was
    last asked, when that is wanted again now that its report changed (asked again, in a new plan).
    `verdicts`: see `_known_verdict`."""
    for name in plan.nodes:
        yield from _asked(state, plan, name, _known_verdict(state, plan, name, verdicts))


def _asked(state: ClusterState, plan: PlanComputed, name: str, verdict: str | None) -> Iterator[NodePlanned]:
    """The node plan of `name` that `verdict` calls for, if any."""
    layout = plan.nodes[name]
    answer = state.nodes[name].answer
    if verdict == "changed":
        yield NodePlanned(node=name, plan_id=plan.plan_id, layout=layout)
    elif verdict == "again" and answer is not None:
        # The same layout asked again gets an id of its own, so that its answer tells.
        again = content_id("asked again", plan.plan_id, answer.plan_id)
        yield NodePlanned(node=name, plan_id=again, layout=layout)


def _known_verdict(
    state: ClusterState, plan: PlanComputed, name: str, verdicts: _Verdicts | None
) -> str | None:
    """`_verdict` of node `name` for `plan`. `verdicts` keeps what was made of each node, so that a
    node whose layout and level are the same objects as then is not worked out again."""
    layout = plan.nodes[name]
    level = state.nodes[name]
    known = verdicts.get(name) if verdicts is not None else None
    if (
        known is not None
        and known[0] is layout
        and known[1] is level.desired
        and known[2] is level.answer
        and known[3] is level.refusal
        and known[4] == level.report_revision
        and known[5] is level.report
    ):
        return known[6]
    verdict = _verdict(level, layout)
    if verdicts is not None:
        verdicts[name] = (
            layout,
            level.desired,
            level.answer,
            level.refusal,
            level.report_revision,
            level.report,
            verdict,
        )
    return verdict


def _verdict(level: _NodeLevel, layout: NodeLayout) -> str | None:
    """`changed` when `layout` must be asked of the node, `again` when it must be asked again after a
    refusal, None when nothing is to be asked (a function of the layout and of the node's level)."""
    if level.report is None:
        return None
    wanted = layout_of(layout.sizes())
    if not level.may_ask(wanted):
        return None
    asked = level.desired.layout if level.desired is not None else level.reported_layout(level.report)
    refused_last = level.answered and level.answer is not None and level.answer.refused
    if wanted != asked:
        return "changed"
    if refused_last and level.answer is not None and not level.refused(wanted):
        return "again"
    return None


def _release_candidates(state: ClusterState, placed: Mapping[str, PlacementEvent]) -> dict[str, list[str]]:
    """Per node, the pods of `placed` placed there that a decision may release: gated, waiting for a
    slice and not released yet."""
    found: dict[str, list[str]] = {}
    for key, placement in placed.items():
        pod = state.pods.get(key)
        if pod is not None and pod.gated and pod.waits_for_slice and key not in state.releases:
            found.setdefault(placement.node, []).append(key)
    return found


def _observed_order(pod: PodObserved, first_seen: Mapping[str, datetime]) -> PodOrder:
    """`pod_order` of a pod as observed (`first_seen`: `ClusterState.first_seen`)."""
    arrived = first_seen.get(pod.key)
    return (
        -pod.priority,
        pod.created.timestamp(),
        arrived.timestamp() if arrived is not None else float("inf"),
        pod.namespace,
        pod.name,
    )


def _releases(
    state: ClusterState,
    plan: PlanComputed,
    now: datetime,
    settings: PlannerSettings,
    changing: set[str],
    candidates: Mapping[str, list[str]] | None = None,
) -> Iterator[PodReleased]:
    """Gated pods the plan places on a node that has a free slice of their size for them now, in
    `pod_order`.

    A slice counts when the node's report shows it free and listed by the kubelet, less one for each
    pod holding or about to hold a slice of that size there that the report does not name yet (the
    kubelet may give it any free slice of the size). Nodes applying a layout release nothing, nor do
    those `changing` now: the kubelet may give a pod released there the very slice the change takes.
    And the node's allocatable in the API must have room for the pod beside every pod bound or
    released there: the scheduler binds it at once then, and never finds it unschedulable, which
    would make kube-scheduler look for pods to preempt on that node. Where fewer slices are ready
    than pods wait for them, the first pods in `pod_order` go. `candidates`: `_release_candidates`
    of the plan, when the caller has them.
    """
    if candidates is None:
        candidates = _release_candidates(state, plan.placed)
    holders: dict[str, list[PodObserved]] | None = None
    chosen: list[tuple[PodOrder, PodObserved, str]] = []
    for node, keys in candidates.items():
        level = state.nodes.get(node)
        if (
            level is None
            or level.observed is None
            or level.reported_at is None
            or now - level.reported_at > settings.release_report_age
            or node in changing
            or not _can_host(level, now, settings)
            or (level.applying and not level.adding)
            or level.report is None
        ):
            continue
        by_size: dict[int, list[PodObserved]] = {}
        for key in keys:
            pod = state.pods.get(key)
            if pod is not None and pod.gated and pod.waits_for_slice and key not in state.releases:
                by_size.setdefault(pod.size_gb, []).append(pod)
        if not by_size:
            continue
        if holders is None:
            holders = state.holders()
        there = holders.get(node, [])
        for size_gb, pods in by_size.items():
            scheduler_room = level.observed.allocatable.get(size_gb, 0) - sum(
                1 for holder in there if holder.size_gb == size_gb
            )
            ready = min(_ready_slices(level.report, there, size_gb), scheduler_room)
            if ready > 0:
                ordered = sorted((_observed_order(pod, state.first_seen), pod) for pod in pods)
                chosen.extend((order, pod, node) for order, pod in ordered[:ready])
    chosen.sort(key=lambda entry: entry[0])
    for _, pod, node in chosen:
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
    pods, published = state.pods, state.unplaced_published
    for key, reason in plan.unplaced.items():
        pod = pods.get(key)
        if pod is None or published.get(pod.uid) == reason:
            continue
        if settled or pod.created < created_before:
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
        return _PlanDigest.hashed(json.dumps(parts, separators=(",", ":")))

    @staticmethod
    def hashed(text: str) -> int:
        """The item whose JSON text (`json.dumps(parts, separators=(",", ":"))`) is `text`."""
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=16).digest(), "big")

    def add(self, item: int) -> None:
        self.total = (self.total + item) % self.MODULUS

    def remove(self, item: int) -> None:
        self.total = (self.total - item) % self.MODULUS

    @property
    def plan_id(self) -> str:
        return f"{self.total:032x}"[:24]


# The digest items of a plan, written as `json.dumps` writes them (the same text, so the same plan
# ids) without its overhead per call: strings through its own encoder, integers as it writes them,
# slices from texts it wrote once. A plan at cluster scale has tens of thousands of items.


def _placed_item(key: str, p: Placement) -> int:
    """`_PlanDigest.item("placed", key, p.node, p.gpu, p.size_gb)`."""
    return _PlanDigest.hashed(f'["placed",{_quoted(key)},{_quoted(p.node)},{int(p.gpu)},{int(p.size_gb)}]')


def _reason_item(kind: str, key: str, reason: str) -> int:
    """`_PlanDigest.item(kind, key, reason)`, for "unplaced" and "excluded"."""
    return _PlanDigest.hashed(f"[{_quoted(kind)},{_quoted(key)},{_quoted(reason)}]")


class _SliceTexts(dict[tuple[int, bool], str]):
    """A slice's JSON text in a digest item (`[size_gb,used]`), by (size, used), made on first use."""

    def __missing__(self, key: tuple[int, bool]) -> str:
        text = json.dumps(key, separators=(",", ":"))
        if len(self) < 4096 and type(key[1]) is bool:
            self[key] = text
        return text


_SLICE_TEXTS = _SliceTexts()


def _node_item(name: str, gpus: dict[int, tuple[Slice, ...]]) -> int:
    """`_PlanDigest.item("node", name, [[index, [[size_gb, used], ...]], ...])`, by GPU index."""
    texts = _SLICE_TEXTS
    layout = ",".join(
        f"[{int(index)},[{','.join([texts[s.size_gb, s.used] for s in slices])}]]"
        for index, slices in sorted(gpus.items())
    )
    return _PlanDigest.hashed(f'["node",{_quoted(name)},[{layout}]]')


class _Specs(dict[tuple[int, bool], SliceSpec]):
    """Slices as event values, by (size, used), shared like `SHARED_SLICES` (event values are
    immutable), made on first use."""

    def __missing__(self, key: tuple[int, bool]) -> SliceSpec:
        size_gb, used = key
        spec = SliceSpec.model_construct(size_gb=size_gb, used=used)
        if len(self) < 4096 and type(used) is bool:
            self[key] = spec
        return spec


_SPECS = _Specs()


def _node_layout(gpus: dict[int, tuple[Slice, ...]]) -> NodeLayout:
    specs = _SPECS
    return NodeLayout.model_construct(
        gpus={
            index: tuple([specs[s.size_gb, s.used] for s in slices]) for index, slices in sorted(gpus.items())
        }
    )


def _placement(p: Placement) -> PlacementEvent:
    return PlacementEvent(node=p.node, gpu=p.gpu, size_gb=p.size_gb)


@dataclass
class _Sweep:
    """What `IncrementalPlanner.node_plans` found for the nodes of a plan: the full computation and
    the structure changes it held for, how many touched nodes it had gone through, and the nodes
    with something to ask (`_verdict`)."""

    fulls: int
    structure_changes: int
    touched: int
    asks: dict[str, str]


@dataclass
class _Basis:
    """The last full computation, which pods that sort after all others can extend.

    `hosting`: the nodes that could host pods then (their reports were fresh), `fresh_until` the
    moment until which all of their reports stay fresh; `not_hosting` the others."""

    run: PlanRun
    revision: int
    structure_changes: int
    hosting: list[str]
    fresh_until: datetime | None
    not_hosting: list[str]
    pending: set[str]
    digest: _PlanDigest
    node_items: dict[str, int]
    plan: PlanComputed
    eligibility: _Eligibility


class IncrementalPlanner:
    """Computes plans, reusing the previous computation when only new pending pods arrived.

    The fast path applies only when nothing but new pending pods changed since the last
    computation (or a decision on it that only asked nodes for layouts, which `committed` carries
    the computation over), and `extend_run` guarantees that it decides exactly what a full pass
    would; in every other case the plan is computed from scratch. Either way the plan is a function of the
    state, identical byte for byte. What it renders (node layouts, placements, their digest items)
    and what `decide` makes of each node are kept while they stay the same, so that a decision at
    cluster scale costs what changed, not the size of the cluster.
    """

    def __init__(self, settings: PlannerSettings) -> None:
        self.settings = settings
        self.last_mode = "full"
        """`incremental` when the last plan extended the one before, `full` when computed afresh."""
        self._basis: _Basis | None = None
        self._rendered: dict[str, tuple[dict[int, tuple[Slice, ...]], NodeLayout, int]] = {}
        self._placements: dict[str, tuple[Placement, PlacementEvent, int]] = {}
        self.verdicts: _Verdicts = {}
        """What `decide` made of each node (`_known_verdict`)."""
        self._candidates: tuple[PlanComputed, dict[str, list[str]]] | None = None
        self._latest: PlanComputed | None = None
        self._fulls = 0  # full computations so far
        self._touched: list[str] = []  # nodes whose layouts extensions changed since the last full one
        self._sweep: _Sweep | None = None
        self._overdue_moments: list[datetime] = []
        """When the pods that the last full computation left waiting become overdue, in order."""

    def _render(self, name: str, gpus: dict[int, tuple[Slice, ...]]) -> tuple[NodeLayout, int]:
        """A node's layout as an event value and its digest item, reused while the layout stays."""
        cached = self._rendered.get(name)
        if cached is not None and cached[0] == gpus:
            return cached[1], cached[2]
        layout, item = _node_layout(gpus), _node_item(name, gpus)
        self._rendered[name] = (gpus, layout, item)
        return layout, item

    def _placed(self, key: str, p: Placement) -> tuple[Placement, PlacementEvent, int]:
        """A placement, as an event value and as its digest item, reused while it stays."""
        cached = self._placements.get(key)
        if cached is not None and (cached[0] is p or cached[0] == p):
            return cached
        return p, _placement(p), _placed_item(key, p)

    def release_candidates(self, state: ClusterState, plan: PlanComputed) -> dict[str, list[str]]:
        """`_release_candidates(state, plan.placed)`, kept up to date as plans are extended."""
        if self._candidates is None or self._candidates[0] is not plan:
            self._candidates = (plan, _release_candidates(state, plan.placed))
        return self._candidates[1]

    def node_plans(self, state: ClusterState, plan: PlanComputed) -> Iterator[NodePlanned]:
        """`_node_plans(state, plan)`. For the plan just computed, when nothing but its extensions
        changed since the last decision (no node changed, nor what was asked of nodes), only the
        nodes whose layouts the extensions changed are worked out again."""
        sweep = self._sweep
        if (
            plan is self._latest
            and sweep is not None
            and sweep.fulls == self._fulls
            and sweep.structure_changes == state.structure_changes
        ):
            asks = sweep.asks
            for name in self._touched[sweep.touched :]:
                verdict = _known_verdict(state, plan, name, self.verdicts)
                if verdict is None:
                    asks.pop(name, None)
                else:
                    asks[name] = verdict
        else:
            asks = {}
            for name in plan.nodes:
                verdict = _known_verdict(state, plan, name, self.verdicts)
                if verdict is not None:
                    asks[name] = verdict
        if plan is self._latest:
            self._sweep = _Sweep(self._fulls, state.structure_changes, len(self._touched), asks)
        for name in sorted(asks):  # in the plan's order: by name
            yield from _asked(state, plan, name, asks[name])

    def compute(self, state: ClusterState, now: datetime) -> PlanComputed:
        extended = self._extended(state, now)
        self.last_mode = "full" if extended is None else "incremental"
        self._latest = extended or self._full(state, now)
        return self._latest

    def _full(self, state: ClusterState, now: datetime) -> PlanComputed:
        self._fulls += 1
        self._touched = []
        waiting = state.waiting()
        nodes, waiting_for_report, pinned = planning_nodes(state, now, self.settings, waiting)
        eligibility = _Eligibility(state)
        pending = [*eligibility.pending(waiting, overdue_since=now - self.settings.hold_after), *pinned]
        run = plan_run(nodes, pending, self.settings.plan)
        # A layout a node refused is never asked of it again while its report stays as it was: that
        # node keeps what it has in this plan.
        refused = {
            name
            for name, gpus in run.result.layouts.items()
            if state.nodes[name].refusal is not None
            and state.nodes[name].refused(layout_of({i: (s.size_gb for s in g) for i, g in gpus.items()}))
        }
        if refused:
            nodes = [replace(n, can_carve=False) if n.name in refused else n for n in nodes]
            run = plan_run(nodes, pending, self.settings.plan)
            run.extendable = False
        result = run.result
        hold_after = self.settings.hold_after
        self._overdue_moments = sorted(
            pod.created + hold_after
            for pod in run.waiting
            if pod.created is not None and pod.pinned is None and not pod.overdue
        )
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
        placed = {key: self._placed(key, result.placed[key]) for key in sorted(result.placed)}
        self._placements = placed
        for _, _, item in placed.values():
            digest.add(item)
        for key, reason in unplaced.items():
            digest.add(_reason_item("unplaced", key, reason))
        for name, reason in excluded.items():
            digest.add(_reason_item("excluded", name, reason))
        plan = PlanComputed.model_construct(
            kind="PlanComputed",
            plan_id=digest.plan_id,
            nodes={name: layout for name, (layout, _) in rendered.items()},
            placed={key: event for key, (_, event, _) in placed.items()},
            unplaced=dict(sorted(unplaced.items())),
            excluded_nodes=dict(sorted(excluded.items())),
        )
        run.extendable = run.extendable and not waiting_for_report
        hosting = [node.name for node in nodes if node.can_host]
        self._basis = _Basis(
            run,
            state.revision,
            state.structure_changes,
            hosting,
            self._fresh_until(state, hosting),
            [node.name for node in nodes if not node.can_host],
            {p.key for p in pending},
            digest,
            node_items,
            plan,
            eligibility,
        )
        return plan

    def committed(self, state: ClusterState, decision: PublishPlan, now: datetime) -> None:
        """`decision`, made on the last plan computed, was published and `state` committed it.

        The nodes it asked for new layouts now apply them, which makes a structure change: the next
        plan would be computed from scratch. Where that computation would place every pod exactly
        where this one did, the last computation stays the basis for the next pods instead, with the
        asked nodes seen anew, as a computation from scratch sees them (`_carried`). In a burst, nearly
        every decision asks some nodes for slices, and at cluster scale one computation from scratch
        costs as much as hundreds of extensions.
        """
        basis = self._basis
        if (
            basis is None
            or basis.plan is not decision.plan
            or not basis.run.extendable
            or decision.releases
            or not decision.node_plans
            or state.structure_changes != basis.structure_changes + 1
        ):
            return
        if self._carried(basis, state, decision, now):
            basis.structure_changes = state.structure_changes
            sweep = self._sweep
            if sweep is not None and sweep.structure_changes == basis.structure_changes - 1:
                sweep.structure_changes = basis.structure_changes
            self._latest = basis.plan

    def _carried(self, basis: _Basis, state: ClusterState, decision: PublishPlan, now: datetime) -> bool:
        """See `committed`. A computation from scratch now places every pod on the GPU the last plan
        placed it on (`PendingPod.planned`), on a slice that plan carved or found there: every pod
        was placed, none was released (which would take a pod out and a slice with it), and a node
        whose slices the plan changed is asked for exactly them. Then it differs from the last
        computation only in the asked nodes: their slices are the layout asked, listed as a node
        applying it is seen, and they may no longer carve unless that layout only adds. Those nodes
        are seen again from `state` (`_planning_node`) and their pods promised the same slices;
        where any of that does not hold, nothing is changed and False returned."""
        asked = {planned.node for planned in decision.node_plans}
        cluster = basis.run.cluster
        if any(gpu.changed and gpu.node not in asked for gpu in cluster.gpus):
            return False
        holders = state.holders()
        ungated = frozenset(pod.size_gb for pod in state.waiting() if not pod.gated)
        seen_anew: list[tuple[str, list[GpuPlan]]] = []
        for name in sorted(asked):
            level = state.nodes.get(name)
            if level is None or level.report is None or name in basis.run.withdrawn:
                return False
            node, without_slice = _planning_node(
                state, name, level, level.report, holders.get(name), ungated, now, self.settings
            )
            before = cluster.gpus_of([name])
            gpus = sorted(node.gpus, key=_index_of)
            if without_slice or node.withdrawn or [g.index for g in gpus] != [g.gpu.index for g in before]:
                return False
            fresh: list[GpuPlan] = []
            for old, gpu in zip(before, gpus, strict=True):
                plan = GpuPlan.of(old.order, node, gpu, self.settings.plan)
                for piece, owner in zip(old.slices, old.owners, strict=True):
                    if owner is not None:
                        if plan.unclaimed.get(piece.size_gb, 0) <= 0:
                            return False
                        plan.claim_free(piece.size_gb, owner)
                fresh.append(plan)
            seen_anew.append((name, fresh))
        digest, nodes = basis.digest, dict(basis.plan.nodes)
        for name, fresh in seen_anew:
            for plan in fresh:
                cluster.replace(plan)
            digest.remove(basis.node_items[name])
            nodes[name], basis.node_items[name] = self._render(
                name, {p.gpu.index: tuple(p.slices) for p in fresh}
            )
            digest.add(basis.node_items[name])
        self._touched.extend(asked)
        basis.plan = PlanComputed.model_construct(
            kind="PlanComputed",
            plan_id=digest.plan_id,
            nodes=nodes,
            placed=basis.plan.placed,
            unplaced=basis.plan.unplaced,
            excluded_nodes=basis.plan.excluded_nodes,
        )
        if self._candidates is not None and self._candidates[0] is decision.plan:
            self._candidates = (basis.plan, self._candidates[1])
        return True

    def next_overdue(self, after: datetime) -> datetime | None:
        """When the next pod that the last full computation left waiting becomes overdue (after
        `after`), or None. Nothing arrives then either: the caller wakes up and calls `time_passed`.
        (A plan extended since left no pod waiting: an extension places every pod it adds.)"""
        moments = self._overdue_moments
        position = bisect_right(moments, after)
        return moments[position] if position < len(moments) else None

    def _fresh_until(self, state: ClusterState, hosting: list[str]) -> datetime | None:
        """Until when every report of `hosting` stays fresh (`_can_host`), as they are now."""
        reported = [state.nodes[name].reported_at for name in hosting]
        oldest = min((at for at in reported if at is not None), default=None)
        return None if oldest is None else oldest + self.settings.report_stale_after

    def _hosting_as_before(self, basis: _Basis, state: ClusterState, now: datetime) -> bool:
        """Every node of the basis can host pods now exactly when it could then.

        Nothing but time and a report's heartbeat changes that without a structure change (which
        ends the basis anyway): time can only end a node's hosting, once its report goes stale,
        and a heartbeat can only start it again. So the nodes that could host are gone through
        only once the first of their reports could have gone stale, and then the moment is moved
        on to the next one; the nodes that could not host are few and gone through every time."""
        for name in basis.not_hosting:
            level = state.nodes[name]
            if level.report is not None and _can_host(level, now, self.settings):
                return False
        if basis.fresh_until is not None and now > basis.fresh_until:
            for name in basis.hosting:
                level = state.nodes[name]
                if not (level.report is not None and _can_host(level, now, self.settings)):
                    return False
            basis.fresh_until = self._fresh_until(state, basis.hosting)
        return True

    def _extended(self, state: ClusterState, now: datetime) -> PlanComputed | None:
        basis, self._basis = self._basis, None
        if basis is None or state.structure_changes != basis.structure_changes:
            return None
        if not self._hosting_as_before(basis, state, now):
            return None
        arrived = state.arrivals(basis.revision)
        if any(
            key in basis.pending or key in state.releases or not state.pods[key].waits_for_slice
            for key in arrived
        ):
            return None
        if not state.sharing_label_rules.isdisjoint(arrived):
            return None  # the eligibility of the basis may predate a change of those labels
        arrivals = [state.pods[key] for key in arrived]
        extension = extend_run(basis.run, basis.eligibility.pending(arrivals))
        if extension is None:
            return None
        digest = basis.digest
        nodes = dict(basis.plan.nodes)  # in order of name, as it stays: only layouts change
        self._touched.extend(extension.layouts)
        for name, gpus in extension.layouts.items():
            digest.remove(basis.node_items[name])
            nodes[name], basis.node_items[name] = self._render(name, gpus)
            digest.add(basis.node_items[name])
        added = {}
        for key, p in extension.placed.items():
            self._placements[key] = entry = self._placed(key, p)
            digest.add(entry[2])
            added[key] = entry[1]
        for key, reason in extension.unplaced.items():
            digest.add(_reason_item("unplaced", key, reason))
        plan = PlanComputed.model_construct(
            kind="PlanComputed",
            plan_id=digest.plan_id,
            nodes=nodes,
            placed=_in_key_order(basis.plan.placed, added),
            unplaced=_in_key_order(basis.plan.unplaced, extension.unplaced),
            excluded_nodes=basis.plan.excluded_nodes,
        )
        if self._candidates is not None and self._candidates[0] is basis.plan:
            candidates = self._candidates[1]
            for node, keys in _release_candidates(state, added).items():
                candidates.setdefault(node, []).extend(keys)
            self._candidates = (plan, candidates)
        basis.revision = state.revision
        basis.pending.update(arrived)
        basis.plan = plan
        self._basis = basis
        return plan


V = TypeVar("V")


def _in_key_order(ordered: Mapping[str, V], added: Mapping[str, V]) -> dict[str, V]:
    """`dict(sorted({**ordered, **added}.items()))` for `ordered` in order of key already: each
    new key goes into its place, so that a plan that gains a pod costs no sort of all the others.
    Nothing added: `ordered` itself (a plan's mappings are never changed once it is made)."""
    if not added and isinstance(ordered, dict):
        return ordered
    if any(key in ordered for key in added):
        return dict(sorted({**ordered, **added}.items()))
    keys = list(ordered)
    values = list(ordered.values())
    for key in sorted(added, reverse=True):  # the last first: the places of the others stay right
        position = bisect_left(keys, key)
        keys.insert(position, key)
        values.insert(position, added[key])
    return dict(zip(keys, values, strict=True))


NO_RULES = NodeRules()


class _Eligibility:
    """The nodes that pods' rules let them run on, as the state says when it is made (it serves
    while no node changes: a full computation makes a new one).

    A pod with rules may run only on the nodes they admit, unless they admit every node (a pod that
    tolerates the taint every GPU node carries is as free as one without rules). A pod without
    `hostIPC` may run only on nodes whose agents report the `shm-directory` IPC mode: in the `host`
    mode its MPS client could not reach the server's shared memory. Pods share their rules, so
    each set of rules is worked out once."""

    def __init__(self, state: ClusterState) -> None:
        self.observed = {
            name: level.observed for name, level in state.nodes.items() if level.observed is not None
        }
        self.shm_directory = frozenset(
            name
            for name, level in state.nodes.items()
            if level.observed is not None
            and level.report is not None
            and level.report.mps_ipc == "shm-directory"
        )
        self._allowed: dict[tuple[str, bool], frozenset[str] | None] = {}
        self.state = state  # its `first_seen` and `last_placed` as they are when asked

    def pending(self, pods: Iterable[PodObserved], overdue_since: datetime | None = None) -> list[PendingPod]:
        """`pods` as pods waiting for a slice, each with the nodes it may run on when not all, and
        overdue when created before `overdue_since`."""
        pending = []
        first_seen, last_placed = self.state.first_seen, self.state.last_placed
        for pod in pods:
            # `pod.rules == NO_RULES` (a model is equal to another of its kind with the same fields),
            # without pydantic's overhead per call.
            key = (
                pod.rules.model_dump_json() if pod.rules.__dict__ != NO_RULES.__dict__ else "",
                pod.host_ipc,
            )
            eligible = self._allowed[key] if key in self._allowed else self._eligible(key, pod)
            pending.append(
                PendingPod(
                    pod.namespace,
                    pod.name,
                    pod.size_gb,
                    pod.priority,
                    pod.created,
                    eligible=eligible,
                    needs_shm_directory=not pod.host_ipc,
                    arrived=first_seen.get(pod.key),
                    planned=_planned_gpu(last_placed, pod.key),
                    overdue=overdue_since is not None and pod.created < overdue_since,
                )
            )
        return pending

    def _eligible(self, key: tuple[str, bool], pod: PodObserved) -> frozenset[str] | None:
        observed = self.observed
        allowed = (
            frozenset(name for name, node in observed.items() if admits(pod.rules, node))
            if has_effect(pod.rules, observed)
            else None
        )
        if not pod.host_ipc:
            allowed = self.shm_directory if allowed is None else allowed & self.shm_directory
        self._allowed[key] = None if allowed is not None and len(allowed) == len(observed) else allowed
        return self._allowed[key]


def planning_nodes(
    state: ClusterState,
    now: datetime,
    settings: PlannerSettings,
    waiting: list[PodObserved] | None = None,
) -> tuple[list[Node], list[str], list[PendingPod]]:
    """Opted-in nodes as the planner may use them, the names of those that never reported, and the
    pods released to a node that has no slice left for them (they are planned there again).

    A node is seen as its agent reports it, or, while it applies a layout asked earlier, as that
    layout with the slices its agent reports used. A pod bound (or released) to the node holds one of
    its slices; until the report names the pod, one more free slice of its size counts as used and no
    free slice of its size may be reclaimed there, since the kubelet may give the pod any of them.
    No free slice of a size that a pod outside the scheduling gate waits for may be reclaimed
    anywhere: the scheduler may bind that pod to it at any moment. `waiting`: `state.waiting()`,
    when the caller has it already.
    """
    holders = state.holders()
    ungated = frozenset(
        pod.size_gb for pod in (state.waiting() if waiting is None else waiting) if not pod.gated
    )
    nodes: list[Node] = []
    never_reported: list[str] = []
    pinned: list[PendingPod] = []
    for name, pods in sorted(holders.items()):
        level = state.nodes.get(name)
        if level is None or level.observed is None or level.report is None:
            # Released to a node mpsflow does not plan on now: they wait for it, and say so.
            pinned.extend(_pinned(pod, name, state) for pod in pods if pod.node is None)
    for name, level in sorted(state.nodes.items()):
        if level.observed is None:
            continue
        if level.report is None or level.reported_at is None:
            never_reported.append(name)
            continue
        node, without_slice = _planning_node(
            state, name, level, level.report, holders.get(name), ungated, now, settings
        )
        nodes.append(node)
        pinned.extend(without_slice)
    return nodes, never_reported, pinned


def _planning_node(
    state: ClusterState,
    name: str,
    level: _NodeLevel,
    report: NodeGpusReported,
    there: list[PodObserved] | None,
    ungated: frozenset[int],
    now: datetime,
    settings: PlannerSettings,
) -> tuple[Node, list[PendingPod]]:
    """One reported node of `planning_nodes`, and the pods released there that have no slice left
    (`there`: the pods holding or about to hold one of its slices)."""
    unnamed: list[PodObserved] = []
    if there:
        named = {s.holder for g in report.gpus for s in g.slices if s.holder is not None}
        unnamed = [pod for pod in there if pod.key not in named]
    applying = level.applying
    desired = level.desired.layout if applying and level.desired is not None else None
    gpus, without_slice = level.expected_gpus(report, desired, Counter(p.size_gb for p in unnamed))
    pinned: list[PendingPod] = []
    for pod in unnamed:
        if without_slice[pod.size_gb] > 0 and pod.node is None:
            without_slice[pod.size_gb] -= 1
            pinned.append(_pinned(pod, name, state))
    can_host = _can_host(level, now, settings)
    # A node applying a layout that only adds slices may be asked to add more at once, and only
    # to add: every free slice it has stays (protected), nothing is withdrawn.
    adding = applying and level.adding
    can_carve = can_host and (not applying or adding)
    protected = ungated | {pod.size_gb for pod in unnamed} if unnamed else ungated
    if adding:
        protected = protected | {piece.size_gb for gpu in gpus for piece in gpu.slices}
    node = Node(
        name=name,
        gpus=gpus,
        can_carve=can_carve,
        can_host=can_host,
        protected=protected,
        withdrawn=level.withdrawn_gpus(report, protected if can_carve and not adding else None),
    )
    return node, pinned


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
            slice_of(s.size_gb, s.used)
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


_size_of = attrgetter("size_gb")
_index_of = attrgetter("index")


def _pinned(pod: PodObserved, node: str, state: ClusterState) -> PendingPod:
    return PendingPod(
        pod.namespace,
        pod.name,
        pod.size_gb,
        pod.priority,
        pod.created,
        node,
        arrived=state.first_seen.get(pod.key),
        planned=_planned_gpu(state.last_placed, pod.key),
    )


def _planned_gpu(last_placed: Mapping[str, PlacementEvent], key: str) -> tuple[str, int] | None:
    placement = last_placed.get(key)
    return None if placement is None else (placement.node, placement.gpu)


def _expected_gpus(
    report: NodeGpusReported, desired: Layout | None, unnamed: Counter[int]
) -> tuple[tuple[Gpu, ...], Counter[int]]:
    """The node's GPUs as the planner counts them, and per size the unnamed holders left without a
    free slice to count as theirs.

    Slices are the reported ones, or those of `desired` (a layout being applied) with the reported
    used ones kept. Used slices the report does not tie to a pod may be the unnamed holders' own;
    beyond those, one free slice per unnamed holder counts as used, GPU by GPU.
    """
    to_mark: Counter[int] = Counter()
    if unnamed:
        untied_used = Counter(s.size_gb for g in report.gpus for s in g.slices if s.used and s.holder is None)
        to_mark = Counter({size: count - untied_used[size] for size, count in unnamed.items()})
    gpus: list[Gpu] = []
    for gpu in sorted(report.gpus, key=_index_of):
        if not gpu.serves_slices:  # no MPS to serve slices on it now: see `_withdrawn_gpus`
            continue
        slices: list[Slice]
        if (desired is None or gpu.index not in desired) and not any(n > 0 for n in to_mark.values()):
            # As reported, by size, each size's used slices first: what the loop below gives.
            slices = [SHARED_SLICES[s.size_gb, True] for s in gpu.slices if s.used]
            slices += [SHARED_SLICES[s.size_gb, False] for s in gpu.slices if not s.used]
            slices.sort(key=_size_of)
        else:
            used = Counter(s.size_gb for s in gpu.slices if s.used)
            if desired is not None and gpu.index in desired:
                wanted = Counter(desired[gpu.index])
                sizes = sorted((wanted | used).elements())
            else:
                sizes = sorted(s.size_gb for s in gpu.slices)
            slices = []
            for size in sizes:
                if used[size] > 0:
                    used[size] -= 1
                    slices.append(slice_of(size, True))
                elif to_mark[size] > 0:
                    to_mark[size] -= 1
                    slices.append(slice_of(size, True))
                else:
                    slices.append(slice_of(size, False))
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
