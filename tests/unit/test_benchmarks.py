"""The benchmark tools themselves: generator, ILP optimum, upper bound, nos re-implementation."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from benchmarks.nos_algorithm import NosGpu, nos_plan, sort_pods
from benchmarks.snapshots import GPU_MODELS, MAX_SLICES, dumps, generate, write_snapshot
from services.planner.core.model import Gpu, Node, PendingPod, PlanSettings, Slice
from services.planner.core.run import plan_cluster
from services.planner.snapshot import parse_snapshot

SETTINGS = PlanSettings()


def gpu(gib: int, *slices: str, index: int = 0, max_slices: int = 48) -> Gpu:
    """`slices` as "10u" (used) or "20f" (free)."""
    return Gpu(
        index=index,
        model="NVIDIA-A100-SXM4-80GB",
        memory_mib=gib * 1024,
        slices=tuple(Slice(int(s[:-1]), s[-1] == "u") for s in slices),
        max_slices=max_slices,
    )


def node(name: str, *gpus: Gpu, can_carve: bool = True) -> Node:
    return Node(name=name, gpus=gpus, can_carve=can_carve, can_host=can_carve)


def pods(*sizes: int, priority: int = 0, prefix: str = "p") -> list[PendingPod]:
    return [PendingPod("default", f"{prefix}{i}", size, priority) for i, size in enumerate(sizes)]


# --- generator ------------------------------------------------------------------------------------------


def test_generator_is_deterministic_per_seed() -> None:
    assert generate(7, 5, 4, 60) == generate(7, 5, 4, 60)
    assert generate(7, 5, 4, 60) != generate(8, 5, 4, 60)


def test_generated_snapshots_are_valid_and_realistic() -> None:
    snapshot = generate(3, 40, 8, 400)
    nodes, pending = parse_snapshot(dumps(snapshot))
    assert len(nodes) == 40
    assert len(pending) == 400
    memory = {model: mib for model, mib, _ in GPU_MODELS}
    slices: Counter[bool] = Counter()
    for n in nodes:
        assert len({g.model for g in n.gpus}) == 1, "one model per node"
        for g in n.gpus:
            assert memory[g.model] == g.memory_mib
            assert sum(s.size_gb for s in g.slices) <= g.memory_mib // 1024
            assert len(g.slices) <= MAX_SLICES
            slices.update(s.used for s in g.slices)
    assert slices[True] > 0
    assert slices[False] > 0
    sizes = Counter(p.size_gb for p in pending)
    assert sizes[0] > 0, "impossible 0 GiB pods"
    assert sum(n for size, n in sizes.items() if size >= 100) > 0, "impossible large pods"
    assert sum(sizes[s] for s in (1, 2, 4, 5, 10)) > sum(sizes[s] for s in (20, 40)) > 0
    assert {p.priority for p in pending} == {0, 10, 100}
    assert Counter(p.priority for p in pending).most_common(1)[0][0] == 0
    assert len({p.created for p in pending}) > 300


def test_write_snapshot_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "snapshot.json"
    snapshot = generate(1, 3, 2, 10)
    write_snapshot(path, snapshot)
    assert parse_snapshot(path.read_text(encoding="utf-8")) == parse_snapshot(dumps(snapshot))


# --- optimum (scipy) --------------------------------------------------------------------------------------


def test_optimum_of_tiny_instances() -> None:
    pytest.importorskip("scipy")
    from benchmarks.optimum import optimum

    assert optimum([node("a", gpu(20))], pods(10, 10), SETTINGS) == 2
    assert optimum([node("a", gpu(20))], pods(10, 10, 10), SETTINGS) == 2
    # a used slice blocks its memory; a free one can be reclaimed
    assert optimum([node("a", gpu(20, "15u"))], pods(10), SETTINGS) == 0
    assert optimum([node("a", gpu(20, "15u"))], pods(10, 5), SETTINGS) == 1
    assert optimum([node("a", gpu(20, "15f"))], pods(20), SETTINGS) == 1
    # impossible sizes, the client limit, a node that cannot carve
    assert optimum([node("a", gpu(80))], pods(0, 100), SETTINGS) == 0
    assert optimum([node("a", gpu(80, "1u", max_slices=2))], pods(1, 1, 1), SETTINGS) == 1
    assert optimum([node("a", gpu(80, "10f"), can_carve=False)], pods(10, 10, 5), SETTINGS) == 1
    # a reserve shrinks the capacity
    assert optimum([node("a", gpu(20))], pods(10, 10), PlanSettings(reserve_mib=512)) == 1


def test_priority_optimum_is_lexicographic() -> None:
    pytest.importorskip("scipy")
    from benchmarks.optimum import solve

    result = solve([node("a", gpu(20))], [*pods(20, priority=100, prefix="hi"), *pods(10, 10)], SETTINGS)
    assert result.max_placed == 2
    assert result.by_priority == {100: 1, 0: 0}
    assert result.max_proven
    assert result.priority_proven


def test_optimum_bounds_the_planner_and_the_upper_bound_bounds_the_optimum() -> None:
    pytest.importorskip("scipy")
    from benchmarks.optimum import optimum, upper_bound

    for seed in range(5):
        nodes, pending = parse_snapshot(dumps(generate(seed, 4, 2, 40, load=0.7)))
        best = optimum(nodes, pending, SETTINGS)
        assert len(plan_cluster(nodes, pending, SETTINGS).placed) <= best
        assert best <= upper_bound(nodes, pending, SETTINGS)


def test_upper_bound_takes_the_smallest_pods_first() -> None:
    pytest.importorskip("scipy")
    from benchmarks.optimum import upper_bound

    assert upper_bound([node("a", gpu(20, "15u"))], pods(1, 2, 4, 10), SETTINGS) == 2


# --- nos --------------------------------------------------------------------------------------------------


def test_nos_does_nothing_while_any_free_slice_of_the_size_exists() -> None:
    """§3.3: three pods compete for one free 10 GiB slice; nos lacks nothing and carves nothing."""
    cluster = [node("a", gpu(40, "10f"))]
    waiting = pods(10, 10, 10)
    once = nos_plan(cluster, waiting)
    assert once.placed == 1
    assert once.layouts == {"a": {0: (Slice(10, False),)}}, "no slice carved"
    assert nos_plan(cluster, waiting, cycles=5).placed == 3, "later cycles converge"
    assert len(plan_cluster(cluster, waiting, SETTINGS).placed) == 3


def test_nos_gpu_geometry_update_keeps_its_quirks() -> None:
    """§3.7 and nos's gpu_test.go: partial fits, small sizes first, the step-b deletion bug."""
    partial = NosGpu(0, 40, 48, {}, {})
    assert partial.update_geometry_for({10: 5})
    assert partial.free == {10: 4}

    small_first = NosGpu(0, 40, 48, {}, {})
    assert small_first.update_geometry_for({20: 2, 10: 2, 5: 2})
    assert +Counter(small_first.free) == Counter({5: 2, 10: 2})

    sacrificed = NosGpu(0, 40, 48, {20: 1}, {10: 2})
    assert sacrificed.update_geometry_for({20: 1})
    assert +Counter(sacrificed.free) == Counter({20: 1})

    quirk = NosGpu(0, 40, 48, {}, {10: 1})
    assert quirk.update_geometry_for({10: 3})
    assert quirk.free == {10: 1}, "step b wipes the slices step a made"


def test_nos_sorts_by_priority_then_smaller_slice_only() -> None:
    ordered = sort_pods([*pods(10, 5, prefix="a"), *pods(20, priority=1, prefix="b"), *pods(5, prefix="c")])
    assert [p.key for p in ordered] == ["default/b0", "default/a1", "default/c0", "default/a0"]


def test_nos_never_places_more_than_the_optimum() -> None:
    pytest.importorskip("scipy")
    from benchmarks.optimum import optimum

    for seed in range(5):
        nodes, pending = parse_snapshot(dumps(generate(seed, 4, 2, 40, load=0.7)))
        assert nos_plan(nodes, pending, cycles=10).placed <= optimum(nodes, pending, SETTINGS)
