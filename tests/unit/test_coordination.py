"""The coordination protocol, checked over interleavings: no pod ever fails because of mpsflow.

A small model of a cluster runs the real decision cores: the planner's `decide` and `commit`, the
node agent's `reconcile` and `gpu_report`. Around them, everything that races in a real cluster
is its own step, which Hypothesis interleaves at will:

- the bus delivers each message to the planner when it likes (one at a time, in order);
- the node agent applies the latest config in the bucket, and reports what the kubelet says;
- the kubelet takes in the plugin's device list when it likes (its list may lag the plugin's), and
  copies its device counts into the node's allocatable only on its status sync (which may lag
  further), and the scheduler binds from that allocatable and its own assumptions;
- admission is two steps, as in the kubelet: choosing a free device from its own list, then the
  plugin's Allocate for it;
- the pod watcher lifts the gate of a released pod, and pods finish;
- GPUs fail (a critical Xid error) and recover, at any moment: the agent marks slices as
  `node_agent.health` says, and the kubelet counts and gives out only Healthy ones.

Pods are created behind the scheduling gate, as the admission webhook makes them. The properties:
admission always finds a free device, Allocate never names a device the plugin no longer offers,
and once nothing is left to happen every pod runs or waits with a reason, with nothing more to
publish. (A pod that bypasses the gate is not covered: the scheduler may bind it from an
allocatable older than a reclaim, which is why the planner never reclaims a size such a pod waits
for; see the README.)
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from events.envelope import Envelope, Event
from events.nodes import NodeGpusReported, NodeObserved
from events.plans import NodeConfigApplied, NodeConfigFailed, NodeMpsConfig
from events.pods import PodDeleted, PodObserved, PodPhase, PodReleased
from node_agent.gpus import GpuReading
from node_agent.health import gpu_health, with_health
from node_agent.reconcile import Refused, SliceUsage, gpu_report, reconcile
from node_agent.slices import SliceDevice
from services.planner.core import state
from services.planner.core.state import BatchWindow, ClusterState, PlannerSettings, PublishPlan, decide

T0 = datetime(2026, 12, 1, tzinfo=UTC)
SETTINGS = PlannerSettings(
    window=BatchWindow(idle=timedelta(0), maximum=timedelta(0)), report_stale_after=timedelta(days=1)
)
SIZES = (1, 2, 4, 8)


class ProtocolViolationError(AssertionError):
    """Something a real cluster would have shown the user as a failed pod."""


@dataclass
class Pod:
    key: str
    uid: str
    size: int
    created: datetime
    gated: bool = True
    released_to: str | None = None
    node: str | None = None  # bound by the scheduler
    phase: PodPhase = "Pending"
    chosen: str | None = None  # the device the kubelet picked at admission, before Allocate

    def observed(self) -> PodObserved:
        namespace, name = self.key.split("/")
        return PodObserved(
            namespace=namespace,
            name=name,
            uid=self.uid,
            resource_version="1",
            size_gb=self.size,
            created=self.created,
            phase=self.phase,
            node=self.node,
            gated=self.gated,
            released_to=self.released_to,
        )


@dataclass
class Node:
    name: str
    gpus: list[GpuReading]
    # node agent and its device plugin
    offered: tuple[SliceDevice, ...] = ()
    allocated: dict[str, str] = field(default_factory=dict)  # device -> pod, as Allocate saw it
    config: NodeMpsConfig | None = None
    applied_config: NodeMpsConfig | None = None
    last_report: NodeGpusReported | None = None
    faults: dict[int, str] = field(default_factory=dict)  # GPU index -> its critical Xid error
    seen_in_use: frozenset[str] = frozenset()  # the slices held at the agent's last look
    # kubelet
    listed: dict[str, int] = field(default_factory=dict)  # device -> size, the kubelet's device list
    held: dict[str, str] = field(default_factory=dict)  # device -> pod, admitted containers
    allocatable: Counter[int] = field(default_factory=Counter)  # what the API (and scheduler) sees


@dataclass
class Cluster:
    nodes: dict[str, Node]
    pods: dict[str, Pod] = field(default_factory=dict)
    planner: ClusterState = field(default_factory=ClusterState)
    inbox: list[Event] = field(default_factory=list)  # on the bus, not yet delivered to the planner
    releases: list[PodReleased] = field(default_factory=list)  # for the pod watcher
    now: datetime = T0
    sequence: int = 0
    refused: int = 0

    def publish(self, event: Event) -> None:
        self.inbox.append(event)

    def tick(self) -> datetime:
        self.now += timedelta(milliseconds=10)
        return self.now

    # --- steps -------------------------------------------------------------------------------

    def create_pod(self, size: int) -> None:
        number = len(self.pods)
        pod = Pod(f"default/p{number}", f"uid-{number}", size, self.tick())
        self.pods[pod.key] = pod
        self.publish(pod.observed())

    def deliver(self) -> None:
        event = self.inbox.pop(0)
        self.sequence += 1
        self.planner.apply(Envelope(id=f"e{self.sequence}", time=self.tick(), source="bus", event=event))

    def plan(self) -> bool:
        """The planner decides; True when it published something."""
        decision = decide(self.planner, self.tick(), SETTINGS)
        if not isinstance(decision, PublishPlan):
            return False
        for planned in decision.node_plans:
            self.sequence += 1
            self.nodes[planned.node].config = NodeMpsConfig(
                node=planned.node,
                plan_id=planned.plan_id,
                plan_sequence=self.sequence,
                gpus=planned.layout.sizes(),
            )
        self.releases.extend(decision.releases)
        self.planner.commit(decision)
        return bool(decision.node_plans or decision.releases or decision.plan_is_new)

    def agent_apply(self, node: Node) -> None:
        desired = node.config
        assert desired is not None
        node.applied_config = desired
        outcome = reconcile(node.gpus, node.offered, self.usage(node).in_use, desired)
        if isinstance(outcome, Refused):
            self.refused += 1
            self.agent_report(node)
            self.publish(
                NodeConfigFailed(
                    node=node.name, plan_id=desired.plan_id, reason=outcome.reason, gpus=desired.gpus
                )
            )
            return
        node.offered = outcome.devices
        node.allocated = {d: pod for d, pod in node.allocated.items() if d in {x.id for x in node.offered}}
        self.agent_marks_health(node)
        self.agent_report(node)
        self.publish(NodeConfigApplied(node=node.name, plan_id=desired.plan_id, gpus=desired.gpus))

    def usage(self, node: Node) -> SliceUsage:
        """The agent's view: what the kubelet lists as held (with the pod), plus allocations it has
        not listed yet, and the offered devices the kubelet lists."""
        offered = {device.id for device in node.offered}
        in_use = frozenset(node.held) | {d for d, pod in node.allocated.items() if d not in node.held}
        return SliceUsage(in_use, dict(node.held), frozenset(offered & set(node.listed)))

    def agent_marks_health(self, node: Node) -> None:
        """The agent's look at usage: slices freed since its last look may turn Unhealthy."""
        in_use = self.usage(node).in_use
        freed, node.seen_in_use = node.seen_in_use - in_use, in_use
        answering = {gpu.index: True for gpu in node.gpus}
        node.offered = with_health(node.offered, freed, gpu_health(answering, answering, node.faults))

    def gpu_fails(self, node: Node, index: int) -> None:
        node.faults[index] = "Xid 79"
        self.agent_marks_health(node)

    def gpu_recovers(self, node: Node, index: int) -> None:
        node.faults.pop(index, None)
        self.agent_marks_health(node)

    def agent_report(self, node: Node) -> bool:
        """Report the node's slices when they changed since the last report (True then)."""
        self.agent_marks_health(node)
        healthy = {gpu.index: True for gpu in node.gpus}
        report = gpu_report(
            node.name, node.gpus, node.offered, self.usage(node), healthy, None, faults=node.faults
        )
        if report == node.last_report:
            return False
        node.last_report = report
        self.publish(report)
        return True

    def kubelet_takes_device_list(self, node: Node) -> None:
        """The kubelet's list: the Healthy devices, the only ones it counts and gives out."""
        node.listed = healthy_devices(node)

    def kubelet_syncs_status(self, node: Node) -> None:
        """The node-status sync: the API's allocatable follows the kubelet's list, and the pod
        watcher tells the planner."""
        node.allocatable = Counter(node.listed.values())
        self.publish(NodeObserved(name=node.name, allocatable=dict(node.allocatable)))

    def lift_gate(self) -> None:
        release = self.releases.pop(0)
        pod = self.pods.get(release.key)
        if pod is None or pod.uid != release.uid or not pod.gated:
            return
        pod.gated, pod.released_to = False, release.node
        self.publish(pod.observed())

    def schedule(self, pod: Pod) -> None:
        """Bind a released pod to its node if the allocatable the scheduler sees has room for it."""
        node = self.nodes[pod.released_to or ""]
        requested = sum(
            1
            for other in self.pods.values()
            if other.node == node.name and other.size == pod.size and other.phase in ("Pending", "Running")
        )
        if node.allocatable[pod.size] - requested >= 1:
            pod.node = node.name
            self.publish(pod.observed())

    def kubelet_chooses(self, pod: Pod) -> None:
        node = self.nodes[pod.node or ""]
        taken = set(node.held) | {p.chosen for p in self.pods.values() if p.node == node.name and p.chosen}
        free = sorted(d for d, size in node.listed.items() if size == pod.size and d not in taken)
        if not free:
            raise ProtocolViolationError(
                f"{pod.key} fails admission on {node.name}: no free {pod.size} GiB device"
            )
        pod.chosen = free[-1]  # any free device: the last, to differ from the planner's first-fit view

    def plugin_allocates(self, pod: Pod) -> None:
        node = self.nodes[pod.node or ""]
        device = pod.chosen or ""
        if device not in {d.id for d in node.offered}:
            raise ProtocolViolationError(f"{pod.key}: Allocate of {device} on {node.name}: NOT_FOUND")
        node.allocated[device] = pod.key
        node.held[device] = pod.key
        pod.chosen, pod.phase = None, "Running"
        self.publish(pod.observed())

    def finish(self, pod: Pod) -> None:
        node = self.nodes[pod.node or ""]
        for device in [d for d, holder in node.held.items() if holder == pod.key]:
            del node.held[device]
            node.allocated.pop(device, None)
        pod.phase = "Succeeded"
        self.publish(pod.observed())
        self.publish(PodDeleted(namespace="default", name=pod.key.split("/")[1], uid=pod.uid))

    # --- what may happen now ---------------------------------------------------------------------

    def enabled(self) -> list[tuple[str, object]]:
        steps: list[tuple[str, object]] = []
        if self.inbox:
            steps.append(("deliver", None))
        steps.append(("plan", None))
        if self.releases:
            steps.append(("lift_gate", None))
        for node in self.nodes.values():
            if node.config is not None and node.config is not node.applied_config:
                steps.append(("agent_apply", node))
            if node.listed != healthy_devices(node):
                steps.append(("kubelet_takes_device_list", node))
            if node.allocatable != Counter(node.listed.values()):
                steps.append(("kubelet_syncs_status", node))
            steps.append(("agent_report", node))
        for pod in self.pods.values():
            if pod.phase == "Pending" and pod.node is None and pod.released_to is not None:
                steps.append(("schedule", pod))
            if pod.phase == "Pending" and pod.node is not None and pod.chosen is None:
                steps.append(("kubelet_chooses", pod))
            if pod.chosen is not None:
                steps.append(("plugin_allocates", pod))
        return steps

    def run(self, step: str, target: object) -> None:
        getattr(self, step)(*(() if target is None else (target,)))

    def settle(self) -> None:
        """Run every step that changes something, fairly, until none does (pods do not finish)."""
        for _ in range(2_000):
            progress = False
            for step, target in self.enabled():
                if step == "plan":
                    progress = self.plan() or progress
                elif step == "agent_report":
                    assert isinstance(target, Node)
                    progress = self.agent_report(target) or progress
                elif step == "schedule":
                    assert isinstance(target, Pod)
                    before = target.node
                    self.schedule(target)
                    progress = progress or target.node != before
                else:
                    self.run(step, target)
                    progress = True
            if not progress:
                return
        raise AssertionError("the cluster never came to rest")


def healthy_devices(node: Node) -> dict[str, int]:
    return {device.id: device.size_gb for device in node.offered if device.healthy}


def gpu(index: int, gib: int) -> GpuReading:
    return GpuReading(
        index=index,
        uuid=f"GPU-{index}",
        model="NVIDIA-A100-SXM4-80GB",
        memory_total_mib=gib * 1024,
        memory_used_mib=0,
        compute_capability=(8, 0),
        mig_enabled=False,
        processes=(),
    )


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    count = draw(st.integers(1, 2))
    nodes = {}
    for n in range(count):
        name = f"node-{n}"
        nodes[name] = Node(
            name, [gpu(i, draw(st.sampled_from([8, 12, 16]))) for i in range(draw(st.integers(1, 2)))]
        )
    cluster = Cluster(nodes)
    for node in nodes.values():
        cluster.publish(NodeObserved(name=node.name))
        cluster.agent_report(node)
    return cluster


def play_then_settle(cluster: Cluster, data: st.DataObject, *, faults: bool = False) -> None:
    """Play an interleaving Hypothesis draws (with GPUs failing and recovering when `faults`), let
    the cluster come to rest, and check the properties."""
    for _ in range(data.draw(st.integers(10, 120), label="steps")):
        choice = data.draw(st.integers(0, 9), label="kind")
        if choice == 0 and len(cluster.pods) < 10:
            cluster.create_pod(data.draw(st.sampled_from(SIZES), label="size"))
            continue
        running = [pod for pod in cluster.pods.values() if pod.phase == "Running"]
        if choice == 1 and running:
            cluster.finish(data.draw(st.sampled_from(running), label="finishing"))
            continue
        if choice == 2 and faults:
            node = data.draw(st.sampled_from(list(cluster.nodes.values())), label="node")
            index = data.draw(st.sampled_from([gpu.index for gpu in node.gpus]), label="gpu")
            if index in node.faults:
                cluster.gpu_recovers(node, index)
            else:
                cluster.gpu_fails(node, index)
            continue
        step, target = data.draw(st.sampled_from(cluster.enabled()), label="step")
        cluster.run(step, target)

    cluster.settle()

    plan = decide(cluster.planner, cluster.tick(), SETTINGS)
    assert not isinstance(plan, PublishPlan) or not (plan.node_plans or plan.releases), plan
    reasons = cluster.planner.unplaced_published
    for pod in cluster.pods.values():
        if pod.phase == "Pending":
            assert pod.released_to is None, f"{pod.key} was released to {pod.released_to} but never bound"
            assert pod.uid in reasons, f"{pod.key} waits without a reason"
    assert cluster.refused <= len(cluster.pods)


@settings(
    max_examples=int(os.environ.get("MPSFLOW_PROPERTY_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(clusters(), st.data())
def test_no_interleaving_fails_a_pod_and_every_pod_ends_running_or_told_why(
    cluster: Cluster, data: st.DataObject
) -> None:
    play_then_settle(cluster, data)


@settings(
    max_examples=int(os.environ.get("MPSFLOW_PROPERTY_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(clusters(), st.data())
def test_gpus_failing_and_recovering_at_any_moment_fail_no_pod_and_strand_none(
    cluster: Cluster, data: st.DataObject
) -> None:
    """The same properties while GPUs fail and recover: a pod may wait for a healthy GPU, but none
    fails admission, and none released to a node is left unable to bind there."""
    play_then_settle(cluster, data, faults=True)


def reclaim_racing_admission(cluster: Cluster) -> Pod:
    """A 1 GiB pod is bound and its kubelet has chosen one of two free 1 GiB slices, but not called
    Allocate yet, when a 2 GiB pod arrives that fits only by reclaiming a free 1 GiB slice."""
    node = cluster.nodes["n"]
    cluster.create_pod(4)
    cluster.settle()
    cluster.create_pod(1)
    cluster.create_pod(1)
    cluster.settle()
    for pod in list(cluster.pods.values())[1:]:
        cluster.finish(pod)
    cluster.settle()
    assert sorted(d.size_gb for d in node.offered) == [1, 1, 4]
    cluster.create_pod(1)
    small = cluster.pods["default/p3"]
    while cluster.inbox:
        cluster.deliver()
    cluster.plan()
    cluster.lift_gate()
    cluster.schedule(small)
    assert small.node == "n" and small.phase == "Pending"
    cluster.kubelet_chooses(small)  # the last free 1 GiB slice, where the planner counts the first
    cluster.create_pod(2)
    while cluster.inbox:
        cluster.deliver()
    cluster.plan()
    if node.config is not node.applied_config:
        cluster.agent_apply(node)
    cluster.plugin_allocates(small)
    cluster.settle()
    return small


def test_a_reclaim_never_races_the_kubelet_giving_a_bound_pod_a_slice() -> None:
    """The planner reclaims a free slice of a size a bound pod may be given only once the report
    names the slice that pod got."""
    cluster = Cluster({"n": Node("n", [gpu(0, 7)])})
    cluster.publish(NodeObserved(name="n"))
    cluster.agent_report(cluster.nodes["n"])
    small = reclaim_racing_admission(cluster)
    # The 2 GiB pod waited until the report named the slice the small pod got; then the other free
    # 1 GiB slice was reclaimed for it.
    assert small.phase == "Running" and cluster.pods["default/p4"].phase == "Running"


def test_without_its_protection_the_planner_would_fail_that_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """The model catches what the protection prevents: a planner that reclaims a free slice of a size
    a bound pod the report does not name yet may be given fails that pod at Allocate."""
    protected = state.planning_nodes

    def unprotected(*args: Any) -> Any:
        nodes, never, pinned = protected(*args)
        return [replace(node, protected=frozenset()) for node in nodes], never, pinned

    monkeypatch.setattr(state, "planning_nodes", unprotected)
    cluster = Cluster({"n": Node("n", [gpu(0, 7)])})
    cluster.publish(NodeObserved(name="n"))
    cluster.agent_report(cluster.nodes["n"])
    with pytest.raises(ProtocolViolationError, match="NOT_FOUND"):
        reclaim_racing_admission(cluster)
