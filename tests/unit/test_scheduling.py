"""The simulated kube-scheduler's decisions: filters, their wording, requests, the queue."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulation.scheduling import (
    NOT_READY_TAINT,
    UNREACHABLE_TAINT,
    SchedulingQueue,
    feasible_nodes,
    filter_node,
    matches_node_affinity,
    matches_term,
    node_taints,
    pinned_nodes,
    pod_requests,
    quantity,
    requested_by_node,
    spec_changed,
    tolerates,
    untolerated_taint,
    wants_scheduling,
)

GPU = "nvidia.com/gpu-10gb"
READY = [{"type": "Ready", "status": "True"}]


def node(
    name: str,
    *,
    allocatable: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    unschedulable: bool = False,
    conditions: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"taints": taints or [], "unschedulable": unschedulable},
        "status": {
            "allocatable": allocatable or {},
            "conditions": READY if conditions is None else conditions,
        },
    }


def pod(
    name: str = "p",
    *,
    limits: dict[str, Any] | None = None,
    requests: dict[str, Any] | None = None,
    priority: int | None = None,
    created: str = "2024-01-01T00:00:00Z",
    **spec: Any,
) -> dict[str, Any]:
    resources = {"limits": limits or {}, "requests": requests or {}}
    return {
        "metadata": {"name": name, "namespace": "ml", "creationTimestamp": created},
        "spec": {"containers": [{"name": "main", "resources": resources}], "priority": priority, **spec},
        "status": {"phase": "Pending"},
    }


def pinned_to(*names: str) -> dict[str, Any]:
    term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": list(names)}]}
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def required(*terms: dict[str, Any]) -> dict[str, Any]:
    return {
        "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": list(terms)}}
    }


# --- taints and tolerations --------------------------------------------------------------------

TAINT = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}


@pytest.mark.parametrize(
    ("toleration", "tolerated"),
    [
        ({"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}, True),
        ({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}, True),  # no operator: Equal
        ({"key": "dedicated", "operator": "Equal", "value": "cpu", "effect": "NoSchedule"}, False),
        ({"key": "dedicated", "operator": "Equal", "effect": "NoSchedule"}, False),  # value "" != "gpu"
        ({"key": "dedicated", "operator": "Exists", "effect": "NoSchedule"}, True),
        ({"key": "dedicated", "operator": "Exists"}, True),  # no effect: every effect
        ({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}, False),
        ({"key": "other", "operator": "Exists"}, False),
        ({"operator": "Exists"}, True),  # no key with Exists: every taint
        ({"operator": "Exists", "effect": "NoExecute"}, False),
        ({"key": "dedicated", "operator": "Gt", "value": "1"}, False),  # unknown operator
    ],
)
def test_tolerations_follow_kubernetes_matching_rules(toleration: dict[str, str], tolerated: bool) -> None:
    assert tolerates(toleration, TAINT) is tolerated


@pytest.mark.parametrize(
    ("taints", "tolerations", "untolerated"),
    [
        ([], [], None),
        ([{"key": "a", "effect": "PreferNoSchedule"}], [], None),  # only scores
        ([{"key": "a", "effect": "NoExecute"}], [], "a"),
        ([{"key": "a", "effect": "NoSchedule"}, {"key": "b", "effect": "NoSchedule"}], [], "a"),  # the first
        (
            [{"key": "a", "effect": "NoSchedule"}, {"key": "b", "effect": "NoSchedule"}],
            [{"key": "a", "operator": "Exists"}],
            "b",
        ),
    ],
)
def test_only_noschedule_and_noexecute_taints_need_a_toleration(
    taints: list[dict[str, str]], tolerations: list[dict[str, str]], untolerated: str | None
) -> None:
    found = untolerated_taint(taints, tolerations)
    assert (found or {}).get("key") == untolerated


@pytest.mark.parametrize(
    ("conditions", "taints", "expected"),
    [
        (READY, [], []),
        ([{"type": "Ready", "status": "False"}], [], [NOT_READY_TAINT]),
        ([{"type": "Ready", "status": "Unknown"}], [], [UNREACHABLE_TAINT]),
        ([], [], [NOT_READY_TAINT]),  # a new node, as TaintNodesByCondition admits it
        ([], [{"key": NOT_READY_TAINT, "effect": "NoSchedule"}], [NOT_READY_TAINT]),  # not twice
        ([{"type": "Ready", "status": "False"}], [TAINT], ["dedicated", NOT_READY_TAINT]),
    ],
)
def test_a_node_that_is_not_ready_carries_the_condition_taint(
    conditions: list[dict[str, str]], taints: list[dict[str, str]], expected: list[str]
) -> None:
    assert [t["key"] for t in node_taints(node("n", taints=taints, conditions=conditions))] == expected


@given(
    key=st.text(max_size=5),
    value=st.text(max_size=5),
    effect=st.sampled_from(["NoSchedule", "NoExecute", "PreferNoSchedule"]),
)
def test_a_toleration_copied_from_a_taint_or_exists_everything_tolerates_it(
    key: str, value: str, effect: str
) -> None:
    taint = {"key": key, "value": value, "effect": effect}
    assert tolerates({**taint, "operator": "Equal"}, taint)
    assert tolerates({"operator": "Exists"}, taint)
    assert not tolerates({**taint, "value": value + "x"}, taint)


# --- node affinity -----------------------------------------------------------------------------

LABELED = node("n1", labels={"zone": "a", "gpus": "8"})


@pytest.mark.parametrize(
    ("operator", "key", "values", "matches"),
    [
        ("In", "zone", ["a", "b"], True),
        ("In", "zone", ["b"], False),
        ("In", "missing", ["a"], False),
        ("NotIn", "zone", ["b"], True),
        ("NotIn", "zone", ["a"], False),
        ("NotIn", "missing", ["a"], True),  # an absent label is in no set
        ("Exists", "zone", [], True),
        ("Exists", "missing", [], False),
        ("DoesNotExist", "missing", [], True),
        ("DoesNotExist", "zone", [], False),
        ("Gt", "gpus", ["7"], True),
        ("Gt", "gpus", ["8"], False),
        ("Lt", "gpus", ["9"], True),
        ("Lt", "gpus", ["8"], False),
        ("Gt", "zone", ["1"], False),  # not an integer
        ("Gt", "gpus", ["x"], False),
        ("Gt", "gpus", ["1", "2"], False),  # exactly one value
        ("Gt", "missing", ["1"], False),
        ("Matches", "zone", ["a"], False),  # unknown operator
    ],
)
def test_match_expression_operators(operator: str, key: str, values: list[str], matches: bool) -> None:
    term = {"matchExpressions": [{"key": key, "operator": operator, "values": values}]}
    assert matches_term(term, LABELED) is matches


@pytest.mark.parametrize(
    ("requirement", "matches"),
    [
        ({"key": "metadata.name", "operator": "In", "values": ["n1"]}, True),
        ({"key": "metadata.name", "operator": "In", "values": ["n2"]}, False),
        ({"key": "metadata.name", "operator": "NotIn", "values": ["n2"]}, True),
        ({"key": "metadata.name", "operator": "NotIn", "values": ["n1"]}, False),
        ({"key": "metadata.namespace", "operator": "NotIn", "values": ["x"]}, False),  # only metadata.name
        ({"key": "metadata.name", "operator": "Exists"}, False),  # only In and NotIn
    ],
)
def test_match_fields_select_on_the_node_name(requirement: dict[str, Any], matches: bool) -> None:
    assert matches_term({"matchFields": [requirement]}, LABELED) is matches


def _expression(key: str, operator: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": operator, "values": list(values)}


@pytest.mark.parametrize(
    ("spec", "matches"),
    [
        ({}, True),
        ({"nodeSelector": {"zone": "a"}}, True),
        ({"nodeSelector": {"zone": "a", "gpus": "4"}}, False),  # every label
        ({"affinity": {"nodeAffinity": {}}}, True),  # nothing required
        ({"affinity": required()}, False),  # no term: nothing matches
        ({"affinity": required({})}, False),  # an empty term matches nothing
        ({"affinity": required({}, {"matchExpressions": [_expression("zone", "In", "a")]})}, True),  # ORed
        ({"affinity": required({"matchExpressions": [_expression("zone", "In", "b")]})}, False),
        (
            {
                "affinity": required(
                    {
                        "matchExpressions": [_expression("zone", "In", "a")],
                        "matchFields": [_expression("metadata.name", "In", "n2")],
                    }
                )
            },
            False,  # ANDed within a term
        ),
        (
            {
                "nodeSelector": {"zone": "b"},
                "affinity": required({"matchExpressions": [_expression("zone", "Exists")]}),
            },
            False,  # nodeSelector and affinity both hold
        ),
    ],
)
def test_node_selector_and_required_terms(spec: dict[str, Any], matches: bool) -> None:
    assert matches_node_affinity({"metadata": {"name": "p"}, "spec": spec}, LABELED) is matches


def _pin(*values: str) -> dict[str, Any]:
    return {"matchFields": [_expression("metadata.name", "In", *values)]}


@pytest.mark.parametrize(
    ("affinity", "pinned"),
    [
        (None, None),
        (required(_pin("n1")), {"n1"}),
        (required(_pin("n1"), _pin("n2", "n3")), {"n1", "n2", "n3"}),  # terms ORed
        (required(_pin("n1"), {"matchExpressions": [_expression("zone", "Exists")]}), None),  # any node may
        (
            required(
                {"matchFields": [_expression("metadata.name", "In", "n1", "n2"), *_pin("n2")["matchFields"]]}
            ),
            {"n2"},
        ),
        (required({"matchFields": [_expression("metadata.name", "NotIn", "n1")]}), None),
        (
            required(_pin("n1"), {"matchFields": [*_pin("n1")["matchFields"], *_pin("n2")["matchFields"]]}),
            {"n1"},
        ),
        (
            required({"matchFields": [*_pin("n1")["matchFields"], *_pin("n2")["matchFields"]]}),
            set(),
        ),  # conflict
    ],
)
def test_prefilter_narrows_to_the_nodes_match_fields_name(
    affinity: dict[str, Any] | None, pinned: set[str] | None
) -> None:
    assert pinned_nodes({"metadata": {"name": "p"}, "spec": {"affinity": affinity}}) == pinned


# --- requests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"containers": [{"resources": {"limits": {GPU: 1}}}]}, {GPU: 1}),
        (
            {"containers": [{"resources": {"requests": {GPU: "2"}, "limits": {GPU: "1"}}}]},
            {GPU: 1},
        ),  # limits win
        ({"containers": [{"resources": {"requests": {"cpu": "500m", "memory": "1Gi", GPU: 1}}}]}, {GPU: 1}),
        ({"containers": [{"resources": {"limits": {GPU: 0}}}]}, {}),
        ({"containers": [{"resources": {"limits": {"hugepages-2Mi": "4Mi"}}}]}, {"hugepages-2Mi": 4 * 2**20}),
        (
            {"containers": [{"resources": {"limits": {GPU: 1}}}, {"resources": {"limits": {GPU: 2}}}]},
            {GPU: 3},
        ),
        (
            {
                "containers": [{"resources": {"limits": {GPU: 1}}}],
                "initContainers": [{"resources": {"limits": {GPU: 2}}}, {"resources": {"limits": {GPU: 1}}}],
            },
            {GPU: 2},  # init containers run one at a time: the largest, if more than the containers
        ),
        (
            {
                "containers": [{"resources": {"limits": {GPU: 1}}}],
                "initContainers": [
                    {"restartPolicy": "Always", "resources": {"limits": {GPU: 1}}},
                    {"resources": {"limits": {GPU: 2}}},
                ],
            },
            {GPU: 3},  # a sidecar runs along the later init containers and the containers
        ),
    ],
)
def test_pod_requests_as_kubernetes_computes_them(spec: dict[str, Any], expected: dict[str, int]) -> None:
    assert pod_requests({"metadata": {"name": "p"}, "spec": spec}) == Counter(expected)


@pytest.mark.parametrize(
    ("text", "value"), [("3", 3), (3, 3), ("1k", 1000), ("1Ki", 1024), ("500m", 1), ("1.5", 2), ("0", 0)]
)
def test_quantities_round_up_to_whole_numbers(text: object, value: int) -> None:
    assert quantity(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1x", "1.2.3"])
def test_invalid_quantities_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid resource quantity"):
        quantity(text)


def test_requested_counts_bound_and_assumed_pods_that_are_not_terminal() -> None:
    bound = pod("bound", limits={GPU: 1}, nodeName="n1")
    assumed = pod("assumed", limits={GPU: 2})
    done = {**pod("done", limits={GPU: 4}, nodeName="n1"), "status": {"phase": "Succeeded"}}
    waiting = pod("waiting", limits={GPU: 8})
    pods = {f"ml/{p['metadata']['name']}": p for p in (bound, assumed, done, waiting)}

    assert requested_by_node(pods, {"ml/assumed": "n1"}) == {"n1": Counter({GPU: 3})}


# --- filtering and its message -----------------------------------------------------------------


def test_a_node_fails_at_the_first_filter_that_rejects_it() -> None:
    cordoned = node("n", unschedulable=True, taints=[TAINT], allocatable={})
    tainted = node("n", taints=[TAINT], labels={}, allocatable={})

    assert filter_node(pod(), Counter({GPU: 1}), cordoned, Counter()) == ["node(s) were unschedulable"]
    assert filter_node(pod(), Counter({GPU: 1}), tainted, Counter()) == [
        "node(s) had untolerated taint {dedicated: gpu}"
    ]
    mismatched = pod(nodeSelector={"zone": "a"}, tolerations=[{"operator": "Exists"}])
    assert filter_node(mismatched, Counter({GPU: 1}), tainted, Counter()) == [
        "node(s) didn't match Pod's node affinity/selector"
    ]


def test_a_pod_that_tolerates_the_cordon_taint_ignores_unschedulable() -> None:
    cordoned = node("n", unschedulable=True, allocatable={GPU: "1"})
    tolerant = pod(tolerations=[{"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}])

    assert filter_node(tolerant, Counter({GPU: 1}), cordoned, Counter()) == []


@pytest.mark.parametrize(
    ("allocatable", "used", "requests", "insufficient"),
    [
        ({GPU: "2"}, {GPU: 1}, {GPU: 1}, []),
        ({GPU: "2"}, {GPU: 2}, {GPU: 1}, [f"Insufficient {GPU}"]),
        ({}, {}, {GPU: 1}, [f"Insufficient {GPU}"]),  # missing allocatable is 0
        ({GPU: "garbage"}, {}, {GPU: 1}, [f"Insufficient {GPU}"]),
        ({}, {}, {"a/x": 1, "b/y": 1}, ["Insufficient a/x", "Insufficient b/y"]),  # one reason per resource
        ({"cpu": "1"}, {}, {}, []),
    ],
)
def test_resources_fit_against_allocatable_minus_what_is_bound_or_assumed(
    allocatable: dict[str, str], used: dict[str, int], requests: dict[str, int], insufficient: list[str]
) -> None:
    assert (
        filter_node(pod(), Counter(requests), node("n", allocatable=allocatable), Counter(used))
        == insufficient
    )


@given(
    allocatable=st.dictionaries(st.sampled_from(["a/x", "b/y", "c/z"]), st.integers(0, 4)),
    used=st.dictionaries(st.sampled_from(["a/x", "b/y", "c/z"]), st.integers(0, 4)),
    requests=st.dictionaries(st.sampled_from(["a/x", "b/y", "c/z"]), st.integers(1, 4)),
)
def test_a_pod_fits_exactly_when_every_resource_it_asks_for_is_left(
    allocatable: dict[str, int], used: dict[str, int], requests: dict[str, int]
) -> None:
    rejected = filter_node(pod(), Counter(requests), node("n", allocatable=allocatable), Counter(used))

    lacking = {r for r, n in requests.items() if n > allocatable.get(r, 0) - used.get(r, 0)}
    assert rejected == [f"Insufficient {r}" for r in sorted(lacking)]


NODES = {
    "n1": node("n1", labels={"zone": "a"}, allocatable={GPU: "1"}),
    "n2": node("n2", labels={"zone": "b"}, allocatable={GPU: "1"}),
    "n3": node("n3", labels={"zone": "b"}, allocatable={GPU: "1"}),
}


@pytest.mark.parametrize(
    ("spec", "used", "message"),
    [
        (
            {"nodeSelector": {"zone": "b"}},
            {"n2": {GPU: 1}, "n3": {GPU: 1}},
            "0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, "
            f"2 Insufficient {GPU}.",
        ),
        (
            {"affinity": pinned_to("n2")},
            {"n2": {GPU: 1}},
            f"0/3 nodes are available: 1 Insufficient {GPU}, "
            "2 node(s) didn't satisfy plugin(s) [NodeAffinity].",
        ),
        (
            {"affinity": pinned_to("gone")},
            {},
            "0/3 nodes are available: 3 node(s) didn't satisfy plugin(s) [NodeAffinity].",
        ),
        (
            {"affinity": required({"matchFields": [*_pin("n1")["matchFields"], *_pin("n2")["matchFields"]]})},
            {},
            "0/3 nodes are available: pod affinity terms conflict.",
        ),
    ],
)
def test_why_no_node_fits_in_kube_scheduler_words(
    spec: dict[str, Any], used: dict[str, dict[str, int]], message: str
) -> None:
    found = feasible_nodes(pod(limits={GPU: 1}, **spec), NODES, {n: Counter(u) for n, u in used.items()})

    assert found.nodes == []
    assert found.message == message


def test_the_reasons_are_sorted_as_strings_and_no_nodes_has_its_own_message() -> None:
    nodes = {f"n{i:02}": node(f"n{i:02}", unschedulable=i < 2) for i in range(12)}

    assert feasible_nodes(pod(limits={GPU: 1}), nodes, {}).message == (
        f"0/12 nodes are available: 10 Insufficient {GPU}, 2 node(s) were unschedulable."
    )
    assert feasible_nodes(pod(limits={GPU: 1}), {}, {}).message == "no nodes available to schedule pods"


def test_feasible_nodes_are_every_node_that_passes_and_the_pin_is_respected() -> None:
    assert feasible_nodes(pod(limits={GPU: 1}), NODES, {"n2": Counter({GPU: 1})}).nodes == ["n1", "n3"]
    assert feasible_nodes(pod(limits={GPU: 1}, affinity=pinned_to("n3")), NODES, {}).nodes == ["n3"]
    found = feasible_nodes(pod(limits={GPU: 1}, affinity=pinned_to("n3")), NODES, {"n3": Counter({GPU: 1})})
    assert found.nodes == []


# --- which pods are scheduled, and the queue ---------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "wanted"),
    [
        ({}, True),
        ({"schedulerName": "default-scheduler"}, True),
        ({"schedulerName": "other"}, False),
        ({"nodeName": "n1"}, False),
    ],
)
def test_only_unbound_pending_pods_for_the_default_scheduler_are_scheduled(
    changes: dict[str, Any], wanted: bool
) -> None:
    assert wants_scheduling(pod(**changes)) is wanted
    assert not wants_scheduling({**pod(**changes), "status": {"phase": "Running"}})


def test_the_active_queue_orders_by_priority_then_age_then_name() -> None:
    queue = SchedulingQueue()
    for name, priority, created in [
        ("c", None, "2024-01-01T00:00:00Z"),
        ("b", None, "2024-01-01T00:00:00Z"),
        ("old", None, "2023-01-01T00:00:00Z"),
        ("high", 10, "2025-01-01T00:00:00Z"),
    ]:
        queue.add(f"ml/{name}", pod(name, priority=priority, created=created))

    order = []
    while (popped := queue.pop(0.0)) is not None:
        order.append(popped[0])
    assert order == ["ml/high", "ml/old", "ml/b", "ml/c"]


def test_a_gated_pod_waits_for_an_update_that_removes_its_gates() -> None:
    queue = SchedulingQueue(flush_after=1.0)
    gated = pod("g", schedulingGates=[{"name": "mpsflow.dev/slice"}])
    queue.add("ml/g", gated)

    queue.move_all_to_active()
    assert queue.pop(100.0) is None  # neither cluster events nor the flush release it
    relabelled = {**gated, "metadata": {**gated["metadata"], "labels": {"x": "y"}}}
    queue.update("ml/g", gated, relabelled)
    assert queue.where("ml/g") == "gated"

    released = pod("g", schedulingGates=[])
    queue.update("ml/g", relabelled, released)
    assert queue.pop(100.0) == ("ml/g", released)


def test_an_unschedulable_pod_returns_on_a_cluster_event_a_spec_update_or_the_flush() -> None:
    queue = SchedulingQueue(flush_after=60.0)
    waiting = pod("u")
    queue.park("ml/u", waiting, now=0.0)
    assert queue.pop(59.0) is None
    assert queue.next_due(59.0) == 1.0

    status_only = {**waiting, "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled"}]}}
    queue.update("ml/u", waiting, status_only)
    assert queue.where("ml/u") == "unschedulable"
    assert queue.pop(60.0) == ("ml/u", status_only)  # flushed

    queue.park("ml/u", waiting, now=0.0)
    queue.move_all_to_active()
    assert queue.where("ml/u") == "active"

    queue.park("ml/u", waiting, now=0.0)
    tolerant = pod("u", tolerations=[{"operator": "Exists"}])
    assert spec_changed(waiting, tolerant)
    queue.update("ml/u", waiting, tolerant)
    assert queue.pop(0.0) == ("ml/u", tolerant)


def test_a_pod_whose_binding_failed_backs_off_and_cluster_events_do_not_shorten_it() -> None:
    queue = SchedulingQueue(backoff=1.0)
    queue.back_off("ml/b", pod("b"), now=10.0)
    queue.move_all_to_active()

    assert queue.pop(10.5) is None
    assert queue.next_due(10.5) == 0.5
    assert queue.pop(11.0) == ("ml/b", pod("b"))
    assert queue.next_due(11.0) is None
    queue.add("ml/b", pod("b"))
    queue.delete("ml/b")
    assert queue.where("ml/b") is None
