"""The values the planning core works on: nodes, GPUs, slices and pending pods.

Both the planner service (from folded events) and `mpsflow plan` (from a snapshot file) build
these, so that one function decides for both. Nothing here performs I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from events.vocabulary import (
    MAX_CLIENTS_BEFORE_VOLTA,
    MAX_CLIENTS_VOLTA_AND_NEWER,
    MIB_PER_GIB,
    max_mps_clients,
)

# GPU Feature Discovery product names of pre-Volta generations (Kepler, Maxwell, Pascal).
_PRE_VOLTA_MARKERS = ("-K80", "-K40", "-K20", "-M60", "-M40", "-M10", "-M4", "-P100", "-P40", "-P6", "-P4")


def max_slices_for(model: str, compute_capability: tuple[int, int] | None = None) -> int:
    """MPS client limit of one GPU: 48 from Volta (compute capability 7.0) on, 16 before."""
    if compute_capability is not None:
        return max_mps_clients(compute_capability)
    normalised = "-" + model.upper().replace(" ", "-")
    pre_volta = any(marker in normalised for marker in _PRE_VOLTA_MARKERS)
    return MAX_CLIENTS_BEFORE_VOLTA if pre_volta else MAX_CLIENTS_VOLTA_AND_NEWER


@dataclass(frozen=True, slots=True)
class Slice:
    size_gb: int
    used: bool


class _SharedSlices(dict[tuple[int, bool], Slice]):
    """`Slice` values by (size, used), made on first use. Sizes above `_SHARED_SIZES` and `used`
    values that are not booleans get a slice of their own each time, so that it stays small."""

    def __missing__(self, key: tuple[int, bool]) -> Slice:
        size_gb, used = key
        found = Slice(size_gb, used)
        if 0 < size_gb <= _SHARED_SIZES and type(used) is bool:
            self[key] = found
        return found


_SHARED_SIZES = 4096  # GiB
SHARED_SLICES = _SharedSlices()
"""`SHARED_SLICES[size_gb, used]` is `slice_of(size_gb, used)`, for loops over many slices."""


def slice_of(size_gb: int, used: bool) -> Slice:
    """`Slice(size_gb, used)`, shared: a slice is an immutable value, and a cluster has hundreds of
    thousands of them in a few dozen kinds, so one object per kind saves building (and the garbage
    collector going through) the others."""
    return SHARED_SLICES[size_gb, used]


@dataclass(frozen=True, slots=True)
class Gpu:
    index: int
    model: str
    memory_mib: int
    slices: tuple[Slice, ...] = ()
    max_slices: int = MAX_CLIENTS_VOLTA_AND_NEWER
    reserved_mib: int = 0
    """Memory its node agent keeps back for MPS itself (the planner's `reserve_mib`, when larger,
    counts instead)."""

    def capacity_gb(self, reserve_mib: int = 0) -> int:
        """Whole GiB its slices may share, with `reserve_mib` or its own reserve kept back."""
        return max(0, (self.memory_mib - max(reserve_mib, self.reserved_mib)) // MIB_PER_GIB)


@dataclass(frozen=True, slots=True)
class Node:
    """An opted-in node as the planner may use it.

    `can_host`: pods may be given its free slices (False when it is cordoned or its report went
    stale). `can_carve`: its layout may change now (also False while it applies a layout asked
    earlier, or when the layout it would get is one it refused). `protected`: slice sizes whose free
    slices must stay, because a pod that the planner does not place may be bound to one of them at
    any moment (a pod that bypassed the scheduling gate, or one bound here whose slice the node has
    not reported yet). `withdrawn`: GPUs that cannot serve slices now (their MPS daemon does not
    answer, or they reported a fault), each with the slices it keeps; they are neither carved nor
    placed on, and appear in the node's layout as they are.
    """

    name: str
    gpus: tuple[Gpu, ...]
    can_carve: bool = True
    can_host: bool = True
    protected: frozenset[int] = frozenset()
    withdrawn: tuple[Gpu, ...] = ()

    def __post_init__(self) -> None:
        if self.can_carve and not self.can_host:
            raise ValueError(f"node {self.name}: a node that cannot host pods cannot carve either")


@dataclass(frozen=True, slots=True)
class PendingPod:
    """A pod the planner must provide a slice for. `pinned` names the only node it may run on (it
    was released there and must be given a slice there); `eligible`, when not None, the nodes its
    node selector, node affinity and tolerations let it run on."""

    namespace: str
    name: str
    size_gb: int
    priority: int = 0
    created: datetime | None = None
    pinned: str | None = None
    eligible: frozenset[str] | None = None
    needs_shm_directory: bool = False
    """It does not set hostIPC: `eligible` holds only nodes in the shm-directory IPC mode."""
    arrived: datetime | None = None
    """When the planner first heard of it: among pods created in the same second (Kubernetes keeps
    creation times to the second), the one that came first is served first."""
    planned: tuple[str, int] | None = None
    """The GPU (node, index) the last plan published placed it on. A free slice of its size there is
    taken first, so that a plan made later (a node reported, a pod went) does not hand its slice to
    an older pod and send it to one carved since, which it would wait longer for."""
    overdue: bool = False
    """It has waited longer than a pod should watch pods that came after it take memory it could use
    (`PlannerSettings.hold_after`): it is served before them, even where that serves fewer pods, and
    where it fits on no GPU one is held for it until it does (`strategy.Hold`). Without this, a large
    pod could wait forever while small ones take each piece of memory that frees."""
    key: str = field(init=False, repr=False, compare=False)
    """namespace/name (kept, not made again at each use: a plan uses it several times per pod)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.namespace}/{self.name}")

    @property
    def restricted_to(self) -> frozenset[str] | None:
        """The nodes it may go to, when not every node."""
        return frozenset({self.pinned}) if self.pinned is not None else self.eligible


@dataclass(frozen=True)
class PlanSettings:
    reserve_mib: int = 0


@dataclass(frozen=True, slots=True)
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
