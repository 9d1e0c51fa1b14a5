"""W3C trace context across the bus: a span per publish, a span per handling, context in headers.

Library code takes its tracer from the global provider, which `services.kit.telemetry` sets
up once per process; without it every span is a no-op. This module never configures the SDK.

A span about one pod carries `mpsflow.pod` ("namespace/name"), one about a node `mpsflow.node`,
one about a plan `mpsflow.plan_id`, and a plan names the pods it placed in `mpsflow.pods`
(`event_attributes`): that is how `mpsflow trace NAMESPACE/POD` (`services.traceview`) finds a
pod's path among the spans of every process.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.util.types import AttributeValue

from events.base import Model
from events.nodes import NodeObserved, NodeOptedOut
from events.plans import PlanComputed

TRACER_NAME = "mpsflow"
POD = "mpsflow.pod"
"""The pod ("namespace/name") a span is about."""
PODS = "mpsflow.pods"
"""The pods ("namespace/name", sorted, at most `MAX_PODS`) a plan placed."""
NODE = "mpsflow.node"
PLAN = "mpsflow.plan_id"
MAX_PODS = 50
"""Beyond this many, `mpsflow.pods` names the first ones only (the plan's own events name the rest)."""


_made: list[tuple[trace.TracerProvider, trace.Tracer]] = []
"""The tracer last made, with the provider it came from."""


def tracer() -> trace.Tracer:
    """The global provider's mpsflow tracer, made once per provider: making one (what
    `trace.get_tracer` does on every call) costs more than starting the span it is asked for."""
    provider = trace.get_tracer_provider()
    if not _made or _made[0][0] is not provider:
        _made[:] = [(provider, provider.get_tracer(TRACER_NAME))]
    return _made[0][1]


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


def pods_attribute(keys: Iterable[str]) -> list[str]:
    """The value of `mpsflow.pods`: the pods' keys, sorted, at most `MAX_PODS` of them."""
    return sorted(keys)[:MAX_PODS]


def event_attributes(event: Model | None) -> dict[str, AttributeValue]:
    """What `event` is about, as span attributes: its pod, its node, its plan, the pods a plan placed."""
    attributes: dict[str, AttributeValue] = {}
    if event is None:
        return attributes
    namespace, name = getattr(event, "namespace", None), getattr(event, "name", None)
    if isinstance(event, NodeObserved | NodeOptedOut):
        attributes[NODE] = event.name
    elif isinstance(namespace, str) and isinstance(name, str):
        attributes[POD] = f"{namespace}/{name}"
    node = getattr(event, "node", None)
    if isinstance(node, str):
        attributes[NODE] = node
    plan_id = getattr(event, "plan_id", None)
    if isinstance(plan_id, str):
        attributes[PLAN] = plan_id
    if isinstance(event, PlanComputed) and event.placed:
        attributes[PODS] = pods_attribute(event.placed)
    return attributes


@contextmanager
def publishing(subject: str, kind: str, message_id: str, event: Model | None = None) -> Iterator[Span]:
    with tracer().start_as_current_span(
        f"publish {kind}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "messaging.message.id": message_id,
            **event_attributes(event),
        },
    ) as span:
        yield span


@contextmanager
def handling(
    subject: str, kind: str, headers: Mapping[str, str] | None, consumer: str, event: Model | None = None
) -> Iterator[Span]:
    with tracer().start_as_current_span(
        f"process {kind}",
        context=extract(headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "messaging.consumer.group.name": consumer,
            **event_attributes(event),
        },
    ) as span:
        yield span
