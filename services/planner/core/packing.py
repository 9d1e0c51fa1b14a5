"""Which pods fit at all, by priority: slice sizes packed into GPU memory, for contended clusters.

Where it sits: inside the planner's core (`strategy.serve`), as a second opinion when its
placement rules leave some pods unplaced. Once free slices may be reclaimed, a GPU is a bin of its
memory less what used (and protected) slices hold, with a client limit; pods are items. Serving
as many pods of the highest priority as possible, then of the next, ... is a lexicographic
multiple-knapsack problem. Its answer here: within each priority class, the k smallest pods are
the best k to serve (a pod swapped for a smaller one still fits wherever it was), so the largest k
whose pods pack together with those already chosen is found by bisection with best-fit decreasing,
then further pods are tried one by one, for small clusters with an exact search over bin fillings
when best fit fails.

Pure, deterministic and bounded: every search has a budget, and nothing here performs I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

EXACT_BINS = 64  # clusters up to this many GPUs get the exact search when best fit fails
EXACT_ITEMS = 400
EXACT_STEPS = 50_000


@dataclass(frozen=True)
class Bin:
    """One GPU as the packing sees it: memory (GiB) and MPS clients it can still give."""

    room: int
    slots: int


def best_fit_decreasing(bins: Sequence[Bin], sizes: Sequence[int]) -> list[int] | None:
    """The bin of each item (in the order given), largest items first each into the bin that it
    leaves the least room in; None when some item fits nowhere."""
    rooms = [b.room for b in bins]
    slots = [b.slots for b in bins]
    by_room: dict[int, list[int]] = {}
    for index, room in enumerate(rooms):
        if slots[index] > 0:
            by_room.setdefault(room, []).append(index)
    values = sorted(by_room)
    assignment = [-1] * len(sizes)
    for item in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        size = sizes[item]
        position = _first_at_least(values, size)
        if position is None:
            return None
        room = values[position]
        index = by_room[room].pop()
        if not by_room[room]:
            del by_room[room]
            values.pop(position)
        assignment[item] = index
        rooms[index] -= size
        slots[index] -= 1
        if slots[index] > 0:
            if rooms[index] not in by_room:
                _insert_sorted(values, rooms[index])
            by_room.setdefault(rooms[index], []).append(index)
    return assignment


def _first_at_least(values: list[int], need: int) -> int | None:
    low, high = 0, len(values)
    while low < high:
        middle = (low + high) // 2
        if values[middle] < need:
            low = middle + 1
        else:
            high = middle
    return low if low < len(values) else None


def _insert_sorted(values: list[int], value: int) -> None:
    position = _first_at_least(values, value)
    values.insert(len(values) if position is None else position, value)


def exact_packing(bins: Sequence[Bin], sizes: Sequence[int], budget: int = EXACT_STEPS) -> list[int] | None:
    """The bin of each item, found by searching bin fillings; None when none exists or the search
    ran out of its budget.

    Bins are filled one at a time, smallest first (they have the fewest fillings), each with a
    filling that leaves no remaining item that would still fit (if any packing exists, one exists
    like that: moving an item into an earlier bin where it fits keeps the later bins feasible).
    Item counts by size make fillings few, twin bins take their fillings in one order only, and
    states that failed are remembered.
    """
    types = sorted(set(sizes), reverse=True)
    counts = Counter(sizes)
    order = sorted(range(len(bins)), key=lambda b: bins[b].room)
    room_after = [0] * (len(order) + 1)
    slots_after = [0] * (len(order) + 1)
    for position in range(len(order) - 1, -1, -1):
        room_after[position] = room_after[position + 1] + bins[order[position]].room
        slots_after[position] = slots_after[position + 1] + bins[order[position]].slots
    failed: set[tuple[int, tuple[int, ...], tuple[int, ...] | None]] = set()
    steps = 0

    def fillings(room: int, slots: int, left: tuple[int, ...]) -> list[tuple[int, ...]]:
        found: list[tuple[int, ...]] = []
        chosen = [0] * len(types)

        def choose(t: int, room: int, slots: int) -> None:
            nonlocal steps
            steps += 1
            if steps > budget:
                raise _OutOfBudgetError
            if t == len(types):
                fits_more = slots > 0 and any(
                    left[u] > chosen[u] and types[u] <= room for u in range(len(types))
                )
                if not fits_more:
                    found.append(tuple(chosen))
                return
            for count in range(min(left[t], room // types[t], slots), -1, -1):
                chosen[t] = count
                choose(t + 1, room - count * types[t], slots - count)
            chosen[t] = 0

        choose(0, room, slots)
        return found

    def fill(position: int, left: tuple[int, ...], plan: list[tuple[int, ...]]) -> bool:
        """Fill bins from `position` on with the items `left`; `plan` gets each bin's filling."""
        nonlocal steps
        steps += 1
        if steps > budget:
            raise _OutOfBudgetError
        volume = sum(c * t for c, t in zip(left, types, strict=True))
        if volume == 0:
            return True
        if position == len(order) or volume > room_after[position] or sum(left) > slots_after[position]:
            return False
        target = bins[order[position]]
        # Two bins alike take their fillings in one order only: no search of both permutations.
        bound = plan[-1] if position > 0 and bins[order[position - 1]] == target else None
        if (position, left, bound) in failed:
            return False
        for filling in fillings(target.room, target.slots, left):
            if bound is not None and filling > bound:
                continue
            plan.append(filling)
            rest = tuple(c - f for c, f in zip(left, filling, strict=True))
            if fill(position + 1, rest, plan):
                return True
            plan.pop()
        failed.add((position, left, bound))
        return False

    plan: list[tuple[int, ...]] = []
    try:
        if not fill(0, tuple(counts[t] for t in types), plan):
            return None
    except _OutOfBudgetError:
        return None
    pools: dict[int, list[int]] = {}
    for item, size in enumerate(sizes):
        pools.setdefault(size, []).append(item)
    assignment = [-1] * len(sizes)
    for position, filling in enumerate(plan):
        for t, count in enumerate(filling):
            for _ in range(count):
                assignment[pools[types[t]].pop()] = order[position]
    return assignment


class _OutOfBudgetError(Exception):
    pass


def packing(bins: Sequence[Bin], sizes: Sequence[int]) -> list[int] | None:
    """A packing of every item, or None: best fit, then the exact search for small clusters."""
    found = best_fit_decreasing(bins, sizes)
    if found is None and len(bins) <= EXACT_BINS and len(sizes) <= EXACT_ITEMS:
        found = exact_packing(bins, sizes)
    return found


def lexicographic_selection(
    bins: Sequence[Bin], classes: Sequence[Sequence[int]]
) -> tuple[list[list[int]], list[int]]:
    """Which items of each class to serve, classes in order of precedence, and the bin of each.

    `classes` lists item sizes per class (within a class, in the order items are preferred among
    equals). Returns the indexes chosen per class and, for the chosen items in that order (class by
    class), their bins.
    """
    chosen_sizes: list[int] = []
    chosen: list[list[int]] = []
    assignment: list[int] = []
    for sizes in classes:
        ranked = sorted(range(len(sizes)), key=lambda i: sizes[i])  # smallest first, stable
        # Bisection with best fit alone (cheap); the exact search only extends what it found.
        low, high = 0, len(ranked)
        best = packing(bins, chosen_sizes) or []
        while low < high:
            middle = (low + high + 1) // 2
            found = best_fit_decreasing(bins, chosen_sizes + [sizes[i] for i in ranked[:middle]])
            if found is not None:
                low, best = middle, found
            else:
                high = middle - 1
        taken = ranked[:low]
        smallest_failure: int | None = None
        for index in ranked[low:]:
            if smallest_failure is not None and sizes[index] >= smallest_failure:
                continue
            found = packing(bins, chosen_sizes + [sizes[i] for i in taken] + [sizes[index]])
            if found is None:
                smallest_failure = sizes[index]
            else:
                taken.append(index)
                best = found
        chosen_sizes += [sizes[i] for i in taken]
        chosen.append(taken)
        assignment = best
    return chosen, assignment
