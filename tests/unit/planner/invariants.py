"""The five invariants of the `mpsflow plan` contract (docs/formats.md §1.4), as one reusable check.

`assert_plan_invariants(nodes, pods, result, settings)` takes the planner's inputs (opted-in nodes
only, as `plan_cluster` receives them) and its `PlanResult`, and fails with a message that names
the invariant and the node/GPU/pod involved. Unit, property and end-to-end tests share it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from events.vocabulary import MIB_PER_GIB
from services.planner.core.model import Node, PendingPod, PlanResult, PlanSettings, Slice


def _sizes(slices: Iterable[Slice], *, used: bool) -> Counter[int]:
    return Counter(s.size_gb for s in slices if s.used == used)


def assert_plan_invariants(
    nodes: Iterable[Node], pods: Iterable[PendingPod], result: PlanResult, settings: PlanSettings
) -> None:
    """Fail unless `result` keeps invariants 1-5 of the contract for these inputs (and a few corollaries)."""
    node_list = list(nodes)
    pod_list = list(pods)
    by_name = {node.name: node for node in node_list}
    assert len(by_name) == len(node_list), "test input has two nodes with one name"

    # 5. Every opted-in node is in exactly one of layouts and excluded_nodes; nothing else appears.
    planned, excluded = set(result.layouts), set(result.excluded_nodes)
    assert not planned & excluded, f"inv 5: nodes both planned and excluded: {sorted(planned & excluded)}"
    assert planned | excluded == set(by_name), (
        f"inv 5: planned {sorted(planned)} + excluded {sorted(excluded)} != opted-in {sorted(by_name)}"
    )
    for name, reason in result.excluded_nodes.items():
        assert reason.strip(), f"inv 5: excluded node {name} has an empty reason"

    # 5. Every pending pod is in exactly one of placed and unplaced, with a reason when unplaced.
    keys = [pod.key for pod in pod_list]
    assert len(set(keys)) == len(keys), "test input has two pods with one key"
    placed, unplaced = set(result.placed), set(result.unplaced)
    assert not placed & unplaced, f"inv 5: pods both placed and unplaced: {sorted(placed & unplaced)}"
    assert placed | unplaced == set(keys), (
        f"inv 5: placed + unplaced != pending; missing {sorted(set(keys) - placed - unplaced)}, "
        f"unknown {sorted((placed | unplaced) - set(keys))}"
    )
    for key, reason in result.unplaced.items():
        assert reason.strip(), f"inv 5: unplaced pod {key} has an empty reason"

    for name in sorted(planned):
        node = by_name[name]
        layout = result.layouts[name]
        reported = sorted(gpu.index for gpu in node.gpus)
        assert sorted(layout) == reported, f"inv 5: node {name}: layout GPUs {sorted(layout)} != {reported}"
        for gpu in node.gpus:
            slices = layout[gpu.index]
            where = f"node {name} GPU {gpu.index}"
            # 1. Used slices stay, on the same GPU, with the same size (and the planner marks none used).
            assert _sizes(slices, used=True) == _sizes(gpu.slices, used=True), (
                f"inv 1: {where}: used slices {sorted(_sizes(gpu.slices, used=True).elements())} became "
                f"{sorted(_sizes(slices, used=True).elements())}"
            )
            # 2. Slices never add up to more than the memory less the reserve.
            total_mib = sum(s.size_gb for s in slices) * MIB_PER_GIB
            assert total_mib <= gpu.memory_mib - settings.reserve_mib, (
                f"inv 2: {where}: slices hold {total_mib} MiB, more than {gpu.memory_mib} MiB less "
                f"reserve {settings.reserve_mib} MiB"
            )
            # 3. No more slices than MPS allows clients.
            assert len(slices) <= gpu.max_slices, (
                f"inv 3: {where}: {len(slices)} slices, more than the {gpu.max_slices} MPS clients allowed"
            )
            assert all(s.size_gb >= 1 for s in slices), f"{where}: a slice smaller than 1 GiB: {slices}"
            # A node that cannot carve (cordoned, stale) gets nothing new; it only sheds free
            # slices when what it reported was beyond its memory or client limit.
            if not node.can_carve:
                within = (
                    sum(s.size_gb for s in gpu.slices) * MIB_PER_GIB <= gpu.memory_mib - settings.reserve_mib
                    and len(gpu.slices) <= gpu.max_slices
                )
                if within:
                    assert Counter(slices) == Counter(gpu.slices), (
                        f"{where}: cannot carve, yet its slices changed to {slices}"
                    )
                else:
                    assert not Counter(slices) - Counter(gpu.slices), (
                        f"{where}: cannot carve, yet gained {slices}"
                    )

    # 4. Placements name a planned GPU, the pod's own size, and never more pods than free slices.
    pod_size = {pod.key: pod.size_gb for pod in pod_list}
    demand: Counter[tuple[str, int, int]] = Counter()
    for key, placement in result.placed.items():
        assert placement.node in result.layouts, f"inv 4: {key} placed on unplanned node {placement.node}"
        assert placement.gpu in result.layouts[placement.node], (
            f"inv 4: {key} placed on missing GPU {placement.node}/{placement.gpu}"
        )
        assert placement.size_gb == pod_size[key], (
            f"inv 4: {key} asks for {pod_size[key]} GiB but was placed as {placement.size_gb} GiB"
        )
        demand[(placement.node, placement.gpu, placement.size_gb)] += 1
    for (node_name, index, size), count in sorted(demand.items()):
        free = _sizes(result.layouts[node_name][index], used=False)[size]
        assert count <= free, (
            f"inv 4: {count} pods placed for {size} GiB on node {node_name} GPU {index}, "
            f"which has only {free} free slice(s) of that size"
        )
