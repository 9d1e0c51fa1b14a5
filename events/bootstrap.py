"""`mpsflow bootstrap`: the one step that creates the streams and the node-config bucket, with limits.

It runs with the admin identity (`events.access.ADMIN`), before any service starts and again whenever
the limits change: it creates what is missing and brings what exists to the configuration asked
(`max_bytes`, replicas), so running it twice changes nothing. The services hold no right to create,
change, purge or delete a stream; they check on start that these exist and stop, naming this command,
when they do not (`events.jetstream.EventBus.connect`).

The event stream keeps every subject's last 64 messages for a week, the dead letters a month; the
bucket keeps 8 revisions of each node's config, and allows direct gets (by key, which a grant can name).

This module never touches the content of a stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import nats.js.errors
from nats.js import JetStreamContext, api

from events import access, subjects
from events.jetstream import NatsOptions, open_connection

EVENTS_MAX_MSGS_PER_SUBJECT = 64
EVENTS_MAX_AGE_S = 7 * 24 * 3600
DUPLICATE_WINDOW_S = 120
"""A retried publish with the same `Nats-Msg-Id` within 2 minutes is stored once."""
DEAD_LETTERS_MAX_AGE_S = 30 * 24 * 3600
NODE_CONFIG_HISTORY = 8
MIB = 1 << 20
LEASES_MAX_BYTES = MIB


@dataclass(frozen=True)
class BusLimits:
    """How much each stream may store and on how many servers; the stream that is full drops its
    oldest messages (events, dead letters) or refuses new keys (the bucket keeps every node's last
    config: see docs/security.md for the sizing)."""

    replicas: int = 1
    events_max_bytes: int = 1024 * MIB
    dead_letters_max_bytes: int = 256 * MIB
    node_configs_max_bytes: int = 64 * MIB


def stream_configs(limits: BusLimits) -> list[api.StreamConfig]:
    """The event stream, the dead-letter stream and the node-config bucket's stream."""
    return [
        api.StreamConfig(
            name=subjects.STREAM,
            subjects=[subjects.ALL_EVENTS],
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            max_msgs_per_subject=EVENTS_MAX_MSGS_PER_SUBJECT,
            max_age=EVENTS_MAX_AGE_S,
            duplicate_window=DUPLICATE_WINDOW_S,
            max_bytes=limits.events_max_bytes,
            num_replicas=limits.replicas,
        ),
        api.StreamConfig(
            name=subjects.DEAD_LETTER_STREAM,
            subjects=[f"{subjects.DEAD_LETTER_PREFIX}.>"],
            storage=api.StorageType.FILE,
            max_age=DEAD_LETTERS_MAX_AGE_S,
            max_bytes=limits.dead_letters_max_bytes,
            num_replicas=limits.replicas,
        ),
        # What `create_key_value` makes of a bucket, with direct gets on and our limits.
        api.StreamConfig(
            name=access.KV_STREAM,
            subjects=[f"{access.KV_SUBJECT_PREFIX}.>"],
            storage=api.StorageType.FILE,
            max_msgs_per_subject=NODE_CONFIG_HISTORY,
            max_bytes=limits.node_configs_max_bytes,
            num_replicas=limits.replicas,
            discard=api.DiscardPolicy.NEW,
            duplicate_window=DUPLICATE_WINDOW_S,
            allow_rollup_hdrs=True,
            allow_msg_ttl=True,
            deny_delete=True,
            allow_direct=True,
            max_msgs=-1,
            max_consumers=-1,
        ),
        # The lease bucket: one small key per service, its last value only.
        api.StreamConfig(
            name=access.LEASE_STREAM,
            subjects=[f"{access.LEASE_SUBJECT_PREFIX}.>"],
            storage=api.StorageType.FILE,
            max_msgs_per_subject=1,
            max_bytes=LEASES_MAX_BYTES,
            num_replicas=limits.replicas,
            discard=api.DiscardPolicy.NEW,
            duplicate_window=DUPLICATE_WINDOW_S,
            allow_rollup_hdrs=True,
            deny_delete=True,
            allow_direct=True,
            max_msgs=-1,
            max_consumers=-1,
        ),
    ]


async def bootstrap(options: NatsOptions, limits: BusLimits) -> list[str]:
    """Connect with `options` (the admin's) and bring every stream to `stream_configs(limits)`."""
    connection = await open_connection(options, name="mpsflow-bootstrap")
    try:
        return await bring_streams_to(connection.jetstream(timeout=10), limits)
    finally:
        await connection.close()


async def bring_streams_to(js: JetStreamContext, limits: BusLimits) -> list[str]:
    """Create each stream of `stream_configs(limits)` that is missing, and apply the configuration to
    each that exists (which changes nothing where it is already so); one line per stream saying which."""
    done = []
    for config in stream_configs(limits):
        name = str(config.name)
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
            done.append(f"{name}: created")
        else:
            await js.update_stream(config)
            done.append(f"{name}: configuration applied")
    return done
