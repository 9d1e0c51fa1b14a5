"""The plan's figures for the metrics: every reason the planner gives has a class, and the sums."""

from __future__ import annotations

from dataclasses import replace

import pytest

from events.plans import NodeLayout, Placement, PlanComputed, SliceSpec
from services.planner.core.figures import REASON_CLASSES, plan_figures, reason_class
from services.planner.core.model import Node, PendingPod
from tests.unit.planner.test_planning import gpu, node, plan, pod


def eligible(p: PendingPod, nodes: frozenset[str]) -> PendingPod:
    return replace(p, eligible=nodes)


REASONS_BY_CASE: list[tuple[list[Node], PendingPod, str]] = [
    ([node("n", gpu(0, 40))], pod("p", 0), "invalid_size"),
    ([node("n", gpu(0, 40))], pod("p", 41), "too_large"),
    ([node("n", gpu(0, 40, "30u"))], pod("p", 20), "capacity"),
    ([node("n", gpu(0, 40), can_carve=False)], pod("p", 10), "nodes_busy"),
    ([], pod("p", 10), "no_node"),
    ([node("n", gpu(0, 40))], eligible(pod("p", 10), frozenset({"m"})), "node_rules"),
    (
        [node("n", gpu(0, 40, "30u")), node("m", gpu(0, 40))],
        eligible(pod("p", 20), frozenset({"n"})),
        "capacity",
    ),
    ([node("n", gpu(0, 40))], replace(pod("p", 10), pinned="gone"), "released_elsewhere"),
    ([node("n", gpu(0, 40, "30u"))], replace(pod("p", 20), pinned="n"), "released_elsewhere"),
]


@pytest.mark.parametrize(("nodes", "waiting", "label"), REASONS_BY_CASE)
def test_every_reason_the_planner_gives_has_its_class(
    nodes: list[Node], waiting: PendingPod, label: str
) -> None:
    result = plan(nodes, [waiting])
    [reason] = result.unplaced.values()
    assert reason_class(reason) == label, reason


def test_the_waiting_for_reports_reason_has_its_class() -> None:
    # state.py rewrites "no opted-in node" reasons while nodes have not reported yet.
    assert reason_class("waiting for GPU reports from 3 opted-in node(s)") == "waiting_for_reports"


def test_every_class_is_reached_by_some_case_and_nothing_else_is_other() -> None:
    covered = {label for *_, label in REASONS_BY_CASE} | {"waiting_for_reports"}
    assert covered == {label for _, label in REASON_CLASSES}
    assert reason_class("something new") == "other"


def layout(*slices: tuple[int, bool]) -> NodeLayout:
    return NodeLayout(gpus={0: tuple(SliceSpec(size_gb=size, used=used) for size, used in slices)})


def test_free_and_stranded_memory() -> None:
    plan_ = PlanComputed(
        plan_id="p",
        nodes={
            "a": layout((30, True), (5, False)),  # 40 GiB: 10 free (5 in a free slice)
            "b": layout((20, True)),  # 24 GiB: 4 free
            "c": NodeLayout(gpus={0: (), 1: (SliceSpec(size_gb=8, used=True),)}),  # 80 + 80: 152 free
        },
        placed={"ns/small": Placement(node="a", gpu=0, size_gb=5)},
        unplaced={
            "ns/big": "capacity exhausted: needs 90 GiB on one GPU; the most any GPU could offer is 80 GiB",
            "ns/mid": "capacity exhausted: needs 12 GiB on one GPU; the most any GPU could offer is 80 GiB",
            "ns/huge": "needs 200 GiB; the largest opted-in GPU has 80 GiB",
        },
        excluded_nodes={"d": "reports no GPU mpsflow can partition"},
    )
    gpus = {
        ("a", 0): ("A100-40", 40),
        ("b", 0): ("L4", 24),
        ("c", 0): ("A100-80", 80),
        ("c", 1): ("A100-80", 80),
    }
    figures = plan_figures(plan_, gpus, {"ns/big": 90, "ns/mid": 12, "ns/huge": 200})
    assert (figures.pending, figures.placed, figures.planned_nodes, figures.excluded_nodes) == (4, 1, 3, 1)
    assert figures.unplaced == {"capacity": 2, "too_large": 1}
    assert figures.free_gib == {"A100-40": 10, "L4": 4, "A100-80": 80 + 72}
    # The smallest pod waiting for room needs 12 GiB: the 10 free on a and the 4 on b serve nobody.
    assert figures.stranded_gib == {"A100-40": 10, "L4": 4, "A100-80": 0}


def test_nothing_is_stranded_while_no_pod_waits_for_room() -> None:
    plan_ = PlanComputed(
        plan_id="p",
        nodes={"a": layout((30, True))},
        unplaced={"ns/huge": "needs 200 GiB; the largest opted-in GPU has 40 GiB"},
    )
    figures = plan_figures(plan_, {("a", 0): ("L4", 40)}, {"ns/huge": 200})
    assert (figures.free_gib, figures.stranded_gib) == ({"L4": 10}, {"L4": 0})
