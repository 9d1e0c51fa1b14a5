"""The planner service: folds pod, node and GPU events into state and publishes plans.

On start it rebuilds its state from the last message of every subject (its durable consumer
is recreated at "last per subject"), so a restart loses nothing. Deciding is `decide` from the
functional core; this shell only moves events in and plans out: each node's layout that changed
as a `NodePlanned`, then the plan as a `PlanComputed` (summarized when large), and why each pod
that could not be placed waits as a `PodUnplaced`, so that no message grows with the cluster. It
never talks to Kubernetes or to a GPU.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import anyio
import nats.errors
from opentelemetry.trace import Link

from events import subjects
from events.envelope import content_id
from events.jetstream import Delivery, EventBus
from events.plans import NodeLayout, NodePlanned, PlanComputed
from events.pods import PodUnplaced
from events.tracing import link_to, tracer
from services.kit.signal import Wakeup
from services.planner.core.state import (
    ClusterState,
    IncrementalPlanner,
    NothingToDo,
    PlannerSettings,
    PublishPlan,
    WaitUntil,
    decide,
)

log = logging.getLogger(__name__)

DURABLE = "planner"
WHOLE_PLAN_ITEMS = 2_000  # placements, reasons and GPU layouts: about 150 KiB of JSON
RETRY_FIRST = 0.5  # seconds before a failed publish is tried again; doubles up to RETRY_LONGEST
RETRY_LONGEST = 30.0
MAX_LINKS = 64


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


class PlannerService:
    def __init__(self, bus: EventBus, settings: PlannerSettings | None = None) -> None:
        self.bus = bus
        self.settings = settings or PlannerSettings()
        self.state = ClusterState()
        self.planner = IncrementalPlanner(self.settings)
        self._wakeup = Wakeup()
        self._caught_up = False
        self._links: list[Link] = []
        self._unplaced_published: dict[str, str] = {}
        self._published_layouts: dict[str, NodeLayout] = {}

    async def handle(self, delivery: Delivery) -> None:
        self.state.apply(delivery.envelope)
        if delivery.pending == 0:
            self._caught_up = True
        link = link_to(delivery.headers)
        if link is not None and len(self._links) < MAX_LINKS:
            self._links.append(link)
        self._wakeup.set()

    async def _check_caught_up(self) -> None:
        """Caught up also when the backlog ended with messages that were dead-lettered, not handled."""
        if not self._caught_up:
            info = await self.bus.js.consumer_info(subjects.STREAM, DURABLE)
            if info.num_pending == 0:
                self._caught_up = True
                self._wakeup.set()

    async def consume(self) -> None:
        await self.bus.consume(
            durable=DURABLE,
            filter_subjects=[subjects.POD_EVENTS, subjects.NODE_EVENTS, subjects.GPU_EVENTS],
            handle=self.handle,
            deliver_from="last_per_subject",
            reset=True,
            batch=256,
            after_batch=self._check_caught_up,
        )

    async def decide_forever(self) -> None:
        checked_staleness = datetime.now(UTC)
        retry = RETRY_FIRST
        while True:
            timeout: float | None = None
            if self._caught_up:
                now = datetime.now(UTC)
                stale = self.state.next_staleness(checked_staleness, self.settings.report_stale_after)
                if stale is not None and stale <= now:
                    self.state.report_went_stale(stale)
                checked_staleness = now
                decision = decide(self.state, now, self.settings, self.planner)
                try:
                    if isinstance(decision, PublishPlan):
                        await self._publish(decision)
                        retry = RETRY_FIRST
                        continue
                    if isinstance(decision, NothingToDo) and decision.planned is not None:
                        await self._publish_unplaced(decision.planned)
                        self.state.mark_planned(decision.planned.plan_id, decision.at_revision)
                except (nats.errors.Error, TimeoutError) as error:
                    # The state stays unplanned, so the next try publishes the plan then in force.
                    log.error(
                        "publishing failed (%s: %s); trying again in %.1fs",
                        type(error).__name__,
                        error,
                        retry,
                    )
                    await anyio.sleep(retry)
                    retry = min(retry * 2, RETRY_LONGEST)
                    continue
                if isinstance(decision, WaitUntil):
                    timeout = max(0.0, (decision.when - now).total_seconds())
                stale = self.state.next_staleness(now, self.settings.report_stale_after)
                if stale is not None:
                    until_stale = (stale - now).total_seconds()
                    timeout = until_stale if timeout is None else min(timeout, until_stale)
            await self._wakeup.wait(timeout)

    async def _publish(self, decision: PublishPlan) -> None:
        plan = decision.plan
        links, self._links = self._links, []
        with tracer().start_as_current_span(
            "plan",
            links=links,
            attributes={
                "mpsflow.plan_id": plan.plan_id,
                "mpsflow.placed": len(plan.placed),
                "mpsflow.unplaced": len(plan.unplaced),
            },
        ):
            for node, layout in sorted(plan.nodes.items()):
                if self._published_layouts.get(node) != layout:
                    await self.bus.publish(
                        subjects.planned_subject(node),
                        NodePlanned(node=node, plan_id=plan.plan_id, layout=layout),
                        message_id=content_id("planned", node, plan.plan_id),
                    )
                    self._published_layouts[node] = layout
            await self.bus.publish(subjects.plan_subject(), published_plan(plan), message_id=plan.plan_id)
            await self._publish_unplaced(plan)
        self.state.mark_planned(plan.plan_id, decision.at_revision)
        log.info(
            "plan %s: %d placed, %d unplaced, %d nodes",
            plan.plan_id,
            len(plan.placed),
            len(plan.unplaced),
            len(plan.nodes),
        )

    async def _publish_unplaced(self, plan: PlanComputed) -> None:
        """One PodUnplaced per pod (by uid, so a re-created pod gets its own) and reason."""
        still_unplaced: dict[str, str] = {}
        for key, reason in sorted(plan.unplaced.items()):
            pod = self.state.pods.get(key)
            if pod is None:
                continue
            still_unplaced[pod.uid] = reason
            if self._unplaced_published.get(pod.uid) == reason:
                continue
            await self.bus.publish(
                subjects.unplaced_subject(pod.namespace, pod.name),
                PodUnplaced(namespace=pod.namespace, name=pod.name, uid=pod.uid, reason=reason),
                message_id=content_id("unplaced", pod.uid, reason),
            )
        self._unplaced_published = still_unplaced
