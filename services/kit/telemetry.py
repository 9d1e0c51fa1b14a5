"""The only place the OpenTelemetry SDK is configured, once per process.

Spans go to an OTLP/HTTP collector (Jaeger, Tempo, an OTel Collector) when
`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, and as JSON lines to
`$MPSFLOW_TRACES_DIR/<service.name>-<pid>.jsonl` when `MPSFLOW_TRACES_DIR` is set (one file per
process, so that no two processes interleave their writes; `mpsflow trace` reads them, format in
docs/formats.md §4); nowhere otherwise. Exporting runs on the batch processor's thread, never on the
event loop, and the spans still queued are written when the provider shuts down.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import format_span_id, format_trace_id

from services.traceview import TRACES_DIR_ENV, Attribute, SpanRecord

log = logging.getLogger(__name__)


def span_record(span: ReadableSpan) -> SpanRecord:
    """A finished span as a line of a traces file holds it."""
    context = span.get_span_context()
    if context is None:  # never, for a span the SDK made
        context = trace.INVALID_SPAN_CONTEXT
    resource = {key: str(value) for key, value in span.resource.attributes.items()}
    attributes: dict[str, Attribute] = {}
    for key, value in (span.attributes or {}).items():
        if isinstance(value, str | bool | int | float):
            attributes[key] = value
        elif isinstance(value, Sequence):
            attributes[key] = tuple(v for v in value if isinstance(v, str | bool | int | float))
    return SpanRecord(
        trace_id=format_trace_id(context.trace_id),
        span_id=format_span_id(context.span_id),
        parent_span_id=None if span.parent is None else format_span_id(span.parent.span_id),
        name=span.name,
        service=resource.get("service.name", ""),
        start_unix_nano=span.start_time or 0,
        end_unix_nano=span.end_time or span.start_time or 0,
        kind=span.kind.name,
        status=span.status.status_code.name,
        status_description=span.status.description,
        attributes=attributes,
        links=tuple(
            (format_trace_id(link.context.trace_id), format_span_id(link.context.span_id))
            for link in span.links
        ),
        resource=resource,
    )


class JsonLinesSpanExporter(SpanExporter):
    """Writes finished spans to one file, a JSON object a line, flushed after every batch (so that a
    process killed outright loses only the batch it had not exported yet). The file and its directory
    are made at the first export; a write that fails is logged once and the batch dropped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None
        self._lock = threading.Lock()
        self._failed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(span_record(span).to_json() + "\n" for span in spans)
        with self._lock:
            try:
                if self._file is None:
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                    self._file = self.path.open("a", encoding="utf-8")
                self._file.write(lines)
                self._file.flush()
            except OSError as error:
                if not self._failed:
                    log.warning("cannot write spans to %s: %s", self.path, error)
                    self._failed = True
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def traces_file(directory: Path, service: str, pid: int) -> Path:
    """This process's own traces file in `directory`."""
    return directory / f"{service.replace(os.sep, '_')}-{pid}.jsonl"


def tracer_provider(service: str, **attributes: str) -> TracerProvider:
    """A provider for `service`, exporting as the environment says; not installed globally."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": service, "service.namespace": "mpsflow", **attributes})
    )
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    directory = os.environ.get(TRACES_DIR_ENV)
    if directory:
        exporter = JsonLinesSpanExporter(traces_file(Path(directory), service, os.getpid()))
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup_tracing(service: str, **attributes: str) -> TracerProvider:
    """Configure this process's tracing, once: `tracer_provider`, installed as the global provider."""
    provider = tracer_provider(service, **attributes)
    trace.set_tracer_provider(provider)
    return provider
