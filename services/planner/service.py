"""The planner service: folds pod, node and GPU events into state and publishes plans.

On start it rebuilds its state from the last message of every subject (its durable consumer
is recreated at "last per subject"), so a restart loses nothing. Deciding is `decide` from the
functional core; this shell only moves events in and plans out, and publishes why each pod
that could not be placed waits. It never talks to Kubernetes or to a GPU.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from opentelemetry.trace import Link

from events import subjects
from events.envelope import content_id
from events.jetstream import Delivery, EventBus
from events.pods import PodUnplaced
from events.tracing import link_to, tracer
from services.kit.signal import Wakeup
from services.planner.core.state import ClusterState, NothingToDo, PlannerSettings, PublishPlan, decide

log = logging.getLogger(__name__)

DURABLE = "planner"
MAX_LINKS = 64


class PlannerService:
    def __init__(self, bus: EventBus, settings: PlannerSettings | None = None) -> None:
        self.bus = bus
        self.settings = settings or PlannerSettings()
        self.state = ClusterState()
        self._wakeup = Wakeup()
        self._caught_up = False
        self._links: list[Link] = []
        self._unplaced_published: dict[str, str] = {}

    async def handle(self, delivery: Delivery) -> None:
        self.state.apply(delivery.envelope)
        if delivery.pending == 0:
            self._caught_up = True
        link = link_to(delivery.headers)
        if link is not None and len(self._links) < MAX_LINKS:
            self._links.append(link)
        self._wakeup.set()

    async def consume(self) -> None:
        await self.bus.consume(
            durable=DURABLE,
            filter_subjects=[subjects.POD_EVENTS, subjects.NODE_EVENTS, subjects.GPU_EVENTS],
            handle=self.handle,
            deliver_from="last_per_subject",
            reset=True,
            batch=256,
        )

    async def decide_forever(self) -> None:
        while True:
            timeout: float | None = None
            if self._caught_up:
                now = datetime.now(UTC)
                decision = decide(self.state, now, self.settings)
                if isinstance(decision, PublishPlan):
                    await self._publish(decision)
                    continue
                if isinstance(decision, NothingToDo):
                    if decision.planned is not None:
                        self.state.mark_planned(decision.planned)
                else:
                    timeout = max(0.0, (decision.when - now).total_seconds())
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
            await self.bus.publish(subjects.plan_subject(), plan, message_id=plan.plan_id)
            for key, reason in sorted(plan.unplaced.items()):
                if self._unplaced_published.get(key) == reason:
                    continue
                pod = self.state.pods.get(key)
                if pod is None:
                    continue
                await self.bus.publish(
                    subjects.unplaced_subject(pod.namespace, pod.name),
                    PodUnplaced(namespace=pod.namespace, name=pod.name, uid=pod.uid, reason=reason),
                    message_id=content_id("unplaced", pod.uid, reason),
                )
                self._unplaced_published[key] = reason
            for key in set(self._unplaced_published) - set(plan.unplaced):
                del self._unplaced_published[key]
        self.state.mark_planned(plan.plan_id)
        log.info(
            "plan %s: %d placed, %d unplaced, %d nodes",
            plan.plan_id,
            len(plan.placed),
            len(plan.unplaced),
            len(plan.nodes),
        )
