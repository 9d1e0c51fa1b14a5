"""`node_agent.pod_resources.PodResourcesClient` against the simulated kubelet's pod-resources server,
over real gRPC on a unix socket: one channel kept between questions, and a kubelet that restarts is
asked afresh at once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import grpc.aio
import pytest

from node_agent.pod_resources import KubeletView, PodResourcesClient
from simulation.kubelet_devices import DeviceManager

pytestmark = pytest.mark.anyio


async def nothing(_: dict[str, int]) -> None:
    return None


def kubelet(root: Path) -> DeviceManager:
    return DeviceManager(root, pod_resources_socket=root / "pod-resources.sock", on_capacity=nothing)


@pytest.fixture
async def asking(tmp_path: Path) -> AsyncIterator[PodResourcesClient]:
    client = PodResourcesClient(tmp_path / "pod-resources.sock", rpc_seconds=1.0)
    try:
        yield client
    finally:
        await client.close()


async def test_questions_share_one_channel(tmp_path: Path, asking: PodResourcesClient) -> None:
    served = kubelet(tmp_path)
    await served.start()
    try:
        first = await asking.view()
        channel = asking._channel
        assert channel is not None
        for _ in range(5):
            assert await asking.view() == first == KubeletView({}, frozenset())
        assert asking._channel is channel
    finally:
        await served.stop()


async def test_a_restarted_kubelet_is_asked_afresh(tmp_path: Path, asking: PodResourcesClient) -> None:
    served = kubelet(tmp_path)
    await served.start()
    await asking.view()
    await served.stop()
    for _ in range(3):  # down: each question fails, none waits for a reconnection backoff to end
        with anyio.fail_after(3), pytest.raises(grpc.aio.AioRpcError):
            await asking.view()
    restarted = kubelet(tmp_path)
    await restarted.start()
    try:
        with anyio.fail_after(3):
            assert await asking.view() == KubeletView({}, frozenset())
    finally:
        await restarted.stop()


async def test_closing_twice_or_before_asking_is_harmless(tmp_path: Path) -> None:
    client = PodResourcesClient(tmp_path / "none.sock")
    await client.close()
    await client.close()
