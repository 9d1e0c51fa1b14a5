"""The bus port's behaviour, held against both adapters: JetStream on a real nats-server, and memory.

Every service relies on these rules (see `events/bus.py`); a service test that runs on the
in-memory bus is only worth something because the in-memory bus passes the same suite as the real
one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import pytest

from events import subjects
from events.bus import Bus, Delivery, PermanentError, RevisionConflictError, StoredValue, TransientError
from events.memory import MemoryBroker
from events.nodes import NodeOptedOut
from events.pods import PodDeleted
from simulation.nats_server import LocalNatsServer
from tests.natsbus import bootstrapped_bus
from tests.support import eventually

pytestmark = pytest.mark.anyio

WAIT = 10.0


@pytest.fixture(params=["jetstream", "memory"])
async def any_bus(request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    if request.param == "memory":
        yield MemoryBroker().bus("tests")
        return
    with LocalNatsServer() as server:
        connected = await bootstrapped_bus(server)
        try:
            yield connected
        finally:
            await connected.close()


def deleted(name: str) -> PodDeleted:
    return PodDeleted(namespace="default", name=name, uid=f"uid-{name}")


def pod(name: str) -> str:
    return subjects.pod_subject("default", name)


async def consume_until(
    bus: Bus,
    durable: str,
    done: Callable[[list[Delivery]], bool],
    handle: Callable[[Delivery], Awaitable[None]] | None = None,
    **options: object,
) -> list[Delivery]:
    """Run a consumer of pod events until `done(handled)`; `handle` may raise to refuse a delivery."""
    handled: list[Delivery] = []
    finished = anyio.Event()

    async def record(delivery: Delivery) -> None:
        if handle is not None:
            await handle(delivery)
        handled.append(delivery)
        if done(handled):
            finished.set()

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: bus.consume(
                    durable=durable,
                    filter_subjects=[subjects.POD_EVENTS],
                    handle=record,
                    **options,  # type: ignore[arg-type]
                )
            )
            await finished.wait()
            group.cancel_scope.cancel()
    return handled


def names(deliveries: list[Delivery]) -> list[str]:
    return [d.envelope.event.name for d in deliveries if isinstance(d.envelope.event, PodDeleted)]


async def test_events_arrive_typed_in_order_with_their_id(any_bus: Bus) -> None:
    first = await any_bus.publish(pod("a"), deleted("a"), message_id="id-a")
    await any_bus.publish(pod("b.c"), deleted("b.c"))

    seen = await consume_until(any_bus, "reader", lambda h: len(h) == 2)

    assert names(seen) == ["a", "b.c"]
    assert seen[0].stream_sequence == first
    assert seen[0].envelope.id == "id-a"
    assert seen[1].subject == "mpsflow.pod.default.b_2Ec"
    assert all(d.envelope.source == "tests" and d.deliveries == 1 for d in seen)


async def test_the_same_message_id_is_stored_once(any_bus: Bus) -> None:
    first = await any_bus.publish(pod("a"), deleted("a"), message_id="uid-a/7")
    again = await any_bus.publish(pod("a"), deleted("a"), message_id="uid-a/7")
    other = await any_bus.publish(pod("a"), deleted("a"), message_id="uid-a/8")

    assert first == again
    assert other == first + 1
    assert len(await any_bus.everything(subjects.POD_EVENTS)) == 2


async def test_events_sent_without_waiting_are_stored_in_the_order_sent_once_per_id(any_bus: Bus) -> None:
    sent = [  # three pods, 50 events each (the stream keeps 64 a subject)
        await any_bus.publish_soon(pod(f"p{n % 3}"), deleted(f"a{n % 150}"), message_id=f"uid/{n % 150}")
        for n in range(300)
    ]
    sequences = [await publishing.stored() for publishing in sent]

    assert sequences[:150] == sorted(sequences[:150]) and len(set(sequences[:150])) == 150
    assert sequences[150:] == sequences[:150]  # sent again with the same ids: stored once
    stored = await any_bus.everything(subjects.POD_EVENTS)
    assert [e.event.name for e in stored if isinstance(e.event, PodDeleted)] == [f"a{n}" for n in range(150)]


async def test_subjects_apart_handles_subjects_at_once_each_in_order(any_bus: Bus) -> None:
    for n in range(3):
        await any_bus.publish(pod("slow"), deleted(f"slow-{n}"))
    quick_done = anyio.Event()

    async def slow_waits_for_quick(delivery: Delivery) -> None:
        [name] = names([delivery])
        if name == "slow-0":  # published while it is handled: fetched after it, handled before it ends
            for n in range(3):
                await any_bus.publish(pod("quick"), deleted(f"quick-{n}"))
            await quick_done.wait()
        if name == "quick-2":
            quick_done.set()

    seen = await consume_until(
        any_bus, "apart", lambda h: len(h) == 6, slow_waits_for_quick, subjects_apart=True
    )

    assert names(seen) == ["quick-0", "quick-1", "quick-2", "slow-0", "slow-1", "slow-2"]


async def test_subjects_apart_cannot_go_with_after_batch(any_bus: Bus) -> None:
    async def after_batch() -> None: ...

    async def handle(delivery: Delivery) -> None: ...

    with pytest.raises(ValueError, match="after_batch"):
        await any_bus.consume(
            durable="apart",
            filter_subjects=[subjects.POD_EVENTS],
            handle=handle,
            subjects_apart=True,
            after_batch=after_batch,
        )


async def test_an_unexpected_failure_is_handed_again_then_acked(any_bus: Bus) -> None:
    await any_bus.publish(pod("a"), deleted("a"))
    await any_bus.publish(pod("b"), deleted("b"))
    failed: list[int] = []

    async def fail_a_once(delivery: Delivery) -> None:
        if names([delivery]) == ["a"] and not failed:
            failed.append(delivery.deliveries)
            raise RuntimeError("simulated handler failure")

    seen = await consume_until(any_bus, "flaky", lambda h: "a" in names(h), fail_a_once)

    assert failed == [1]
    assert [(n, d.deliveries) for n, d in zip(names(seen), seen, strict=True)] == [("b", 1), ("a", 2)]
    assert await any_bus.dead_letters("flaky") == []


async def test_a_transient_failure_is_handed_again_after_its_delay(any_bus: Bus) -> None:
    await any_bus.publish(pod("a"), deleted("a"))
    refused_at: list[float] = []

    async def not_yet(delivery: Delivery) -> None:
        if not refused_at:
            refused_at.append(anyio.current_time())
            raise TransientError("the API is away", retry_after=0.5)

    seen = await consume_until(any_bus, "patient", lambda h: len(h) == 1, not_yet)

    assert seen[0].deliveries == 2
    assert anyio.current_time() - refused_at[0] >= 0.45


async def test_a_permanent_failure_is_dead_lettered_at_once_and_consumption_goes_on(any_bus: Bus) -> None:
    await any_bus.publish(pod("doomed"), deleted("doomed"))
    await any_bus.publish(pod("fine"), deleted("fine"))
    attempts: list[str] = []

    async def refuse_doomed(delivery: Delivery) -> None:
        attempts.extend(names([delivery]))
        if names([delivery]) == ["doomed"]:
            raise PermanentError("names a GPU that cannot exist")

    seen = await consume_until(any_bus, "strict", lambda h: len(h) == 1, refuse_doomed)

    assert names(seen) == ["fine"]
    assert attempts == ["doomed", "fine"]
    letters = await any_bus.dead_letters("strict")
    assert [(letter.subject, letter.deliveries) for letter in letters] == [(pod("doomed"), 1)]
    assert letters[0].error == "permanent: names a GPU that cannot exist"


async def test_undecodable_messages_are_dead_lettered_with_their_bytes(any_bus: Bus) -> None:
    await any_bus.publish_bytes(pod("bad"), b'{"id": "x", "event": {"kind": "Nope"}}')
    await any_bus.publish_bytes(pod("worse"), b"\xff not json")
    await any_bus.publish(pod("good"), deleted("good"))

    seen = await consume_until(any_bus, "reader", lambda h: len(h) == 1)

    assert names(seen) == ["good"]
    letters = await any_bus.dead_letters("reader")
    assert [letter.subject for letter in letters] == [pod("bad"), pod("worse")]
    assert letters[1].data() == b"\xff not json"
    assert all(letter.error.startswith("undecodable") for letter in letters)


async def test_a_message_that_keeps_failing_is_dead_lettered_after_max_deliver(any_bus: Bus) -> None:
    await any_bus.publish(pod("cursed"), deleted("cursed"))
    await any_bus.publish(pod("after"), deleted("after"))
    tries = 0

    async def always_fail_cursed(delivery: Delivery) -> None:
        nonlocal tries
        if names([delivery]) == ["cursed"]:
            tries += 1
            raise TransientError("still broken", retry_after=0.05)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: any_bus.consume(
                    durable="stubborn",
                    filter_subjects=[subjects.POD_EVENTS],
                    handle=always_fail_cursed,
                    max_deliver=3,
                )
            )

            async def dead_lettered() -> bool:
                return bool(await any_bus.dead_letters("stubborn"))

            await eventually(dead_lettered, "the dead letter")
            group.cancel_scope.cancel()

    letters = await any_bus.dead_letters("stubborn")
    assert [(letter.subject, letter.deliveries) for letter in letters] == [(pod("cursed"), 3)]
    assert letters[0].error.startswith("failed 3 times: TransientError")
    assert tries == 3


async def test_last_per_subject_gives_the_current_level_then_what_comes(any_bus: Bus) -> None:
    node = subjects.node_subject("gpu-1.example.com")
    await any_bus.publish(node, NodeOptedOut(name="gpu-1.example.com", reason="first"))
    await any_bus.publish(node, NodeOptedOut(name="gpu-1.example.com", reason="second"))
    reasons: list[str] = []

    async def handle(delivery: Delivery) -> None:
        assert isinstance(delivery.envelope.event, NodeOptedOut)
        reasons.append(delivery.envelope.event.reason)

    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: any_bus.consume(
                    durable="levels",
                    filter_subjects=[subjects.NODE_EVENTS],
                    handle=handle,
                    deliver_from="last_per_subject",
                )
            )
            await eventually(lambda: reasons == ["second"], "the current level")
            await any_bus.publish(subjects.node_subject("gpu-2"), NodeOptedOut(name="gpu-2", reason="later"))
            await eventually(lambda: reasons == ["second", "later"], "the message published after")
            group.cancel_scope.cancel()
    assert [e.event.reason for e in await any_bus.current_levels(subjects.NODE_EVENTS)] == [  # type: ignore[union-attr]
        "second",
        "later",
    ]


async def test_a_durable_consumer_resumes_where_it_stopped_unless_reset(any_bus: Bus) -> None:
    await any_bus.publish(pod("a"), deleted("a"))
    assert names(await consume_until(any_bus, "durable", lambda h: len(h) == 1)) == ["a"]
    await any_bus.publish(pod("b"), deleted("b"))

    assert await any_bus.pending("durable") == 1
    assert names(await consume_until(any_bus, "durable", lambda h: len(h) == 1)) == ["b"]
    assert names(await consume_until(any_bus, "durable", lambda h: len(h) == 2, reset=True)) == ["a", "b"]
    assert await any_bus.pending("durable") == 0


async def test_pending_counts_what_the_consumer_has_yet_to_be_handed(any_bus: Bus) -> None:
    for name in ("a", "b", "c"):
        await any_bus.publish(pod(name), deleted(name))

    seen = await consume_until(any_bus, "counting", lambda h: len(h) == 3, batch=1)

    assert [d.pending for d in seen] == [2, 1, 0]


async def test_the_config_store_writes_by_compare_and_set_and_watches_in_order(any_bus: Bus) -> None:
    store = await any_bus.node_configs()
    key = subjects.node_config_key("gpu-1")
    assert await store.get(key) is None

    first = await store.create(key, b"one")
    with pytest.raises(RevisionConflictError):
        await store.create(key, b"again")
    with pytest.raises(RevisionConflictError):
        await store.update(key, b"stale", last=first + 100)
    second = await store.update(key, b"two", last=first)

    assert second > first
    assert await store.get(key) == StoredValue(key, b"two", second)

    seen: list[bytes] = []
    with anyio.fail_after(WAIT):
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                async for stored in store.watch(key):
                    seen.append(stored.value)

            group.start_soon(watch)
            await eventually(lambda: seen == [b"two"], "the current value")
            third = await store.update(key, b"three", last=second)
            await store.update(key, b"four", last=third)
            await eventually(lambda: seen == [b"two", b"three", b"four"], "every later value, in order")
            group.cancel_scope.cancel()
