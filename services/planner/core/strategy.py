"""How pending pods are served: in what order, where each may go, which packing wins, and why one waits.

Where it sits: between the run (`run.plan_run`), which hands it the cluster and the pods that can
be placed at all (`trivial_reason` names why the others cannot), and the cluster (`cluster`), which
finds the GPU for each pod it asks for. `serve`: pods released to a node (`PendingPod.pinned`) are
served first, there; then the others one priority class at a time, higher priority first (then
older, then namespace/name: `pod_order`), and within a class the pods whose rules allow only some
nodes first, the fewest nodes first. When a class does not fit whole in age order, size-descending
and size-ascending orders are tried too and the one that serves the most pods wins, and a repair
step moves promised slices to make room. When pods still wait, a packing pass (`packing`) computes
the most pods each priority can get from the GPUs' memory, and its plan wins if it serves more.
A pod that has waited too long (`PendingPod.overdue`) is not left waiting so that more pods
fit: the pods before it are served, then it, then the others around it; and where it fits on no
GPU, one is held for it (`Hold`), so that pods after it never take memory that frees there.
`waiting_reasons` says why each pod left waits.

What it must never do: change a GPU's slices other than through `GpuPlan` and `Cluster`, whose
rules and indexes would no longer hold; leave unplaced a pod that a repair moves; depend on
anything but its input (the same pods on the same cluster give the same plan); place a pod
that sorts after an overdue pod left waiting on the GPU held for it. Nothing here performs I/O.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import groupby

from events.vocabulary import DEFAULT_OPT_IN
from services.planner.core.cluster import Cluster, GpuPlan, gpu_plans
from services.planner.core.model import Node, PendingPod, Placement, PlanSettings
from services.planner.core.packing import Bin, lexicographic_selection

PodOrder = tuple[int, float, float, str, str]
"""`pod_order`'s key: -priority, created, arrived, namespace, name."""


def pod_order(pod: PendingPod) -> PodOrder:
    """Higher priority first, then older first (pods without a time last), then the one that arrived
    first, then namespace/name. Arrival breaks the ties of a burst created within one second: a pod
    that arrives later never takes the slice being carved for one that came before it, so it never
    pushes that one back to a later change of some other node."""
    created = pod.created.timestamp() if pod.created is not None else float("inf")
    arrived = pod.arrived.timestamp() if pod.arrived is not None else float("inf")
    return (-pod.priority, created, arrived, pod.namespace, pod.name)


NO_OPTED_IN_NODE = f"no opted-in node can be planned on (label {DEFAULT_OPT_IN})"
"""Why every pod waits while no opted-in node has GPUs to plan on."""


def trivial_reason(pod: PendingPod, largest: int, any_gpu: bool) -> str | None:
    """Why a pod can be placed nowhere whatever happens, or None."""
    if pod.size_gb <= 0:
        return f"asks for {pod.size_gb} GiB; a slice is at least 1 GiB"
    if not any_gpu:
        return NO_OPTED_IN_NODE
    if pod.size_gb > largest:
        return f"needs {pod.size_gb} GiB; the largest opted-in GPU has {largest} GiB"
    return None


@dataclass(frozen=True)
class Hold:
    """A GPU held for an overdue pod that fits on no GPU now: no pod that sorts after it is placed
    there, so the memory that frees there (its pods finish) adds up until the pod fits. `potential`:
    what the GPU could offer the pod now."""

    pod: PendingPod
    node: str
    gpu: int
    potential: int

    def excludes(self, pod: PendingPod) -> bool:
        """`pod` may not be placed on the held GPU: it sorts after the pod it is held for."""
        return pod_order(pod) > pod_order(self.pod)


@dataclass
class Served:
    """What `serve` decided: the cluster that won (changed, or the packing's), where each served pod
    goes, the pods left waiting (in order), and the GPU held for an overdue one, if any."""

    cluster: Cluster
    placed: dict[str, Placement]
    waiting: list[PendingPod]
    hold: Hold | None = None


def serve(
    cluster: Cluster, servable: list[PendingPod], plannable: list[Node], settings: PlanSettings
) -> Served:
    """Serve `servable` (in `pod_order`) on `cluster`, the GPUs of the `plannable` nodes.

    When that leaves an overdue pod waiting, the first such pod (in `pod_order`) comes before
    serving the most pods: the plan is made again on the `plannable` nodes' GPUs as they are,
    serving the pods released to a node and those that sort before it, then it, then the others,
    none of them on a GPU held for it (`_hold_for`) if it still fits nowhere.
    """
    served = _serve_all(cluster, servable, plannable, settings, pack=True)
    overdue = next((pod for pod in served.waiting if pod.overdue and pod.pinned is None), None)
    if overdue is None:
        return served
    return _serve_overdue_first(overdue, cluster.pinned, servable, plannable, settings)


def _serve_overdue_first(
    overdue: PendingPod,
    pinned: frozenset[str],
    servable: list[PendingPod],
    plannable: list[Node],
    settings: PlanSettings,
) -> Served:
    """`serve` for an `overdue` pod that a plan for the most pods leaves waiting (see `serve`)."""
    last = pod_order(overdue)
    first = [pod for pod in servable if pod.pinned is not None or pod_order(pod) <= last]
    as_they_are = Cluster(gpu_plans(plannable, settings), pinned)
    served = _serve_all(as_they_are, first, plannable, settings, pack=True)
    cluster, placed = served.cluster, served.placed
    held = _hold_for(cluster, overdue) if overdue.key not in placed else None
    if held is not None:
        cluster.withhold(held)
    rest = [pod for pod in servable if pod.pinned is None and pod_order(pod) > last]
    after = _serve_all(cluster, rest, plannable, settings, pack=False)
    cluster = after.cluster
    cluster.reclaimed = True  # not the greedy's own result: never extended
    placed.update(after.placed)
    hold = None
    if held is not None:
        held = cluster.gpus[held.order]  # the same GPU in the cluster that won
        cluster.give_back(held)
        hold = Hold(overdue, held.node, held.gpu.index, held.potential)
    waiting = [pod for pod in servable if pod.key not in placed]
    return Served(cluster, placed, waiting, hold)


def _hold_for(cluster: Cluster, pod: PendingPod) -> GpuPlan | None:
    """The GPU to hold for `pod`: of those it may run on that could ever take it (they may carve, and
    have the memory), the one that could offer it the most now, then the first. Nothing pods after
    it take is placed there, so it keeps that lead while its pods finish: the same GPU stays held
    from one plan to the next, unless another comes to offer more."""
    candidates = [
        gpu
        for gpu in cluster.gpus
        if gpu.can_carve
        and gpu.can_host
        and gpu.capacity >= pod.size_gb
        and (pod.eligible is None or gpu.node in pod.eligible)
    ]
    return max(candidates, key=lambda gpu: (gpu.potential, -gpu.order), default=None)


def _serve_all(
    cluster: Cluster, servable: list[PendingPod], plannable: list[Node], settings: PlanSettings, *, pack: bool
) -> Served:
    """Serve `servable` in order, one priority class after the other, on `cluster`; with `pack`, the
    packing's plan wins where it serves more (it plans the `plannable` nodes' GPUs as they are, so
    only for a cluster nothing was placed on yet)."""
    placed: dict[str, Placement] = {}
    needed = Counter(pod.size_gb for pod in servable)
    # Pods released to a node are committed to it: they are served first, there.
    for pod in servable:
        if pod.pinned is not None:
            there = cluster.place_among(frozenset({pod.pinned}), pod.size_gb, needed, pod.key, pod.planned)
            if there is not None:
                needed[pod.size_gb] -= 1
                placed[pod.key] = Placement(there.node, there.gpu.index, pod.size_gb)
    free_to_place = [pod for pod in servable if pod.pinned is None]
    for _, members in groupby(free_to_place, key=lambda pod: pod.priority):
        attempt = _serve_class(cluster, list(members), needed)
        cluster, needed = attempt.cluster, attempt.needed
        placed.update(attempt.served)

    waiting = [pod for pod in servable if pod.key not in placed]
    packed = _packed(plannable, servable, settings) if waiting and pack else None
    if packed is not None and _score(packed[1], packed[0], servable) > _score(placed, cluster, servable):
        cluster, placed = packed
        waiting = [pod for pod in servable if pod.key not in placed]
        cluster.reclaimed = True  # not the greedy's own result: never extended
    return Served(cluster, placed, waiting)


_SHM_DIRECTORY_ONLY = (
    "the shm-directory IPC mode, the only one for a pod without hostIPC: true (set it, or run the node "
    "agents with --mps-ipc shm-directory)"
)


def _allows(pod: PendingPod) -> str:
    """What the nodes `pod.eligible` lists have in common, as the end of a sentence about one node."""
    rules = "matches the pod's node selector, node affinity and tolerations"
    return f"{rules} and runs MPS in {_SHM_DIRECTORY_ONLY}" if pod.needs_shm_directory else rules


def _allow(pod: PendingPod) -> str:
    """The same, about several nodes."""
    rules = "its node selector, node affinity and tolerations allow"
    return f"{rules} and that run MPS in {_SHM_DIRECTORY_ONLY}" if pod.needs_shm_directory else rules


def waiting_reasons(waiting: list[PendingPod], cluster: Cluster, hold: Hold | None = None) -> dict[str, str]:
    """Why each pod of `waiting` waits, given the cluster as planned and the GPU held, if any (what
    it could offer does not count for the pods that may not go there)."""
    reasons: dict[str, str] = {}
    carvable = [g for g in cluster.gpus if g.can_carve]
    open_to_all = carvable
    if hold is not None:
        open_to_all = [g for g in carvable if (g.node, g.gpu.index) != (hold.node, hold.gpu)]
    most_of = {False: max((g.potential for g in carvable), default=0)}
    most_of[True] = max((g.potential for g in open_to_all), default=0)
    for pod in waiting:
        held_from = hold is not None and hold.excludes(pod)
        open_gpus = open_to_all if held_from else carvable
        note = ""
        if hold is not None and held_from:
            note = f" (GPU {hold.gpu} of node {hold.node} is held for {hold.pod.key}, which came first)"
        if hold is not None and pod.key == hold.pod.key:
            reasons[pod.key] = (
                f"capacity exhausted: needs {pod.size_gb} GiB on one GPU, which none could offer now; it "
                f"has waited so long that GPU {hold.gpu} of node {hold.node} is held for it: no pod that "
                f"came after it is placed there until it fits (that GPU could offer {hold.potential} GiB "
                "now, more as its pods finish)"
            )
        elif pod.pinned is not None and not any(g.node == pod.pinned for g in cluster.gpus):
            reasons[pod.key] = (
                f"released to node {pod.pinned}, which mpsflow does not plan on now (opted out, gone, "
                "or without GPU reports): the pod waits for that node"
            )
        elif pod.pinned is not None:
            reasons[pod.key] = (
                f"released to node {pod.pinned}, which has no room for a {pod.size_gb} GiB slice now"
            )
        elif pod.eligible is not None and not any(g.node in pod.eligible for g in cluster.gpus):
            reasons[pod.key] = f"no opted-in node that mpsflow plans on {_allows(pod)}"
        elif pod.eligible is not None:
            most_there = max((g.potential for g in open_gpus if g.node in pod.eligible), default=0)
            reasons[pod.key] = (
                f"capacity exhausted on the {len(pod.eligible)} node(s) {_allow(pod)}: needs {pod.size_gb} "
                f"GiB on one GPU; the most any of their GPUs could offer now is {most_there} GiB{note}"
            )
        elif carvable:
            reasons[pod.key] = (
                f"capacity exhausted: needs {pod.size_gb} GiB on one GPU; the most any GPU could offer "
                f"now is {most_of[held_from]} GiB{note}"
            )
        else:
            reasons[pod.key] = (
                "no opted-in node can take new slices now (cordoned, its GPU reports are stale, or it "
                "is applying its last layout)"
            )
    return reasons


def _serve(cluster: Cluster, pods: Sequence[PendingPod], needed: Counter[int]) -> dict[str, Placement]:
    """Place `pods` in their order, except that pods whose rules allow only some nodes go first, the
    fewest nodes first: the others can go anywhere, so they must not take the room the few need."""
    placed: dict[str, Placement] = {}
    smallest_failure = None
    for pod in sorted(pods, key=_constraint):
        if pod.eligible is not None:
            there = cluster.place_among(pod.eligible, pod.size_gb, needed, pod.key, pod.planned)
            if there is not None:
                needed[pod.size_gb] -= 1
                placed[pod.key] = Placement(there.node, there.gpu.index, pod.size_gb)
            continue
        if smallest_failure is not None and pod.size_gb >= smallest_failure:
            continue
        gpu = cluster.place(pod.size_gb, needed, pod.key, prefer=pod.planned)
        if gpu is None:
            smallest_failure = pod.size_gb
            continue
        needed[pod.size_gb] -= 1
        placed[pod.key] = Placement(gpu.node, gpu.gpu.index, pod.size_gb)
    return placed


def _constraint(pod: PendingPod) -> int:
    return len(pod.eligible) if pod.eligible is not None else sys.maxsize


_ALTERNATIVE_ORDERS: tuple[Callable[[PendingPod], PodOrder], ...] = (
    lambda pod: (-pod.size_gb, *pod_order(pod)[1:]),
    lambda pod: (pod.size_gb, *pod_order(pod)[1:]),
)


@dataclass
class _Attempt:
    cluster: Cluster
    served: dict[str, Placement]
    needed: Counter[int]

    @property
    def score(self) -> tuple[int, int]:
        return (len(self.served), -self.cluster.changed_count())


def _serve_class(cluster: Cluster, pods: list[PendingPod], needed: Counter[int]) -> _Attempt:
    """Serve one priority class: in age order, unless another order serves strictly more pods.

    The first attempt journals the GPUs it touches, so that only a class that does not fit whole
    pays for copying the cluster to try the other orders.
    """
    cluster.journal = {}
    best = _Attempt(cluster, {}, Counter(needed))
    best.served = _serve(cluster, pods, best.needed)
    journal, cluster.journal = cluster.journal, None
    if len(best.served) == len(pods):
        return best
    if len(pods) > 1:
        pristine = cluster.as_it_was(journal)
        for rank, key in enumerate(_ALTERNATIVE_ORDERS):
            last = rank == len(_ALTERNATIVE_ORDERS) - 1
            trial = _Attempt(pristine if last else pristine.copy(), {}, Counter(needed))
            trial.served = _serve(trial.cluster, sorted(pods, key=key), trial.needed)
            if trial.score > best.score:
                best = trial
    _repair(best, [pod for pod in pods if pod.key not in best.served and pod.eligible is None])
    return best


REPAIR_LIMIT = 64  # pods of one class that repair tries to place, so that it stays cheap at scale
PAIR_CANDIDATES = 4  # the largest promised slices of a GPU that repair tries to move in pairs
REPAIR_ATTEMPTS = 5_000  # moves repair tries per class at most, whatever the cluster


def _repair(attempt: _Attempt, waiting: list[PendingPod]) -> None:
    """Place pods that did not fit by moving promised slices to other GPUs, where that makes room.

    Greedy placement leaves memory scattered; moving one pod's slice elsewhere (or, failing that,
    two of the largest) often frees enough on one GPU for a pod that fit nowhere. Every move
    keeps the moved pods placed.
    """
    cluster = attempt.cluster
    smallest_failure: int | None = None
    budget = REPAIR_ATTEMPTS
    for pod in waiting[:REPAIR_LIMIT]:
        if smallest_failure is not None and pod.size_gb >= smallest_failure:
            continue
        for gpu, chosen in _mover_sets(cluster, pod):
            budget -= 1
            if budget < 0:
                return
            targets = cluster.move_and_take(gpu, chosen, attempt.needed, pod)
            if targets is not None:
                for (size, mover), target in zip(chosen, targets, strict=True):
                    attempt.served[mover] = Placement(target.node, target.gpu.index, size)
                attempt.served[pod.key] = Placement(gpu.node, gpu.gpu.index, pod.size_gb)
                attempt.needed[pod.size_gb] -= 1
                break
        else:
            smallest_failure = pod.size_gb


def _mover_sets(cluster: Cluster, pod: PendingPod) -> Iterable[tuple[GpuPlan, list[tuple[int, str]]]]:
    """Candidate moves for `pod`: single promised slices on every GPU first, then pairs of the largest.

    A slice only moves if the cluster has room for it somewhere (a free slice of its size, or
    memory at least as large), which keeps a full cluster from being searched in vain.
    """
    spare = max((g.potential for g in cluster.gpus if g.can_carve), default=0)
    free_sizes = {
        size for g in cluster.gpus if g.can_host for size, count in g.unclaimed.items() if count > 0
    }

    def movable(size: int) -> bool:
        return size <= spare or size in free_sizes

    for pairs in (False, True):
        for gpu in cluster.gpus:
            if not gpu.can_carve:
                continue
            promised = [p for p in gpu.promised() if movable(p[0]) and p[1] not in cluster.pinned]
            base = gpu.potential
            if not pairs:
                for size, mover in promised:
                    if base + size >= pod.size_gb:
                        yield gpu, [(size, mover)]
            else:
                largest = promised[-PAIR_CANDIDATES:]
                for first in range(len(largest)):
                    for second in range(first + 1, len(largest)):
                        if base + largest[first][0] + largest[second][0] >= pod.size_gb:
                            yield gpu, [largest[second], largest[first]]


PACKING_LIMIT = 5_000  # pods and GPUs beyond which contended clusters keep the placement rules alone


def _packed(
    nodes: list[Node], servable: list[PendingPod], settings: PlanSettings
) -> tuple[Cluster, dict[str, Placement]] | None:
    """The plan that packs the most pods by priority into the GPUs' memory, reclaiming any free slice
    that is not protected (`packing`); None where it does not apply: pods restricted to some nodes, a
    node that may host but not carve, or a cluster beyond `PACKING_LIMIT`."""
    gpus = gpu_plans(nodes, settings)
    hostable = [gpu for gpu in gpus if gpu.can_host]
    if (
        any(pod.restricted_to is not None for pod in servable)
        or any(not gpu.can_carve for gpu in hostable)
        or len(servable) > PACKING_LIMIT
        or len(hostable) > PACKING_LIMIT
    ):
        return None
    bins = []
    for gpu in hostable:
        kept = [s for s in gpu.slices if s.used or s.size_gb in gpu.bindable]
        bins.append(Bin(gpu.capacity - sum(s.size_gb for s in kept), gpu.gpu.max_slices - len(kept)))
    classes = [list(members) for _, members in groupby(servable, key=lambda pod: pod.priority)]
    chosen, assignment = lexicographic_selection(bins, [[pod.size_gb for pod in c] for c in classes])
    pods = [classes[c][i] for c, indexes in enumerate(chosen) for i in indexes]
    needed = Counter(pod.size_gb for pod in pods)
    placed: dict[str, Placement] = {}
    for pod, index in sorted(zip(pods, assignment, strict=True), key=lambda pair: -pair[0].size_gb):
        gpu = hostable[index]
        if not gpu.take(pod.size_gb, needed, pod.key):
            return None  # the packing and the slices disagree: keep the placement rules' plan
        needed[pod.size_gb] -= 1
        placed[pod.key] = Placement(gpu.node, gpu.gpu.index, pod.size_gb)
    return Cluster(gpus), placed


def _score(placed: dict[str, Placement], cluster: Cluster, pods: list[PendingPod]) -> tuple[int, ...]:
    """Pods served per priority, highest first, then the fewest GPUs changed: larger is better."""
    served = Counter(pod.priority for pod in pods if pod.key in placed)
    return (
        *(served[p] for p in sorted({pod.priority for pod in pods}, reverse=True)),
        -cluster.changed_count(),
    )
