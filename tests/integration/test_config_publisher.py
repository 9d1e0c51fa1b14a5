"""The config publisher against a real nats-server: plans in, one KV config per node out.

Each node's key of the `mpsflow-node-config` bucket is written only when its layout changed,
with compare-and-set on the key's revision; a config is never replaced by one from an older
plan message (its stream sequence is `plan_sequence`), and a failure on one node never keeps
the others from being written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
import nats.errors
import nats.js.errors
import pytest
from nats.js.kv import KeyValue

from events import subjects
from events.base import Model
from events.bus import Delivery
from events.jetstream import EventBus, JetStreamConfigStore
from events.plans import NodeConfigPublished, NodeLayout, NodeMpsConfig, NodePlanned, PlanComputed, SliceSpec
from services.config_publisher.service import DURABLE, ConfigPublisherService
from tests.buslog import BusLog as SharedBusLog
from tests.support import eventually

pytestmark = pytest.mark.anyio

NODE_A = "gpu-a.example.com"
NODE_B = "gpu-b"
NODE_C = "gpu-c"

E = TypeVar("E", bound=Model)
Layouts = dict[str, dict[int, tuple[int, ...]]]


# --- plans and configs --------------------------------------------------------------------------


def make_plan(plan_id: str, layouts: Layouts, *, used: bool = False) -> PlanComputed:
    return PlanComputed(
        plan_id=plan_id,
        nodes={
            node: NodeLayout(
                gpus={
                    index: tuple(SliceSpec(size_gb=s, used=used) for s in sizes)
                    for index, sizes in gpus.items()
                }
            )
            for node, gpus in layouts.items()
        },
    )


async def publish_plan(bus: EventBus, plan: PlanComputed, message_id: str | None = None) -> int:
    """Publishes as the planner does (message id = plan id unless given); returns the stream sequence."""
    return await bus.publish(subjects.plan_subject(), plan, message_id=message_id or plan.plan_id)


def foreign_config(node: str, gpus: dict[int, tuple[int, ...]], plan_sequence: int) -> bytes:
    """A config written by someone else (another publisher, an operator)."""
    config = NodeMpsConfig(node=node, plan_id="foreign", plan_sequence=plan_sequence, gpus=gpus)
    return config.model_dump_json().encode()


async def config_of(kv: KeyValue, node: str) -> tuple[NodeMpsConfig, int]:
    """A node's config and the revision of its key."""
    entry = await kv.get(subjects.node_config_key(node))
    assert entry.value is not None
    assert entry.revision is not None
    return NodeMpsConfig.model_validate_json(entry.value), entry.revision


async def revision_of(kv: KeyValue, node: str) -> int:
    entry = await kv.get(subjects.node_config_key(node))
    assert entry.revision is not None
    return entry.revision


# --- harness ------------------------------------------------------------------------------------


class BusLog(SharedBusLog):
    def published(self) -> list[tuple[str, str, str]]:
        """(subject, node, plan id) of every `NodeConfigPublished`, in order."""
        return [
            (subject, event.node, event.plan_id)
            for subject, event in self.events
            if isinstance(event, NodeConfigPublished)
        ]


@asynccontextmanager
async def publishing(bus: EventBus, service: ConfigPublisherService | None = None) -> AsyncIterator[None]:
    """The config publisher running in a task group (its consumer created), cancelled on exit."""
    running = service or ConfigPublisherService(bus)
    async with anyio.create_task_group() as group:
        group.start_soon(running.consume)
        await eventually(lambda: consumer_exists(bus), f"the consumer {DURABLE}")
        yield
        group.cancel_scope.cancel()


async def consumer_exists(bus: EventBus) -> bool:
    try:
        await bus.js.consumer_info(subjects.STREAM, DURABLE)
    except nats.js.errors.NotFoundError:
        return False
    return True


async def handled(bus: EventBus, sequence: int) -> None:
    """Until the publisher has acked every plan message up to stream `sequence`."""

    async def acked() -> bool:
        info = await bus.js.consumer_info(subjects.STREAM, DURABLE)
        floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
        return (floor or 0) >= sequence and not info.num_ack_pending

    await eventually(acked, f"the plan messages up to stream sequence {sequence} acked")


def recording_handles(
    service: ConfigPublisherService, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[int, int]]:
    """(stream sequence, delivery count) of every plan message handed to the service."""
    seen: list[tuple[int, int]] = []
    real_handle = service.handle

    async def handle(delivery: Delivery) -> None:
        seen.append((delivery.stream_sequence, delivery.deliveries))
        await real_handle(delivery)

    monkeypatch.setattr(service, "handle", handle)
    return seen


FIRST: Layouts = {NODE_A: {0: (10, 20), 1: (40,)}, NODE_B: {0: (5, 5, 5)}}


# --- tests --------------------------------------------------------------------------------------


async def test_a_plan_writes_every_nodes_config_and_announces_it(bus: EventBus) -> None:
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    plan = make_plan("plan-1", FIRST)

    async with BusLog(bus) as log, publishing(bus):
        sequence = await publish_plan(bus, plan)
        await handled(bus, sequence)
        await log.settle()

    a, a_revision = await config_of(kv, NODE_A)
    b, b_revision = await config_of(kv, NODE_B)
    assert (a.node, a.plan_id, a.plan_sequence, a.gpus) == (
        NODE_A,
        "plan-1",
        sequence,
        {0: (10, 20), 1: (40,)},
    )
    assert (b.node, b.plan_id, b.plan_sequence, b.gpus) == (NODE_B, "plan-1", sequence, {0: (5, 5, 5)})
    assert sorted(await kv.keys()) == sorted(
        [subjects.node_config_key(NODE_A), subjects.node_config_key(NODE_B)]
    )
    announced = {event.node: event for event in log.of(NodeConfigPublished)}
    assert announced == {
        NODE_A: NodeConfigPublished(node=NODE_A, plan_id="plan-1", revision=a_revision),
        NODE_B: NodeConfigPublished(node=NODE_B, plan_id="plan-1", revision=b_revision),
    }
    assert sorted(subject for subject, _, _ in log.published()) == sorted(
        [subjects.config_subject(NODE_A), subjects.config_subject(NODE_B)]
    )


async def test_a_plan_with_the_same_layouts_writes_nothing(bus: EventBus) -> None:
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)

    async with BusLog(bus) as log, publishing(bus):
        await handled(bus, await publish_plan(bus, make_plan("plan-1", FIRST)))
        revisions = {node: await revision_of(kv, node) for node in FIRST}
        # Every slice now in use: another plan id, the same sizes.
        await handled(bus, await publish_plan(bus, make_plan("plan-2", FIRST, used=True)))
        await log.settle()

    assert {node: await revision_of(kv, node) for node in FIRST} == revisions
    assert {(await config_of(kv, node))[0].plan_id for node in FIRST} == {"plan-1"}
    assert {plan_id for _, _, plan_id in log.published()} == {"plan-1"}


async def test_a_changed_layout_rewrites_only_that_nodes_key(bus: EventBus) -> None:
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    changed: Layouts = {**FIRST, NODE_B: {0: (5, 5, 5, 10)}}

    async with BusLog(bus) as log, publishing(bus):
        await handled(bus, await publish_plan(bus, make_plan("plan-1", FIRST)))
        a_before, a_revision = await config_of(kv, NODE_A)
        b_revision = await revision_of(kv, NODE_B)
        sequence = await publish_plan(bus, make_plan("plan-2", changed))
        await handled(bus, sequence)
        await log.settle()

    assert await config_of(kv, NODE_A) == (a_before, a_revision)
    b, b_revision_after = await config_of(kv, NODE_B)
    assert b_revision_after > b_revision
    assert (b.plan_id, b.plan_sequence, b.gpus) == ("plan-2", sequence, {0: (5, 5, 5, 10)})
    assert log.published()[-1] == (subjects.config_subject(NODE_B), NODE_B, "plan-2")
    assert [node for _, node, plan_id in log.published() if plan_id == "plan-2"] == [NODE_B]


async def test_an_older_plan_redelivered_after_a_newer_one_never_replaces_its_config(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old plan's first delivery fails (a KV hiccup) and is retried after the newer plan was written."""
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    real_get = kv.get
    newer_published = anyio.Event()
    failed = False

    async def flaky_get(key: str, revision: int | None = None, validate_keys: bool = True) -> KeyValue.Entry:
        nonlocal failed
        if not failed:
            failed = True
            await newer_published.wait()
            raise nats.errors.TimeoutError
        return await real_get(key, revision, validate_keys)

    monkeypatch.setattr(kv, "get", flaky_get)
    service = ConfigPublisherService(bus)
    service._kv = JetStreamConfigStore(kv)
    seen = recording_handles(service, monkeypatch)
    older = make_plan("plan-old", {NODE_A: {0: (10,)}})
    newer = make_plan("plan-new", {NODE_A: {0: (10, 20)}})

    async with BusLog(bus) as log, publishing(bus, service):
        old_sequence = await publish_plan(bus, older)
        await eventually(lambda: len(seen) == 1, "the first delivery of the older plan")
        new_sequence = await publish_plan(bus, newer)
        newer_published.set()
        await eventually(lambda: (old_sequence, 2) in seen, "the older plan redelivered")
        await handled(bus, new_sequence)
        await log.settle()

    assert seen == [(old_sequence, 1), (new_sequence, 1), (old_sequence, 2)]
    config, _ = await config_of(kv, NODE_A)
    assert (config.plan_id, config.plan_sequence, config.gpus) == ("plan-new", new_sequence, {0: (10, 20)})
    assert [plan_id for _, _, plan_id in log.published()] == ["plan-new"]


async def test_an_older_plan_published_again_as_a_new_message_is_the_desired_state_again(
    bus: EventBus,
) -> None:
    """The last message on the plan subject is the cluster's desired state (it is what a restarted
    publisher would start from), so an old plan *re-published* is newer than the plan before it."""
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    older = make_plan("plan-old", {NODE_A: {0: (10,)}})
    newer = make_plan("plan-new", {NODE_A: {0: (10, 20)}})

    async with publishing(bus):
        old_sequence = await publish_plan(bus, older)
        await handled(bus, old_sequence)
        new_sequence = await publish_plan(bus, newer)
        await handled(bus, new_sequence)
        # The same message again is de-duplicated: nothing new to deliver.
        assert await publish_plan(bus, older) == old_sequence
        again = await publish_plan(bus, older, message_id="plan-old-again")
        assert again > new_sequence
        await handled(bus, again)

    config, _ = await config_of(kv, NODE_A)
    assert (config.plan_id, config.plan_sequence, config.gpus) == ("plan-old", again, {0: (10,)})


async def test_a_config_written_before_the_plan_is_updated_with_compare_and_set(bus: EventBus) -> None:
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    key = subjects.node_config_key(NODE_A)
    written = await kv.put(key, foreign_config(NODE_A, {0: (40,)}, plan_sequence=0))

    async with BusLog(bus) as log, publishing(bus):
        sequence = await publish_plan(bus, make_plan("plan-1", {NODE_A: {0: (10, 20)}}))
        await handled(bus, sequence)
        await log.settle()

    config, revision = await config_of(kv, NODE_A)
    assert (config.plan_id, config.plan_sequence, config.gpus) == ("plan-1", sequence, {0: (10, 20)})
    assert revision == written + 1
    assert log.of(NodeConfigPublished) == [
        NodeConfigPublished(node=NODE_A, plan_id="plan-1", revision=revision)
    ]


async def test_a_write_between_the_publishers_read_and_its_update_is_retried(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    key = subjects.node_config_key(NODE_A)
    await kv.put(key, foreign_config(NODE_A, {0: (40,)}, plan_sequence=0))
    real_get = kv.get
    reads: list[int | None] = []
    racer_revisions: list[int] = []

    async def racing_get(key: str, revision: int | None = None, validate_keys: bool = True) -> KeyValue.Entry:
        entry = await real_get(key, revision, validate_keys)
        reads.append(entry.revision)
        if len(reads) == 1:  # someone else writes right after the publisher's first read
            racer_revisions.append(await kv.put(key, foreign_config(NODE_A, {0: (30,)}, plan_sequence=0)))
        return entry

    monkeypatch.setattr(kv, "get", racing_get)
    service = ConfigPublisherService(bus)
    service._kv = JetStreamConfigStore(kv)

    async with BusLog(bus) as log, publishing(bus, service):
        sequence = await publish_plan(bus, make_plan("plan-1", {NODE_A: {0: (10, 20)}}))
        await handled(bus, sequence)
        await log.settle()

    assert len(reads) == 2
    assert reads[1] == racer_revisions[0]
    config, revision = await config_of(kv, NODE_A)
    assert (config.plan_id, config.gpus) == ("plan-1", {0: (10, 20)})
    assert revision == racer_revisions[0] + 1
    history = [NodeMpsConfig.model_validate_json(e.value or b"").gpus for e in await kv.history(key)]
    assert history == [{0: (40,)}, {0: (30,)}, {0: (10, 20)}]
    assert log.of(NodeConfigPublished) == [
        NodeConfigPublished(node=NODE_A, plan_id="plan-1", revision=revision)
    ]


async def test_a_racing_write_from_a_newer_plan_is_not_overwritten(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    real_get = kv.get
    newer = foreign_config(NODE_A, {0: (30,)}, plan_sequence=1_000_000)
    raced = False

    async def racing_get(key: str, revision: int | None = None, validate_keys: bool = True) -> KeyValue.Entry:
        nonlocal raced
        try:
            return await real_get(key, revision, validate_keys)
        finally:
            if not raced:
                raced = True
                await kv.put(key, newer)

    monkeypatch.setattr(kv, "get", racing_get)
    service = ConfigPublisherService(bus)
    service._kv = JetStreamConfigStore(kv)

    async with BusLog(bus) as log, publishing(bus, service):
        await handled(bus, await publish_plan(bus, make_plan("plan-1", {NODE_A: {0: (10, 20)}})))
        await log.settle()

    assert (await real_get(subjects.node_config_key(NODE_A))).value == newer
    assert log.of(NodeConfigPublished) == []


async def test_a_deleted_config_is_written_again_by_the_next_plan(bus: EventBus) -> None:
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    key = subjects.node_config_key(NODE_A)

    async with publishing(bus):
        await handled(bus, await publish_plan(bus, make_plan("plan-1", FIRST)))
        await kv.delete(key)
        sequence = await publish_plan(bus, make_plan("plan-2", FIRST, used=True))
        await handled(bus, sequence)

    config, _ = await config_of(kv, NODE_A)
    assert (config.plan_id, config.plan_sequence, config.gpus) == ("plan-2", sequence, FIRST[NODE_A])
    assert (await config_of(kv, NODE_B))[0].plan_id == "plan-1"


async def test_an_unreadable_config_is_replaced_and_blocks_no_one(
    bus: EventBus, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key holding bytes that are not a `NodeMpsConfig` (written by another version, say, since the
    models forbid unknown fields) is overwritten with compare-and-set like a missing one; every node
    gets its config from the first delivery."""
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    await kv.put(subjects.node_config_key(NODE_B), b"garbage")
    service = ConfigPublisherService(bus)
    seen = recording_handles(service, monkeypatch)
    layouts: Layouts = {NODE_A: {0: (10,)}, NODE_B: {0: (10,)}, NODE_C: {0: (20,)}}

    async with BusLog(bus) as log, publishing(bus, service):
        first = await publish_plan(bus, make_plan("plan-1", layouts))
        await handled(bus, first)  # acked, and not redelivered: checked below
        await log.settle()

    for node in (NODE_A, NODE_B, NODE_C):
        assert (await config_of(kv, node))[0].plan_id == "plan-1"
    assert (first, 2) not in seen
    assert {(node, plan_id) for _, node, plan_id in log.published()} == {
        (NODE_A, "plan-1"),
        (NODE_B, "plan-1"),
        (NODE_C, "plan-1"),
    }


async def test_a_node_planned_event_is_written_like_a_plan_of_that_node(bus: EventBus) -> None:
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    layout = make_plan("plan-9", {NODE_A: {0: (10, 20)}}).nodes[NODE_A]
    async with publishing(bus):
        sequence = await bus.publish(
            subjects.planned_subject(NODE_A), NodePlanned(node=NODE_A, plan_id="plan-9", layout=layout)
        )
        await handled(bus, sequence)
    config, _ = await config_of(kv, NODE_A)
    assert (config.plan_id, config.plan_sequence, config.gpus) == ("plan-9", sequence, {0: (10, 20)})


async def test_a_layout_asked_again_of_a_node_is_written_again_for_its_agent_to_answer(bus: EventBus) -> None:
    kv = await bus.js.key_value(subjects.NODE_CONFIG_BUCKET)
    layout = make_plan("plan-9", {NODE_A: {0: (10, 20)}}).nodes[NODE_A]
    subject = subjects.planned_subject(NODE_A)
    async with publishing(bus):
        await handled(
            bus, await bus.publish(subject, NodePlanned(node=NODE_A, plan_id="plan-9", layout=layout))
        )
        _, first = await config_of(kv, NODE_A)
        # The agent refused it; the planner asks the same layout again under a new id.
        again = await bus.publish(subject, NodePlanned(node=NODE_A, plan_id="plan-9-again", layout=layout))
        await handled(bus, again)
        # The same layout from the same ask, redelivered, writes nothing.
        await handled(
            bus, await bus.publish(subject, NodePlanned(node=NODE_A, plan_id="plan-9-again", layout=layout))
        )
    config, revision = await config_of(kv, NODE_A)
    assert (config.plan_id, config.plan_sequence) == ("plan-9-again", again)
    assert revision == first + 1
