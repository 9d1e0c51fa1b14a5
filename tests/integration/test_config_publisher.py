"""The config publisher on the in-memory bus, in virtual time: asks in, one KV config per node out.

The planner asks a node for a layout with `NodePlanned`; the publisher writes it as the node's
`NodeMpsConfig` (with compare-and-set on the key's revision) and announces it with
`NodeConfigPublished`. A config is never replaced by one from an older ask (its stream sequence is
`plan_sequence`), the same ask delivered again writes nothing, and a failure on one node never
keeps the others from being written. The bus and bucket are `MemoryBroker`'s, held to the same
contract as JetStream's (tests/contract).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from events import subjects
from events.bus import Delivery, StoredValue, TransientError
from events.memory import MemoryBroker, MemoryBus, MemoryConfigStore
from events.plans import NodeConfigPublished, NodeLayout, NodeMpsConfig, NodePlanned, SliceSpec
from services.config_publisher.service import DURABLE, ConfigPublisherService
from tests.memorybus import MemoryLog, virtual_broker, virtual_time
from tests.support import eventually

pytestmark = pytest.mark.anyio

NODE_A = "gpu-a.example.com"
NODE_B = "gpu-b"
NODE_C = "gpu-c"


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return virtual_time()


@pytest.fixture
def broker() -> MemoryBroker:
    return virtual_broker()


@pytest.fixture
def bus(broker: MemoryBroker) -> MemoryBus:
    return broker.bus("tests")


@pytest.fixture
def store(broker: MemoryBroker) -> MemoryConfigStore:
    return broker.configs


# --- asks and configs ---------------------------------------------------------------------------


def layout(*gpus: tuple[int, ...]) -> NodeLayout:
    return NodeLayout(
        gpus={index: tuple(SliceSpec(size_gb=s) for s in sizes) for index, sizes in enumerate(gpus)}
    )


async def ask(
    bus: MemoryBus, node: str, plan_id: str, asked: NodeLayout, message_id: str | None = None
) -> int:
    """Asks `node` for a layout as the planner does; returns the stream sequence."""
    return await bus.publish(
        subjects.planned_subject(node),
        NodePlanned(node=node, plan_id=plan_id, layout=asked),
        message_id=message_id or f"{node}/{plan_id}",
    )


def foreign_config(node: str, gpus: dict[int, tuple[int, ...]], plan_sequence: int) -> bytes:
    """A config written by someone else (another publisher, an operator)."""
    config = NodeMpsConfig(node=node, plan_id="foreign", plan_sequence=plan_sequence, gpus=gpus)
    return config.model_dump_json().encode()


def config_of(store: MemoryConfigStore, node: str) -> tuple[NodeMpsConfig, int]:
    """A node's config and the revision of its key."""
    stored = store.values[subjects.node_config_key(node)]
    return NodeMpsConfig.model_validate_json(stored.value), stored.revision


def announced(log: MemoryLog) -> list[tuple[str, str, int]]:
    """(node, plan id, revision) of every `NodeConfigPublished`, in order."""
    return [(e.node, e.plan_id, e.revision) for e in log.of(NodeConfigPublished)]


# --- harness ------------------------------------------------------------------------------------


@asynccontextmanager
async def publishing(bus: MemoryBus, service: ConfigPublisherService | None = None) -> AsyncIterator[None]:
    """The config publisher running in a task group, cancelled on exit."""
    running = service or ConfigPublisherService(bus)
    async with anyio.create_task_group() as group:
        group.start_soon(running.consume)
        yield
        group.cancel_scope.cancel()


async def handled(broker: MemoryBroker, sequence: int) -> None:
    """Until the publisher has settled every ask up to stream `sequence`."""
    await eventually(lambda: broker.settled(DURABLE, sequence), f"the asks up to sequence {sequence} settled")


def recording_handles(
    service: ConfigPublisherService, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[int, int]]:
    """(stream sequence, delivery count) of every ask handed to the service."""
    seen: list[tuple[int, int]] = []
    real_handle = service.handle

    async def handle(delivery: Delivery) -> None:
        seen.append((delivery.stream_sequence, delivery.deliveries))
        await real_handle(delivery)

    monkeypatch.setattr(service, "handle", handle)
    return seen


# --- tests --------------------------------------------------------------------------------------


async def test_an_ask_writes_the_nodes_config_and_announces_it(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore
) -> None:
    log = MemoryLog(broker)
    async with publishing(bus):
        a = await ask(bus, NODE_A, "plan-1", layout((10, 20), (40,)))
        b = await ask(bus, NODE_B, "plan-1", layout((5, 5, 5)))
        await handled(broker, b)

    config_a, revision_a = config_of(store, NODE_A)
    config_b, revision_b = config_of(store, NODE_B)
    assert (config_a.node, config_a.plan_id, config_a.plan_sequence, config_a.gpus) == (
        NODE_A,
        "plan-1",
        a,
        {0: (10, 20), 1: (40,)},
    )
    assert (config_b.plan_id, config_b.plan_sequence, config_b.gpus) == ("plan-1", b, {0: (5, 5, 5)})
    assert set(store.values) == {subjects.node_config_key(NODE_A), subjects.node_config_key(NODE_B)}
    assert announced(log) == [(NODE_A, "plan-1", revision_a), (NODE_B, "plan-1", revision_b)]
    assert [s for s, e in log.events if isinstance(e, NodeConfigPublished)] == [
        subjects.config_subject(NODE_A),
        subjects.config_subject(NODE_B),
    ]


async def test_the_same_ask_delivered_again_writes_nothing(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = ConfigPublisherService(bus)
    seen = recording_handles(service, monkeypatch)
    log = MemoryLog(broker)
    async with publishing(bus, service):
        first = await ask(bus, NODE_A, "plan-1", layout((10,)))
        await handled(broker, first)
        # The same ask as a new message (a publisher retried without its id): handled, not written.
        again = await ask(bus, NODE_A, "plan-1", layout((10,)), message_id="retried")
        await handled(broker, again)

    assert [sequence for sequence, _ in seen] == [first, again]
    assert len(store.history) == 1
    assert [plan_id for _, plan_id, _ in announced(log)] == ["plan-1"]


async def test_a_layout_asked_again_under_a_new_id_is_written_again_for_its_agent_to_answer(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore
) -> None:
    async with publishing(bus):
        await handled(broker, await ask(bus, NODE_A, "plan-9", layout((10, 20))))
        _, first = config_of(store, NODE_A)
        # The agent refused it; the planner asks the same layout again under a new id.
        again = await ask(bus, NODE_A, "plan-9-again", layout((10, 20)))
        await handled(broker, again)

    config, revision = config_of(store, NODE_A)
    assert (config.plan_id, config.plan_sequence) == ("plan-9-again", again)
    assert revision == first + 1


async def test_an_older_ask_redelivered_after_a_newer_one_never_replaces_its_config(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old ask's first delivery fails (a KV hiccup) and is retried after the newer ask was written."""
    real_get = store.get
    newer_asked = anyio.Event()
    failed = False

    async def flaky_get(key: str) -> StoredValue | None:
        nonlocal failed
        if not failed:
            failed = True
            await newer_asked.wait()
            raise TransientError("the bucket did not answer")
        return await real_get(key)

    monkeypatch.setattr(store, "get", flaky_get)
    service = ConfigPublisherService(bus)
    seen = recording_handles(service, monkeypatch)
    log = MemoryLog(broker)

    async with publishing(bus, service):
        old_sequence = await ask(bus, NODE_A, "plan-old", layout((10,)))
        await eventually(lambda: len(seen) == 1, "the first delivery of the older ask")
        new_sequence = await ask(bus, NODE_A, "plan-new", layout((10, 20)))
        newer_asked.set()
        await handled(broker, new_sequence)

    assert seen == [(old_sequence, 1), (new_sequence, 1), (old_sequence, 2)]
    config, _ = config_of(store, NODE_A)
    assert (config.plan_id, config.plan_sequence, config.gpus) == ("plan-new", new_sequence, {0: (10, 20)})
    assert [plan_id for _, plan_id, _ in announced(log)] == ["plan-new"]


async def test_an_older_layout_asked_again_as_a_new_message_is_the_desired_state_again(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore
) -> None:
    """The last ask on a node's subject is its desired state (what a restarted publisher starts
    from), so an old ask *published again* is newer than the ask before it."""
    async with publishing(bus):
        old_sequence = await ask(bus, NODE_A, "plan-old", layout((10,)))
        await handled(broker, old_sequence)
        new_sequence = await ask(bus, NODE_A, "plan-new", layout((10, 20)))
        await handled(broker, new_sequence)
        # The same message again is de-duplicated: nothing new to deliver.
        assert await ask(bus, NODE_A, "plan-old", layout((10,))) == old_sequence
        again = await ask(bus, NODE_A, "plan-old", layout((10,)), message_id="plan-old-again")
        assert again > new_sequence
        await handled(broker, again)

    config, _ = config_of(store, NODE_A)
    assert (config.plan_id, config.plan_sequence, config.gpus) == ("plan-old", again, {0: (10,)})


async def test_a_config_written_before_the_ask_is_updated_with_compare_and_set(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore
) -> None:
    written = await store.put(subjects.node_config_key(NODE_A), foreign_config(NODE_A, {0: (40,)}, 0))
    log = MemoryLog(broker)

    async with publishing(bus):
        sequence = await ask(bus, NODE_A, "plan-1", layout((10, 20)))
        await handled(broker, sequence)

    config, revision = config_of(store, NODE_A)
    assert (config.plan_id, config.plan_sequence, config.gpus) == ("plan-1", sequence, {0: (10, 20)})
    assert revision == written + 1
    assert announced(log) == [(NODE_A, "plan-1", revision)]


async def test_a_write_between_the_publishers_read_and_its_update_is_retried(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = subjects.node_config_key(NODE_A)
    await store.put(key, foreign_config(NODE_A, {0: (40,)}, 0))
    real_get = store.get
    reads: list[int | None] = []
    racer_revisions: list[int] = []

    async def racing_get(wanted: str) -> StoredValue | None:
        stored = await real_get(wanted)
        reads.append(stored.revision if stored is not None else None)
        if len(reads) == 1:  # someone else writes right after the publisher's first read
            racer_revisions.append(await store.put(key, foreign_config(NODE_A, {0: (30,)}, 0)))
        return stored

    monkeypatch.setattr(store, "get", racing_get)
    log = MemoryLog(broker)

    async with publishing(bus):
        await handled(broker, await ask(bus, NODE_A, "plan-1", layout((10, 20))))

    assert len(reads) == 2
    assert reads[1] == racer_revisions[0]
    config, revision = config_of(store, NODE_A)
    assert (config.plan_id, config.gpus) == ("plan-1", {0: (10, 20)})
    assert revision == racer_revisions[0] + 1
    history = [NodeMpsConfig.model_validate_json(v.value).gpus for v in store.history if v.key == key]
    assert history == [{0: (40,)}, {0: (30,)}, {0: (10, 20)}]
    assert announced(log) == [(NODE_A, "plan-1", revision)]


async def test_a_racing_write_from_a_later_ask_is_not_overwritten(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_get = store.get
    later = foreign_config(NODE_A, {0: (30,)}, plan_sequence=1_000_000)
    raced = False

    async def racing_get(key: str) -> StoredValue | None:
        nonlocal raced
        try:
            return await real_get(key)
        finally:
            if not raced:
                raced = True
                await store.put(key, later)

    monkeypatch.setattr(store, "get", racing_get)
    log = MemoryLog(broker)

    async with publishing(bus):
        await handled(broker, await ask(bus, NODE_A, "plan-1", layout((10, 20))))

    assert store.values[subjects.node_config_key(NODE_A)].value == later
    assert announced(log) == []


def counting_reads(store: MemoryConfigStore, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key of every read of the bucket."""
    reads: list[str] = []
    real_get = store.get

    async def get(key: str) -> StoredValue | None:
        reads.append(key)
        return await real_get(key)

    monkeypatch.setattr(store, "get", get)
    return reads


async def test_a_nodes_next_ask_is_written_over_the_publishers_own_config_without_reading_it(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = counting_reads(store, monkeypatch)
    log = MemoryLog(broker)

    async with publishing(bus):
        await handled(broker, await ask(bus, NODE_A, "plan-1", layout((10,))))
        first = config_of(store, NODE_A)[1]
        sequence = await ask(bus, NODE_A, "plan-2", layout((10, 20)))
        await handled(broker, sequence)

    assert reads == [subjects.node_config_key(NODE_A)]  # the first ask's only
    config, revision = config_of(store, NODE_A)
    assert (config.plan_id, config.plan_sequence, config.gpus) == ("plan-2", sequence, {0: (10, 20)})
    assert announced(log) == [(NODE_A, "plan-1", first), (NODE_A, "plan-2", revision)]


async def test_a_key_written_by_someone_else_since_the_publishers_write_is_read_before_the_next(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = subjects.node_config_key(NODE_A)
    later = foreign_config(NODE_A, {0: (30,)}, plan_sequence=1_000_000)
    reads = counting_reads(store, monkeypatch)
    log = MemoryLog(broker)

    async with publishing(bus):
        first = await ask(bus, NODE_A, "plan-1", layout((10,)))
        await handled(broker, first)
        await store.put(key, later)  # another publisher, from a later ask
        await handled(broker, await ask(bus, NODE_A, "plan-2", layout((10, 20))))

    assert store.values[key].value == later  # the compare-and-set failed; the read kept it
    assert reads == [key, key]
    assert [plan for _, plan, _ in announced(log)] == ["plan-1"]


async def test_a_deleted_config_is_written_again_by_the_next_ask(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore
) -> None:
    async with publishing(bus):
        await handled(broker, await ask(bus, NODE_A, "plan-1", layout((10,))))
        await store.delete(subjects.node_config_key(NODE_A))
        sequence = await ask(bus, NODE_A, "plan-2", layout((10,)))
        await handled(broker, sequence)

    config, _ = config_of(store, NODE_A)
    assert (config.plan_id, config.plan_sequence, config.gpus) == ("plan-2", sequence, {0: (10,)})


async def test_an_unreadable_config_is_replaced_at_the_first_delivery(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key holding bytes that are not a `NodeMpsConfig` (written by another version, say, since the
    models forbid unknown fields) is overwritten with compare-and-set like a missing one."""
    await store.put(subjects.node_config_key(NODE_B), b"garbage")
    service = ConfigPublisherService(bus)
    seen = recording_handles(service, monkeypatch)

    async with publishing(bus, service):
        sequence = await ask(bus, NODE_B, "plan-1", layout((10,)))
        await handled(broker, sequence)

    assert config_of(store, NODE_B)[0].plan_id == "plan-1"
    assert seen == [(sequence, 1)]


async def test_a_node_whose_config_cannot_be_written_keeps_no_other_node_waiting(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_get = store.get
    broken = subjects.node_config_key(NODE_A)

    async def get_failing_for_a(key: str) -> StoredValue | None:
        if key == broken:
            raise TransientError("this node's key is unreachable")
        return await real_get(key)

    monkeypatch.setattr(store, "get", get_failing_for_a)
    log = MemoryLog(broker)

    async with publishing(bus):
        await ask(bus, NODE_A, "plan-1", layout((10,)))
        await ask(bus, NODE_B, "plan-1", layout((20,)))
        await ask(bus, NODE_C, "plan-1", layout((40,)))
        await eventually(lambda: {n for n, _, _ in announced(log)} == {NODE_B, NODE_C}, "the other configs")
        assert subjects.node_config_key(NODE_A) not in store.values
        # Node A's ask is retried with growing delays, then recorded as a dead letter.
        await eventually(lambda: bool(broker.dead), "node A's ask dead-lettered", timeout_s=60)

    assert [(letter.subject, letter.deliveries) for letter in broker.dead] == [
        (subjects.planned_subject(NODE_A), 5)
    ]


async def test_a_node_whose_bucket_answers_slowly_holds_up_no_other_nodes_write(
    bus: MemoryBus, broker: MemoryBroker, store: MemoryConfigStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan asks many nodes at once: each node's write goes out without waiting on the others'."""
    real_get = store.get
    slow = subjects.node_config_key(NODE_A)
    others_written = anyio.Event()

    async def get_waiting_for_the_others(key: str) -> StoredValue | None:
        if key == slow:
            await others_written.wait()  # handled one after the other, this would never end
        return await real_get(key)

    monkeypatch.setattr(store, "get", get_waiting_for_the_others)
    log = MemoryLog(broker)

    async with publishing(bus):
        await ask(bus, NODE_A, "plan-1", layout((10,)))
        await ask(bus, NODE_B, "plan-1", layout((20,)))
        await ask(bus, NODE_C, "plan-1", layout((40,)))
        await ask(bus, NODE_A, "plan-2", layout((10, 10)))
        await eventually(lambda: {n for n, _, _ in announced(log)} == {NODE_B, NODE_C}, "the other configs")
        others_written.set()
        await eventually(lambda: len(announced(log)) == 4, "node A's configs")

    assert [(n, p) for n, p, _ in announced(log) if n == NODE_A] == [(NODE_A, "plan-1"), (NODE_A, "plan-2")]
    assert config_of(store, NODE_A)[0].plan_id == "plan-2"
