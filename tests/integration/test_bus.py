"""What only the JetStream adapter can show, on a real nats-server: the headers it sends, acks
that reach the server, and redelivery to a consumer whose process died before acking. The rules
both adapters share are in tests/contract/test_bus_contract.py."""

from __future__ import annotations

import sys

import anyio
import pytest

from events import subjects
from events.bus import Delivery
from events.jetstream import EventBus
from events.pods import PodDeleted
from simulation.nats_server import LocalNatsServer
from tests.support import eventually

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

    async def none_pending() -> bool:
        return not (await bus.js.consumer_info(subjects.STREAM, durable)).num_ack_pending

    await eventually(none_pending, f"the server to see every ack of {durable}")


async def test_published_events_arrive_typed_with_trace_headers(bus: EventBus) -> None:
    await bus.publish(subjects.pod_subject("default", "a"), deleted("a"))
    await bus.publish(subjects.pod_subject("default", "b.c"), deleted("b.c"))

    seen = await collect(bus, "reader", 2)

    assert [d.envelope.event for d in seen] == [deleted("a"), deleted("b.c")]
    assert seen[1].subject == "mpsflow.pod.default.b_2Ec"
    assert all(d.envelope.source == "tests" for d in seen)
    assert all("Nats-Msg-Id" in d.headers for d in seen)


async def test_a_failed_handling_is_redelivered_and_then_acked(bus: EventBus) -> None:
    await bus.publish(subjects.pod_subject("default", "a"), deleted("a"))

    seen = await collect(bus, "flaky", 1, fail_first=True)

    assert seen[0].envelope.event == deleted("a")
    assert seen[0].deliveries == 2
    await all_acked(bus, "flaky")


DYING_CONSUMER = """
import sys, anyio
from events import subjects
from events.jetstream import EventBus, NatsOptions

async def main() -> None:
    bus = await EventBus.connect(NatsOptions(sys.argv[1], "admin"), source="dying")
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
