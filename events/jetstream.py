"""The JetStream adapter: streams, KV, publishing with de-duplication, durable pull consumers.

Every service talks to NATS through `EventBus`. Publishing sets `Nats-Msg-Id` so a retried
publish is stored once, and `traceparent` so the trace crosses the bus. Consuming follows one
rule set: a message is acked only after its handler returned (the effect happened); a handler
that raises is nak'ed with a growing delay; a message that cannot be decoded, or that keeps
failing until `max_deliver`, is terminated and recorded in the dead-letter stream. A consumer
never dies because of one message.

This module never decides anything about GPUs; it moves envelopes.
"""

from __future__ import annotations

import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from events import subjects
from events.base import Model
from events.envelope import Envelope, Event, UndecodableMessageError, content_id, decode, encode
from events.tracing import handling, inject, publishing

log = logging.getLogger(__name__)

NAK_DELAYS = (0.2, 1.0, 5.0, 15.0)


class TransientError(Exception):
    """The effect could not happen now (an API or network error); the message will come again."""


class DeadLetter(Model):
    """A message a consumer terminated: what it was, where it came from, and why."""

    consumer: str
    subject: str
    stream_sequence: int
    deliveries: int
    error: str
    data_base64: str
    recorded_at: datetime

    def data(self) -> bytes:
        return base64.b64decode(self.data_base64)


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
            reconnect_time_wait=0.5,
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
                max_msgs_per_subject=64,
                max_age=7 * 24 * 3600,
                duplicate_window=120,
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

    async def node_configs(self) -> KeyValue:
        return await self.js.key_value(subjects.NODE_CONFIG_BUCKET)

    async def publish(
        self, subject: str, event: Event, *, message_id: str | None = None, time: datetime | None = None
    ) -> int:
        """Publish one event; returns its stream sequence. The same `message_id` is stored once."""
        when = time or datetime.now(UTC)
        envelope_id = message_id or content_id(subject, event.model_dump_json(), when.isoformat())
        envelope = Envelope(id=envelope_id, time=when, source=self.source, event=event)
        with publishing(subject, event.kind, envelope_id):
            headers = inject({"Nats-Msg-Id": envelope_id})
            ack = await self.js.publish(subject, encode(envelope), headers=headers, timeout=5)
        self.published += 1
        return ack.seq

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
                    log.warning("%s: fetch failed (%s), retrying", durable, error)
                    await anyio.sleep(0.5)
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
        metadata = message.metadata
        deliveries = metadata.num_delivered or 1
        try:
            envelope = decode(message.data)
        except UndecodableMessageError as error:
            await self.record_dead_letter(consumer, message, f"undecodable: {error}")
            await message.term()
            return
        headers = dict(message.headers or {})
        delivery = Delivery(
            envelope,
            message.subject,
            headers,
            metadata.sequence.stream,
            deliveries,
            metadata.num_pending or 0,
        )
        with handling(message.subject, envelope.kind, headers, consumer) as span:
            try:
                with anyio.fail_after(ack_wait):
                    await handle(delivery)
            except Exception as error:
                span.record_exception(error)
                if deliveries >= max_deliver:
                    log.error(
                        "%s: giving up on %s after %d deliveries: %s",
                        consumer,
                        message.subject,
                        deliveries,
                        error,
                    )
                    await self.record_dead_letter(consumer, message, f"failed {deliveries} times: {error!r}")
                    await message.term()
                else:
                    delay = NAK_DELAYS[min(deliveries, len(NAK_DELAYS)) - 1]
                    log.warning(
                        "%s: %s failed (%s), retrying in %.1fs", consumer, message.subject, error, delay
                    )
                    await message.nak(delay=delay)
                return
        await message.ack()

    async def record_dead_letter(self, consumer: str, message: Msg, error: str) -> None:
        metadata = message.metadata
        letter = DeadLetter(
            consumer=consumer,
            subject=message.subject,
            stream_sequence=metadata.sequence.stream,
            deliveries=metadata.num_delivered or 1,
            error=error,
            data_base64=base64.b64encode(message.data).decode(),
            recorded_at=datetime.now(UTC),
        )
        log.error("%s: dead letter from %s: %s", consumer, message.subject, error)
        await self.js.publish(
            subjects.dead_letter_subject(consumer),
            letter.model_dump_json().encode(),
            headers={"Nats-Msg-Id": f"dead-{consumer}-{metadata.sequence.stream}"},
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
