"""A simulated kube-scheduler, racing like the real one. Part of the simulated cluster only.

What it models, after kube-scheduler:
- Informers: it decides only from its own caches of nodes and of non-terminal pods (list + watch
  through the real kubernetes-asyncio client, pods with the field selector kube-scheduler uses),
  so its view is as stale as the watch. It waits for both first lists before scheduling.
- Assumed pods: once it picks node N for pod P, P's requests count on N at once, before the
  binding returns and before the watch shows it. What each node's pods request is kept as pods
  come, go, are bound and assumed, as kube-scheduler's cache keeps its NodeInfo, not summed anew
  for every pod (`requested_by_node` states what it must equal). The binding runs in its own task (the binding
  cycle) while the next pod is scheduled. When it fails, the assumption is forgotten, the
  unschedulable pods are retried (resources were freed) and P is retried after a backoff (1 s).
  An assumption ends when the informer shows P bound, deleted or terminal.
- The scheduling queue, the filters and the failure message of `simulation.scheduling`: gated
  pods wait for an update that removes their gates; a pod that fits nowhere gets
  `PodScheduled=False, reason=Unschedulable` with kube-scheduler's message (patched only when it
  changes) and waits for a node added or updated, a bound pod deleted or terminal, an update to
  its spec, or the flush interval (60 s). A node event wakes only the pods that node may take, as
  NodeAffinity's queueing hint does in kube-scheduler (enabled by default since 1.32): a pod whose
  required affinity pins it to other nodes by name stays asleep. With hundreds of nodes syncing
  their status every few seconds, waking every parked pod at each would cost more than two cores.
- The choice among feasible nodes is uniform, with `random.Random(seed)`: what kube-scheduler's
  reservoir sampling among equal scores gives when every node scores alike.

What it does not model: cpu, memory and the pod count of nodes; scoring; preemption and
nominated nodes; permit, reserve and pre-bind plugins; the assume cache's expiry; several
profiles; events (`FailedScheduling`, `Scheduled`).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from datetime import UTC, datetime
from functools import partial
from typing import Any

import aiohttp
import anyio
import anyio.lowlevel
from anyio.abc import TaskGroup
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from services.kit.signal import Wakeup
from services.kit.watching import Listing, list_and_watch
from simulation.scheduling import (
    JsonObject,
    SchedulingQueue,
    feasible_nodes,
    is_terminal,
    pinned_nodes,
    pod_key,
    pod_requests,
    requested_by_node,
    wants_scheduling,
)

log = logging.getLogger(__name__)

__all__ = ["Scheduler", "extended_requests", "is_terminal", "requested_by_node"]

NON_TERMINAL_PODS = "status.phase!=Succeeded,status.phase!=Failed"
BINDING_BACKOFF = 1.0
FLUSH_INTERVAL = 60.0


def _may_go_to(pod: JsonObject, node: str) -> bool:
    """Whether `node` may take `pod` as far as its required affinity pins it to nodes by name."""
    pinned = pinned_nodes(pod)
    return pinned is None or node in pinned


def extended_requests(pod: JsonObject) -> Counter[str]:
    """What the pod asks of a node besides cpu, memory and ephemeral-storage (see `pod_requests`)."""
    return pod_requests(pod)


class Scheduler:
    def __init__(
        self,
        api: client.ApiClient,
        *,
        seed: int | None = None,
        flush_interval: float = FLUSH_INTERVAL,
        backoff: float = BINDING_BACKOFF,
    ) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.pods: dict[str, JsonObject] = {}
        """The informer's view of the non-terminal pods, by namespace/name."""
        self.nodes: dict[str, JsonObject] = {}
        self.assumed: dict[str, str] = {}
        """Pods (namespace/name) this scheduler sent to a node that its informer does not show bound."""
        self.requested: dict[str, Counter[str]] = {}
        """What the pods bound to each node, or assumed on it, request: `requested_by_node(pods, assumed)`."""
        self._charged: dict[str, tuple[str, Counter[str]]] = {}  # pod -> (its node, its requests)
        self.queue = SchedulingQueue(flush_after=flush_interval, backoff=backoff)
        self._random = random.Random(seed)
        self._wakeup = Wakeup()
        self._pods_synced = anyio.Event()
        self._nodes_synced = anyio.Event()
        self._bindings = 0
        self._binding_failures = 0

    @property
    def bindings(self) -> int:
        """Bindings the API accepted."""
        return self._bindings

    @property
    def binding_failures(self) -> int:
        """Bindings the API refused or that failed on the way."""
        return self._binding_failures

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(
                partial(list_and_watch, self.api, self.core.list_node, self._nodes_listed, self._node_changed)
            )
            group.start_soon(
                partial(
                    list_and_watch,
                    self.api,
                    self.core.list_pod_for_all_namespaces,
                    self._pods_listed,
                    self._pod_changed,
                    field_selector=NON_TERMINAL_PODS,
                )
            )
            await self._pods_synced.wait()
            await self._nodes_synced.wait()
            while True:
                popped = self.queue.pop(time.monotonic())
                if popped is None:
                    await self._wakeup.wait(self.queue.next_due(time.monotonic()))
                    continue
                await self._schedule_one(*popped, group)
                await anyio.lowlevel.checkpoint()  # informer events and bindings run between cycles

    # --- the scheduling cycle ---

    async def _schedule_one(self, key: str, pod: JsonObject, group: TaskGroup) -> None:
        found = feasible_nodes(pod, self.nodes, self.requested)
        if found.nodes:
            node = self._random.choice(found.nodes)
            self.assumed[key] = node
            self._recharge(key)
            group.start_soon(self._bind, key, pod, node)
            return
        self.queue.park(key, pod, time.monotonic())
        await self._report_unschedulable(key, found.message)

    async def _bind(self, key: str, pod: JsonObject, node: str) -> None:
        metadata = pod["metadata"]
        body = client.V1Binding(
            metadata=client.V1ObjectMeta(
                name=metadata["name"], namespace=metadata["namespace"], uid=metadata.get("uid")
            ),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=node),
        )
        try:
            # The API answers a binding with a Status that the client cannot decode into a model.
            response: Any = await self.core.create_namespaced_pod_binding(
                metadata["name"], metadata["namespace"], body, _preload_content=False, _request_timeout=10
            )
            bound, why = response.status in (200, 201), f"HTTP {response.status}"
            response.release()
        except (ApiException, aiohttp.ClientError, TimeoutError) as error:
            bound, why = False, str(error) or type(error).__name__
        if bound:
            self._bindings += 1
            return
        log.info("binding %s to %s failed (%s)", key, node, why)
        self._binding_failures += 1
        if self.assumed.get(key) == node:
            del self.assumed[key]
            self._recharge(key)
            self._wake_for(node)
        current = self.pods.get(key)
        if current is not None and key not in self.assumed and wants_scheduling(current):
            self.queue.back_off(key, current, time.monotonic())
        self._wakeup.set()

    async def _report_unschedulable(self, key: str, message: str) -> None:
        pod = self.pods.get(key)
        if pod is None:
            return
        conditions = (pod.get("status") or {}).get("conditions") or []
        current = next((c for c in conditions if c.get("type") == "PodScheduled"), None)
        if current is not None and (current.get("status"), current.get("reason"), current.get("message")) == (
            "False",
            "Unschedulable",
            message,
        ):
            return
        since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if current is not None and current.get("status") == "False":
            since = current.get("lastTransitionTime") or since
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastTransitionTime": since,
        }
        others = [c for c in conditions if c.get("type") != "PodScheduled"]
        try:
            await self.core.patch_namespaced_pod_status(
                pod["metadata"]["name"],
                pod["metadata"]["namespace"],
                {"status": {"conditions": [*others, condition]}},
                _content_type="application/merge-patch+json",
                _request_timeout=10,  # type: ignore[call-arg]
            )
        except (ApiException, aiohttp.ClientError, TimeoutError) as error:
            log.info("%s: could not report it unschedulable: %s", key, error)

    # --- informers ---

    async def _nodes_listed(self, items: Listing) -> None:
        self.nodes = {node["metadata"]["name"]: node async for node in items}
        self.queue.move_all_to_active()
        self._nodes_synced.set()
        self._wakeup.set()

    async def _node_changed(self, change: str, node: JsonObject) -> None:
        if change == "DELETED":
            self.nodes.pop(node["metadata"]["name"], None)
        else:
            self.nodes[node["metadata"]["name"]] = node
            self._wake_for(node["metadata"]["name"])
        self._wakeup.set()

    def _wake_for(self, node: str) -> None:
        """Something changed on `node` that may let pods fit: move the parked pods it may take."""
        self.queue.move_to_active(lambda pod: _may_go_to(pod, node))

    def _recharge(self, key: str) -> None:
        """Count the pod's requests on the node it is bound or assumed to now (nowhere once it is
        gone or terminal), keeping `requested` what `requested_by_node` would sum."""
        old = self._charged.pop(key, None)
        if old is not None:
            was, asked = old
            self.requested[was].subtract(asked)
            self.requested[was] = +self.requested[was]  # drop what reached 0
        pod = self.pods.get(key)
        if pod is None or is_terminal(pod):
            return
        node: str | None = (pod.get("spec") or {}).get("nodeName") or self.assumed.get(key)
        if not node:
            return
        requests = pod_requests(pod)
        self._charged[key] = (node, requests)
        self.requested.setdefault(node, Counter()).update(requests)

    async def _pods_listed(self, items: Listing) -> None:
        listed = {pod_key(pod): pod async for pod in items}
        for key in self.pods.keys() - listed.keys():
            self._pod_gone(key)
        for key, pod in listed.items():
            self._pod_seen(key, pod)
        self._pods_synced.set()
        self._wakeup.set()

    async def _pod_changed(self, change: str, pod: JsonObject) -> None:
        if change == "DELETED":
            self._pod_gone(pod_key(pod))
        else:
            self._pod_seen(pod_key(pod), pod)
        self._wakeup.set()

    def _pod_seen(self, key: str, pod: JsonObject) -> None:
        if is_terminal(pod):
            self._pod_gone(key)
            return
        try:
            pod_requests(pod)
        except ValueError as error:
            log.warning("%s: ignored, as the API would have refused it: %s", key, error)
            self._pod_gone(key)
            return
        old = self.pods.get(key)
        self.pods[key] = pod
        if (pod.get("spec") or {}).get("nodeName"):
            self.assumed.pop(key, None)  # the binding is confirmed (or another scheduler bound it)
            self.queue.delete(key)
        elif key in self.assumed:
            pass  # its binding is in flight: this is an older view of it
        elif wants_scheduling(pod):
            self.queue.update(key, old, pod)
        else:
            self.queue.delete(key)
        self._recharge(key)

    def _pod_gone(self, key: str) -> None:
        old = self.pods.pop(key, None) or {}
        node = self.assumed.pop(key, None) or (old.get("spec") or {}).get("nodeName")
        self._recharge(key)
        self.queue.delete(key)
        if node:
            self._wake_for(node)
