"""W3C trace context across the bus: a span per publish, a span per handling, context in headers.

Library code takes its tracer from the global provider, which `services.kit.telemetry` sets
up once per process; without it every span is a no-op. This module never configures the SDK.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind

TRACER_NAME = "mpsflow"


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add `traceparent` (and `tracestate`) of the current span to `headers`."""
    propagate.inject(headers)
    return headers


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier.get("traceparent")


def extract(headers: Mapping[str, str] | None) -> Context:
    return propagate.extract(dict(headers or {}))


def link_to(headers: Mapping[str, str] | None) -> Link | None:
    """A link to the span that produced a message, for batched handling (the planner)."""
    span_context = trace.get_current_span(extract(headers)).get_span_context()
    return Link(span_context) if span_context.is_valid else None


@contextmanager
def publishing(subject: str, kind: str, message_id: str) -> Iterator[Span]:
    with tracer().start_as_current_span(
        f"publish {kind}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "messaging.message.id": message_id,
        },
    ) as span:
        yield span


@contextmanager
def handling(subject: str, kind: str, headers: Mapping[str, str] | None, consumer: str) -> Iterator[Span]:
    with tracer().start_as_current_span(
        f"process {kind}",
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "messaging.consumer.group.name": consumer,
        },
    ) as span:
        yield span
