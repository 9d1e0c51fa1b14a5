"""A simulated kubelet for one node: registers the node, hosts the device-plugin API, runs pods.

Its device manager (simulation.kubelet_devices) talks to the node agent's device plugin over
real gRPC on unix sockets, exactly as a kubelet does. As in a real kubelet, the device list it
allocates from changes as soon as a plugin sends one, but the node's capacity and allocatable in
the API, which is all a scheduler sees, change only on the node-status sync, every
`status_period_s` (kubernetes/kubernetes#55088): a scheduler may bind a pod here for a slice the
plugin withdrew seconds ago, and then admission fails, as it would in a real cluster. A pod bound
here gets its devices and environment from the plugin's Allocate before it is marked Running; one
that cannot is marked Failed with the kubelet's reason, `UnexpectedAdmissionError`. A pod with a
run time succeeds when it is over and gives its slice back. No containers run: "running" is a
phase and a record of what the plugin gave. It is part of the simulated cluster only.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import TaskGroup
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from events.vocabulary import slice_size
from node_agent.slices import parse_slice_device_id
from services.kit.watching import Listing, list_and_watch
from simulation.kubelet_devices import AdmissionError, DeviceManager, PodRef
from simulation.scenario import ScenarioNode

log = logging.getLogger(__name__)

RUNS_FOR_ANNOTATION = "demo.mpsflow.dev/runs-for"
RECLAIM_WINDOW_S = 0.5
"""A node agent applies a layout in one slice list, which reaches the kubelet as one update per
resource (slice size) within milliseconds: a slice that vanished from a GPU this close to another
slice of that GPU appearing went in the same change."""
BASE_CAPACITY = {"cpu": "64", "memory": "512Gi", "pods": "110"}


@dataclass
class StartedPod:
    """What the kubelet did for one pod: when, on which GPU, with which environment, and when the
    slice it got was first listed to the kubelet (None for a pod without a slice)."""

    started_at: float
    device_ids: list[str]
    envs: dict[str, str]
    cdi_devices: list[str]
    slice_listed_at: float | None = None
    """When the plugin listed the slice the pod got, as it was listed at admission (a slice withdrawn
    and carved again counts from its new listing)."""
    reclaimed: list[str] = field(default_factory=list)
    """Slices of the same GPU that the plugin withdrew within `RECLAIM_WINDOW_S` of listing the
    pod's: the GPU was carved anew to make the pod's slice, a free slice reclaimed for it."""

    @property
    def gpu(self) -> int | None:
        return parse_slice_device_id(self.device_ids[0])[0] if self.device_ids else None


def plugin_dir(root: Path) -> Path:
    """The device-plugin directory of the kubelet whose files are under `root`."""
    return root / "plugins"


def pod_resources_socket(root: Path) -> Path:
    """The pod-resources socket of the kubelet whose files are under `root`."""
    return root / "pod-resources.sock"


def _gpu_of(device_id: str) -> int | None:
    try:
        return parse_slice_device_id(device_id)[0]
    except ValueError:  # not a slice
        return None


@dataclass
class Kubelet:
    api: client.ApiClient
    node: ScenarioNode
    root: Path
    status_period_s: float = 10.0
    started: dict[str, StartedPod] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # pod key -> why admission failed

    def __post_init__(self) -> None:
        self.core = client.CoreV1Api(self.api)
        self.plugin_dir = plugin_dir(self.root)
        self.pod_resources_socket = pod_resources_socket(self.root)
        self.plugin_dir.mkdir(parents=True, exist_ok=True)
        self.devices = DeviceManager(
            self.plugin_dir,
            pod_resources_socket=self.pod_resources_socket,
            on_capacity=self._capacity_changed,
        )
        self._group: TaskGroup | None = None
        self._device_counts: dict[str, int] = {}
        self._reported_counts: dict[str, int] = {}

    async def register_node(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node.name, "labels": self.node.all_labels()},
            "spec": {"taints": self.node.taints} if self.node.taints else {},
        }
        await self.core.create_node(body, _request_timeout=10)  # type: ignore[arg-type]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status = {
            "status": {
                "capacity": BASE_CAPACITY,
                "allocatable": BASE_CAPACITY,
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastTransitionTime": now}
                ],
            }
        }
        await self._patch_status(status)

    async def _patch_status(self, patch: dict[str, Any]) -> None:
        await self.core.patch_node_status(
            self.node.name,
            patch,
            _content_type="application/merge-patch+json",  # type: ignore[call-arg]
            _request_timeout=10,
        )

    async def _capacity_changed(self, counts: dict[str, int]) -> None:
        """The device manager's counts changed; the API hears of it at the next status sync."""
        self._device_counts = dict(counts)

    async def sync_status_forever(self) -> None:
        """The node-status loop: every `status_period_s`, copy the device counts into the node's
        capacity and allocatable when they changed since the last sync."""
        while True:
            await anyio.sleep(self.status_period_s)
            counts = dict(self._device_counts)
            if counts == self._reported_counts:
                continue
            # A resource that is gone is reported at 0, as a kubelet does for a plugin that left.
            reported = {name: "0" for name in self._reported_counts} | {k: str(v) for k, v in counts.items()}
            resources = {**BASE_CAPACITY, **reported}
            try:
                await self._patch_status({"status": {"capacity": resources, "allocatable": resources}})
            except (ApiException, OSError, TimeoutError) as error:
                log.warning(
                    "%s: node status not updated (%s); next sync in %.0fs",
                    self.node.name,
                    error,
                    self.status_period_s,
                )
                continue
            self._reported_counts = counts

    async def run(self) -> None:
        await self.devices.start()
        try:
            async with anyio.create_task_group() as group:
                self._group = group
                group.start_soon(self.sync_status_forever)
                await list_and_watch(
                    self.api,
                    self.core.list_pod_for_all_namespaces,
                    self._relist,
                    self._changed,
                    field_selector=f"spec.nodeName={self.node.name}",
                )
        finally:
            with anyio.CancelScope(shield=True):
                await self.devices.stop()

    async def _relist(self, items: Listing) -> None:
        async for item in items:
            await self._changed("MODIFIED", item)

    async def _changed(self, change: str, pod: dict[str, Any]) -> None:
        metadata = pod["metadata"]
        key = f"{metadata['namespace']}/{metadata['name']}"
        if change == "DELETED":
            self.devices.release(metadata["uid"])
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase == "Pending" and key not in self.started and key not in self.failed:
            await self._start(key, pod)

    async def _start(self, key: str, pod: dict[str, Any]) -> None:
        metadata = pod["metadata"]
        requests = [
            (container["name"], resource)
            for container in pod["spec"].get("containers") or []
            for resource in {
                **((container.get("resources") or {}).get("requests") or {}),
                **((container.get("resources") or {}).get("limits") or {}),
            }
            if slice_size(resource) is not None
        ]
        try:
            allocated = (
                await self.devices.allocate(
                    PodRef(metadata["namespace"], metadata["name"], metadata["uid"]), requests
                )
                if requests
                else {}
            )
        except AdmissionError as error:
            self.failed[key] = error.reason
            log.warning("%s: admission failed: %s", key, error.reason)
            await self._set_phase(pod, "Failed", reason="UnexpectedAdmissionError", message=error.reason)
            return
        device_ids = [d for container in allocated.values() for d in container.device_ids]
        envs = {k: v for container in allocated.values() for k, v in container.envs.items()}
        listed_at = self.devices.listed_since(device_ids[0]) if device_ids else None
        self.started[key] = StartedPod(
            started_at=time.monotonic(),
            device_ids=device_ids,
            envs=envs,
            cdi_devices=[d for container in allocated.values() for d in container.cdi_devices],
            slice_listed_at=listed_at,
            reclaimed=self._reclaimed_for(device_ids[0], listed_at) if listed_at is not None else [],
        )
        await self._set_phase(pod, "Running")
        runs_for = (metadata.get("annotations") or {}).get(RUNS_FOR_ANNOTATION)
        if runs_for is not None and self._group is not None:
            self._group.start_soon(self._finish_after, key, pod, float(runs_for))

    def _reclaimed_for(self, device_id: str, listed_at: float) -> list[str]:
        """The slices of `device_id`'s GPU withdrawn in the change that listed it (`StartedPod`)."""
        gpu = _gpu_of(device_id)
        window = self.devices.withdrawn_between(listed_at - RECLAIM_WINDOW_S, listed_at + RECLAIM_WINDOW_S)
        return [other for other in window if other != device_id and gpu is not None and _gpu_of(other) == gpu]

    async def _finish_after(self, key: str, pod: dict[str, Any], seconds: float) -> None:
        await anyio.sleep(seconds)
        self.devices.release(pod["metadata"]["uid"])
        await self._set_phase(pod, "Succeeded")

    async def _set_phase(
        self, pod: dict[str, Any], phase: str, *, reason: str | None = None, message: str | None = None
    ) -> None:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        status: dict[str, Any] = {"phase": phase, "startTime": now, "hostIP": "10.0.0.1"}
        if reason is not None:
            status.update(reason=reason, message=message)
        try:
            await self.core.patch_namespaced_pod_status(
                pod["metadata"]["name"],
                pod["metadata"]["namespace"],
                {"status": status},
                _content_type="application/merge-patch+json",
                _request_timeout=10,  # type: ignore[call-arg]
            )
        except ApiException as error:
            if error.status != 404:
                raise
