"""The bus port: what every service needs from the event bus, and the one failure policy.

Two adapters implement `Bus`: `events.jetstream.EventBus` over NATS JetStream (production, and
the tests that need the real server) and `events.memory.MemoryBus` (most service tests, run in
virtual time). One behavioural suite (`tests/contract/test_bus_contract.py`) holds both to the
same rules:

- `publish` stores a message once per `message_id` (within the de-duplication window) and
  returns its stream sequence; a publish retried after a failure is harmless. `publish_soon` sends
  at once and lets the caller wait for the stream's word later: messages sent one after the other
  are stored in that order.
- A consumer hands each message to its handler and acks only after the handler returned, so an
  effect is never lost; a handler that raises `TransientError` gets the message again after the
  error's delay; one that raises `PermanentError` (or gets a message that does not decode) has it
  terminated and recorded as a `DeadLetter`, at once; any other exception is a bug or a surprise:
  the message comes again with a growing delay, up to `max_deliver` deliveries, then it is a dead
  letter too. A consumer never dies because of one message. With `subjects_apart` it hands
  different subjects' messages over at once, each subject's in stream order (`SubjectLanes`).
- A durable consumer starting at `last_per_subject` gets the last message of every subject: the
  current level of everything, which is how a service rebuilds its state on start.
- The `ConfigStore` (the node-config bucket) keeps one value per key with a revision; `create`
  and `update` are compare-and-set, and `watch` gives the current value, then every change.

The delivery policy lives here (`deliver`), so the adapters cannot differ on it. This module
performs no I/O of its own.
"""

from __future__ import annotations

import base64
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, Literal, Protocol, TypeVar

import anyio
from anyio.abc import TaskGroup

from events.envelope import DeadLetter, Envelope, Event, UndecodableMessageError, decode
from events.metrics import CONSUMER_PENDING, DEAD_LETTERS, DELIVERIES
from events.tracing import handling

log = logging.getLogger(__name__)

Message = TypeVar("Message")

NAK_DELAYS = (0.2, 1.0, 5.0, 15.0)
"""Seconds before an unexpected failure is retried: after the 1st, 2nd, 3rd and later deliveries."""


class TransientError(Exception):
    """The effect could not happen now (an API or network error): try the message again later."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BusUnavailableError(Exception):
    """A publish that did not reach the bus (no connection, no answer in time): nothing was stored,
    or it was and publishing again with the same id stores nothing more."""


class PermanentError(Exception):
    """The message can never have its effect (it contradicts itself, or names what cannot exist):
    it is terminated and recorded as a dead letter at once, never retried."""


def retry_delay(error: Exception, deliveries: int) -> float:
    """How long a message that failed with `error` on its `deliveries`-th delivery waits."""
    if isinstance(error, TransientError) and error.retry_after is not None:
        return error.retry_after
    return NAK_DELAYS[min(deliveries, len(NAK_DELAYS)) - 1]


@dataclass(frozen=True)
class Delivery:
    """One decoded message handed to a handler."""

    envelope: Envelope
    subject: str
    headers: dict[str, str]
    stream_sequence: int
    deliveries: int
    pending: int


Handler = Callable[[Delivery], Awaitable[None]]
DeliverFrom = Literal["all", "last_per_subject", "new"]


class Inbound(Protocol):
    """A message as an adapter received it, with the adapter's ways to settle it."""

    @property
    def subject(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def headers(self) -> dict[str, str]: ...
    @property
    def stream_sequence(self) -> int: ...
    @property
    def deliveries(self) -> int: ...
    @property
    def pending(self) -> int: ...

    async def ack(self) -> None: ...
    async def nak(self, delay: float) -> None: ...
    async def term(self) -> None: ...


async def deliver(
    consumer: str,
    message: Inbound,
    handle: Handler,
    *,
    max_deliver: int,
    ack_wait: float,
    record: Callable[[DeadLetter], Awaitable[None]],
    now: Callable[[], datetime],
) -> None:
    """Hand one message to `handle` and settle it by the policy in this module's docstring."""
    CONSUMER_PENDING.labels(consumer).set(message.pending)

    async def dead(error: str) -> None:
        DEAD_LETTERS.labels(consumer, error.partition(" ")[0].rstrip(":")).inc()
        DELIVERIES.labels(consumer, "dead").inc()
        await record(
            DeadLetter(
                consumer=consumer,
                subject=message.subject,
                stream_sequence=message.stream_sequence,
                deliveries=message.deliveries,
                error=error,
                data_base64=base64.b64encode(message.data).decode(),
                recorded_at=now(),
            )
        )
        log.error("%s: dead letter from %s: %s", consumer, message.subject, error)
        await message.term()

    try:
        envelope = decode(message.data)
    except UndecodableMessageError as error:
        await dead(f"undecodable: {error}")
        return
    delivery = Delivery(
        envelope,
        message.subject,
        message.headers,
        message.stream_sequence,
        message.deliveries,
        message.pending,
    )
    with handling(message.subject, envelope.kind, message.headers, consumer, envelope.event) as span:
        try:
            with anyio.fail_after(ack_wait):
                await handle(delivery)
        except PermanentError as error:
            span.record_exception(error)
            await dead(f"permanent: {error}")
            return
        except Exception as error:
            span.record_exception(error)
            if message.deliveries >= max_deliver:
                await dead(f"failed {message.deliveries} times: {error!r}")
            else:
                delay = retry_delay(error, message.deliveries)
                log.warning("%s: %s failed (%s), retrying in %.1fs", consumer, message.subject, error, delay)
                DELIVERIES.labels(consumer, "retried").inc()
                await message.nak(delay)
            return
    DELIVERIES.labels(consumer, "handled").inc()
    await message.ack()


class SubjectLanes(Generic[Message]):
    """Settles messages each subject's in the order taken, and different subjects' at once: a
    subject whose handling waits (a slow round trip, a retry) holds up no other subject's.

    A subject's lane is a task of `group` that lives while the subject has messages to settle. At
    most `limit` messages are taken and not yet settled; `take` waits for room, which holds the
    consumer's fetching back. Each settling is shielded, and a lane settles everything it was
    given, so a shutdown never falls between an effect and its ack, nor drops a message taken;
    `deliver`'s `ack_wait` bounds how long that can hold a shutdown."""

    def __init__(
        self,
        group: TaskGroup,
        settle: Callable[[Message], Awaitable[None]],
        *,
        subject_of: Callable[[Message], str],
        limit: int,
    ) -> None:
        self._group = group
        self._settle = settle
        self._subject_of = subject_of
        self._room = anyio.Semaphore(limit)
        self._lanes: dict[str, deque[Message]] = {}

    async def take(self, message: Message) -> None:
        await self._room.acquire()
        subject = self._subject_of(message)
        lane = self._lanes.get(subject)
        if lane is None:
            lane = self._lanes[subject] = deque()
            self._group.start_soon(self._run, subject, lane)
        lane.append(message)

    async def _run(self, subject: str, lane: deque[Message]) -> None:
        while lane:
            with anyio.CancelScope(shield=True):
                await self._settle(lane[0])
            lane.popleft()
            self._room.release()
        del self._lanes[subject]  # nothing awaited since the lane was seen empty: none was added


async def settle_batch(
    messages: Sequence[Message],
    settle: Callable[[Message], Awaitable[None]],
    lanes: SubjectLanes[Message] | None,
) -> None:
    """Settle a fetched batch: in stream order, each settling shielded (see `SubjectLanes`), or
    handed to `lanes`."""
    for message in messages:
        if lanes is not None:
            await lanes.take(message)
            continue
        with anyio.CancelScope(shield=True):
            await settle(message)


@dataclass(frozen=True)
class StoredValue:
    """One value of a `ConfigStore` key, with the revision that wrote it."""

    key: str
    value: bytes
    revision: int


class RevisionConflictError(Exception):
    """A compare-and-set write lost: the key is not at the revision the writer read."""


class Publishing(Protocol):
    """An event sent by `Bus.publish_soon`, not yet known to be stored."""

    async def stored(self) -> int:
        """Its stream sequence once the stream stored it; BusUnavailableError when it did not say so
        in time (it may or may not be stored: publishing it again with its id stores it once)."""
        ...


class ConfigStore(Protocol):
    """The node-config bucket: one desired config per node, written by compare-and-set."""

    async def get(self, key: str) -> StoredValue | None: ...

    async def create(self, key: str, value: bytes) -> int:
        """Write a key that must not exist yet; its revision, or RevisionConflictError."""
        ...

    async def update(self, key: str, value: bytes, *, last: int) -> int:
        """Write a key that must be at revision `last`; its new revision, or RevisionConflictError."""
        ...

    def watch(self, key: str) -> AsyncIterator[StoredValue]:
        """The key's current value (if any), then every value written to it, until cancelled."""
        ...


class Bus(Protocol):
    """What a service may do with the event bus."""

    source: str

    async def publish(
        self, subject: str, event: Event, *, message_id: str | None = None, time: datetime | None = None
    ) -> int:
        """Publish one event; its stream sequence. The same `message_id` is stored once.
        Raises BusUnavailableError when the bus cannot be reached."""
        ...

    async def publish_soon(self, subject: str, event: Event, *, message_id: str | None = None) -> Publishing:
        """Send one event now, in call order, without waiting for the stream to store it: `stored()`
        of what it returns waits for that (its stream sequence, or BusUnavailableError). A publisher
        with many events keeps several in flight and must wait for each before it counts it as
        published. Raises BusUnavailableError when it cannot even be sent."""
        ...

    async def publish_bytes(self, subject: str, data: bytes, *, message_id: str | None = None) -> int:
        """Publish raw bytes (a recording played back, or a test's poison)."""
        ...

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
        """Run a durable consumer until cancelled. `reset` recreates it (a service rebuilding its
        state on start); `after_batch` runs after every batch was handled and settled;
        `subjects_apart` handles different subjects' messages at once, each subject's in order
        (`SubjectLanes`), and cannot go with `after_batch`."""
        ...

    async def pending(self, durable: str) -> int:
        """Messages the durable consumer has yet to be handed."""
        ...

    async def current_levels(self, filter_subject: str) -> list[Envelope]:
        """The last decodable event of every subject under `filter_subject`."""
        ...

    async def everything(self, filter_subject: str) -> list[Envelope]:
        """Every decodable event under `filter_subject` still stored, in stream order."""
        ...

    async def dead_letters(self, consumer: str) -> list[DeadLetter]: ...

    async def node_configs(self) -> ConfigStore: ...

    async def leases(self) -> ConfigStore:
        """The lease bucket: each service's active replica (`services.kit.lease`)."""
        ...

    async def close(self) -> None: ...
