"""The pod watcher misses nothing while the API emulator injects faults into its requests.

Each test plays one workload of pod and node changes through a fault-free client (creations, phase
and label changes, deletions, nodes opting in and out, nodes deleted) while the emulator injects one
kind of fault into the watcher's own requests (its token only), then all of them together, and checks
that the bus ends with exactly the right level for every pod and node: the last message of each
slice pod is its current state in the API (same uid, resourceVersion and phase) or its deletion (for
a finished pod, its deletion or nothing: it left the watch's selection), of each node its current
`NodeObserved` or its opt-out, and nothing at all for a plain pod, a node never opted in, or a name
that never existed. The workload goes on (40 changes at least) until every kind
of fault the test is about has fired. From the emulator's request log it also checks how the
watcher met each fault: after a 429 its next request came no sooner than `Retry-After`, after a 500
no sooner than the first backoff, and it listed again after a 410 and only then (a dropped watch was
resumed from its resourceVersion).

The watcher's watches are long (240 s), so the watcher asks the API again only when a watch ends:
every kind but the drops themselves comes with watches dropped every 0.2 s, so that it meets the
fault while changes keep coming. The bus is the in-memory broker on the real clock; the emulator is
real HTTP with the real kubernetes-asyncio client.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from kubernetes_asyncio import client

from events import subjects
from events.memory import MemoryBroker, MemoryBus
from events.nodes import NodeOptedOut
from events.pods import PodDeleted, PodObserved
from services.kit.kube import api_client
from services.kit.retry import KUBERNETES_API
from services.pod_watcher.service import PodWatcherService
from services.pod_watcher.translate import translate_node
from simulation.apiserver import ApiServer, Faults
from tests.memorybus import MemoryLog

pytestmark = pytest.mark.anyio

NAMESPACE = "default"
OPT_IN = "nos.nebuly.com/gpu-partitioning"
WATCHER = "pod-watcher-token"
RETRY_AFTER_S = 1
DROPS_S = 0.2
SETTLE_S = 30.0  # a run of refusals backs a loop off to 10 s (KUBERNETES_API): 0.2 + 0.4 + ... + 10
CLOCK_SLACK_S = 0.01

FAULTS = {
    "dropped watches": Faults(drop_watch_every_s=DROPS_S),
    "410 on resumption": Faults(drop_watch_every_s=DROPS_S, gone_rate=0.5),
    "500s": Faults(drop_watch_every_s=DROPS_S, error_rate=0.4),
    "429s": Faults(drop_watch_every_s=DROPS_S, throttle_rate=0.3, retry_after_s=RETRY_AFTER_S),
    "slow responses": Faults(drop_watch_every_s=DROPS_S, slow_rate=0.5, slow_s=0.3),
    "all together": Faults(
        drop_watch_every_s=DROPS_S,
        gone_rate=0.5,
        error_rate=0.15,
        throttle_rate=0.1,
        retry_after_s=RETRY_AFTER_S,
        slow_rate=0.3,
        slow_s=0.2,
    ),
}
MIN_STEPS = 40
MAX_STEPS = 400
MUST_FIRE = {
    "dropped watches": {"watch_ended", "watch_reset"},
    "410 on resumption": {"watch_ended", "watch_reset", "gone"},
    "500s": {"watch_ended", "error"},
    "429s": {"watch_ended", "throttled"},
    "slow responses": {"watch_ended", "slow"},
    "all together": {"watch_ended", "watch_reset", "gone", "error", "throttled", "slow"},
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=list(FAULTS), ids=list(FAULTS))
async def apiserver(request: pytest.FixtureRequest) -> AsyncIterator[ApiServer]:
    faults = FAULTS[request.param]
    targeted = dataclasses.replace(faults, seed=11, identities=(WATCHER,), resources=("pods", "nodes"))
    async with ApiServer(bookmark_interval=0.05, faults=targeted) as server:
        yield server


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def user(apiserver: ApiServer) -> AsyncIterator[Any]:
    """The cluster's users, whose requests get no faults."""
    user_client = await api_client(apiserver.url, "user-token")
    try:
        yield client.CoreV1Api(user_client)
    finally:
        await user_client.close()


def node(name: str, opted_in: bool) -> dict[str, Any]:
    labels = {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "nvidia.com/gpu.count": "2"}
    labels |= {"nvidia.com/gpu.memory": "81920"} | ({OPT_IN: "mps"} if opted_in else {})
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


def pod(name: str, asks_for_a_slice: bool) -> dict[str, Any]:
    resources = {"limits": {"nvidia.com/gpu-10gb": "1"}} if asks_for_a_slice else {}
    container = {"name": "main", "image": "busybox", "resources": resources}
    spec = {"hostIPC": True, "containers": [container]}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": spec,
    }


class Workload:
    """Changes to pods and nodes, drawn from a seeded generator, and the names it ever created."""

    def __init__(self, user: Any, seed: int) -> None:
        self.user = user
        self.draw = random.Random(seed)
        self.pods: dict[str, bool] = {}  # name -> asks for a slice
        self.nodes: set[str] = set()
        self.alive_pods: list[str] = []
        self.alive_nodes: list[str] = []

    async def create_pod(self, name: str, asks_for_a_slice: bool = True) -> None:
        await self.user.create_namespaced_pod(NAMESPACE, pod(name, asks_for_a_slice))
        self.pods[name] = asks_for_a_slice
        self.alive_pods.append(name)

    async def create_node(self, name: str, opted_in: bool = True) -> None:
        await self.user.create_node(node(name, opted_in))
        self.nodes.add(name)
        self.alive_nodes.append(name)

    async def step(self, index: int) -> None:
        """One change, of a kind and on an object the generator picks."""
        kind = self.draw.choice(["create pod", "create pod", "phase", "label", "delete pod", "node"])
        if kind == "create pod" or not self.alive_pods:
            await self.create_pod(f"pod-{index}", asks_for_a_slice=self.draw.random() < 0.8)
        elif kind == "phase":
            name = self.draw.choice(self.alive_pods)
            phase = {"status": {"phase": self.draw.choice(["Running", "Succeeded"])}}
            await self.user.patch_namespaced_pod_status(name, NAMESPACE, phase)
        elif kind == "label":
            name = self.draw.choice(self.alive_pods)
            await self.user.patch_namespaced_pod(
                name, NAMESPACE, {"metadata": {"labels": {"step": str(index)}}}
            )
        elif kind == "delete pod":
            name = self.draw.choice(self.alive_pods)
            self.alive_pods.remove(name)
            await self.user.delete_namespaced_pod(name, NAMESPACE)
        else:
            await self.change_a_node(index)

    async def change_a_node(self, index: int) -> None:
        action = self.draw.choice(["create", "opt in", "opt out", "delete"])
        if action == "create" or not self.alive_nodes:
            await self.create_node(f"node-{index}", opted_in=self.draw.random() < 0.7)
        elif action == "delete":
            name = self.draw.choice(self.alive_nodes)
            self.alive_nodes.remove(name)
            await self.user.delete_node(name)
        else:
            value = "mps" if action == "opt in" else None
            await self.user.patch_node(
                self.draw.choice(self.alive_nodes), {"metadata": {"labels": {OPT_IN: value}}}
            )


def wrong_levels(api: ApiServer, log: MemoryLog, workload: Workload) -> list[str]:
    """What the bus says wrongly or not yet, for every pod and node the workload ever created, and
    every subject it never should have published on."""
    problems = []
    pods = {p["metadata"]["name"]: p for p in api.objects("pods")}
    for name, asks_for_a_slice in workload.pods.items():
        levels = log.on(subjects.pod_subject(NAMESPACE, name))
        last = levels[-1] if levels else None
        current = pods.get(name)
        if current is None:
            if last is not None and not isinstance(last, PodDeleted):
                problems.append(f"pod {name} was deleted; last level {last!r}")
        elif not asks_for_a_slice:
            if levels:
                problems.append(f"pod {name} asks for no slice; published {levels!r}")
        elif current["status"]["phase"] in ("Succeeded", "Failed"):  # it left the watch's selection
            if last is not None and last != PodDeleted(
                namespace=NAMESPACE, name=name, uid=current["metadata"]["uid"]
            ):
                problems.append(f"pod {name} finished; last level {last!r}")
        elif not (
            isinstance(last, PodObserved)
            and (last.uid, last.resource_version, last.phase)
            == (
                current["metadata"]["uid"],
                current["metadata"]["resourceVersion"],
                current["status"]["phase"],
            )
        ):
            problems.append(f"pod {name} is at {current['metadata']['resourceVersion']}; last level {last!r}")
    nodes = {n["metadata"]["name"]: n for n in api.objects("nodes")}
    for name in workload.nodes:
        levels = log.on(subjects.node_subject(name))
        last = levels[-1] if levels else None
        expected = translate_node(nodes[name]) if name in nodes else None
        if expected is None:
            if last is not None and not isinstance(last, NodeOptedOut):
                problems.append(f"node {name} is gone or opted out; last level {last!r}")
        elif last != expected:
            problems.append(f"node {name}: expected {expected!r}; last level {last!r}")
    known = {subjects.pod_subject(NAMESPACE, name) for name in workload.pods}
    known |= {subjects.node_subject(name) for name in workload.nodes}
    problems += [
        f"published on {subject}, which names nothing created"
        for subject, _ in log.events
        if subject not in known
    ]
    return problems


async def settled(api: ApiServer, log: MemoryLog, workload: Workload) -> list[str]:
    """Waits (boundedly) until the bus holds the right levels, checking again at every store; what
    is still wrong, if anything. (The API no longer changes: only the bus can put things right.)"""
    with anyio.move_on_after(SETTLE_S):
        while wrong_levels(api, log, workload):
            await log.broker.next_store()
    return wrong_levels(api, log, workload)


def fired(api: ApiServer, kind: str) -> bool:
    """Whether every fault the test of `kind` is about was injected."""
    return MUST_FIRE[kind] <= set(api.faults_injected)


def relisted_exactly_after_410s(api: ApiServer) -> bool:
    """Whether, of the watcher's requests on each resource, exactly those that follow a 410 are
    lists: a watch that ended otherwise was resumed from its resourceVersion."""
    for resource in ("nodes", "pods"):
        mine = [r for r in api.request_log if r.identity == WATCHER and r.resource == resource]
        if any(
            (after.verb == "list") != ("gone" in before.faults) for before, after in itertools.pairwise(mine)
        ):
            return False
    return True


def waits_after(api: ApiServer, fault: str) -> list[float]:
    """For every request of the watcher that got `fault`, how long until its next request on the
    same resource (nodes and pods each have their own list-and-watch loop)."""
    mine = [record for record in api.request_log if record.identity == WATCHER]
    waits = []
    for index, record in enumerate(mine):
        if fault in record.faults:
            following = next(
                (later for later in mine[index + 1 :] if later.resource == record.resource), None
            )
            if following is not None:
                waits.append(following.at - record.at)
    return waits


async def test_the_watcher_ends_with_every_level_right(
    apiserver: ApiServer, broker: MemoryBroker, user: Any, request: pytest.FixtureRequest
) -> None:
    kind = request.node.callspec.id
    bus: MemoryBus = broker.bus("tests")
    log = MemoryLog(broker)
    workload = Workload(user, seed=5)
    for index in range(2):
        await workload.create_node(f"first-node-{index}")
        await workload.create_pod(f"first-pod-{index}")
    watcher_client = await api_client(apiserver.url, WATCHER)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(PodWatcherService(bus, watcher_client).run)
            index = 0
            while index < MIN_STEPS or (not fired(apiserver, kind) and index < MAX_STEPS):
                await workload.step(index)
                await anyio.sleep(workload.draw.uniform(0.0, 0.06))
                index += 1
            wrong = await settled(apiserver, log, workload)
            # Nothing more comes later: a node and a pod created now, once right, prove the
            # watcher has handled every change before them.
            await workload.create_node("last-node")
            await workload.create_pod("last-pod")
            wrong += await settled(apiserver, log, workload)
            group.cancel_scope.cancel()
    finally:
        await watcher_client.close()

    injected = apiserver.faults_injected
    print(f"{kind}: {index} steps, faults injected {injected}")
    assert wrong == []
    assert fired(apiserver, kind), injected
    after_429s, after_500s = waits_after(apiserver, "throttled"), waits_after(apiserver, "error")
    assert all(wait >= RETRY_AFTER_S - CLOCK_SLACK_S for wait in after_429s), after_429s
    assert all(wait >= KUBERNETES_API.first - CLOCK_SLACK_S for wait in after_500s), after_500s
    assert bool(after_429s) == ("throttled" in MUST_FIRE[kind])
    if not {"error", "throttled"} & MUST_FIRE[kind]:  # (a refused list is listed again)
        assert relisted_exactly_after_410s(apiserver)
