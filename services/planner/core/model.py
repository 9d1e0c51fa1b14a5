"""The values the planning core works on: nodes, GPUs, slices and pending pods.

Both the planner service (from folded events) and `mpsflow plan` (from a snapshot file) build
these, so that one function decides for both. Nothing here performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

MIB_PER_GIB = 1024
MAX_CLIENTS_VOLTA_AND_NEWER = 48
MAX_CLIENTS_BEFORE_VOLTA = 16

# GPU Feature Discovery product names of pre-Volta generations (Kepler, Maxwell, Pascal).
_PRE_VOLTA_MARKERS = ("-K80", "-K40", "-K20", "-M60", "-M40", "-M10", "-M4", "-P100", "-P40", "-P6", "-P4")


def max_slices_for(model: str, compute_capability: tuple[int, int] | None = None) -> int:
    """MPS client limit of one GPU: 48 from Volta (compute capability 7.0) on, 16 before."""
    if compute_capability is not None:
        volta_or_newer = compute_capability >= (7, 0)
    else:
        normalised = "-" + model.upper().replace(" ", "-")
        volta_or_newer = not any(marker in normalised for marker in _PRE_VOLTA_MARKERS)
    return MAX_CLIENTS_VOLTA_AND_NEWER if volta_or_newer else MAX_CLIENTS_BEFORE_VOLTA


@dataclass(frozen=True)
class Slice:
    size_gb: int
    used: bool


@dataclass(frozen=True)
class Gpu:
    index: int
    model: str
    memory_mib: int
    slices: tuple[Slice, ...] = ()
    max_slices: int = MAX_CLIENTS_VOLTA_AND_NEWER

    def capacity_gb(self, reserve_mib: int = 0) -> int:
        return max(0, (self.memory_mib - reserve_mib) // MIB_PER_GIB)


@dataclass(frozen=True)
class Node:
    """An opted-in node; `can_carve` is False when it is cordoned or its report went stale."""

    name: str
    gpus: tuple[Gpu, ...]
    can_carve: bool = True


@dataclass(frozen=True)
class PendingPod:
    namespace: str
    name: str
    size_gb: int
    priority: int = 0
    created: datetime | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class PlanSettings:
    reserve_mib: int = 0


@dataclass(frozen=True)
class Placement:
    node: str
    gpu: int
    size_gb: int


@dataclass(frozen=True)
class PlanResult:
    """Desired slices of every planned node, where each placed pod goes, and why others wait."""

    layouts: dict[str, dict[int, tuple[Slice, ...]]]
    placed: dict[str, Placement] = field(default_factory=dict)
    unplaced: dict[str, str] = field(default_factory=dict)
    excluded_nodes: dict[str, str] = field(default_factory=dict)
