"""The node agent's functional core: desired config + what the node has -> the slices to offer.

`reconcile` turns the node's desired config (from the KV bucket) and its current slices into
the new list of slice devices, or refuses the whole config with a reason, in which case every
GPU keeps its last good slices. It keeps a slice's device ID whenever the slice survives, never
drops a slice that a container holds, and never offers more memory or more MPS clients than a
GPU has. `gpu_report` builds what the agent tells the planner: every slice, whether a container
holds it and which pod, and whether the kubelet lists it yet (the planner releases a pod only to
a slice the kubelet lists). Nothing here performs I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from events.nodes import GpuProcessReport, GpuReport, NodeGpusReported, SliceState
from events.plans import NodeMpsConfig
from events.vocabulary import DEFAULT_MPS_IPC, MIB_PER_GIB, MpsIpcMode
from node_agent.gpus import GpuReading
from node_agent.slices import SliceDevice, parse_slice_device_id, slice_device_id


@dataclass(frozen=True)
class SliceUsage:
    """What the kubelet does with the node's slices: `in_use`, the device IDs containers hold (or
    were just given); `holders`, device ID -> the pod ("namespace/name") the kubelet says holds it;
    `listed`, the device IDs the kubelet can hand out."""

    in_use: frozenset[str] = frozenset()
    holders: dict[str, str] = field(default_factory=dict)
    listed: frozenset[str] = frozenset()


def observed_usage(
    *,
    allocations: Mapping[str, float],
    offered: frozenset[str],
    held: Mapping[str, str],
    listed: frozenset[str] | None,
    seen_held_at: Mapping[str, float],
    offered_at: Mapping[str, float],
    now: float,
    allocation_grace: float,
    listing_grace: float,
) -> SliceUsage:
    """What the node's slices are doing at `now` (the loop clock, in seconds).

    `allocations` are the device plugin's Allocate answers (device -> when); `held` is what the
    kubelet's pod-resources `List` says containers hold (device -> pod) and `listed` what its
    `GetAllocatableResources` lists (None from a kubelet older than 1.23). A slice is in use when
    the kubelet says it is held, or when it was allocated within `allocation_grace` seconds and the
    kubelet has not named a holder of it since (the kubelet lists a container's devices only once
    the container exists). Without `listed`, a slice counts as listed once it has been offered for
    `listing_grace` seconds.
    """
    recent = now - allocation_grace
    unlisted = {
        device
        for device, at in allocations.items()
        if at >= recent and seen_held_at.get(device, float("-inf")) < at
    }
    if listed is not None:
        listable = listed & offered
    else:
        settled = now - listing_grace
        listable = frozenset(d for d in offered if offered_at.get(d, now) <= settled)
    return SliceUsage(frozenset(held) | unlisted, dict(held), listable)


@dataclass(frozen=True)
class Reconciled:
    devices: tuple[SliceDevice, ...]


@dataclass(frozen=True)
class Refused:
    reason: str


def capacity_gb(gpu: GpuReading, reserve_mib: int = 0) -> int:
    """Whole GiB of the GPU's memory that slices may share, once `reserve_mib` is kept back for the
    MPS server's and its clients' own contexts."""
    return max(0, gpu.memory_total_mib - reserve_mib) // MIB_PER_GIB


def reconcile(
    gpus: Sequence[GpuReading],
    current: Sequence[SliceDevice],
    in_use: Collection[str],
    desired: NodeMpsConfig,
    *,
    reserve_mib: int = 0,
) -> Reconciled | Refused:
    by_index = {gpu.index: gpu for gpu in gpus}
    unknown = sorted(set(desired.gpus) - set(by_index))
    if unknown:
        have = ", ".join(str(i) for i in sorted(by_index)) or "none"
        return Refused(f"GPU {unknown[0]} does not exist on this node (it has GPU {have})")
    current = [*current, *adopted_devices(gpus, current, in_use)]
    devices: list[SliceDevice] = []
    for gpu in sorted(gpus, key=lambda g: g.index):
        existing = sorted(
            (d for d in current if d.gpu_index == gpu.index), key=lambda d: (d.size_gb, d.ordinal)
        )
        if gpu.index not in desired.gpus:
            devices.extend(existing)
            continue
        wanted = desired.gpus[gpu.index]
        if gpu.mig_enabled and wanted:
            return Refused(f"GPU {gpu.index} is in MIG mode; mpsflow leaves MIG GPUs alone")
        outcome = _gpu_devices(gpu, existing, in_use, wanted, reserve_mib)
        if isinstance(outcome, Refused):
            return outcome
        devices.extend(outcome)
    return Reconciled(tuple(devices))


def adopted_devices(
    gpus: Sequence[GpuReading], current: Sequence[SliceDevice], in_use: Collection[str]
) -> list[SliceDevice]:
    """Slices containers hold that this agent does not offer (it restarted): they are adopted as-is.

    A held device ID names its GPU and size, so the slice is rebuilt from it; IDs that are not
    ours or name a GPU the node lacks are ignored.
    """
    by_index = {gpu.index: gpu for gpu in gpus}
    known = {device.id for device in current}
    adopted = []
    for device_id in sorted(set(in_use) - known):
        try:
            gpu_index, size_gb, _ = parse_slice_device_id(device_id)
        except ValueError:
            continue
        gpu = by_index.get(gpu_index)
        if gpu is not None:
            adopted.append(
                SliceDevice(
                    id=device_id,
                    gpu_index=gpu_index,
                    gpu_uuid=gpu.uuid,
                    size_gb=size_gb,
                    gpu_memory_mib=gpu.memory_total_mib,
                )
            )
    return adopted


def _gpu_devices(
    gpu: GpuReading,
    existing: list[SliceDevice],
    in_use: Collection[str],
    wanted: Sequence[int],
    reserve_mib: int,
) -> list[SliceDevice] | Refused:
    if any(size <= 0 for size in wanted):
        return Refused(f"GPU {gpu.index}: slice sizes must be positive, got {sorted(wanted)}")
    kept = [d for d in existing if d.id in in_use]
    still_wanted = Counter(wanted)
    still_wanted.subtract(Counter(d.size_gb for d in kept))
    for device in existing:
        if device.id not in in_use and still_wanted[device.size_gb] > 0:
            kept.append(device)
            still_wanted[device.size_gb] -= 1
    next_ordinal = Counter[int]()
    for device in existing:
        next_ordinal[device.size_gb] = max(next_ordinal[device.size_gb], device.ordinal + 1)
    for size in sorted(still_wanted):
        for _ in range(max(0, still_wanted[size])):
            kept.append(
                SliceDevice(
                    id=slice_device_id(gpu.index, size, next_ordinal[size]),
                    gpu_index=gpu.index,
                    gpu_uuid=gpu.uuid,
                    size_gb=size,
                    gpu_memory_mib=gpu.memory_total_mib,
                )
            )
            next_ordinal[size] += 1
    total = sum(d.size_gb for d in kept)
    capacity = capacity_gb(gpu, reserve_mib)
    if total > capacity:
        held = sum(d.size_gb for d in kept if d.id in in_use)
        detail = f" ({held} GiB of them held by running containers)" if held else ""
        kept_back = f" once {reserve_mib} MiB are kept back for MPS" if reserve_mib else ""
        return Refused(
            f"GPU {gpu.index}: slices would add up to {total} GiB{detail} but the GPU has "
            f"{capacity} GiB{kept_back}"
        )
    if len(kept) > gpu.max_mps_clients:
        return Refused(
            f"GPU {gpu.index}: {len(kept)} slices, more than the {gpu.max_mps_clients} MPS clients "
            "a GPU of this generation allows"
        )
    return sorted(kept, key=lambda d: (d.size_gb, d.ordinal))


def gpu_report(
    node: str,
    gpus: Sequence[GpuReading],
    devices: Sequence[SliceDevice],
    usage: SliceUsage,
    daemon_health: Mapping[int, bool],
    applied_plan_id: str | None,
    *,
    faults: Mapping[int, str] | None = None,
    reserve_mib: int = 0,
    slice_of: Mapping[int, str] | None = None,
    mps_ipc: MpsIpcMode = DEFAULT_MPS_IPC,
) -> NodeGpusReported:
    reports = []
    for gpu in sorted(gpus, key=lambda g: g.index):
        slices = tuple(
            SliceState(
                id=d.id,
                size_gb=d.size_gb,
                used=d.id in usage.in_use,
                holder=usage.holders.get(d.id),
                listed_by_kubelet=d.id in usage.listed,
            )
            for d in devices
            if d.gpu_index == gpu.index
        )
        reports.append(
            GpuReport(
                index=gpu.index,
                uuid=gpu.uuid,
                model=gpu.model,
                memory_mib=gpu.memory_total_mib,
                memory_used_mib=gpu.memory_used_mib,
                processes=tuple(
                    GpuProcessReport(
                        pid=p.pid, used_memory_mib=p.used_memory_mib, slice_id=(slice_of or {}).get(p.pid)
                    )
                    for p in gpu.processes
                ),
                compute_capability=gpu.compute_capability,
                mig_enabled=gpu.mig_enabled,
                daemon_healthy=daemon_health.get(gpu.index, False),
                fault=(faults or {}).get(gpu.index),
                reserved_mib=reserve_mib,
                slices=slices,
            )
        )
    return NodeGpusReported(node=node, gpus=tuple(reports), applied_plan_id=applied_plan_id, mps_ipc=mps_ipc)
