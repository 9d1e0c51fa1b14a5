"""The best any planner could do on a snapshot: an exact ILP, and a cheap upper bound.

`solve` models one planning decision as an integer program and solves it with
`scipy.optimize.milp` (HiGHS); scipy is a benchmark-only dependency (`pip install .[bench]`).

The model. Per GPU g of a plannable node: `room[g]` = capacity (GiB, less the reserve) minus
the used slices, `slots[g]` = the MPS client limit minus the used slices; used slices are
fixed. Free slices are removable, so they need no variables of their own: a pod on g either
takes an existing free slice of its size (already allocated, so no extra memory beyond its own
size) or a new one carved from memory that free slices nobody takes give back, and keeping a
free slice nobody takes only costs room. With pods grouped into classes of equal size (and
priority), the integer variable x[c, g] counts the pods of class c given a slice on g:

    sum_g x[c, g] <= pods in class c
    sum_c size[c] * x[c, g] <= room[g]         (used + served slices fit the memory)
    sum_c x[c, g] <= slots[g]                  (used + served slices within the client limit)
    sum_{c of size s} x[c, g] <= free_s[g]     (only on nodes that cannot carve: no new slices)

Two objectives are solved: the plain maximum number of pods placed, and the
priority-lexicographic optimum (as many pods of the highest priority as possible, then, with
that fixed, as many of the next, ...), which is what a planner that serves higher priorities
first can at best reach. Nodes whose reported state is impossible are left out, as the planner
leaves them out.

`upper_bound` needs no solver: the smallest placeable pods, in order, until the total room or
the total slots of the cluster run out. It is for instances too large for the ILP.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from scipy.optimize import Bounds, LinearConstraint, milp

from services.planner.core.model import Node, PendingPod, PlanSettings

DEFAULT_TIME_LIMIT_S = 10.0


@dataclass(frozen=True)
class _GpuRoom:
    room: int
    slots: int
    can_carve: bool
    free: Counter[int]  # existing free slices by size (what a node that cannot carve can offer)


@dataclass(frozen=True)
class Optimum:
    """`max_placed`: most pods any plan places; `by_priority`: the priority-lexicographic optimum.

    A `*_proven` flag is False when the solver hit its time limit. `max_placed` is then the
    solver's upper bound (rounded down), so ratios against it are conservative; `by_priority`
    is then the best plan found.
    """

    max_placed: int
    max_proven: bool
    by_priority: dict[int, int]
    priority_proven: bool

    @property
    def priority_placed(self) -> int:
        return sum(self.by_priority.values())


def _plannable_gpus(nodes: Iterable[Node], settings: PlanSettings) -> list[_GpuRoom]:
    rooms: list[_GpuRoom] = []
    for node in nodes:
        node_rooms: list[_GpuRoom] = []
        impossible = False
        for gpu in node.gpus:
            capacity = gpu.capacity_gb(settings.reserve_mib)
            used = [s.size_gb for s in gpu.slices if s.used]
            total = sum(s.size_gb for s in gpu.slices)
            if sum(used) > capacity or total > capacity or len(gpu.slices) > gpu.max_slices:
                impossible = True  # the planner excludes such a node: it plans nothing on it
                break
            node_rooms.append(
                _GpuRoom(
                    room=capacity - sum(used),
                    slots=gpu.max_slices - len(used),
                    can_carve=node.can_carve,
                    free=Counter(s.size_gb for s in gpu.slices if not s.used),
                )
            )
        if not impossible:
            rooms.extend(node_rooms)
    return rooms


def _maximise(
    classes: Sequence[tuple[int, int]],
    counts: Sequence[int],
    gpus: Sequence[_GpuRoom],
    weights: Sequence[float],
    floors: Sequence[tuple[Sequence[int], int]],
    time_limit_s: float,
) -> tuple[list[int], bool, int]:
    """Pods placed per class at the optimum of `weights` with `floors` (classes, minimum) kept.

    Also whether the solver proved it optimal, and the best objective value it could not rule
    out (the optimum itself when proven).
    """
    pairs = [
        (c, g)
        for c, (size, _) in enumerate(classes)
        for g, gpu in enumerate(gpus)
        if 1 <= size <= gpu.room and gpu.slots > 0 and (gpu.can_carve or gpu.free[size] > 0) and counts[c] > 0
    ]
    if not pairs:
        return [0] * len(classes), True, 0
    upper = [
        float(
            min(counts[c], gpus[g].room // classes[c][0], gpus[g].slots)
            if gpus[g].can_carve
            else min(counts[c], gpus[g].free[classes[c][0]])
        )
        for c, g in pairs
    ]
    rows: list[list[float]] = []
    lower_bounds: list[float] = []
    upper_bounds: list[float] = []

    def add(coefficients: list[float], low: float, high: float) -> None:
        rows.append(coefficients)
        lower_bounds.append(low)
        upper_bounds.append(high)

    for c, count in enumerate(counts):
        add([1.0 if pc == c else 0.0 for pc, _ in pairs], 0, count)
    for g, gpu in enumerate(gpus):
        on_g = [1.0 if pg == g else 0.0 for _, pg in pairs]
        if not any(on_g):
            continue
        add([float(classes[pc][0]) if pg == g else 0.0 for pc, pg in pairs], 0, gpu.room)
        add(on_g, 0, gpu.slots)
        if not gpu.can_carve:
            for size in {classes[pc][0] for pc, pg in pairs if pg == g}:
                add(
                    [1.0 if pg == g and classes[pc][0] == size else 0.0 for pc, pg in pairs],
                    0,
                    gpu.free[size],
                )
    for members, minimum in floors:
        chosen = set(members)
        add([1.0 if pc in chosen else 0.0 for pc, _ in pairs], minimum, math.inf)
    result = milp(
        [-weights[c] for c, _ in pairs],
        integrality=[1] * len(pairs),
        bounds=Bounds([0.0] * len(pairs), upper),
        constraints=LinearConstraint(rows, lower_bounds, upper_bounds),
        options={"time_limit": time_limit_s, "mip_rel_gap": 0.0},
    )
    if result.x is None:
        raise RuntimeError(f"milp found no solution: {result.message}")
    placed = [0] * len(classes)
    for (c, _), value in zip(pairs, result.x, strict=True):
        placed[c] += round(value)
    proven = result.status == 0
    bound = sum(w * p for w, p in zip(weights, placed, strict=True))
    if not proven and result.mip_dual_bound is not None:
        bound = max(bound, math.floor(-result.mip_dual_bound + 1e-6))
    return placed, proven, int(bound)


def solve(
    nodes: Iterable[Node],
    pods: Iterable[PendingPod],
    settings: PlanSettings,
    *,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
) -> Optimum:
    """The plain and the priority-lexicographic optimum of one planning decision."""
    gpus = _plannable_gpus(nodes, settings)
    pod_list = list(pods)

    by_size = Counter(p.size_gb for p in pod_list)
    size_classes = [(size, 0) for size in sorted(by_size)]
    size_counts = [by_size[size] for size, _ in size_classes]
    _, plain_proven, plain_bound = _maximise(
        size_classes, size_counts, gpus, [1.0] * len(size_classes), [], time_limit_s
    )

    by_class = Counter((p.size_gb, p.priority) for p in pod_list)
    classes = sorted(by_class)
    counts = [by_class[c] for c in classes]
    floors: list[tuple[Sequence[int], int]] = []
    by_priority: dict[int, int] = {}
    proven = True
    for priority in sorted({p for _, p in classes}, reverse=True):
        members = [i for i, (_, p) in enumerate(classes) if p == priority]
        weights = [1.0 if i in members else 0.0 for i in range(len(classes))]
        placed, stage_proven, _ = _maximise(classes, counts, gpus, weights, floors, time_limit_s)
        proven = proven and stage_proven
        by_priority[priority] = sum(placed[i] for i in members)
        floors.append((members, by_priority[priority]))
    return Optimum(
        max_placed=plain_bound, max_proven=plain_proven, by_priority=by_priority, priority_proven=proven
    )


def optimum(
    nodes: Iterable[Node],
    pods: Iterable[PendingPod],
    settings: PlanSettings,
    *,
    time_limit_s: float = DEFAULT_TIME_LIMIT_S,
) -> int:
    """The most pending pods any plan could place (ignoring priorities)."""
    return solve(nodes, pods, settings, time_limit_s=time_limit_s).max_placed


def upper_bound(nodes: Iterable[Node], pods: Iterable[PendingPod], settings: PlanSettings) -> int:
    """A bound no plan can beat: smallest placeable pods first, until total room or slots run out.

    A pod is placeable when some GPU has room for it; the most pods fit when the smallest go
    first, and no plan can give out more memory than the cluster's total room, nor more slices
    than its total free client slots. Nodes that cannot carve count only their free slices.
    """
    gpus = _plannable_gpus(nodes, settings)
    carving = [g for g in gpus if g.can_carve]
    largest_room = max((g.room for g in carving if g.slots > 0), default=0)
    fixed_free = Counter[int]()
    for gpu in gpus:
        if not gpu.can_carve:
            fixed_free.update(gpu.free)
    total_room = sum(g.room for g in carving)
    total_slots = sum(g.slots for g in carving)
    placed = 0
    for pod in sorted(pods, key=lambda p: p.size_gb):
        size = pod.size_gb
        if size < 1:
            continue
        if fixed_free[size] > 0:
            fixed_free[size] -= 1
            placed += 1
        elif size <= largest_room and size <= total_room and total_slots > 0:
            total_room -= size
            total_slots -= 1
            placed += 1
    return placed
