"""The planner service's state for a benchmark snapshot, folded from the events it would receive.

Shared by the scale benchmark and the tests that compare incremental and full planning; it needs
nothing beyond the project itself (no SciPy).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from events.envelope import Envelope, Event
from events.nodes import GpuReport, NodeGpusReported, NodeObserved, SliceState
from events.pods import PodObserved
from services.planner.core.state import ClusterState

T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)

COMPUTE_CAPABILITY = {
    "NVIDIA-A100-SXM4-40GB": (8, 0),
    "NVIDIA-A100-SXM4-80GB": (8, 0),
    "NVIDIA-H100-80GB-HBM3": (9, 0),
    "NVIDIA-L4": (8, 9),
    "Tesla-T4": (7, 5),
}


def envelope(event: Event, at: datetime, serial: int) -> Envelope:
    return Envelope(id=f"bench-{serial}", time=at, source="benchmark", event=event)


def fold_state(snapshot: dict[str, Any]) -> ClusterState:
    """The planner service's state for `snapshot`, folded from the envelopes it would receive."""
    state = ClusterState()
    serial = 0
    for node in snapshot["nodes"]:
        gpus = tuple(
            GpuReport(
                index=gpu["index"],
                uuid=f"GPU-{node['name']}-{gpu['index']}",
                model=gpu["model"],
                memory_mib=gpu["memory_mib"],
                compute_capability=COMPUTE_CAPABILITY.get(gpu["model"], (8, 0)),
                slices=tuple(
                    SliceState(id=f"mps-{gpu['index']}-{n}", size_gb=s["size_gb"], used=s["used"])
                    for n, s in enumerate(gpu["slices"])
                ),
            )
            for gpu in node["gpus"]
        )
        for event in (NodeObserved(name=node["name"]), NodeGpusReported(node=node["name"], gpus=gpus)):
            serial += 1
            state.apply(envelope(event, T0, serial))
    for pod in snapshot["pending_pods"]:
        serial += 1
        state.apply(envelope(pending_pod_event(pod), T0, serial))
    return state


def pending_pod_event(pod: dict[str, Any]) -> PodObserved:
    return PodObserved(
        namespace=pod["namespace"],
        name=pod["name"],
        uid=f"uid-{pod['namespace']}-{pod['name']}",
        resource_version="1",
        size_gb=pod["size_gb"],
        priority=pod["priority"],
        created=datetime.fromisoformat(pod["created"].replace("Z", "+00:00")),
        phase="Pending",
    )
