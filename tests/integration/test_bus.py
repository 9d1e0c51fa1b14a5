"""The JetStream adapter against a real nats-server: publish, consume, de-duplicate, redeliver,
dead-letter."""

from __future__ import annotations

import sys

import anyio
import pytest

from events import subjects
from events.jetstream import Delivery, EventBus
from events.nodes import NodeOptedOut
from events.pods import PodDeleted
from simulation.nats_server import LocalNatsServer

pytestmark = pytest.mark.anyio


def deleted(name: str) -> PodDeleted:
    return PodDeleted(namespace="default", name=name, uid=f"uid-{name}")


async def collect(
    bus: EventBus, durable: str, count: int, *, fail_first: bool = False, ack_wait: float = 30
) -> list[Delivery]:
    """Consume until `count` deliveries were handled successfully."""
    seen: list[Delivery] = []
    failed: set[int] = set()
    done = anyio.Event()

    async def handle(delivery: Delivery) -> None:
        if fail_first and delivery.stream_sequence not in failed:
            failed.add(delivery.stream_sequence)
            raise RuntimeError("simulated handler failure")
        seen.append(delivery)
        if len(seen) >= count:
            done.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: bus.consume(
                    durable=durable, filter_subjects=[subjects.POD_EVENTS], handle=handle, ack_wait=ack_wait
                )
            )
            await done.wait()
            group.cancel_scope.cancel()
    return seen


async def all_acked(bus: EventBus, durable: str) -> None:
    """Acks are fire-and-forget: wait (boundedly) until the server has seen every one of them."""
    for _ in range(250):
        if not (await bus.js.consumer_info(subjects.STREAM, durable)).num_ack_pending:
            return
        await anyio.sleep(0.02)
    raise AssertionError(f"{durable} still has unacknowledged messages after 5 s")


async def test_published_events_arrive_typed_with_trace_headers(bus: EventBus) -> None:
    await bus.publish(subjects.pod_subject("default", "a"), deleted("a"))
    await bus.publish(subjects.pod_subject("default", "b.c"), deleted("b.c"))

    seen = await collect(bus, "reader", 2)

    assert [d.envelope.event for d in seen] == [deleted("a"), deleted("b.c")]
    assert seen[1].subject == "mpsflow.pod.default.b_2Ec"
    assert all(d.envelope.source == "tests" for d in seen)
    assert all("Nats-Msg-Id" in d.headers for d in seen)


async def test_same_message_id_is_stored_once(bus: EventBus) -> None:
    first = await bus.publish(subjects.pod_subject("default", "a"), deleted("a"), message_id="uid-a/7")
    again = await bus.publish(subjects.pod_subject("default", "a"), deleted("a"), message_id="uid-a/7")
    other = await bus.publish(subjects.pod_subject("default", "a"), deleted("a"), message_id="uid-a/8")

    assert first == again
    assert other == first + 1
    info = await bus.js.stream_info(subjects.STREAM)
    assert info.state.messages == 2


async def test_a_failed_handling_is_redelivered_and_then_acked(bus: EventBus) -> None:
    await bus.publish(subjects.pod_subject("default", "a"), deleted("a"))

    seen = await collect(bus, "flaky", 1, fail_first=True)

    assert seen[0].envelope.event == deleted("a")
    assert seen[0].deliveries == 2
    await all_acked(bus, "flaky")


DYING_CONSUMER = """
import sys, anyio
from events import subjects
from events.jetstream import EventBus

async def main() -> None:
    bus = await EventBus.connect(sys.argv[1], source="dying")
    async def handle(delivery):
        print("handling", flush=True)
        await anyio.sleep_forever()
    await bus.consume(durable="mortal", filter_subjects=[subjects.POD_EVENTS], handle=handle, ack_wait=1)

anyio.run(main)
"""


async def test_a_consumer_killed_before_acking_gets_the_message_again(
    bus: EventBus, nats_server: LocalNatsServer
) -> None:
    await bus.publish(subjects.pod_subject("default", "a"), deleted("a"))
    process = await anyio.open_process([sys.executable, "-c", DYING_CONSUMER, nats_server.url])
    try:
        assert process.stdout is not None
        with anyio.fail_after(10):
            assert b"handling" in await process.stdout.receive()
    finally:
        process.kill()
        await process.wait()
        await process.aclose()

    seen = await collect(bus, "mortal", 1, ack_wait=1)
    assert seen[0].envelope.event == deleted("a")
    assert seen[0].deliveries == 2


async def test_malformed_message_is_terminated_recorded_and_consumption_goes_on(bus: EventBus) -> None:
    await bus.js.publish(subjects.pod_subject("default", "bad"), b'{"id": "x", "event": {"kind": "Nope"}}')
    await bus.js.publish(subjects.pod_subject("default", "worse"), b"\xff not json")
    await bus.publish(subjects.pod_subject("default", "good"), deleted("good"))

    seen = await collect(bus, "strict", 1)

    assert seen[0].envelope.event == deleted("good")
    letters = await bus.dead_letters("strict")
    assert [letter.subject for letter in letters] == ["mpsflow.pod.default.bad", "mpsflow.pod.default.worse"]
    assert letters[1].data() == b"\xff not json"
    assert "undecodable" in letters[0].error
    await all_acked(bus, "strict")


async def test_last_per_subject_gives_the_current_level(bus: EventBus) -> None:
    node = subjects.node_subject("gpu-1.example.com")
    await bus.publish(node, NodeOptedOut(name="gpu-1.example.com", reason="first"))
    await bus.publish(node, NodeOptedOut(name="gpu-1.example.com", reason="second"))
    levels: list[str] = []
    done = anyio.Event()

    async def handle(delivery: Delivery) -> None:
        assert isinstance(delivery.envelope.event, NodeOptedOut)
        levels.append(delivery.envelope.event.reason)
        done.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: bus.consume(
                    durable="levels",
                    filter_subjects=[subjects.NODE_EVENTS],
                    handle=handle,
                    deliver_from="last_per_subject",
                )
            )
            await done.wait()
            # A later message proves the consumer is past everything the stream held before it.
            done = anyio.Event()
            await bus.publish(subjects.node_subject("gpu-2"), NodeOptedOut(name="gpu-2", reason="later"))
            await done.wait()
            group.cancel_scope.cancel()
    assert levels == ["second", "later"]
