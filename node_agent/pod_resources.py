"""Which slices containers hold, from the kubelet's pod-resources API (v1 List).

The device plugin learns of an allocation when Allocate is called, but never of its end; the
kubelet's pod-resources socket lists what every running container holds. This client only
reads; it never changes anything on the node.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import grpc.aio

from node_agent.proto_gen import podresources_v1_pb2 as podresources
from node_agent.proto_gen import podresources_v1_pb2_grpc as podresources_grpc
from node_agent.slices import parse_resource_name


async def slices_in_use(socket: Path, rpc_seconds: float = 2.0) -> set[str]:
    """Device IDs of mpsflow slices held by containers; raises grpc.aio.AioRpcError when unreachable."""
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        stub = podresources_grpc.PodResourcesListerStub(channel)
        response = await stub.List(podresources.ListPodResourcesRequest(), timeout=rpc_seconds)
    held: set[str] = set()
    for pod in response.pod_resources:
        for container in pod.containers:
            for devices in container.devices:
                if parse_resource_name(devices.resource_name) is not None:
                    held.update(devices.device_ids)
    return held
