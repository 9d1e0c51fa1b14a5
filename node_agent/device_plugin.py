"""The node agent's kubelet device plugin: offers MPS slices as ``nvidia.com/gpu-<N>gb``.

Sits at the end of the node agent's flow: once the agent has carved the GPUs into slices and
the MPS daemons run, it hands the slice list to :meth:`SliceDevicePlugin.set_devices`. The
plugin serves the kubelet device-plugin API (v1beta1) on one unix socket per resource in the
kubelet's device-plugins directory, registers each resource with the kubelet, streams the
slice list through ListAndWatch and answers Allocate with the MPS environment, the pipe mount
and, in the ``shm-directory`` IPC mode, the GPU's ``/dev/shm`` mount, from
:func:`node_agent.slices.container_allocation`.

It never decides what the slices are, never touches NVML or the MPS daemons, and never
withdraws a resource once served: a resource whose slices all disappear keeps its socket and
lists no devices, so pods already bound to it are not orphaned by a re-registration. Nor does it
drop a slice it handed out after the list it is given was decided (`set_devices`'s
`seen_allocations`): the kubelet may be starting a container on it.

It runs where the slices must outlive the agent's restarts: in `mpsflow run mps-daemons`, which the
agent reaches through `node_agent.link`, or, with `--mps-daemons own`, in the agent itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import grpc.aio

from events.vocabulary import DEFAULT_MPS_IPC, MpsIpcMode
from node_agent.proto_gen import deviceplugin_v1beta1_pb2 as api
from node_agent.proto_gen import deviceplugin_v1beta1_pb2_grpc as api_grpc
from node_agent.slices import (
    DEFAULT_CDI_KIND,
    DeviceListStrategy,
    SliceDevice,
    ThreadPolicy,
    container_allocation,
    parse_slice_device_id,
)
from services.kit.retry import KUBELET

logger = logging.getLogger(__name__)

API_VERSION = "v1beta1"
KUBELET_SOCKET_NAME = "kubelet.sock"
HEALTHY = "Healthy"
UNHEALTHY = "Unhealthy"
WATCH_INTERVAL_S = 0.1
"""How often `SliceDevicePlugin.run` looks at ``kubelet.sock``: a restarted kubelet re-creates it."""
OWN_SOCKETS_CHECK_S = 1.0
"""How often it also looks at its own sockets while ``kubelet.sock`` stays as it was. A restarting
kubelet deletes them and then re-creates ``kubelet.sock``, so that case is seen within
`WATCH_INTERVAL_S`; this covers a socket deleted by anything else. One look at every socket of
every node each 0.1 s cost a node host of 25 simulated nodes a tenth of its CPU."""
REGISTER_TIMEOUT_S = 5.0
SERVER_STOP_GRACE_S = 1.0

_Context = grpc.aio.ServicerContext

# Inode and change time, so a re-created socket file differs even if its inode number is reused
# (unless within one filesystem timestamp tick; a restarting kubelet also deletes our sockets,
# which is noticed independently).
FileIdentity = tuple[int, int]


FOREIGN_GPU_PLUGIN_SOCKETS = "nvidia*.sock"
"""NVIDIA's device plugin (and nebuly's fork) serve `nvidia.com/gpu` and MIG resources on sockets
named so (`nvidia-gpu.sock`, `nvidia-mig-1g.10gb.sock`)."""


def foreign_gpu_plugins(plugin_dir: Path) -> list[str]:
    """The sockets of another GPU device plugin that is serving on this node now (one that accepts a
    connection; a socket file left by a plugin that stopped does not count). While one serves the
    same GPUs, its MPS daemon resets the compute mode and its resources hand the GPUs out whole."""
    serving = []
    for path in sorted(plugin_dir.glob(FOREIGN_GPU_PLUGIN_SOCKETS)):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:
                continue
        serving.append(path.name)
    return serving


@dataclass(frozen=True)
class Allocations:
    """What Allocate handed out: device ID -> the event loop's time of its last allocation, and how
    many allocations there have been in all (`count`), which `set_devices` takes back as
    `seen_allocations` to tell which allocations its caller had not seen."""

    at: dict[str, float]
    count: int


class SliceServer(Protocol):
    """What the node agent needs of whatever serves its slices to the kubelet: `SliceDevicePlugin`
    in its own process, or `node_agent.link.RemotePlugin`, the one the keeper runs."""

    outlives_agent: bool
    """Whether the slices stay served once the agent has stopped."""

    async def set_devices(
        self,
        devices: Sequence[SliceDevice],
        *,
        avoided_gpus: frozenset[int] = frozenset(),
        seen_allocations: int | None = None,
    ) -> tuple[SliceDevice, ...]: ...

    async def allocations(self) -> Allocations: ...

    async def served(self) -> tuple[tuple[SliceDevice, ...], frozenset[int]]: ...

    async def run(self) -> None: ...

    async def close(self) -> None: ...


def _file_identity(path: Path) -> FileIdentity | None:
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_ino, status.st_ctime_ns


def _device_order(
    device_id: str, avoided_gpus: frozenset[int] = frozenset(), listed_in: Mapping[str, int] | None = None
) -> tuple[bool, int, int, int]:
    """Slices of GPUs to avoid last; then the slice listed first (`listed_in`: the slice list it
    joined, counted from 1), so that pods bound one after the other get slices in the order they
    were carved, the first pod of a burst not one carved for the last; then by GPU and ordinal."""
    gpu_index, _, ordinal = parse_slice_device_id(device_id)
    joined = (listed_in or {}).get(device_id, sys.maxsize)
    return gpu_index in avoided_gpus, joined, gpu_index, ordinal


class SliceDevicePlugin:
    """Serves every slice resource of this node to the kubelet and keeps it registered."""

    outlives_agent = False
    """In the agent's own process, the slices go when the agent goes."""

    def __init__(
        self,
        *,
        plugin_dir: Path,
        pipe_root: Path,
        thread_policy: ThreadPolicy = "proportional",
        device_list_strategy: DeviceListStrategy = "cdi-cri",
        cdi_kind: str = DEFAULT_CDI_KIND,
        ipc: MpsIpcMode = DEFAULT_MPS_IPC,
        socket_prefix: str = "mpsflow",
    ) -> None:
        self._plugin_dir = plugin_dir
        self._kubelet_socket = plugin_dir / KUBELET_SOCKET_NAME
        self._pipe_root = pipe_root
        self._thread_policy: ThreadPolicy = thread_policy
        self._device_list_strategy: DeviceListStrategy = device_list_strategy
        self._cdi_kind = cdi_kind
        self._ipc: MpsIpcMode = ipc
        self._socket_prefix = socket_prefix
        self._devices: dict[str, SliceDevice] = {}
        self._avoided_gpus: frozenset[int] = frozenset()
        self._servers: dict[str, _ResourceServer] = {}
        self._allocations: dict[str, float] = {}
        self._allocation_count = 0
        self._allocated_as: dict[str, int] = {}  # device ID -> the count its last allocation made
        self._lists = 0  # slice lists set so far
        self._listed_in: dict[str, int] = {}  # device ID -> the list it joined (`_device_order`)
        self._kubelet_seen: FileIdentity | None = None  # kubelet.sock at the last supervision step
        self._sockets_checked_at = -OWN_SOCKETS_CHECK_S  # event loop time our sockets were last looked at
        # Serialises set_devices, the supervision loop and close around the servers.
        self._lock = asyncio.Lock()

    async def set_devices(
        self,
        devices: Sequence[SliceDevice],
        *,
        avoided_gpus: frozenset[int] = frozenset(),
        seen_allocations: int | None = None,
    ) -> tuple[SliceDevice, ...]:
        """Make ``devices`` the full slice list; serves and registers resources seen first here.
        The kubelet is asked to give out the slices of ``avoided_gpus`` (unhealthy ones) last.
        With ``seen_allocations`` (the `Allocations.count` the list was decided from), a slice that
        ``devices`` leaves out but that was allocated since stays. Returns the list now served.

        A failed registration does not raise: :meth:`run` retries it.
        """
        by_id = {device.id: device for device in devices}
        if len(by_id) != len(devices):
            raise ValueError("duplicate slice device IDs")
        async with self._lock:
            if seen_allocations is not None:
                for device_id, device in self._devices.items():
                    if device_id not in by_id and self._allocated_as.get(device_id, 0) > seen_allocations:
                        logger.info("%s was allocated since the new slice list was decided: kept", device_id)
                        by_id[device_id] = device
            self._devices = by_id
            self._avoided_gpus = avoided_gpus
            self._lists += 1
            self._listed_in = {device_id: self._listed_in.get(device_id, self._lists) for device_id in by_id}
            self._allocations = {
                device_id: at for device_id, at in self._allocations.items() if device_id in by_id
            }
            self._allocated_as = {
                device_id: count for device_id, count in self._allocated_as.items() if device_id in by_id
            }
            by_resource: dict[str, list[SliceDevice]] = {}
            for device in by_id.values():
                by_resource.setdefault(device.resource, []).append(device)
            for device in devices:
                if device.resource not in self._servers:
                    socket_path = self._plugin_dir / f"{self._socket_prefix}-{device.size_gb}gb.sock"
                    server = await _ResourceServer.start(self, device.resource, socket_path)
                    server.offer(_device_list(by_resource[device.resource]))
                    self._servers[device.resource] = server
                    await self._register(server)
            # Only a resource whose list changed tells the kubelet: every answer makes it work the
            # list through (and a simulated kubelet shares the node host's CPU).
            for resource, server in self._servers.items():
                server.offer(_device_list(by_resource.get(resource, ())))
            return tuple(by_id.values())

    async def run(self) -> None:
        """Keep every resource served and registered until cancelled; never raises otherwise.

        Notices a kubelet restart by its socket being re-created (looked at every
        `WATCH_INTERVAL_S`) or by one of our sockets being deleted (every `OWN_SOCKETS_CHECK_S`),
        then serves the deleted sockets again and re-registers. Failed registrations
        are retried on the ``KUBELET`` schedule (services/kit/retry.py), the wait cut short when
        ``kubelet.sock`` changes: stamina cannot cut its own wait short, so this loop waits itself.
        """
        failures = 0
        while True:
            try:
                async with self._lock:
                    all_registered = await self._reconcile_registrations()
            except Exception:
                logger.exception("device plugin supervision step failed")
                all_registered = False
            if all_registered:
                failures = 0
                await asyncio.sleep(WATCH_INTERVAL_S)
            else:
                failures += 1
                await self._sleep_unless_kubelet_changes(KUBELET.delay(failures))

    async def close(self) -> None:
        """End every ListAndWatch stream, stop the servers and remove their sockets."""
        async with self._lock:
            servers = list(self._servers.values())
            self._servers.clear()
            await asyncio.gather(*(server.stop() for server in servers))

    async def allocations(self) -> Allocations:
        """Device IDs handed out by Allocate, with the event loop's time of their last allocation.

        Entries are dropped when their device leaves the slice list.
        """
        return Allocations(dict(self._allocations), self._allocation_count)

    async def served(self) -> tuple[tuple[SliceDevice, ...], frozenset[int]]:
        """The slice list served now, and the GPUs whose slices the kubelet is asked to give out last."""
        return tuple(self._devices.values()), self._avoided_gpus

    async def _reconcile_registrations(self) -> bool:
        kubelet_identity = _file_identity(self._kubelet_socket)
        now = asyncio.get_running_loop().time()
        check_sockets = (
            kubelet_identity != self._kubelet_seen or now - self._sockets_checked_at >= OWN_SOCKETS_CHECK_S
        )
        self._kubelet_seen = kubelet_identity
        if check_sockets:
            self._sockets_checked_at = now
        all_registered = True
        for resource, server in list(self._servers.items()):
            current = server
            if check_sockets and _file_identity(server.socket_path) != server.socket_identity:
                logger.info(
                    "socket %s is gone (kubelet restart?); serving %s again", server.socket_path, resource
                )
                await server.stop()
                current = await _ResourceServer.start(self, resource, server.socket_path)
                current.offer(server.listed)
                self._servers[resource] = current
            elif current.registered_with not in (None, kubelet_identity):
                logger.info("kubelet socket changed (kubelet restart?); registering %s again", resource)
                current.registered_with = None
            if current.registered_with is None and not await self._register(current):
                all_registered = False
        return all_registered

    async def _register(self, server: _ResourceServer) -> bool:
        kubelet_identity = _file_identity(self._kubelet_socket)
        if kubelet_identity is None:
            logger.info(
                "kubelet socket %s does not exist yet; %s not registered",
                self._kubelet_socket,
                server.resource,
            )
            return False
        request = api.RegisterRequest(
            version=API_VERSION,
            endpoint=server.socket_path.name,
            resource_name=server.resource,
            options=api.DevicePluginOptions(get_preferred_allocation_available=True),
        )
        try:
            async with grpc.aio.insecure_channel(f"unix:{self._kubelet_socket}") as channel:
                await api_grpc.RegistrationStub(channel).Register(request, timeout=REGISTER_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            logger.warning(
                "registering %s failed: %s %s", server.resource, error.code().name, error.details()
            )
            return False
        server.registered_with = kubelet_identity
        logger.info("registered %s at %s", server.resource, server.socket_path)
        return True

    async def _sleep_unless_kubelet_changes(self, delay_s: float) -> None:
        loop = asyncio.get_running_loop()
        seen = _file_identity(self._kubelet_socket)
        deadline = loop.time() + delay_s
        while (remaining := deadline - loop.time()) > 0:
            await asyncio.sleep(min(WATCH_INTERVAL_S, remaining))
            if _file_identity(self._kubelet_socket) != seen:
                return

    async def _allocate(
        self,
        resource: str,
        request: api.AllocateRequest,
        context: _Context[api.AllocateRequest, api.AllocateResponse],
    ) -> api.AllocateResponse:
        responses: list[api.ContainerAllocateResponse] = []
        allocated: list[str] = []
        for container_request in request.container_requests:
            device_ids = list(container_request.devices_ids)
            if len(device_ids) != 1:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"mpsflow gives one MPS slice per container; got {len(device_ids)} devices "
                    f"({', '.join(device_ids)}): request {resource}: 1",
                )
            device = self._devices.get(device_ids[0])
            if device is None or device.resource != resource:
                await context.abort(grpc.StatusCode.NOT_FOUND, f"{resource} has no device {device_ids[0]!r}")
            slices_on_gpu = sum(1 for other in self._devices.values() if other.gpu_index == device.gpu_index)
            allocation = container_allocation(
                device,
                slices_on_gpu=slices_on_gpu,
                pipe_root=self._pipe_root,
                thread_policy=self._thread_policy,
                strategy=self._device_list_strategy,
                cdi_kind=self._cdi_kind,
                ipc=self._ipc,
            )
            responses.append(
                api.ContainerAllocateResponse(
                    envs=allocation.envs,
                    mounts=[
                        api.Mount(
                            container_path=mount.container_path,
                            host_path=mount.host_path,
                            read_only=mount.read_only,
                        )
                        for mount in allocation.mounts
                    ],
                    annotations=allocation.annotations,
                    cdi_devices=[api.CDIDevice(name=name) for name in allocation.cdi_devices],
                )
            )
            allocated.append(device.id)
        now = asyncio.get_running_loop().time()
        for device_id in allocated:
            self._allocation_count += 1
            self._allocations[device_id] = now
            self._allocated_as[device_id] = self._allocation_count
        return api.AllocateResponse(container_responses=responses)


def _device_list(devices: Iterable[SliceDevice]) -> api.ListAndWatchResponse:
    """One resource's slices as ListAndWatch lists them, by GPU and ordinal."""
    return api.ListAndWatchResponse(
        devices=[
            api.Device(ID=device.id, health=HEALTHY if device.healthy else UNHEALTHY)
            for device in sorted(devices, key=lambda device: (device.gpu_index, device.ordinal))
        ]
    )


class _ResourceServer(api_grpc.DevicePluginServicer):
    """One resource's gRPC server on its unix socket, and its open ListAndWatch streams."""

    def __init__(self, plugin: SliceDevicePlugin, resource: str, socket_path: Path) -> None:
        self.resource = resource
        self.socket_path = socket_path
        self.socket_identity: FileIdentity | None = None
        # Identity of kubelet.sock when this server last registered; None while unregistered.
        self.registered_with: FileIdentity | None = None
        self._plugin = plugin
        self._server = grpc.aio.server()
        self._watchers: set[asyncio.Event] = set()
        self._closing = False
        self.listed = api.ListAndWatchResponse()
        """What ListAndWatch answers now."""

    @classmethod
    async def start(cls, plugin: SliceDevicePlugin, resource: str, socket_path: Path) -> _ResourceServer:
        # A stale socket from an earlier run blocks the bind; removing it takes microseconds.
        socket_path.unlink(missing_ok=True)  # noqa: ASYNC240
        resource_server = cls(plugin, resource, socket_path)
        api_grpc.add_DevicePluginServicer_to_server(resource_server, resource_server._server)
        resource_server._server.add_insecure_port(f"unix:{socket_path}")
        await resource_server._server.start()
        resource_server.socket_identity = _file_identity(socket_path)
        return resource_server

    def offer(self, listed: api.ListAndWatchResponse) -> None:
        """Serve `listed`, and tell the open ListAndWatch streams if it differs from what they had."""
        if listed != self.listed:
            self.listed = listed
            self._wake_watchers()

    def _wake_watchers(self) -> None:
        for watcher in self._watchers:
            watcher.set()

    async def stop(self) -> None:
        self._closing = True
        self._wake_watchers()
        await self._server.stop(SERVER_STOP_GRACE_S)
        if self.socket_identity is not None and _file_identity(self.socket_path) == self.socket_identity:
            self.socket_path.unlink(missing_ok=True)

    async def GetDevicePluginOptions(  # noqa: N802 (gRPC method name)
        self, request: api.Empty, context: _Context[api.Empty, api.DevicePluginOptions]
    ) -> api.DevicePluginOptions:
        return api.DevicePluginOptions(get_preferred_allocation_available=True)

    async def ListAndWatch(  # noqa: N802 (gRPC method name)
        self, request: api.Empty, context: _Context[api.Empty, api.ListAndWatchResponse]
    ) -> AsyncIterator[api.ListAndWatchResponse]:
        changed = asyncio.Event()
        self._watchers.add(changed)
        try:
            while not self._closing:
                changed.clear()
                yield self.listed
                await changed.wait()
        finally:
            self._watchers.discard(changed)

    async def GetPreferredAllocation(  # noqa: N802 (gRPC method name)
        self,
        request: api.PreferredAllocationRequest,
        context: _Context[api.PreferredAllocationRequest, api.PreferredAllocationResponse],
    ) -> api.PreferredAllocationResponse:
        responses: list[api.ContainerPreferredAllocationResponse] = []
        for container_request in request.container_requests:
            must_include = set(container_request.must_include_deviceIDs)
            avoided, listed_in = self._plugin._avoided_gpus, self._plugin._listed_in
            try:
                required = sorted(must_include, key=lambda d: _device_order(d, avoided, listed_in))
                optional = sorted(
                    set(container_request.available_deviceIDs) - must_include,
                    key=lambda d: _device_order(d, avoided, listed_in),
                )
            except ValueError as error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
            size = max(container_request.allocation_size, len(required))
            responses.append(api.ContainerPreferredAllocationResponse(deviceIDs=(required + optional)[:size]))
        return api.PreferredAllocationResponse(container_responses=responses)

    async def Allocate(  # noqa: N802 (gRPC method name)
        self, request: api.AllocateRequest, context: _Context[api.AllocateRequest, api.AllocateResponse]
    ) -> api.AllocateResponse:
        return await self._plugin._allocate(self.resource, request, context)

    async def PreStartContainer(  # noqa: N802 (gRPC method name)
        self,
        request: api.PreStartContainerRequest,
        context: _Context[api.PreStartContainerRequest, api.PreStartContainerResponse],
    ) -> api.PreStartContainerResponse:
        return api.PreStartContainerResponse()
