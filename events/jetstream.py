"""The JetStream adapter of the bus port (`events.bus.Bus`): streams, KV, publishing, consumers.

Publishing sets `Nats-Msg-Id` so a retried publish is stored once, and `traceparent` so the trace
crosses the bus. Consumers are durable pull consumers; how a message is settled (ack after the
effect, retry, dead letter) is `events.bus.deliver`, shared with the in-memory adapter. The
node-config bucket is a JetStream KV bucket behind `events.bus.ConfigStore`.

This module never decides anything about GPUs; it moves envelopes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from events import subjects
from events.bus import (
    BusUnavailableError,
    ConfigStore,
    DeliverFrom,
    Handler,
    RevisionConflictError,
    StoredValue,
    deliver,
)
from events.envelope import DeadLetter, Envelope, Event, UndecodableMessageError, content_id, decode, encode
from events.tracing import inject, publishing

log = logging.getLogger(__name__)

STREAM_LIMITS = {"max_msgs_per_subject": 64, "max_age": 7 * 24 * 3600, "duplicate_window": 120}
"""The event stream keeps a subject's last 64 messages for a week; ids de-duplicate for 2 minutes."""

RECONNECT_WAIT = 0.5
"""Seconds between the NATS client's reconnect attempts, and so before a fetch that failed for
connection trouble is tried again (the failure policy: services/kit/retry.py)."""

_DELIVER_POLICIES = {
    "all": api.DeliverPolicy.ALL,
    "last_per_subject": api.DeliverPolicy.LAST_PER_SUBJECT,
    "new": api.DeliverPolicy.NEW,
}


class EventBus:
    """A connection to NATS with the project's streams, KV bucket and conventions."""

    def __init__(self, connection: NatsClient, *, source: str) -> None:
        self._nc = connection
        self.js: JetStreamContext = connection.jetstream(timeout=5)
        self.source = source
        self.published = 0

    @classmethod
    async def connect(cls, url: str, *, source: str) -> EventBus:
        async def on_error(error: Exception) -> None:
            log.warning("nats: %s", error)

        connection = await nats.connect(
            servers=[url],
            name=source,
            max_reconnect_attempts=-1,
            reconnect_time_wait=RECONNECT_WAIT,
            connect_timeout=2,
            error_cb=on_error,
        )
        bus = cls(connection, source=source)
        await bus.ensure_streams()
        return bus

    async def ensure_streams(self) -> None:
        """Create the event stream, the dead-letter stream and the node-config bucket if absent."""
        await self._add_or_update_stream(
            api.StreamConfig(
                name=subjects.STREAM,
                subjects=[subjects.ALL_EVENTS],
                storage=api.StorageType.FILE,
                retention=api.RetentionPolicy.LIMITS,
                max_msgs_per_subject=STREAM_LIMITS["max_msgs_per_subject"],
                max_age=STREAM_LIMITS["max_age"],
                duplicate_window=STREAM_LIMITS["duplicate_window"],
            )
        )
        await self._add_or_update_stream(
            api.StreamConfig(
                name=subjects.DEAD_LETTER_STREAM,
                subjects=[f"{subjects.DEAD_LETTER_PREFIX}.>"],
                storage=api.StorageType.FILE,
                max_age=30 * 24 * 3600,
            )
        )
        try:
            await self.js.key_value(subjects.NODE_CONFIG_BUCKET)
        except nats.js.errors.BucketNotFoundError:
            await self.js.create_key_value(
                bucket=subjects.NODE_CONFIG_BUCKET, history=8, storage=api.StorageType.FILE
            )

    async def _add_or_update_stream(self, config: api.StreamConfig) -> None:
        try:
            await self.js.add_stream(config)
        except nats.js.errors.BadRequestError as error:
            if error.err_code != 10058:  # already exists with another configuration
                raise
            await self.js.update_stream(config)

    async def node_configs(self) -> ConfigStore:
        return JetStreamConfigStore(await self.js.key_value(subjects.NODE_CONFIG_BUCKET))

    async def publish(
        self, subject: str, event: Event, *, message_id: str | None = None, time: datetime | None = None
    ) -> int:
        """Publish one event; returns its stream sequence. The same `message_id` is stored once."""
        when = time or datetime.now(UTC)
        envelope_id = message_id or content_id(subject, event.model_dump_json(), when.isoformat())
        envelope = Envelope(id=envelope_id, time=when, source=self.source, event=event)
        with publishing(subject, event.kind, envelope_id):
            headers = inject({"Nats-Msg-Id": envelope_id})
            try:
                ack = await self.js.publish(subject, encode(envelope), headers=headers, timeout=5)
            except (nats.errors.Error, TimeoutError) as error:
                raise BusUnavailableError(f"{type(error).__name__}: {error}") from error
        self.published += 1
        return ack.seq

    async def publish_bytes(self, subject: str, data: bytes, *, message_id: str | None = None) -> int:
        headers = {"Nats-Msg-Id": message_id} if message_id is not None else None
        ack = await self.js.publish(subject, data, headers=headers, timeout=5)
        return ack.seq

    async def pending(self, durable: str) -> int:
        info = await self.js.consumer_info(subjects.STREAM, durable)
        return info.num_pending or 0

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
    ) -> None:
        """Run a durable pull consumer until cancelled.

        `reset` deletes and recreates the durable, which a service does when it rebuilds its
        in-memory state from the stream on start (with `deliver_from="last_per_subject"`).
        `after_batch` runs after every fetched batch was handled and acked.
        """
        config = api.ConsumerConfig(
            durable_name=durable,
            name=durable,
            filter_subjects=list(filter_subjects),
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=_DELIVER_POLICIES[deliver_from],
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max(1000, batch * 4),
        )
        if reset:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_consumer(subjects.STREAM, durable)
        await self.js.add_consumer(subjects.STREAM, config)
        subscription = await self.js.pull_subscribe_bind(durable=durable, stream=subjects.STREAM)
        if ready is not None:
            ready()
        try:
            while True:
                try:
                    messages = await subscription.fetch(batch, timeout=1)
                except TimeoutError:  # nothing arrived (nats-py raises both its own and asyncio's)
                    continue
                except nats.errors.Error as error:  # connection trouble: the client reconnects
                    log.warning("%s: fetch failed (%s), retrying in %.1fs", durable, error, RECONNECT_WAIT)
                    await anyio.sleep(RECONNECT_WAIT)
                    continue
                for message in messages:
                    # Shielded so that a shutdown never falls between an effect and its ack;
                    # bounded by ack_wait so that a stuck handler cannot hold the shutdown.
                    with anyio.CancelScope(shield=True):
                        await self._deliver(durable, message, handle, max_deliver, ack_wait)
                if after_batch is not None:
                    await after_batch()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await subscription.unsubscribe()

    async def _deliver(
        self, consumer: str, message: Msg, handle: Handler, max_deliver: int, ack_wait: float
    ) -> None:
        await deliver(
            consumer,
            _Received(message),
            handle,
            max_deliver=max_deliver,
            ack_wait=ack_wait,
            record=self._record_dead_letter,
            now=lambda: datetime.now(UTC),
        )

    async def _record_dead_letter(self, letter: DeadLetter) -> None:
        await self.js.publish(
            subjects.dead_letter_subject(letter.consumer),
            letter.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"dead-{letter.consumer}-{letter.stream_sequence}"},
        )

    async def current_levels(self, filter_subject: str) -> list[Envelope]:
        """The last decodable event of every subject under `filter_subject`: what was last said of each."""
        return await self._read_all(filter_subject, api.DeliverPolicy.LAST_PER_SUBJECT)

    async def _read_all(self, filter_subject: str, policy: api.DeliverPolicy) -> list[Envelope]:
        """Read what the stream holds under `filter_subject` (by `policy`) until caught up."""
        subscription = await self.js.subscribe(
            filter_subject, ordered_consumer=True, config=api.ConsumerConfig(deliver_policy=policy)
        )
        levels: list[Envelope] = []
        try:
            # The server pushes at once: messages already delivered to this client are no longer
            # pending, so nothing to read means none pending and none delivered.
            info = await subscription.consumer_info()
            if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
                return levels
            while True:
                try:
                    message = await subscription.next_msg(timeout=0.5)
                except TimeoutError:
                    return levels
                with contextlib.suppress(UndecodableMessageError):
                    levels.append(decode(message.data))
                if message.metadata.num_pending == 0:
                    return levels
        finally:
            await subscription.unsubscribe()

    async def everything(self, filter_subject: str) -> list[Envelope]:
        """Every decodable event under `filter_subject` still in the stream, in stream order."""
        return await self._read_all(filter_subject, api.DeliverPolicy.ALL)

    async def dead_letters(self, consumer: str) -> list[DeadLetter]:
        """Every dead letter a consumer recorded (for tests and `mpsflow` diagnostics)."""
        subscription = await self.js.subscribe(
            subjects.dead_letter_subject(consumer),
            ordered_consumer=True,
            config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
        )
        letters: list[DeadLetter] = []
        try:
            while True:
                try:
                    message = await subscription.next_msg(timeout=0.3)
                except nats.errors.TimeoutError:
                    return letters
                letters.append(DeadLetter.model_validate_json(message.data))
        finally:
            await subscription.unsubscribe()

    async def close(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(3):
            await self._nc.drain()
        if not self._nc.is_closed:
            await self._nc.close()


@dataclass(frozen=True)
class _Received:
    """A JetStream message as `events.bus.deliver` settles it."""

    message: Msg

    @property
    def subject(self) -> str:
        return self.message.subject

    @property
    def data(self) -> bytes:
        return self.message.data

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.message.headers or {})

    @property
    def stream_sequence(self) -> int:
        return self.message.metadata.sequence.stream

    @property
    def deliveries(self) -> int:
        return self.message.metadata.num_delivered or 1

    @property
    def pending(self) -> int:
        return self.message.metadata.num_pending or 0

    async def ack(self) -> None:
        await self.message.ack()

    async def nak(self, delay: float) -> None:
        await self.message.nak(delay=delay)

    async def term(self) -> None:
        await self.message.term()


class JetStreamConfigStore:
    """The node-config bucket as a JetStream KV bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    async def get(self, key: str) -> StoredValue | None:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # also raised for a deleted or purged key
            return None
        return StoredValue(key, entry.value or b"", entry.revision or 0)

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self._kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError as error:
            raise RevisionConflictError(f"{key} exists") from error

    async def update(self, key: str, value: bytes, *, last: int) -> int:
        try:
            return await self._kv.update(key, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError as error:
            raise RevisionConflictError(f"{key} is not at revision {last}") from error

    async def watch(self, key: str) -> AsyncIterator[StoredValue]:
        watcher = await self._kv.watch(key)
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=5)  # type: ignore[no-untyped-call]
                except nats.errors.TimeoutError:
                    continue
                if entry is None or entry.value is None or entry.operation in ("DEL", "PURGE"):
                    continue  # None marks the end of the initial values
                yield StoredValue(entry.key, entry.value, entry.revision or 0)
        finally:
            with anyio.CancelScope(shield=True):
                await watcher.stop()  # type: ignore[no-untyped-call]
