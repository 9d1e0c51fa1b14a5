"""A simulated kube-scheduler: binds pending pods to nodes whose allocatable resources fit.

It watches pods and nodes through the real kubernetes-asyncio client, like any controller, and
binds in priority order (then age, then name). A pod that fits nowhere gets the condition
`PodScheduled=False, reason=Unschedulable` with a kube-scheduler style message. It models
extended resources (the MPS slices) and node readiness/cordoning, nothing else: no CPU or memory
fit, affinity, taints or preemption. It is part of the simulated cluster only.
"""

from __future__ import annotations

import logging
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import anyio
from kubernetes_asyncio import client

from services.kit.signal import Wakeup
from services.pod_watcher.watching import list_and_watch

log = logging.getLogger(__name__)

EXTENDED_PREFIX = "nvidia.com/"


def extended_requests(pod: dict[str, Any]) -> Counter[str]:
    """Units of `nvidia.com/*` resources the pod's containers ask for (limits win over requests)."""
    total: Counter[str] = Counter()
    for container in (pod.get("spec") or {}).get("containers") or []:
        resources = container.get("resources") or {}
        asked = {**(resources.get("requests") or {}), **(resources.get("limits") or {})}
        for name, quantity in asked.items():
            if name.startswith(EXTENDED_PREFIX):
                try:
                    total[name] += int(str(quantity))
                except ValueError:
                    total[name] += 1
    return total


def is_terminal(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def _is_ready(node: dict[str, Any]) -> bool:
    conditions = (node.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _order(pod: dict[str, Any]) -> tuple[int, str, str, str]:
    metadata = pod["metadata"]
    return (
        -int((pod.get("spec") or {}).get("priority") or 0),
        str(metadata.get("creationTimestamp") or ""),
        metadata.get("namespace", ""),
        metadata["name"],
    )


class Scheduler:
    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.pods: dict[str, dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self._wakeup = Wakeup()

    async def run(self) -> None:
        async with anyio.create_task_group() as group:
            group.start_soon(
                lambda: list_and_watch(self.api, self.core.list_node, self._relist_nodes, self._node_changed)
            )
            group.start_soon(
                lambda: list_and_watch(
                    self.api, self.core.list_pod_for_all_namespaces, self._relist_pods, self._pod_changed
                )
            )
            while True:
                await self._wakeup.wait(1.0)
                await self.schedule_pending()

    async def _relist_nodes(self, items: list[dict[str, Any]]) -> None:
        self.nodes = {item["metadata"]["name"]: item for item in items}
        self._wakeup.set()

    async def _node_changed(self, change: str, node: dict[str, Any]) -> None:
        if change == "DELETED":
            self.nodes.pop(node["metadata"]["name"], None)
        else:
            self.nodes[node["metadata"]["name"]] = node
        self._wakeup.set()

    async def _relist_pods(self, items: list[dict[str, Any]]) -> None:
        self.pods = {f"{i['metadata']['namespace']}/{i['metadata']['name']}": i for i in items}
        self._wakeup.set()

    async def _pod_changed(self, change: str, pod: dict[str, Any]) -> None:
        key = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        if change == "DELETED":
            self.pods.pop(key, None)
        else:
            self.pods[key] = pod
        self._wakeup.set()

    def _usage(self) -> dict[str, Counter[str]]:
        usage: dict[str, Counter[str]] = {}
        for pod in self.pods.values():
            node = (pod.get("spec") or {}).get("nodeName")
            if node and not is_terminal(pod):
                usage.setdefault(node, Counter()).update(extended_requests(pod))
        return usage

    def _fits(self, node: dict[str, Any], used: Counter[str], wanted: Counter[str]) -> list[str]:
        """The resources this node lacks for the pod (empty when it fits)."""
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        return [
            name
            for name, count in wanted.items()
            if int(str(allocatable.get(name, "0"))) - used[name] < count
        ]

    async def schedule_pending(self) -> None:
        usage = self._usage()
        pending = [
            p
            for p in self.pods.values()
            if not (p.get("spec") or {}).get("nodeName") and (p.get("status") or {}).get("phase") == "Pending"
        ]
        for pod in sorted(pending, key=_order):
            wanted = extended_requests(pod)
            lacking: Counter[str] = Counter()
            unavailable = 0
            chosen = None
            for name, node in sorted(self.nodes.items()):
                if not _is_ready(node) or (node.get("spec") or {}).get("unschedulable"):
                    unavailable += 1
                    continue
                missing = self._fits(node, usage.get(name, Counter()), wanted)
                if not missing:
                    chosen = name
                    break
                lacking.update(missing)
            if chosen is not None:
                if await self._bind(pod, chosen):
                    usage.setdefault(chosen, Counter()).update(wanted)
            else:
                reasons = [f"{count} Insufficient {name}" for name, count in sorted(lacking.items())]
                if unavailable:
                    reasons.append(f"{unavailable} node(s) were unschedulable or not ready")
                await self._mark_unschedulable(
                    pod, f"0/{len(self.nodes)} nodes are available: " + ", ".join(reasons) + "."
                )

    async def _bind(self, pod: dict[str, Any], node: str) -> bool:
        metadata = pod["metadata"]
        body = client.V1Binding(
            metadata=client.V1ObjectMeta(name=metadata["name"]),
            target=client.V1ObjectReference(api_version="v1", kind="Node", name=node),
        )
        # The API answers a binding with a Status that the client cannot decode into a model.
        response: Any = await self.core.create_namespaced_pod_binding(
            metadata["name"], metadata["namespace"], body, _preload_content=False, _request_timeout=10
        )
        bound: bool = response.status in (200, 201)
        response.release()
        if bound:
            pod.setdefault("spec", {})["nodeName"] = node
        else:
            log.info(
                "binding %s/%s to %s refused (%s)",
                metadata["namespace"],
                metadata["name"],
                node,
                response.status,
            )
        return bound

    async def _mark_unschedulable(self, pod: dict[str, Any], message: str) -> None:
        conditions = (pod.get("status") or {}).get("conditions") or []
        current = next((c for c in conditions if c.get("type") == "PodScheduled"), None)
        if (
            current is not None
            and current.get("reason") == "Unschedulable"
            and current.get("message") == message
        ):
            return
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastTransitionTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        await self.core.patch_namespaced_pod_status(
            pod["metadata"]["name"],
            pod["metadata"]["namespace"],
            {"status": {"conditions": [condition]}},
            _content_type="application/merge-patch+json",
            _request_timeout=10,  # type: ignore[call-arg]
        )
