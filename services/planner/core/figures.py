"""What a plan says about the cluster in numbers, for the planner's metrics (`events.metrics`).

Where it sits: the planner service computes `plan_figures` after each plan it publishes and sets
its gauges from them. Pure and deterministic like the rest of the core: figures only report, and
nothing decides from them.

- pods waiting for a slice, placed and unplaced, the unplaced by `reason_class` (a small, fixed
  set of labels, where the reasons themselves are sentences naming pods and nodes);
- free GiB by GPU model: on every GPU of the plan's layouts, its capacity less the slices pods use;
- stranded GiB by GPU model: free GiB on GPUs where not even the smallest pod waiting for room
  fits, while some do wait for room (capacity exhausted): memory that is free but serves nobody.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from events.plans import PlanComputed

REASON_CLASSES: tuple[tuple[str, str], ...] = (
    ("capacity exhausted", "capacity"),
    ("needs ", "too_large"),
    ("asks for ", "invalid_size"),
    ("released to node ", "released_elsewhere"),
    ("no opted-in node that mpsflow plans on ", "node_rules"),
    ("no opted-in node can take new slices now", "nodes_busy"),
    ("no opted-in node can be planned on", "no_node"),
    ("waiting for GPU reports", "waiting_for_reports"),
)
"""The start of each kind of reason the planner gives (services/planner/core/strategy.py and
state.py), and its label. tests/unit/planner/test_figures.py checks every reason the planner can
give falls in a class other than `other`."""


def reason_class(reason: str) -> str:
    """The label of an unplaced pod's reason: one of `REASON_CLASSES`, else `other`."""
    for start, label in REASON_CLASSES:
        if reason.startswith(start):
            return label
    return "other"


@dataclass(frozen=True)
class PlanFigures:
    pending: int
    placed: int
    unplaced: dict[str, int]
    planned_nodes: int
    excluded_nodes: int
    free_gib: dict[str, int]
    stranded_gib: dict[str, int]


def plan_figures(
    plan: PlanComputed,
    gpus: Mapping[tuple[str, int], tuple[str, int]],
    unplaced_sizes: Mapping[str, int],
) -> PlanFigures:
    """The figures of `plan`, given each planned GPU's model and capacity in GiB by (node, index),
    and the size each unplaced pod asks for (a pod whose size is not known counts in no stranded
    figure)."""
    free: list[tuple[str, int]] = []
    for node, layout in plan.nodes.items():
        for index, slices in layout.gpus.items():
            model, capacity = gpus.get((node, index), ("unknown", 0))
            used = sum(s.size_gb for s in slices if s.used)
            free.append((model, max(0, capacity - used)))
    waiting_for_room = [
        unplaced_sizes[key]
        for key, reason in plan.unplaced.items()
        if key in unplaced_sizes and reason_class(reason) == "capacity"
    ]
    smallest = min(waiting_for_room, default=None)
    free_by_model: Counter[str] = Counter()
    stranded_by_model: Counter[str] = Counter()
    for model, gib in free:
        free_by_model[model] += gib
        stranded_by_model[model] += gib if smallest is not None and gib < smallest else 0
    return PlanFigures(
        pending=len(plan.placed) + len(plan.unplaced),
        placed=len(plan.placed),
        unplaced=dict(Counter(reason_class(reason) for reason in plan.unplaced.values())),
        planned_nodes=len(plan.nodes),
        excluded_nodes=len(plan.excluded_nodes),
        free_gib=dict(sorted(free_by_model.items())),
        stranded_gib=dict(sorted(stranded_by_model.items())),
    )
