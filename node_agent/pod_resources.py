"""What the kubelet knows of mpsflow's slices, from its pod-resources API (v1).

The device plugin learns of an allocation when Allocate is called, but never of its end, and
never whether the kubelet has taken in the latest slice list. The kubelet's pod-resources socket
answers both: `List` gives what every container holds (and which pod it belongs to), and
`GetAllocatableResources` every device the kubelet would hand out. This client only reads; it
never changes anything on the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio

from events.vocabulary import slice_size
from node_agent.proto_gen import podresources_v1_pb2 as podresources
from node_agent.proto_gen import podresources_v1_pb2_grpc as podresources_grpc


@dataclass(frozen=True)
class KubeletView:
    """`held`: slice device ID -> the pod ("namespace/name") whose container holds it.
    `listed`: slice device IDs the kubelet can allocate, or None when it cannot say (a kubelet
    older than 1.23 has no GetAllocatableResources)."""

    held: dict[str, str]
    listed: frozenset[str] | None


class PodResourcesClient:
    """Asks the kubelet's pod-resources socket, over one channel kept from one question to the next.

    The agent asks several times a second, and a channel made for each question cost 2.1 ms of CPU
    against 1.3 ms over a kept one (the simulated kubelet, client and server in one process). A
    question that fails drops the channel, so the next one connects afresh at once rather than
    after gRPC's reconnection backoff (which grows to minutes while a kubelet is down)."""

    def __init__(self, socket: Path, rpc_seconds: float = 2.0) -> None:
        self.socket = socket
        self.rpc_seconds = rpc_seconds
        self._channel: grpc.aio.Channel | None = None

    async def view(self) -> KubeletView:
        """The kubelet's view of mpsflow's slices; raises grpc.aio.AioRpcError when it is unreachable."""
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(f"unix://{self.socket}")
        stub = podresources_grpc.PodResourcesListerStub(self._channel)
        try:
            response = await stub.List(podresources.ListPodResourcesRequest(), timeout=self.rpc_seconds)
            try:
                allocatable = await stub.GetAllocatableResources(
                    podresources.AllocatableResourcesRequest(), timeout=self.rpc_seconds
                )
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNIMPLEMENTED:
                    raise
                listed = None
            else:
                listed = frozenset(
                    device_id
                    for devices in allocatable.devices
                    if slice_size(devices.resource_name) is not None
                    for device_id in devices.device_ids
                )
        except grpc.aio.AioRpcError:
            await self.close()
            raise
        held: dict[str, str] = {}
        for pod in response.pod_resources:
            for container in pod.containers:
                for devices in container.devices:
                    if slice_size(devices.resource_name) is not None:
                        for device_id in devices.device_ids:
                            held[device_id] = f"{pod.namespace}/{pod.name}"
        return KubeletView(held, listed)

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close(None)
