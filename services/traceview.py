"""`mpsflow trace NAMESPACE/POD`: one pod's path through mpsflow, as a waterfall of spans in a terminal.

Where it sits: every mpsflow process writes its finished spans as JSON lines, one file per process,
into the directory named by `MPSFLOW_TRACES_DIR` (`services.kit.telemetry`, which writes them with
`SpanRecord.to_json`; `mpsflow demo --traces DIR` sets it for every process it starts). This module
reads those files back, picks the spans of one pod's path and draws them. The format is
docs/formats.md §4.

A pod's path is every trace holding a span about the pod (attribute `mpsflow.pod`, or the pod among a
plan's `mpsflow.pods`: `events.tracing.event_attributes`), and every trace that links to a span of
those: the planner folds many events into one decision, whose span starts a trace of its own with a
link to each event it folded in; the plan then travels on to the config publisher and the node
agents in that trace. A trace joined by a link is drawn under the span it links to, marked as such.

Everything here but `read_spans` is a pure function of its arguments; `read_spans` reads the files it
is pointed at and nothing else. The module never writes a file, never connects anywhere, never reads
the clock, and never imports the OpenTelemetry SDK: the same files always give the same output.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACES_DIR_ENV = "MPSFLOW_TRACES_DIR"
"""Where each process writes its spans, one `<service.name>-<pid>.jsonl` per process."""
DEFAULT_TRACES_DIR_NAME = "mpsflow-traces"
"""Under the temporary directory: where `mpsflow demo` writes by default, and `mpsflow trace` reads."""
POD_ATTRIBUTE = "mpsflow.pod"
PODS_ATTRIBUTE = "mpsflow.pods"
NODE_ATTRIBUTE = "mpsflow.node"
TRACE_IDS_SHOWN = 3
"""Trace ids the header names in full (the pod's own first: the one to open in a tracing UI)."""
NODE_RESOURCE = "k8s.node.name"
SERVICE_PREFIX = "mpsflow-"
MIN_BAR = 10
"""The bar is never narrower than this, however narrow the terminal."""
MAX_NAME_SHARE = 0.45
"""The span names' column takes at most this share of the width; longer names are cut."""

Scalar = str | bool | int | float
Attribute = Scalar | tuple[Scalar, ...]
SpanRef = tuple[str, str]
"""(trace id, span id), both lower-case hex as in W3C trace context."""


class TracesDirError(Exception):
    """The traces directory cannot be read (missing, not a directory, not readable)."""


@dataclass(frozen=True)
class SpanRecord:
    """One finished span, as one line of a traces file: ids in hex, times in Unix nanoseconds."""

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    service: str
    start_unix_nano: int
    end_unix_nano: int
    kind: str = "INTERNAL"
    status: str = "UNSET"
    status_description: str | None = None
    attributes: Mapping[str, Attribute] = field(default_factory=dict)
    links: tuple[SpanRef, ...] = ()
    resource: Mapping[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> SpanRef:
        return (self.trace_id, self.span_id)

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_unix_nano - self.start_unix_nano)

    def to_json(self) -> str:
        """The span as one line of a traces file (without the newline)."""
        document: dict[str, Any] = {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "service": self.service,
            "start_unix_nano": self.start_unix_nano,
            "end_unix_nano": self.end_unix_nano,
            "kind": self.kind,
            "status": self.status,
            "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in self.attributes.items()},
            "links": [{"trace_id": trace_id, "span_id": span_id} for trace_id, span_id in self.links],
            "resource": dict(self.resource),
        }
        if self.status_description is not None:
            document["status_description"] = self.status_description
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> SpanRecord:
        """A span from one line of a traces file; ValueError naming the field when it is not one."""
        document = json.loads(line)
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        parent = document.get("parent_span_id")
        description = document.get("status_description")
        links = document.get("links") or []
        if not isinstance(links, list):
            raise ValueError("links: not a list")
        return cls(
            trace_id=_text(document, "trace_id"),
            span_id=_text(document, "span_id"),
            parent_span_id=None if parent is None else _text(document, "parent_span_id"),
            name=_text(document, "name"),
            service=_text(document, "service"),
            start_unix_nano=_whole(document, "start_unix_nano"),
            end_unix_nano=_whole(document, "end_unix_nano"),
            kind=str(document.get("kind", "INTERNAL")),
            status=str(document.get("status", "UNSET")),
            status_description=None if description is None else str(description),
            attributes=_attributes(document.get("attributes") or {}),
            links=tuple((_text(link, "trace_id"), _text(link, "span_id")) for link in links),
            resource={str(k): str(v) for k, v in (document.get("resource") or {}).items()},
        )


def _text(document: Any, key: str) -> str:
    value = document.get(key) if isinstance(document, dict) else None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key}: not a non-empty string")
    return value


def _whole(document: dict[str, Any], key: str) -> int:
    value = document.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key}: not a whole number")
    return value


def _attributes(raw: object) -> dict[str, Attribute]:
    if not isinstance(raw, dict):
        raise ValueError("attributes: not an object")
    attributes: dict[str, Attribute] = {}
    for key, value in raw.items():
        if isinstance(value, list):
            attributes[str(key)] = tuple(v for v in value if isinstance(v, str | bool | int | float))
        elif isinstance(value, str | bool | int | float):
            attributes[str(key)] = value
    return attributes


# --- reading ---------------------------------------------------------------------------------------


def parse_spans(lines: Iterable[str]) -> tuple[list[SpanRecord], int]:
    """The spans of `lines` (blank lines skipped), and how many lines were not spans (a file cut
    short by a killed process ends in half a line)."""
    spans: list[SpanRecord] = []
    unreadable = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            spans.append(SpanRecord.from_json(line))
        except ValueError:  # json.JSONDecodeError is one
            unreadable += 1
    return spans, unreadable


def read_spans(directory: Path) -> tuple[list[SpanRecord], int]:
    """Every span of the `*.jsonl` files in `directory` (file by file, in name order), and how many
    lines were not spans. TracesDirError when the directory cannot be read."""
    if not directory.is_dir():
        raise TracesDirError(
            f"{directory}: no such directory" if not directory.exists() else f"{directory}: not a directory"
        )
    try:
        files = sorted(path for path in directory.iterdir() if path.suffix == ".jsonl" and path.is_file())
        spans: list[SpanRecord] = []
        unreadable = 0
        for path in files:
            found, bad = parse_spans(path.read_text(encoding="utf-8", errors="replace").splitlines())
            spans += found
            unreadable += bad
    except OSError as error:
        raise TracesDirError(f"{directory}: {error.strerror or error}") from error
    return spans, unreadable


def default_traces_dir(environment: Mapping[str, str], temporary: str) -> Path:
    """`$MPSFLOW_TRACES_DIR` if set, else `mpsflow-traces` under the `temporary` directory."""
    return Path(environment.get(TRACES_DIR_ENV) or Path(temporary) / DEFAULT_TRACES_DIR_NAME)


# --- selecting -------------------------------------------------------------------------------------


def concerns(span: SpanRecord, pod: str) -> bool:
    """Whether `span` is about `pod` ("namespace/name"): it names the pod, or a plan placed it."""
    pods = span.attributes.get(PODS_ATTRIBUTE)
    return span.attributes.get(POD_ATTRIBUTE) == pod or (isinstance(pods, tuple) and pod in pods)


def _order(span: SpanRecord) -> tuple[int, int, str, str, str]:
    return (span.start_unix_nano, span.end_unix_nano, span.name, span.trace_id, span.span_id)


def select(spans: Iterable[SpanRecord], pod: str) -> list[SpanRecord]:
    """The spans of `pod`'s path, by start: every trace with a span about the pod, and every trace
    with a span that links to a span of those, less what is about something else. A plan decides
    for many pods and nodes at once, so a span that names another pod, or (once the pod's own spans
    name its node) another node, is left out with everything under it. A span written twice counts
    once."""
    unique: dict[SpanRef, SpanRecord] = {}
    for span in spans:
        unique.setdefault(span.ref, span)
    own = {span.trace_id for span in unique.values() if concerns(span, pod)}
    linked = {
        span.trace_id
        for span in unique.values()
        if span.trace_id not in own and any(trace_id in own for trace_id, _ in span.links)
    }
    nodes = {
        str(span.attributes[NODE_ATTRIBUTE])
        for span in unique.values()
        if concerns(span, pod) and NODE_ATTRIBUTE in span.attributes
    }

    def elsewhere(span: SpanRecord) -> bool:
        if concerns(span, pod):
            return False
        other_pod = POD_ATTRIBUTE in span.attributes
        node = span.attributes.get(NODE_ATTRIBUTE)
        return other_pod or (bool(nodes) and node is not None and str(node) not in nodes)

    candidates = {ref: s for ref, s in unique.items() if s.trace_id in own | linked}
    left_out: dict[SpanRef, bool] = {}

    def is_left_out(span: SpanRecord) -> bool:
        """About something else, or under a span that is (an unwritten parent leaves nothing out)."""
        chain: list[SpanRecord] = []
        current: SpanRecord | None = span
        verdict = False
        while current is not None and current.ref not in left_out:
            chain.append(current)
            if elsewhere(current):
                verdict = True
                break
            parent = current.parent_span_id
            current = candidates.get((current.trace_id, parent)) if parent is not None else None
        else:
            verdict = left_out[current.ref] if current is not None else False
        for seen in chain:
            left_out[seen.ref] = verdict
        return verdict

    return sorted((s for s in candidates.values() if not is_left_out(s)), key=_order)


# --- arranging and drawing -------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the waterfall: a span, how deep it sits, and whether a link (not a parent) put it
    there."""

    span: SpanRecord
    depth: int
    linked: bool = False


def arrange(spans: Sequence[SpanRecord]) -> list[Row]:
    """`spans` as a tree, depth first, children by start: a span under its parent; a span without one
    (the root of a trace) under the latest span it links to that started no later than it (or the
    latest it links to at all), marked linked; the rest at the top, by start."""
    by_ref = {span.ref: span for span in spans}
    children: dict[SpanRef, list[tuple[SpanRecord, bool]]] = {}
    tops: list[SpanRecord] = []
    for span in sorted(spans, key=_order):
        parent = (span.trace_id, span.parent_span_id) if span.parent_span_id is not None else None
        if parent is not None and parent in by_ref:
            children.setdefault(parent, []).append((span, False))
            continue
        anchor = _anchor(span, by_ref)
        if anchor is None:
            tops.append(span)
        else:
            children.setdefault(anchor.ref, []).append((span, True))
    reached: set[SpanRef] = set()

    def reach(start: SpanRecord) -> None:
        stack = [start]
        while stack:
            span = stack.pop()
            if span.ref not in reached:
                reached.add(span.ref)
                stack.extend(child for child, _ in children.get(span.ref, []))

    for top in tops:
        reach(top)
    for span in sorted(spans, key=_order):  # roots that link to each other in a circle: the first is a top
        if span.ref not in reached:
            tops.append(span)
            reach(span)
    rows: list[Row] = []
    placed: set[SpanRef] = set()
    for top in sorted(tops, key=_order):
        stack: list[tuple[SpanRecord, int, bool]] = [(top, 0, False)]
        while stack:
            span, depth, linked = stack.pop()
            if span.ref in placed:
                continue
            placed.add(span.ref)
            rows.append(Row(span, depth, linked))
            below = sorted(children.get(span.ref, []), key=lambda child: _order(child[0]))
            stack.extend((child, depth + 1, is_link) for child, is_link in reversed(below))
    return rows


def _anchor(span: SpanRecord, by_ref: Mapping[SpanRef, SpanRecord]) -> SpanRecord | None:
    targets = [by_ref[link] for link in span.links if link in by_ref and link[0] != span.trace_id]
    if not targets:
        return None
    before = [target for target in targets if target.start_unix_nano <= span.start_unix_nano]
    return max(before or targets, key=_order)


@dataclass(frozen=True)
class Glyphs:
    """The characters the waterfall is drawn with."""

    link: str
    fill: str
    cut: str


UNICODE = Glyphs(link="↳ link: ", fill="█", cut="…")
ASCII = Glyphs(link="-> link: ", fill="#", cut="~")


def service_label(span: SpanRecord) -> str:
    """The service as `mpsflow run` names it, with the node for a node's own processes."""
    service = span.service.removeprefix(SERVICE_PREFIX)
    node = span.resource.get(NODE_RESOURCE)
    return f"{service}@{node}" if node else service


def _ms(nanoseconds: int) -> str:
    return f"{nanoseconds / 1e6:.1f}"


def _cut(text: str, width: int, glyphs: Glyphs) -> str:
    return text if len(text) <= width else text[: max(0, width - len(glyphs.cut))] + glyphs.cut


def bar(start: int, end: int, total: int, cells: int, fill: str) -> str:
    """`cells` characters with `fill` where [start, end) lies in [0, total): at least one cell, never
    more than `cells`."""
    total = max(1, total)
    first = min(cells - 1, max(0, start * cells // total))
    last = min(cells, max(first + 1, -(-end * cells // total)))
    return " " * first + fill * (last - first) + " " * (cells - last)


def render(pod: str, rows: Sequence[Row], *, width: int = 100, ascii_only: bool = False) -> str:
    """The waterfall: a header (the pod, its span and trace count, the total time, the trace ids),
    then a row per span: name indented by depth, service, start after the first span and duration
    (ms), and a bar placing the span in the whole, fitted to `width` columns (the bar keeps at least
    `MIN_BAR`)."""
    glyphs = ASCII if ascii_only else UNICODE
    if not rows:
        return f"{pod}: no spans\n"
    first = min(row.span.start_unix_nano for row in rows)
    total = max(row.span.end_unix_nano for row in rows) - first
    traces = list(dict.fromkeys(row.span.trace_id for row in rows))
    header = (
        f"{pod}: {len(rows)} spans in {len(traces)} trace{'s' if len(traces) != 1 else ''}, "
        f"{_ms(total)} ms; trace ids {' '.join(traces[:TRACE_IDS_SHOWN])}"
        + (f" and {len(traces) - TRACE_IDS_SHOWN} more" if len(traces) > TRACE_IDS_SHOWN else "")
    )
    labels = [
        "  " * row.depth
        + (glyphs.link if row.linked else "")
        + row.span.name
        + (" [error]" if row.span.status == "ERROR" else "")
        for row in rows
    ]
    services = [service_label(row.span) for row in rows]
    starts = [f"+{_ms(row.span.start_unix_nano - first)}" for row in rows]
    durations = [f"{_ms(row.span.duration_ns)}ms" for row in rows]
    name_width = min(max(map(len, labels)), max(16, int(width * MAX_NAME_SHARE)))
    service_width = min(max(map(len, services)), 28)
    start_width, duration_width = max(map(len, starts)), max(map(len, durations))
    cells = max(MIN_BAR, width - (name_width + service_width + start_width + duration_width + 4) - 2)
    lines = [header]
    for row, label, service, start, duration in zip(rows, labels, services, starts, durations, strict=True):
        offset = row.span.start_unix_nano - first
        drawn = bar(offset, offset + row.span.duration_ns, total, cells, glyphs.fill)
        name, where = _cut(label, name_width, glyphs), _cut(service, service_width, glyphs)
        lines.append(
            f"{name:<{name_width}} {where:<{service_width}} "
            f"{start:>{start_width}} {duration:>{duration_width}} |{drawn}|"
        )
    return "\n".join(lines) + "\n"


def waterfall(
    spans: Iterable[SpanRecord], pod: str, *, width: int = 100, ascii_only: bool = False
) -> str | None:
    """The waterfall of `pod`'s path among `spans`, or None when no span is about the pod."""
    selected = select(spans, pod)
    if not selected:
        return None
    return render(pod, arrange(selected), width=width, ascii_only=ascii_only)
