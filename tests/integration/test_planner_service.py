"""The planner service on the in-memory bus, in virtual time: events in, plans and reasons out.

The planner folds the last message of every pod, node, GPU and config subject into its state,
waits for the batch window to close, and publishes each node layout that must change, the plan
(message id = plan id) and one `PodUnplaced` per pod it cannot place and per reason. A stand-in
for the node agents answers every node layout the way an agent does (a report with the slices,
then `NodeConfigApplied`), since the planner asks a node for one change at a time. A restart
rebuilds the same state from the stream and so the same plan, which de-duplication stores once;
a message that does not decode is dead-lettered.

The bus is `MemoryBroker`, held to the same contract as JetStream (tests/contract), and the clock is
virtual (tests/memorybus.py): batch windows and retries take their exact time and no real time.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import anyio
import pytest

from events import subjects
from events.base import Model
from events.bus import Bus, BusUnavailableError, Delivery
from events.envelope import Event
from events.memory import MemoryBroker, MemoryBus
from events.nodes import GpuReport, NodeGpusReported, NodeObserved, NodeOptedOut, SliceState
from events.plans import NodeConfigApplied, NodeLayout, NodePlanned, Placement, PlanComputed, SliceSpec
from events.pods import PodDeleted, PodObserved, PodUnplaced
from services.planner.core.state import BatchWindow, PlannerSettings
from services.planner.core.step import published_plan
from services.planner.service import DURABLE, PlannerService
from tests.memorybus import WAIT, MemoryLog, advance, loop_clock, virtual_broker, virtual_time
from tests.support import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return virtual_time()


@pytest.fixture
def broker() -> MemoryBroker:
    return virtual_broker()


@pytest.fixture
def bus(broker: MemoryBroker) -> MemoryBus:
    return broker.bus("tests")


NAMESPACE = "default"
NODE = "gpu-1.example.com"
QUIET = 5.0  # virtual seconds in which nothing more may happen
CREATED = datetime(2026, 1, 1, tzinfo=UTC)

E = TypeVar("E", bound=Model)


# --- events -------------------------------------------------------------------------------------


def gpu(index: int = 0, memory_gib: int = 80) -> GpuReport:
    return GpuReport(
        index=index,
        uuid=f"GPU-{index}",
        model="NVIDIA A100-SXM4-80GB",
        memory_mib=memory_gib * 1024,
        compute_capability=(8, 0),
        slices=(),
    )


def pending_pod(
    name: str, size_gb: int, *, uid: str | None = None, version: str = "1", priority: int = 0
) -> PodObserved:
    return PodObserved(
        namespace=NAMESPACE,
        name=name,
        uid=uid or f"uid-{name}",
        resource_version=version,
        size_gb=size_gb,
        priority=priority,
        created=CREATED,
        phase="Pending",
        node=None,
    )


async def publish_node(bus: MemoryBus, name: str = NODE, *, gpus: int = 1) -> None:
    await bus.publish(subjects.node_subject(name), NodeObserved(name=name))
    await bus.publish(
        subjects.gpus_subject(name), NodeGpusReported(node=name, gpus=tuple(gpu(i) for i in range(gpus)))
    )


async def publish_pod(bus: MemoryBus, pod: PodObserved) -> None:
    await bus.publish(subjects.pod_subject(pod.namespace, pod.name), pod)


def key(name: str) -> str:
    return f"{NAMESPACE}/{name}"


# --- harness ------------------------------------------------------------------------------------


async def answer_as_agents(bus: Bus, gpus: int = 1) -> None:
    """Answer every node layout as a node agent would: report the slices, then say it applied them."""

    async def answer(delivery: Delivery) -> None:
        planned = delivery.envelope.event
        if not isinstance(planned, NodePlanned):
            return
        reported = tuple(
            gpu(index).model_copy(
                update={
                    "slices": tuple(
                        SliceState(id=f"mps-g{index}-{s.size_gb}gb-{n}", size_gb=s.size_gb, used=s.used)
                        for n, s in enumerate(planned.layout.gpus.get(index, ()))
                    )
                }
            )
            for index in range(gpus)
        )
        await bus.publish(
            subjects.gpus_subject(planned.node), NodeGpusReported(node=planned.node, gpus=reported)
        )
        await bus.publish(
            subjects.config_subject(planned.node),
            NodeConfigApplied(node=planned.node, plan_id=planned.plan_id, gpus=planned.layout.sizes()),
        )

    await bus.consume(durable="agents", filter_subjects=[subjects.PLANNED_EVENTS], handle=answer)


@asynccontextmanager
async def planning(bus: Bus, settings: PlannerSettings | None = None) -> AsyncIterator[PlannerService]:
    """A planner service running in a task group beside stand-in node agents, cancelled on exit (as a
    shutdown does)."""
    service = PlannerService(bus, settings, clock=loop_clock)
    async with anyio.create_task_group() as group:
        group.start_soon(answer_as_agents, bus)
        group.start_soon(service.consume)
        group.start_soon(service.decide_forever)
        yield service
        group.cancel_scope.cancel()


def stored_count(broker: MemoryBroker, subject: str) -> int:
    """How many messages the stream holds on exactly `subject`."""
    return len(broker.stored(subject))


async def done_publishing(service: PlannerService, plan: PlanComputed) -> None:
    """Until the planner has finished publishing `plan` (and its unplaced reasons).

    A change that reaches the planner while it is still publishing is lost (see the xfailed
    test below), so the tests that are not about that race wait for this before the next change.
    """
    await eventually(
        lambda: service.core.state.last_plan_id == plan.plan_id, f"plan {plan.plan_id} published"
    )


def window(idle_ms: int, maximum_ms: int) -> PlannerSettings:
    return PlannerSettings(
        window=BatchWindow(idle=timedelta(milliseconds=idle_ms), maximum=timedelta(milliseconds=maximum_ms))
    )


# --- tests --------------------------------------------------------------------------------------


async def test_a_pending_pod_gets_a_slice_carved_on_the_reported_gpu(
    bus: MemoryBus, broker: MemoryBroker
) -> None:
    await publish_node(bus)
    await publish_pod(bus, pending_pod("a", 10))

    log = MemoryLog(broker)
    async with planning(bus):
        plan = await log.wait_for(PlanComputed, lambda p: key("a") in p.placed)

    assert plan.placed == {key("a"): Placement(node=NODE, gpu=0, size_gb=10)}
    assert plan.nodes[NODE].gpus == {0: (SliceSpec(size_gb=10, used=False),)}
    assert plan.unplaced == {}
    assert plan.excluded_nodes == {}
    assert stored_count(broker, subjects.plan_subject()) == 1


async def test_a_plan_that_cannot_be_published_is_tried_again_and_the_planner_lives_on(
    bus: MemoryBus, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    await publish_node(bus)
    await publish_pod(bus, pending_pod("a", 10))
    real_publish = bus.publish
    refused: list[str] = []

    async def refuse_the_first_plan(subject: str, event: Any, **options: Any) -> int:
        if subject == subjects.plan_subject() and not refused:
            refused.append(subject)
            raise BusUnavailableError("simulated: the plan did not fit a message")
        return await real_publish(subject, event, **options)

    monkeypatch.setattr(bus, "publish", refuse_the_first_plan)
    log = MemoryLog(broker)
    async with planning(bus):
        plan = await log.wait_for(PlanComputed, lambda p: key("a") in p.placed)

    assert refused == [subjects.plan_subject()]
    assert plan.placed[key("a")].size_gb == 10


async def test_a_pod_larger_than_any_gpu_is_reported_unplaced_once_across_plans(
    bus: MemoryBus, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    published: list[str] = []
    real_publish = bus.publish

    async def recording_publish(
        subject: str, event: Event, *, message_id: str | None = None, time: datetime | None = None
    ) -> int:
        published.append(subject)
        return await real_publish(subject, event, message_id=message_id, time=time)

    monkeypatch.setattr(bus, "publish", recording_publish)
    big_subject = subjects.unplaced_subject(NAMESPACE, "big")
    await publish_node(bus)
    await publish_pod(bus, pending_pod("big", 100))

    log = MemoryLog(broker)
    async with planning(bus) as planner:
        unplaced = await log.wait_for(PodUnplaced)
        await done_publishing(planner, log.of(PlanComputed)[-1])
        # Two more plans in which the big pod still waits, for the same reason.
        await publish_pod(bus, pending_pod("a", 10))
        await done_publishing(planner, await log.wait_for(PlanComputed, lambda p: key("a") in p.placed))
        await publish_pod(bus, pending_pod("b", 20))
        last = await log.wait_for(PlanComputed, lambda p: key("b") in p.placed)
        await advance(QUIET)

    assert unplaced == PodUnplaced(
        namespace=NAMESPACE, name="big", uid="uid-big", reason=last.unplaced[key("big")]
    )
    assert "100 GiB" in unplaced.reason
    assert "80 GiB" in unplaced.reason
    assert len(log.of(PlanComputed)) == 3
    assert all(key("big") in plan.unplaced for plan in log.of(PlanComputed))
    # Once in the stream, and not even attempted again (de-duplication is not what saves it).
    assert log.of(PodUnplaced) == [unplaced]
    assert published.count(big_subject) == 1
    assert stored_count(broker, big_subject) == 1


async def test_a_restarted_planner_rebuilds_its_state_and_repeats_the_same_plan(
    bus: MemoryBus, broker: MemoryBroker
) -> None:
    await publish_node(bus)
    await publish_pod(bus, pending_pod("a", 10))
    await publish_pod(bus, pending_pod("big", 100))
    big_subject = subjects.unplaced_subject(NAMESPACE, "big")

    log = MemoryLog(broker)
    async with planning(bus) as first:
        await log.wait_for(PodUnplaced)
        await eventually(lambda: first.core.state.last_plan_id is not None, "a first plan")
    await advance(QUIET)
    plans_before = stored_count(broker, subjects.plan_subject())
    before = log.of(PlanComputed)[-1]
    assert before.plan_id == first.core.state.last_plan_id
    assert key("a") in before.placed
    assert key("big") in before.unplaced

    publishes_before = bus.published
    async with planning(bus) as second:
        # The new planner decides from the rebuilt state and publishes (the same plan).
        await eventually(lambda: second.core.state.last_plan_id is not None, "the restarted planner's plan")
        assert bus.published > publishes_before
        assert set(second.core.state.pods) == {key("a"), key("big")}
        assert second.core.state.last_plan_id == before.plan_id

        # It goes on planning from there.
        await publish_pod(bus, pending_pod("b", 20))
        after = await log.wait_for(PlanComputed, lambda p: key("b") in p.placed)
    await advance(QUIET)

    assert after.placed[key("a")] == before.placed[key("a")]
    assert stored_count(broker, subjects.plan_subject()) == plans_before + 1
    assert [plan.plan_id for plan in log.of(PlanComputed)] == [before.plan_id, after.plan_id]
    assert stored_count(broker, big_subject) == 1


async def test_a_burst_of_pod_events_within_the_batch_window_yields_few_plans(
    bus: MemoryBus, broker: MemoryBroker
) -> None:
    settings = window(idle_ms=250, maximum_ms=2000)
    await publish_node(bus)
    names = [f"pod-{i:02d}" for i in range(20)]

    log = MemoryLog(broker)
    async with planning(bus, settings) as planner:
        await done_publishing(planner, await log.wait_for(PlanComputed))
        for name in names:
            await publish_pod(bus, pending_pod(name, 3))
        await log.wait_for(PlanComputed, lambda p: len(p.placed) == 20)
        await advance(QUIET)

    plans = log.of(PlanComputed)[1:]
    assert 1 <= len(plans) <= 3, [len(p.placed) for p in plans]
    last = plans[-1]
    assert set(last.placed) == {key(name) for name in names}
    assert last.nodes[NODE].gpus == {0: tuple(SliceSpec(size_gb=3) for _ in names)}
    assert last.unplaced == {}


async def test_a_malformed_pod_message_is_dead_lettered_and_planning_goes_on(
    bus: MemoryBus, broker: MemoryBroker
) -> None:
    bad_subject = subjects.pod_subject(NAMESPACE, "bad")
    await publish_node(bus)

    log = MemoryLog(broker)
    async with planning(bus) as planner:
        await done_publishing(planner, await log.wait_for(PlanComputed))
        await bus.publish_bytes(bad_subject, b"garbage")
        await publish_pod(bus, pending_pod("a", 10))
        plan = await log.wait_for(PlanComputed, lambda p: key("a") in p.placed)
        await done_publishing(planner, plan)

        letters = await bus.dead_letters(DURABLE)
        assert [(letter.subject, letter.data()) for letter in letters] == [(bad_subject, b"garbage")]
        assert letters[0].error.startswith("undecodable")
        assert log.undecodable == [bad_subject]

        # Still planning after the poison message.
        await publish_pod(bus, pending_pod("b", 10))
        later = await log.wait_for(PlanComputed, lambda p: key("b") in p.placed)

    assert plan.placed[key("a")] == Placement(node=NODE, gpu=0, size_gb=10)
    assert set(later.placed) == {key("a"), key("b")}


async def test_a_node_that_opts_out_disappears_from_the_next_plan(
    bus: MemoryBus, broker: MemoryBroker
) -> None:
    other = "gpu-2"
    await publish_node(bus)
    await publish_node(bus, other)

    log = MemoryLog(broker)
    async with planning(bus) as planner:
        both = await log.wait_for(PlanComputed, lambda p: set(p.nodes) == {NODE, other})
        await done_publishing(planner, both)
        await bus.publish(subjects.node_subject(other), NodeOptedOut(name=other, reason="label removed"))
        alone = await log.wait_for(PlanComputed, lambda p: p.plan_id != both.plan_id)
        await done_publishing(planner, alone)

        # Its agent's next report does not bring it back: only the API decides who is opted in.
        await bus.publish(subjects.gpus_subject(other), NodeGpusReported(node=other, gpus=(gpu(0), gpu(1))))
        await publish_pod(bus, pending_pod("a", 10))
        later = await log.wait_for(PlanComputed, lambda p: key("a") in p.placed)

    assert set(alone.nodes) == {NODE}
    assert other not in alone.excluded_nodes
    assert set(later.nodes) == {NODE}
    assert later.placed[key("a")].node == NODE


async def test_a_change_that_does_not_alter_the_plan_does_not_shorten_the_next_batch_window(
    bus: MemoryBus,
    broker: MemoryBroker,
) -> None:
    settings = window(idle_ms=1000, maximum_ms=5000)
    await publish_node(bus)
    await publish_pod(bus, pending_pod("a", 10))

    log = MemoryLog(broker)
    async with planning(bus, settings) as planner:
        await log.wait_for(PlanComputed, lambda p: key("a") in p.placed)
        await eventually(lambda: planner.core.state.nodes[NODE].answered, "the node's answer")
        await eventually(lambda: planner.core.state.first_unplanned_change is None, "every change planned")
        await advance(QUIET)
        known = {plan.plan_id for plan in log.of(PlanComputed)}
        plans = stored_count(broker, subjects.plan_subject())
        # The pending pod's priority changes: a change the planner uses, but the same plan. Once the
        # planner has decided on it (its window is closed), nothing new is on the plan subject.
        await publish_pod(bus, pending_pod("a", 10, version="2", priority=5))
        await eventually(lambda: planner.core.state.pods[key("a")].priority == 5, "the new priority")
        await eventually(lambda: planner.core.state.first_unplanned_change is None, "every change planned")
        assert stored_count(broker, subjects.plan_subject()) == plans
        # A burst now opens a window of its own: one plan serves all of it.
        for i in range(5):
            await publish_pod(bus, pending_pod(f"pod-{i}", 5))
        burst = await log.wait_for(PlanComputed, lambda p: len(p.placed) == 6)
        await advance(QUIET)

    after = [plan for plan in log.of(PlanComputed) if plan.plan_id not in known]
    assert after[0] == burst, [len(plan.placed) for plan in after]


# --- known bugs ---------------------------------------------------------------------------------


async def test_a_change_that_arrives_while_a_plan_is_being_published_is_planned(
    bus: MemoryBus, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    publishing_plan = anyio.Event()
    release = anyio.Event()
    real_publish = bus.publish

    async def slow_plan_publish(
        subject: str, event: Event, *, message_id: str | None = None, time: datetime | None = None
    ) -> int:
        sequence = await real_publish(subject, event, message_id=message_id, time=time)
        if isinstance(event, PlanComputed) and not release.is_set():
            publishing_plan.set()
            await release.wait()  # a slow ack, as on a loaded server
        return sequence

    monkeypatch.setattr(bus, "publish", slow_plan_publish)
    await publish_node(bus)
    await publish_pod(bus, pending_pod("a", 10))

    log = MemoryLog(broker)
    async with planning(bus) as planner:
        with anyio.fail_after(WAIT):
            await publishing_plan.wait()
        await publish_pod(bus, pending_pod("b", 10))
        await eventually(lambda: key("b") in planner.core.state.pods, "pod b observed")
        release.set()
        plan = await log.wait_for(PlanComputed, lambda p: key("b") in p.placed, within=1.5)

    assert set(plan.placed) == {key("a"), key("b")}


async def test_a_restarted_planner_plans_even_when_the_backlog_ends_with_a_malformed_message(
    bus: MemoryBus,
    broker: MemoryBroker,
) -> None:
    await publish_node(bus)
    await publish_pod(bus, pending_pod("a", 10))
    await bus.publish_bytes(subjects.pod_subject(NAMESPACE, "bad"), b"garbage")

    log = MemoryLog(broker)
    async with planning(bus):
        plan = await log.wait_for(PlanComputed, within=1.5)

    assert key("a") in plan.placed


async def test_a_pod_recreated_under_the_same_name_is_reported_unplaced_again(
    bus: MemoryBus, broker: MemoryBroker
) -> None:
    await publish_node(bus)
    await publish_pod(bus, pending_pod("big", 100))

    log = MemoryLog(broker)
    async with planning(bus, window(idle_ms=300, maximum_ms=1000)) as planner:
        await log.wait_for(PodUnplaced, lambda e: e.uid == "uid-big")
        await done_publishing(planner, log.of(PlanComputed)[-1])
        # A StatefulSet-like controller replaces the pending pod at once.
        await bus.publish(
            subjects.pod_subject(NAMESPACE, "big"), PodDeleted(namespace=NAMESPACE, name="big", uid="uid-big")
        )
        await publish_pod(bus, pending_pod("big", 100, uid="uid-big-2"))
        replaced = await log.wait_for(PodUnplaced, lambda e: e.uid == "uid-big-2", within=2)

    assert "100 GiB" in replaced.reason


async def test_each_node_layout_goes_out_on_its_own_subject_only_when_it_changes(
    bus: MemoryBus, broker: MemoryBroker
) -> None:
    await publish_node(bus)
    await publish_pod(bus, pending_pod("a", 10))
    log = MemoryLog(broker)
    async with planning(bus) as planner:
        first = await log.wait_for(PlanComputed, lambda p: key("a") in p.placed)
        await done_publishing(planner, first)
        await publish_pod(bus, pending_pod("zero", 0))  # a new plan (a new reason), the same layout
        await log.wait_for(PlanComputed, lambda p: key("zero") in p.unplaced)
        await advance(QUIET)
    planned = log.of(NodePlanned)
    assert [(p.node, p.plan_id) for p in planned] == [(NODE, first.plan_id)]
    assert planned[0].layout == first.nodes[NODE]


def test_a_large_plan_goes_on_the_bus_as_its_id_and_excluded_nodes() -> None:
    layout = NodeLayout(gpus={0: (SliceSpec(size_gb=1),)})
    small = PlanComputed(plan_id="p", nodes={"n": layout}, unplaced={"a/b": "why"})
    assert published_plan(small) == small
    large = PlanComputed(
        plan_id="p",
        nodes={f"n{i}": layout for i in range(3000)},
        unplaced={"a/b": "why"},
        excluded_nodes={"x": "impossible"},
    )
    assert published_plan(large) == PlanComputed(plan_id="p", nodes={}, excluded_nodes={"x": "impossible"})
