"""One trace spans the pipeline: pod watcher -> planner -> config publisher -> node agent.

The demo runs with its services exporting spans over OTLP/HTTP to a small receiver in this
test, exactly as they would to Jaeger or an OpenTelemetry Collector.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from threading import Thread

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

pytestmark = pytest.mark.e2e

SCENARIO = """
nodes:
  - name: node-1
    labels: {nos.nebuly.com/gpu-partitioning: mps}
    gpus: [{model: NVIDIA-L4, memory_mib: 23034}]
workload:
  - at: 0
    pod:
      metadata: {name: traced, namespace: default}
      spec:
        hostIPC: true
        containers: [{name: main, image: busybox, resources: {limits: {nvidia.com/gpu-10gb: 1}}}]
timeout: 30
"""


@dataclass(frozen=True)
class Span:
    service: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes
    links: tuple[bytes, ...]


class Receiver:
    """An OTLP/HTTP traces endpoint on a thread of its own, keeping every span it gets."""

    def __init__(self) -> None:
        self.spans: list[Span] = []

    async def export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        exported = ExportTraceServiceRequest.FromString(body)
        for resource_spans in exported.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append(
                        Span(
                            attributes.get("service.name", "?"),
                            span.name,
                            span.trace_id,
                            span.span_id,
                            span.parent_span_id,
                            tuple(link.span_id for link in span.links),
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    @contextmanager
    def serving(self) -> Iterator[str]:
        """Serve on a free loopback port while in the block, which is given its endpoint URL."""
        import asyncio

        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_post("/v1/traces", self.export)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", 0).start())
        thread = Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            loop.run_until_complete(runner.cleanup())
            loop.close()


@pytest.fixture(scope="module")
def spans(tmp_path_factory: pytest.TempPathFactory) -> list[Span]:
    receiver = Receiver()
    scenario = tmp_path_factory.mktemp("trace") / "scenario.yaml"
    scenario.write_text(SCENARIO)
    with receiver.serving() as endpoint:
        environment = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        finished = subprocess.run(
            [sys.executable, "-m", "services.cli", "demo", "--scenario", str(scenario)],
            capture_output=True,
            text=True,
            timeout=90,
            env=environment,
            check=False,
        )
        assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    return receiver.spans


def test_every_service_exports_spans(spans: list[Span]) -> None:
    services = {span.service for span in spans}
    assert {
        "mpsflow-pod-watcher",
        "mpsflow-planner",
        "mpsflow-config-publisher",
        "mpsflow-node-agent",
    } <= services


def test_a_plan_links_to_the_pod_observations_it_folded_in(spans: list[Span]) -> None:
    pod_publishes = {
        s.span_id for s in spans if s.service == "mpsflow-pod-watcher" and s.name == "publish PodObserved"
    }
    plans = [s for s in spans if s.service == "mpsflow-planner" and s.name == "plan"]
    assert pod_publishes and plans
    assert all(not plan.parent_id for plan in plans)
    assert pod_publishes & {link for plan in plans for link in plan.links}


def test_the_plan_trace_reaches_the_config_publisher_and_the_node_agent(spans: list[Span]) -> None:
    plan_traces = {s.trace_id for s in spans if s.service == "mpsflow-planner" and s.name == "plan"}
    publisher = [
        s for s in spans if s.service == "mpsflow-config-publisher" and s.name == "process NodePlanned"
    ]
    agent = [s for s in spans if s.service == "mpsflow-node-agent" and s.name == "apply node config"]
    assert publisher and agent
    assert {s.trace_id for s in publisher} <= plan_traces
    assert {s.trace_id for s in agent} & plan_traces
    by_id = {span.span_id: span for span in spans}
    for span in publisher:
        parent = by_id.get(span.parent_id)
        assert (
            parent is not None
            and parent.service == "mpsflow-planner"
            and parent.name == "publish NodePlanned"
        )
