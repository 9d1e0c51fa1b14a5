"""Events about nodes: what the pod watcher sees in the API and what node agents report.

This module never performs I/O.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Model
from events.vocabulary import DEFAULT_MPS_IPC, MpsIpcMode


class GfdFacts(Model):
    """GPU facts from GPU Feature Discovery labels; they serve until the node agent reports."""

    product: str
    count: int = Field(ge=0)
    memory_mib: int = Field(gt=0)


class Taint(Model):
    key: str
    value: str = ""
    effect: str


class NodeObserved(Model):
    """A node that opted in to MPS partitioning, as the API server last showed it.

    `allocatable`: slices per size (GiB) in the node's `status.allocatable`, which is all a scheduler
    sees of them; the kubelet copies it from the device plugins on its node-status sync. `labels`
    and `taints` say which pods may run there."""

    kind: Literal["NodeObserved"] = "NodeObserved"
    name: str
    unschedulable: bool = False
    gfd: GfdFacts | None = None
    gfd_problem: str | None = None
    allocatable: dict[int, int] = {}
    labels: dict[str, str] = {}
    taints: tuple[Taint, ...] = ()


class NodeOptedOut(Model):
    """A node that is no longer partitioned by mpsflow: its label was removed or it is gone."""

    kind: Literal["NodeOptedOut"] = "NodeOptedOut"
    name: str
    reason: str


class SliceState(Model):
    """One MPS slice as the node agent offers it to the kubelet.

    `used`: a container holds it (or was just given it). `holder`: the pod (namespace/name) the
    kubelet says holds it, once the kubelet lists the allocation; None while free or too recent.
    `listed_by_kubelet`: the kubelet lists the slice among the node's devices, so a pod bound to the
    node can be given it; a slice just offered is not listed yet.
    """

    id: str
    size_gb: int = Field(gt=0)
    used: bool
    holder: str | None = None
    listed_by_kubelet: bool = True


class GpuProcessReport(Model):
    """A process on a GPU (an MPS server or client, or anything else), as NVML lists it."""

    pid: int
    used_memory_mib: int | None = None
    slice_id: str | None = None


class GpuReport(Model):
    """One GPU of a node as its agent sees it through NVML and its own device plugin."""

    index: int = Field(ge=0)
    uuid: str
    model: str
    memory_mib: int = Field(gt=0)
    memory_used_mib: int = Field(default=0, ge=0)
    reserved_mib: int = Field(default=0, ge=0)
    processes: tuple[GpuProcessReport, ...] = ()
    compute_capability: tuple[int, int]
    mig_enabled: bool = False
    daemon_healthy: bool = True
    fault: str | None = None
    slices: tuple[SliceState, ...] = ()

    def planned_fields(self) -> tuple[object, ...]:
        """What the planner uses of this GPU (memory in use and processes change all the time)."""
        return (
            self.index,
            self.model,
            self.memory_mib,
            self.reserved_mib,
            self.compute_capability,
            self.mig_enabled,
            self.daemon_healthy,
            self.fault,
            self.slices,
        )

    @property
    def serves_slices(self) -> bool:
        """MPS can serve slices on it now: not in MIG mode, its daemon answers, no fault reported."""
        return not self.mig_enabled and self.daemon_healthy and self.fault is None

    @property
    def max_slices(self) -> int:
        """MPS client limit per device: 48 from Volta (7.0) on, 16 before."""
        return 48 if self.compute_capability >= (7, 0) else 16


class SliceOverused(Model):
    """The processes of a container on a slice use more GPU memory than the slice holds: MPS did not
    stop them (the container raised or unset its limit, or runs several processes, each capped
    alone). The latest reading while it lasts; `used_mib` sums the processes in `pids`."""

    kind: Literal["SliceOverused"] = "SliceOverused"
    node: str
    namespace: str
    name: str
    slice_id: str
    gpu_index: int = Field(ge=0)
    size_gb: int = Field(gt=0)
    used_mib: int = Field(ge=0)
    pids: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class NodeGpusReported(Model):
    """A node agent's full report of its GPUs; sent on change and on a heartbeat."""

    kind: Literal["NodeGpusReported"] = "NodeGpusReported"
    node: str
    gpus: tuple[GpuReport, ...]
    applied_plan_id: str | None = None
    mps_ipc: MpsIpcMode = DEFAULT_MPS_IPC
