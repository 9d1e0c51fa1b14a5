"""The planner service: feeds pod, node and GPU events to the planner's core and publishes its steps.

On start it rebuilds its state from the last message of every subject it reads (its durable
consumer is recreated at "last per subject"): pods, nodes, GPU reports, what node agents applied
or refused, and its own node layouts and pod releases, so a restart loses nothing; and the last
plan it published, so that it does not publish the same plan again. It pauses Python's cyclic
garbage collector while it catches up and while it decides (`collector`): at cluster scale the
collector going through the state it folds took most of a restart's time. Every decision,
down to each message's subject and id, is the core's (`Planner` in `core/step.py`, which
`mpsflow replay` drives too): this shell observes events, asks for a step when woken, publishes
the step's messages and reports them published. It never decides, never talks to Kubernetes or
to a GPU, and reads the clock only to tell the core what time it is.

Why it folds the streams on start rather than loading a snapshot of its folded state from a KV
bucket: the streams already hold exactly that state (the last message of every subject), so a
snapshot would be a second copy of it, with a schema of its own to version, a bucket the planner
would write, and a consumer started at the snapshot's stream position instead of at the last
message of each subject, which could leave the two disagreeing after a crash between them. And
it would save little: loading a snapshot of the same pods and reports costs much of what
decoding their messages does, and at 2,000 nodes and 20,000 pending pods the whole fold takes
about a third of a second once the collector is out of the way, the first decision about half
a second (`benchmarks/planner_scale.py` prints both).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from contextlib import ExitStack
from datetime import UTC, datetime

from opentelemetry.trace import Link

from events import subjects
from events.bus import Bus, BusUnavailableError, Delivery, Publishing
from events.metrics import (
    DECISION_SECONDS,
    GPU_MEMORY_FREE,
    GPU_MEMORY_STRANDED,
    NODES,
    PODS,
    PODS_UNPLACED,
)
from events.plans import PlanComputed
from events.tracing import link_to, pods_attribute, tracer
from events.vocabulary import MIB_PER_GIB
from services.kit.retry import BUS, retrying
from services.kit.signal import Wakeup
from services.planner.collector import collector_paused, settle
from services.planner.core.figures import REASON_CLASSES, plan_figures
from services.planner.core.state import PlannerSettings, PublishPlan
from services.planner.core.step import Planner, Step

log = logging.getLogger(__name__)

DURABLE = "planner"
MAX_LINKS = 64
IN_FLIGHT = 256
"""A step's messages sent and not yet known to be stored."""
BATCH = 512
"""Events fetched at once. A planner behind the stream folds a whole batch before it decides (the
batch window of events published a while ago is long closed), so a larger batch spreads each
decision over more events."""


def wall_clock() -> datetime:
    return datetime.now(UTC)


class PlannerService:
    def __init__(
        self,
        bus: Bus,
        settings: PlannerSettings | None = None,
        clock: Callable[[], datetime] = wall_clock,
    ) -> None:
        self.bus = bus
        self.core = Planner(settings)
        self.clock = clock
        self._wakeup = Wakeup()
        self._caught_up = False
        self._catching_up = ExitStack()  # the collector's pause from start until caught up and decided
        self._settled = False
        self._links: list[Link] = []
        self.on_caught_up: Callable[[], None] = lambda: None
        """Called once, when the state is rebuilt and the planner decides from it (it is ready)."""

    def _now_caught_up(self) -> None:
        if not self._caught_up:
            self._caught_up = True
            self.on_caught_up()

    async def handle(self, delivery: Delivery) -> None:
        self.core.observe(delivery.envelope)
        if delivery.pending == 0:
            self._now_caught_up()
        link = link_to(delivery.headers)
        if link is not None and len(self._links) < MAX_LINKS:
            self._links.append(link)
        self._wakeup.set()

    async def _check_caught_up(self) -> None:
        """Caught up also when the backlog ended with messages that were dead-lettered, not handled."""
        if not self._caught_up and await self.bus.pending(DURABLE) == 0:
            self._now_caught_up()
            self._wakeup.set()

    async def consume(self) -> None:
        if not self._settled:
            self._catching_up.enter_context(collector_paused())
        try:
            await self._consume()
        finally:
            self._catching_up.close()

    async def _consume(self) -> None:
        for envelope in await self.bus.current_levels(subjects.plan_subject()):
            if isinstance(envelope.event, PlanComputed):
                self.core.recall_plan(envelope.event)
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
            batch=BATCH,
            after_batch=self._check_caught_up,
        )

    async def decide_forever(self) -> None:
        while True:
            published, timeout = await retrying(
                self._decide,
                on=BusUnavailableError,
                backoff=BUS,
                what="publishing a step",
                # NATS restarting (a rollout, a crash) is an outage it rides out: not an error yet.
                level=logging.WARNING,
            )
            if not published:
                await self._wakeup.wait(timeout)

    async def _decide(self) -> tuple[bool, float | None]:
        """Take a step and publish it if it decided something: whether it did, and if not, how long
        to wait for events (None: until one comes). A publish that failed raises
        BusUnavailableError: nothing is remembered, so the next try steps again and publishes what
        is due then."""
        if not self._caught_up:
            return False, None
        with collector_paused():
            now = self.clock()
            started, started_ns = time.perf_counter(), time.time_ns()
            step = self.core.step(now)
            if step.decision is not None:
                DECISION_SECONDS.labels(self.core.last_plan_mode).observe(time.perf_counter() - started)
                await self._publish(step, step.decision, started_ns)
        self._settle()
        if step.decision is not None:
            return True, None
        if step.wake_at is not None:
            return False, max(0.0, (step.wake_at - now).total_seconds())
        return False, None

    def _settle(self) -> None:
        """Once caught up and decided: let the collector run again, and exempt the state folded so far."""
        if not self._settled:
            self._settled = True
            self._catching_up.close()
            settle()

    async def _publish(self, step: Step, decision: PublishPlan, started_ns: int) -> None:
        """Publish the step's messages in order, then tell the core they are out. They are sent
        without waiting for each acknowledgement (a step that releases 500 pods would otherwise hold
        the planner for as many round trips), at most `IN_FLIGHT` at once, and every one is known to
        be stored before the core hears of it. Every message has an id derived from its content, so a
        publish retried after a failure half-way is stored once. The plan's span starts when the
        step that decided it did (`started_ns`), so it shows the decision's time too."""
        plan = decision.plan
        links, self._links = self._links, []
        with tracer().start_as_current_span(
            "plan",
            start_time=started_ns,
            links=links,
            attributes={
                "mpsflow.plan_id": plan.plan_id,
                "mpsflow.plan_mode": self.core.last_plan_mode,
                "mpsflow.placed": len(plan.placed),
                "mpsflow.unplaced": len(plan.unplaced),
                "mpsflow.released": len(decision.releases),
                "mpsflow.pods": pods_attribute(plan.placed),
            },
        ):
            in_flight: deque[Publishing] = deque()
            for message in step.messages:
                in_flight.append(
                    await self.bus.publish_soon(message.subject, message.event, message_id=message.message_id)
                )
                if len(in_flight) > IN_FLIGHT:
                    await in_flight.popleft().stored()
            for sent in in_flight:
                await sent.stored()
        self.core.published(step)
        self._report_figures(plan)
        log.info(
            "plan %s: %d placed, %d unplaced, %d node layouts, %d pods released",
            plan.plan_id,
            len(plan.placed),
            len(plan.unplaced),
            len(decision.node_plans),
            len(decision.releases),
        )

    def _report_figures(self, plan: PlanComputed) -> None:
        """Set the plan gauges of `events.metrics` from the plan just published."""
        state, reserve = self.core.state, self.core.settings.plan.reserve_mib
        gpus = {
            (name, gpu.index): (
                gpu.model,
                max(0, gpu.memory_mib - max(reserve, gpu.reserved_mib)) // MIB_PER_GIB,
            )
            for name, level in state.nodes.items()
            if level.report is not None
            for gpu in level.report.gpus
        }
        sizes = {key: state.pods[key].size_gb for key in plan.unplaced if key in state.pods}
        figures = plan_figures(plan, gpus, sizes)
        PODS.labels("pending").set(figures.pending)
        PODS.labels("placed").set(figures.placed)
        PODS.labels("unplaced").set(sum(figures.unplaced.values()))
        for label in {*figures.unplaced, *(label for _, label in REASON_CLASSES), "other"}:
            PODS_UNPLACED.labels(label).set(figures.unplaced.get(label, 0))
        for model in {model for model, _ in gpus.values()} | set(figures.free_gib):
            GPU_MEMORY_FREE.labels(model).set(figures.free_gib.get(model, 0))
            GPU_MEMORY_STRANDED.labels(model).set(figures.stranded_gib.get(model, 0))
        NODES.labels("planned").set(figures.planned_nodes)
        NODES.labels("excluded").set(figures.excluded_nodes)
