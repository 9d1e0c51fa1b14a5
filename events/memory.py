"""The in-memory adapter of the bus port: one process's stand-in for NATS JetStream.

`MemoryBroker` plays the server (the event stream, durable consumers, dead letters and the
node-config bucket); `MemoryBus` is one service's connection to it, and implements `events.bus.Bus`
to the same behavioural suite as the JetStream adapter (tests/contract/test_bus_contract.py):
de-duplication by message id, ack after the effect, redelivery after a delay, dead letters, and
last-per-subject replay. Settling a message is `events.bus.deliver`, the same code as JetStream's.

Every wait is on the event loop's clock (`anyio.current_time`), never on the wall clock, so tests
that run services over it can run in virtual time. Where it differs from the real server, on
purpose: nothing is persisted; a subject keeps its last `max_msgs_per_subject` messages but nothing
ages out; a consumer's batch is what is due at once (no fetch timeout); messages are never lost
between publisher and stream. It also lets a test make publishes fail (`fail_publishes`), which
the real server does only by breaking. Never used in production.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import anyio
import anyio.lowlevel

from events.bus import (
    BusUnavailableError,
    DeliverFrom,
    Handler,
    RevisionConflictError,
    StoredValue,
    SubjectLanes,
    deliver,
    settle_batch,
)
from events.envelope import DeadLetter, Envelope, Event, UndecodableMessageError, content_id, decode, encode
from events.tracing import inject, publishing

log = logging.getLogger(__name__)


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` is one or more."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for index, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > index
        if index >= len(tokens) or (token != "*" and token != tokens[index]):
            return False
    return len(tokens) == len(wanted)


def wall_clock() -> datetime:
    return datetime.now(UTC)


@dataclass
class StoredMessage:
    sequence: int
    subject: str
    data: bytes
    headers: dict[str, str]

    def envelope(self) -> Envelope | None:
        try:
            return decode(self.data)
        except UndecodableMessageError:
            return None


@dataclass
class _Consumer:
    filters: tuple[str, ...]
    backlog: deque[int]  # sequences to hand out first (the last of each subject, for last_per_subject)
    next_sequence: int  # then every matching message from this sequence on
    deliveries: dict[int, int] = field(default_factory=dict)
    redeliver: dict[int, float] = field(default_factory=dict)  # sequence -> loop time it is due

    def wants(self, subject: str) -> bool:
        return any(subject_matches(f, subject) for f in self.filters)


class MemoryBroker:
    """The stream, the consumers, the dead letters and the node-config bucket, in memory."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] = wall_clock,
        max_msgs_per_subject: int = 64,
        duplicate_window: float = 120.0,
    ) -> None:
        self.clock = clock
        self.max_msgs_per_subject = max_msgs_per_subject
        self.duplicate_window = duplicate_window
        self.messages: dict[int, StoredMessage] = {}
        self.last_sequence = 0
        self.dead: list[DeadLetter] = []
        self.configs = MemoryConfigStore()
        self.leases = MemoryConfigStore()
        self._ids: dict[str, tuple[int, float]] = {}
        self._consumers: dict[str, _Consumer] = {}
        self._changed = anyio.Event()
        self._work = anyio.Event()
        """Set when a consumer may have something new to hand out: a message stored, or one put back."""
        self._failures_to_inject = 0

    def bus(self, source: str) -> MemoryBus:
        return MemoryBus(self, source)

    def fail_publishes(self, count: int) -> None:
        """The next `count` publishes fail as if the server were unreachable."""
        self._failures_to_inject = count

    def store(self, subject: str, data: bytes, headers: dict[str, str]) -> int:
        if self._failures_to_inject > 0:
            self._failures_to_inject -= 1
            raise BusUnavailableError("the in-memory broker was told to fail this publish")
        now = anyio.current_time()
        message_id = headers.get("Nats-Msg-Id")
        if message_id is not None:
            known = self._ids.get(message_id)
            if known is not None and now - known[1] <= self.duplicate_window:
                return known[0]
        self.last_sequence += 1
        self.messages[self.last_sequence] = StoredMessage(self.last_sequence, subject, data, headers)
        if message_id is not None:
            self._ids[message_id] = (self.last_sequence, now)
        same_subject = [s for s, m in self.messages.items() if m.subject == subject]
        for old in same_subject[: max(0, len(same_subject) - self.max_msgs_per_subject)]:
            del self.messages[old]
        self._changed.set()
        self._changed = anyio.Event()
        self._new_work()
        return self.last_sequence

    def _new_work(self) -> None:
        self._work.set()
        self._work = anyio.Event()

    async def next_store(self) -> None:
        """Until the next message is stored."""
        await self._changed.wait()

    def settled(self, durable: str, sequence: int) -> bool:
        """Every message up to stream `sequence` for the durable consumer was handed out and acked or
        terminated (none in flight, none waiting to be handed again)."""
        consumer = self._consumers.get(durable)
        return (
            consumer is not None
            and consumer.next_sequence > sequence
            and not any(s <= sequence for s in consumer.backlog)
            and not any(s <= sequence for s in consumer.deliveries)
        )

    def stored(self, filter_subject: str = ">") -> list[StoredMessage]:
        """What the stream holds under `filter_subject`, in stream order."""
        return [m for _, m in sorted(self.messages.items()) if subject_matches(filter_subject, m.subject)]

    def _consumer(
        self, durable: str, filters: Sequence[str], deliver_from: DeliverFrom, reset: bool
    ) -> _Consumer:
        if reset:
            self._consumers.pop(durable, None)
        existing = self._consumers.get(durable)
        if existing is not None:
            return existing
        consumer = _Consumer(tuple(filters), deque(), 1)
        if deliver_from == "new":
            consumer.next_sequence = self.last_sequence + 1
        elif deliver_from == "last_per_subject":
            last: dict[str, int] = {}
            for sequence, message in sorted(self.messages.items()):
                if consumer.wants(message.subject):
                    last[message.subject] = sequence
            consumer.backlog.extend(sorted(last.values()))
            consumer.next_sequence = self.last_sequence + 1
        self._consumers[durable] = consumer
        return consumer

    def _pending(self, consumer: _Consumer) -> int:
        backlog = sum(1 for s in consumer.backlog if s in self.messages)
        fresh = sum(
            1 for s, m in self.messages.items() if s >= consumer.next_sequence and consumer.wants(m.subject)
        )
        return backlog + fresh

    def _due(self, consumer: _Consumer, limit: int) -> list[int]:
        """The sequences to hand out now: redeliveries that are due, then the backlog, then new ones."""
        now = anyio.current_time()
        due = sorted(s for s, when in consumer.redeliver.items() if when <= now)[:limit]
        for sequence in due:
            del consumer.redeliver[sequence]
        while len(due) < limit and consumer.backlog:
            sequence = consumer.backlog.popleft()
            if sequence in self.messages:
                due.append(sequence)
        while len(due) < limit and consumer.next_sequence <= self.last_sequence:
            sequence = consumer.next_sequence
            consumer.next_sequence += 1
            message = self.messages.get(sequence)
            if message is not None and consumer.wants(message.subject):
                due.append(sequence)
        return [s for s in due if s in self.messages]

    async def _wait_for_work(self, consumer: _Consumer) -> None:
        """Until a message is published, put back, or a redelivery falls due."""
        work = self._work
        timeout = None
        if consumer.redeliver:
            timeout = max(0.0, min(consumer.redeliver.values()) - anyio.current_time())
        with anyio.move_on_after(timeout):
            await work.wait()


class _Handed:
    """A stored message handed to a consumer, as `events.bus.deliver` settles it."""

    def __init__(self, broker: MemoryBroker, consumer: _Consumer, message: StoredMessage) -> None:
        self._broker = broker
        self._consumer = consumer
        self._message = message
        self.deliveries = consumer.deliveries[message.sequence]
        self.pending = broker._pending(consumer)

    @property
    def subject(self) -> str:
        return self._message.subject

    @property
    def data(self) -> bytes:
        return self._message.data

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._message.headers)

    @property
    def stream_sequence(self) -> int:
        return self._message.sequence

    async def ack(self) -> None:
        self._consumer.deliveries.pop(self._message.sequence, None)

    async def nak(self, delay: float) -> None:
        self._consumer.redeliver[self._message.sequence] = anyio.current_time() + delay
        self._broker._new_work()  # a consumer waiting since before must wait for this one too

    async def term(self) -> None:
        self._consumer.deliveries.pop(self._message.sequence, None)


@dataclass(frozen=True)
class StoredAlready:
    """What `MemoryBus.publish_soon` returns: a message the in-memory stream already stored."""

    sequence: int

    async def stored(self) -> int:
        await anyio.lowlevel.checkpoint()
        return self.sequence


class MemoryBus:
    """One service's connection to a `MemoryBroker`; implements `events.bus.Bus`."""

    def __init__(self, broker: MemoryBroker, source: str) -> None:
        self.broker = broker
        self.source = source
        self.published = 0

    async def publish(
        self, subject: str, event: Event, *, message_id: str | None = None, time: datetime | None = None
    ) -> int:
        when = time or self.broker.clock()
        envelope_id = message_id or content_id(subject, event.model_dump_json(), when.isoformat())
        envelope = Envelope(id=envelope_id, time=when, source=self.source, event=event)
        with publishing(subject, event.kind, envelope_id, event):
            sequence = self.broker.store(subject, encode(envelope), inject({"Nats-Msg-Id": envelope_id}))
        self.published += 1
        await anyio.lowlevel.checkpoint()
        return sequence

    async def publish_soon(
        self, subject: str, event: Event, *, message_id: str | None = None
    ) -> StoredAlready:
        """`publish`: the in-memory stream stores at once, so there is nothing left to wait for."""
        return StoredAlready(await self.publish(subject, event, message_id=message_id))

    async def publish_bytes(self, subject: str, data: bytes, *, message_id: str | None = None) -> int:
        sequence = self.broker.store(subject, data, {"Nats-Msg-Id": message_id} if message_id else {})
        await anyio.lowlevel.checkpoint()
        return sequence

    async def consume(
        self,
        *,
        durable: str,
        filter_subjects: Sequence[str],
        handle: Handler,
        deliver_from: DeliverFrom = "all",
        reset: bool = False,
        batch: int = 64,
        max_deliver: int = 5,
        ack_wait: float = 30,
        after_batch: Callable[[], Awaitable[None]] | None = None,
        ready: Callable[[], None] | None = None,
        subjects_apart: bool = False,
    ) -> None:
        if subjects_apart and after_batch is not None:
            raise ValueError("a consumer with subjects apart has no batches to run after_batch after")
        broker = self.broker
        consumer = broker._consumer(durable, filter_subjects, deliver_from, reset)
        if ready is not None:
            ready()

        async def settle(message: StoredMessage) -> None:
            await self._deliver(durable, consumer, message, handle, max_deliver, ack_wait)

        async with anyio.create_task_group() as lanes_group:
            lanes = (
                SubjectLanes(lanes_group, settle, subject_of=lambda m: m.subject, limit=batch * 4)
                if subjects_apart
                else None
            )
            while True:
                due = broker._due(consumer, batch)
                if not due:
                    await broker._wait_for_work(consumer)
                    continue
                messages = []
                for sequence in due:  # handed out now, as a fetch hands out a batch
                    message = broker.messages.get(sequence)
                    if message is not None:
                        consumer.deliveries[sequence] = consumer.deliveries.get(sequence, 0) + 1
                        messages.append(message)
                await settle_batch(messages, settle, lanes)
                if after_batch is not None:
                    await after_batch()

    async def _deliver(
        self,
        durable: str,
        consumer: _Consumer,
        message: StoredMessage,
        handle: Handler,
        max_deliver: int,
        ack_wait: float,
    ) -> None:
        await deliver(
            durable,
            _Handed(self.broker, consumer, message),
            handle,
            max_deliver=max_deliver,
            ack_wait=ack_wait,
            record=self._record_dead_letter,
            now=self.broker.clock,
        )

    async def _record_dead_letter(self, letter: DeadLetter) -> None:
        self.broker.dead.append(letter)

    async def pending(self, durable: str) -> int:
        consumer = self.broker._consumers.get(durable)
        return 0 if consumer is None else self.broker._pending(consumer)

    async def current_levels(self, filter_subject: str) -> list[Envelope]:
        last: dict[str, Envelope] = {}
        for message in self.broker.stored(filter_subject):
            envelope = message.envelope()
            if envelope is not None:
                last[message.subject] = envelope
        return list(last.values())

    async def everything(self, filter_subject: str) -> list[Envelope]:
        return [e for m in self.broker.stored(filter_subject) if (e := m.envelope()) is not None]

    async def dead_letters(self, consumer: str) -> list[DeadLetter]:
        return [letter for letter in self.broker.dead if letter.consumer == consumer]

    async def node_configs(self) -> MemoryConfigStore:
        return self.broker.configs

    async def leases(self) -> MemoryConfigStore:
        return self.broker.leases

    async def close(self) -> None:
        await anyio.lowlevel.checkpoint()


class MemoryConfigStore:
    """The node-config bucket: per key the latest value, revisions counted across the bucket."""

    def __init__(self) -> None:
        self.values: dict[str, StoredValue] = {}
        self.history: list[StoredValue] = []
        self._changed = anyio.Event()

    async def get(self, key: str) -> StoredValue | None:
        await anyio.lowlevel.checkpoint()
        return self.values.get(key)

    def _write(self, key: str, value: bytes) -> int:
        stored = StoredValue(key, value, len(self.history) + 1)
        self.values[key] = stored
        self.history.append(stored)
        self._changed.set()
        self._changed = anyio.Event()
        return stored.revision

    async def create(self, key: str, value: bytes) -> int:
        await anyio.lowlevel.checkpoint()
        if key in self.values:
            raise RevisionConflictError(f"{key} exists")
        return self._write(key, value)

    async def update(self, key: str, value: bytes, *, last: int) -> int:
        await anyio.lowlevel.checkpoint()
        current = self.values.get(key)
        if current is None or current.revision != last:
            raise RevisionConflictError(f"{key} is not at revision {last}")
        return self._write(key, value)

    async def delete(self, key: str) -> None:
        """Remove a key (an operator cleaning up, in a test)."""
        await anyio.lowlevel.checkpoint()
        self.values.pop(key, None)

    async def put(self, key: str, value: bytes) -> int:
        """Write whatever is there (another writer, in a test)."""
        await anyio.lowlevel.checkpoint()
        return self._write(key, value)

    async def watch(self, key: str) -> AsyncIterator[StoredValue]:
        current = self.values.get(key)
        seen = 0
        if current is not None:
            seen = current.revision
            yield current
        while True:
            fresh = [v for v in self.history[seen:] if v.key == key]
            if not fresh:
                seen = len(self.history)
                await self._changed.wait()
                continue
            for stored in fresh:
                seen = stored.revision
                yield stored
