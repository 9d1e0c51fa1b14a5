"""`plan_cluster`: which slices every GPU must have so that pending pods can run.

The rules it always keeps: a used slice is never removed, resized or moved; the slices of a GPU
never add up to more than its capacity; no GPU gets more slices than MPS allows clients; a node
that cannot host pods (cordoned, stale) gets none, and one that cannot carve now (it is applying
its last layout) keeps its slices, though pods may be placed on its free ones; a free slice of a
size the node protects (`Node.protected`: a pod the planner does not place may be bound to it) is
never reclaimed; a pod released to a node (`PendingPod.pinned`) is served there first. Within
those, the objective is, in this order: serve as many pending pods as possible, higher priority
first (then older, then namespace/name); change as few GPUs as possible; keep free memory in
large whole regions.

How: pods are served one priority class at a time. Each pod takes a free slice of its size if
one exists; otherwise a slice is carved where it fits best, on a GPU this plan already changes
if possible; otherwise free slices are reclaimed on the GPU that fits best, those that no
pending pod needs first. When a class does not fit whole in age order, size-descending and
size-ascending orders are tried too and the one that serves the most pods wins, and a repair step
moves promised slices to make room. When pods still wait, a packing pass (`packing`) computes
the most pods each priority can get from the GPUs' memory, and its plan wins if it serves more.
Indexes keep every placement step logarithmic in the number of GPUs. The result depends only on
the input.
"""

from __future__ import annotations

import heapq
import sys
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import groupby

from events.vocabulary import DEFAULT_OPT_IN
from services.planner.core.model import Gpu, Node, PendingPod, Placement, PlanResult, PlanSettings, Slice
from services.planner.core.packing import Bin, lexicographic_selection


def pod_order(pod: PendingPod) -> tuple[int, float, str, str]:
    """Higher priority first, then older first (pods without a time last), then namespace/name."""
    created = pod.created.timestamp() if pod.created is not None else float("inf")
    return (-pod.priority, created, pod.namespace, pod.name)


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


class _BestFit:
    """GPUs keyed by a value; finds the GPU with the smallest value at least a need (then lowest order).

    Entries are invalidated lazily: a GPU whose value changed leaves a stale heap entry behind,
    skipped when met.
    """

    def __init__(self) -> None:
        self._heaps: dict[int, list[int]] = {}
        self._values: list[int] = []
        self._current: dict[int, int] = {}

    def set(self, order: int, value: int | None) -> None:
        if self._current.get(order) == value:
            return
        if value is None:
            del self._current[order]
            return
        self._current[order] = value
        heap = self._heaps.get(value)
        if heap is None:
            heap = self._heaps[value] = []
            insort(self._values, value)
        heapq.heappush(heap, order)

    def best_at_least(self, need: int) -> int | None:
        position = bisect_left(self._values, need)
        while position < len(self._values):
            value = self._values[position]
            heap = self._heaps[value]
            while heap and self._current.get(heap[0]) != value:
                heapq.heappop(heap)
            if heap:
                return heap[0]
            del self._heaps[value]
            self._values.pop(position)
        return None

    def largest(self) -> int:
        return max(self._current.values(), default=0)


@dataclass
class _GpuPlan:
    """One GPU while planning. `owners[i]` is the pod a free slice is promised to (None: nobody);
    `fresh[i]` marks a slice this plan carved. `bindable`: sizes whose free slices must stay."""

    order: int
    node: str
    gpu: Gpu
    capacity: int
    can_carve: bool
    can_host: bool
    slices: list[Slice]
    owners: list[str | None]
    fresh: list[bool]
    changed: bool = False
    allocated: int = 0
    unclaimed: Counter[int] = field(default_factory=Counter)
    bindable: frozenset[int] = frozenset()

    @classmethod
    def of(cls, order: int, node: Node, gpu: Gpu, settings: PlanSettings) -> _GpuPlan:
        count = len(gpu.slices)
        plan = cls(
            order,
            node.name,
            gpu,
            gpu.capacity_gb(settings.reserve_mib),
            node.can_carve,
            node.can_host,
            list(gpu.slices),
            [None] * count,
            [False] * count,
            bindable=node.protected,
        )
        unclaimed: Counter[int] = Counter()
        for piece in plan.slices:
            plan.allocated += piece.size_gb
            if not piece.used:
                unclaimed[piece.size_gb] += 1
        plan.unclaimed = unclaimed
        plan._shed_excess()
        return plan

    def copy(self) -> _GpuPlan:
        return _GpuPlan(
            self.order,
            self.node,
            self.gpu,
            self.capacity,
            self.can_carve,
            self.can_host,
            list(self.slices),
            list(self.owners),
            list(self.fresh),
            self.changed,
            self.allocated,
            Counter(self.unclaimed),
            self.bindable,
        )

    @property
    def room(self) -> int:
        return self.capacity - self.allocated

    @property
    def potential(self) -> int:
        """Memory a pod could get here by reclaiming every free slice it may reclaim."""
        return self.room + sum(
            size * count for size, count in self.unclaimed.items() if size not in self.bindable
        )

    def _shed_excess(self) -> None:
        """Drop free slices, largest first, until the GPU is within capacity and the client limit."""
        while self.room < 0 or len(self.slices) > self.gpu.max_slices:
            free = [p for p, s in enumerate(self.slices) if not s.used]
            if not free:
                return
            self._remove([max(free, key=lambda p: (self.slices[p].size_gb, -p))])

    def _remove(self, positions: Iterable[int]) -> None:
        drop = set(positions)
        for position in drop:
            self.allocated -= self.slices[position].size_gb
            if self.owners[position] is None:
                self.unclaimed[self.slices[position].size_gb] -= 1
        self.slices = [s for p, s in enumerate(self.slices) if p not in drop]
        self.owners = [o for p, o in enumerate(self.owners) if p not in drop]
        self.fresh = [f for p, f in enumerate(self.fresh) if p not in drop]
        self.changed = True

    def claim_free(self, size_gb: int, owner: str) -> None:
        for position, candidate in enumerate(self.slices):
            if candidate.size_gb == size_gb and not candidate.used and self.owners[position] is None:
                self.owners[position] = owner
                self.unclaimed[size_gb] -= 1
                return
        raise AssertionError(f"no unclaimed free {size_gb} GiB slice on GPU {self.order}")

    def carve(self, size_gb: int, owner: str) -> None:
        self.slices.append(Slice(size_gb=size_gb, used=False))
        self.owners.append(owner)
        self.fresh.append(True)
        self.allocated += size_gb
        self.changed = True

    def release(self, owner: str) -> None:
        """Take back a pod's promise: a slice carved for it goes, an existing one becomes free again."""
        position = self.owners.index(owner)
        if self.fresh[position]:
            self.owners[position] = None
            self.unclaimed[self.slices[position].size_gb] += 1
            self._remove([position])
        else:
            self.owners[position] = None
            self.unclaimed[self.slices[position].size_gb] += 1

    def promised(self) -> list[tuple[int, str]]:
        """(size, pod) of every slice promised to a pod, smallest first."""
        return sorted((s.size_gb, o) for s, o in zip(self.slices, self.owners, strict=True) if o is not None)

    def reclaim_and_carve(self, size_gb: int, needed: Counter[int], owner: str) -> bool:
        """Reclaim unclaimed free slices (unneeded, then larger ones first) and carve; False if it cannot."""
        candidates = sorted(
            (
                p
                for p, s in enumerate(self.slices)
                if not s.used and self.owners[p] is None and s.size_gb not in self.bindable
            ),
            key=lambda p: (needed[self.slices[p].size_gb] > 0, -self.slices[p].size_gb, p),
        )
        room, count, removed = self.room, len(self.slices), []
        for position in candidates:
            if room >= size_gb and count < self.gpu.max_slices:
                break
            room += self.slices[position].size_gb
            count -= 1
            removed.append(position)
        if room < size_gb or count >= self.gpu.max_slices:
            return False
        self._remove(removed)
        self.carve(size_gb, owner)
        return True

    def take(self, size_gb: int, needed: Counter[int], owner: str) -> bool:
        """Serve a pod on this GPU by whichever means fits: a free slice, room, or reclaiming."""
        if self.unclaimed[size_gb] > 0:
            self.claim_free(size_gb, owner)
            return True
        if self.room >= size_gb and len(self.slices) < self.gpu.max_slices:
            self.carve(size_gb, owner)
            return True
        return self.reclaim_and_carve(size_gb, needed, owner)


class _Cluster:
    """Every plannable GPU with the indexes that make each placement fast. `pinned` holds the pods
    whose promised slice must not move to another node."""

    def __init__(self, gpus: list[_GpuPlan], pinned: frozenset[str] = frozenset()) -> None:
        self.gpus = gpus
        self.pinned = pinned
        self.exact: dict[int, list[int]] = {}
        self.carve_changed = _BestFit()
        self.carve_unchanged = _BestFit()
        self.reclaim = _BestFit()
        self.journal: dict[int, _GpuPlan] | None = None
        self.reclaimed = False
        for gpu in gpus:
            if gpu.can_host:
                for size, count in gpu.unclaimed.items():
                    if count > 0:
                        self.exact.setdefault(size, []).append(gpu.order)
            self._reindex(gpu)
        for heap in self.exact.values():
            heapq.heapify(heap)

    def copy(self) -> _Cluster:
        return _Cluster([gpu.copy() for gpu in self.gpus], self.pinned)

    def as_it_was(self, journal: dict[int, _GpuPlan]) -> _Cluster:
        """An independent copy of the cluster as it was when `journal` started recording."""
        return _Cluster([journal.get(gpu.order, gpu).copy() for gpu in self.gpus], self.pinned)

    def _before_change(self, gpu: _GpuPlan) -> None:
        if self.journal is not None and gpu.order not in self.journal:
            self.journal[gpu.order] = gpu.copy()

    def _reindex(self, gpu: _GpuPlan) -> None:
        can_take = gpu.can_carve and len(gpu.slices) < gpu.gpu.max_slices
        room = gpu.room if can_take else None
        self.carve_changed.set(gpu.order, room if gpu.changed else None)
        self.carve_unchanged.set(gpu.order, None if gpu.changed else room)
        reclaimable = gpu.can_carve and any(
            count > 0 and size not in gpu.bindable for size, count in gpu.unclaimed.items()
        )
        self.reclaim.set(gpu.order, gpu.potential if reclaimable else None)

    def _take_exact(self, size_gb: int, exclude: int | None = None) -> _GpuPlan | None:
        heap = self.exact.get(size_gb)
        found = None
        while heap:
            gpu = self.gpus[heap[0]]
            if gpu.unclaimed[size_gb] <= 0 or not gpu.can_host:
                heapq.heappop(heap)
            elif gpu.order == exclude:
                heapq.heappop(heap)
                found = self._take_exact(size_gb)
                heapq.heappush(heap, gpu.order)
                return found
            else:
                return gpu
        return found

    def _offer_exact(self, gpu: _GpuPlan) -> None:
        """Index a GPU's free slices again (after they were given back or restored)."""
        if gpu.can_host:
            for size, count in gpu.unclaimed.items():
                if count > 0:
                    heapq.heappush(self.exact.setdefault(size, []), gpu.order)

    def place(
        self,
        size_gb: int,
        needed: Counter[int],
        owner: str,
        *,
        may_reclaim: bool = True,
        exclude: int | None = None,
    ) -> _GpuPlan | None:
        gpu = self._take_exact(size_gb, exclude)
        if gpu is not None:
            self._before_change(gpu)
            gpu.claim_free(size_gb, owner)
        else:
            order = self.carve_changed.best_at_least(size_gb)
            if order is None:
                order = self.carve_unchanged.best_at_least(size_gb)
            if order is not None:
                gpu = self.gpus[order]
                self._before_change(gpu)
                gpu.carve(size_gb, owner)
            else:
                order = self.reclaim.best_at_least(size_gb) if may_reclaim else None
                if order is None:
                    return None
                self.reclaimed = True
                gpu = self.gpus[order]
                self._before_change(gpu)
                if not gpu.reclaim_and_carve(size_gb, needed, owner):
                    return None
        self._reindex(gpu)
        return gpu

    def place_among(
        self, nodes: frozenset[str], size_gb: int, needed: Counter[int], owner: str
    ) -> _GpuPlan | None:
        """Place a pod that may only run on `nodes` (it was released to one, or its rules allow only
        those): a free slice of its size first, then the GPU where it fits best, then where reclaiming
        makes room. A plain scan of those nodes' GPUs."""
        candidates = [gpu for gpu in self.gpus if gpu.node in nodes and gpu.can_host]
        free = [gpu for gpu in candidates if gpu.unclaimed[size_gb] > 0]
        carvable = [
            gpu
            for gpu in candidates
            if gpu.can_carve and gpu.room >= size_gb and len(gpu.slices) < gpu.gpu.max_slices
        ]
        reclaimable = [gpu for gpu in candidates if gpu.can_carve and gpu.potential >= size_gb]
        for choice in (free, carvable, reclaimable):
            for gpu in sorted(choice, key=lambda g: (g.room, g.order)):
                self._before_change(gpu)
                if gpu.take(size_gb, needed, owner):
                    self.reclaimed = self.reclaimed or choice is reclaimable
                    self._reindex(gpu)
                    return gpu
        return None

    def move_and_take(
        self, gpu: _GpuPlan, movers: Sequence[tuple[int, str]], needed: Counter[int], pod: PendingPod
    ) -> list[_GpuPlan] | None:
        """Move the promised slices of `movers` (size, pod) off `gpu` so that `pod` fits on `gpu`.

        Returns where each mover went, or None with the cluster exactly as it was.
        """
        self.journal = {}
        self._before_change(gpu)
        for _, mover in movers:
            gpu.release(mover)
        gpu.can_carve = False
        self._reindex(gpu)
        targets: list[_GpuPlan] = []
        for size_gb, mover in movers:
            target = self.place(size_gb, needed, mover, exclude=gpu.order)
            if target is None:
                break
            targets.append(target)
        gpu.can_carve = True
        taken = len(targets) == len(movers) and gpu.take(pod.size_gb, needed, pod.key)
        journal, self.journal = self.journal, None
        if taken:
            self._reindex(gpu)
            self._offer_exact(gpu)
            return targets
        for order, saved in journal.items():
            restored = self.gpus[order]
            restored.__dict__.update(saved.__dict__)  # in place: callers keep their references
            self._reindex(restored)
            self._offer_exact(restored)
        return None

    def changed_count(self) -> int:
        return sum(1 for gpu in self.gpus if gpu.changed)


def _serve(cluster: _Cluster, pods: Sequence[PendingPod], needed: Counter[int]) -> dict[str, Placement]:
    """Place `pods` in their order, except that pods whose rules allow only some nodes go first, the
    fewest nodes first: the others can go anywhere, so they must not take the room the few need."""
    placed: dict[str, Placement] = {}
    smallest_failure = None
    for pod in sorted(pods, key=_constraint):
        if pod.eligible is not None:
            there = cluster.place_among(pod.eligible, pod.size_gb, needed, pod.key)
            if there is not None:
                needed[pod.size_gb] -= 1
                placed[pod.key] = Placement(there.node, there.gpu.index, pod.size_gb)
            continue
        if smallest_failure is not None and pod.size_gb >= smallest_failure:
            continue
        gpu = cluster.place(pod.size_gb, needed, pod.key)
        if gpu is None:
            smallest_failure = pod.size_gb
            continue
        needed[pod.size_gb] -= 1
        placed[pod.key] = Placement(gpu.node, gpu.gpu.index, pod.size_gb)
    return placed


def _constraint(pod: PendingPod) -> int:
    return len(pod.eligible) if pod.eligible is not None else sys.maxsize


_ALTERNATIVE_ORDERS: tuple[Callable[[PendingPod], tuple[int, float, str, str]], ...] = (
    lambda pod: (-pod.size_gb, *pod_order(pod)[1:]),
    lambda pod: (pod.size_gb, *pod_order(pod)[1:]),
)


@dataclass
class _Attempt:
    cluster: _Cluster
    served: dict[str, Placement]
    needed: Counter[int]

    @property
    def score(self) -> tuple[int, int]:
        return (len(self.served), -self.cluster.changed_count())


def _serve_class(cluster: _Cluster, pods: list[PendingPod], needed: Counter[int]) -> _Attempt:
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


def _mover_sets(cluster: _Cluster, pod: PendingPod) -> Iterable[tuple[_GpuPlan, list[tuple[int, str]]]]:
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


@dataclass
class PlanRun:
    """A full planning pass and what it leaves behind, so that later pods can be added cheaply.

    `extendable` holds when every priority class fit whole in age order and nothing was
    reclaimed: then serving pods that sort after all of `last_pod` on the final cluster decides
    exactly what a full pass over all pods would (see `extend_run`).
    """

    result: PlanResult
    cluster: _Cluster
    largest: int
    last_pod: tuple[int, float, str, str] | None
    extendable: bool


NO_OPTED_IN_NODE = f"no opted-in node can be planned on (label {DEFAULT_OPT_IN})"
"""Why every pod waits while no opted-in node has GPUs to plan on."""


def plan_cluster(nodes: Iterable[Node], pending: Iterable[PendingPod], settings: PlanSettings) -> PlanResult:
    """Decide the desired slices of every node and where each pending pod is expected to run."""
    return plan_run(nodes, pending, settings).result


def _trivial_reason(pod: PendingPod, largest: int, any_gpu: bool) -> str | None:
    """Why a pod can be placed nowhere whatever happens, or None."""
    if pod.size_gb <= 0:
        return f"asks for {pod.size_gb} GiB; a slice is at least 1 GiB"
    if not any_gpu:
        return NO_OPTED_IN_NODE
    if pod.size_gb > largest:
        return f"needs {pod.size_gb} GiB; the largest opted-in GPU has {largest} GiB"
    return None


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
    gpus = _gpu_plans(plannable, settings)
    cluster = _Cluster(gpus, frozenset(pod.key for pod in pending if pod.restricted_to is not None))

    unplaced: dict[str, str] = {}
    placed: dict[str, Placement] = {}
    largest = max((g.capacity for g in gpus), default=0)
    servable: list[PendingPod] = []
    for pod in sorted(pending, key=pod_order):
        reason = _trivial_reason(pod, largest, bool(gpus))
        if reason is None:
            servable.append(pod)
        else:
            unplaced[pod.key] = reason

    needed = Counter(pod.size_gb for pod in servable)
    # Pods released to a node are committed to it: they are served first, there.
    for pod in servable:
        if pod.pinned is not None:
            there = cluster.place_among(frozenset({pod.pinned}), pod.size_gb, needed, pod.key)
            if there is not None:
                needed[pod.size_gb] -= 1
                placed[pod.key] = Placement(there.node, there.gpu.index, pod.size_gb)
    free_to_place = [pod for pod in servable if pod.pinned is None]
    for _, members in groupby(free_to_place, key=lambda pod: pod.priority):
        attempt = _serve_class(cluster, list(members), needed)
        cluster, needed = attempt.cluster, attempt.needed
        placed.update(attempt.served)

    waiting = [pod for pod in servable if pod.key not in placed]
    packed = _packed(plannable, servable, settings) if waiting else None
    if packed is not None and _score(packed[1], packed[0], servable) > _score(placed, cluster, servable):
        cluster, placed = packed
        waiting = [pod for pod in servable if pod.key not in placed]
        cluster.reclaimed = True  # not the greedy's own result: never extended
    if waiting:
        carvable = [g for g in cluster.gpus if g.can_carve]
        most = max((g.potential for g in carvable), default=0)
        for pod in waiting:
            if pod.pinned is not None and not any(g.node == pod.pinned for g in cluster.gpus):
                unplaced[pod.key] = (
                    f"released to node {pod.pinned}, which mpsflow does not plan on now (opted out, gone, "
                    "or without GPU reports): the pod waits for that node"
                )
            elif pod.pinned is not None:
                unplaced[pod.key] = (
                    f"released to node {pod.pinned}, which has no room for a {pod.size_gb} GiB slice now"
                )
            elif pod.eligible is not None and not any(g.node in pod.eligible for g in cluster.gpus):
                unplaced[pod.key] = (
                    "no opted-in node that mpsflow plans on matches the pod's node selector, node "
                    "affinity and tolerations"
                )
            elif pod.eligible is not None:
                most_there = max((g.potential for g in carvable if g.node in pod.eligible), default=0)
                unplaced[pod.key] = (
                    f"capacity exhausted on the {len(pod.eligible)} node(s) its node selector, node "
                    f"affinity and tolerations allow: needs {pod.size_gb} GiB on one GPU; the most any "
                    f"of their GPUs could offer now is {most_there} GiB"
                )
            elif carvable:
                unplaced[pod.key] = (
                    f"capacity exhausted: needs {pod.size_gb} GiB on one GPU; the most any GPU could offer "
                    f"now is {most} GiB"
                )
            else:
                unplaced[pod.key] = (
                    "no opted-in node can take new slices now (cordoned, its GPU reports are stale, or it "
                    "is applying its last layout)"
                )

    result = PlanResult(
        layouts=_layouts(cluster.gpus), placed=placed, unplaced=unplaced, excluded_nodes=excluded
    )
    last_pod = pod_order(servable[-1]) if servable else None
    return PlanRun(result, cluster, largest, last_pod, extendable=not waiting and not cluster.reclaimed)


def _gpu_plans(nodes: Iterable[Node], settings: PlanSettings) -> list[_GpuPlan]:
    gpus: list[_GpuPlan] = []
    for node in nodes:
        for gpu in sorted(node.gpus, key=lambda g: g.index):
            gpus.append(_GpuPlan.of(len(gpus), node, gpu, settings))
    return gpus


PACKING_LIMIT = 5_000  # pods and GPUs beyond which contended clusters keep the placement rules alone


def _packed(
    nodes: list[Node], servable: list[PendingPod], settings: PlanSettings
) -> tuple[_Cluster, dict[str, Placement]] | None:
    """The plan that packs the most pods by priority into the GPUs' memory, reclaiming any free slice
    that is not protected (`packing`); None where it does not apply: pods restricted to some nodes, a
    node that may host but not carve, or a cluster beyond `PACKING_LIMIT`."""
    gpus = _gpu_plans(nodes, settings)
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
    return _Cluster(gpus), placed


def _score(placed: dict[str, Placement], cluster: _Cluster, pods: list[PendingPod]) -> tuple[int, ...]:
    """Pods served per priority, highest first, then the fewest GPUs changed: larger is better."""
    served = Counter(pod.priority for pod in pods if pod.key in placed)
    return (
        *(served[p] for p in sorted({pod.priority for pod in pods}, reverse=True)),
        -cluster.changed_count(),
    )


def _layouts(gpus: Iterable[_GpuPlan]) -> dict[str, dict[int, tuple[Slice, ...]]]:
    layouts: dict[str, dict[int, tuple[Slice, ...]]] = {}
    for gpu_plan in gpus:
        layouts.setdefault(gpu_plan.node, {})[gpu_plan.gpu.index] = tuple(gpu_plan.slices)
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
    servable = [pod for pod in ordered if _trivial_reason(pod, run.largest, any_gpu) is None]
    needed = Counter(pod.size_gb for pod in servable)
    placed: dict[str, Placement] = {}
    touched: set[str] = set()
    for pod in servable:
        gpu = run.cluster.place(pod.size_gb, needed, pod.key, may_reclaim=False)
        if gpu is None:
            run.extendable = False
            return None
        needed[pod.size_gb] -= 1
        placed[pod.key] = Placement(gpu.node, gpu.gpu.index, pod.size_gb)
        touched.add(gpu.node)
    if servable:
        run.last_pod = pod_order(servable[-1])
    unplaced = {pod.key: reason for pod in ordered if (reason := _trivial_reason(pod, run.largest, any_gpu))}
    return Extension(placed, unplaced, _layouts(g for g in run.cluster.gpus if g.node in touched))
