"""The simulated kubelet's device manager: the kubelet side of the device-plugin API.

Used by the simulated kubelet (demo and e2e) in place of a real one. It serves
``Registration`` on ``<plugin_dir>/kubelet.sock`` and ``PodResourcesLister`` (List and
GetAllocatableResources) on its own socket, dials back every plugin that registers, follows its
ListAndWatch stream to know the node's devices at once, reports per-resource capacity through a
callback (the kubelet copies it into the node's status only on its node-status period), and at
pod admission picks free devices (asking the plugin's GetPreferredAllocation) and calls
Allocate, like the real kubelet's devicemanager does. Everything goes over real gRPC on unix
sockets, so the node agent's plugin is exercised exactly as in a cluster.

When a plugin's ListAndWatch stream breaks (the plugin stopped, or was killed), it does what the
kubelet's `PluginDisconnected` does: every device of that resource stays known but is marked
unhealthy at once (`markResourceUnhealthy`), so none is allocated, counted as allocatable or
listed by GetAllocatableResources, and the devices already allocated to pods stay theirs. A plugin
that registers again lists its devices afresh. Unlike the kubelet, it never forgets a disconnected
resource (the kubelet does after a 5-minute grace period) and counts only healthy devices as
capacity.

It must never reach into the plugin other than through the gRPC API, and it is a test double:
no checkpointing, no topology alignment, no init-container reuse.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from node_agent.proto_gen import deviceplugin_v1beta1_pb2 as api
from node_agent.proto_gen import deviceplugin_v1beta1_pb2_grpc as api_grpc
from node_agent.proto_gen import podresources_v1_pb2 as podresources
from node_agent.proto_gen import podresources_v1_pb2_grpc as podresources_grpc

logger = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET_NAME = "kubelet.sock"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
PLUGIN_CALL_TIMEOUT_S = 5.0
SERVER_STOP_GRACE_S = 1.0

_Context = grpc.aio.ServicerContext


class AdmissionError(Exception):
    """A pod cannot be admitted because its devices cannot be allocated."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PodRef:
    namespace: str
    name: str
    uid: str


@dataclass(frozen=True)
class AllocatedContainer:
    """What the plugin's Allocate told the kubelet to give one container."""

    device_ids: list[str]
    envs: dict[str, str]
    mounts: list[tuple[str, str, bool]]  # (container path, host path, read only)
    annotations: dict[str, str]
    cdi_devices: list[str]  # what the kubelet passes to a CDI-enabled runtime


@dataclass
class _Plugin:
    resource: str
    endpoint: str
    channel: grpc.aio.Channel
    stub: api_grpc.DevicePluginStub
    options: api.DevicePluginOptions
    watcher: asyncio.Task[None] | None = None


@dataclass
class _PodAssignment:
    pod: PodRef
    # container name -> (resource name, allocation)
    containers: dict[str, tuple[str, AllocatedContainer]] = field(default_factory=dict)


class DeviceManager:
    """Registers device plugins, tracks their devices and allocates them to pods."""

    def __init__(
        self,
        plugin_dir: Path,
        *,
        pod_resources_socket: Path,
        on_capacity: Callable[[dict[str, int]], Awaitable[None]],
    ) -> None:
        self._plugin_dir = plugin_dir
        self._kubelet_socket = plugin_dir / KUBELET_SOCKET_NAME
        self._pod_resources_socket = pod_resources_socket
        self._on_capacity = on_capacity
        self._servers: list[grpc.aio.Server] = []
        self._plugins: dict[str, _Plugin] = {}
        self._devices: dict[str, dict[str, str]] = {}
        self._listed_since: dict[str, float] = {}  # device ID -> since when it has been listed
        self._withdrawn: list[tuple[float, str]] = []  # (when, device ID) a plugin stopped listing it
        self._pods: dict[str, _PodAssignment] = {}
        self._capacity_lock = asyncio.Lock()
        self._admission_lock = asyncio.Lock()

    async def start(self) -> None:
        """Serve Registration on ``<plugin_dir>/kubelet.sock`` and PodResourcesLister."""
        registration = grpc.aio.server()
        api_grpc.add_RegistrationServicer_to_server(_RegistrationService(self), registration)
        pod_resources = grpc.aio.server()
        podresources_grpc.add_PodResourcesListerServicer_to_server(_PodResourcesService(self), pod_resources)
        for server, socket_path in (
            (registration, self._kubelet_socket),
            (pod_resources, self._pod_resources_socket),
        ):
            socket_path.unlink(missing_ok=True)
            server.add_insecure_port(f"unix:{socket_path}")
            await server.start()
            self._servers.append(server)

    async def allocate(
        self, pod: PodRef, containers: Sequence[tuple[str, str]]
    ) -> dict[str, AllocatedContainer]:
        """Allocate one device of the named resource to each ``(container, resource)``.

        All or nothing: on AdmissionError the pod gets no new devices. Containers of the pod
        that already hold a device keep it.
        """
        async with self._admission_lock:
            assignment = self._pods.get(pod.uid, _PodAssignment(pod))
            taken = {device_id for pod_uid in self._pods for device_id in self._device_ids_of(pod_uid)}
            granted: dict[str, tuple[str, AllocatedContainer]] = {}
            for container, resource in containers:
                held = assignment.containers.get(container)
                if held is not None and held[0] == resource:
                    granted[container] = held
                    continue
                allocation = await self._allocate_one(resource, taken)
                taken.update(allocation.device_ids)
                granted[container] = (resource, allocation)
            assignment.containers.update(granted)
            self._pods[pod.uid] = assignment
            return {container: allocation for container, (_, allocation) in granted.items()}

    def release(self, pod_uid: str) -> None:
        """Forget a pod's devices (the pod is gone)."""
        self._pods.pop(pod_uid, None)

    def assignments(self) -> dict[str, dict[str, list[str]]]:
        """pod uid -> container name -> device IDs."""
        return {
            pod_uid: {
                container: list(allocation.device_ids)
                for container, (_, allocation) in pod.containers.items()
            }
            for pod_uid, pod in self._pods.items()
        }

    def devices(self) -> dict[str, dict[str, str]]:
        """resource -> device ID -> health, as last listed by each plugin."""
        return {resource: dict(devices) for resource, devices in self._devices.items()}

    def listed_since(self, device_id: str) -> float | None:
        """Since when (loop time) the plugin has listed `device_id` without a break (the last time
        it appeared in the list), or None while it does not list it. A device withdrawn and
        listed again (the same slice carved again) counts from its new listing."""
        return self._listed_since.get(device_id)

    def withdrawn_between(self, start: float, end: float) -> list[str]:
        """The devices a plugin stopped listing between `start` and `end` (loop time), in order."""
        return [device_id for at, device_id in self._withdrawn if start <= at <= end]

    async def restart(self) -> None:
        """Behave like a kubelet restart: every plugin must register again; pods keep devices."""
        await self._shut_down()
        for path in self._plugin_dir.iterdir():
            if path.is_socket():
                path.unlink(missing_ok=True)
        self._devices = {resource: {} for resource in self._devices}
        await self._report_capacity()
        await self.start()

    async def stop(self) -> None:
        await self._shut_down()
        self._kubelet_socket.unlink(missing_ok=True)
        self._pod_resources_socket.unlink(missing_ok=True)

    async def _shut_down(self) -> None:
        servers, self._servers = self._servers, []
        # Servers first, so no registration lands after the plugins are disconnected.
        await asyncio.gather(*(server.stop(SERVER_STOP_GRACE_S) for server in servers))
        plugins, self._plugins = list(self._plugins.values()), {}
        await asyncio.gather(*(self._disconnect(plugin) for plugin in plugins))

    def _device_ids_of(self, pod_uid: str) -> list[str]:
        return [
            device_id
            for _, allocation in self._pods[pod_uid].containers.values()
            for device_id in allocation.device_ids
        ]

    async def _allocate_one(self, resource: str, taken: set[str]) -> AllocatedContainer:
        plugin = self._plugins.get(resource)
        if plugin is None:
            raise AdmissionError(f"no device plugin is registered for {resource}")
        free = sorted(
            device_id
            for device_id, health in self._devices.get(resource, {}).items()
            if health == HEALTHY and device_id not in taken
        )
        if not free:
            raise AdmissionError(f"no free {resource} device on this node")
        try:
            device_id = await self._pick(plugin, free)
            response = await plugin.stub.Allocate(
                api.AllocateRequest(
                    container_requests=[api.ContainerAllocateRequest(devices_ids=[device_id])]
                ),
                timeout=PLUGIN_CALL_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as error:
            raise AdmissionError(
                f"device plugin for {resource} failed: {error.code().name}: {error.details()}"
            ) from error
        if len(response.container_responses) != 1:
            raise AdmissionError(
                f"device plugin for {resource} answered for {len(response.container_responses)} containers, "
                "expected 1"
            )
        container_response = response.container_responses[0]
        return AllocatedContainer(
            device_ids=[device_id],
            envs=dict(container_response.envs),
            mounts=[
                (mount.container_path, mount.host_path, mount.read_only)
                for mount in container_response.mounts
            ],
            annotations=dict(container_response.annotations),
            cdi_devices=[device.name for device in container_response.cdi_devices],
        )

    async def _pick(self, plugin: _Plugin, free: list[str]) -> str:
        """The plugin's preferred device among ``free`` if it has a valid preference, else the first."""
        if plugin.options.get_preferred_allocation_available:
            response = await plugin.stub.GetPreferredAllocation(
                api.PreferredAllocationRequest(
                    container_requests=[
                        api.ContainerPreferredAllocationRequest(available_deviceIDs=free, allocation_size=1)
                    ]
                ),
                timeout=PLUGIN_CALL_TIMEOUT_S,
            )
            for container_response in response.container_responses:
                for device_id in container_response.deviceIDs:
                    if device_id in free:
                        return device_id
        return free[0]

    async def _register(
        self, request: api.RegisterRequest, context: _Context[api.RegisterRequest, api.Empty]
    ) -> api.Empty:
        if request.version != API_VERSION:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unsupported API version {request.version!r}"
            )
        if "/" not in request.resource_name:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{request.resource_name!r} is not an extended resource name",
            )
        if not request.endpoint or Path(request.endpoint).name != request.endpoint:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"endpoint {request.endpoint!r} is not a file name in {self._plugin_dir}",
            )
        channel = grpc.aio.insecure_channel(f"unix:{self._plugin_dir / request.endpoint}")
        stub = api_grpc.DevicePluginStub(channel)
        try:
            options = await stub.GetDevicePluginOptions(api.Empty(), timeout=PLUGIN_CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            await channel.close(None)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"cannot reach device plugin at {request.endpoint}: {error.details()}",
            )
        except asyncio.CancelledError:
            await channel.close(None)
            raise
        plugin = _Plugin(
            resource=request.resource_name,
            endpoint=request.endpoint,
            channel=channel,
            stub=stub,
            options=options,
        )
        previous = self._plugins.pop(plugin.resource, None)
        if previous is not None:
            await self._disconnect(previous)
        self._plugins[plugin.resource] = plugin
        self._devices.setdefault(plugin.resource, {})
        plugin.watcher = asyncio.create_task(self._watch(plugin), name=f"ListAndWatch {plugin.resource}")
        logger.info("device plugin registered %s at %s", plugin.resource, plugin.endpoint)
        return api.Empty()

    async def _watch(self, plugin: _Plugin) -> None:
        try:
            async for response in plugin.stub.ListAndWatch(api.Empty()):
                now = asyncio.get_running_loop().time()
                listed = {device.ID: device.health for device in response.devices}
                for device_id in self._devices.get(plugin.resource, {}).keys() - listed.keys():
                    self._listed_since.pop(device_id, None)
                    self._withdrawn.append((now, device_id))
                for device_id in listed:
                    self._listed_since.setdefault(device_id, now)
                self._devices[plugin.resource] = listed
                await self._report_capacity()
            logger.warning("ListAndWatch for %s ended", plugin.resource)
        except grpc.aio.AioRpcError as error:
            logger.warning(
                "ListAndWatch for %s broke: %s %s", plugin.resource, error.code().name, error.details()
            )
        if self._plugins.get(plugin.resource) is plugin:
            del self._plugins[plugin.resource]
            self._devices[plugin.resource] = dict.fromkeys(self._devices[plugin.resource], UNHEALTHY)
            await plugin.channel.close(None)
            await self._report_capacity()

    async def _disconnect(self, plugin: _Plugin) -> None:
        if plugin.watcher is not None:
            plugin.watcher.cancel()
            await asyncio.wait([plugin.watcher])
        await plugin.channel.close(None)

    async def _report_capacity(self) -> None:
        async with self._capacity_lock:
            capacity = {
                resource: sum(1 for health in devices.values() if health == HEALTHY)
                for resource, devices in sorted(self._devices.items())
            }
            try:
                await self._on_capacity(capacity)
            except Exception:
                logger.exception("capacity callback failed for %s", capacity)

    def _allocatable_resources(self) -> podresources.AllocatableResourcesResponse:
        """The healthy devices only, as the kubelet has answered since kubernetes/kubernetes#104123."""
        healthy = {
            resource: sorted(d for d, health in devices.items() if health == HEALTHY)
            for resource, devices in sorted(self._devices.items())
        }
        return podresources.AllocatableResourcesResponse(
            devices=[
                podresources.ContainerDevices(resource_name=resource, device_ids=device_ids)
                for resource, device_ids in healthy.items()
                if device_ids
            ]
        )

    def _list_pod_resources(self) -> podresources.ListPodResourcesResponse:
        return podresources.ListPodResourcesResponse(
            pod_resources=[
                podresources.PodResources(
                    name=assignment.pod.name,
                    namespace=assignment.pod.namespace,
                    containers=[
                        podresources.ContainerResources(
                            name=container,
                            devices=[
                                podresources.ContainerDevices(
                                    resource_name=resource, device_ids=allocation.device_ids
                                )
                            ],
                        )
                        for container, (resource, allocation) in assignment.containers.items()
                    ],
                )
                for assignment in self._pods.values()
            ]
        )


class _RegistrationService(api_grpc.RegistrationServicer):
    def __init__(self, manager: DeviceManager) -> None:
        self._manager = manager

    async def Register(  # noqa: N802 (gRPC method name)
        self, request: api.RegisterRequest, context: _Context[api.RegisterRequest, api.Empty]
    ) -> api.Empty:
        return await self._manager._register(request, context)


class _PodResourcesService(podresources_grpc.PodResourcesListerServicer):
    def __init__(self, manager: DeviceManager) -> None:
        self._manager = manager

    async def List(  # noqa: N802 (gRPC method name)
        self,
        request: podresources.ListPodResourcesRequest,
        context: _Context[podresources.ListPodResourcesRequest, podresources.ListPodResourcesResponse],
    ) -> podresources.ListPodResourcesResponse:
        return self._manager._list_pod_resources()

    async def GetAllocatableResources(  # noqa: N802 (gRPC method name)
        self,
        request: podresources.AllocatableResourcesRequest,
        context: _Context[
            podresources.AllocatableResourcesRequest, podresources.AllocatableResourcesResponse
        ],
    ) -> podresources.AllocatableResourcesResponse:
        return self._manager._allocatable_resources()
