"""The pod watcher against the Kubernetes API emulator (real kubernetes_asyncio client, real HTTP)
and the in-memory bus.

Nodes and pods written through the API become events on the bus; rejected and unplaced pods get
exactly one Kubernetes Event; dropped watches, expired history and API errors are survived. The
opt-in label and the MPS client rules come from `WatcherSettings`, which the command line builds.

The bus is `MemoryBroker`, held to the same contract as JetStream (tests/contract), on the real
clock: the API emulator is real I/O. What the watcher published is read from the broker's store
(`MemoryLog`), and a message it consumes counts as handled once the broker has it settled.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import pytest
from kubernetes_asyncio import client

from events import subjects
from events.base import Model
from events.envelope import Event
from events.memory import MemoryBroker, MemoryBus
from events.nodes import GfdFacts, NodeObserved, NodeOptedOut, SliceOverused
from events.pods import PodDeleted, PodObserved, PodRejected, PodReleased, PodUnplaced
from events.vocabulary import RELEASED_TO_ANNOTATION, SLICE_GATE, OptInLabel, PodEventReason, RejectionRule
from services.cli import build_parser
from services.kit import watching as kit_watching
from services.kit.kube import api_client
from services.kit.watching import Listing, list_and_watch
from services.planner.core.state import ClusterState
from services.pod_watcher.service import (
    DEFAULT_SETTINGS,
    OVERUSE_DURABLE,
    RELEASE_DURABLE,
    UNPLACED_DURABLE,
    PodWatcherService,
    WatcherSettings,
)
from services.pod_watcher.translate import MpsClientRules
from simulation.apiserver import ApiServer
from tests.memorybus import MemoryLog
from tests.support import WAIT_S, eventually

pytestmark = pytest.mark.anyio

NAMESPACE = "default"
OPT_IN = "nos.nebuly.com/gpu-partitioning"
WAIT = 2.5

E = TypeVar("E", bound=Model)
P = TypeVar("P", PodObserved, PodRejected, PodDeleted)


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
def bus(broker: MemoryBroker) -> MemoryBus:
    return broker.bus("tests")


@pytest.fixture
async def apiserver() -> AsyncIterator[ApiServer]:
    async with ApiServer(bookmark_interval=0.05) as server:
        yield server


@pytest.fixture
async def api(apiserver: ApiServer) -> AsyncIterator[client.ApiClient]:
    """The client the pod watcher uses."""
    watcher_client = await api_client(apiserver.url, "pod-watcher-token")
    try:
        yield watcher_client
    finally:
        await watcher_client.close()


@pytest.fixture
async def core(apiserver: ApiServer) -> AsyncIterator[Any]:
    """A separate client for the test's own writes and reads (the cluster's users)."""
    user_client = await api_client(apiserver.url, "user-token")
    try:
        yield client.CoreV1Api(user_client)
    finally:
        await user_client.close()


def gpu_node(
    name: str, *, memory_mib: int = 81920, opt_in_key: str = OPT_IN, opt_in_value: str = "mps"
) -> Any:
    labels = {
        opt_in_key: opt_in_value,
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
        "nvidia.com/gpu.count": "2",
        "nvidia.com/gpu.memory": str(memory_mib),
    }
    return client.V1Node(metadata=client.V1ObjectMeta(name=name, labels=labels))


def slice_pod(
    name: str,
    resource: str = "nvidia.com/gpu-10gb",
    quantity: str = "1",
    *,
    host_ipc: bool = True,
    user: int | None = None,
    gated: bool = False,
) -> Any:
    resources = client.V1ResourceRequirements(limits={resource: quantity})
    container = client.V1Container(name="main", image="busybox", resources=resources)
    security = client.V1PodSecurityContext(run_as_user=user) if user is not None else None
    gates = [client.V1PodSchedulingGate(name=SLICE_GATE)] if gated else None
    spec = client.V1PodSpec(
        containers=[container], host_ipc=host_ipc, security_context=security, scheduling_gates=gates
    )
    return client.V1Pod(metadata=client.V1ObjectMeta(name=name), spec=spec)


def plain_pod(name: str) -> Any:
    container = client.V1Container(name="main", image="busybox")
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name), spec=client.V1PodSpec(containers=[container])
    )


class WatcherLog(MemoryLog):
    """What the broker stored, waited for on the real clock."""

    async def wait_for(
        self, kind: type[E], where: Callable[[E], bool] = lambda _: True, within: float = WAIT_S
    ) -> E:
        return await super().wait_for(kind, where, within)

    async def until(self, condition: Callable[[], bool], within: float = WAIT_S) -> None:
        """Until `condition` of what is stored holds, checked again at every store."""
        with anyio.fail_after(within):
            while not condition():
                await self.broker.next_store()

    async def pod(self, kind: type[P], name: str) -> P:
        return await self.wait_for(kind, lambda event: event.name == name)

    def of_pod(self, name: str) -> list[Event]:
        return self.on(subjects.pod_subject(NAMESPACE, name))

    def of_node(self, name: str) -> list[Event]:
        return self.on(subjects.node_subject(name))


@pytest.fixture
def log(broker: MemoryBroker) -> WatcherLog:
    return WatcherLog(broker)


@asynccontextmanager
async def watching(
    bus: MemoryBus, api: client.ApiClient, settings: WatcherSettings = DEFAULT_SETTINGS
) -> AsyncIterator[PodWatcherService]:
    """The pod watcher running in a task group."""
    service = PodWatcherService(bus, api, settings)
    async with anyio.create_task_group() as group:
        group.start_soon(service.run)
        yield service
        group.cancel_scope.cancel()


async def pod_events(core: Any, pod_name: str) -> list[Any]:
    listed = await core.list_namespaced_event(NAMESPACE, field_selector=f"involvedObject.name={pod_name}")
    return list(listed.items)


async def wait_for_events(core: Any, pod_name: str) -> list[Any]:
    """The Kubernetes Events of a pod, once there is at least one."""
    found: list[Any] = []

    async def posted() -> bool:
        found[:] = await pod_events(core, pod_name)
        return bool(found)

    await eventually(posted, f"a Kubernetes Event of pod {pod_name}", WAIT)
    return found


async def handled(bus: MemoryBus, sequence: int, durable: str = UNPLACED_DURABLE) -> None:
    """Until the consumer `durable` has acked (or terminated) every message up to stream `sequence`."""
    await eventually(
        lambda: bus.broker.settled(durable, sequence),
        f"{durable} to settle up to stream sequence {sequence}",
        WAIT,
    )


async def caught_up(core: Any, log: WatcherLog) -> None:
    """Until the watcher has handled every change made so far: it handles node changes one by one
    and pod changes one by one, so a node and a pod created now, once observed, prove it. (The
    node is no larger than the tests' others, so it re-checks no pod.)"""
    await core.create_node(gpu_node("marker-node"))
    await core.create_namespaced_pod(NAMESPACE, slice_pod("marker-pod"))
    await log.wait_for(NodeObserved, lambda e: e.name == "marker-node")
    await log.pod(PodObserved, "marker-pod")


async def wait_watching(apiserver: ApiServer, resource: str) -> None:
    """Until the pod watcher has opened a watch of `resource` (a watch is registered as it is logged)."""
    await eventually(lambda: verbs_on(apiserver, "watch", resource) >= 1, f"a watch of {resource}", WAIT)


def verbs_on(apiserver: ApiServer, verb: str, resource: str, identity: str = "pod-watcher-token") -> int:
    return sum(
        1
        for record in apiserver.request_log
        if (record.verb, record.resource, record.identity) == (verb, resource, identity)
    )


# --- nodes and pods become events ---------------------------------------------------------------


async def test_nodes_and_pods_become_events_on_the_bus(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("a100-1.example.com"))
    await core.create_node(gpu_node("legacy", memory_mib=40960, opt_in_key="nos.nebuly.ai/gpu-partitioning"))
    await core.create_node(client.V1Node(metadata=client.V1ObjectMeta(name="cpu-only")))
    await core.create_namespaced_pod(NAMESPACE, slice_pod("before-start"))
    await core.create_namespaced_pod(NAMESPACE, plain_pod("web"))

    async with watching(bus, api):
        listed = await log.pod(PodObserved, "before-start")
        await core.create_namespaced_pod(NAMESPACE, slice_pod("after-start", "nvidia.com/gpu-20gb"))
        watched = await log.pod(PodObserved, "after-start")
        await caught_up(core, log)

    assert log.of_node("a100-1.example.com") == [
        NodeObserved(
            name="a100-1.example.com",
            gfd=GfdFacts(product="NVIDIA-A100-SXM4-80GB", count=2, memory_mib=81920),
            labels={
                "nos.nebuly.com/gpu-partitioning": "mps",
                "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB",
                "nvidia.com/gpu.count": "2",
                "nvidia.com/gpu.memory": "81920",
            },
        )
    ]
    assert [type(e) for e in log.of_node("legacy")] == [NodeObserved]
    assert log.of_node("cpu-only") == []
    assert log.of_pod("web") == []
    stored = {
        p["metadata"]["name"]: p for p in (await core.list_namespaced_pod(NAMESPACE)).to_dict()["items"]
    }
    assert (listed.size_gb, listed.phase, listed.node) == (10, "Pending", None)
    assert listed.uid == stored["before-start"]["metadata"]["uid"]
    assert watched.size_gb == 20
    assert watched.resource_version == stored["after-start"]["metadata"]["resource_version"]
    assert len(log.of_pod("before-start")) == 1
    assert len(log.of_pod("after-start")) == 1


async def test_a_pod_change_is_published_as_the_new_level(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("a100-1"))
    async with watching(bus, api):
        await core.create_namespaced_pod(NAMESPACE, slice_pod("job"))
        await log.pod(PodObserved, "job")
        await core.patch_namespaced_pod_status("job", NAMESPACE, {"status": {"phase": "Running"}})
        running = await log.wait_for(PodObserved, lambda e: e.phase == "Running")
        await core.delete_namespaced_pod("job", NAMESPACE)
        await log.pod(PodDeleted, "job")

    assert running.name == "job"
    assert [type(e) for e in log.of_pod("job")] == [PodObserved, PodObserved, PodDeleted]


async def test_a_rejected_pod_gets_exactly_one_kubernetes_event(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any, apiserver: ApiServer
) -> None:
    await core.create_node(gpu_node("a100-1"))
    async with watching(bus, api):
        await core.create_namespaced_pod(NAMESPACE, slice_pod("greedy", "nvidia.com/gpu-10gb", "2"))
        rejection = await log.pod(PodRejected, "greedy")
        first = await wait_for_events(core, "greedy")
        # a change of the pod is a new level, published again; the Event must not be posted twice
        await core.patch_namespaced_pod("greedy", NAMESPACE, {"metadata": {"labels": {"touched": "yes"}}})
        await log.wait_for(PodRejected, lambda e: e.resource_version != rejection.resource_version)
        # pod changes are handled one by one: a later pod observed proves the watcher is done with greedy
        await core.create_namespaced_pod(NAMESPACE, slice_pod("later"))
        await log.pod(PodObserved, "later")
        events = await pod_events(core, "greedy")

    assert rejection.reason == RejectionRule.QUANTITY_NOT_ONE
    assert len(first) == 1
    assert len(events) == 1
    event = events[0]
    assert (event.reason, event.type, event.message) == (
        RejectionRule.QUANTITY_NOT_ONE,
        "Warning",
        rejection.message,
    )
    assert (event.involved_object.kind, event.involved_object.name, event.involved_object.uid) == (
        "Pod",
        "greedy",
        rejection.uid,
    )
    assert event.source.component == "mpsflow-pod-watcher"
    assert verbs_on(apiserver, "create", "events") == 2  # the second answered 409


async def test_a_pod_larger_than_every_gpu_is_rejected(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("small", memory_mib=16384))
    async with watching(bus, api):
        await core.create_namespaced_pod(NAMESPACE, slice_pod("huge", "nvidia.com/gpu-40gb"))
        rejection = await log.pod(PodRejected, "huge")
        events = await wait_for_events(core, "huge")

    assert rejection.reason == RejectionRule.TOO_LARGE
    assert "16 GiB" in rejection.message
    assert [e.reason for e in events] == [RejectionRule.TOO_LARGE]


async def test_a_too_large_pod_is_accepted_once_a_large_enough_gpu_opts_in(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("small", memory_mib=16384))
    async with watching(bus, api):
        await core.create_namespaced_pod(NAMESPACE, slice_pod("huge", "nvidia.com/gpu-40gb"))
        await log.pod(PodRejected, "huge")
        await core.create_node(gpu_node("big", memory_mib=81920))
        await log.wait_for(NodeObserved, lambda e: e.name == "big")
        accepted = await log.wait_for(PodObserved, lambda e: e.name == "huge", within=1.5)

    assert accepted.size_gb == 40


async def test_removing_the_opt_in_label_publishes_node_opted_out(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("a100-1"))
    await core.create_node(gpu_node("a100-2"))
    async with watching(bus, api):
        await log.wait_for(NodeObserved, lambda e: e.name == "a100-2")
        await core.patch_node("a100-1", {"metadata": {"labels": {OPT_IN: None}}})
        opted_out = await log.wait_for(NodeOptedOut, lambda e: e.name == "a100-1")
        await core.patch_node("a100-2", {"spec": {"unschedulable": True}})
        cordoned = await log.wait_for(NodeObserved, lambda e: e.unschedulable)
        await core.delete_node("a100-2")
        gone = await log.wait_for(NodeOptedOut, lambda e: e.name == "a100-2")
        # a node that is not opted in any more changes without a word; node changes are handled one
        # by one, so a later node observed proves the watcher is done with this change
        await core.patch_node("a100-1", {"metadata": {"labels": {"other": "x"}}})
        await core.create_node(gpu_node("a100-3"))
        await log.wait_for(NodeObserved, lambda e: e.name == "a100-3")

    assert opted_out == NodeOptedOut(name="a100-1", reason="opt-in label removed")
    assert cordoned.name == "a100-2"
    assert gone == NodeOptedOut(name="a100-2", reason="the node is gone")
    assert [type(e) for e in log.of_node("a100-1")] == [NodeObserved, NodeOptedOut]


async def test_a_node_that_opts_out_and_in_again_is_observed_again(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("a100-1"))
    async with watching(bus, api):
        first = await log.wait_for(NodeObserved, lambda e: e.name == "a100-1")
        await core.patch_node("a100-1", {"metadata": {"labels": {OPT_IN: None}}})
        await log.wait_for(NodeOptedOut, lambda e: e.name == "a100-1")
        await core.patch_node("a100-1", {"metadata": {"labels": {OPT_IN: "mps"}}})
        await log.until(lambda: len(log.of_node("a100-1")) >= 3)

    # Said in the same words as the first time, and still stored: not dropped as a duplicate.
    assert [type(e) for e in log.of_node("a100-1")] == [NodeObserved, NodeOptedOut, NodeObserved]
    assert log.of_node("a100-1")[2] == first


async def test_the_watcher_uses_its_configured_opt_in_label(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    settings = WatcherSettings(opt_in=OptInLabel("example.com/mps", "on"))
    await core.create_node(gpu_node("custom", opt_in_key="example.com/mps", opt_in_value="on"))
    await core.create_node(gpu_node("nos-labelled"))
    async with watching(bus, api, settings):
        await log.wait_for(NodeObserved, lambda e: e.name == "custom")
        await core.patch_node("custom", {"metadata": {"labels": {"example.com/mps": "off"}}})
        # a watch event, so published after everything the first list published
        opted_out = await log.wait_for(NodeOptedOut, lambda e: e.name == "custom")

    assert opted_out.reason == "opt-in label removed"
    assert log.of_node("nos-labelled") == []


async def test_a_pod_that_cannot_be_an_mps_client_gets_a_warning_event(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    settings = WatcherSettings(client_rules=MpsClientRules(mps_user=1000))
    await core.create_node(gpu_node("a100-1"))
    async with watching(bus, api, settings):
        await core.create_namespaced_pod(NAMESPACE, slice_pod("isolated", host_ipc=False, user=1000))
        await core.create_namespaced_pod(NAMESPACE, slice_pod("root", user=0))
        await core.create_namespaced_pod(NAMESPACE, slice_pod("client", user=1000))
        isolated = await log.pod(PodRejected, "isolated")
        root = await log.pod(PodRejected, "root")
        client_pod = await log.pod(PodObserved, "client")
        isolated_events = await wait_for_events(core, "isolated")
        root_events = await wait_for_events(core, "root")

    assert (isolated.reason, root.reason) == (RejectionRule.HOST_IPC_REQUIRED, RejectionRule.USER_MISMATCH)
    assert "hostIPC false" in isolated.message
    assert "user 0" in root.message
    assert [(e.reason, e.type, e.message) for e in isolated_events + root_events] == [
        (RejectionRule.HOST_IPC_REQUIRED, "Warning", isolated.message),
        (RejectionRule.USER_MISMATCH, "Warning", root.message),
    ]
    assert client_pod.size_gb == 10


# --- resilience ---------------------------------------------------------------------------------


async def test_after_a_dropped_watch_later_changes_arrive_once(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any, apiserver: ApiServer
) -> None:
    await core.create_node(gpu_node("a100-1"))
    async with watching(bus, api):
        await wait_watching(apiserver, "pods")
        await core.create_namespaced_pod(NAMESPACE, slice_pod("first"))
        await log.pod(PodObserved, "first")
        await core.create_namespaced_pod(NAMESPACE, slice_pod("bad", "nvidia.com/gpu-0gb"))
        await log.pod(PodRejected, "bad")
        watches_before = verbs_on(apiserver, "watch", "pods")

        apiserver.drop_watches()
        await core.create_namespaced_pod(NAMESPACE, slice_pod("second"))
        await core.create_node(gpu_node("a100-2"))
        await log.pod(PodObserved, "second")
        await log.wait_for(NodeObserved, lambda e: e.name == "a100-2")
        await caught_up(core, log)
        bad_events = await pod_events(core, "bad")

    assert verbs_on(apiserver, "watch", "pods") > watches_before
    assert verbs_on(apiserver, "list", "pods") == 1  # resumed, not relisted
    assert [type(e) for e in log.of_pod("first")] == [PodObserved]
    assert [type(e) for e in log.of_pod("second")] == [PodObserved]
    assert [type(e) for e in log.of_pod("bad")] == [PodRejected]
    assert [type(e) for e in log.of_node("a100-1")] == [NodeObserved]
    assert len(bad_events) == 1


async def test_after_expired_history_a_pod_deleted_meanwhile_is_published_deleted(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any, apiserver: ApiServer
) -> None:
    await core.create_node(gpu_node("a100-1"))
    async with watching(bus, api):
        await wait_watching(apiserver, "pods")
        await core.create_namespaced_pod(NAMESPACE, slice_pod("doomed"))
        await core.create_namespaced_pod(NAMESPACE, slice_pod("survivor"))
        observed = await log.pod(PodObserved, "doomed")
        await log.pod(PodObserved, "survivor")

        # all while the watcher waits to reconnect (its first backoff is 0.2 s): a write it cannot
        # have seen, so that its last resourceVersion is older than what the API still remembers
        apiserver.drop_watches()
        await core.create_namespaced_config_map(
            NAMESPACE, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="x"))
        )
        apiserver.expire_history()
        await core.delete_namespaced_pod("doomed", NAMESPACE)
        deleted = await log.pod(PodDeleted, "doomed")
        await core.create_namespaced_pod(NAMESPACE, slice_pod("later"))
        await log.pod(PodObserved, "later")
        await caught_up(core, log)

    assert verbs_on(apiserver, "list", "pods") == 2  # the 410 led to a relist
    assert deleted == PodDeleted(namespace=NAMESPACE, name="doomed", uid=observed.uid)
    assert [type(e) for e in log.of_pod("doomed")] == [PodObserved, PodDeleted]
    assert [type(e) for e in log.of_pod("survivor")] == [PodObserved]


async def test_a_restarted_watcher_publishes_the_deletion_of_a_pod_deleted_while_it_was_down(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("a100-1"))
    await core.create_namespaced_pod(NAMESPACE, slice_pod("short-lived"))
    async with watching(bus, api):
        await log.pod(PodObserved, "short-lived")
    await core.delete_namespaced_pod("short-lived", NAMESPACE)
    async with watching(bus, api):
        deleted = await log.pod(PodDeleted, "short-lived")
    assert deleted.name == "short-lived"


async def test_a_pod_that_finishes_is_published_deleted_and_the_planner_frees_its_node(
    bus: MemoryBus, broker: MemoryBroker, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("a100-1"))
    for name in ("done-before", "job"):
        await core.create_namespaced_pod(NAMESPACE, slice_pod(name))
        target = client.V1ObjectReference(kind="Node", name="a100-1")
        binding = client.V1Binding(metadata=client.V1ObjectMeta(name=name), target=target)
        await core.create_namespaced_pod_binding(name, NAMESPACE, binding, _preload_content=False)
    await core.patch_namespaced_pod_status("done-before", NAMESPACE, {"status": {"phase": "Succeeded"}})
    await core.patch_namespaced_pod_status("job", NAMESPACE, {"status": {"phase": "Running"}})

    async with watching(bus, api):
        running = await log.pod(PodObserved, "job")
        # It leaves the watch's selection: the watch says DELETED, with the pod as it now is.
        await core.patch_namespaced_pod_status("job", NAMESPACE, {"status": {"phase": "Succeeded"}})
        finished = await log.pod(PodDeleted, "job")
        await caught_up(core, log)

    assert log.of_pod("done-before") == []  # finished before the list: never read
    assert (running.phase, running.node) == ("Running", "a100-1")
    assert finished == PodDeleted(namespace=NAMESPACE, name="job", uid=running.uid)
    # What the planner makes of the pod's subject: a slice of a100-1 held, then none, nothing waiting.
    state = ClusterState()
    envelopes = [m.envelope() for m in broker.stored() if m.subject == subjects.pod_subject(NAMESPACE, "job")]
    holders = []
    for envelope in envelopes:
        assert envelope is not None
        state.apply(envelope)
        holders.append({node: [pod.name for pod in pods] for node, pods in state.holders().items()})
    assert holders == [{"a100-1": ["job"]}, {}]
    assert state.waiting() == []


async def test_a_restarted_watcher_publishes_the_deletion_of_a_pod_that_finished_while_it_was_down(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("a100-1"))
    await core.create_namespaced_pod(NAMESPACE, slice_pod("batch"))
    async with watching(bus, api):
        observed = await log.pod(PodObserved, "batch")
    await core.patch_namespaced_pod_status("batch", NAMESPACE, {"status": {"phase": "Failed"}})
    async with watching(bus, api):
        deleted = await log.pod(PodDeleted, "batch")

    assert deleted == PodDeleted(namespace=NAMESPACE, name="batch", uid=observed.uid)


async def test_a_failed_first_list_is_retried_with_backoff(
    bus: MemoryBus,
    log: WatcherLog,
    api: client.ApiClient,
    core: Any,
    apiserver: ApiServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await core.create_node(gpu_node("a100-1"))
    await core.create_namespaced_pod(NAMESPACE, slice_pod("waiting"))
    apiserver.fail_next("list", "pods", 500)

    with caplog.at_level(logging.WARNING, logger="services.kit.retry"):
        async with watching(bus, api):
            started = anyio.current_time()
            await log.pod(PodObserved, "waiting")
            elapsed = anyio.current_time() - started

    assert verbs_on(apiserver, "list", "pods") == 2
    assert elapsed >= 0.2  # the first backoff
    assert any("API error 500" in record.getMessage() for record in caplog.records)


async def test_a_failed_node_list_delays_the_pods_until_nodes_are_known(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any, apiserver: ApiServer
) -> None:
    await core.create_node(gpu_node("small", memory_mib=8192))
    await core.create_namespaced_pod(NAMESPACE, slice_pod("big", "nvidia.com/gpu-20gb"))
    apiserver.fail_next("list", "nodes", 503)

    async with watching(bus, api):
        rejection = await log.pod(PodRejected, "big")

    assert rejection.reason == RejectionRule.TOO_LARGE
    assert verbs_on(apiserver, "list", "nodes") == 2


async def test_a_failed_event_post_does_not_stop_the_watcher(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any, apiserver: ApiServer
) -> None:
    await core.create_node(gpu_node("a100-1"))
    async with watching(bus, api):
        await wait_watching(apiserver, "pods")
        apiserver.fail_next("create", "events", 500)
        await core.create_namespaced_pod(NAMESPACE, slice_pod("bad", "nvidia.com/gpu-0gb"))
        await log.pod(PodRejected, "bad")
        await core.create_namespaced_pod(NAMESPACE, slice_pod("next"))
        await log.pod(PodObserved, "next")
        events = await wait_for_events(core, "bad")

    assert [e.reason for e in events] == [RejectionRule.ZERO_SIZE]


# --- unplaced pods ------------------------------------------------------------------------------


async def test_an_unplaced_pod_gets_one_event_even_when_published_twice(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("a100-1"))
    created = await core.create_namespaced_pod(NAMESPACE, slice_pod("queued", "nvidia.com/gpu-80gb"))
    unplaced = PodUnplaced(
        namespace=NAMESPACE, name="queued", uid=created.metadata.uid, reason="every GPU is full"
    )
    subject = subjects.unplaced_subject(NAMESPACE, "queued")

    async with watching(bus, api):
        await log.pod(PodObserved, "queued")
        await bus.publish(subject, unplaced, message_id="unplaced-1")
        first = await wait_for_events(core, "queued")
        second_seq = await bus.publish(subject, unplaced, message_id="unplaced-2")
        await handled(bus, second_seq)
        events = await pod_events(core, "queued")

    assert len(first) == 1
    assert len(events) == 1
    event = events[0]
    assert (event.reason, event.type, event.message) == (
        PodEventReason.NOT_PLACED,
        "Normal",
        "every GPU is full",
    )
    assert event.involved_object.uid == created.metadata.uid
    assert event.reason == "MpsSliceNotPlaced"  # the reason users filter on: part of the interface


async def test_a_pod_whose_processes_overuse_its_slice_gets_a_warning_event_once_per_reading(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any
) -> None:
    await core.create_node(gpu_node("a100-1"))
    created = await core.create_namespaced_pod(NAMESPACE, slice_pod("greedy", "nvidia.com/gpu-10gb"))
    overuse = SliceOverused(
        node="a100-1",
        namespace=NAMESPACE,
        name="greedy",
        slice_id="mps-g1-10gb-0",
        gpu_index=1,
        size_gb=10,
        used_mib=12800,
        pids=(4242, 4243),
    )
    subject = subjects.overuse_subject("a100-1", NAMESPACE, "greedy")

    async with watching(bus, api):
        await log.pod(PodObserved, "greedy")
        await bus.publish(subject, overuse, message_id="overuse-1")
        await wait_for_events(core, "greedy")
        again = await bus.publish(
            subject, overuse, message_id="overuse-2"
        )  # redelivered, or an agent restart
        await handled(bus, again, OVERUSE_DURABLE)
        # Told of a pod it does not know, the watcher tells nobody and moves on.
        stranger = overuse.model_copy(update={"name": "stranger"})
        last = await bus.publish(
            subjects.overuse_subject("a100-1", NAMESPACE, "stranger"), stranger, message_id="o-3"
        )
        await handled(bus, last, OVERUSE_DURABLE)
        events = await pod_events(core, "greedy")

    assert len(events) == 1
    event = events[0]
    assert (event.reason, event.type, event.involved_object.uid) == (
        "MpsSliceOverused",
        "Warning",
        created.metadata.uid,
    )
    assert event.message.startswith(
        "its processes (4242, 4243) use 12800 MiB of GPU 1 on node a100-1, more than its 10 GiB slice "
        "(10240 MiB)"
    )
    assert await pod_events(core, "stranger") == []


async def test_a_failed_unplaced_event_post_is_retried(
    bus: MemoryBus, api: client.ApiClient, core: Any, apiserver: ApiServer
) -> None:
    await core.create_node(gpu_node("a100-1"))
    created = await core.create_namespaced_pod(NAMESPACE, slice_pod("queued"))
    unplaced = PodUnplaced(namespace=NAMESPACE, name="queued", uid=created.metadata.uid, reason="no room")

    async with watching(bus, api):
        await wait_watching(apiserver, "pods")
        apiserver.fail_next("create", "events", 503)
        await bus.publish(subjects.unplaced_subject(NAMESPACE, "queued"), unplaced)
        events = await wait_for_events(core, "queued")

    assert [(e.reason, e.message) for e in events] == [(PodEventReason.NOT_PLACED, "no room")]
    assert verbs_on(apiserver, "create", "events") == 2
    assert await bus.dead_letters(UNPLACED_DURABLE) == []


# --- releasing gated pods -----------------------------------------------------------------------


def released(pod: Any, node: str = "a100-1") -> PodReleased:
    return PodReleased(
        namespace=NAMESPACE, name=pod.metadata.name, uid=pod.metadata.uid, node=node, size_gb=10, plan_id="p"
    )


async def test_a_released_pod_loses_the_gate_is_pinned_to_its_node_and_told_why(
    bus: MemoryBus, log: WatcherLog, api: client.ApiClient, core: Any, apiserver: ApiServer
) -> None:
    await core.create_node(gpu_node("a100-1"))
    created = await core.create_namespaced_pod(NAMESPACE, slice_pod("job", gated=True))

    async with watching(bus, api):
        held = await log.pod(PodObserved, "job")
        await bus.publish(subjects.release_subject(NAMESPACE, "job"), released(created))
        free = await log.wait_for(PodObserved, lambda e: e.name == "job" and e.released_to == "a100-1")
        events = await wait_for_events(core, "job")

    assert (held.gated, held.released_to) == (True, None)
    assert (free.gated, free.released_to, free.waits_for_slice, free.holds_slice) == (
        False,
        "a100-1",
        False,
        True,
    )
    [pod] = apiserver.objects("pods")
    assert "schedulingGates" not in pod["spec"]
    assert pod["metadata"]["annotations"] == {RELEASED_TO_ANNOTATION: "a100-1"}
    terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert terms == {
        "nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["a100-1"]}]}
        ]
    }
    assert [(e.reason, e.type) for e in events] == [(PodEventReason.READY, "Normal")]
    assert "a 10 GiB MPS slice is ready on node a100-1" in events[0].message


async def test_a_release_meant_for_another_pod_or_said_twice_changes_nothing_more(
    bus: MemoryBus, api: client.ApiClient, core: Any, apiserver: ApiServer
) -> None:
    await core.create_node(gpu_node("a100-1"))
    created = await core.create_namespaced_pod(NAMESPACE, slice_pod("job", gated=True))
    subject = subjects.release_subject(NAMESPACE, "job")
    stale = released(created).model_copy(update={"uid": "an-older-pod-of-that-name"})

    async with watching(bus, api):
        await wait_watching(apiserver, "pods")
        await handled(bus, await bus.publish(subject, stale), RELEASE_DURABLE)
        assert apiserver.objects("pods")[0]["spec"]["schedulingGates"] == [{"name": SLICE_GATE}]
        await handled(bus, await bus.publish(subject, released(created), message_id="first"), RELEASE_DURABLE)
        await handled(bus, await bus.publish(subject, released(created), message_id="again"), RELEASE_DURABLE)

    assert verbs_on(apiserver, "patch", "pods") == 1
    assert "schedulingGates" not in apiserver.objects("pods")[0]["spec"]
    assert await bus.dead_letters(RELEASE_DURABLE) == []


async def test_a_release_that_races_a_change_to_the_pod_is_made_on_its_new_version(
    bus: MemoryBus, api: client.ApiClient, core: Any, apiserver: ApiServer
) -> None:
    await core.create_node(gpu_node("a100-1"))
    created = await core.create_namespaced_pod(NAMESPACE, slice_pod("job", gated=True))

    async with watching(bus, api):
        await wait_watching(apiserver, "pods")
        apiserver.fail_next("patch", "pods", 409)
        sequence = await bus.publish(subjects.release_subject(NAMESPACE, "job"), released(created))
        await handled(bus, sequence, RELEASE_DURABLE)

    assert verbs_on(apiserver, "patch", "pods") == 2
    assert verbs_on(apiserver, "get", "pods") == 2
    assert "schedulingGates" not in apiserver.objects("pods")[0]["spec"]


# --- list_and_watch on its own ------------------------------------------------------------------


async def test_list_and_watch_resumes_after_the_last_change_it_delivered(
    api: client.ApiClient, core: Any, apiserver: ApiServer
) -> None:
    changes: list[tuple[str, str]] = []
    relists: list[list[str]] = []

    async def on_relist(items: Listing) -> None:
        relists.append([item["metadata"]["name"] async for item in items])

    async def on_event(change: str, obj: dict[str, Any]) -> None:
        changes.append((change, obj["metadata"]["name"]))

    pods = client.CoreV1Api(api)
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: list_and_watch(api, pods.list_pod_for_all_namespaces, on_relist, on_event))
        await eventually(lambda: bool(relists), "the first list", WAIT)
        await core.create_namespaced_pod(NAMESPACE, plain_pod("a"))
        await eventually(lambda: ("ADDED", "a") in changes, "pod a added", WAIT)
        bookmarks = apiserver.bookmarks_sent
        # the watch went past two bookmarks
        await eventually(lambda: apiserver.bookmarks_sent >= bookmarks + 2, "two more bookmarks", WAIT)
        apiserver.drop_watches()
        await core.create_namespaced_pod(NAMESPACE, plain_pod("b"))
        await eventually(lambda: ("ADDED", "b") in changes, "pod b added", WAIT)
        group.cancel_scope.cancel()

    assert relists == [[]]
    assert changes == [("ADDED", "a"), ("ADDED", "b")]


async def test_list_and_watch_reads_a_list_in_pages_of_one_snapshot_and_watches_from_it(
    api: client.ApiClient, core: Any, apiserver: ApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kit_watching, "PAGE_SIZE", 2)
    for name in ("a", "b", "c", "d", "e"):
        await core.create_namespaced_pod(NAMESPACE, plain_pod(name))
    listed: list[dict[str, Any]] = []
    relists: list[list[str]] = []
    changes: list[tuple[str, str]] = []

    async def on_relist(items: Listing) -> None:
        async for item in items:
            listed.append(item)
            if len(listed) == 1:  # while the list is read: changes it must not show, but the watch
                await core.delete_namespaced_pod("d", NAMESPACE)
                await core.create_namespaced_pod(NAMESPACE, plain_pod("bb"))
                await core.patch_namespaced_pod("e", NAMESPACE, {"metadata": {"labels": {"late": "yes"}}})
        relists.append([item["metadata"]["name"] for item in listed])

    async def on_event(change: str, obj: dict[str, Any]) -> None:
        changes.append((change, obj["metadata"]["name"]))

    pods = client.CoreV1Api(api)
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: list_and_watch(api, pods.list_pod_for_all_namespaces, on_relist, on_event))
        await eventually(lambda: len(changes) == 3, "the changes made while listing", WAIT)
        group.cancel_scope.cancel()

    assert relists == [["a", "b", "c", "d", "e"]]
    assert "labels" not in listed[-1]["metadata"]  # e as it was when the list began
    assert {item["metadata"]["resourceVersion"] for item in listed} == {"1", "2", "3", "4", "5"}
    assert changes == [("DELETED", "d"), ("ADDED", "bb"), ("MODIFIED", "e")]
    assert verbs_on(apiserver, "list", "pods") == 3


async def test_list_and_watch_lists_again_from_the_start_when_its_continue_token_expired(
    api: client.ApiClient,
    core: Any,
    apiserver: ApiServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(kit_watching, "PAGE_SIZE", 2)
    for name in ("a", "b", "c", "d", "e"):
        await core.create_namespaced_pod(NAMESPACE, plain_pod(name))
    relists: list[list[str]] = []
    complete: list[list[str]] = []
    changes: list[tuple[str, str]] = []

    async def on_relist(items: Listing) -> None:
        names: list[str] = []
        relists.append(names)
        async for item in items:
            names.append(item["metadata"]["name"])
            if len(relists) == 1 and len(names) == 2:  # the first page taken: its snapshot goes
                await core.delete_namespaced_pod("c", NAMESPACE)
                apiserver.expire_history()
        complete.append(names)

    async def on_event(change: str, obj: dict[str, Any]) -> None:
        changes.append((change, obj["metadata"]["name"]))

    pods = client.CoreV1Api(api)
    with caplog.at_level(logging.INFO, logger="services.kit.watching"):
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: list_and_watch(api, pods.list_pod_for_all_namespaces, on_relist, on_event)
            )
            await eventually(lambda: bool(complete), "a complete list", WAIT)
            await wait_watching(apiserver, "pods")
            await core.create_namespaced_pod(NAMESPACE, plain_pod("f"))
            await eventually(lambda: bool(changes), "pod f added", WAIT)
            group.cancel_scope.cancel()

    assert relists == [["a", "b"], ["a", "b", "d", "e"]]
    assert complete == [["a", "b", "d", "e"]]
    assert changes == [("ADDED", "f")]  # c's deletion came before the list it watches from
    assert verbs_on(apiserver, "list", "pods") == 4  # page 1, page 2 (410), then pages 1 and 2 again
    assert "history expired (410" in caplog.text


async def test_list_and_watch_delivers_a_watch_event_that_comes_in_many_reads(
    api: client.ApiClient, core: Any
) -> None:
    relisted = anyio.Event()
    changes: list[dict[str, Any]] = []

    async def on_relist(items: Listing) -> None:
        async for _ in items:
            pass
        relisted.set()

    async def on_event(change: str, obj: dict[str, Any]) -> None:
        changes.append(obj)

    large = plain_pod("large")
    large.metadata.annotations = {"example.com/blob": "x" * 1_000_000}  # about the largest etcd keeps
    pods = client.CoreV1Api(api)
    async with anyio.create_task_group() as group:
        group.start_soon(lambda: list_and_watch(api, pods.list_pod_for_all_namespaces, on_relist, on_event))
        with anyio.fail_after(WAIT):
            await relisted.wait()
        await core.create_namespaced_pod(NAMESPACE, large)
        await eventually(lambda: bool(changes), "the large pod added", WAIT)
        group.cancel_scope.cancel()

    assert len(changes[0]["metadata"]["annotations"]["example.com/blob"]) == 1_000_000


# --- the command line ---------------------------------------------------------------------------


def test_the_watcher_flags_default_to_the_nos_label_and_host_ipc_only() -> None:
    args = build_parser().parse_args(["run", "pod-watcher"])

    assert (args.opt_in_label, args.mps_ipc, args.mps_user) == (OptInLabel(), "host", None)


def test_the_watcher_flags_set_the_label_and_the_client_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPSFLOW_OPT_IN_LABEL", "example.com/from-env=yes")
    from_env = build_parser().parse_args(["run", "pod-watcher"])
    given = build_parser().parse_args(
        [
            "run",
            "pod-watcher",
            "--opt-in-label",
            "example.com/mps=on",
            "--mps-ipc",
            "shm-directory",
            "--mps-user",
            "1000",
        ]
    )

    assert from_env.opt_in_label == OptInLabel("example.com/from-env", "yes")
    assert (given.opt_in_label, given.mps_ipc, given.mps_user) == (
        OptInLabel("example.com/mps", "on"),
        "shm-directory",
        1000,
    )


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--opt-in-label", "nos.nebuly.com/gpu-partitioning"], "argument --opt-in-label: "),
        (["--mps-user", "root"], "argument --mps-user: 'root' is not a user id"),
        (["--mps-user", "-5"], "argument --mps-user: '-5' is not a user id"),
        (["--mps-ipc", "none"], "argument --mps-ipc: 'none' is not one of host, shm-directory"),
        (["--no-require-host-ipc"], "unrecognized arguments: --no-require-host-ipc"),
    ],
    ids=["label-without-value", "user-name", "negative-user", "ipc-mode", "replaced-by-mps-ipc"],
)
def test_a_bad_watcher_flag_exits_2_naming_it(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["run", "pod-watcher", *argv])

    assert exited.value.code == 2
    assert named in capsys.readouterr().err


async def test_the_largest_gpu_follows_nodes_joining_changing_and_leaving(broker: MemoryBroker) -> None:
    async with client.ApiClient(client.Configuration(host="http://127.0.0.1:9")) as api:
        watcher = PodWatcherService(broker.bus("t"), api)

        def node(name: str, mib: int | None) -> NodeObserved:
            gfd = GfdFacts(product="GPU", count=1, memory_mib=mib) if mib is not None else None
            return NodeObserved(name=name, gfd=gfd)

        assert watcher.largest_gpu_gb is None
        watcher._keep_node(node("a", 81920))
        watcher._keep_node(node("b", 24576))
        watcher._keep_node(node("c", None))
        assert watcher.largest_gpu_gb == 80
        watcher._keep_node(node("a", 16384))  # the same node, seen again with a smaller GPU
        assert watcher.largest_gpu_gb == 24
        watcher._forget_node("b")
        watcher._forget_node("b")  # twice: nothing more goes
        assert watcher.largest_gpu_gb == 16
        watcher._forget_node("a")
        assert watcher.largest_gpu_gb is None and set(watcher.nodes) == {"c"}
