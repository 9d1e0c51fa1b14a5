"""`ClusterState.apply` (folding events) and `decide` (batch window, plan publication)."""

from __future__ import annotations

import os
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.envelope import Envelope, Event
from events.nodes import (
    GpuProcessReport,
    GpuReport,
    NodeGpusReported,
    NodeObserved,
    NodeOptedOut,
    SliceState,
    Taint,
)
from events.plans import NodeConfigApplied, NodeConfigFailed, NodeLayout, NodePlanned, PlanComputed, SliceSpec
from events.pods import NodeRules, PodDeleted, PodObserved, PodPhase, PodRejected, PodReleased, PodUnplaced
from services.planner.core.model import PendingPod, PlanSettings
from services.planner.core.run import plan_cluster
from services.planner.core.state import (
    BatchWindow,
    ClusterState,
    NothingToDo,
    PlannerSettings,
    PublishPlan,
    WaitUntil,
    compute_plan,
    decide,
    layout_of,
    planning_nodes,
)
from services.planner.core.step import Planner, messages_of
from services.planner.replay import replay
from tests.unit.planner.invariants import assert_plan_invariants

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
MS = timedelta(milliseconds=1)
SETTINGS = PlannerSettings()  # idle 25 ms, maximum 100 ms, reports stale after 45 s
_ids = count()


# --- builders ---------------------------------------------------------------------------------------------


def env(event: Event, at: datetime = T0) -> Envelope:
    return Envelope(id=f"e{next(_ids)}", time=at, source="t", event=event)


def observed(
    name: str,
    size_gb: int = 10,
    *,
    rv: str = "1",
    phase: PodPhase = "Pending",
    node: str | None = None,
    priority: int = 0,
    namespace: str = "default",
    gated: bool = False,
    released_to: str | None = None,
) -> PodObserved:
    """A pod as the pod watcher reports it; by default one that bypassed the scheduling gate."""
    return PodObserved(
        namespace=namespace,
        name=name,
        uid=f"uid-{namespace}-{name}",
        resource_version=rv,
        size_gb=size_gb,
        priority=priority,
        created=T0,
        phase=phase,
        node=node,
        gated=gated,
        released_to=released_to,
    )


def gated(name: str, size_gb: int = 10, *, priority: int = 0) -> PodObserved:
    return observed(name, size_gb, priority=priority, gated=True)


def deleted(name: str, namespace: str = "default") -> PodDeleted:
    return PodDeleted(namespace=namespace, name=name, uid=f"uid-{namespace}-{name}")


def rejected(name: str, namespace: str = "default") -> PodRejected:
    return PodRejected(
        namespace=namespace,
        name=name,
        uid=f"uid-{namespace}-{name}",
        resource_version="9",
        reason="SliceSizeZero",
        message="nvidia.com/gpu-0gb asks for 0 GiB",
    )


def gpu_report(
    index: int, gib: int, spec: str = "", *, cc: tuple[int, int] = (8, 0), mig: bool = False
) -> GpuReport:
    """`spec` as `"10u 20f"`: a used 10 GiB slice and a free 20 GiB slice. `10u@a`: used by the pod
    default/a as the kubelet says; `10n`: free but not listed by the kubelet yet."""
    slices = []
    for n, item in enumerate(spec.split()):
        body, _, holder = item.partition("@")
        slices.append(
            SliceState(
                id=f"mps-g{index}-{body[:-1]}gb-{n}",
                size_gb=int(body[:-1]),
                used=body[-1] == "u",
                holder=f"default/{holder}" if holder else None,
                listed_by_kubelet=body[-1] != "n",
            )
        )
    return GpuReport(
        index=index,
        uuid=f"GPU-{index}",
        model="NVIDIA-A100-SXM4-80GB",
        memory_mib=gib * 1024,
        compute_capability=cc,
        mig_enabled=mig,
        slices=tuple(slices),
    )


def report(node: str, *gpus: GpuReport) -> NodeGpusReported:
    return NodeGpusReported(node=node, gpus=gpus)


def applied(node: str, gpus: dict[int, tuple[int, ...]], plan_id: str) -> NodeConfigApplied:
    return NodeConfigApplied(node=node, plan_id=plan_id, gpus=gpus)


def refused(node: str, gpus: dict[int, tuple[int, ...]], plan_id: str) -> NodeConfigFailed:
    return NodeConfigFailed(node=node, plan_id=plan_id, reason="GPU 0: no room", gpus=gpus)


def state_of(*envelopes: Envelope) -> ClusterState:
    state = ClusterState()
    for envelope in envelopes:
        state.apply(envelope)
    return state


def sizes(plan: PlanComputed) -> dict[str, dict[int, str]]:
    return {
        name: {
            i: " ".join(f"{s.size_gb}{'u' if s.used else 'f'}" for s in slices)
            for i, slices in layout.gpus.items()
        }
        for name, layout in plan.nodes.items()
    }


def ready_node(name: str = "n", *gpus: GpuReport, at: datetime = T0) -> list[Envelope]:
    """An opted-in node whose agent reported `gpus` and whose kubelet has synced their slices into
    the node's allocatable."""
    return synced(name, *(gpus or (gpu_report(0, 40),)), at=at)


def synced(name: str, *gpus: GpuReport, at: datetime = T0) -> list[Envelope]:
    """The agent's report of `gpus`, and the node's allocatable once the kubelet synced their listed
    slices (all a scheduler sees)."""
    listed = Counter(s.size_gb for gpu in gpus for s in gpu.slices if s.listed_by_kubelet)
    return [env(NodeObserved(name=name, allocatable=dict(listed)), at), env(report(name, *gpus), at)]


# --- apply ------------------------------------------------------------------------------------------------


def test_duplicates_are_harmless() -> None:
    stream = [
        *ready_node("n", gpu_report(0, 40, "10f")),
        env(observed("a", rv="1"), T0 + MS),
        env(observed("a", rv="2", node="n"), T0 + 2 * MS),
        env(observed("b"), T0 + 3 * MS),
        env(deleted("b"), T0 + 4 * MS),
    ]
    once = state_of(*stream)
    assert state_of(*[e for e in stream for _ in range(2)]) == once
    assert state_of(*stream, *stream) == once


def test_redelivered_identical_event_does_not_reopen_the_window() -> None:
    first = env(observed("a"), T0)
    state = state_of(first)
    state.mark_planned("p", state.revision)
    state.apply(env(observed("a"), T0 + timedelta(seconds=5)))
    assert state.first_unplanned_change is None


@pytest.mark.parametrize("gone", [deleted("a"), rejected("a")], ids=["deleted", "rejected"])
def test_deleted_and_rejected_pods_leave_the_state(gone: PodDeleted | PodRejected) -> None:
    state = state_of(env(observed("a")), env(observed("b")), env(gone, T0 + MS))
    assert set(state.pods) == {"default/b"}
    assert state.last_change == T0 + MS


def test_deleting_an_unknown_pod_changes_nothing() -> None:
    state = state_of(env(deleted("ghost")), env(rejected("ghost")))
    assert state == ClusterState()


def test_events_the_planner_does_not_use_change_nothing() -> None:
    unplaced = PodUnplaced(namespace="default", name="a", uid="u", reason="r")
    state = state_of(env(unplaced), env(PlanComputed(plan_id="p", nodes={})))
    assert state == ClusterState()


def test_opt_out_removes_the_node() -> None:
    state = state_of(
        *ready_node("n"), *ready_node("m"), env(NodeOptedOut(name="n", reason="label removed"), T0 + MS)
    )
    assert {name for name, level in state.nodes.items() if level.observed is not None} == {"m"}
    plan = compute_plan(state, T0 + MS, SETTINGS)
    assert set(plan.nodes) == {"m"}
    assert plan.excluded_nodes == {}


def test_identical_heartbeat_does_not_count_as_a_change_but_refreshes_the_report() -> None:
    state = state_of(*ready_node("n"))
    state.mark_planned("p", state.revision)
    state.apply(env(report("n", gpu_report(0, 40)), T0 + timedelta(seconds=30)))
    assert state.first_unplanned_change is None
    assert state.nodes["n"].reported_at == T0 + timedelta(seconds=30)


def test_memory_in_use_and_processes_moving_do_not_count_as_a_change() -> None:
    state = state_of(*ready_node("n"))
    state.mark_planned("p", state.revision)
    busy = gpu_report(0, 40).model_copy(
        update={"memory_used_mib": 12000, "processes": (GpuProcessReport(pid=4242, used_memory_mib=900),)}
    )
    state.apply(env(report("n", busy), T0 + timedelta(seconds=30)))
    assert state.first_unplanned_change is None
    state.apply(env(report("n", gpu_report(0, 40, "10f")), T0 + timedelta(seconds=31)))
    assert state.first_unplanned_change == T0 + timedelta(seconds=31)


# Per-key histories: each pod's subject, each node's subject and each node agent's subject keep their own
# order; Hypothesis interleaves them (and redelivers some events twice in a row).

POD_STEPS = st.sampled_from(["observe", "observe", "bind", "run", "delete", "reject"])


@st.composite
def pod_history(draw: st.DrawFn, name: str) -> list[Envelope]:
    at = T0 + draw(st.integers(0, 100)) * MS
    size = draw(st.sampled_from([1, 5, 10, 20]))
    events: list[Envelope] = []
    for rv, step in enumerate(draw(st.lists(POD_STEPS, min_size=1, max_size=5)), start=1):
        at += draw(st.integers(0, 30)) * MS
        event: Event
        if step == "delete":
            event = deleted(name)
        elif step == "reject":
            event = rejected(name)
        else:
            node = None if step == "observe" else draw(st.sampled_from(["n1", "n2"]))
            phase: PodPhase = "Running" if step == "run" else "Pending"
            event = observed(name, size, rv=str(rv), node=node, phase=phase)
        events.append(env(event, at))
    return events


@st.composite
def node_history(draw: st.DrawFn, name: str) -> list[Envelope]:
    at = T0 + draw(st.integers(0, 100)) * MS
    events: list[Envelope] = []
    for _ in range(draw(st.integers(1, 3))):
        at += draw(st.integers(0, 30)) * MS
        events.append(env(NodeObserved(name=name, unschedulable=draw(st.booleans())), at))
    return events


@st.composite
def agent_history(draw: st.DrawFn, name: str) -> list[Envelope]:
    at = T0 + draw(st.integers(0, 100)) * MS
    events: list[Envelope] = []
    for _ in range(draw(st.integers(1, 3))):
        at += draw(st.integers(0, 30)) * MS
        spec = draw(st.sampled_from(["", "10f", "10u", "10u 20f", "5u 5f 10f"]))
        events.append(env(report(name, gpu_report(0, 40, spec)), at))
    return events


@st.composite
def histories(draw: st.DrawFn) -> list[list[Envelope]]:
    pods = [draw(pod_history(f"pod-{i}")) for i in range(draw(st.integers(0, 5)))]
    nodes = [draw(node_history(name)) for name in ("n1", "n2") if draw(st.booleans())]
    agents = [draw(agent_history(name)) for name in ("n1", "n2") if draw(st.booleans())]
    return [h for h in pods + nodes + agents if h]


@st.composite
def interleaving(draw: st.DrawFn, keyed: list[list[Envelope]]) -> list[Envelope]:
    queues = [list(h) for h in keyed]
    merged: list[Envelope] = []
    while any(queues):
        queue = draw(st.sampled_from([q for q in queues if q]))
        envelope = queue.pop(0)
        merged.extend([envelope] * draw(st.sampled_from([1, 1, 1, 2])))
    return merged


@settings(
    max_examples=int(os.environ.get("MPSFLOW_PROPERTY_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.data())
def test_any_interleaving_that_keeps_each_keys_order_gives_the_same_state(data: st.DataObject) -> None:
    keyed = data.draw(histories())
    in_key_order = state_of(*[e for history in keyed for e in history])
    shuffled = state_of(*data.draw(interleaving(keyed)))
    assert shuffled == in_key_order
    now = T0 + timedelta(seconds=1)
    assert compute_plan(shuffled, now, SETTINGS) == compute_plan(in_key_order, now, SETTINGS)


def test_opt_out_and_agent_report_interleave_to_the_same_plan() -> None:
    opted_in = env(NodeObserved(name="n"), T0)
    agent = env(report("n", gpu_report(0, 40)), T0 + 1 * MS)
    opted_out = env(NodeOptedOut(name="n", reason="label removed"), T0 + 2 * MS)
    opted_in_again = env(NodeObserved(name="n"), T0 + 3 * MS)
    pending = env(observed("a"), T0 + 4 * MS)
    report_first = state_of(opted_in, agent, opted_out, opted_in_again, pending)
    opt_out_first = state_of(opted_in, opted_out, agent, opted_in_again, pending)
    now = T0 + timedelta(seconds=1)
    assert compute_plan(report_first, now, SETTINGS) == compute_plan(opt_out_first, now, SETTINGS)


# --- decide -----------------------------------------------------------------------------------------------


def test_nothing_to_do_without_a_change() -> None:
    assert decide(ClusterState(), T0, SETTINGS) == NothingToDo()


def test_wait_inside_the_idle_window_then_publish() -> None:
    state = state_of(*ready_node("n"), env(observed("a"), T0 + 10 * MS))
    assert decide(state, T0 + 20 * MS, SETTINGS) == WaitUntil(T0 + 35 * MS)
    assert decide(state, T0 + 34 * MS, SETTINGS) == WaitUntil(T0 + 35 * MS)
    decision = decide(state, T0 + 35 * MS, SETTINGS)
    assert isinstance(decision, PublishPlan)
    assert decision.plan.placed["default/a"].node == "n"


def test_a_new_change_extends_the_idle_window() -> None:
    state = state_of(*ready_node("n"))
    assert decide(state, T0 + 20 * MS, SETTINGS) == WaitUntil(T0 + 25 * MS)
    state.apply(env(observed("a"), T0 + 22 * MS))
    assert decide(state, T0 + 25 * MS, SETTINGS) == WaitUntil(T0 + 47 * MS)


def test_wait_is_capped_by_the_maximum_window() -> None:
    state = state_of(*ready_node("n"))
    for n in range(1, 9):
        state.apply(env(observed(f"p{n}"), T0 + n * 12 * MS))  # a change every 12 ms, last at 96 ms
    assert decide(state, T0 + 97 * MS, SETTINGS) == WaitUntil(T0 + 100 * MS)
    assert isinstance(decide(state, T0 + 100 * MS, SETTINGS), PublishPlan)


def test_window_settings_are_honoured() -> None:
    custom = PlannerSettings(window=BatchWindow(idle=timedelta(seconds=1), maximum=timedelta(seconds=2)))
    state = state_of(*ready_node("n"))
    assert decide(state, T0, custom) == WaitUntil(T0 + timedelta(seconds=1))
    state.apply(env(observed("a"), T0 + timedelta(seconds=1.5)))
    assert decide(state, T0 + timedelta(seconds=1.5), custom) == WaitUntil(T0 + timedelta(seconds=2))


def test_after_publishing_nothing_to_do_until_the_next_change() -> None:
    state = state_of(*ready_node("n"), env(observed("a")))
    decision = decide(state, T0 + timedelta(seconds=1), SETTINGS)
    assert isinstance(decision, PublishPlan)
    state.commit(decision)
    assert decide(state, T0 + timedelta(seconds=2), SETTINGS) == NothingToDo()
    state.apply(env(observed("b"), T0 + timedelta(seconds=3)))
    assert decide(state, T0 + timedelta(seconds=3), SETTINGS) == WaitUntil(
        T0 + timedelta(seconds=3) + 25 * MS
    )


def test_a_change_that_leaves_the_plan_as_published_publishes_nothing() -> None:
    state = state_of(*ready_node("n"), env(observed("a", rv="1")))
    decision = decide(state, T0 + timedelta(seconds=1), SETTINGS)
    assert isinstance(decision, PublishPlan)
    state.commit(decision)
    state.apply(env(observed("a", rv="2"), T0 + timedelta(seconds=2)))  # e.g. a label changed
    assert decide(state, T0 + timedelta(seconds=3), SETTINGS) == NothingToDo()


def test_a_change_folded_in_while_a_plan_is_published_keeps_its_window_open() -> None:
    state = state_of(*ready_node("n"), env(observed("a")))
    decision = decide(state, T0 + timedelta(seconds=1), SETTINGS)
    assert isinstance(decision, PublishPlan)
    state.apply(env(observed("b"), T0 + timedelta(seconds=1)))  # arrives during the publish
    state.commit(decision)
    later = decide(state, T0 + timedelta(seconds=2), SETTINGS)
    # b is planned at once, and as the layout n applies for a only adds a slice, n is asked at once
    # for one more.
    assert isinstance(later, PublishPlan) and "default/b" in later.plan.placed
    assert [planned.layout.sizes() for planned in later.node_plans] == [{0: (10, 10)}]


def test_batch_window_starts_afresh_after_a_change_that_left_the_plan_as_it_was() -> None:
    state = state_of(*ready_node("n"), env(observed("a", rv="1")))
    decision = decide(state, T0 + timedelta(seconds=1), SETTINGS)
    assert isinstance(decision, PublishPlan)
    state.commit(decision)
    state.apply(env(observed("a", priority=1), T0 + timedelta(seconds=2)))  # alone, it changes nothing
    unchanged = decide(state, T0 + timedelta(seconds=3), SETTINGS)
    assert isinstance(unchanged, NothingToDo) and unchanged.planned is not None
    assert unchanged.planned.plan_id == decision.plan.plan_id
    state.mark_planned(unchanged.planned.plan_id, unchanged.at_revision)
    burst = T0 + timedelta(seconds=30)  # the report is still fresh
    state.apply(env(observed("b"), burst))
    assert decide(state, burst + MS, SETTINGS) == WaitUntil(burst + 25 * MS)


def test_plan_id_depends_only_on_the_state() -> None:
    stream = [*ready_node("n", gpu_report(0, 40, "10u")), env(observed("a")), env(observed("b", 20), T0 + MS)]
    now = T0 + timedelta(seconds=1)
    first = compute_plan(state_of(*stream), now, SETTINGS)
    again = compute_plan(state_of(*stream[::-1]), now + timedelta(seconds=5), SETTINGS)
    assert first == again
    other = compute_plan(state_of(*stream, env(observed("c"), T0 + 2 * MS)), now, SETTINGS)
    assert other.plan_id != first.plan_id


# --- what the planner plans on ----------------------------------------------------------------------------


def test_node_that_never_reported_is_excluded_and_pods_wait_for_reports() -> None:
    state = state_of(env(NodeObserved(name="n")), env(observed("a")), env(observed("zero", 0)))
    plan = compute_plan(state, T0 + timedelta(seconds=1), SETTINGS)
    assert plan.nodes == {}
    assert plan.excluded_nodes == {"n": "waiting for the node agent's first GPU report"}
    assert plan.unplaced == {
        "default/a": "waiting for GPU reports from 1 opted-in node(s)",
        "default/zero": "asks for 0 GiB; a slice is at least 1 GiB",
    }


def test_node_that_never_reported_does_not_hold_up_the_others() -> None:
    state = state_of(env(NodeObserved(name="late")), *ready_node("n"), env(observed("a")))
    plan = compute_plan(state, T0 + timedelta(seconds=1), SETTINGS)
    assert set(plan.nodes) == {"n"}
    assert plan.excluded_nodes == {"late": "waiting for the node agent's first GPU report"}
    assert plan.placed["default/a"].node == "n"


def test_report_of_a_node_not_opted_in_is_ignored() -> None:
    state = state_of(env(report("stranger", gpu_report(0, 40))), env(observed("a")))
    plan = compute_plan(state, T0 + timedelta(seconds=1), SETTINGS)
    assert plan.nodes == {} and plan.excluded_nodes == {}
    assert plan.unplaced == {
        "default/a": "no opted-in node can be planned on (label nos.nebuly.com/gpu-partitioning=mps)"
    }


@pytest.mark.parametrize(
    ("age", "can_carve"),
    [(timedelta(seconds=45), True), (timedelta(seconds=45, milliseconds=1), False)],
    ids=["45 s old is fresh", "older is stale"],
)
def test_stale_report_means_the_node_cannot_carve(age: timedelta, can_carve: bool) -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40, "10f")), env(observed("a", 20)))
    nodes, _, _ = planning_nodes(state, T0 + age, SETTINGS)
    assert [n.can_carve for n in nodes] == [can_carve]
    plan = compute_plan(state, T0 + age, SETTINGS)
    if can_carve:
        assert sizes(plan) == {"n": {0: "10f 20f"}}
        assert set(plan.placed) == {"default/a"}
    else:
        assert sizes(plan) == {"n": {0: "10f"}}
        assert plan.unplaced == {
            "default/a": "no opted-in node can take new slices now "
            "(cordoned, its GPU reports are stale, or it is applying its last layout)"
        }


def test_a_newer_heartbeat_keeps_the_report_fresh() -> None:
    state = state_of(*ready_node("n"), env(report("n", gpu_report(0, 40)), T0 + timedelta(seconds=40)))
    nodes, _, _ = planning_nodes(state, T0 + timedelta(seconds=60), SETTINGS)
    assert [n.can_carve for n in nodes] == [True]


def test_cordoned_node_cannot_carve() -> None:
    state = state_of(env(NodeObserved(name="n", unschedulable=True)), env(report("n", gpu_report(0, 40))))
    nodes, _, _ = planning_nodes(state, T0, SETTINGS)
    assert [n.can_carve for n in nodes] == [False]


@pytest.mark.parametrize(
    ("reported", "bound_phase", "layout", "placed"),
    [
        ("10f", "Pending", "10u 10f", True),
        ("10f", "Running", "10u 10f", True),
        ("10f", "Unknown", "10u 10f", True),
        ("10u 10f", "Running", "10u 10f", True),
        ("10f", "Succeeded", "10f", True),
        ("10f", "Failed", "10f", True),
    ],
    ids=["bound pending", "running", "unknown", "already reported used", "succeeded", "failed"],
)
def test_bound_pods_not_yet_reported_keep_their_slice(
    reported: str, bound_phase: PodPhase, layout: str, placed: bool
) -> None:
    state = state_of(
        *ready_node("n", gpu_report(0, 40, reported)),
        env(observed("bound", node="n", phase=bound_phase)),
        env(observed("new")),
    )
    plan = compute_plan(state, T0 + timedelta(seconds=1), SETTINGS)
    assert sizes(plan) == {"n": {0: layout}}
    assert ("default/new" in plan.placed) is placed
    assert "default/bound" not in plan.placed and "default/bound" not in plan.unplaced


def test_bound_pod_on_a_full_gpu_leaves_the_new_pod_waiting() -> None:
    state = state_of(
        *ready_node("n", gpu_report(0, 10, "10f")),
        env(observed("bound", node="n", phase="Pending")),
        env(observed("new")),
    )
    plan = compute_plan(state, T0 + timedelta(seconds=1), SETTINGS)
    assert sizes(plan) == {"n": {0: "10u"}}
    assert plan.placed == {}
    assert set(plan.unplaced) == {"default/new"}


def test_mig_gpus_are_left_out() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40, mig=True), gpu_report(1, 40)), env(observed("a")))
    plan = compute_plan(state, T0 + timedelta(seconds=1), SETTINGS)
    assert sizes(plan) == {"n": {1: "10f"}}


def test_pre_volta_compute_capability_limits_slices() -> None:
    gpu = gpu_report(0, 24, " ".join(["1u"] * 15), cc=(6, 1))
    state = state_of(*ready_node("n", gpu), env(observed("a", 1)), env(observed("b", 1)))
    plan = compute_plan(state, T0 + timedelta(seconds=1), SETTINGS)
    assert set(plan.placed) == {"default/a"}
    assert len(plan.nodes["n"].gpus[0]) == 16


def test_compute_plan_matches_plan_cluster_and_keeps_the_invariants() -> None:
    plan_settings = PlannerSettings(plan=PlanSettings(reserve_mib=512))
    state = state_of(
        *ready_node("a", gpu_report(0, 40, "10u 10f"), gpu_report(1, 80, "40u")),
        *ready_node("b", gpu_report(0, 16, "20u")),
        env(observed("p1", 10)),
        env(observed("p2", 30, priority=1)),
        env(observed("p3", 60)),
        env(observed("p4", 90)),
    )
    now = T0 + timedelta(seconds=1)
    nodes, never, _ = planning_nodes(state, now, plan_settings)
    pending = [
        PendingPod("default", name, size, 1 if name == "p2" else 0, T0)
        for name, size in (("p1", 10), ("p2", 30), ("p3", 60), ("p4", 90))
    ]
    result = plan_cluster(nodes, pending, plan_settings.plan)
    assert_plan_invariants(nodes, pending, result, plan_settings.plan)
    plan = compute_plan(state, now, plan_settings)
    assert never == []
    assert {k: (p.node, p.gpu, p.size_gb) for k, p in plan.placed.items()} == {
        k: (p.node, p.gpu, p.size_gb) for k, p in result.placed.items()
    }
    assert plan.unplaced == result.unplaced
    assert (
        plan.excluded_nodes
        == result.excluded_nodes
        == {"b": "GPU 0: used slices hold 20 GiB but the GPU has 15 GiB"}
    )


def test_a_report_going_stale_is_a_change_that_stops_carving_there() -> None:
    state = state_of(*ready_node("n"), env(observed("a"), T0 + MS))
    first = decide(state, T0 + timedelta(seconds=1), SETTINGS)
    assert isinstance(first, PublishPlan) and "default/a" in first.plan.placed
    state.commit(first)
    stale_at = state.next_staleness(T0 + timedelta(seconds=1), SETTINGS.report_stale_after)
    assert stale_at == T0 + SETTINGS.report_stale_after
    state.time_passed(stale_at)
    later = decide(state, stale_at + timedelta(seconds=1), SETTINGS)
    assert isinstance(later, PublishPlan)
    assert "its GPU reports are stale" in later.plan.unplaced["default/a"]
    assert state.next_staleness(stale_at, SETTINGS.report_stale_after) is None


def test_replay_wakes_up_when_a_report_goes_stale() -> None:
    stream = [*ready_node("n"), env(observed("a"), T0 + MS), env(observed("b"), T0 + timedelta(seconds=90))]
    plans = list(replay(stream, SETTINGS))
    assert [p.at for p in plans][:2] == [T0 + MS + 25 * MS, T0 + SETTINGS.report_stale_after + 25 * MS]
    assert "default/a" in plans[0].plan.placed and "default/a" in plans[1].plan.unplaced


# --- coordination with the scheduler and the kubelet --------------------------------------------------------

LATER = T0 + timedelta(seconds=1)


NO_HOLD = PlannerSettings(hold_after=timedelta(days=1))
"""For tests of other rules where every pod is created at T0 and decisions come seconds later: no
pod becomes overdue (holds have tests of their own)."""


def decided(state: ClusterState, at: datetime = LATER, settings: PlannerSettings = SETTINGS) -> PublishPlan:
    decision = decide(state, at, settings)
    assert isinstance(decision, PublishPlan), decision
    return decision


def released(decision: PublishPlan) -> dict[str, str]:
    return {release.key: release.node for release in decision.releases}


def test_a_gated_pod_is_released_once_its_slice_is_free_and_listed_by_the_kubelet() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40, "10n")), env(gated("a")))
    first = decided(state)
    assert first.plan.placed["default/a"].node == "n" and released(first) == {}
    state.commit(first)
    for envelope in synced("n", gpu_report(0, 40, "10f"), at=LATER):
        state.apply(envelope)
    second = decided(state, LATER + timedelta(seconds=1))
    assert released(second) == {"default/a": "n"}
    assert second.releases[0].size_gb == 10 and second.releases[0].uid == "uid-default-a"
    state.commit(second)
    assert decide(state, LATER + timedelta(seconds=2), SETTINGS) == NothingToDo()
    # The pod watcher shows the release: the pod holds the slice; nothing is released twice.
    state.apply(env(observed("a", released_to="n"), LATER + timedelta(seconds=2)))
    third = decide(state, LATER + timedelta(seconds=3), SETTINGS)
    assert isinstance(third, PublishPlan) and third.releases == ()
    assert "default/a" not in third.plan.placed and sizes(third.plan) == {"n": {0: "10u"}}
    assert state.releases == {}


def test_pods_that_bypassed_the_gate_are_never_released() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40, "10f")), env(observed("a")))
    decision = decided(state)
    assert decision.plan.placed["default/a"].node == "n" and decision.releases == ()


def test_holders_the_report_does_not_name_yet_take_free_slices_before_any_release() -> None:
    # b is bound to n and the kubelet may give it either free slice: one gated pod may go, not two.
    state = state_of(
        *ready_node("n", gpu_report(0, 20, "10f 10f")),
        env(observed("b", node="n")),
        env(gated("a")),
        env(gated("c")),
    )
    assert released(decided(state)) == {"default/a": "n"}
    # Once the report names b as the holder of one slice, the other is a's and c waits for more.
    for envelope in synced("n", gpu_report(0, 20, "10u@b 10f"), at=LATER):
        state.apply(envelope)
    assert released(decided(state, LATER + timedelta(seconds=1))) == {"default/a": "n"}


def test_a_pod_released_earlier_counts_as_a_holder_until_the_report_names_it() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40, "10f")), env(gated("a")))
    first = decided(state)
    assert released(first) == {"default/a": "n"} and first.node_plans == ()
    state.commit(first)
    state.apply(env(gated("c"), LATER))
    second = decided(state, LATER + timedelta(seconds=1))
    # A slice is carved for c; nothing is released to a node in the decision that changes it.
    assert [p.layout.sizes() for p in second.node_plans] == [{0: (10, 10)}] and second.releases == ()
    state.commit(second)
    for envelope in synced("n", gpu_report(0, 40, "10f 10f"), at=LATER + timedelta(seconds=2)):
        state.apply(envelope)
    third = decided(state, LATER + timedelta(seconds=3))
    assert released(third) == {"default/c": "n"}  # a is about to hold one of the two


def test_nothing_is_released_to_a_node_in_the_decision_that_changes_its_slices() -> None:
    # The plan puts a and b on two of the three free 1 GiB slices and reclaims the third for c. The
    # kubelet may give a released pod any free slice, the reclaimed one too: a and b wait.
    state = state_of(
        *ready_node("n", gpu_report(0, 8, "1f 1f 1f 4u@x")),
        env(observed("x", 4, node="n", phase="Running")),
        env(gated("a", 1)),
        env(gated("b", 1)),
        env(gated("c", 2)),
    )
    decision = decided(state)
    assert [layout_of(p.layout.sizes()) for p in decision.node_plans] == [{0: (1, 1, 2, 4)}]
    assert set(decision.plan.placed) == {"default/a", "default/b", "default/c"} and decision.releases == ()


def test_no_release_while_the_node_applies_a_layout_that_takes_a_slice_away() -> None:
    # a needs 30 GiB of a 40 GiB GPU carved in four 10 GiB slices: two of them go.
    state = state_of(*ready_node("n", gpu_report(0, 40, "10f 10f 10f 10f")), env(gated("a", 30)))
    first = decided(state)
    assert [p.layout.sizes() for p in first.node_plans] == [{0: (10, 30)}]
    state.commit(first)
    state.apply(env(gated("b"), LATER))
    second = decided(state, LATER + timedelta(seconds=1))
    assert second.releases == () and second.node_plans == ()
    assert second.plan.placed["default/b"].node == "n"  # on the free slice, once n has settled
    state.commit(second)
    for envelope in synced("n", gpu_report(0, 40, "10f 30f"), at=LATER + timedelta(seconds=2)):
        state.apply(envelope)
    third = decided(state, LATER + timedelta(seconds=3))
    assert released(third) == {"default/a": "n", "default/b": "n"}


def test_pods_are_released_onto_the_free_slices_of_a_node_whose_change_only_adds_slices() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40, "10f")), env(gated("a", 20)))
    first = decided(state)
    assert [p.layout.sizes() for p in first.node_plans] == [{0: (10, 20)}]
    state.commit(first)
    state.apply(env(gated("b"), LATER))
    second = decided(state, LATER + timedelta(seconds=1))
    # The slice b gets is listed and stays in the layout n applies: nothing can take it away.
    assert state.nodes["n"].applying and released(second) == {"default/b": "n"}
    assert second.node_plans == ()


def test_a_node_adding_slices_is_asked_for_more_at_once_but_takes_none_away_until_it_answered() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 20, "5f")), env(gated("a")))
    first = decided(state)
    assert [p.layout.sizes() for p in first.node_plans] == [{0: (5, 10)}]
    state.commit(first)
    state.apply(env(gated("b", 5), LATER))
    state.apply(env(gated("c", 10), LATER))
    second = decided(state, LATER + timedelta(seconds=1))
    # b is released onto the free 5 GiB slice; c would need it reclaimed while n still applies: c waits.
    assert second.node_plans == () and "default/c" in second.plan.unplaced
    assert released(second) == {"default/b": "n"}
    state.commit(second)
    state.apply(env(gated("d", 5), LATER + timedelta(seconds=2)))
    third = decided(state, LATER + timedelta(seconds=3), NO_HOLD)  # else n's GPU is held for c
    assert [layout_of(p.layout.sizes()) for p in third.node_plans] == [{0: (5, 5, 10)}]  # d's, at once
    state.commit(third)
    for envelope in synced("n", gpu_report(0, 20, "5f 5f 10f"), at=LATER + timedelta(seconds=4)):
        state.apply(envelope)
    settled = decided(state, LATER + timedelta(seconds=5), NO_HOLD)
    assert released(settled) == {"default/a": "n", "default/d": "n"}


def test_a_node_gets_one_change_that_takes_slices_away_at_a_time_and_settles_on_its_agents_word() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40, " ".join(["5f"] * 8))), env(gated("a")))
    first = decided(state)
    assert [p.layout.sizes() for p in first.node_plans] == [{0: (5, 5, 5, 5, 5, 5, 10)}]
    state.commit(first)
    state.apply(env(gated("b"), LATER))
    second = decided(state, LATER + timedelta(seconds=1))
    assert second.node_plans == () and "default/b" in second.plan.unplaced
    state.commit(second)
    state.apply(env(applied("n", {0: (5,) * 6 + (10,)}, "another plan"), LATER + timedelta(seconds=2)))
    assert decided_or_none(state, LATER + timedelta(seconds=3)) == ()  # not its answer to this ask
    state.apply(
        env(applied("n", {0: (5,) * 6 + (10,)}, first.node_plans[0].plan_id), LATER + timedelta(seconds=4))
    )
    third = decided(state, LATER + timedelta(seconds=5))
    assert [p.layout.sizes() for p in third.node_plans] == [{0: (5, 5, 5, 5, 10, 10)}]


def test_a_report_that_shows_the_asked_layout_settles_the_node_too() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40)), env(gated("a")))
    state.commit(decided(state))
    state.apply(env(gated("b", 20), LATER))
    state.apply(env(report("n", gpu_report(0, 40, "10f")), LATER))
    assert [p.layout.sizes() for p in decided(state, LATER + timedelta(seconds=1)).node_plans] == [
        {0: (10, 20)}
    ]


def test_a_refused_layout_is_not_asked_again_while_the_nodes_report_stays_the_same() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40, "10f")), env(gated("a", 20)))
    first = decided(state)
    assert [p.layout.sizes() for p in first.node_plans] == [{0: (10, 20)}]
    state.commit(first)
    state.apply(env(refused("n", {0: (10, 20)}, first.node_plans[0].plan_id), LATER))
    second = decided(state, LATER + timedelta(seconds=1))
    # The node keeps what it has, and the key in the bucket says so instead of the refused layout.
    assert [p.layout.sizes() for p in second.node_plans] == [{0: (10,)}]
    assert "default/a" in second.plan.unplaced
    state.commit(second)
    state.apply(env(applied("n", {0: (10,)}, second.node_plans[0].plan_id), LATER + timedelta(seconds=2)))
    assert isinstance(decide(state, LATER + timedelta(seconds=3), SETTINGS), NothingToDo | PublishPlan)
    assert all(
        p.layout.sizes() != {0: (10, 20)} for p in decided_or_none(state, LATER + timedelta(seconds=3))
    )
    # A new report is a new situation: the layout may be asked again.
    state.apply(env(report("n", gpu_report(0, 40, "10f 5f")), LATER + timedelta(seconds=4)))
    again = decided(state, LATER + timedelta(seconds=5))
    assert "default/a" in again.plan.placed


def test_a_pod_keeps_the_free_slice_it_was_placed_on_when_a_slice_carved_for_a_later_pod_appears() -> None:
    """Seen in a burst: a pod waited 2 s for a slice carved for a pod that came 1.6 s after it. Its
    own free slice, on a node later by name, had been handed to that later pod once the new slice
    appeared on the node earlier by name (a plan from scratch gives free slices in node order)."""
    unsynced = NodeObserved(name="a", allocatable={})  # the kubelet has not synced any slice yet
    state = state_of(
        env(unsynced),
        env(report("a", gpu_report(0, 40))),
        env(unsynced.model_copy(update={"name": "b"})),
        env(report("b", gpu_report(0, 40, "5f 35u"))),
        env(gated("old", 5)),
    )
    first = decided(state)
    assert first.plan.placed["default/old"].node == "b" and first.node_plans == ()
    state.commit(first)
    state.apply(env(gated("new", 5), LATER))
    second = decided(state, LATER + timedelta(seconds=1))
    assert [(p.node, p.layout.sizes()) for p in second.node_plans] == [("a", {0: (5,)})]
    assert second.plan.placed["default/new"].node == "a"
    state.commit(second)
    state.apply(env(applied("a", {0: (5,)}, second.node_plans[0].plan_id), LATER + timedelta(seconds=2)))
    state.apply(env(report("a", gpu_report(0, 40, "5f")), LATER + timedelta(seconds=2)))
    third = compute_plan(state, LATER + timedelta(seconds=3), SETTINGS)
    assert {key: p.node for key, p in third.placed.items()} == {"default/old": "b", "default/new": "a"}


def decided_or_none(state: ClusterState, at: datetime) -> tuple[NodePlanned, ...]:
    decision = decide(state, at, SETTINGS)
    return decision.node_plans if isinstance(decision, PublishPlan) else ()


def test_reasons_are_told_only_while_no_node_is_applying_a_layout() -> None:
    exhausted = "capacity exhausted: needs 20 GiB on one GPU; the most any GPU could offer now is 0 GiB"
    # a gets the GPU's 10 GiB slice reclaimed: n applies a layout that takes a slice away.
    state = state_of(*ready_node("n", gpu_report(0, 20, "10f")), env(gated("a", 20)), env(gated("b", 20)))
    first = decided(state)
    assert [(u.name, u.reason) for u in first.unplaced] == [("b", exhausted)]
    state.commit(first)
    state.apply(env(gated("c", 20), LATER))
    second = decided(state, LATER + timedelta(seconds=1))
    assert "applying its last layout" in second.plan.unplaced["default/c"] and second.unplaced == ()
    state.commit(second)
    state.apply(env(applied("n", {0: (20,)}, first.node_plans[0].plan_id), LATER + timedelta(seconds=2)))
    third = decided(state, LATER + timedelta(seconds=3), NO_HOLD)  # b is overdue by now: see below
    assert [(u.name, u.reason) for u in third.unplaced] == [("c", exhausted)]
    state.commit(third)
    for envelope in synced("n", gpu_report(0, 20, "20f"), at=LATER + timedelta(seconds=4)):
        state.apply(envelope)
    fourth = decided(state, LATER + timedelta(seconds=5), NO_HOLD)
    assert fourth.unplaced == () and released(fourth) == {"default/a": "n"}


def test_a_size_a_pod_outside_the_gate_waits_for_is_protected_everywhere() -> None:
    state = state_of(
        *ready_node("n", gpu_report(0, 20, "10f")),
        env(observed("outside", 10)),
        env(gated("high", 20, priority=10)),
    )
    nodes, _, _ = planning_nodes(state, LATER, SETTINGS)
    assert [n.protected for n in nodes] == [frozenset({10})]
    decision = decided(state)
    assert "default/high" in decision.plan.unplaced and decision.plan.placed["default/outside"].node == "n"


def test_a_holder_the_report_does_not_name_protects_its_size_on_its_node_only() -> None:
    state = state_of(
        *ready_node("m", gpu_report(0, 20, "10f")),
        *ready_node("n", gpu_report(0, 20, "10f 10f")),
        env(observed("bound", node="n")),
        env(gated("high", 20, priority=10)),
    )
    nodes, _, _ = planning_nodes(state, LATER, SETTINGS)
    assert {n.name: n.protected for n in nodes} == {"m": frozenset(), "n": frozenset({10})}
    decision = decided(state)
    assert decision.plan.placed["default/high"].node == "m"  # m's free slice is reclaimed, n's stay
    assert sizes(decision.plan) == {"m": {0: "20f"}, "n": {0: "10u 10f"}}


def test_a_pod_released_to_a_node_that_has_no_slice_left_for_it_is_planned_there() -> None:
    state = state_of(
        *ready_node("m", gpu_report(0, 40)),
        *ready_node("n", gpu_report(0, 40, "30u@x")),
        env(observed("x", 30, node="n", phase="Running")),
        env(observed("r", 10, released_to="n")),
    )
    _, _, pinned = planning_nodes(state, LATER, SETTINGS)
    assert [(p.key, p.pinned) for p in pinned] == [("default/r", "n")]
    decision = decided(state)
    assert decision.plan.placed["default/r"].node == "n"
    assert [layout_of(p.layout.sizes()) for p in decision.node_plans] == [{0: (10, 30)}]


def test_a_restarted_planner_reads_back_the_layouts_and_releases_it_published() -> None:
    layout = NodeLayout(gpus={0: (SliceSpec(size_gb=10),)})
    state = state_of(
        *ready_node("n", gpu_report(0, 40)),
        env(gated("a")),
        env(NodePlanned(node="n", plan_id="p", layout=layout)),
        env(
            PodReleased(namespace="default", name="a", uid="uid-default-a", node="n", size_gb=10, plan_id="p")
        ),
    )
    assert state.nodes["n"].applying and set(state.releases) == {"default/a"}
    decision = decided(state)
    assert decision.node_plans == () and decision.releases == () and "default/a" not in decision.plan.placed
    # Its own layout read back later (an echo) never replaces a newer one it decided since.
    state.apply(env(NodePlanned(node="n", plan_id="old", layout=NodeLayout(gpus={0: ()}))))
    desired = state.nodes["n"].desired
    assert desired is not None and (desired.layout, desired.plan_id) == ({0: (10,)}, "p")


def test_a_pod_released_to_a_node_that_opted_out_waits_for_it_and_says_so() -> None:
    state = state_of(
        *ready_node("m", gpu_report(0, 40)),
        *ready_node("n", gpu_report(0, 40, "10f")),
        env(observed("r", 10, released_to="n")),
        env(NodeOptedOut(name="n", reason="opt-in label removed")),
    )
    decision = decided(state)
    assert decision.plan.unplaced == {
        "default/r": "released to node n, which mpsflow does not plan on now (opted out, gone, or "
        "without GPU reports): the pod waits for that node"
    }
    assert "n" not in decision.plan.nodes and sizes(decision.plan) == {"m": {0: ""}}


def test_a_refused_layout_wanted_again_once_the_report_changed_is_asked_again_under_an_id_of_its_own() -> (
    None
):
    state = state_of(*ready_node("n", gpu_report(0, 40, "10f")), env(gated("a", 20)))
    first = decided(state)
    state.commit(first)
    # A short pod takes the free slice, so the agent refuses; the pod is gone again at once.
    state.apply(env(report("n", gpu_report(0, 40, "10u")), LATER))
    state.apply(env(refused("n", {0: (10, 20)}, first.node_plans[0].plan_id), LATER))
    state.apply(env(report("n", gpu_report(0, 40, "10f")), LATER + 10 * MS))
    again = decided(state, LATER + timedelta(seconds=1))
    [asked] = again.node_plans
    assert asked.layout.sizes() == {0: (10, 20)} and asked.plan_id != first.node_plans[0].plan_id
    state.commit(again)
    assert state.nodes["n"].applying  # until the agent answers this ask
    state.apply(env(applied("n", {0: (10, 20)}, asked.plan_id), LATER + timedelta(seconds=2)))
    assert not state.nodes["n"].applying


def test_a_release_read_back_before_the_pods_latest_level_still_holds_its_slice() -> None:
    # A restarted planner reads the last message of every subject in stream order: the release
    # can come before the pod's latest level, which is still gated when the pod changed meanwhile.
    release = PodReleased(
        namespace="default", name="a", uid="uid-default-a", node="n", size_gb=10, plan_id="p"
    )
    for stream in ([env(gated("a")), env(release)], [env(release), env(gated("a"))]):
        state = state_of(*ready_node("n", gpu_report(0, 20, "10f")), *stream)
        assert set(state.releases) == {"default/a"}
        assert [n.protected for n in planning_nodes(state, LATER, SETTINGS)[0]] == [frozenset({10})]
    # A release for another pod of that name, or for a pod that shows it, is not kept.
    for pod in (
        observed("a", gated=True).model_copy(update={"uid": "other"}),
        observed("a", released_to="n"),
    ):
        state = state_of(*ready_node("n", gpu_report(0, 20, "10f")), env(pod), env(release))
        assert state.releases == {}


def test_a_pod_whose_gate_someone_else_lifted_is_outside_the_gate_again() -> None:
    release = PodReleased(
        namespace="default", name="a", uid="uid-default-a", node="m", size_gb=10, plan_id="p"
    )
    state = state_of(
        *ready_node("m", gpu_report(0, 20)),
        *ready_node("n", gpu_report(0, 20, "10f")),
        env(gated("a")),
        env(release),
        env(observed("a")),  # ungated, not released: its gate went some other way
    )
    assert state.releases == {}
    assert {n.name: n.protected for n in planning_nodes(state, LATER, SETTINGS)[0]} == {
        "m": frozenset({10}),
        "n": frozenset({10}),
    }


def test_a_pod_is_released_only_once_the_nodes_allocatable_has_room_for_it() -> None:
    # The kubelet lists the new slice, but the API's allocatable (all the scheduler sees) does not
    # show it until the node-status sync: a pod released now would be unschedulable there, and
    # kube-scheduler would look for pods to preempt on that node.
    state = state_of(
        env(NodeObserved(name="n", allocatable={10: 1})),
        env(report("n", gpu_report(0, 40, "10u@b 10f"))),
        env(observed("b", node="n", phase="Running")),
        env(gated("a")),
    )
    held_back = decided(state)
    assert held_back.plan.placed["default/a"].node == "n" and held_back.releases == ()
    state.commit(held_back)
    state.apply(env(NodeObserved(name="n", allocatable={10: 2}), LATER))
    assert released(decided(state, LATER + timedelta(seconds=1))) == {"default/a": "n"}


def test_a_pod_that_waited_long_is_told_why_even_while_some_node_applies_a_layout() -> None:
    exhausted = "capacity exhausted: needs 20 GiB on one GPU; the most any GPU could offer now is 0 GiB"
    state = state_of(*ready_node("n", gpu_report(0, 20, "10f")), env(gated("a", 20)))
    state.commit(decided(state))  # n applies a 20 GiB slice for a in place of its 10, and keeps applying
    state.apply(env(gated("b", 20), LATER))
    soon = decided(state, LATER + timedelta(seconds=1))
    assert "default/b" in soon.plan.unplaced and soon.unplaced == ()
    state.commit(soon)
    # b was created at T0; once it has waited the patience, a decision (here, on a new event) tells it.
    state.apply(env(gated("c", 1), T0 + SETTINGS.reason_patience + MS))
    late = decided(state, T0 + SETTINGS.reason_patience + timedelta(seconds=1))
    assert {u.name for u in late.unplaced} >= {"b"}
    assert state.nodes["n"].applying and late.plan.unplaced["default/b"] != exhausted


def unhealthy(gpu: GpuReport, how: str) -> GpuReport:
    if how == "daemon down":
        return gpu.model_copy(update={"daemon_healthy": False})
    return gpu.model_copy(update={"fault": "Xid 79 (the GPU has fallen off the bus) reported by the driver"})


@pytest.mark.parametrize("how", ["daemon down", "fault"])
def test_a_gpu_that_cannot_serve_slices_is_not_carved_nor_released_onto_and_its_free_slices_go(
    how: str,
) -> None:
    down = unhealthy(gpu_report(0, 40, "10f 20u@x"), how)
    state = state_of(
        *ready_node("n", down, gpu_report(1, 40)), env(observed("x", 20, node="n")), env(gated("a"))
    )
    decision = decided(state)
    # Its used slice stays; its free one goes, since no pod may be given it; the pod goes to GPU 1.
    assert sizes(decision.plan) == {"n": {0: "20u", 1: "10f"}} and decision.plan.placed["default/a"].gpu == 1
    assert decision.releases == ()  # the only free 10 GiB slice is on the GPU that cannot serve


@pytest.mark.parametrize("how", ["daemon down", "fault"])
def test_the_free_slices_of_an_unhealthy_gpu_that_a_bound_pod_may_be_given_stay(how: str) -> None:
    down = unhealthy(gpu_report(0, 40, "10f 20f"), how)
    # b is bound to n and the report names no holder for it: the kubelet may give it either slice
    # of its size, even the one on GPU 0.
    state = state_of(*ready_node("n", down, gpu_report(1, 40, "10f")), env(observed("b", 10, node="n")))
    decision = decided(state)
    assert sizes(decision.plan)["n"] == {0: "10f", 1: "10u"}


def test_a_node_applying_a_layout_keeps_the_slices_of_its_unhealthy_gpu_for_now() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40, "10f"), gpu_report(1, 40)), env(gated("a", 30)))
    first = decided(state)
    state.commit(first)
    assert state.nodes["n"].applying
    for envelope in synced("n", unhealthy(gpu_report(0, 40, "10f"), "fault"), gpu_report(1, 40), at=LATER):
        state.apply(envelope)
    nodes, _, _ = planning_nodes(state, LATER, SETTINGS)
    assert [(g.index, [s.size_gb for s in g.slices]) for g in nodes[0].withdrawn] == [(0, [10])]


def test_a_gpu_whose_daemon_answers_again_is_carved_again() -> None:
    state = state_of(*ready_node("n", unhealthy(gpu_report(0, 40), "daemon down")), env(gated("a")))
    assert "default/a" in decided(state).plan.unplaced
    for envelope in synced("n", gpu_report(0, 40), at=LATER):
        state.apply(envelope)
    again = decided(state, LATER + timedelta(seconds=1))
    assert sizes(again.plan) == {"n": {0: "10f"}} and again.plan.placed["default/a"].gpu == 0


def test_a_gpu_in_mig_mode_is_not_in_any_layout() -> None:
    state = state_of(*ready_node("n", gpu_report(0, 40, mig=True), gpu_report(1, 40)), env(gated("a")))
    assert sizes(decided(state).plan) == {"n": {1: "10f"}}


def test_a_pod_goes_only_to_a_node_its_selector_and_tolerations_allow() -> None:
    a100 = NodeObserved(name="a100", labels={"gpu": "a100"}, allocatable={10: 1})
    tainted = NodeObserved(
        name="tainted",
        labels={"gpu": "a100"},
        allocatable={10: 1},
        taints=(Taint(key="x", effect="NoSchedule"),),
    )
    h100 = NodeObserved(name="h100", labels={"gpu": "h100"}, allocatable={10: 1})
    picky = gated("picky").model_copy(update={"rules": NodeRules(node_selector={"gpu": "a100"})})
    nowhere = gated("nowhere").model_copy(update={"rules": NodeRules(node_selector={"gpu": "b200"})})
    state = state_of(
        *(env(node) for node in (a100, tainted, h100)),
        *(env(report(name, gpu_report(0, 40, "10f"))) for name in ("h100", "tainted", "a100")),
        env(picky),
        env(nowhere),
        env(gated("anyone")),
    )
    decision = decided(state)
    assert decision.plan.placed["default/picky"].node == "a100"
    assert decision.plan.placed["default/anyone"].node == "h100"  # not the tainted node either
    assert decision.plan.unplaced["default/nowhere"] == (
        "no opted-in node that mpsflow plans on matches the pod's node selector, node affinity and "
        "tolerations"
    )
    assert released(decision) == {"default/picky": "a100", "default/anyone": "h100"}


def test_the_planner_keeps_back_the_memory_each_agent_reserves_for_mps() -> None:
    reserved = gpu_report(0, 40).model_copy(update={"reserved_mib": 1024})
    state = state_of(*ready_node("n", reserved), env(gated("a", 40)), env(gated("b", 39)))
    decision = decided(state)
    assert sizes(decision.plan) == {"n": {0: "39f"}}
    assert decision.plan.placed["default/b"].gpu == 0 and "default/a" in decision.plan.unplaced


def test_a_plan_decided_again_after_another_is_a_new_message_and_a_retry_is_not() -> None:
    """The cluster comes back to where it was (pod a deleted, then created again under the same
    name): the same plan is decided again and must reach the bus, which drops a message whose id it
    has seen; the same decision published twice (a retry) keeps its ids."""
    planner = Planner(SETTINGS)
    for envelope in ready_node("n", gpu_report(0, 40, "10f")):
        planner.observe(envelope)
    plans: list[tuple[str, str]] = []  # (plan id, message id)
    at = LATER
    for event in (gated("a"), deleted("a"), gated("a")):
        planner.observe(env(event, at))
        at += timedelta(seconds=1)
        step = planner.step(at)
        assert step.decision is not None
        assert messages_of(step.decision) == step.messages  # the same decision, the same ids
        [message] = [m for m in step.messages if m.subject == "mpsflow.plan"]
        plans.append((step.decision.plan.plan_id, message.message_id))
        planner.published(step)
    (first_plan, first_id), _, (again_plan, again_id) = plans
    assert first_plan == again_plan and first_id != again_id


def steps_until_decided(planner: Planner, at: datetime) -> PublishPlan:
    """Step at `at`, then at each moment the planner asks to be woken, until it decides."""
    for _ in range(5):
        step = planner.step(at)
        if step.decision is not None:
            planner.published(step)
            return step.decision
        assert step.wake_at is not None, "the planner would sleep until the next event"
        at = step.wake_at
    raise AssertionError("no decision after five wake-ups")


def test_a_pod_left_waiting_becomes_overdue_with_no_event_and_a_gpu_is_held_for_it() -> None:
    planner = Planner(SETTINGS)
    for envelope in ready_node("n", gpu_report(0, 40, "30u")):
        planner.observe(envelope)
    planner.observe(env(gated("large", 20), T0))  # fits nowhere: the GPU could offer 10 GiB
    planner.observe(env(gated("small", 5), T0 + MS))
    first = steps_until_decided(planner, LATER)
    assert set(first.plan.placed) == {"default/small"} and "default/large" in first.plan.unplaced
    idle = planner.step(LATER + MS)
    assert idle.decision is None and idle.wake_at == T0 + SETTINGS.hold_after  # large created at T0
    held = steps_until_decided(planner, idle.wake_at)
    assert held.plan.placed == {}
    assert "GPU 0 of node n is held for it" in held.plan.unplaced["default/large"]
    assert "held for default/large" in held.plan.unplaced["default/small"]
    assert [p.layout.sizes() for p in held.node_plans] == []  # n still applies the layout with small's slice
    after = planner.step(idle.wake_at + timedelta(seconds=1))
    assert after.decision is None and after.wake_at == T0 + SETTINGS.report_stale_after  # not before


def test_a_pod_without_host_ipc_goes_only_to_nodes_in_the_shm_directory_ipc_mode() -> None:
    isolated = gated("isolated").model_copy(update={"host_ipc": False})
    shared = gated("shared")
    host_mode = synced("host-node", gpu_report(0, 40, "10f"))
    shm_mode = [
        env(NodeObserved(name="shm-node", allocatable={10: 1})),
        env(report("shm-node", gpu_report(0, 40, "10f")).model_copy(update={"mps_ipc": "shm-directory"})),
    ]
    state = state_of(*host_mode, *shm_mode, env(isolated), env(shared))
    decision = decided(state)
    assert released(decision) == {"default/isolated": "shm-node", "default/shared": "host-node"}


def test_a_pod_without_host_ipc_and_no_node_in_the_shm_directory_mode_is_told_how_to_run() -> None:
    isolated = gated("isolated").model_copy(update={"host_ipc": False})
    state = state_of(*ready_node("n", gpu_report(0, 40, "10f")), env(isolated))
    reason = decided(state).plan.unplaced["default/isolated"]
    assert reason == (
        "no opted-in node that mpsflow plans on matches the pod's node selector, node affinity and "
        "tolerations and runs MPS in the shm-directory IPC mode, the only one for a pod without hostIPC: "
        "true (set it, or run the node agents with --mps-ipc shm-directory)"
    )


def test_among_pods_created_in_the_same_second_the_one_that_arrived_first_is_served_first() -> None:
    # Kubernetes keeps creation times to the second: by name, a would come first and take the slice
    # being carved for b, pushing b back to whatever change comes next.
    state = state_of(*ready_node("n", gpu_report(0, 10)), env(gated("b"), T0 + MS))
    first = decided(state)
    assert first.plan.placed["default/b"].node == "n"
    state.commit(first)
    state.apply(env(gated("a"), T0 + 2 * MS))
    second = decided(state, LATER)
    assert "default/b" in second.plan.placed and "default/a" in second.plan.unplaced


def test_a_pods_arrival_is_its_earliest_observation_whatever_order_they_come_in() -> None:
    early, late = env(gated("a"), T0 + MS), env(gated("a"), T0 + 5 * MS)
    assert state_of(early, late).first_seen == state_of(late, early).first_seen == {"default/a": T0 + MS}
    gone = state_of(early, env(deleted("a"), T0 + 6 * MS))
    assert gone.first_seen == {}
