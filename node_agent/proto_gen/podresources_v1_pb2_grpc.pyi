# Typed stubs for podresources_v1_pb2_grpc.py, written by node_agent/proto/generate.py; do not edit.
from collections.abc import AsyncIterator

import grpc.aio

from . import podresources_v1_pb2 as _pb2

class PodResourcesListerStub:
    List: grpc.aio.UnaryUnaryMultiCallable[_pb2.ListPodResourcesRequest, _pb2.ListPodResourcesResponse]
    GetAllocatableResources: grpc.aio.UnaryUnaryMultiCallable[_pb2.AllocatableResourcesRequest, _pb2.AllocatableResourcesResponse]
    def __init__(self, channel: grpc.aio.Channel) -> None: ...

class PodResourcesListerServicer:
    async def List(self, request: _pb2.ListPodResourcesRequest, context: grpc.aio.ServicerContext[_pb2.ListPodResourcesRequest, _pb2.ListPodResourcesResponse]) -> _pb2.ListPodResourcesResponse: ...
    async def GetAllocatableResources(self, request: _pb2.AllocatableResourcesRequest, context: grpc.aio.ServicerContext[_pb2.AllocatableResourcesRequest, _pb2.AllocatableResourcesResponse]) -> _pb2.AllocatableResourcesResponse: ...

def add_PodResourcesListerServicer_to_server(servicer: PodResourcesListerServicer, server: grpc.aio.Server) -> None: ...
