"""The JetStream adapter of the bus port (`events.bus.Bus`): connecting, publishing, consumers, KV.

Publishing sets `Nats-Msg-Id` so a retried publish is stored once, and `traceparent` so the trace
crosses the bus. Consumers are durable pull consumers; how a message is settled (ack after the
effect, retry, dead letter) is `events.bus.deliver`, shared with the in-memory adapter. The
node-config bucket is a JetStream KV bucket behind `events.bus.ConfigStore`.

A process connects as one identity (`NatsOptions`: its credentials, TLS, and the inbox prefix that is
its alone) and creates only consumers whose names and filters `events.access` grants it: a durable's
single filter travels in the consumer-create subject; a stream is read to its end through a reader
consumer named after the identity and the filter; a node watches its key through a consumer whose
filter is that key. It creates no stream: `mpsflow bootstrap` (`events.bootstrap`) does, and
`EventBus.connect` stops, naming that command, when they are missing.

This module never decides anything about GPUs; it moves envelopes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from nats.js.kv import KeyValue

from events import access, subjects
from events.bus import (
    BusUnavailableError,
    ConfigStore,
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

RECONNECT_WAIT = 0.5
PUBLISH_TIMEOUT_S = 5.0
ASYNC_PUBLISHES = 4000
"""Events `publish_soon` keeps in flight on one connection at most; one more waits for a slot."""
"""How long a publish waits to be sent (a full window) or acknowledged before the bus counts as down."""
"""Seconds between the NATS client's reconnect attempts, and so before a fetch that failed for
connection trouble is tried again (the failure policy: services/kit/retry.py)."""
READER_IDLE_S = 60.0
"""A reader consumer that a dead process left behind is gone after this long."""
WATCHER_IDLE_S = 3600.0
"""A key watcher that nobody fetches from (its node is gone) is gone after this long; a live watcher
whose consumer went (its server lost it, or it idled while the connection was down) makes a new one."""
_STREAM_NOT_FOUND = 10059

_DELIVER_POLICIES = {
    "all": api.DeliverPolicy.ALL,
    "last_per_subject": api.DeliverPolicy.LAST_PER_SUBJECT,
    "new": api.DeliverPolicy.NEW,
}


class NotBootstrappedError(Exception):
    """The streams or the bucket are missing: `mpsflow bootstrap` has not run with admin credentials."""


@dataclass(frozen=True)
class NatsOptions:
    """How a process reaches NATS and as whom: the server, its identity (`events.access`: it names the
    inbox prefix and the reader consumers), the identity's credentials file (`.creds`, a user JWT and
    its seed) and TLS (a CA to check the server with, and a client certificate and key)."""

    url: str
    identity: str
    credentials: Path | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def tls_context(self) -> ssl.SSLContext | None:
        """The TLS settings, or None for a plain connection."""
        if self.tls_ca is None and self.tls_cert is None:
            return None
        context = ssl.create_default_context(cafile=None if self.tls_ca is None else str(self.tls_ca))
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context


async def open_connection(options: NatsOptions, *, name: str) -> NatsClient:
    """A NATS connection as `options` say, which reconnects for ever; a permission the server refuses
    is logged as an error (it is a bug in `events.access` or a misused credential)."""

    async def on_error(error: Exception) -> None:
        if "permissions violation" in str(error).lower():
            log.error("nats: %s (identity %s; grants: docs/security.md)", error, options.identity)
        else:
            log.warning("nats: %s", error)

    return await nats.connect(
        servers=[options.url],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=RECONNECT_WAIT,
        connect_timeout=2,
        error_cb=on_error,
        inbox_prefix=access.inbox_prefix(options.identity),
        user_credentials=None if options.credentials is None else str(options.credentials),
        tls=options.tls_context(),
    )


class EventBus:
    """A connection to NATS with the project's streams, KV bucket and conventions."""

    def __init__(self, connection: NatsClient, *, source: str, identity: str) -> None:
        self._nc = connection
        self.js: JetStreamContext = connection.jetstream(timeout=5, publish_async_max_pending=ASYNC_PUBLISHES)
        self.source = source
        self.identity = identity
        self.published = 0

    @classmethod
    async def connect(cls, options: NatsOptions, *, source: str) -> EventBus:
        """Connect as `options.identity` and check that the bootstrap made the streams and the bucket."""
        bus = cls(await open_connection(options, name=source), source=source, identity=options.identity)
        try:
            await bus.check_bootstrapped()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await bus._nc.close()
            raise
        return bus

    async def check_bootstrapped(self) -> None:
        """Raise NotBootstrappedError, naming `mpsflow bootstrap`, unless every stream exists."""
        try:
            reply = await self._nc.request(f"{access.JS_API}.STREAM.NAMES", b"", timeout=5)
        except nats.errors.NoRespondersError as error:
            raise NotBootstrappedError("JetStream does not answer: is it enabled on the server?") from error
        except nats.errors.TimeoutError as error:
            raise BusUnavailableError(
                f"JetStream did not answer {access.JS_API}.STREAM.NAMES within 5 s (does identity "
                f"{self.identity} lack the right? docs/security.md)"
            ) from error
        answer = json.loads(reply.data)
        if "error" in answer:
            raise NotBootstrappedError(f"JetStream refused to list the streams: {answer['error']}")
        missing = sorted(set(access.STREAMS) - set(answer.get("streams") or ()))
        if missing:
            raise NotBootstrappedError(
                f"JetStream has no {', '.join(missing)}: run `mpsflow bootstrap` with the admin "
                "credentials before the services (docs/security.md)"
            )

    async def _add_consumer(self, stream: str, config: api.ConsumerConfig) -> api.ConsumerInfo:
        try:
            return await self.js.add_consumer(stream, config)
        except nats.js.errors.NotFoundError as error:
            if error.err_code != _STREAM_NOT_FOUND:
                raise
            raise NotBootstrappedError(f"stream {stream} is missing: run `mpsflow bootstrap`") from error

    async def node_configs(self) -> ConfigStore:
        """The node-config bucket, without asking for its stream's info (a node agent may not)."""
        bucket = KeyValue(
            name=subjects.NODE_CONFIG_BUCKET,
            stream=access.KV_STREAM,
            pre=f"{access.KV_SUBJECT_PREFIX}.",
            js=self.js,
            direct=True,  # the bootstrap allows direct gets on the bucket
        )
        return JetStreamConfigStore(bucket, self.js)

    async def leases(self) -> ConfigStore:
        """The lease bucket (get, create and update of one key; no watch)."""
        bucket = KeyValue(
            name=subjects.LEASE_BUCKET,
            stream=access.LEASE_STREAM,
            pre=f"{access.LEASE_SUBJECT_PREFIX}.",
            js=self.js,
            direct=True,
        )
        return JetStreamConfigStore(bucket, self.js, subjects.LEASE_BUCKET)

    async def publish(
        self, subject: str, event: Event, *, message_id: str | None = None, time: datetime | None = None
    ) -> int:
        """Publish one event; returns its stream sequence. The same `message_id` is stored once."""
        when = time or datetime.now(UTC)
        envelope_id = message_id or content_id(subject, event.model_dump_json(), when.isoformat())
        envelope = Envelope(id=envelope_id, time=when, source=self.source, event=event)
        with publishing(subject, event.kind, envelope_id, event):
            headers = inject({"Nats-Msg-Id": envelope_id})
            try:
                ack = await self.js.publish(
                    subject, encode(envelope), headers=headers, timeout=PUBLISH_TIMEOUT_S
                )
            except (nats.errors.Error, TimeoutError) as error:
                raise BusUnavailableError(f"{type(error).__name__}: {error}") from error
        self.published += 1
        return ack.seq

    async def publish_soon(
        self, subject: str, event: Event, *, message_id: str | None = None
    ) -> InFlightPublish:
        """`publish` without waiting for the stream's acknowledgement: NATS keeps one connection's
        messages in the order they were sent, so events sent one after the other are stored in that
        order; `stored()` waits for the acknowledgement, up to `PUBLISH_TIMEOUT_S`."""
        when = datetime.now(UTC)
        envelope_id = message_id or content_id(subject, event.model_dump_json(), when.isoformat())
        envelope = Envelope(id=envelope_id, time=when, source=self.source, event=event)
        with publishing(subject, event.kind, envelope_id, event):
            headers = inject({"Nats-Msg-Id": envelope_id})
            try:
                # With a free slot, no wait at all: a wait with a timeout is a task of its own, which
                # hands the loop over at every event, and the client then flushes every event in a
                # write of its own; without one, a burst goes out in a few large writes.
                full = self.js.publish_async_pending() >= ASYNC_PUBLISHES
                acknowledged = await self.js.publish_async(
                    subject, encode(envelope), headers=headers, wait_stall=PUBLISH_TIMEOUT_S if full else None
                )
            except (nats.errors.Error, TimeoutError) as error:
                raise BusUnavailableError(f"{type(error).__name__}: {error}") from error
        self.published += 1
        return InFlightPublish(acknowledged)

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
        subjects_apart: bool = False,
    ) -> None:
        """Run a durable pull consumer until cancelled.

        `reset` deletes and recreates the durable, which a service does when it rebuilds its
        in-memory state from the stream on start (with `deliver_from="last_per_subject"`).
        `after_batch` runs after every fetched batch was handled and acked.
        """
        if subjects_apart and after_batch is not None:
            raise ValueError("a consumer with subjects apart has no batches to run after_batch after")

        async def settle(message: Msg) -> None:
            await self._deliver(durable, message, handle, max_deliver, ack_wait)

        # One filter goes into the consumer-create subject, where a grant can name it.
        [single, *more] = filter_subjects
        config = api.ConsumerConfig(
            durable_name=durable,
            name=durable,
            filter_subject=None if more else single,
            filter_subjects=list(filter_subjects) if more else None,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=_DELIVER_POLICIES[deliver_from],
            ack_wait=ack_wait,
            max_deliver=max_deliver,
            max_ack_pending=max(1000, batch * 4),
        )
        if reset:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.js.delete_consumer(subjects.STREAM, durable)
        await self._add_consumer(subjects.STREAM, config)
        subscription = await self.js.pull_subscribe_bind(durable=durable, stream=subjects.STREAM)
        if ready is not None:
            ready()
        try:
            async with anyio.create_task_group() as lanes_group:
                lanes = (
                    SubjectLanes(lanes_group, settle, subject_of=lambda m: m.subject, limit=batch * 4)
                    if subjects_apart
                    else None
                )
                while True:
                    try:
                        messages = await subscription.fetch(batch, timeout=1)
                    except TimeoutError:  # nothing arrived (nats-py raises both its own and asyncio's)
                        continue
                    except nats.errors.Error as error:  # connection trouble: the client reconnects
                        log.warning(
                            "%s: fetch failed (%s), retrying in %.1fs", durable, error, RECONNECT_WAIT
                        )
                        await anyio.sleep(RECONNECT_WAIT)
                        continue
                    await settle_batch(messages, settle, lanes)
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
        messages = await self._read_to_end(
            subjects.STREAM, filter_subject, api.DeliverPolicy.LAST_PER_SUBJECT
        )
        return _decodable(messages)

    async def current_levels_with_headers(self, filter_subject: str) -> list[tuple[Envelope, dict[str, str]]]:
        """`current_levels`, each with its message's headers (the trace context it was published in)."""
        messages = await self._read_to_end(
            subjects.STREAM, filter_subject, api.DeliverPolicy.LAST_PER_SUBJECT
        )
        received = []
        for message in messages:
            with contextlib.suppress(UndecodableMessageError):
                received.append((decode(message.data), dict(message.headers or {})))
        return received

    async def everything(self, filter_subject: str) -> list[Envelope]:
        """Every decodable event under `filter_subject` still in the stream, in stream order."""
        return _decodable(await self._read_to_end(subjects.STREAM, filter_subject, api.DeliverPolicy.ALL))

    async def dead_letters(self, consumer: str) -> list[DeadLetter]:
        """Every dead letter a consumer recorded (for tests and `mpsflow` diagnostics)."""
        messages = await self._read_to_end(
            subjects.DEAD_LETTER_STREAM, subjects.dead_letter_subject(consumer), api.DeliverPolicy.ALL
        )
        return [DeadLetter.model_validate_json(message.data) for message in messages]

    async def _read_to_end(self, stream: str, filter_subject: str, policy: api.DeliverPolicy) -> list[Msg]:
        """What `stream` holds under `filter_subject` (by `policy`), read through this identity's
        reader consumer for that filter, which is made afresh and deleted after."""
        name = access.reader(self.identity, filter_subject)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.js.delete_consumer(stream, name)  # left behind by a reader that died mid-read
        info = await self._add_consumer(
            stream,
            api.ConsumerConfig(
                name=name,
                filter_subject=filter_subject,
                deliver_policy=policy,
                ack_policy=api.AckPolicy.NONE,
                inactive_threshold=READER_IDLE_S,
                mem_storage=True,
                num_replicas=1,
            ),
        )
        subscription = await self.js.pull_subscribe_bind(durable=name, stream=stream)
        messages: list[Msg] = []
        try:
            remaining = info.num_pending or 0
            while remaining > 0:
                try:
                    batch = await subscription.fetch(min(remaining, 256), timeout=2)
                except TimeoutError:
                    break
                messages.extend(batch)
                remaining = batch[-1].metadata.num_pending or 0
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await subscription.unsubscribe()
                with contextlib.suppress(nats.errors.Error):
                    await self.js.delete_consumer(stream, name)
        return messages

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


@dataclass(frozen=True)
class InFlightPublish:
    """A message `EventBus.publish_soon` sent, and the stream's acknowledgement to come."""

    acknowledgement: asyncio.Future[api.PubAck]

    async def stored(self) -> int:
        try:
            with anyio.fail_after(PUBLISH_TIMEOUT_S):
                ack = await self.acknowledgement
        except (nats.errors.Error, TimeoutError) as error:
            raise BusUnavailableError(f"{type(error).__name__}: {error}") from error
        return ack.seq


def _decodable(messages: list[Msg]) -> list[Envelope]:
    envelopes = []
    for message in messages:
        with contextlib.suppress(UndecodableMessageError):
            envelopes.append(decode(message.data))
    return envelopes


class JetStreamConfigStore:
    """The node-config bucket as a JetStream KV bucket.

    Reads go by direct get of one key; writes are compare-and-set publishes on the key's subject.
    `watch` reads through the key's own watcher consumer (`access.key_watcher`), whose filter is the
    key, rather than through the client's KV watch, whose ephemeral consumer's create subject names no
    filter: a grant for that would let a node watch every key."""

    def __init__(self, kv: KeyValue, js: JetStreamContext, bucket: str = subjects.NODE_CONFIG_BUCKET) -> None:
        self._kv = kv
        self._js = js
        self._bucket = bucket

    async def get(self, key: str) -> StoredValue | None:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:  # also raised for a deleted or purged key
            return None
        except nats.errors.NoRespondersError as error:
            raise NotBootstrappedError(
                f"bucket {self._bucket} is missing: run `mpsflow bootstrap`"
            ) from error
        except (nats.errors.Error, TimeoutError) as error:
            raise BusUnavailableError(f"reading {key} from {self._bucket}: {error!r}") from error
        return StoredValue(key, entry.value or b"", entry.revision or 0)

    async def create(self, key: str, value: bytes) -> int:
        try:
            return await self._kv.create(key, value)
        except nats.js.errors.KeyWrongLastSequenceError as error:
            raise RevisionConflictError(f"{key} exists") from error
        except (nats.errors.Error, TimeoutError) as error:
            raise BusUnavailableError(f"creating {key} in {self._bucket}: {error!r}") from error

    async def update(self, key: str, value: bytes, *, last: int) -> int:
        try:
            return await self._kv.update(key, value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError as error:
            raise RevisionConflictError(f"{key} is not at revision {last}") from error
        except (nats.errors.Error, TimeoutError) as error:
            raise BusUnavailableError(f"writing {key} in {self._bucket}: {error!r}") from error

    async def watch(self, key: str) -> AsyncIterator[StoredValue]:
        seen = 0
        while True:
            subscription = await self._start_watching(key)
            try:
                while True:
                    try:
                        messages = await subscription.fetch(16, timeout=5)
                    except TimeoutError:  # nothing new (nats-py raises both its own and asyncio's)
                        continue
                    except nats.js.errors.ServiceUnavailableError:  # the watcher is gone: a new one
                        log.warning("the watcher of %s is gone; watching again", key)
                        break
                    except nats.errors.Error as error:  # connection trouble: the client reconnects
                        log.warning("watching %s failed (%s), retrying in %.1fs", key, error, RECONNECT_WAIT)
                        await anyio.sleep(RECONNECT_WAIT)
                        continue
                    for message in messages:
                        revision = message.metadata.sequence.stream
                        if revision <= seen:  # a new watcher starts from the current value again
                            continue
                        seen = revision
                        if message.data and not _is_removal(message):
                            yield StoredValue(key, message.data, revision)
            finally:
                with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                    await subscription.unsubscribe()

    async def _start_watching(self, key: str) -> JetStreamContext.PullSubscription:
        """A fresh watcher of `key`, starting at its current value (an old one may be anywhere)."""
        name = access.key_watcher(key)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self._js.delete_consumer(access.KV_STREAM, name)
        config = api.ConsumerConfig(
            name=name,
            filter_subject=access.kv_subject(key),
            deliver_policy=api.DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=WATCHER_IDLE_S,
            mem_storage=True,
            num_replicas=1,
        )
        try:
            await self._js.add_consumer(access.KV_STREAM, config)
        except nats.js.errors.NotFoundError as error:
            if error.err_code != _STREAM_NOT_FOUND:
                raise
            raise NotBootstrappedError(
                f"bucket {subjects.NODE_CONFIG_BUCKET} is missing: run `mpsflow bootstrap`"
            ) from error
        return await self._js.pull_subscribe_bind(durable=name, stream=access.KV_STREAM)


def _is_removal(message: Msg) -> bool:
    """A delete or purge of the key, or a marker the server left (none carries a config)."""
    headers = message.headers or {}
    return headers.get("KV-Operation") in ("DEL", "PURGE") or "Nats-Marker-Reason" in headers
