"""`mpsflow explain NAMESPACE/POD`: why a slice pod waits, or where it went, from the live stream.

Where it sits: a command for people, beside the services. The command line reads the current level
of the pod's subjects (what the pod watcher last saw of it, the planner's last reason or release),
the last whole plan, and every node's last GPU report, then `explain` here turns them into text:
the pod's request, its state and the planner's reason, the candidate GPUs (those large enough for
it, with their free memory and layout) and the trace id to open in the tracing UI or give to
`mpsflow trace`. Pure: it performs no I/O, reads no clock and decides nothing; it only reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from events.envelope import Envelope
from events.nodes import GpuReport, NodeGpusReported
from events.plans import PlanComputed
from events.pods import PodDeleted, PodObserved, PodRejected, PodReleased, PodUnplaced
from events.vocabulary import MIB_PER_GIB

CANDIDATES_SHOWN = 10
"""Candidate GPUs listed, the roomiest first."""


@dataclass(frozen=True)
class Received:
    """One event as the stream holds it, with the headers it was published with."""

    envelope: Envelope
    headers: Mapping[str, str]

    @property
    def trace_id(self) -> str | None:
        """The trace of the span that published it (W3C traceparent: version-trace-span-flags)."""
        parts = self.headers.get("traceparent", "").split("-")
        return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def _when(received: Received) -> str:
    return received.envelope.time.strftime("%Y-%m-%d %H:%M:%S UTC")


def _free_gib(gpu: GpuReport) -> int:
    capacity = max(0, gpu.memory_mib - gpu.reserved_mib) // MIB_PER_GIB
    return max(0, capacity - sum(s.size_gb for s in gpu.slices if s.used))


def _layout(gpu: GpuReport) -> str:
    return " ".join(f"{s.size_gb}{'*' if s.used else ''}" for s in gpu.slices) or "(no slices)"


def _state(pod: PodObserved) -> str:
    if pod.node is not None:
        return f"{pod.phase}, bound to node {pod.node}"
    if pod.released_to is not None:
        return f"{pod.phase}, released to node {pod.released_to}, waiting for the scheduler to bind it"
    if pod.gated:
        return f"{pod.phase}, held by mpsflow's scheduling gate until a slice of its size is ready"
    return f"{pod.phase}, not gated (it bypassed the admission webhook)"


def candidates(size_gb: int, reports: Iterable[NodeGpusReported]) -> list[tuple[str, GpuReport]]:
    """GPUs whose capacity could ever hold `size_gb`, the most free memory first."""
    large_enough = [
        (report.node, gpu)
        for report in reports
        for gpu in report.gpus
        if (gpu.memory_mib - gpu.reserved_mib) // MIB_PER_GIB >= size_gb
    ]
    return sorted(large_enough, key=lambda item: (-_free_gib(item[1]), item[0], item[1].index))


def explain(
    key: str,
    pod_levels: Sequence[Received],
    plan: PlanComputed | None,
    reports: Iterable[NodeGpusReported],
) -> str | None:
    """The explanation of pod `key` (NAMESPACE/NAME) from the last events of its subjects; None when
    no event names it."""
    latest: dict[type, Received] = {type(r.envelope.event): r for r in pod_levels}
    observed, rejected = latest.get(PodObserved), latest.get(PodRejected)
    deleted = latest.get(PodDeleted)
    if observed is None and rejected is None and deleted is None:
        return None
    lines: list[str] = []
    pod_event = max(
        (r for r in (observed, rejected, deleted) if r is not None), key=lambda r: r.envelope.time
    )
    trace_id = (observed or pod_event).trace_id
    if isinstance(pod_event.envelope.event, PodDeleted):
        lines.append(f"pod {key}: deleted (seen {_when(pod_event)})")
    elif isinstance(pod_event.envelope.event, PodRejected):
        event = pod_event.envelope.event
        lines.append(f"pod {key}: rejected by the pod watcher ({_when(pod_event)})")
        lines.append(f"  {event.reason}: {event.message}")
        lines.append("  mpsflow will not place it: fix the pod spec and create it again")
    else:
        assert isinstance(pod_event.envelope.event, PodObserved)
        lines.extend(_waiting_or_placed(key, pod_event, latest, plan, list(reports)))
    if trace_id is not None:
        lines.append(f"trace: {trace_id} (open it in the tracing UI, or run: mpsflow trace {key})")
    return "\n".join(lines) + "\n"


def _waiting_or_placed(
    key: str,
    received: Received,
    latest: Mapping[type, Received],
    plan: PlanComputed | None,
    reports: list[NodeGpusReported],
) -> list[str]:
    pod = received.envelope.event
    assert isinstance(pod, PodObserved)
    lines = [
        f"pod {key}: asks for nvidia.com/gpu-{pod.size_gb}gb ({pod.size_gb} GiB), priority {pod.priority}, "
        f"created {pod.created:%Y-%m-%d %H:%M:%S} UTC",
        f"  state: {_state(pod)} (seen {_when(received)})",
    ]
    released, unplaced = latest.get(PodReleased), latest.get(PodUnplaced)
    placement = plan.placed.get(key) if plan is not None else None
    if isinstance(released_event := released.envelope.event if released else None, PodReleased):
        assert released is not None
        lines.append(
            f"  planner: released it to node {released_event.node} for a {released_event.size_gb} GiB "
            f"slice (plan {released_event.plan_id}, {_when(released)})"
        )
    if placement is not None:
        assert plan is not None
        lines.append(
            f"  planner: plan {plan.plan_id} places it on node {placement.node}, GPU {placement.gpu}"
        )
    elif plan is not None and key in plan.unplaced:
        lines.append(f"  planner: plan {plan.plan_id} could not place it: {plan.unplaced[key]}")
    elif isinstance(unplaced_event := unplaced.envelope.event if unplaced else None, PodUnplaced):
        assert unplaced is not None
        lines.append(f"  planner: could not place it ({_when(unplaced)}): {unplaced_event.reason}")
    elif pod.waits_for_slice:
        lines.append("  planner: no word yet (it plans once its batch window closes)")
    if pod.waits_for_slice or pod.released_to is not None:
        lines.extend(_candidate_lines(pod.size_gb, reports))
    return lines


def _candidate_lines(size_gb: int, reports: list[NodeGpusReported]) -> list[str]:
    found = candidates(size_gb, reports)
    if not found:
        return [f"  candidate GPUs: none reports {size_gb} GiB or more"]
    lines = [
        f"  candidate GPUs ({len(found)} can hold {size_gb} GiB; "
        f"{min(len(found), CANDIDATES_SHOWN)} shown, most free first):",
        f"    {'NODE':16} {'GPU':>3} {'MODEL':24} {'FREE':>8}  LAYOUT (GiB; * used)",
    ]
    for node, gpu in found[:CANDIDATES_SHOWN]:
        note = "" if gpu.serves_slices else f"  [out: {gpu.fault or 'MPS daemon does not answer'}]"
        free_slice = any(s.size_gb == size_gb and not s.used for s in gpu.slices)
        note += "  [a free slice of this size]" if free_slice else ""
        lines.append(
            f"    {node:16} {gpu.index:>3} {gpu.model[:24]:24} {_free_gib(gpu):>5} GiB  {_layout(gpu)}{note}"
        )
    return lines
