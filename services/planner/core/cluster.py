"""The cluster while a plan is made: every plannable GPU's slices, and indexes that find where one fits.

Where it sits: under the placement strategy (`strategy`), which decides which pod is served next
and asks `Cluster.place` (or `place_among`, `move_and_take`) for a GPU; the run (`run`) builds the
cluster from the plannable nodes (`gpu_plans`) and reads the layouts back from it. A `GpuPlan` is
one GPU's slices as the plan changes them, each free one promised to at most one pod. `Cluster`
indexes, per slice size, the GPUs with a free one, and the GPUs by room to carve and by memory
that reclaiming would free, so that every placement step is logarithmic in the number of GPUs:
a free slice of the pod's size first; otherwise a slice carved where it fits best, on a GPU this
plan already changes if possible; otherwise free slices reclaimed on the GPU that fits best,
those that no pending pod needs first.

What it must never do, whoever asks: remove, resize or move a used slice; let a GPU's slices add
up to more than its capacity or outnumber its MPS clients; carve on a node that cannot carve, or
place a pod on one that cannot host; reclaim for a pod a free slice of a size the node protects.
It knows pods only by size and key: which pod is served first, and why one waits, is the
strategy's. Nothing here performs I/O.
"""

from __future__ import annotations

import heapq
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from services.planner.core.model import Gpu, Node, PendingPod, PlanSettings, Slice, slice_of


class _BestFit:
    """GPUs keyed by a value; finds the GPU with the smallest value at least a need (then lowest order).

    Entries are invalidated lazily: a GPU whose value changed leaves a stale heap entry behind,
    skipped when met.
    """

    def __init__(self, entries: Iterable[tuple[int, int]] = ()) -> None:
        """With `entries` (order, value) set at once, as many `set` calls would."""
        self._current: dict[int, int] = dict(entries)
        self._heaps: dict[int, list[int]] = {}
        for order, value in self._current.items():
            heap = self._heaps.get(value)
            if heap is None:
                self._heaps[value] = [order]
            else:
                heap.append(order)
        for heap in self._heaps.values():
            heapq.heapify(heap)
        self._values: list[int] = sorted(self._heaps)

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


@dataclass(slots=True)
class GpuPlan:
    """One GPU while planning. `owners[i]` is the pod a free slice is promised to (None: nobody);
    `fresh[i]` marks a slice this plan carved. `bindable`: sizes whose free slices must stay.
    `unclaimed`: free slices promised to nobody, per size; `reclaimable` and `reclaimable_slices`:
    the memory and the number of those whose size is not bindable (what reclaiming may take), kept
    up to date by every change so that no placement step adds them up again."""

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
    unclaimed: dict[int, int] = field(default_factory=dict)
    bindable: frozenset[int] = frozenset()
    reclaimable: int = 0
    reclaimable_slices: int = 0

    @classmethod
    def of(cls, order: int, node: Node, gpu: Gpu, settings: PlanSettings) -> GpuPlan:
        slices = list(gpu.slices)
        count = len(slices)
        bindable = node.protected
        allocated = 0
        unclaimed: dict[int, int] = {}
        for piece in slices:
            allocated += piece.size_gb
            if not piece.used:
                unclaimed[piece.size_gb] = unclaimed.get(piece.size_gb, 0) + 1
        reclaimable = reclaimable_slices = 0
        for size, number in unclaimed.items():
            if size not in bindable:
                reclaimable += size * number
                reclaimable_slices += number
        plan = cls(
            order,
            node.name,
            gpu,
            gpu.capacity_gb(settings.reserve_mib),
            node.can_carve,
            node.can_host,
            slices,
            [None] * count,
            [False] * count,
            False,
            allocated,
            unclaimed,
            bindable,
            reclaimable,
            reclaimable_slices,
        )
        if plan.capacity < allocated or count > gpu.max_slices:
            plan._shed_excess()
        return plan

    def copy(self) -> GpuPlan:
        return GpuPlan(
            self.order,
            self.node,
            self.gpu,
            self.capacity,
            self.can_carve,
            self.can_host,
            self.slices.copy(),
            self.owners.copy(),
            self.fresh.copy(),
            self.changed,
            self.allocated,
            self.unclaimed.copy(),
            self.bindable,
            self.reclaimable,
            self.reclaimable_slices,
        )

    def restore(self, saved: GpuPlan) -> None:
        """Become `saved` again, in place: callers keep their references to this plan."""
        for name in GpuPlan.__slots__:
            setattr(self, name, getattr(saved, name))

    @property
    def room(self) -> int:
        return self.capacity - self.allocated

    @property
    def potential(self) -> int:
        """Memory a pod could get here by reclaiming every free slice it may reclaim."""
        return self.capacity - self.allocated + self.reclaimable

    def _shed_excess(self) -> None:
        """Drop free slices, largest first, until the GPU is within capacity and the client limit."""
        while self.room < 0 or len(self.slices) > self.gpu.max_slices:
            free = [p for p, s in enumerate(self.slices) if not s.used]
            if not free:
                return
            self._remove([max(free, key=lambda p: (self.slices[p].size_gb, -p))])

    def _unclaim(self, size_gb: int, change: int) -> None:
        """`change` (1 or -1) more free slices of `size_gb` promised to nobody."""
        self.unclaimed[size_gb] = self.unclaimed.get(size_gb, 0) + change
        if size_gb not in self.bindable:
            self.reclaimable += size_gb * change
            self.reclaimable_slices += change

    def _remove(self, positions: Iterable[int]) -> None:
        drop = set(positions)
        for position in drop:
            size = self.slices[position].size_gb
            self.allocated -= size
            if self.owners[position] is None:
                self._unclaim(size, -1)
        self.slices = [s for p, s in enumerate(self.slices) if p not in drop]
        self.owners = [o for p, o in enumerate(self.owners) if p not in drop]
        self.fresh = [f for p, f in enumerate(self.fresh) if p not in drop]
        self.changed = True

    def claim_free(self, size_gb: int, owner: str) -> int:
        """Promise a free slice of `size_gb` to `owner`; its position."""
        owners = self.owners
        for position, candidate in enumerate(self.slices):
            if candidate.size_gb == size_gb and not candidate.used and owners[position] is None:
                owners[position] = owner
                self._unclaim(size_gb, -1)
                return position
        raise AssertionError(f"no unclaimed free {size_gb} GiB slice on GPU {self.order}")

    def unclaim(self, positions: Iterable[int]) -> None:
        """Take back the promises `claim_free` made of the slices at `positions`."""
        for position in positions:
            self.owners[position] = None
            self._unclaim(self.slices[position].size_gb, 1)

    def carve(self, size_gb: int, owner: str) -> None:
        self.slices.append(slice_of(size_gb, False))
        self.owners.append(owner)
        self.fresh.append(True)
        self.allocated += size_gb
        self.changed = True

    def release(self, owner: str) -> None:
        """Take back a pod's promise: a slice carved for it goes, an existing one becomes free again."""
        position = self.owners.index(owner)
        self.owners[position] = None
        self._unclaim(self.slices[position].size_gb, 1)
        if self.fresh[position]:
            self._remove([position])

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
        if self.unclaimed.get(size_gb, 0) > 0:
            self.claim_free(size_gb, owner)
            return True
        if self.room >= size_gb and len(self.slices) < self.gpu.max_slices:
            self.carve(size_gb, owner)
            return True
        return self.reclaim_and_carve(size_gb, needed, owner)


class Cluster:
    """Every plannable GPU with the indexes that make each placement fast. `pinned` holds the pods
    whose promised slice must not move to another node."""

    def __init__(self, gpus: list[GpuPlan], pinned: frozenset[str] = frozenset()) -> None:
        self.gpus = gpus
        self.pinned = pinned
        self.exact: dict[int, list[int]] = {}
        self.journal: dict[int, GpuPlan | list[int]] | None = None
        """While recording: per GPU changed since, a copy of it as it was, or, when all that changed
        is free slices promised (most GPUs, and cheaper to record), the positions of those slices."""
        self.reclaimed = False
        self._by_node: dict[str, list[GpuPlan]] | None = None
        self._at: dict[tuple[str, int], GpuPlan] | None = None
        changed: list[tuple[int, int]] = []
        unchanged: list[tuple[int, int]] = []
        reclaim: list[tuple[int, int]] = []
        for gpu in gpus:
            if gpu.can_host:
                for size, count in gpu.unclaimed.items():
                    if count > 0:
                        self.exact.setdefault(size, []).append(gpu.order)
            room, potential = self._values_of(gpu)
            if room is not None:
                (changed if gpu.changed else unchanged).append((gpu.order, room))
            if potential is not None:
                reclaim.append((gpu.order, potential))
        for heap in self.exact.values():
            heapq.heapify(heap)
        self.carve_changed = _BestFit(changed)
        self.carve_unchanged = _BestFit(unchanged)
        self.reclaim = _BestFit(reclaim)

    def copy(self) -> Cluster:
        return Cluster([gpu.copy() for gpu in self.gpus], self.pinned)

    def gpus_of(self, nodes: Iterable[str]) -> list[GpuPlan]:
        """The GPUs of `nodes`, in the cluster's order."""
        if self._by_node is None:
            self._by_node = {}
            for gpu in self.gpus:
                self._by_node.setdefault(gpu.node, []).append(gpu)
        return sorted((gpu for node in nodes for gpu in self._by_node.get(node, ())), key=lambda g: g.order)

    def as_it_was(self, journal: dict[int, GpuPlan | list[int]]) -> Cluster:
        """An independent copy of the cluster as it was when `journal` started recording."""
        return Cluster([_as_it_was(gpu, journal.get(gpu.order)) for gpu in self.gpus], self.pinned)

    def _before_change(self, gpu: GpuPlan) -> None:
        if self.journal is not None:
            saved = self.journal.get(gpu.order)
            if not isinstance(saved, GpuPlan):
                self.journal[gpu.order] = _as_it_was(gpu, saved)

    def _claimed(self, gpu: GpuPlan, position: int) -> None:
        """Record that the free slice at `position` was just promised."""
        if self.journal is not None:
            saved = self.journal.get(gpu.order)
            if saved is None:
                self.journal[gpu.order] = [position]
            elif isinstance(saved, list):
                saved.append(position)

    @staticmethod
    def _values_of(gpu: GpuPlan) -> tuple[int | None, int | None]:
        """The GPU's room to carve (None: it cannot take a slice) and the memory that reclaiming
        would give (None: nothing to reclaim)."""
        room = gpu.room if gpu.can_carve and len(gpu.slices) < gpu.gpu.max_slices else None
        potential = gpu.potential if gpu.can_carve and gpu.reclaimable_slices > 0 else None
        return room, potential

    def _reindex(self, gpu: GpuPlan) -> None:
        room, potential = self._values_of(gpu)
        self.carve_changed.set(gpu.order, room if gpu.changed else None)
        self.carve_unchanged.set(gpu.order, None if gpu.changed else room)
        self.reclaim.set(gpu.order, potential)

    def _take_exact(self, size_gb: int, exclude: int | None = None) -> GpuPlan | None:
        heap = self.exact.get(size_gb)
        found = None
        while heap:
            gpu = self.gpus[heap[0]]
            if gpu.unclaimed.get(size_gb, 0) <= 0 or not gpu.can_host:
                heapq.heappop(heap)
            elif gpu.order == exclude:
                heapq.heappop(heap)
                found = self._take_exact(size_gb)
                heapq.heappush(heap, gpu.order)
                return found
            else:
                return gpu
        return found

    def _free_at(self, where: tuple[str, int], size_gb: int, exclude: int | None) -> GpuPlan | None:
        """The GPU at `where` (node, index) if it has a free slice of `size_gb` to promise."""
        if self._at is None:
            self._at = {(gpu.node, gpu.gpu.index): gpu for gpu in self.gpus}
        gpu = self._at.get(where)
        if gpu is None or gpu.order == exclude or not gpu.can_host or gpu.unclaimed.get(size_gb, 0) <= 0:
            return None
        return gpu

    def _offer_exact(self, gpu: GpuPlan) -> None:
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
        prefer: tuple[str, int] | None = None,
    ) -> GpuPlan | None:
        """Find the GPU for a pod of `size_gb` and promise it a slice there: a free slice of its size
        (on `prefer`, the GPU (node, index) it was placed on before, when that has one), else where
        carving fits best, else where reclaiming free slices makes room. None when nowhere."""
        gpu = self._free_at(prefer, size_gb, exclude) if prefer is not None else None
        if gpu is None:
            gpu = self._take_exact(size_gb, exclude)
        if gpu is not None:
            self._claimed(gpu, gpu.claim_free(size_gb, owner))
            # A free slice claimed changes what reclaiming there gives, not the room to carve.
            self.reclaim.set(gpu.order, self._values_of(gpu)[1])
            return gpu
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
        self,
        nodes: frozenset[str],
        size_gb: int,
        needed: Counter[int],
        owner: str,
        prefer: tuple[str, int] | None = None,
    ) -> GpuPlan | None:
        """Place a pod that may only run on `nodes` (it was released to one, or its rules allow only
        those): a free slice of its size first (on `prefer` when that has one), then the GPU where it
        fits best, then where reclaiming makes room. A plain scan of those nodes' GPUs."""
        candidates = [gpu for gpu in self.gpus if gpu.node in nodes and gpu.can_host]
        free = [gpu for gpu in candidates if gpu.unclaimed.get(size_gb, 0) > 0]
        carvable = [
            gpu
            for gpu in candidates
            if gpu.can_carve and gpu.room >= size_gb and len(gpu.slices) < gpu.gpu.max_slices
        ]
        reclaimable = [gpu for gpu in candidates if gpu.can_carve and gpu.potential >= size_gb]
        free.sort(key=lambda g: ((g.node, g.gpu.index) != prefer, g.room, g.order))
        carvable.sort(key=attrgetter("room", "order"))
        reclaimable.sort(key=attrgetter("room", "order"))
        for choice in (free, carvable, reclaimable):
            for gpu in choice:
                self._before_change(gpu)
                if gpu.take(size_gb, needed, owner):
                    self.reclaimed = self.reclaimed or choice is reclaimable
                    self._reindex(gpu)
                    return gpu
        return None

    def move_and_take(
        self, gpu: GpuPlan, movers: Sequence[tuple[int, str]], needed: Counter[int], pod: PendingPod
    ) -> list[GpuPlan] | None:
        """Move the promised slices of `movers` (size, pod) off `gpu` so that `pod` fits on `gpu`.

        Returns where each mover went, or None with the cluster exactly as it was.
        """
        self.journal = {}
        self._before_change(gpu)
        for _, mover in movers:
            gpu.release(mover)
        gpu.can_carve = False
        self._reindex(gpu)
        targets: list[GpuPlan] = []
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
            if isinstance(saved, GpuPlan):
                restored.restore(saved)
            else:
                restored.unclaim(saved)
            self._reindex(restored)
            self._offer_exact(restored)
        return None

    def replace(self, gpu: GpuPlan) -> None:
        """Put `gpu` in the place of the GPU of its `order` (the same GPU, seen anew), indexes and all."""
        self.gpus[gpu.order] = gpu
        self._by_node = self._at = None
        self._reindex(gpu)
        self._offer_exact(gpu)

    def withhold(self, gpu: GpuPlan) -> None:
        """Place nothing on `gpu`, which may host and carve (no free slice promised, no slice carved or
        reclaimed; a move takes nothing from it either), until `give_back(gpu)`."""
        gpu.can_carve = gpu.can_host = False
        self._reindex(gpu)

    def give_back(self, gpu: GpuPlan) -> None:
        """Undo `withhold(gpu)`."""
        gpu.can_carve = gpu.can_host = True
        self._reindex(gpu)
        self._offer_exact(gpu)

    def changed_count(self) -> int:
        return sum(1 for gpu in self.gpus if gpu.changed)


def _as_it_was(gpu: GpuPlan, saved: GpuPlan | list[int] | None) -> GpuPlan:
    """A copy of `gpu` as a journal recorded it: as it is (None), as saved, or with the promises of
    the slices at the positions listed taken back."""
    if isinstance(saved, GpuPlan):
        return saved.copy()
    copy = gpu.copy()
    if saved is not None:
        copy.unclaim(saved)
    return copy


def gpu_plans(nodes: Iterable[Node], settings: PlanSettings) -> list[GpuPlan]:
    """A `GpuPlan` for every GPU of `nodes`, in their order then by GPU index; its position is its `order`."""
    gpus: list[GpuPlan] = []
    for node in nodes:
        for gpu in sorted(node.gpus, key=lambda g: g.index):
            gpus.append(GpuPlan.of(len(gpus), node, gpu, settings))
    return gpus
