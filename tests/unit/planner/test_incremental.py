"""The service's IncrementalPlanner always gives the plan computed from scratch, byte for byte."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.folding import T0, fold_state
from benchmarks.snapshots import generate
from events.envelope import Envelope
from events.pods import PodDeleted, PodObserved
from services.planner.core.state import IncrementalPlanner, PlannerSettings, compute_plan

SETTINGS = PlannerSettings()

# One step after the initial state: a new pending pod (size, priority), or the deletion or binding
# of an earlier pod (index into the pods so far).
steps = st.lists(
    st.one_of(
        st.tuples(st.just("new"), st.sampled_from([0, 1, 2, 5, 10, 20, 40, 90]), st.sampled_from([0, 0, 10])),
        st.tuples(st.just("delete"), st.integers(0, 40), st.just(0)),
        st.tuples(st.just("bind"), st.integers(0, 40), st.just(0)),
    ),
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), load=st.sampled_from([0.2, 0.45, 0.8]), script=steps)
def test_incremental_plans_equal_plans_from_scratch(
    seed: int, load: float, script: list[tuple[str, int, int]]
) -> None:
    snapshot = generate(seed, nodes=4, gpus_per_node=2, pods=15, load=load)
    state = fold_state(snapshot)
    planner = IncrementalPlanner(SETTINGS)
    now = T0 + timedelta(seconds=1)
    assert planner.compute(state, now) == compute_plan(state, now, SETTINGS)
    for step, (action, value, priority) in enumerate(script):
        now += timedelta(milliseconds=100)
        keys = sorted(state.pods)
        if action == "new":
            event: PodObserved | PodDeleted = PodObserved(
                namespace="late",
                name=f"p{step}",
                uid=f"late-{step}",
                resource_version="1",
                size_gb=value,
                priority=priority,
                created=now,
                phase="Pending",
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
