"""Spans from the SDK to a traces file, and spans that name their pod (issue 12, "Visible").

The file exporter (`services.kit.telemetry`) writes real SDK spans as lines `services.traceview`
reads back, from the batch processor's thread, all of them by the time the provider shut down. The
bus's publish and process spans, the planner's decision and the admission webhook say which pod,
node and plan they are about, so that a pod's path, watcher to planner to node, can be picked out of
every span: shown here on the in-memory bus in virtual time, with a private tracer provider (the
global one is the process's, set once: these tests never touch it).
"""

from __future__ import annotations

import base64
import json
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

import events.tracing
import services.planner.service
import services.pod_watcher.gate
from events.memory import MemoryBroker, MemoryBus
from events.nodes import NodeObserved
from events.plans import NodeConfigApplied, Placement, PlanComputed
from events.tracing import event_attributes
from events.vocabulary import WEBHOOK_PATH
from services.kit.telemetry import JsonLinesSpanExporter, span_record, tracer_provider
from services.pod_watcher.gate import webhook_app
from services.traceview import SpanRecord, arrange, parse_spans, select
from tests.integration.test_planner_service import NODE, key, pending_pod, planning, publish_node, publish_pod
from tests.memorybus import MemoryLog, virtual_broker, virtual_time


class ThreadNoting(JsonLinesSpanExporter):
    """The file exporter, noting the thread of every export."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.threads: set[str] = set()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.threads.add(threading.current_thread().name)
        return super().export(spans)


def test_the_file_exporter_writes_a_line_per_span_on_the_batch_thread(tmp_path: Path) -> None:
    path = tmp_path / "made" / "mpsflow-test-1.jsonl"  # the directory is made at the first export
    provider = TracerProvider(
        resource=Resource.create({"service.name": "mpsflow-test", "k8s.node.name": "n1"})
    )
    exporter = ThreadNoting(path)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    tracer = provider.get_tracer("mpsflow")
    attributes: dict[str, AttributeValue] = {
        "mpsflow.pod": "ns/a",
        "mpsflow.pods": ["ns/a", "ns/b"],
        "mpsflow.placed": 2,
    }
    with (
        tracer.start_as_current_span(
            "publish PodObserved", kind=SpanKind.PRODUCER, attributes=attributes
        ) as top,
        tracer.start_as_current_span("process PodObserved") as child,
    ):
        child.set_status(Status(StatusCode.ERROR, "boom"))
    with tracer.start_as_current_span("plan", links=[Link(top.get_span_context())]):
        pass
    provider.shutdown()  # flushes what is still queued

    assert exporter.threads and threading.current_thread().name not in exporter.threads
    spans, unreadable = parse_spans(path.read_text().splitlines())
    assert unreadable == 0
    by_name = {span.name: span for span in spans}
    assert set(by_name) == {"publish PodObserved", "process PodObserved", "plan"}
    published, processed, plan = (
        by_name["publish PodObserved"],
        by_name["process PodObserved"],
        by_name["plan"],
    )
    context = top.get_span_context()
    assert (published.trace_id, published.span_id) == (f"{context.trace_id:032x}", f"{context.span_id:016x}")
    assert published.parent_span_id is None and processed.parent_span_id == published.span_id
    assert published.kind == "PRODUCER" and published.service == "mpsflow-test"
    assert published.resource["k8s.node.name"] == "n1"
    assert dict(published.attributes) == {
        "mpsflow.pod": "ns/a",
        "mpsflow.pods": ("ns/a", "ns/b"),
        "mpsflow.placed": 2,
    }
    assert 0 < published.start_unix_nano <= processed.start_unix_nano <= processed.end_unix_nano
    assert (processed.status, processed.status_description) == ("ERROR", "boom")
    assert plan.trace_id != published.trace_id and plan.links == (published.ref,)


def test_a_process_writes_its_own_file_where_the_environment_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MPSFLOW_TRACES_DIR", str(tmp_path))
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    provider = tracer_provider("mpsflow-planner")
    with provider.get_tracer("mpsflow").start_as_current_span("plan"):
        pass
    provider.shutdown()
    written = tmp_path / f"mpsflow-planner-{os.getpid()}.jsonl"
    assert [path.name for path in tmp_path.iterdir()] == [written.name]
    [line] = written.read_text().splitlines()
    assert SpanRecord.from_json(line).name == "plan"


def test_an_unwritable_file_fails_the_export_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "taken").write_text("a file where the directory should be")
    exporter = JsonLinesSpanExporter(tmp_path / "taken" / "spans.jsonl")
    provider = TracerProvider()
    with provider.get_tracer("t").start_as_current_span("x") as made:
        pass
    assert isinstance(made, ReadableSpan)
    assert exporter.export([made]) == SpanExportResult.FAILURE
    assert exporter.export([made]) == SpanExportResult.FAILURE
    assert len([r for r in caplog.records if "cannot write spans" in r.message]) == 1


@pytest.mark.parametrize(
    ("event", "expected"),
    [
        (pending_pod("a", 10), {"mpsflow.pod": "default/a"}),
        (
            pending_pod("a", 10).model_copy(update={"node": "n1"}),
            {"mpsflow.pod": "default/a", "mpsflow.node": "n1"},
        ),
        (NodeObserved(name="n1"), {"mpsflow.node": "n1"}),
        (
            PlanComputed(
                plan_id="p",
                nodes={},
                placed={f"ns/p{i:03}": Placement(node="n", gpu=0, size_gb=1) for i in range(60)},
            ),
            {"mpsflow.plan_id": "p", "mpsflow.pods": [f"ns/p{i:03}" for i in range(50)]},
        ),
        (None, {}),
    ],
    ids=["pod", "bound-pod", "node", "plan-truncated", "none"],
)
def test_an_event_says_what_it_is_about(event: Any, expected: dict[str, Any]) -> None:
    assert event_attributes(event) == expected


# --- on the bus ----------------------------------------------------------------------------------


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return virtual_time()


@pytest.fixture
def broker() -> MemoryBroker:
    return virtual_broker()


@pytest.fixture
def bus(broker: MemoryBroker) -> MemoryBus:
    return broker.bus("tests")


@pytest.fixture
def finished(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Every span the bus and the planner make, through a provider of this test's own."""
    provider = TracerProvider(resource=Resource.create({"service.name": "mpsflow-test"}))
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    def tracer() -> trace.Tracer:
        return provider.get_tracer("mpsflow")

    monkeypatch.setattr(events.tracing, "tracer", tracer)
    monkeypatch.setattr(services.planner.service, "tracer", tracer)
    monkeypatch.setattr(services.pod_watcher.gate, "tracer", tracer)
    yield exporter
    provider.shutdown()


@pytest.mark.anyio
async def test_a_pod_s_path_runs_from_its_observation_through_the_plan_to_its_node(
    bus: MemoryBus, broker: MemoryBroker, finished: InMemorySpanExporter
) -> None:
    await publish_node(bus)
    await publish_pod(bus, pending_pod("a", 10))
    await publish_pod(bus, pending_pod("other", 10).model_copy(update={"namespace": "elsewhere"}))
    log = MemoryLog(broker)
    async with planning(bus):
        await log.wait_for(PlanComputed, lambda p: key("a") in p.placed)
        await log.wait_for(NodeConfigApplied)  # the stand-in agents answered the plan
    records = [span_record(span) for span in finished.get_finished_spans()]

    path = select(records, key("a"))
    rows = [(row.depth, row.span.name, row.linked) for row in arrange(path)]
    assert rows[:2] == [(0, "publish PodObserved", False), (1, "process PodObserved", False)]
    plan = next(row for row in arrange(path) if row.span.name == "plan")
    assert plan.linked and plan.depth == 1
    assert key("a") in plan.span.attributes["mpsflow.pods"]  # type: ignore[operator]
    assert plan.span.attributes["mpsflow.plan_mode"] == "full"  # the first plan is computed from scratch
    names = {span.name for span in path if span.trace_id == plan.span.trace_id}
    assert {"publish NodePlanned", "process NodePlanned", "publish PlanComputed"} <= names
    planned = next(s for s in path if s.name == "publish NodePlanned")
    assert planned.attributes["mpsflow.node"] == NODE
    assert not any(span.attributes.get("mpsflow.pod") == "elsewhere/other" for span in path)
    assert all(span.attributes.get("mpsflow.pod") in (None, key("a")) for span in path)


@pytest.mark.anyio
async def test_the_admission_webhook_s_span_names_the_pod_it_gated(finished: InMemorySpanExporter) -> None:
    pod = {
        "metadata": {"name": "a", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "resources": {"limits": {"nvidia.com/gpu-10gb": 1}}}]},
    }
    review = {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "u1",
            "kind": {"kind": "Pod"},
            "operation": "CREATE",
            "namespace": "default",
            "name": "a",
            "object": pod,
        },
    }
    async with TestClient(TestServer(webhook_app())) as client:
        answered = await client.post(WEBHOOK_PATH, json=review)
        body = await answered.json()
    assert json.loads(base64.b64decode(body["response"]["patch"]))
    [admitted] = [span_record(s) for s in finished.get_finished_spans()]
    assert admitted.name == "admit pod" and admitted.kind == "SERVER"
    assert admitted.attributes == {"mpsflow.pod": "default/a", "mpsflow.gated": True}
