"""`mpsflow explain NAMESPACE/POD` as a user runs it, on a real nats-server holding real events."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime

import pytest

from events import subjects
from events.envelope import Envelope, Event, encode
from events.jetstream import EventBus
from events.nodes import GpuReport, NodeGpusReported, SliceState
from events.plans import NodeLayout, Placement, PlanComputed, SliceSpec
from events.pods import PodObserved, PodRejected, PodReleased, PodUnplaced
from simulation.nats_server import LocalNatsServer

pytestmark = pytest.mark.anyio

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
T0 = datetime(2026, 12, 2, 21, 50, tzinfo=UTC)


def mpsflow(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], capture_output=True, text=True, timeout=60, check=False
    )


async def put(bus: EventBus, subject: str, event: Event, traced: bool = False) -> None:
    """Publish as a service does, with the trace context header when `traced`."""
    envelope = Envelope(id=f"{subject}/{event.kind}", time=T0, source="tests", event=event)
    headers = {"Nats-Msg-Id": envelope.id}
    if traced:
        headers["traceparent"] = f"00-{TRACE}-00f067aa0ba902b7-01"
    await bus.js.publish(subject, encode(envelope), headers=headers)


def gpu(index: int, model: str, memory_mib: int, *slices: tuple[int, bool]) -> GpuReport:
    return GpuReport(
        index=index,
        uuid=f"GPU-{model}-{index}",
        model=model,
        memory_mib=memory_mib,
        compute_capability=(8, 0),
        slices=tuple(SliceState(id=f"s{index}-{n}", size_gb=s, used=u) for n, (s, u) in enumerate(slices)),
    )


def waiting(name: str, size_gb: int) -> PodObserved:
    return PodObserved(
        namespace="ml",
        name=name,
        uid=f"u-{name}",
        resource_version="1",
        size_gb=size_gb,
        created=T0,
        phase="Pending",
        gated=True,
    )


async def test_a_waiting_pod_is_explained_with_the_reason_candidates_and_trace(
    bus: EventBus, nats_server: LocalNatsServer
) -> None:
    await put(bus, subjects.pod_subject("ml", "train"), waiting("train", 30), traced=True)
    reason = "capacity exhausted: needs 30 GiB on one GPU; the most any GPU could offer now is 20 GiB"
    await put(
        bus, subjects.plan_subject(), PlanComputed(plan_id="p7", nodes={}, unplaced={"ml/train": reason})
    )
    await put(
        bus,
        subjects.gpus_subject("a100-1"),
        NodeGpusReported(
            node="a100-1",
            gpus=(
                gpu(0, "NVIDIA-A100-SXM4-80GB", 81920, (40, True), (20, True)),
                gpu(1, "NVIDIA-A100-SXM4-80GB", 81920, (60, True), (5, False)),
            ),
        ),
    )
    await put(
        bus, subjects.gpus_subject("l4-1"), NodeGpusReported(node="l4-1", gpus=(gpu(0, "NVIDIA-L4", 23034),))
    )
    finished = mpsflow("explain", "--nats-url", nats_server.url, "ml/train")
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert (
        lines[0]
        == "pod ml/train: asks for nvidia.com/gpu-30gb (30 GiB), priority 0, created 2026-12-02 21:50:00 UTC"
    )
    assert "held by mpsflow's scheduling gate" in lines[1]
    assert lines[2] == f"  planner: plan p7 could not place it: {reason}"
    assert lines[3].startswith("  candidate GPUs (2 can hold 30 GiB")  # not the 22 GiB L4
    assert lines[5].split()[:5] == ["a100-1", "0", "NVIDIA-A100-SXM4-80GB", "20", "GiB"]
    assert lines[5].endswith("40* 20*")
    assert lines[6].split()[:4] == ["a100-1", "1", "NVIDIA-A100-SXM4-80GB", "20"]
    assert lines[-1] == f"trace: {TRACE} (open it in the tracing UI, or run: mpsflow trace ml/train)"


async def test_a_released_and_placed_pod_says_where_it_went(
    bus: EventBus, nats_server: LocalNatsServer
) -> None:
    pod = waiting("serve", 10).model_copy(update={"gated": False, "released_to": "a100-1"})
    await put(bus, subjects.pod_subject("ml", "serve"), pod)
    await put(
        bus,
        subjects.release_subject("ml", "serve"),
        PodReleased(
            namespace="ml",
            name="serve",
            uid="u-serve",
            node="a100-1",
            size_gb=10,
            plan_id="p8",
        ),
    )
    layout = NodeLayout(gpus={1: (SliceSpec(size_gb=10),)})
    await put(
        bus,
        subjects.plan_subject(),
        PlanComputed(
            plan_id="p8",
            nodes={"a100-1": layout},
            placed={"ml/serve": Placement(node="a100-1", gpu=1, size_gb=10)},
        ),
    )
    finished = mpsflow("explain", "--nats-url", nats_server.url, "ml/serve")
    assert finished.returncode == 0, finished.stderr
    assert "released to node a100-1, waiting for the scheduler to bind it" in finished.stdout
    assert "  planner: released it to node a100-1 for a 10 GiB slice (plan p8" in finished.stdout
    assert "  planner: plan p8 places it on node a100-1, GPU 1" in finished.stdout


async def test_a_rejected_pod_says_the_rule(bus: EventBus, nats_server: LocalNatsServer) -> None:
    await put(
        bus,
        subjects.pod_subject("ml", "zero"),
        PodRejected(
            namespace="ml",
            name="zero",
            uid="u",
            resource_version="1",
            reason="MpsSliceSizeZero",
            message="container 'main' asks for nvidia.com/gpu-0gb: a slice is at least 1 GiB",
        ),
    )
    await put(
        bus,
        subjects.unplaced_subject("ml", "zero"),
        PodUnplaced(namespace="ml", name="zero", uid="u", reason="x"),
    )
    finished = mpsflow("explain", "--nats-url", nats_server.url, "ml/zero")
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.splitlines()[1] == (
        "  MpsSliceSizeZero: container 'main' asks for nvidia.com/gpu-0gb: a slice is at least 1 GiB"
    )


async def test_a_pod_mpsflow_never_saw_exits_1_saying_so(bus: EventBus, nats_server: LocalNatsServer) -> None:
    finished = mpsflow("explain", "--nats-url", nats_server.url, "ml/unknown")
    assert finished.returncode == 1
    assert finished.stdout == ""
    assert finished.stderr.startswith("mpsflow explain: no event names ml/unknown in the stream")


def test_a_malformed_pod_name_is_refused() -> None:
    finished = mpsflow("explain", "no-slash")
    assert finished.returncode == 2
    assert "'no-slash' is not NAMESPACE/POD" in finished.stderr
