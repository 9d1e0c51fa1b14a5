"""The versioned envelope every event travels in, the codec between envelopes and bytes, and the
dead letter a consumer records for a message it gave up on.

`encode` and `decode` are the only way events become bytes and back. A message that does not
decode raises `UndecodableMessageError`, which consumers treat as poison: terminated and recorded,
never retried. This module never performs I/O.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field, ValidationError

from events.base import AwareDatetime, Model
from events.nodes import NodeGpusReported, NodeObserved, NodeOptedOut, SliceOverused
from events.plans import NodeConfigApplied, NodeConfigFailed, NodeConfigPublished, NodePlanned, PlanComputed
from events.pods import PodDeleted, PodObserved, PodRejected, PodReleased, PodUnplaced

Event = Annotated[
    PodObserved
    | PodRejected
    | PodDeleted
    | PodUnplaced
    | PodReleased
    | NodeObserved
    | NodeOptedOut
    | NodeGpusReported
    | SliceOverused
    | PlanComputed
    | NodePlanned
    | NodeConfigPublished
    | NodeConfigApplied
    | NodeConfigFailed,
    Field(discriminator="kind"),
]


class Envelope(Model):
    """One event with its identity, schema version, event time and the service that saw it."""

    id: str
    schema_version: Literal[1] = 1
    time: AwareDatetime
    source: str
    event: Event

    @property
    def kind(self) -> str:
        return self.event.kind


class UndecodableMessageError(ValueError):
    """The bytes are not an envelope this version understands; never worth a retry."""


def encode(envelope: Envelope) -> bytes:
    return envelope.model_dump_json().encode()


def decode(data: bytes) -> Envelope:
    try:
        return Envelope.model_validate_json(data)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(message)"
        # One line whatever the sender wrote: an unknown field's name may hold a newline.
        reason = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in f"{where}: {first['msg']}")
        raise UndecodableMessageError(reason) from error


def content_id(*parts: str) -> str:
    """A short, stable id derived from content, for de-duplication (`Nats-Msg-Id`) and plan ids."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()
    return digest[:24]


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
