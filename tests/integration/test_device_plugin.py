"""The node agent's device plugin against the simulated kubelet, over real gRPC on unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import grpc
import grpc.aio
import pytest

from events.vocabulary import MpsIpcMode
from node_agent.device_plugin import OWN_SOCKETS_CHECK_S, SliceDevicePlugin
from node_agent.proto_gen import deviceplugin_v1beta1_pb2 as api
from node_agent.proto_gen import deviceplugin_v1beta1_pb2_grpc as api_grpc
from node_agent.proto_gen import podresources_v1_pb2 as podresources
from node_agent.proto_gen import podresources_v1_pb2_grpc as podresources_grpc
from node_agent.slices import DeviceListStrategy, SliceDevice, ThreadPolicy, slice_device_id
from simulation.kubelet_devices import AdmissionError, DeviceManager, PodRef
from tests.support import eventually

GPU0_UUID = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
GPU1_UUID = "GPU-9f8e7d6c-6666-7777-8888-999900001111"
GPU0_MIB = 81559  # H100 80GB
GPU1_MIB = 40960  # A100 40GB
GB10 = "nvidia.com/gpu-10gb"
GB20 = "nvidia.com/gpu-20gb"
PIPE_DIR = "/run/mpsflow/mps"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _slice(gpu_index: int, size_gb: int, ordinal: int) -> SliceDevice:
    return SliceDevice(
        id=slice_device_id(gpu_index, size_gb, ordinal),
        gpu_index=gpu_index,
        gpu_uuid=(GPU0_UUID, GPU1_UUID)[gpu_index],
        size_gb=size_gb,
        gpu_memory_mib=(GPU0_MIB, GPU1_MIB)[gpu_index],
    )


def _pod(name: str) -> PodRef:
    return PodRef(namespace="team-a", name=name, uid=f"uid-{name}")


class CapacityLog:
    """Records every capacity report of the device manager and lets tests wait for one."""

    def __init__(self) -> None:
        self.reports: list[dict[str, int]] = []
        self._reported = asyncio.Condition()

    async def __call__(self, capacity: dict[str, int]) -> None:
        self.reports.append(capacity)
        async with self._reported:
            self._reported.notify_all()

    @property
    def latest(self) -> dict[str, int] | None:
        return self.reports[-1] if self.reports else None

    async def wait_until(self, condition: Callable[[], bool], what: str, timeout_s: float = 3.0) -> None:
        try:
            async with asyncio.timeout(timeout_s), self._reported:
                await self._reported.wait_for(condition)
        except TimeoutError:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}; reports: {self.reports}")


@dataclass
class Node:
    plugin_dir: Path
    pipe_root: Path
    pod_resources_socket: Path
    capacity: CapacityLog
    manager: DeviceManager
    plugin: SliceDevicePlugin

    def plugin_socket(self, size_gb: int) -> Path:
        return self.plugin_dir / f"mpsflow-{size_gb}gb.sock"

    async def serve(self, devices: list[SliceDevice], expected_capacity: dict[str, int]) -> None:
        await self.plugin.set_devices(devices)
        await self.capacity.wait_until(
            lambda: self.capacity.latest == expected_capacity, f"capacity {expected_capacity}"
        )


async def tasks_left_behind(before: set[asyncio.Task[Any]], grace: float = 2.0) -> set[asyncio.Task[Any]]:
    """Tasks started since `before` that still run after `grace` seconds.

    grpc.aio finishes a closed call's status in a task of its own a moment after the channel
    closes; only tasks that outlive the grace period are leaks.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    while left := {task for task in asyncio.all_tasks() - before if not task.done()}:
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        await asyncio.wait(left, timeout=remaining)  # then again for any task they started meanwhile
    return left


@contextlib.asynccontextmanager
async def node(
    *,
    start_kubelet: bool = True,
    thread_policy: ThreadPolicy = "proportional",
    strategy: DeviceListStrategy = "cdi-cri",
    ipc: MpsIpcMode = "host",
) -> AsyncIterator[Node]:
    # Unix socket paths must stay under 108 bytes, so no pytest tmp_path here.
    tasks_before = asyncio.all_tasks()
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="mpsf-"))
    plugin_dir = root / "device-plugins"
    plugin_dir.mkdir()
    capacity = CapacityLog()
    pod_resources_socket = root / "pod-resources.sock"
    the_node = Node(
        plugin_dir=plugin_dir,
        pipe_root=root / "mps",
        pod_resources_socket=pod_resources_socket,
        capacity=capacity,
        manager=DeviceManager(plugin_dir, pod_resources_socket=pod_resources_socket, on_capacity=capacity),
        plugin=SliceDevicePlugin(
            plugin_dir=plugin_dir,
            pipe_root=root / "mps",
            thread_policy=thread_policy,
            device_list_strategy=strategy,
            ipc=ipc,
        ),
    )
    try:
        if start_kubelet:
            await the_node.manager.start()
        yield the_node
        await the_node.plugin.close()
        await the_node.manager.stop()
        assert list(plugin_dir.iterdir()) == [], "sockets left behind"
        assert not pod_resources_socket.exists()
        assert await tasks_left_behind(tasks_before) == set(), "tasks left behind"
    finally:
        await the_node.plugin.close()
        await the_node.manager.stop()
        shutil.rmtree(root)


@contextlib.asynccontextmanager
async def supervised(plugin: SliceDevicePlugin) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(plugin.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait([task])


@pytest.mark.anyio
async def test_registers_each_resource_and_reports_capacity() -> None:
    async with node() as n:
        await n.serve(
            [_slice(0, 10, 0), _slice(0, 10, 1), _slice(1, 10, 0), _slice(1, 20, 0)],
            {GB10: 3, GB20: 1},
        )
        assert n.plugin_socket(10).is_socket()
        assert n.plugin_socket(20).is_socket()
        assert n.manager.devices() == {
            GB10: {"mps-g0-10gb-0": "Healthy", "mps-g0-10gb-1": "Healthy", "mps-g1-10gb-0": "Healthy"},
            GB20: {"mps-g1-20gb-0": "Healthy"},
        }


@pytest.mark.anyio
async def test_unhealthy_slices_are_listed_but_not_counted() -> None:
    async with node() as n:
        await n.serve([_slice(0, 10, 0), replace(_slice(0, 10, 1), healthy=False)], {GB10: 1})
        assert n.manager.devices()[GB10] == {"mps-g0-10gb-0": "Healthy", "mps-g0-10gb-1": "Unhealthy"}
        allocated = await n.manager.allocate(_pod("a"), [("main", GB10)])
        assert allocated["main"].device_ids == ["mps-g0-10gb-0"]
        with pytest.raises(AdmissionError, match=re.escape("no free nvidia.com/gpu-10gb device")):
            await n.manager.allocate(_pod("b"), [("main", GB10)])


@pytest.mark.anyio
async def test_list_and_watch_follows_reconfiguration_and_a_used_slice_keeps_its_id() -> None:
    async with node() as n:
        await n.serve([_slice(0, 10, 0), _slice(0, 10, 1), _slice(1, 20, 0)], {GB10: 2, GB20: 1})
        first = await n.manager.allocate(_pod("a"), [("main", GB10)])
        assert first["main"].device_ids == ["mps-g0-10gb-0"]
        await n.manager.allocate(_pod("b"), [("main", GB20)])

        # The planner keeps the used slice, drops the free one and all 20 GiB slices, adds two on GPU 1.
        await n.serve([_slice(0, 10, 0), _slice(1, 10, 0), _slice(1, 10, 1)], {GB10: 3, GB20: 0})

        assert n.manager.devices() == {
            GB10: {"mps-g0-10gb-0": "Healthy", "mps-g1-10gb-0": "Healthy", "mps-g1-10gb-1": "Healthy"},
            GB20: {},
        }
        assert n.plugin_socket(20).is_socket(), "a resource that disappears keeps its server"
        second = await n.manager.allocate(_pod("c"), [("main", GB10)])
        assert second["main"].device_ids == ["mps-g1-10gb-0"]
        assert n.manager.assignments()["uid-a"] == {"main": ["mps-g0-10gb-0"]}
        assert set((await n.plugin.allocations()).at) == {"mps-g0-10gb-0", "mps-g1-10gb-0"}


@pytest.mark.anyio
async def test_the_kubelet_knows_since_when_each_slice_is_listed_and_which_were_withdrawn() -> None:
    async with node() as n:
        loop = asyncio.get_running_loop()
        before = loop.time()
        await n.serve([_slice(0, 10, 0), _slice(0, 20, 0)], {GB10: 1, GB20: 1})
        first = n.manager.listed_since("mps-g0-10gb-0")
        assert first is not None and before <= first <= loop.time()
        assert n.manager.withdrawn_between(before, loop.time()) == []

        # GPU 0 carved anew: the free 20 GiB slice is reclaimed for two more 10 GiB ones.
        reclaimed = loop.time()
        await n.serve([_slice(0, 10, 0), _slice(0, 10, 1), _slice(0, 10, 2)], {GB10: 3, GB20: 0})
        assert n.manager.listed_since("mps-g0-10gb-0") == first, "a slice kept is listed since it first was"
        assert (n.manager.listed_since("mps-g0-10gb-1") or 0) >= reclaimed
        assert n.manager.listed_since("mps-g0-20gb-0") is None
        assert n.manager.withdrawn_between(reclaimed, loop.time()) == ["mps-g0-20gb-0"]

        # The same slice carved again counts from its new listing, not its first.
        again = loop.time()
        await n.serve([_slice(0, 10, 0), _slice(0, 20, 0)], {GB10: 1, GB20: 1})
        assert (n.manager.listed_since("mps-g0-20gb-0") or 0) >= again


@pytest.mark.anyio
async def test_allocate_gives_each_container_its_gpu_with_the_limit_on_device_zero() -> None:
    async with node() as n:
        await n.serve([_slice(0, 10, 0), _slice(1, 10, 0)], {GB10: 2})
        allocated = await n.manager.allocate(_pod("a"), [("first", GB10), ("second", GB10)])

    assert allocated["first"].device_ids == ["mps-g0-10gb-0"]
    assert allocated["first"].cdi_devices == [f"nvidia.com/gpu={GPU0_UUID}"]
    assert allocated["first"].envs == {
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=10240M",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "12",  # 10240 MiB of 81559
        "CUDA_MPS_PIPE_DIRECTORY": PIPE_DIR,
        "MPSFLOW_SLICE": "mps-g0-10gb-0",
    }
    assert allocated["first"].mounts == [(PIPE_DIR, f"{n.pipe_root}/{GPU0_UUID}/pipe", False)]
    assert allocated["second"].device_ids == ["mps-g1-10gb-0"]
    assert allocated["second"].cdi_devices == [f"nvidia.com/gpu={GPU1_UUID}"]
    assert allocated["second"].envs == {
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=10240M",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "25",  # 10240 MiB of 40960
        "CUDA_MPS_PIPE_DIRECTORY": PIPE_DIR,
        "MPSFLOW_SLICE": "mps-g1-10gb-0",
    }
    assert allocated["second"].mounts == [(PIPE_DIR, f"{n.pipe_root}/{GPU1_UUID}/pipe", False)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("strategy", "envs", "annotations", "cdi_devices"),
    [
        ("envvar", {"NVIDIA_VISIBLE_DEVICES": GPU1_UUID}, {}, []),
        ("cdi-annotations", {}, {"cdi.k8s.io/mpsflow_mps-g1-10gb-0": f"nvidia.com/gpu={GPU1_UUID}"}, []),
        ("cdi-cri", {}, {}, [f"nvidia.com/gpu={GPU1_UUID}"]),
    ],
)
async def test_each_device_list_strategy_gives_the_gpu_its_own_way_and_nothing_else(
    strategy: DeviceListStrategy, envs: dict[str, str], annotations: dict[str, str], cdi_devices: list[str]
) -> None:
    async with node(strategy=strategy) as n:
        await n.serve([_slice(1, 10, 0)], {GB10: 1})
        allocated = (await n.manager.allocate(_pod("a"), [("main", GB10)]))["main"]

    device_envs = {
        k: v for k, v in allocated.envs.items() if not k.startswith("CUDA_MPS_") and k != "MPSFLOW_SLICE"
    }
    assert (device_envs, allocated.annotations, allocated.cdi_devices) == (envs, annotations, cdi_devices)
    assert allocated.envs["CUDA_MPS_PIPE_DIRECTORY"] == PIPE_DIR  # MPS itself is the same in every mode
    assert allocated.envs["MPSFLOW_SLICE"] == "mps-g1-10gb-0"


@pytest.mark.anyio
@pytest.mark.parametrize("ipc", ["host", "shm-directory"])
async def test_allocate_mounts_each_gpu_its_own_dev_shm_only_in_shm_directory_mode(ipc: MpsIpcMode) -> None:
    async with node(ipc=ipc) as n:
        await n.serve([_slice(0, 10, 0), _slice(1, 10, 0)], {GB10: 2})
        allocated = await n.manager.allocate(_pod("a"), [("first", GB10), ("second", GB10)])

    for container, uuid in (("first", GPU0_UUID), ("second", GPU1_UUID)):
        pipe = (PIPE_DIR, f"{n.pipe_root}/{uuid}/pipe", False)
        shm = ("/dev/shm", f"{n.pipe_root}/{uuid}/shm", False)
        assert allocated[container].mounts == ([pipe] if ipc == "host" else [pipe, shm]), container
        assert allocated[container].envs["CUDA_MPS_PIPE_DIRECTORY"] == PIPE_DIR  # MPS itself is the same


@pytest.mark.anyio
async def test_equal_thread_policy_counts_every_slice_on_the_gpu() -> None:
    async with node(thread_policy="equal") as n:
        await n.serve([_slice(0, 10, 0), _slice(1, 10, 0), _slice(1, 20, 0)], {GB10: 2, GB20: 1})
        on_gpu0 = await n.manager.allocate(_pod("a"), [("main", GB10)])
        on_gpu1 = await n.manager.allocate(_pod("b"), [("main", GB20)])

    assert on_gpu0["main"].envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "100"
    assert on_gpu1["main"].envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50"
    assert on_gpu1["main"].envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=20480M"


@pytest.mark.anyio
async def test_plugin_rpcs_called_directly() -> None:
    async with node() as n:
        await n.serve(
            [_slice(0, 10, 0), _slice(0, 10, 1), _slice(1, 10, 0), _slice(1, 20, 0)], {GB10: 3, GB20: 1}
        )
        async with grpc.aio.insecure_channel(f"unix:{n.plugin_socket(10)}") as channel:
            stub = api_grpc.DevicePluginStub(channel)

            with pytest.raises(grpc.aio.AioRpcError) as two_devices:
                await stub.Allocate(
                    api.AllocateRequest(
                        container_requests=[
                            api.ContainerAllocateRequest(devices_ids=["mps-g0-10gb-0", "mps-g0-10gb-1"])
                        ]
                    )
                )
            assert two_devices.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert two_devices.value.details() == (
                "mpsflow gives one MPS slice per container; got 2 devices (mps-g0-10gb-0, mps-g0-10gb-1): "
                "request nvidia.com/gpu-10gb: 1"
            )

            for unknown in ("mps-g5-10gb-0", "mps-g1-20gb-0"):  # the second exists, but not as 10 GiB
                with pytest.raises(grpc.aio.AioRpcError) as not_found:
                    await stub.Allocate(
                        api.AllocateRequest(
                            container_requests=[api.ContainerAllocateRequest(devices_ids=[unknown])]
                        )
                    )
                assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
                assert not_found.value.details() == f"nvidia.com/gpu-10gb has no device {unknown!r}"
            assert (await n.plugin.allocations()).at == {}

            preferred = await stub.GetPreferredAllocation(
                api.PreferredAllocationRequest(
                    container_requests=[
                        api.ContainerPreferredAllocationRequest(
                            available_deviceIDs=["mps-g1-10gb-0", "mps-g0-10gb-1", "mps-g0-10gb-0"],
                            must_include_deviceIDs=["mps-g1-10gb-0"],
                            allocation_size=2,
                        ),
                        api.ContainerPreferredAllocationRequest(
                            available_deviceIDs=["mps-g1-10gb-0", "mps-g0-10gb-1"], allocation_size=1
                        ),
                    ]
                )
            )
            assert [list(response.deviceIDs) for response in preferred.container_responses] == [
                ["mps-g1-10gb-0", "mps-g0-10gb-0"],
                ["mps-g0-10gb-1"],
            ]
            # GPU 0 turns unhealthy: the kubelet is asked to give out GPU 1's slices first.
            served, _ = await n.plugin.served()
            await n.plugin.set_devices(served, avoided_gpus=frozenset({0}))
            preferred = await stub.GetPreferredAllocation(
                api.PreferredAllocationRequest(
                    container_requests=[
                        api.ContainerPreferredAllocationRequest(
                            available_deviceIDs=["mps-g0-10gb-0", "mps-g1-10gb-0", "mps-g0-10gb-1"],
                            allocation_size=1,
                        )
                    ]
                )
            )
            assert [list(r.deviceIDs) for r in preferred.container_responses] == [["mps-g1-10gb-0"]]

            options = await stub.GetDevicePluginOptions(api.Empty())
            assert options.get_preferred_allocation_available
            assert not options.pre_start_required
            assert await stub.PreStartContainer(
                api.PreStartContainerRequest(devices_ids=["mps-g0-10gb-0"])
            ) == (api.PreStartContainerResponse())


@pytest.mark.anyio
async def test_a_change_is_sent_only_on_the_streams_of_the_resources_it_changed() -> None:
    """Every ListAndWatch answer makes the kubelet work the list through: a node with slices of ten
    sizes that sent every list on every change did ten times the work each time."""
    async with node() as n:
        await n.serve([_slice(0, 10, 0), _slice(0, 20, 0)], {GB10: 1, GB20: 1})
        answers = len(n.capacity.reports)  # the simulated kubelet reports capacity on each answer
        await n.serve([_slice(0, 10, 0), _slice(0, 10, 1), _slice(0, 20, 0)], {GB10: 2, GB20: 1})
        await anyio.sleep(0.2)  # time for an answer that should not come
        assert len(n.capacity.reports) == answers + 1
        await n.plugin.set_devices([_slice(0, 10, 0), _slice(0, 10, 1), _slice(0, 20, 0)])  # the same
        await anyio.sleep(0.2)
        assert len(n.capacity.reports) == answers + 1


@pytest.mark.anyio
async def test_the_kubelet_is_asked_to_give_out_the_slice_listed_first() -> None:
    """Pods bound one after the other get slices in the order they were carved: the first pod of a
    burst gets the slice carved for it, not one carved later for another pod on a GPU earlier by
    index. A slice withdrawn and carved again counts from its new listing."""
    async with node() as n:
        await n.serve([_slice(1, 10, 0)], {GB10: 1})
        await n.serve([_slice(1, 10, 0), _slice(0, 10, 0)], {GB10: 2})
        await n.serve([_slice(1, 10, 0), _slice(0, 10, 0), _slice(0, 10, 1)], {GB10: 3})

        async def preferred(*available: str) -> list[str]:
            async with grpc.aio.insecure_channel(f"unix:{n.plugin_socket(10)}") as channel:
                answer = await api_grpc.DevicePluginStub(channel).GetPreferredAllocation(
                    api.PreferredAllocationRequest(
                        container_requests=[
                            api.ContainerPreferredAllocationRequest(
                                available_deviceIDs=list(available), allocation_size=len(available)
                            )
                        ]
                    )
                )
            return list(answer.container_responses[0].deviceIDs)

        assert await preferred("mps-g0-10gb-1", "mps-g0-10gb-0", "mps-g1-10gb-0") == [
            "mps-g1-10gb-0",
            "mps-g0-10gb-0",
            "mps-g0-10gb-1",
        ]
        await n.serve([_slice(0, 10, 0), _slice(0, 10, 1)], {GB10: 2})
        await n.serve([_slice(0, 10, 0), _slice(0, 10, 1), _slice(1, 10, 0)], {GB10: 3})
        assert await preferred("mps-g1-10gb-0", "mps-g0-10gb-1", "mps-g0-10gb-0") == [
            "mps-g0-10gb-0",
            "mps-g0-10gb-1",
            "mps-g1-10gb-0",
        ]


@pytest.mark.anyio
async def test_kubelet_rejects_a_registration_for_another_api_version() -> None:
    async with node() as n, grpc.aio.insecure_channel(f"unix:{n.plugin_dir / 'kubelet.sock'}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await api_grpc.RegistrationStub(channel).Register(
                api.RegisterRequest(version="v1alpha", endpoint="x.sock", resource_name=GB10)
            )
        assert rejected.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.anyio
async def test_reregisters_after_kubelet_restart() -> None:
    async with node() as n, supervised(n.plugin):
        await n.serve([_slice(0, 10, 0), _slice(0, 10, 1), _slice(1, 20, 0)], {GB10: 2, GB20: 1})
        await n.manager.allocate(_pod("a"), [("main", GB10)])
        reports_before_restart = len(n.capacity.reports)

        await n.manager.restart()

        assert {GB10: 0, GB20: 0} in n.capacity.reports[reports_before_restart:]
        await n.capacity.wait_until(lambda: n.capacity.latest == {GB10: 2, GB20: 1}, "re-registration")
        assert n.plugin_socket(10).is_socket()
        assert n.plugin_socket(20).is_socket()
        assert n.manager.assignments() == {"uid-a": {"main": ["mps-g0-10gb-0"]}}
        after = await n.manager.allocate(_pod("b"), [("main", GB10)])
        assert after["main"].device_ids == ["mps-g0-10gb-1"]


async def logged(caplog: pytest.LogCaptureFixture, text: str, times: int = 1, timeout_s: float = 3.0) -> None:
    """Until the device plugin has logged `text` at least `times` times: the proof that it noticed."""
    await eventually(  # log records come with no event to wait on
        lambda: sum(text in record.getMessage() for record in caplog.records) >= times,
        f"{times} log record(s) saying {text!r}",
        timeout_s,
    )


@pytest.mark.anyio
async def test_reregisters_when_only_the_kubelet_socket_is_recreated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.device_plugin")
    async with node() as n, supervised(n.plugin):
        await n.serve([_slice(0, 10, 0)], {GB10: 1})
        plugin_socket = n.plugin_socket(10).stat()
        await n.manager.stop()
        await logged(caplog, "does not exist yet")  # the plugin saw kubelet.sock missing
        reports_before_start = len(n.capacity.reports)

        await n.manager.start()

        await n.capacity.wait_until(lambda: len(n.capacity.reports) > reports_before_start, "re-registration")
        assert n.capacity.latest == {GB10: 1}
        still_served = n.plugin_socket(10).stat()
        assert (still_served.st_ino, still_served.st_ctime_ns) == (
            plugin_socket.st_ino,
            plugin_socket.st_ctime_ns,
        )


@pytest.mark.anyio
async def test_a_socket_deleted_while_the_kubelet_stays_is_served_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Only a restarting kubelet deletes our sockets as a rule, and it re-creates kubelet.sock after,
    which the plugin sees at once; a socket deleted by anything else is seen at the slower look at
    our own sockets (`OWN_SOCKETS_CHECK_S`), and served and registered again all the same."""
    caplog.set_level(logging.INFO, logger="node_agent.device_plugin")
    async with node() as n, supervised(n.plugin):
        await n.serve([_slice(0, 10, 0)], {GB10: 1})
        gone = n.plugin_socket(10)
        gone.unlink()

        await logged(caplog, "is gone", timeout_s=OWN_SOCKETS_CHECK_S + 3.0)
        await eventually(gone.is_socket, "the socket served again", 3.0)
        await logged(caplog, f"registered {GB10}", times=2)
        async with grpc.aio.insecure_channel(f"unix:{gone}") as channel:
            options = await api_grpc.DevicePluginStub(channel).GetDevicePluginOptions(api.Empty())
        assert options.get_preferred_allocation_available


@pytest.mark.anyio
async def test_run_registers_once_the_kubelet_appears(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node_agent.device_plugin")
    async with node(start_kubelet=False) as n:
        await n.plugin.set_devices([_slice(0, 10, 0)])  # no kubelet yet: must not raise
        async with supervised(n.plugin) as run:
            await logged(caplog, "does not exist yet", times=3)  # a few failed attempts, backing off
            assert not run.done()
            assert n.capacity.reports == []
            await n.manager.start()
            await n.capacity.wait_until(
                lambda: n.capacity.latest == {GB10: 1}, "registration after kubelet start", 1.0
            )


@pytest.mark.anyio
async def test_pod_resources_list_reports_assignments() -> None:
    async with node() as n:
        await n.serve([_slice(0, 10, 0), _slice(1, 10, 0), _slice(1, 20, 0)], {GB10: 2, GB20: 1})
        await n.manager.allocate(_pod("a"), [("main", GB10), ("sidecar", GB20)])
        await n.manager.allocate(_pod("b"), [("main", GB10)])

        async def listed() -> dict[tuple[str, str], dict[str, list[tuple[str, list[str]]]]]:
            async with grpc.aio.insecure_channel(f"unix:{n.pod_resources_socket}") as channel:
                response = await podresources_grpc.PodResourcesListerStub(channel).List(
                    podresources.ListPodResourcesRequest()
                )
            return {
                (pod.namespace, pod.name): {
                    container.name: [
                        (devices.resource_name, list(devices.device_ids)) for devices in container.devices
                    ]
                    for container in pod.containers
                }
                for pod in response.pod_resources
            }

        assert await listed() == {
            ("team-a", "a"): {"main": [(GB10, ["mps-g0-10gb-0"])], "sidecar": [(GB20, ["mps-g1-20gb-0"])]},
            ("team-a", "b"): {"main": [(GB10, ["mps-g1-10gb-0"])]},
        }
        n.manager.release("uid-a")
        assert await listed() == {("team-a", "b"): {"main": [(GB10, ["mps-g1-10gb-0"])]}}


@pytest.mark.anyio
async def test_admission_is_all_or_nothing_and_repeatable() -> None:
    async with node() as n:
        await n.serve([_slice(1, 20, 0)], {GB20: 1})
        with pytest.raises(
            AdmissionError, match=re.escape("no device plugin is registered for nvidia.com/gpu-30gb")
        ):
            await n.manager.allocate(_pod("a"), [("main", "nvidia.com/gpu-30gb")])
        with pytest.raises(AdmissionError, match=re.escape("no free nvidia.com/gpu-20gb device")):
            await n.manager.allocate(_pod("a"), [("one", GB20), ("two", GB20)])
        assert n.manager.assignments() == {}

        first = await n.manager.allocate(_pod("a"), [("one", GB20)])
        again = await n.manager.allocate(_pod("a"), [("one", GB20)])
        assert again == first
        assert n.manager.assignments() == {"uid-a": {"one": ["mps-g1-20gb-0"]}}


@pytest.mark.anyio
async def test_broken_stream_takes_the_resource_away_until_it_registers_again() -> None:
    async with node() as n:
        await n.serve([_slice(0, 10, 0)], {GB10: 1})
        await n.plugin.close()
        await n.capacity.wait_until(
            lambda: n.capacity.latest == {GB10: 0}, "capacity 0 after the plugin stopped"
        )
        with pytest.raises(AdmissionError, match="no device plugin is registered"):
            await n.manager.allocate(_pod("a"), [("main", GB10)])

        await n.serve([_slice(0, 10, 0)], {GB10: 1})
        allocated = await n.manager.allocate(_pod("a"), [("main", GB10)])
        assert allocated["main"].device_ids == ["mps-g0-10gb-0"]
