"""End to end: `mpsflow demo --traces DIR` writes every process's spans, and `mpsflow trace` draws a
pod's path from them, admission webhook and pod watcher through the planner to the node agent.

One pod on one node, at fast timing, so the demo takes seconds. `--otlp-endpoint` sends the same spans
to a small OTLP receiver (tests/e2e/test_tracing.py's), as it would to a local Jaeger.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from services.traceview import read_spans
from tests.e2e.test_tracing import Receiver

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
timing: {node_status_period_s: 1.0, watch_delay_s: 0.05}
timeout: 30
"""


@dataclass(frozen=True)
class Run:
    traces: Path
    stdout: str
    receiver: Receiver


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    base = tmp_path_factory.mktemp("waterfall")
    (base / "scenario.yaml").write_text(SCENARIO)
    traces = base / "traces"
    traces.mkdir()
    (traces / "mpsflow-planner-1.jsonl").write_text("left by an earlier run\n")
    receiver = Receiver()
    environment = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    environment.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    with receiver.serving() as endpoint:
        command = [
            sys.executable,
            "-m",
            "services.cli",
            "demo",
            "--scenario",
            str(base / "scenario.yaml"),
            "--traces",
            str(traces),
            "--otlp-endpoint",
            endpoint,
        ]
        finished = subprocess.run(
            command, capture_output=True, text=True, timeout=90, env=environment, check=False
        )
        assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    yield Run(traces, finished.stdout, receiver)


def trace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "trace", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        check=False,
    )


def test_every_process_writes_a_file_of_its_own_and_the_demo_says_where(run: Run) -> None:
    services = sorted(re.sub(r"-\d+\.jsonl$", "", path.name) for path in run.traces.iterdir())
    assert services == [  # the MPS daemon keeper makes no span, so it has no file
        "mpsflow-admission-webhook",
        "mpsflow-config-publisher",
        "mpsflow-node-agent",
        "mpsflow-planner",
        "mpsflow-pod-watcher",
    ]
    assert not (run.traces / "mpsflow-planner-1.jsonl").exists(), "an earlier run's spans are gone"
    assert f"traces in {run.traces}; one pod's path: mpsflow trace default/traced --traces {run.traces}" in (
        run.stdout
    )


def test_the_files_hold_what_went_over_otlp(run: Run) -> None:
    spans, unreadable = read_spans(run.traces)
    assert unreadable == 0
    in_files = {(bytes.fromhex(s.trace_id), bytes.fromhex(s.span_id)) for s in spans}
    over_otlp = {(s.trace_id, s.span_id) for s in run.receiver.spans}
    assert over_otlp and over_otlp <= in_files


def test_mpsflow_trace_draws_the_pod_s_path_from_the_webhook_to_the_node_agent(run: Run) -> None:
    drawn = trace("default/traced", "--traces", str(run.traces), "--width", "120")
    assert drawn.returncode == 0, drawn.stderr
    header, *rows = drawn.stdout.splitlines()
    assert header.startswith("default/traced: ")
    assert all(row.endswith("|") for row in rows)

    def first(name: str, service: str) -> int:
        return next(i for i, row in enumerate(rows) if name in row and f" {service}" in row)

    path = [
        first("admit pod", "admission-webhook"),
        first("publish PodObserved", "pod-watcher"),
        first("process PodObserved", "planner"),
        first("↳ link: plan", "planner"),
        first("process NodePlanned", "config-publisher"),
        first("apply node config", "node-agent@node-1"),
    ]
    assert path == sorted(path), drawn.stdout
    assert first("process PodReleased", "pod-watcher") > path[-1], drawn.stdout


def test_mpsflow_trace_of_a_pod_that_never_was_exits_1(run: Run) -> None:
    missing = trace("default/never", "--traces", str(run.traces))
    assert missing.returncode == 1
    assert missing.stdout == "" and "no spans of default/never" in missing.stderr
