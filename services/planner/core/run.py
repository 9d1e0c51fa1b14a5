"""`plan_cluster`: which slices every GPU must have so that pending pods can run; `extend_run`: more pods.

The rules it always keeps: a used slice is never removed, resized or moved; the slices of a GPU
never add up to more than its capacity; no GPU gets more slices than MPS allows clients; a node
that cannot host pods (cordoned, stale) gets none, and one that cannot carve now (it is applying
its last layout) keeps its slices, though pods may be placed on its free ones; a free slice of a
size the node protects (`Node.protected`: a pod the planner does not place may be bound to it) is
never reclaimed; a GPU that cannot serve slices now (`Node.withdrawn`) is neither carved nor placed
on, and keeps the slices its node gives it; a pod released to a node (`PendingPod.pinned`) is served
there first; a free slice on the GPU the last plan placed a pod on is that pod's
(`PendingPod.planned`), so that a plan made again does not move pods between free slices; an
overdue pod (`PendingPod.overdue`) is served before the pods after it, and where it fits nowhere a
GPU is held for it that they may not take. Within those, the objective is, in this order: serve as
many pending pods as possible, higher priority first (then older, then namespace/name); change as
few GPUs as possible; keep free memory in large whole regions.

Where it sits: the entry to the planner's core for one decision; the planner service (`state`)
and `mpsflow plan` call it with the nodes and the pending pods. A run leaves out the nodes whose
reported state is impossible, builds the cluster (`cluster`) from the others, names why each pod
that can be placed nowhere waits, hands the rest to the placement strategy (`strategy`), and
gathers the layouts, placements and reasons into a `PlanResult`. `plan_run` keeps the final
cluster, so that `extend_run` serves pods that arrive later on top of it, exactly as a full pass
over all the pods would.

What it must never do: order pods or choose their GPUs by rules of its own (`extend_run` places
pods only as the strategy's age-order pass would, and gives up otherwise), or extend a run when a
full pass might decide otherwise. The result depends only on the input, and nothing here performs
I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from services.planner.core.cluster import Cluster, GpuPlan, gpu_plans
from services.planner.core.model import Gpu, Node, PendingPod, Placement, PlanResult, PlanSettings, Slice
from services.planner.core.strategy import PodOrder, pod_order, serve, trivial_reason, waiting_reasons


def plan_cluster(nodes: Iterable[Node], pending: Iterable[PendingPod], settings: PlanSettings) -> PlanResult:
    """Decide the desired slices of every node and where each pending pod is expected to run."""
    return plan_run(nodes, pending, settings).result


@dataclass
class PlanRun:
    """A full planning pass and what it leaves behind, so that later pods can be added cheaply.

    `extendable` holds when every priority class fit whole in age order and nothing was
    reclaimed: then serving pods that sort after all of `last_pod` on the final cluster decides
    exactly what a full pass over all pods would (see `extend_run`). `waiting`: the pods that could
    be placed somewhere but were not, in order.
    """

    result: PlanResult
    cluster: Cluster
    largest: int
    last_pod: PodOrder | None
    extendable: bool
    withdrawn: dict[str, tuple[Gpu, ...]]
    waiting: list[PendingPod]


def plan_run(nodes: Iterable[Node], pending: Iterable[PendingPod], settings: PlanSettings) -> PlanRun:
    """`plan_cluster`, keeping what `extend_run` needs."""
    pending = list(pending)
    excluded: dict[str, str] = {}
    plannable: list[Node] = []
    for node in sorted(nodes, key=lambda n: n.name):
        reason = excluded_reason(node, settings)
        if reason is None:
            plannable.append(node)
        else:
            excluded[node.name] = reason
    gpus = gpu_plans(plannable, settings)
    cluster = Cluster(gpus, frozenset(pod.key for pod in pending if pod.restricted_to is not None))

    unplaced: dict[str, str] = {}
    largest = max((g.capacity for g in gpus), default=0)
    servable: list[PendingPod] = []
    for pod in sorted(pending, key=pod_order):
        reason = trivial_reason(pod, largest, bool(gpus))
        if reason is None:
            servable.append(pod)
        else:
            unplaced[pod.key] = reason

    served = serve(cluster, servable, plannable, settings)
    cluster, placed, waiting = served.cluster, served.placed, served.waiting
    if waiting:
        unplaced.update(waiting_reasons(waiting, cluster, served.hold))

    withdrawn = {node.name: node.withdrawn for node in plannable if node.withdrawn}
    layouts = _layouts(cluster.gpus, withdrawn)
    for node in plannable:
        if node.name not in layouts:
            excluded[node.name] = NO_USABLE_GPU
    result = PlanResult(
        layouts=layouts, placed=placed, unplaced=unplaced, excluded_nodes=dict(sorted(excluded.items()))
    )
    last_pod = pod_order(servable[-1]) if servable else None
    extendable = not waiting and not cluster.reclaimed
    return PlanRun(result, cluster, largest, last_pod, extendable, withdrawn, waiting)


NO_USABLE_GPU = "reports no GPU mpsflow can partition (none found, or every one in MIG mode)"
"""Why an opted-in node whose agent reported is not planned on when it has no GPU to plan."""


def excluded_reason(node: Node, settings: PlanSettings) -> str | None:
    """Why a node's reported state is impossible (used slices it cannot hold), or None."""
    for gpu in sorted(node.gpus, key=lambda g: g.index):
        capacity = gpu.capacity_gb(settings.reserve_mib)
        used = [s.size_gb for s in gpu.slices if s.used]
        if sum(used) > capacity:
            return f"GPU {gpu.index}: used slices hold {sum(used)} GiB but the GPU has {capacity} GiB"
        if len(used) > gpu.max_slices:
            limit = gpu.max_slices
            return f"GPU {gpu.index}: {len(used)} used slices, more than the {limit} MPS clients allowed"
    return None


def _layouts(
    gpus: Iterable[GpuPlan], withdrawn: Mapping[str, tuple[Gpu, ...]]
) -> dict[str, dict[int, tuple[Slice, ...]]]:
    """The planned slices of `gpus`, and of every withdrawn GPU of their nodes and of `withdrawn`'s."""
    layouts: dict[str, dict[int, tuple[Slice, ...]]] = {}
    for gpu_plan in gpus:
        layouts.setdefault(gpu_plan.node, {})[gpu_plan.gpu.index] = tuple(gpu_plan.slices)
    for node, kept in withdrawn.items():
        for gpu in kept:
            layouts.setdefault(node, {})[gpu.index] = gpu.slices
    return layouts


@dataclass(frozen=True)
class Extension:
    """What serving some more pods added to a run: placements, reasons, and the nodes whose layout changed."""

    placed: dict[str, Placement]
    unplaced: dict[str, str]
    layouts: dict[str, dict[int, tuple[Slice, ...]]]


def extend_run(run: PlanRun, pods: Sequence[PendingPod]) -> Extension | None:
    """Serve `pods` on top of `run`, exactly as a full pass over the run's pods and these would.

    None when that cannot be guaranteed (the run is not extendable, a pod does not sort after
    every pod of the run, or one would need reclaiming or would not fit); the run must then not
    be used again, as its cluster may have changed.
    """
    if not run.extendable or any(pod.restricted_to is not None for pod in pods):
        return None
    ordered = sorted(pods, key=pod_order)
    if ordered and run.last_pod is not None and pod_order(ordered[0]) <= run.last_pod:
        return None
    any_gpu = bool(run.cluster.gpus)
    servable = [pod for pod in ordered if trivial_reason(pod, run.largest, any_gpu) is None]
    needed = Counter(pod.size_gb for pod in servable)
    placed: dict[str, Placement] = {}
    touched: set[str] = set()
    for pod in servable:
        gpu = run.cluster.place(pod.size_gb, needed, pod.key, may_reclaim=False, prefer=pod.planned)
        if gpu is None:
            run.extendable = False
            return None
        needed[pod.size_gb] -= 1
        placed[pod.key] = Placement(gpu.node, gpu.gpu.index, pod.size_gb)
        touched.add(gpu.node)
    if servable:
        run.last_pod = pod_order(servable[-1])
    unplaced = {pod.key: reason for pod in ordered if (reason := trivial_reason(pod, run.largest, any_gpu))}
    withdrawn = {node: kept for node, kept in run.withdrawn.items() if node in touched}
    return Extension(placed, unplaced, _layouts(run.cluster.gpus_of(touched), withdrawn))
