"""`plan_cluster`: table tests of its rules, properties over random clusters, and nos regressions."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from random import Random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from benchmarks.snapshots import dumps, generate
from services.planner.core.model import (
    Gpu,
    Node,
    PendingPod,
    Placement,
    PlanResult,
    PlanSettings,
    Slice,
    max_slices_for,
)
from services.planner.core.run import plan_cluster
from services.planner.core.strategy import pod_order
from services.planner.snapshot import parse_snapshot, render_plan
from tests.unit.planner.invariants import assert_plan_invariants

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
A100_80 = "NVIDIA-A100-SXM4-80GB"
A100_40 = "NVIDIA-A100-SXM4-40GB"
P100 = "Tesla-P100-PCIE-16GB"
P40 = "Tesla-P40"
V100 = "Tesla-V100-SXM2-16GB"
NO_RESERVE = PlanSettings()


# --- builders ---------------------------------------------------------------------------------------------


def slices(spec: str) -> tuple[Slice, ...]:
    """`"10u 20f"` -> a used 10 GiB slice and a free 20 GiB slice; `"3*1u"` repeats."""
    out: list[Slice] = []
    for item in spec.split():
        count, _, body = item.rpartition("*")
        out.extend([Slice(size_gb=int(body[:-1]), used=body[-1] == "u")] * int(count or 1))
    return tuple(out)


def spec_of(layout: tuple[Slice, ...]) -> str:
    return " ".join(f"{s.size_gb}{'u' if s.used else 'f'}" for s in layout)


def gpu(index: int, gib: int, spec: str = "", *, model: str = A100_80, memory_mib: int | None = None) -> Gpu:
    return Gpu(
        index=index,
        model=model,
        memory_mib=gib * 1024 if memory_mib is None else memory_mib,
        slices=slices(spec),
        max_slices=max_slices_for(model),
    )


def node(name: str, *gpus: Gpu, can_carve: bool = True, can_host: bool | None = None) -> Node:
    """A node; `can_carve=False` alone is a cordoned or stale node, which hosts nothing either."""
    return Node(
        name=name, gpus=gpus, can_carve=can_carve, can_host=can_carve if can_host is None else can_host
    )


def pod(
    name: str, size_gb: int, *, priority: int = 0, minute: int | None = None, namespace: str = "default"
) -> PendingPod:
    created = None if minute is None else T0 + timedelta(minutes=minute)
    return PendingPod(namespace=namespace, name=name, size_gb=size_gb, priority=priority, created=created)


def layout_specs(result: PlanResult) -> dict[str, dict[int, str]]:
    return {name: {index: spec_of(s) for index, s in gpus.items()} for name, gpus in result.layouts.items()}


def where(result: PlanResult) -> dict[str, tuple[str, int]]:
    return {key: (p.node, p.gpu) for key, p in result.placed.items()}


def plan(nodes: list[Node], pods: list[PendingPod], plan_settings: PlanSettings = NO_RESERVE) -> PlanResult:
    """`plan_cluster`, with the contract's invariants checked on every result."""
    result = plan_cluster(nodes, pods, plan_settings)
    assert_plan_invariants(nodes, pods, result, plan_settings)
    return result


# --- table tests ------------------------------------------------------------------------------------------

Case = tuple[list[Node], list[PendingPod], dict[str, dict[int, str]], dict[str, tuple[str, int]]]

LAYOUT_CASES: dict[str, Case] = {
    "exact free slice reused before carving": (
        [node("n", gpu(0, 80, "10u 20f"))],
        [pod("p", 20)],
        {"n": {0: "10u 20f"}},
        {"default/p": ("n", 0)},
    ),
    "exact free slice on a later GPU beats carving on an empty one": (
        [node("n", gpu(0, 80), gpu(1, 80, "20f"))],
        [pod("p", 20)],
        {"n": {0: "", 1: "20f"}},
        {"default/p": ("n", 1)},
    ),
    "free slice of another size is not reused: carve": (
        [node("n", gpu(0, 80, "20f"))],
        [pod("p", 10)],
        {"n": {0: "20f 10f"}},
        {"default/p": ("n", 0)},
    ),
    "best fit: the GPU with the least room left after carving": (
        [node("a", gpu(0, 80)), node("b", gpu(0, 40, "20u"), gpu(1, 40, "30u"))],
        [pod("p", 10)],
        {"a": {0: ""}, "b": {0: "20u", 1: "30u 10f"}},
        {"default/p": ("b", 1)},
    ),
    "best fit keeps the large region whole for a later large pod": (
        [node("n", gpu(0, 80), gpu(1, 40, "20u"))],
        [pod("small", 20, priority=1), pod("large", 80)],
        {"n": {0: "80f", 1: "20u 20f"}},
        {"default/small": ("n", 1), "default/large": ("n", 0)},
    ),
    "best fit ties go to the first node by name, then GPU index": (
        [node("b", gpu(0, 40)), node("a", gpu(1, 40), gpu(0, 40))],
        [pod("p", 10)],
        {"a": {0: "10f", 1: ""}, "b": {0: ""}},
        {"default/p": ("a", 0)},
    ),
    "competition: N pods of 10 GiB use N free slices, then carve": (
        [node("n", gpu(0, 80, "10f 10f"))],
        [pod("p1", 10), pod("p2", 10), pod("p3", 10)],
        {"n": {0: "10f 10f 10f"}},
        {"default/p1": ("n", 0), "default/p2": ("n", 0), "default/p3": ("n", 0)},
    ),
    "competition: N pods of 10 GiB need N free slices; the rest wait": (
        [node("n", gpu(0, 20, "10f 10f"))],
        [pod("p1", 10), pod("p2", 10), pod("p3", 10)],
        {"n": {0: "10f 10f"}},
        {"default/p1": ("n", 0), "default/p2": ("n", 0)},
    ),
    "used slices are kept as they are; free ones reclaimed around them": (
        [node("n", gpu(0, 40, "10f 10u 10f 5u"))],
        [pod("p", 25)],
        {"n": {0: "10u 5u 25f"}},
        {"default/p": ("n", 0)},
    ),
    "reclaim removes free slices nobody needs, largest first": (
        [node("n", gpu(0, 40, "10f 20f 10f"))],
        [pod("p", 30)],
        {"n": {0: "10f 30f"}},
        {"default/p": ("n", 0)},
    ),
    "no reclaim when it cannot serve the pod": (
        [node("n", gpu(0, 40, "30u 10f"))],
        [pod("p", 20)],
        {"n": {0: "30u 10f"}},
        {},
    ),
    "no pods: free slices stay": (
        [node("n", gpu(0, 40, "10f 20f 10f"))],
        [],
        {"n": {0: "10f 20f 10f"}},
        {},
    ),
    "a free slice claimed by one pod is not reclaimed for another": (
        [node("n", gpu(0, 40, "20f 20f"))],
        [pod("a", 20, priority=1), pod("b", 40)],
        {"n": {0: "20f 20f"}},
        {"default/a": ("n", 0)},
    ),
    "reclaim on the GPU that frees the least": (
        [node("n", gpu(0, 40, "30f 10u"), gpu(1, 40, "20f 20u"))],
        [pod("p", 20)],
        {"n": {0: "30f 10u", 1: "20f 20u"}},
        {"default/p": ("n", 1)},
    ),
    "reclaim when exact reuse and carving both fail": (
        [node("n", gpu(0, 40, "30f 10u"), gpu(1, 40, "25f 15u"))],
        [pod("p", 20)],
        {"n": {0: "30f 10u", 1: "15u 20f"}},
        {"default/p": ("n", 1)},
    ),
    "pre-Volta: 16 slices at most, even with memory left": (
        [node("n", gpu(0, 24, "15*1u", model=P40))],
        [pod("p1", 1), pod("p2", 1)],
        {"n": {0: " ".join(["1u"] * 15 + ["1f"])}},
        {"default/p1": ("n", 0)},
    ),
    "Volta and newer: 48 slices at most": (
        [node("n", gpu(0, 80, "47*1u"))],
        [pod("p1", 1), pod("p2", 1)],
        {"n": {0: " ".join(["1u"] * 47 + ["1f"])}},
        {"default/p1": ("n", 0)},
    ),
    "at the client limit, reclaiming a free slice makes room": (
        [node("n", gpu(0, 24, "15*1u 2f", model=P40))],
        [pod("p", 1)],
        {"n": {0: " ".join(["1u"] * 15 + ["1f"])}},
        {"default/p": ("n", 0)},
    ),
    "a node that cannot carve gets nothing new; the others do": (
        [node("cordoned", gpu(0, 80, "10f"), can_carve=False), node("ok", gpu(0, 40))],
        [pod("p", 10)],
        {"cordoned": {0: "10f"}, "ok": {0: "10f"}},
        {"default/p": ("ok", 0)},
    ),
    "GPU indexes are kept, not positions": (
        [node("n", gpu(3, 40, "10u"), gpu(1, 40, "30u"))],
        [pod("p", 10)],
        {"n": {1: "30u 10f", 3: "10u"}},
        {"default/p": ("n", 1)},
    ),
}


@pytest.mark.parametrize(
    ("nodes", "pods", "layouts", "placed"), LAYOUT_CASES.values(), ids=LAYOUT_CASES.keys()
)
def test_plan_layouts_and_placements(
    nodes: list[Node],
    pods: list[PendingPod],
    layouts: dict[str, dict[int, str]],
    placed: dict[str, tuple[str, int]],
) -> None:
    result = plan(nodes, pods)
    assert layout_specs(result) == layouts
    assert where(result) == placed
    assert set(result.unplaced) == {p.key for p in pods} - set(placed)
    assert result.excluded_nodes == {}


ORDER_CASES: dict[str, tuple[list[PendingPod], set[str]]] = {
    "higher priority first": (
        [pod("low", 30, priority=0, minute=0), pod("high", 30, priority=5, minute=9)],
        {"high"},
    ),
    "negative priority last": ([pod("neg", 30, priority=-1, minute=0), pod("zero", 30, minute=9)], {"zero"}),
    "then older first": ([pod("young", 30, minute=5), pod("old", 30, minute=1)], {"old"}),
    "pods without a time after those with one": ([pod("a", 30), pod("b", 30, minute=59)], {"b"}),
    "then name": ([pod("b", 30, minute=1), pod("a", 30, minute=1)], {"a"}),
    "then namespace before name": (
        [pod("a", 30, minute=1, namespace="z"), pod("z", 30, minute=1, namespace="a")],
        {"z"},
    ),
    "a smaller lower-priority pod still fits beside": (
        [pod("big", 30, priority=1), pod("small", 10), pod("other", 30, priority=2)],
        {"other", "small"},
    ),
}


@pytest.mark.parametrize(("pods", "winners"), ORDER_CASES.values(), ids=ORDER_CASES.keys())
def test_short_capacity_goes_by_priority_then_age_then_name(
    pods: list[PendingPod], winners: set[str]
) -> None:
    result = plan([node("n", gpu(0, 40))], pods)
    assert {key.split("/")[1] for key in result.placed} == winners
    for key in result.unplaced:
        assert "capacity exhausted" in result.unplaced[key]


@pytest.mark.parametrize(
    ("memory_mib", "reserve_mib", "capacity"),
    [(40960, 0, 40), (40959, 0, 39), (40960, 512, 39), (40960, 1024, 39), (40960, 1025, 38), (81559, 0, 79)],
)
def test_capacity_is_whole_gib_of_memory_less_reserve(
    memory_mib: int, reserve_mib: int, capacity: int
) -> None:
    nodes = [node("n", gpu(0, 0, memory_mib=memory_mib))]
    pods = [pod("fits", capacity), pod("too-big", capacity + 1)]
    result = plan(nodes, pods, PlanSettings(reserve_mib=reserve_mib))
    assert where(result) == {"default/fits": ("n", 0)}
    assert result.unplaced == {
        "default/too-big": f"needs {capacity + 1} GiB; the largest opted-in GPU has {capacity} GiB"
    }


@pytest.mark.parametrize(
    ("model", "limit"),
    [
        (A100_80, 48),
        ("NVIDIA-H100-80GB-HBM3", 48),
        (V100, 48),
        ("Tesla-T4", 48),
        (P100, 16),
        (P40, 16),
        ("Tesla-K80", 16),
        ("Tesla-M60", 16),
    ],
)
def test_mps_client_limit_by_model(model: str, limit: int) -> None:
    assert max_slices_for(model) == limit
    nodes = [node("n", gpu(0, 80, model=model))]
    result = plan(nodes, [pod(f"p{i:02}", 1) for i in range(60)])
    assert len(result.layouts["n"][0]) == limit
    assert len(result.placed) == limit
    assert len(result.unplaced) == 60 - limit


def test_compute_capability_decides_the_limit_when_known() -> None:
    assert max_slices_for("Some-Unknown-GPU", (6, 1)) == 16
    assert max_slices_for("Tesla-P100-PCIE-16GB", (7, 0)) == 48


@pytest.mark.parametrize(
    ("nodes", "size", "reason"),
    [
        ([node("n", gpu(0, 80))], 0, "asks for 0 GiB; a slice is at least 1 GiB"),
        ([node("n", gpu(0, 80))], 200, "needs 200 GiB; the largest opted-in GPU has 80 GiB"),
        (
            [node("a", gpu(0, 16)), node("b", gpu(0, 40))],
            41,
            "needs 41 GiB; the largest opted-in GPU has 40 GiB",
        ),
        (
            [node("n", gpu(0, 40, "30u"))],
            20,
            "capacity exhausted: needs 20 GiB on one GPU; the most any GPU could offer now is 10 GiB",
        ),
        (
            [node("n", gpu(0, 40), can_carve=False)],
            10,
            "no opted-in node can take new slices now "
            "(cordoned, its GPU reports are stale, or it is applying its last layout)",
        ),
        ([], 10, "no opted-in node can be planned on (label nos.nebuly.com/gpu-partitioning=mps)"),
    ],
    ids=[
        "size 0",
        "larger than every GPU",
        "larger than every GPU of several",
        "exhausted",
        "cannot carve",
        "no nodes",
    ],
)
def test_unplaced_reasons_name_the_numbers(nodes: list[Node], size: int, reason: str) -> None:
    result = plan(nodes, [pod("p", size)])
    assert result.placed == {}
    assert result.unplaced == {"default/p": reason}


def test_free_slice_on_a_node_that_cannot_carve_is_not_promised() -> None:
    result = plan([node("n", gpu(0, 40, "10f"), can_carve=False)], [pod("p", 10)])
    assert result.placed == {}
    assert layout_specs(result) == {"n": {0: "10f"}}


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (node("bad", gpu(0, 40, "30u 20u")), "GPU 0: used slices hold 50 GiB but the GPU has 40 GiB"),
        (
            node("bad", gpu(0, 24, "17*1u", model=P40)),
            "GPU 0: 17 used slices, more than the 16 MPS clients allowed",
        ),
        (
            node("bad", gpu(0, 80), gpu(1, 80, "49*1u")),
            "GPU 1: 49 used slices, more than the 48 MPS clients allowed",
        ),
    ],
    ids=["used beyond memory", "used beyond pre-Volta client limit", "used beyond Volta client limit"],
)
def test_impossible_node_is_excluded_and_never_blocks_the_others(bad: Node, reason: str) -> None:
    nodes = [bad, node("good", gpu(0, 40))]
    result = plan(nodes, [pod("p", 10)])
    assert result.excluded_nodes == {"bad": reason}
    assert "bad" not in result.layouts
    assert where(result) == {"default/p": ("good", 0)}


def test_excluded_reason_counts_the_reserve() -> None:
    nodes = [node("bad", gpu(0, 40, "40u"))]
    result = plan(nodes, [], PlanSettings(reserve_mib=1024))
    assert result.excluded_nodes == {"bad": "GPU 0: used slices hold 40 GiB but the GPU has 39 GiB"}


@pytest.mark.parametrize(
    "gpu_state",
    [gpu(0, 40, "20u 20f"), gpu(0, 24, "10*1u 8*1f", model=P40)],
    ids=["free slices beyond memory less reserve", "free slices beyond client limit"],
)
def test_free_slices_beyond_capacity_do_not_exclude_the_node(gpu_state: Gpu) -> None:
    plan_settings = PlanSettings(reserve_mib=1024)
    nodes = [node("n", gpu_state)]
    result = plan_cluster(nodes, [pod("p", 1)], plan_settings)
    assert result.excluded_nodes == {}
    assert_plan_invariants(nodes, [pod("p", 1)], result, plan_settings)


def test_a_higher_priority_pod_gets_reclaimed_memory_nobody_can_bind_to() -> None:
    nodes = [node("n", gpu(0, 20, "10f"))]
    result = plan(nodes, [pod("high", 20, priority=10), pod("other", 5, priority=0)])
    assert where(result) == {"default/high": ("n", 0)}
    assert layout_specs(result) == {"n": {0: "20f"}}


def test_a_free_slice_only_gated_pods_want_is_reclaimed_for_a_higher_priority_pod() -> None:
    # Gated pods go nowhere until the planner releases them, so the free 10 GiB slice is the
    # planner's to reclaim: "high" takes the GPU and "low" waits.
    nodes = [node("n", gpu(0, 20, "10f"))]
    result = plan(nodes, [pod("high", 20, priority=10), pod("low", 10, priority=0)])
    assert where(result) == {"default/high": ("n", 0)}
    assert layout_specs(result) == {"n": {0: "20f"}}
    assert "capacity exhausted" in result.unplaced["default/low"]


def test_a_protected_free_slice_is_never_reclaimed() -> None:
    # A pod outside the gate asks for 10 GiB: the scheduler may bind it to the free 10 GiB slice at
    # any moment, and reclaiming it would fail that pod at admission. "high" waits.
    nodes = [Node("n", (gpu(0, 20, "10f"),), protected=frozenset({10}))]
    result = plan(nodes, [pod("high", 20, priority=10), pod("low", 10, priority=0)])
    assert where(result) == {"default/low": ("n", 0)}
    assert layout_specs(result) == {"n": {0: "10f"}}
    assert "capacity exhausted" in result.unplaced["default/high"]


def test_a_settling_node_hosts_pods_on_its_free_slices_but_gets_no_new_slice() -> None:
    nodes = [node("n", gpu(0, 40, "10f"), can_carve=False, can_host=True), node("m", gpu(0, 40))]
    result = plan(nodes, [pod("a", 10), pod("b", 10)])
    assert where(result) == {"default/a": ("n", 0), "default/b": ("m", 0)}
    assert layout_specs(result) == {"n": {0: "10f"}, "m": {0: "10f"}}


def test_a_pinned_pod_is_served_first_and_only_on_its_node() -> None:
    nodes = [node("a", gpu(0, 20)), node("b", gpu(0, 20, "10u"))]
    pinned = replace(pod("late", 10, minute=9), pinned="a")
    result = plan(nodes, [pod("early", 20, minute=0), pinned])
    assert where(result) == {"default/late": ("a", 0)}
    assert "capacity exhausted" in result.unplaced["default/early"]


def test_a_pinned_pod_whose_node_is_full_waits_with_its_node_named() -> None:
    nodes = [node("a", gpu(0, 20, "20u")), node("b", gpu(0, 20))]
    result = plan(nodes, [replace(pod("p", 10), pinned="a")])
    assert result.placed == {}
    assert result.unplaced == {"default/p": "released to node a, which has no room for a 10 GiB slice now"}


# --- overdue pods and held GPUs ---------------------------------------------------------------------------


def overdue(name: str, size_gb: int, *, priority: int = 0, minute: int = 0) -> PendingPod:
    return replace(pod(name, size_gb, priority=priority, minute=minute), overdue=True)


HELD = re.compile(r"GPU (\d+) of node (\S+) is held for it")


def held_gpu(result: PlanResult) -> tuple[str, int] | None:
    """The GPU a plan holds for an overdue pod, as its reason names it."""
    found = {(m[2], int(m[1])) for reason in result.unplaced.values() for m in HELD.finditer(reason)}
    assert len(found) <= 1, f"more than one GPU held: {found}"
    return next(iter(found), None)


def test_pods_after_a_large_one_that_fits_nowhere_take_the_memory_that_frees_until_it_is_overdue() -> None:
    # 40 GiB fits on no GPU: GPU 0 could offer 20 GiB, GPU 1 30. The pods that came after it fit.
    nodes = [node("n", gpu(0, 80, "30u 30u"), gpu(1, 80, "50u"))]
    later = [pod("small", 10, minute=1), pod("medium", 20, minute=2)]
    waiting = plan(nodes, [pod("large", 40, minute=0), *later])
    assert set(waiting.placed) == {"default/small", "default/medium"} and held_gpu(waiting) is None
    # Overdue, it holds GPU 1, the one that could offer it the most: the others go to GPU 0 or wait.
    held = plan(nodes, [overdue("large", 40, minute=0), *later])
    assert held_gpu(held) == ("n", 1)
    assert where(held) == {"default/small": ("n", 0)}
    assert held.unplaced["default/large"] == (
        "capacity exhausted: needs 40 GiB on one GPU, which none could offer now; it has waited so long "
        "that GPU 1 of node n is held for it: no pod that came after it is placed there until it fits "
        "(that GPU could offer 30 GiB now, more as its pods finish)"
    )
    assert held.unplaced["default/medium"] == (
        "capacity exhausted: needs 20 GiB on one GPU; the most any GPU could offer now is 10 GiB "
        "(GPU 1 of node n is held for default/large, which came first)"
    )
    assert layout_specs(held)["n"][1] == "50u"


def test_an_overdue_pod_is_served_before_more_pods_that_came_after_it() -> None:
    nodes = [node("n", gpu(0, 80))]
    later = [pod(f"p{i}", 20, minute=i) for i in range(1, 5)]
    most = plan(nodes, [pod("large", 50, minute=0), *later])
    assert set(most.placed) == {pod.key for pod in later}  # four pods rather than two
    fair = plan(nodes, [overdue("large", 50, minute=0), *later])
    assert set(fair.placed) == {"default/large", "default/p1"} and held_gpu(fair) is None


def test_a_held_gpu_takes_pods_that_sort_before_the_overdue_one_and_those_released_to_it() -> None:
    nodes = [node("a", gpu(0, 80, "50u")), node("b", gpu(0, 40, "35u"))]
    pods = [
        overdue("large", 40, minute=0),
        pod("urgent", 10, priority=10, minute=5),  # higher priority: before it, whenever it came
        replace(pod("released", 5, minute=6), pinned="a"),  # committed to node a already
        pod("later", 5, minute=7),
        pod("latest", 5, minute=8),
    ]
    result = plan(nodes, pods)
    assert held_gpu(result) == ("a", 0)  # it could offer 15 GiB, b 5
    assert where(result) == {
        "default/urgent": ("a", 0),
        "default/released": ("a", 0),
        "default/later": ("b", 0),
    }
    assert "GPU 0 of node a is held for default/large" in result.unplaced["default/latest"]


def test_no_gpu_is_held_where_none_could_ever_take_the_pod() -> None:
    nodes = [node("n", gpu(0, 40, "10u")), node("m", gpu(0, 80, "10u"), can_carve=False)]
    result = plan(nodes, [overdue("large", 50), pod("small", 10, minute=1)])
    assert held_gpu(result) is None and where(result) == {"default/small": ("n", 0)}


# --- nos regressions (docs/nos-compatibility.md §3.12) ---------------------------------------------------


def test_two_pods_competing_for_one_free_slice_get_one_placement_there() -> None:
    nodes = [node("n", gpu(0, 10, "10f"))]
    result = plan(nodes, [pod("a", 10), pod("b", 10)])
    assert where(result) == {"default/a": ("n", 0)}
    assert set(result.unplaced) == {"default/b"}


def test_competing_pods_get_a_second_slice_carved_when_memory_allows() -> None:
    nodes = [node("n", gpu(0, 20, "10f"))]
    result = plan(nodes, [pod("a", 10), pod("b", 10)])
    assert where(result) == {"default/a": ("n", 0), "default/b": ("n", 0)}
    assert layout_specs(result) == {"n": {0: "10f 10f"}}


def test_gpu_order_does_not_matter() -> None:
    gpus = [gpu(0, 40, "10u 10f"), gpu(1, 80, "40u"), gpu(2, 40)]
    pods = [pod("a", 10), pod("b", 30), pod("c", 20)]
    results = {
        render_plan(plan([node("n", *order)], pods)) for order in (gpus, gpus[::-1], gpus[1:] + gpus[:1])
    }
    assert len(results) == 1


def test_one_bad_node_does_not_fail_the_plan() -> None:
    nodes = [
        node("a-bad", gpu(0, 16, "20u")),
        node("b-good", gpu(0, 80, "10f")),
        node("c-bad", gpu(0, 16, "9*2u")),
    ]
    result = plan(nodes, [pod("p", 10), pod("q", 20)])
    assert set(result.excluded_nodes) == {"a-bad", "c-bad"}
    assert where(result) == {"default/p": ("b-good", 0), "default/q": ("b-good", 0)}


# --- properties -------------------------------------------------------------------------------------------

# (model, memory in MiB) of GPUs of 16, 24, 40 and 80 GiB; H100 reports a little under 80 GiB.
GPU_KINDS = [
    (P100, 16384),
    (V100, 16384),
    ("Tesla-T4", 15360),
    (P40, 24576),
    ("NVIDIA-A10G", 23028),
    (A100_40, 40960),
    (A100_80, 81920),
    ("NVIDIA-H100-80GB-HBM3", 81559),
]
NODE_NAMES = ["a100-1", "a100-2", "h100-1", "p100-1", "t4-1", "v100-1", "z-node"]
SIZES = st.sampled_from([1, 2, 5, 10, 20, 40]) | st.integers(0, 90)


@st.composite
def gpus_of_node(draw: st.DrawFn) -> tuple[Gpu, ...]:
    indexes = draw(st.lists(st.integers(0, 7), min_size=1, max_size=4, unique=True))
    gpus: list[Gpu] = []
    for index in indexes:
        model, memory_mib = draw(st.sampled_from(GPU_KINDS))
        capacity = memory_mib // 1024
        shape = draw(st.sampled_from(["fits", "fits", "fits", "many small", "impossible"]))
        if shape == "many small":
            sizes = [1] * draw(st.integers(10, 50))
        else:
            sizes = draw(st.lists(st.sampled_from([1, 2, 5, 10, 20, 40]) | st.integers(1, 40), max_size=8))
        chosen: list[Slice] = []
        for size in sizes:
            if shape != "impossible" and sum(s.size_gb for s in chosen) + size > capacity:
                continue
            chosen.append(Slice(size_gb=size, used=draw(st.booleans())))
        gpus.append(Gpu(index, model, memory_mib, tuple(chosen), max_slices_for(model)))
    return tuple(gpus)


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Node], list[PendingPod], PlanSettings]:
    names = draw(st.lists(st.sampled_from(NODE_NAMES), max_size=6, unique=True))
    modes = [(True, True), (True, True), (True, True), (False, False), (True, False)]  # (host, carve)
    nodes = [
        Node(name, draw(gpus_of_node()), can_carve=carve, can_host=host)
        for name in names
        for host, carve in [draw(st.sampled_from(modes))]
    ]
    count = draw(st.integers(0, 40))
    pods = [
        PendingPod(
            namespace=draw(st.sampled_from(["default", "ml"])),
            name=f"pod-{i}",
            size_gb=draw(SIZES),
            priority=draw(st.integers(-1, 2)),
            created=draw(st.none() | st.integers(0, 5).map(lambda m: T0 + timedelta(minutes=m))),
            overdue=draw(st.sampled_from([False, False, False, True])),
        )
        for i in range(count)
    ]
    reserve = draw(st.sampled_from([0, 0, 512, 1024]))
    return nodes, pods, PlanSettings(reserve_mib=reserve)


# MPSFLOW_PROPERTY_EXAMPLES=5000 for a deeper search than the default quick run.
EXAMPLES = int(os.environ.get("MPSFLOW_PROPERTY_EXAMPLES", "100"))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
Cluster = tuple[list[Node], list[PendingPod], PlanSettings]


@PROPERTY
@given(clusters())
def test_every_plan_keeps_the_contract_invariants(cluster: Cluster) -> None:
    nodes, pods, plan_settings = cluster
    assert_plan_invariants(nodes, pods, plan_cluster(nodes, pods, plan_settings), plan_settings)


@PROPERTY
@given(clusters())
def test_plan_is_deterministic(cluster: Cluster) -> None:
    nodes, pods, plan_settings = cluster
    first, second = plan_cluster(nodes, pods, plan_settings), plan_cluster(nodes, pods, plan_settings)
    assert first == second
    assert render_plan(first) == render_plan(second)


@PROPERTY
@given(clusters(), st.randoms(use_true_random=False))
def test_plan_does_not_depend_on_input_order(cluster: Cluster, rng: Random) -> None:
    nodes, pods, plan_settings = cluster
    shuffled_nodes = [replace(n, gpus=tuple(rng.sample(n.gpus, len(n.gpus)))) for n in nodes]
    rng.shuffle(shuffled_nodes)
    shuffled_pods = rng.sample(pods, len(pods))
    expected = plan_cluster(nodes, pods, plan_settings)
    actual = plan_cluster(shuffled_nodes, shuffled_pods, plan_settings)
    assert actual == expected


def test_excluded_reason_does_not_depend_on_gpu_order() -> None:
    gpus = [gpu(0, 16, "20u"), gpu(1, 16, "30u")]
    forward = plan_cluster([node("n", *gpus)], [], NO_RESERVE)
    backward = plan_cluster([node("n", *gpus[::-1])], [], NO_RESERVE)
    assert forward.excluded_nodes == backward.excluded_nodes


@PROPERTY
@given(clusters(), st.randoms(use_true_random=False))
def test_slice_order_within_a_gpu_changes_nothing_but_listing_order(cluster: Cluster, rng: Random) -> None:
    nodes, pods, plan_settings = cluster
    shuffled = [
        replace(n, gpus=tuple(replace(g, slices=tuple(rng.sample(g.slices, len(g.slices)))) for g in n.gpus))
        for n in nodes
    ]
    expected, actual = plan_cluster(nodes, pods, plan_settings), plan_cluster(shuffled, pods, plan_settings)
    assert (actual.placed, actual.unplaced, actual.excluded_nodes) == (
        expected.placed,
        expected.unplaced,
        expected.excluded_nodes,
    )
    assert _multisets(actual) == _multisets(expected)


def _multisets(result: PlanResult) -> dict[str, dict[int, Counter[Slice]]]:
    return {name: {i: Counter(s) for i, s in gpus.items()} for name, gpus in result.layouts.items()}


@PROPERTY
@given(clusters())
def test_used_slices_never_change(cluster: Cluster) -> None:
    nodes, pods, plan_settings = cluster
    result = plan_cluster(nodes, pods, plan_settings)
    for n in nodes:
        if n.name in result.excluded_nodes:
            continue
        for g in n.gpus:
            planned = result.layouts[n.name][g.index]
            assert Counter(s for s in planned if s.used) == Counter(s for s in g.slices if s.used)
            if not n.can_carve:  # never gains a slice (it may shed free ones it could not hold)
                assert not Counter(planned) - Counter(g.slices)


def apply_plan(
    nodes: list[Node], pods: list[PendingPod], result: PlanResult
) -> tuple[list[Node], list[PendingPod]]:
    """The cluster once the plan took effect: planned slices exist, placed pods hold theirs, stop waiting."""
    by_gpu: dict[tuple[str, int], list[Placement]] = {}
    for placement in result.placed.values():
        by_gpu.setdefault((placement.node, placement.gpu), []).append(placement)
    applied: list[Node] = []
    for n in nodes:
        if n.name in result.excluded_nodes:
            applied.append(n)
            continue
        gpus: list[Gpu] = []
        for g in n.gpus:
            planned = list(result.layouts[n.name][g.index])
            for placement in by_gpu.get((n.name, g.index), []):
                position = next(
                    p for p, s in enumerate(planned) if not s.used and s.size_gb == placement.size_gb
                )
                planned[position] = Slice(size_gb=placement.size_gb, used=True)
            gpus.append(replace(g, slices=tuple(planned)))
        applied.append(replace(n, gpus=tuple(gpus)))
    return applied, [p for p in pods if p.key not in result.placed]


@PROPERTY
@given(clusters())
def test_planning_again_after_the_plan_took_effect_changes_nothing(cluster: Cluster) -> None:
    """The planned slices exist and the placed pods hold theirs. (Once they bind, slices of their
    size that no pending pod can take any more may be reclaimed: that is a new state.)"""
    nodes, pods, plan_settings = cluster
    first = plan_cluster(nodes, pods, plan_settings)
    bound_sizes = {p.size_gb for p in pods if p.key in first.placed}
    waiting_sizes = {p.size_gb for p in pods if p.key not in first.placed}
    assume(bound_sizes <= waiting_sizes or not first.unplaced)
    applied_nodes, still_pending = apply_plan(nodes, pods, first)
    second = plan_cluster(applied_nodes, still_pending, plan_settings)
    assert_plan_invariants(applied_nodes, still_pending, second, plan_settings)
    expected_layouts = {
        n.name: {g.index: g.slices for g in n.gpus}
        for n in applied_nodes
        if n.name not in first.excluded_nodes
    }
    assert second.layouts == expected_layouts
    assert second.placed == {}
    assert set(second.unplaced) == set(first.unplaced)
    assert second.excluded_nodes == first.excluded_nodes


def test_a_contended_cluster_gets_the_most_pods_by_priority_where_the_placement_rules_fall_short() -> None:
    # A benchmark instance whose optimum (by an exact ILP: 4, 6 and 17 pods at priorities 100, 10
    # and 0) needs every GiB of the cluster: best fit and the placement rules miss it by one pod.
    nodes, pods = parse_snapshot(dumps(generate(78, 4, 2, 40, load=0.7)))
    result = plan(nodes, pods)
    served = Counter(pod.priority for pod in pods if pod.key in result.placed)
    assert served == Counter({100: 4, 10: 6, 0: 17})


@PROPERTY
@given(clusters())
def test_a_held_gpu_gets_no_pod_that_sorts_after_the_one_it_is_held_for(cluster: Cluster) -> None:
    nodes, pods, plan_settings = cluster
    result = plan_cluster(nodes, pods, plan_settings)
    held = held_gpu(result)
    if held is None:
        return
    [holder] = [p for p in pods if HELD.search(result.unplaced.get(p.key, ""))]
    # the first overdue pod that could be placed somewhere and was not
    left_waiting = [
        p
        for p in pods
        if p.overdue
        and any(why in result.unplaced.get(p.key, "") for why in ("capacity exhausted", "can take new"))
    ]
    assert holder == min(left_waiting, key=pod_order)
    placed = where(result)
    assert [p.key for p in pods if pod_order(p) > pod_order(holder) and placed.get(p.key) == held] == []
