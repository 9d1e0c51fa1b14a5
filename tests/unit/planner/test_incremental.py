"""The service's IncrementalPlanner always gives the plan computed from scratch, byte for byte; a plan
made again keeps pods where the last one put them."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.folding import T0, fold_state
from benchmarks.snapshots import generate
from events.envelope import Envelope
from events.nodes import NodeObserved
from events.pods import NodeRules, NodeSelectorTerm, PodDeleted, PodObserved, Requirement
from events.vocabulary import REPLICAS_LABEL
from services.planner.core.state import IncrementalPlanner, PlannerSettings, PublishPlan, compute_plan, decide

SETTINGS = PlannerSettings()


def arriving(name: str, at: datetime, rules: NodeRules | None = None) -> Envelope:
    """A 4 GiB pod of `default` arriving at `at`, pending."""
    pod = PodObserved(
        namespace="default",
        name=name,
        uid=name,
        resource_version="1",
        size_gb=4,
        created=at,
        phase="Pending",
        rules=rules or NodeRules(),
    )
    return Envelope(id=name, time=at, source="test", event=pod)


# One step after the initial state: a new pending pod (size, priority, the nodes its rules allow),
# or the deletion or binding of an earlier pod (index into the pods so far).
RULES = {
    "any": NodeRules(),
    "first node": NodeRules(
        required_terms=(
            NodeSelectorTerm(
                fields=(Requirement(key="metadata.name", operator="In", values=("gpu-node-0000",)),)
            ),
        )
    ),
    "no node": NodeRules(node_selector={"gpu": "none-has-this"}),
    "sharing label": NodeRules(node_selector={REPLICAS_LABEL: "3"}),
}
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("new"),
            st.sampled_from([0, 1, 2, 5, 10, 20, 40, 90]),
            st.sampled_from([0, 0, 10]),
            st.sampled_from(["any", "any", "first node", "no node", "sharing label"]),
        ),
        st.tuples(st.just("delete"), st.integers(0, 40), st.just(0), st.just("any")),
        st.tuples(st.just("bind"), st.integers(0, 40), st.just(0), st.just("any")),
        # a node's allocatable and its sharing labels change (value: its index, and the replicas)
        st.tuples(st.just("relabel"), st.integers(0, 3), st.integers(0, 4), st.just("any")),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), load=st.sampled_from([0.2, 0.45, 0.8]), script=steps)
def test_incremental_plans_equal_plans_from_scratch(
    seed: int, load: float, script: list[tuple[str, int, int, str]]
) -> None:
    snapshot = generate(seed, nodes=4, gpus_per_node=2, pods=15, load=load)
    state = fold_state(snapshot)
    planner = IncrementalPlanner(SETTINGS)
    now = T0 + timedelta(seconds=1)
    assert planner.compute(state, now) == compute_plan(state, now, SETTINGS)
    for step, (action, value, priority, rules) in enumerate(script):
        now += timedelta(milliseconds=100)
        keys = sorted(state.pods)
        if action == "new":
            event: PodObserved | PodDeleted | NodeObserved = PodObserved(
                namespace="late",
                name=f"p{step}",
                uid=f"late-{step}",
                resource_version="1",
                size_gb=value,
                priority=priority,
                created=now,
                phase="Pending",
                rules=RULES[rules],
            )
        elif action == "relabel":
            name = snapshot["nodes"][value % len(snapshot["nodes"])]["name"]
            node = state.nodes[name].observed
            assert node is not None
            event = node.model_copy(
                update={
                    "labels": {**node.labels, REPLICAS_LABEL: str(priority)},
                    "allocatable": {5: priority},
                }
            )
        elif not keys:
            continue
        elif action == "delete":
            pod = state.pods[keys[value % len(keys)]]
            event = PodDeleted(namespace=pod.namespace, name=pod.name, uid=pod.uid)
        else:
            pod = state.pods[keys[value % len(keys)]]
            event = pod.model_copy(update={"node": snapshot["nodes"][0]["name"], "resource_version": "2"})
        state.apply(Envelope(id=f"step-{step}", time=now, source="test", event=event))
        incremental = planner.compute(state, now)
        assert incremental.model_dump_json() == compute_plan(state, now, SETTINGS).model_dump_json()


def test_only_new_pending_pods_take_the_fast_path() -> None:
    snapshot = generate(7, nodes=3, gpus_per_node=2, pods=10, load=0.2)
    state = fold_state(snapshot)
    planner = IncrementalPlanner(SETTINGS)
    now = T0 + timedelta(seconds=1)
    first = planner.compute(state, now)
    pod = PodObserved(
        namespace="late", name="one", uid="u1", resource_version="1", size_gb=1, created=now, phase="Pending"
    )
    state.apply(Envelope(id="e1", time=now, source="test", event=pod))
    second = planner.compute(state, now)
    assert "late/one" in second.placed
    assert set(second.placed) == set(first.placed) | {"late/one"}
    assert second == compute_plan(state, now, SETTINGS)


def test_new_pending_pods_with_node_rules_go_only_where_their_rules_allow() -> None:
    snapshot = generate(7, nodes=3, gpus_per_node=2, pods=10, load=0.2)
    state = fold_state(snapshot)
    planner = IncrementalPlanner(SETTINGS)
    now = T0 + timedelta(seconds=1)
    planner.compute(state, now)
    for serial, (name, rules) in enumerate((("first", "first node"), ("none", "no node"))):
        pod = PodObserved(
            namespace="late",
            name=name,
            uid=f"u{serial}",
            resource_version="1",
            size_gb=1,
            created=now,
            phase="Pending",
            rules=RULES[rules],
        )
        state.apply(Envelope(id=f"e{serial}", time=now, source="test", event=pod))
    plan = planner.compute(state, now)
    assert plan.placed["late/first"].node == "gpu-node-0000"
    assert plan.unplaced["late/none"].startswith("no opted-in node that mpsflow plans on matches")
    assert plan == compute_plan(state, now, SETTINGS)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    load=st.sampled_from([0.2, 0.45]),
    script=st.lists(
        st.one_of(
            st.tuples(st.just("new"), st.sampled_from([1, 2, 5, 10, 20]), st.sampled_from([0, 0, 10])),
            st.tuples(st.just("decide"), st.just(0), st.just(0)),
        ),
        max_size=12,
    ),
)
def test_plans_equal_plans_from_scratch_when_decisions_are_published(
    seed: int, load: float, script: list[tuple[str, int, int]]
) -> None:
    """A decision published asks nodes for layouts, which they are then applying: what a plan starts
    from changes, and the next plan must still be the one from scratch. A long-lived planner, which
    keeps what it made of each node, decides what a new one does."""
    snapshot = generate(seed, nodes=4, gpus_per_node=2, pods=15, load=load)
    state = fold_state(snapshot)
    planner = IncrementalPlanner(SETTINGS)
    now = T0 + timedelta(seconds=1)
    for step, (action, size, priority) in enumerate(script):
        now += timedelta(seconds=1)
        if action == "new":
            pod = PodObserved(
                namespace="late",
                name=f"p{step}",
                uid=f"late-{step}",
                resource_version="1",
                size_gb=size,
                priority=priority,
                created=now,
                phase="Pending",
                gated=True,
            )
            state.apply(Envelope(id=f"step-{step}", time=now, source="test", event=pod))
            plan = planner.compute(state, now)
            assert plan.model_dump_json() == compute_plan(state, now, SETTINGS).model_dump_json()
            continue
        decision = decide(state, now, SETTINGS, planner)
        if isinstance(decision, PublishPlan):
            assert decision == decide(state, now, SETTINGS), "the same decision as a new planner's"
            state.commit(decision)
            planner.committed(state, decision, now)
            assert planner.compute(state, now) == compute_plan(state, now, SETTINGS)


def test_a_published_decision_that_only_asks_nodes_for_slices_keeps_the_fast_path() -> None:
    """Once a decision that asked nodes for layouts is published, those nodes apply them: a plan
    from scratch sees them as the layouts asked, and places every pod where the plan before did.
    The planner keeps its last computation, with those nodes seen anew, and the next pods extend
    it; the plan is the one from scratch all the same."""
    state = fold_state(generate(3, nodes=20, gpus_per_node=4, pods=100, load=0.45))
    planner = IncrementalPlanner(SETTINGS)
    now = T0 + timedelta(seconds=1)
    decision = decide(state, now, SETTINGS, planner)
    assert isinstance(decision, PublishPlan)
    assert decision.node_plans and not decision.releases
    state.commit(decision)
    planner.committed(state, decision, now)
    for serial in range(5):
        now += timedelta(milliseconds=100)
        state.apply(arriving(f"late-{serial}", now))
        plan = planner.compute(state, now)
        assert planner.last_mode == "incremental"
        assert plan.model_dump_json() == compute_plan(state, now, SETTINGS).model_dump_json()


def test_a_published_decision_that_the_planner_does_not_see_ends_the_fast_path() -> None:
    """A decision committed to the state without the planner hearing of it (`committed`) leaves it
    nothing to go on: the next plan is computed from scratch."""
    state = fold_state(generate(3, nodes=20, gpus_per_node=4, pods=100, load=0.45))
    planner = IncrementalPlanner(SETTINGS)
    now = T0 + timedelta(seconds=1)
    decision = decide(state, now, SETTINGS, planner)
    assert isinstance(decision, PublishPlan) and decision.node_plans
    state.commit(decision)
    state.apply(arriving("late", now))
    assert planner.compute(state, now) == compute_plan(state, now, SETTINGS)
    assert planner.last_mode == "full"


def test_a_nodes_allocatable_and_sharing_labels_change_nothing_a_plan_starts_from() -> None:
    state = fold_state(generate(3, nodes=4, gpus_per_node=2, pods=10, load=0.45))
    name = sorted(state.nodes)[0]
    node = state.nodes[name].observed
    assert node is not None
    before = state.structure_changes
    updates: list[dict[str, Any]] = [
        {"allocatable": {5: 2}},
        {"labels": {**node.labels, REPLICAS_LABEL: "2"}},
    ]
    for at, update in enumerate(updates, start=1):
        state.apply(Envelope(id=f"n{at}", time=T0, source="test", event=node.model_copy(update=update)))
        node = state.nodes[name].observed
        assert node is not None and state.structure_changes == before
    state.apply(
        Envelope(id="zone", time=T0, source="test", event=node.model_copy(update={"labels": {"zone": "b"}}))
    )
    assert state.structure_changes == before + 1
    # Once a pod's rules name a sharing label, a change of it is one.
    state.apply(arriving("selective", T0, NodeRules(node_selector={REPLICAS_LABEL: "3"})))
    node = state.nodes[name].observed
    assert node is not None
    changes = state.structure_changes
    relabelled = node.model_copy(update={"labels": {**node.labels, REPLICAS_LABEL: "3"}})
    state.apply(Envelope(id="n3", time=T0, source="test", event=relabelled))
    assert state.structure_changes == changes + 1


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 10_000), load=st.sampled_from([0.2, 0.45, 0.8]))
def test_a_plan_made_again_from_scratch_keeps_every_pod_where_the_last_one_put_it(
    seed: int, load: float
) -> None:
    """Pods keep the GPUs the last published plan gave them (`PendingPod.planned`): the same state
    planned again from scratch, knowing that plan, places every pod as it did."""
    state = fold_state(generate(seed, nodes=4, gpus_per_node=2, pods=15, load=load))
    now = T0 + timedelta(seconds=1)
    first = compute_plan(state, now, SETTINGS)
    state.last_placed = first.placed
    again = compute_plan(state, now, SETTINGS)
    assert again.placed == first.placed
    assert again.model_dump_json() == first.model_dump_json()
