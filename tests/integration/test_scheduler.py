"""The simulated kube-scheduler against the API emulator, through the real kubernetes-asyncio client.

Every test waits for what must happen (a binding, an Unschedulable condition) in the emulator's
store, with a deadline, and asserts that something did not happen only after an observed outcome
that proves the scheduler would have done it: a later or lower-priority pod that got the only
free slot, or the pod's own Unschedulable condition, written at the end of its scheduling pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from kubernetes_asyncio import client

from simulation.apiserver import ApiServer
from simulation.scheduler import Scheduler
from tests.support import eventually

pytestmark = pytest.mark.anyio

NAMESPACE = "default"
GPU = "nvidia.com/gpu-10gb"
MERGE_PATCH = "application/merge-patch+json"
DEADLINE = 30.0  # generous: the development machine has 2 loaded cores
FULL = f"0/1 nodes are available: 1 Insufficient {GPU}."

Pods = dict[str, dict[str, Any]]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def api() -> AsyncIterator[ApiServer]:
    async with ApiServer(bookmark_interval=0.05) as server:
        yield server


@pytest.fixture
async def core(api: ApiServer) -> AsyncIterator[Any]:
    async with client.ApiClient(client.Configuration(host=api.url)) as api_client:
        yield client.CoreV1Api(api_client)


@pytest.fixture
async def scheduler(api: ApiServer) -> AsyncIterator[Scheduler]:
    async with client.ApiClient(client.Configuration(host=api.url)) as api_client:
        yield Scheduler(api_client, seed=7)


@asynccontextmanager
async def running(scheduler: Scheduler) -> AsyncIterator[Scheduler]:
    async with anyio.create_task_group() as group:
        group.start_soon(scheduler.run)
        yield scheduler
        group.cancel_scope.cancel()


async def add_node(
    core: Any,
    name: str,
    gpus: int,
    *,
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
) -> None:
    body = {"metadata": {"name": name, "labels": labels or {}}, "spec": {"taints": taints or []}}
    await core.create_node(body)
    await set_gpus(core, name, gpus)


async def set_gpus(core: Any, node: str, gpus: int) -> None:
    status = {"allocatable": {GPU: str(gpus)}, "conditions": [{"type": "Ready", "status": "True"}]}
    await core.patch_node_status(node, {"status": status}, _content_type=MERGE_PATCH)


async def add_pod(core: Any, name: str, **spec: Any) -> None:
    container = {"name": "main", "image": "busybox", "resources": {"limits": {GPU: 1}}}
    await core.create_namespaced_pod(
        NAMESPACE, {"metadata": {"name": name}, "spec": {"containers": [container], **spec}}
    )


def pinned_to(node: str, *expressions: dict[str, Any]) -> dict[str, Any]:
    """The required node affinity mpsflow pins a pod with (here with its own term's expressions)."""
    term = {
        "matchFields": [{"key": "metadata.name", "operator": "In", "values": [node]}],
        **({"matchExpressions": list(expressions)} if expressions else {}),
    }
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}}}


def node_of(pod: dict[str, Any]) -> str | None:
    node: str | None = (pod.get("spec") or {}).get("nodeName")
    return node


def unschedulable(pod: dict[str, Any]) -> str | None:
    """The message of the pod's PodScheduled=False, reason=Unschedulable condition, if any."""
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if (condition.get("type"), condition.get("status"), condition.get("reason")) == (
            "PodScheduled",
            "False",
            "Unschedulable",
        ):
            message: str = condition["message"]
            return message
    return None


async def until(api: ApiServer, done: Callable[[Pods], bool], what: str) -> Pods:
    """The pods (by name) as soon as `done` holds for them; fails after DEADLINE seconds."""

    seen: Pods = {}

    def satisfied() -> bool:
        seen.clear()
        seen.update((p["metadata"]["name"], p) for p in api.objects("pods", NAMESPACE))
        return done(seen)

    await eventually(satisfied, what, DEADLINE)
    return seen


async def test_a_gated_pod_is_bound_only_after_a_patch_removes_its_gates(
    api: ApiServer, core: Any, scheduler: Scheduler
) -> None:
    await add_node(core, "n1", 1)
    await add_pod(core, "gated", priority=100, schedulingGates=[{"name": "mpsflow.dev/slice"}])
    await add_pod(core, "open")

    async with running(scheduler):
        # "gated" comes first in the queue: scheduled, it would have been assumed on the only
        # slot, and "open" bound only after the API refused to bind "gated" (409 while gated).
        pods = await until(api, lambda p: node_of(p["open"]) == "n1", "open bound to n1")
        assert node_of(pods["gated"]) is None
        assert scheduler.binding_failures == 0
        assert not [r for r in api.request_log if r.path.endswith("/pods/gated/binding")]

        await core.patch_namespaced_pod(
            "gated", NAMESPACE, {"spec": {"schedulingGates": None}}, _content_type=MERGE_PATCH
        )
        pods = await until(api, lambda p: unschedulable(p["gated"]) is not None, "gated unschedulable")
        assert unschedulable(pods["gated"]) == FULL

        await core.delete_namespaced_pod("open", NAMESPACE)
        await until(api, lambda p: node_of(p["gated"]) == "n1", "gated bound to n1")


async def test_a_pod_pinned_by_match_fields_goes_to_that_node_only(
    api: ApiServer, core: Any, scheduler: Scheduler
) -> None:
    for name, zone in (("n1", "a"), ("n2", "b"), ("n3", "b")):
        await add_node(core, name, 3, labels={"zone": zone})
    for index in range(4):  # the fourth finds n2 full
        await add_pod(core, f"pinned-{index}", affinity=pinned_to("n2"))
    zone_b = {"key": "zone", "operator": "In", "values": ["b"]}
    await add_pod(core, "pinned-in-term", affinity=pinned_to("n3", zone_b))

    async with running(scheduler):
        pods = await until(api, lambda p: unschedulable(p["pinned-3"]) is not None, "pinned-3 unschedulable")
        assert unschedulable(pods["pinned-3"]) == (
            f"0/3 nodes are available: 1 Insufficient {GPU}, "
            "2 node(s) didn't satisfy plugin(s) [NodeAffinity]."
        )
        pods = await until(api, lambda p: node_of(p["pinned-in-term"]) is not None, "pinned-in-term bound")
        assert {name: node_of(pod) for name, pod in pods.items()} == {
            "pinned-0": "n2",
            "pinned-1": "n2",
            "pinned-2": "n2",
            "pinned-3": None,
            "pinned-in-term": "n3",
        }


async def test_taints_keep_away_the_pods_that_do_not_tolerate_them(
    api: ApiServer, core: Any, scheduler: Scheduler
) -> None:
    await add_node(core, "tainted", 2, taints=[{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}])
    await add_node(core, "full", 0)
    await add_pod(core, "intolerant")
    await add_pod(core, "tolerant", tolerations=[{"key": "dedicated", "operator": "Exists"}])

    async with running(scheduler):
        pods = await until(
            api,
            lambda p: unschedulable(p["intolerant"]) is not None and node_of(p["tolerant"]) is not None,
            "intolerant unschedulable and tolerant bound",
        )
    assert unschedulable(pods["intolerant"]) == (
        f"0/2 nodes are available: 1 Insufficient {GPU}, 1 node(s) had untolerated taint {{dedicated: gpu}}."
    )
    assert node_of(pods["intolerant"]) is None
    assert node_of(pods["tolerant"]) == "tainted"


async def test_two_pods_for_one_slot_end_with_one_bound_though_the_watch_shows_no_binding(
    api: ApiServer, core: Any, scheduler: Scheduler
) -> None:
    await add_node(core, "n1", 1)
    await add_pod(core, "a")
    await add_pod(core, "b")
    # The scheduler's pod informer gets its first list, then no watch event until released: it
    # schedules the second pod seeing the first one still pending (the emulator enforces no
    # capacity, so without the assumed pod both would be bound).
    released = anyio.Event()
    watched = scheduler._pod_changed

    async def late(change: str, pod: dict[str, Any]) -> None:
        await released.wait()
        await watched(change, pod)

    scheduler._pod_changed = late  # type: ignore[method-assign]

    async with running(scheduler):
        pods = await until(
            api,
            lambda p: any(map(node_of, p.values())) and any(map(unschedulable, p.values())),
            "one pod bound and one unschedulable",
        )
        [winner] = [name for name, pod in pods.items() if node_of(pod)]
        [loser] = [name for name, pod in pods.items() if not node_of(pod)]
        assert unschedulable(pods[loser]) == FULL
        assert not any(map(node_of, scheduler.pods.values()))  # its informer saw no binding
        assert scheduler.assumed == {f"{NAMESPACE}/{winner}": "n1"}

        released.set()
        await eventually(lambda: not scheduler.assumed, "the informer to show the binding", DEADLINE)
        assert node_of(scheduler.pods[f"{NAMESPACE}/{winner}"]) == "n1"
        # The binding's answer may come after the informer showed it.
        await eventually(lambda: scheduler.bindings == 1, "one binding answered", DEADLINE)
        assert scheduler.binding_failures == 0
    assert [node_of(p) for p in api.objects("pods")].count("n1") == 1


async def test_one_slot_one_binding_when_the_api_watch_lags(
    api: ApiServer, core: Any, scheduler: Scheduler
) -> None:
    """The same race with the emulator's own watch delay: no hook, timing-dependent exercise, but
    the outcome asserted holds whatever the timing."""
    await add_node(core, "n1", 1)
    await add_pod(core, "a")
    await add_pod(core, "b")
    api.watch_delay = 1.0

    async with running(scheduler):
        pods = await until(
            api,
            lambda p: any(map(node_of, p.values())) and any(map(unschedulable, p.values())),
            "one pod bound and one unschedulable",
        )
        await eventually(lambda: scheduler.bindings == 1, "one binding", DEADLINE)
    assert sorted(map(str, map(node_of, pods.values()))) == ["None", "n1"]
    assert scheduler.binding_failures == 0


async def test_an_unschedulable_pod_is_bound_once_its_node_allocatable_is_raised(
    api: ApiServer, core: Any, scheduler: Scheduler
) -> None:
    await add_node(core, "n1", 0)
    await add_pod(core, "waiting")

    async with running(scheduler):
        pods = await until(api, lambda p: unschedulable(p["waiting"]) is not None, "waiting unschedulable")
        assert unschedulable(pods["waiting"]) == FULL

        await set_gpus(core, "n1", 1)
        await until(api, lambda p: node_of(p["waiting"]) == "n1", "waiting bound to n1")


async def test_a_pod_waiting_for_resources_is_bound_when_a_bound_pod_finishes(
    api: ApiServer, core: Any, scheduler: Scheduler
) -> None:
    await add_node(core, "n1", 1)
    await add_pod(core, "first", priority=10)
    await add_pod(core, "second")

    async with running(scheduler):
        await until(
            api,
            lambda p: node_of(p["first"]) == "n1" and unschedulable(p["second"]) is not None,
            "first bound to n1 and second unschedulable",
        )
        await core.patch_namespaced_pod_status(
            "first", NAMESPACE, {"status": {"phase": "Succeeded"}}, _content_type=MERGE_PATCH
        )
        await until(api, lambda p: node_of(p["second"]) == "n1", "second bound to n1")


async def test_higher_priority_pods_are_scheduled_first(
    api: ApiServer, core: Any, scheduler: Scheduler
) -> None:
    await add_node(core, "n1", 1)
    await add_pod(core, "a-low")  # older and first by name, but lower priority
    await add_pod(core, "b-high", priority=1000)

    async with running(scheduler):
        pods = await until(api, lambda p: unschedulable(p["a-low"]) is not None, "a-low unschedulable")
    assert unschedulable(pods["a-low"]) == FULL
    assert node_of(pods["b-high"]) == "n1"
    assert node_of(pods["a-low"]) is None


async def test_pods_for_another_scheduler_are_left_alone(
    api: ApiServer, core: Any, scheduler: Scheduler
) -> None:
    await add_node(core, "n1", 1)
    await add_pod(core, "theirs", priority=1000, schedulerName="other-scheduler")
    await add_pod(core, "ours", schedulerName="default-scheduler")

    async with running(scheduler):
        # "theirs" would have come first
        pods = await until(api, lambda p: node_of(p["ours"]) == "n1", "ours bound to n1")
    assert node_of(pods["theirs"]) is None
    assert unschedulable(pods["theirs"]) is None


async def test_a_failed_binding_is_forgotten_and_retried_after_a_backoff(
    api: ApiServer, core: Any, scheduler: Scheduler
) -> None:
    await add_node(core, "n1", 1)
    await add_pod(core, "p")
    api.fail_next("create", "pods/binding", 500)

    async with running(scheduler):
        await until(api, lambda p: node_of(p["p"]) == "n1", "p bound to n1")
        await eventually(lambda: scheduler.bindings == 1, "one binding", DEADLINE)
    assert scheduler.binding_failures == 1
    assert [r.resource for r in api.request_log].count("pods/binding") == 2
