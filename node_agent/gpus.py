"""The node's GPUs as read at one moment: the values the GPU inventory port returns.

Pure values, shared by the NVML adapter (`node_agent.nvml`) that produces them and the agent's
reconcile core (`node_agent.reconcile`) that decides from them; nothing here reads a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from events.vocabulary import max_mps_clients


@dataclass(frozen=True)
class GpuProcess:
    """A process holding a CUDA context on a GPU (host PID); memory is unknown under some drivers."""

    pid: int
    used_memory_mib: int | None


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML shows it at one moment."""

    index: int
    uuid: str
    model: str
    """The product name with spaces replaced by '-', like GPU Feature Discovery's ``gpu.product``."""
    memory_total_mib: int
    memory_used_mib: int
    compute_capability: tuple[int, int]
    mig_enabled: bool
    """In MIG mode now, or from the next GPU reset (pending): either way no MPS slices here."""
    processes: tuple[GpuProcess, ...]
    """Compute processes (the MPS server among them) followed by MPS client processes."""

    @property
    def max_mps_clients(self) -> int:
        """How many MPS clients (CUDA contexts) one server accepts on this GPU."""
        return max_mps_clients(self.compute_capability)


@dataclass(frozen=True)
class XidError:
    """A critical Xid error NVML reported on the GPU with `gpu_uuid`; whether it matters is the
    agent's to decide (`node_agent.health.XidPolicy`)."""

    gpu_uuid: str
    xid: int
