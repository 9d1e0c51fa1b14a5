"""nos's MPS planning algorithm, re-implemented to compare mpsflow's planner against it.

This follows nebuly-ai/nos as docs/nos-compatibility.md §3 describes it (each § below is a section
of that page; Go sources `internal/partitioning/core/{planner,snapshot,tracker,util}.go` and
`pkg/gpu/slicing/{gpu,node}.go`), weaknesses included:

* Lacking slices (§3.3) are computed per pod against the free slices of the whole cluster, so a
  pod lacks nothing while any free slice of its size exists anywhere, whoever else wants it.
  The tracker sums them; `Remove` subtracts a placed pod's share.
* Pods are stable-sorted by higher priority, then smaller slice (§3.4); nothing else.
* Candidate nodes are the nodes with free capacity at the start, walked once in name order
  (§3.5); per node: fork the snapshot, update the node's geometry for the *global* lacking
  slices, try every sorted pod (placed ones included: they are never removed from the list),
  commit if any pod was added, else revert (§3.6).
* The per-GPU geometry update (§3.7): spare memory first, then delete every original free
  profile, create more, then restore each original profile all-or-nothing; the latent bug that
  step b also deletes slices of that size just created in step a is kept.
* The object aliasing of the Go code is kept: candidate nodes are the objects of the snapshot
  as it was when the loop started; a node updated in place is put into the fork with
  `SetNode`, so a revert does not undo the update of a node that is still in the committed
  data (it stays visible to later cluster-wide lacking checks, though not in the plan).

Deliberate fidelity choices (each documented so the comparison stays honest):

1. Memory is GiB (`memory_mib // 1024`), as mpsflow plans it, not nos's MiB/1000 rounded up
   (§3.12 item 3): with nos's figure its plans could count slices that do not fit.
2. A GPU never gets more slices than its MPS client limit (48 from Volta on): nos has no limit
   (§3.7), but a plan past it cannot run. Creating a slice past the limit fails like a slice
   that does not fit.
3. Go map iteration order is random; here GPUs are walked by index, missing and restored
   profiles by ascending size, pods keep snapshot order before the stable sort.
4. GPU indices come from the snapshot as they are; nos's reconstruction bug for GPUs without
   annotations (§3.2) is not reproduced.
5. Pods asking for 0 GiB are left out: nos would "create" 0 GB slices for them, which no device
   plugin serves.
6. The simulated scheduler is reduced to what matters here: NodeResourcesFit on the slice
   resource, and NodeUnschedulable for a node mpsflow may not carve on (`can_carve` False,
   taken as cordoned); nodes have no taints, affinities or CPU limits in the snapshots.
7. What nos places is counted the way the cluster would realise it: after the plan is applied,
   the scheduler binds pending pods (priority order, then older, then name) to the free slices
   of their size (nodes by name, GPUs by index). nos's own simulation may count a pod twice;
   this counts each pod once. With `cycles > 1`, the bound pods run, the rest stay pending and
   nos plans again, as its next batches would, until a cycle binds nobody.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.planner.core.model import Gpu, Node, PendingPod, Slice


@dataclass
class NosGpu:
    """`slicing.GPU`: counts of used and free slices per size (zero entries kept, as in Go maps)."""

    index: int
    memory_gb: int
    max_slices: int
    used: dict[int, int]
    free: dict[int, int]

    def clone(self) -> NosGpu:
        return NosGpu(self.index, self.memory_gb, self.max_slices, dict(self.used), dict(self.free))

    def total_memory(self) -> int:
        return sum(s * q for s, q in self.used.items()) + sum(s * q for s, q in self.free.items())

    def slice_count(self) -> int:
        return sum(self.used.values()) + sum(self.free.values())

    def can_create_more_slices(self) -> bool:
        return self.memory_gb - self.total_memory() >= 1 and self.slice_count() < self.max_slices

    def create_slices(self, size: int, num: int) -> bool:
        if self.memory_gb - self.total_memory() < size * num:
            return False
        if self.slice_count() + num > self.max_slices:  # fidelity choice 2
            return False
        self.free[size] = self.free.get(size, 0) + num
        return True

    def has_free_capacity(self) -> bool:
        return len(self.free) > 0 or self.can_create_more_slices()

    def add_pod(self, size: int) -> bool:
        if self.free.get(size, 0) < 1:
            return False
        self.free[size] -= 1
        self.used[size] = self.used.get(size, 0) + 1
        return True

    def geometry(self) -> Counter[int]:
        total = Counter(self.used)
        total.update(self.free)
        return +total

    def update_geometry_for(self, required: dict[int, int]) -> bool:
        """`GPU.UpdateGeometryFor` (§3.7), step for step."""
        missing = {s: q - self.free.get(s, 0) for s, q in required.items() if q - self.free.get(s, 0) > 0}
        if not missing:
            return False
        updated = False
        original_free = dict(self.free)
        for size in sorted(missing):
            # a. use spare memory first
            if self.can_create_more_slices():
                for _ in range(missing[size]):
                    if not self.create_slices(size, 1):
                        break
                    missing[size] -= 1
                    updated = True
            # b. delete every original free profile (slices just made of that size included)
            for profile in original_free:
                self.free.pop(profile, None)
            for _ in range(missing[size]):
                if not self.can_create_more_slices():
                    break
                if not self.create_slices(size, 1):
                    break
                missing[size] -= 1
                updated = True
            # c. restore each original free profile, all of its slices or none
            for profile in sorted(original_free):
                self.create_slices(profile, original_free[profile])
        return updated


@dataclass
class NosNode:
    """`slicing.Node` with the scheduler's view of its slice resources (allocatable, requested)."""

    name: str
    gpus: list[NosGpu]
    allocatable: dict[int, int]
    requested: dict[int, int]
    schedulable: bool = True

    def clone(self) -> NosNode:
        return NosNode(
            self.name,
            [g.clone() for g in self.gpus],
            dict(self.allocatable),
            dict(self.requested),
            self.schedulable,
        )

    def geometry(self) -> Counter[int]:
        total: Counter[int] = Counter()
        for gpu in self.gpus:
            total.update(gpu.geometry())
        return total

    def has_free_capacity(self) -> bool:
        return any(g.has_free_capacity() for g in self.gpus)

    def update_geometry_for(self, slices: dict[int, int]) -> bool:
        """`Node.UpdateGeometryFor`: each GPU in turn; its free slices then count as provided."""
        if not self.gpus or not slices:
            return False
        required = dict(slices)
        any_updated = False
        for gpu in self.gpus:
            any_updated = gpu.update_geometry_for(required) or any_updated
            for profile, quantity in gpu.free.items():
                required[profile] = required.get(profile, 0) - quantity
                if required[profile] <= 0:
                    del required[profile]
        self.allocatable = dict(self.geometry())
        return any_updated

    def add_pod(self, size: int) -> bool:
        for gpu in self.gpus:
            if gpu.add_pod(size):
                self.requested[size] = self.requested.get(size, 0) + 1
                return True
        return False

    def fits(self, size: int) -> bool:
        """NodeUnschedulable and NodeResourcesFit on `nvidia.com/gpu-<size>gb: 1`."""
        return self.schedulable and self.allocatable.get(size, 0) - self.requested.get(size, 0) >= 1


class _ClusterSnapshot:
    """`clusterSnapshot`: committed data, cluster-wide lacking slices, and the fork of one main-loop
    step, in which only the candidate node differs from the committed data.

    nos forks by copying every node, and adds up every node's allocatable and requested slices for
    every pod it tries. Here a fork copies only the candidate node (the only one a step changes),
    and the committed sums are kept up to date as nodes change, so that a lacking check costs the
    same whatever the cluster's size. What it decides is unchanged, object aliasing included: a
    node updated in place while it was still in the committed data (no step had committed yet)
    stays updated there when its step is reverted.
    """

    def __init__(self, nodes: dict[str, NosNode]) -> None:
        self.data = nodes
        self.committed = False  # until a step commits, the committed nodes are the candidates themselves
        self.allocatable: Counter[int] = Counter()
        self.requested: Counter[int] = Counter()
        for node in nodes.values():
            self._count(node, 1)
        self.candidate: NosNode | None = None  # the fork: the node in the data ...
        self.target: NosNode | None = None  # ... and the one in its place

    def _count(self, node: NosNode, sign: int) -> None:
        for size, quantity in node.allocatable.items():
            self.allocatable[size] += sign * quantity
        for size, quantity in node.requested.items():
            self.requested[size] += sign * quantity

    def fork(self, before: NosNode, target: NosNode) -> None:
        """A step on the node that was `before` in the data, which is `target` in the fork."""
        self.candidate, self.target = before, target

    def end(self, name: str, node: NosNode, keep: bool) -> None:
        """End the step on `name` (whose candidate object is `node`): commit it or revert it."""
        assert self.candidate is not None and self.target is not None
        self._count(self.candidate, -1)
        if keep:
            self.data[name] = self.target
            self.committed = True
        else:
            # Reverted: the data keeps its own node, which is `node` itself (updated in place) as
            # long as no step has committed; a commit put copies in the data.
            self.data[name] = self.candidate if self.committed else node
        self._count(self.data[name], 1)
        self.candidate = self.target = None

    def lacking(self, size: int) -> int:
        """`GetLackingSlices` for a pod asking for one slice of `size`: 1 or 0."""
        allocatable, requested = self.allocatable[size], self.requested[size]
        if self.candidate is not None and self.target is not None:
            allocatable += self.target.allocatable.get(size, 0) - self.candidate.allocatable.get(size, 0)
            requested += self.target.requested.get(size, 0) - self.candidate.requested.get(size, 0)
        available = max(0, allocatable - requested)
        return max(0, 1 - available)


class _SliceTracker:
    def __init__(self, snapshot: _ClusterSnapshot, pods: Sequence[PendingPod]) -> None:
        self.lacking: dict[int, int] = {}
        self.by_pod: dict[str, dict[int, int]] = {}
        for pod in pods:
            own = self.by_pod.setdefault(pod.key, {})
            if snapshot.lacking(pod.size_gb) > 0:
                self.lacking[pod.size_gb] = self.lacking.get(pod.size_gb, 0) + 1
                own[pod.size_gb] = own.get(pod.size_gb, 0) + 1

    def remove(self, pod: PendingPod) -> None:
        own = self.by_pod.get(pod.key)
        if own is None:
            return
        for size, quantity in list(own.items()):
            self.lacking[size] = self.lacking.get(size, 0) - quantity
            own[size] -= quantity
            if own[size] <= 0:
                del own[size]
            if self.lacking[size] <= 0:
                del self.lacking[size]


def _to_nos(node: Node) -> NosNode:
    gpus = [
        NosGpu(
            index=gpu.index,
            memory_gb=gpu.capacity_gb(),
            max_slices=gpu.max_slices,
            used=dict(Counter(s.size_gb for s in gpu.slices if s.used)),
            free=dict(Counter(s.size_gb for s in gpu.slices if not s.used)),
        )
        for gpu in sorted(node.gpus, key=lambda g: g.index)
    ]
    result = NosNode(node.name, gpus, {}, {}, schedulable=node.can_carve)
    result.allocatable = dict(result.geometry())
    result.requested = dict(sum((Counter(g.used) for g in gpus), Counter[int]()))
    return result


def sort_pods(pods: Iterable[PendingPod]) -> list[PendingPod]:
    """`NewPodSorter`: stable; higher priority first, then the smaller slice first."""
    return sorted(pods, key=lambda p: (-p.priority, p.size_gb))


def plan_geometry(nodes: Sequence[Node], pods: Sequence[PendingPod]) -> dict[str, list[Counter[int]]]:
    """One `Planner.Plan` call: the desired slice counts (size -> count) of every GPU of every node."""
    snapshot = _ClusterSnapshot({n.name: _to_nos(n) for n in nodes})
    state = {name: [g.geometry() for g in node.gpus] for name, node in snapshot.data.items()}
    candidates = [p for p in pods if p.size_gb >= 1]  # fidelity choice 5
    tracker = _SliceTracker(snapshot, candidates)
    if not tracker.lacking:
        return state
    ordered = sort_pods(candidates)
    candidate_nodes = sorted(
        (n for n in snapshot.data.values() if n.has_free_capacity()), key=lambda n: n.name
    )
    for node in candidate_nodes:
        if not tracker.lacking:
            return state
        before = node.clone()  # the node as the data has it; nos's fork copies it
        target = node if node.update_geometry_for(tracker.lacking) else before
        snapshot.fork(before, target)
        added = 0
        for pod in ordered:
            if snapshot.lacking(pod.size_gb) > 0:
                continue
            if not target.fits(pod.size_gb) or not target.add_pod(pod.size_gb):
                continue
            state[node.name] = [g.geometry() for g in node.gpus]
            tracker.remove(pod)
            added += 1
        # A reverted step added no pod, so `before` is unchanged even when it was the target.
        snapshot.end(node.name, node, keep=added > 0)
    return state


@dataclass
class NosResult:
    """What nos achieves: the pods bound to slices, and the final slices of every GPU.

    `layouts` is written like mpsflow's plan: the slices of the snapshot that were used stay
    used, every other slice is free (including those the benchmark's scheduler then bound).
    """

    placed: int
    placed_keys: list[str] = field(default_factory=list)
    layouts: dict[str, dict[int, tuple[Slice, ...]]] = field(default_factory=dict)
    cycles_run: int = 0


def _layout(used: Counter[int], geometry: Counter[int]) -> tuple[Slice, ...]:
    slices = [Slice(size, True) for size in sorted(used) for _ in range(used[size])]
    free = geometry - used
    slices += [Slice(size, False) for size in sorted(free) for _ in range(free[size])]
    return tuple(slices)


def nos_plan(nodes: Iterable[Node], pods: Iterable[PendingPod], *, cycles: int = 1) -> NosResult:
    """Plan as nos does, let the scheduler bind pods to the planned free slices, `cycles` times.

    `placed` counts the pending pods bound over all cycles; a cycle that binds nobody ends it.
    """
    node_list = sorted(nodes, key=lambda n: n.name)
    used = {
        n.name: {g.index: Counter(s.size_gb for s in g.slices if s.used) for g in n.gpus} for n in node_list
    }
    originally_used = {name: {i: Counter(c) for i, c in gpus.items()} for name, gpus in used.items()}
    geometry = {n.name: {g.index: Counter(s.size_gb for s in g.slices) for g in n.gpus} for n in node_list}
    pending = list(pods)
    bound: list[str] = []
    cycles_run = 0
    for _ in range(cycles):
        cycles_run += 1
        current = [
            Node(
                name=n.name,
                gpus=tuple(
                    Gpu(
                        index=g.index,
                        model=g.model,
                        memory_mib=g.memory_mib,
                        slices=_layout(used[n.name][g.index], geometry[n.name][g.index]),
                        max_slices=g.max_slices,
                    )
                    for g in n.gpus
                ),
                can_carve=n.can_carve,
            )
            for n in node_list
        ]
        planned = plan_geometry(current, pending)
        for node in current:
            for gpu, counts in zip(sorted(node.gpus, key=lambda g: g.index), planned[node.name], strict=True):
                geometry[node.name][gpu.index] = Counter(counts)
        newly = _bind(pending, node_list, used, geometry)
        bound.extend(newly)
        taken = set(newly)
        pending = [p for p in pending if p.key not in taken]
        if not newly:
            break
    layouts = {
        n.name: {
            g.index: _layout(originally_used[n.name][g.index], geometry[n.name][g.index])
            for g in sorted(n.gpus, key=lambda g: g.index)
        }
        for n in node_list
    }
    return NosResult(placed=len(bound), placed_keys=bound, layouts=layouts, cycles_run=cycles_run)


def _bind(
    pending: Sequence[PendingPod],
    nodes: Sequence[Node],
    used: dict[str, dict[int, Counter[int]]],
    geometry: dict[str, dict[int, Counter[int]]],
) -> list[str]:
    """The scheduler after the plan: each pod, in queue order, takes a free slice of its size."""
    queue = sorted(
        pending,
        key=lambda p: (-p.priority, p.created.timestamp() if p.created else float("inf"), p.key),
    )
    bound: list[str] = []
    for pod in queue:
        if pod.size_gb < 1:
            continue
        spot = next(
            (
                (n.name, g.index)
                for n in nodes
                if n.can_carve
                for g in sorted(n.gpus, key=lambda g: g.index)
                if geometry[n.name][g.index][pod.size_gb] > used[n.name][g.index][pod.size_gb]
            ),
            None,
        )
        if spot is not None:
            used[spot[0]][spot[1]][pod.size_gb] += 1
            bound.append(pod.key)
    return bound
