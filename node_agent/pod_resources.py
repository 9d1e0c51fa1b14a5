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


async def kubelet_view(socket: Path, rpc_seconds: float = 2.0) -> KubeletView:
    """The kubelet's view of mpsflow's slices; raises grpc.aio.AioRpcError when it is unreachable."""
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub = podresources_grpc.PodResourcesListerStub(channel)
        response = await stub.List(podresources.ListPodResourcesRequest(), timeout=rpc_seconds)
        try:
            allocatable = await stub.GetAllocatableResources(
                podresources.AllocatableResourcesRequest(), timeout=rpc_seconds
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
    held: dict[str, str] = {}
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if slice_size(devices.resource_name) is not None:
                    for device_id in devices.device_ids:
                        held[device_id] = f"{pod.namespace}/{pod.name}"
    return KubeletView(held, listed)
