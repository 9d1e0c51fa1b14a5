"""`plan_cluster`: which slices every GPU must have so that pending pods can run.

The rules it always keeps: a used slice is never removed, resized or moved; the slices of a GPU
never add up to more than its capacity; no GPU gets more slices than MPS allows clients; a node
that cannot take new slices (cordoned, stale) gets none. Within those, pods are served in
priority order (higher first, then older, then namespace/name): first from free slices that
already have their size, then by carving unallocated memory (best fit, to keep large regions
whole), then by reclaiming free slices nobody needs. The result depends only on the input.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from services.planner.core.model import Gpu, Node, PendingPod, Placement, PlanResult, PlanSettings, Slice


def pod_order(pod: PendingPod) -> tuple[int, float, str, str]:
    """Higher priority first, then older first (pods without a time last), then namespace/name."""
    created = pod.created.timestamp() if pod.created is not None else float("inf")
    return (-pod.priority, created, pod.namespace, pod.name)


def excluded_reason(node: Node, settings: PlanSettings) -> str | None:
    """Why a node's reported state is impossible, or None when it can be planned on."""
    for gpu in node.gpus:
        capacity = gpu.capacity_gb(settings.reserve_mib)
        used = sum(s.size_gb for s in gpu.slices if s.used)
        total = sum(s.size_gb for s in gpu.slices)
        if used > capacity:
            return f"GPU {gpu.index}: used slices hold {used} GiB but the GPU has {capacity} GiB"
        if total > capacity:
            return f"GPU {gpu.index}: slices add up to {total} GiB but the GPU has {capacity} GiB"
        if len(gpu.slices) > gpu.max_slices:
            count, limit = len(gpu.slices), gpu.max_slices
            return f"GPU {gpu.index}: {count} slices, more than the {limit} MPS clients allowed"
    return None


@dataclass
class _GpuPlan:
    """A GPU's slices while planning; `claimed[i]` marks a free slice promised to a pending pod."""

    node: str
    gpu: Gpu
    capacity: int
    can_carve: bool
    slices: list[Slice]
    claimed: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.claimed = [False] * len(self.slices)

    @property
    def allocated(self) -> int:
        return sum(s.size_gb for s in self.slices)

    @property
    def unallocated(self) -> int:
        return self.capacity - self.allocated

    def claim_free(self, size_gb: int) -> bool:
        for position, candidate in enumerate(self.slices):
            if candidate.size_gb == size_gb and not candidate.used and not self.claimed[position]:
                self.claimed[position] = True
                return True
        return False

    def carve(self, size_gb: int) -> None:
        self.slices.append(Slice(size_gb=size_gb, used=False))
        self.claimed.append(True)

    def reclaimable(self) -> list[int]:
        """Positions of free slices nobody claimed, largest first (fewest removals to make room)."""
        positions = [p for p, s in enumerate(self.slices) if not s.used and not self.claimed[p]]
        return sorted(positions, key=lambda p: (-self.slices[p].size_gb, p))

    def room_after_reclaim(self, size_gb: int) -> list[int] | None:
        """The free slices to remove so that `size_gb` fits, or None when it cannot fit here."""
        if len(self.slices) >= self.gpu.max_slices and not self.reclaimable():
            return None
        room = self.unallocated
        removed: list[int] = []
        for position in self.reclaimable():
            if room >= size_gb and len(self.slices) - len(removed) < self.gpu.max_slices:
                break
            room += self.slices[position].size_gb
            removed.append(position)
        fits = room >= size_gb and len(self.slices) - len(removed) < self.gpu.max_slices
        return removed if fits else None

    def remove(self, positions: Iterable[int]) -> None:
        drop = set(positions)
        self.slices = [s for p, s in enumerate(self.slices) if p not in drop]
        self.claimed = [c for p, c in enumerate(self.claimed) if p not in drop]


def plan_cluster(nodes: Iterable[Node], pending: Iterable[PendingPod], settings: PlanSettings) -> PlanResult:
    """Decide the desired slices of every node and where each pending pod is expected to run."""
    excluded: dict[str, str] = {}
    gpus: list[_GpuPlan] = []
    for node in sorted(nodes, key=lambda n: n.name):
        reason = excluded_reason(node, settings)
        if reason is not None:
            excluded[node.name] = reason
            continue
        for gpu in sorted(node.gpus, key=lambda g: g.index):
            gpus.append(
                _GpuPlan(
                    node.name, gpu, gpu.capacity_gb(settings.reserve_mib), node.can_carve, list(gpu.slices)
                )
            )

    placed: dict[str, Placement] = {}
    unplaced: dict[str, str] = {}
    largest = max((g.capacity for g in gpus), default=0)
    waiting: list[PendingPod] = []
    ordered = sorted(pending, key=pod_order)

    for pod in ordered:
        if pod.size_gb <= 0:
            unplaced[pod.key] = f"asks for {pod.size_gb} GiB; a slice is at least 1 GiB"
        elif not gpus:
            unplaced[pod.key] = (
                "no opted-in node can be planned on (label nos.nebuly.com/gpu-partitioning=mps)"
            )
        elif pod.size_gb > largest:
            unplaced[pod.key] = f"needs {pod.size_gb} GiB; the largest opted-in GPU has {largest} GiB"
        else:
            target = next((g for g in gpus if g.can_carve and g.claim_free(pod.size_gb)), None)
            if target is not None:
                placed[pod.key] = Placement(target.node, target.gpu.index, pod.size_gb)
            else:
                waiting.append(pod)

    for pod in waiting:
        target = _best_fit(gpus, pod.size_gb)
        if target is not None:
            target.carve(pod.size_gb)
            placed[pod.key] = Placement(target.node, target.gpu.index, pod.size_gb)
            continue
        reclaim = _cheapest_reclaim(gpus, pod.size_gb)
        if reclaim is not None:
            gpu_plan, positions = reclaim
            gpu_plan.remove(positions)
            gpu_plan.carve(pod.size_gb)
            placed[pod.key] = Placement(gpu_plan.node, gpu_plan.gpu.index, pod.size_gb)
            continue
        unplaced[pod.key] = _exhausted_reason(gpus, pod.size_gb)

    layouts: dict[str, dict[int, tuple[Slice, ...]]] = {}
    for gpu_plan in gpus:
        layouts.setdefault(gpu_plan.node, {})[gpu_plan.gpu.index] = tuple(gpu_plan.slices)
    return PlanResult(layouts=layouts, placed=placed, unplaced=unplaced, excluded_nodes=excluded)


def _best_fit(gpus: list[_GpuPlan], size_gb: int) -> _GpuPlan | None:
    candidates = [
        g for g in gpus if g.can_carve and g.unallocated >= size_gb and len(g.slices) < g.gpu.max_slices
    ]
    return min(candidates, key=lambda g: g.unallocated - size_gb, default=None)


def _cheapest_reclaim(gpus: list[_GpuPlan], size_gb: int) -> tuple[_GpuPlan, list[int]] | None:
    best: tuple[int, int, _GpuPlan, list[int]] | None = None
    for order, gpu_plan in enumerate(gpus):
        if not gpu_plan.can_carve:
            continue
        positions = gpu_plan.room_after_reclaim(size_gb)
        if positions is None:
            continue
        freed = sum(gpu_plan.slices[p].size_gb for p in positions)
        if best is None or (freed, order) < (best[0], best[1]):
            best = (freed, order, gpu_plan, positions)
    return None if best is None else (best[2], best[3])


def _exhausted_reason(gpus: list[_GpuPlan], size_gb: int) -> str:
    carvable = [g for g in gpus if g.can_carve]
    if not carvable:
        return "no opted-in node can take new slices now (cordoned, or its GPU reports are stale)"
    most = max(
        g.capacity - sum(s.size_gb for p, s in enumerate(g.slices) if s.used or g.claimed[p])
        for g in carvable
    )
    return (
        f"capacity exhausted: needs {size_gb} GiB on one GPU; the most any GPU could offer now is {most} GiB"
    )
