"""The planner service: folds pod, node and GPU events into state and publishes plans.

On start it rebuilds its state from the last message of every subject it reads (its durable
consumer is recreated at "last per subject"): pods, nodes, GPU reports, what node agents applied
or refused, and its own node layouts and pod releases, so a restart loses nothing. Deciding is
`decide` from the functional core, which also says what to publish: each node's layout that must
change as a `NodePlanned`, the plan as a `PlanComputed` (summarized when large), each gated pod
whose slice is ready as a `PodReleased`, and why a pod waits as a `PodUnplaced`, so that no
message grows with the cluster. This shell only moves events in and decisions out, and never
talks to Kubernetes or to a GPU.
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
from events.plans import PlanComputed
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
            filter_subjects=[
                subjects.POD_EVENTS,
                subjects.NODE_EVENTS,
                subjects.GPU_EVENTS,
                subjects.CONFIG_EVENTS,
                subjects.PLANNED_EVENTS,
                subjects.RELEASE_EVENTS,
            ],
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
                if isinstance(decision, PublishPlan):
                    try:
                        await self._publish(decision)
                    except (nats.errors.Error, TimeoutError) as error:
                        # Nothing is committed, so the next try publishes what is due then.
                        log.error(
                            "publishing failed (%s: %s); trying again in %.1fs",
                            type(error).__name__,
                            error,
                            retry,
                        )
                        await anyio.sleep(retry)
                        retry = min(retry * 2, RETRY_LONGEST)
                        continue
                    retry = RETRY_FIRST
                    continue
                if isinstance(decision, NothingToDo) and decision.planned is not None:
                    self.state.mark_planned(decision.planned.plan_id, decision.at_revision)
                if isinstance(decision, WaitUntil):
                    timeout = max(0.0, (decision.when - now).total_seconds())
                stale = self.state.next_staleness(now, self.settings.report_stale_after)
                if stale is not None:
                    until_stale = (stale - now).total_seconds()
                    timeout = until_stale if timeout is None else min(timeout, until_stale)
            await self._wakeup.wait(timeout)

    async def _publish(self, decision: PublishPlan) -> None:
        """Publish what the decision says, in its order, then commit it to the state.

        Every message has an id derived from its content, so a publish retried after a failure
        half-way is stored once."""
        plan = decision.plan
        links, self._links = self._links, []
        with tracer().start_as_current_span(
            "plan",
            links=links,
            attributes={
                "mpsflow.plan_id": plan.plan_id,
                "mpsflow.placed": len(plan.placed),
                "mpsflow.unplaced": len(plan.unplaced),
                "mpsflow.released": len(decision.releases),
            },
        ):
            for planned in decision.node_plans:
                await self.bus.publish(
                    subjects.planned_subject(planned.node),
                    planned,
                    message_id=content_id("planned", planned.node, plan.plan_id),
                )
            if decision.plan_is_new:
                await self.bus.publish(subjects.plan_subject(), published_plan(plan), message_id=plan.plan_id)
            for release in decision.releases:
                await self.bus.publish(
                    subjects.release_subject(release.namespace, release.name),
                    release,
                    message_id=content_id("released", release.uid),
                )
            for unplaced in decision.unplaced:
                await self.bus.publish(
                    subjects.unplaced_subject(unplaced.namespace, unplaced.name),
                    unplaced,
                    message_id=content_id("unplaced", unplaced.uid, unplaced.reason),
                )
        self.state.commit(decision)
        log.info(
            "plan %s: %d placed, %d unplaced, %d node layouts, %d pods released",
            plan.plan_id,
            len(plan.placed),
            len(plan.unplaced),
            len(decision.node_plans),
            len(decision.releases),
        )
