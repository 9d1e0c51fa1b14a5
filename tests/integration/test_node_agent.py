"""The node agent on a simulated node: the in-memory bus, simulated GPUs, fake MPS daemons as
separate processes, its real device plugin and a simulated kubelet device manager over real gRPC.

The bus and the node-config bucket are `MemoryBroker`'s, held to the same contract as JetStream's
(tests/contract), on the real clock (daemons and gRPC are real I/O): a test writes the node's
config with `MemoryConfigStore.put` and reads what the agent published from the broker's store.

Every node lives under a short directory in /tmp (unix socket paths must stay under 108 bytes);
teardown stops the agent, then kills every fake MPS daemon it started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import pytest

from events import subjects
from events.envelope import Event
from events.memory import MemoryBroker, MemoryBus, MemoryConfigStore
from events.nodes import NodeGpusReported, SliceOverused
from events.plans import NodeConfigApplied, NodeConfigFailed, NodeMpsConfig
from node_agent.agent import AgentSettings, NodeAgent
from node_agent.daemons import DaemonKeeper
from node_agent.device_plugin import SliceDevicePlugin, SliceServer
from node_agent.link import LinkServer, RemotePlugin
from node_agent.mps import (
    PID_FILE_NAME,
    DaemonSpec,
    MpsCommandError,
    SubprocessMpsControl,
    parse_mem_limit,
    parse_server_list,
)
from node_agent.nvml import NvmlInventory
from node_agent.processes import ProcEnvironment, ProcessSlices
from node_agent.slices import SLICE_ENV
from simulation.fake_nvml import FakeDeviceHandle, FakeNvml, SimulatedGpu
from simulation.kubelet_devices import DeviceManager, PodRef
from tests.memorybus import MemoryLog
from tests.support import WAIT_S, eventually, wait_until_gone

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parents[2]
FAKE_MPS_CONTROL = (sys.executable, "-m", "simulation.fake_mps_control")
NODE = "gpu-node-1.example.com"  # dots must survive the subject and key encoding
A100 = SimulatedGpu("NVIDIA A100-SXM4-40GB", 40960)  # 40 GiB
H100 = SimulatedGpu("NVIDIA H100 80GB HBM3", 81559, compute_capability=(9, 0))  # 79 GiB
A100_MIG = SimulatedGpu("NVIDIA A100-SXM4-40GB", 40960, mig_enabled=True)
GB10 = "nvidia.com/gpu-10gb"
GB20 = "nvidia.com/gpu-20gb"
GB40 = "nvidia.com/gpu-40gb"

Slices = dict[int, list[tuple[str, bool]]]
"""GPU index -> (slice ID, used) as a report shows them."""

T = TypeVar("T")


@pytest.fixture(autouse=True)
def _fake_mps_control_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake runs as `python -m simulation...`; make that resolve whatever directory pytest runs from.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    )


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


class AgentLog(MemoryLog):
    """The node's reports and config outcomes as the broker stored them. A mark is the stream
    sequence when it was taken, so `since=mark` means stored after it."""

    def mark(self) -> int:
        return self.broker.last_sequence

    def _after(self, subject: str, since: int) -> list[Event]:
        return [
            envelope.event
            for message in self.broker.stored(subject)
            if message.sequence > since and (envelope := message.envelope()) is not None
        ]

    def reports(self, since: int = 0) -> list[NodeGpusReported]:
        return [
            event
            for event in self._after(subjects.gpus_subject(NODE), since)
            if isinstance(event, NodeGpusReported)
        ]

    def overuses(self, since: int = 0) -> list[SliceOverused]:
        return [event for _, event in self.broker_events(since) if isinstance(event, SliceOverused)]

    def broker_events(self, since: int) -> list[tuple[int, Event]]:
        return [
            (message.sequence, envelope.event)
            for message in self.broker.stored(subjects.OVERUSE_EVENTS)
            if message.sequence > since and (envelope := message.envelope()) is not None
        ]

    def outcomes(self, since: int = 0) -> list[NodeConfigApplied | NodeConfigFailed]:
        return [
            event
            for event in self._after(subjects.config_subject(NODE), since)
            if isinstance(event, NodeConfigApplied | NodeConfigFailed)
        ]

    async def _first(self, found: Callable[[], list[T]], what: str) -> T:
        """The first of `found()`, looked for again at every store until there is one (boundedly)."""
        with anyio.move_on_after(WAIT_S):
            while not (hits := found()):
                await self.broker.next_store()
            return hits[0]
        pytest.fail(f"timed out after {WAIT_S} s waiting for {what}")

    async def report(
        self, condition: Callable[[NodeGpusReported], bool], what: str, since: int = 0
    ) -> NodeGpusReported:
        """The first report from ``since`` on that meets ``condition``, waiting for it if needed."""
        return await self._first(lambda: [r for r in self.reports(since) if condition(r)], what)

    async def outcome(self, plan_id: str, since: int = 0) -> NodeConfigApplied | NodeConfigFailed:
        return await self._first(
            lambda: [e for e in self.outcomes(since) if e.plan_id == plan_id],
            f"the outcome of plan {plan_id}",
        )


def slices(report: NodeGpusReported) -> Slices:
    return {gpu.index: [(s.id, s.used) for s in gpu.slices] for gpu in report.gpus}


@dataclass
class Node:
    root: Path
    plugin_dir: Path
    mps_root: Path
    pod_resources_socket: Path
    nvml: FakeNvml
    inventory: NvmlInventory
    control: SubprocessMpsControl
    manager: DeviceManager
    capacity: list[dict[str, int]]
    bus: MemoryBus
    configs: MemoryConfigStore
    events: AgentLog

    def daemon(self, index: int) -> DaemonSpec:
        return DaemonSpec.under(self.mps_root, index, self.nvml.gpus()[index].uuid or "")

    async def put_config(self, plan_id: str, gpus: dict[int, tuple[int, ...]]) -> None:
        desired = NodeMpsConfig(node=NODE, plan_id=plan_id, plan_sequence=1, gpus=gpus)
        await self.configs.put(subjects.node_config_key(NODE), desired.model_dump_json().encode())

    async def apply(self, plan_id: str, gpus: dict[int, tuple[int, ...]]) -> NodeGpusReported:
        """Put a config, expect it applied and return the first report that shows the plan."""
        mark = self.events.mark()
        await self.put_config(plan_id, gpus)
        assert await self.events.outcome(plan_id, mark) == NodeConfigApplied(
            node=NODE, plan_id=plan_id, gpus=gpus
        )
        return await self.events.report(
            lambda report: report.applied_plan_id == plan_id, f"a report of plan {plan_id}", mark
        )

    async def kubelet_sees(self, capacity: dict[str, int]) -> None:
        await eventually(
            lambda: bool(self.capacity) and self.capacity[-1] == capacity, f"kubelet capacity {capacity}"
        )

    def kubelet_device_ids(self) -> dict[str, set[str]]:
        return {resource: set(devices) for resource, devices in self.manager.devices().items()}


@contextlib.asynccontextmanager
async def simulated_node(broker: MemoryBroker, gpus: Sequence[SimulatedGpu]) -> AsyncIterator[Node]:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="mpsa-"))
    plugin_dir = root / "dp"
    plugin_dir.mkdir()
    pod_resources_socket = root / "pod-resources.sock"
    capacity: list[dict[str, int]] = []

    async def record_capacity(counts: dict[str, int]) -> None:
        capacity.append(counts)

    manager = DeviceManager(
        plugin_dir, pod_resources_socket=pod_resources_socket, on_capacity=record_capacity
    )
    nvml = FakeNvml(gpus, node_name=NODE)
    try:
        await manager.start()
        yield Node(
            root=root,
            plugin_dir=plugin_dir,
            mps_root=root / "mps",
            pod_resources_socket=pod_resources_socket,
            nvml=nvml,
            inventory=NvmlInventory(nvml),
            control=SubprocessMpsControl(FAKE_MPS_CONTROL),
            manager=manager,
            capacity=capacity,
            bus=broker.bus("tests"),
            configs=broker.configs,
            events=AgentLog(broker),
        )
    finally:
        with anyio.CancelScope(shield=True):
            await manager.stop()
        _kill_fake_daemons(root / "mps")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.asynccontextmanager
async def running_agent(
    node: Node,
    *,
    heartbeat_seconds: float = 30.0,
    usage_poll_seconds: float = 0.05,
    allocation_grace_seconds: float = 0.3,
    own_daemons: bool = True,
    alive_file: Path | None = None,
    daemon_check_seconds: float = 30.0,
    processes: ProcessSlices | None = None,
    slice_server: SliceServer | None = None,
) -> AsyncIterator[NodeAgent]:
    plugin = slice_server or SliceDevicePlugin(plugin_dir=node.plugin_dir, pipe_root=node.mps_root)
    settings = AgentSettings(
        node=NODE,
        mps_root=node.mps_root,
        pod_resources_socket=node.pod_resources_socket,
        heartbeat_seconds=heartbeat_seconds,
        usage_poll_seconds=usage_poll_seconds,
        allocation_grace_seconds=allocation_grace_seconds,
        own_daemons=own_daemons,
        alive_file=alive_file,
        daemon_check_seconds=daemon_check_seconds,
    )
    agent = NodeAgent(settings, node.bus, node.inventory, node.control, plugin, processes=processes)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(agent.run)
            yield agent
            group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await plugin.close()


async def started(node: Node) -> NodeGpusReported:
    """The agent's first report: sent once it has read the GPUs and started their daemons."""
    return await node.events.report(lambda _: True, "the agent's first report")


def _pod(name: str) -> PodRef:
    return PodRef(namespace="team-a", name=name, uid=f"uid-{name}")


def _daemon_pid(daemon: DaemonSpec) -> int:
    return int(daemon.pid_file.read_text())


def _pid_in(daemon: DaemonSpec) -> int | None:
    """The pid file's PID; None while there is none (a restart removes it before the new one writes)."""
    try:
        return int(daemon.pid_file.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _is_running(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def _kill_fake_daemons(mps_root: Path) -> None:
    """SIGKILL every daemon named by a pid file under ``mps_root`` that is still our fake."""
    for pid_file in mps_root.glob(f"*/pipe/{PID_FILE_NAME}"):
        try:
            pid = int(pid_file.read_text())
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (FileNotFoundError, ValueError):
            continue
        if b"simulation.fake_mps_control" in command_line:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_until_gone(pid)


async def test_on_start_it_reports_its_gpus_and_runs_one_daemon_per_gpu(broker: MemoryBroker) -> None:
    async with simulated_node(broker, [A100, H100, A100_MIG]) as node, running_agent(node):
        first = await started(node)

        assert first.node == NODE
        assert first.applied_plan_id is None
        assert [
            (gpu.index, gpu.uuid, gpu.model, gpu.memory_mib, gpu.compute_capability, gpu.mig_enabled)
            for gpu in first.gpus
        ] == [
            (0, node.nvml.gpus()[0].uuid, "NVIDIA-A100-SXM4-40GB", 40960, (8, 0), False),
            (1, node.nvml.gpus()[1].uuid, "NVIDIA-H100-80GB-HBM3", 81559, (9, 0), False),
            (2, node.nvml.gpus()[2].uuid, "NVIDIA-A100-SXM4-40GB", 40960, (8, 0), True),
        ]
        assert all(gpu.slices == () for gpu in first.gpus)
        assert [gpu.daemon_healthy for gpu in first.gpus] == [True, True, False]
        for index in (0, 1):
            daemon = node.daemon(index)
            assert await node.control.is_alive(daemon)
            assert _is_running(_daemon_pid(daemon))
            assert (
                node.nvml.nvmlDeviceGetComputeMode(FakeDeviceHandle(index))
                == FakeNvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
            )
        assert not node.daemon(2).pipe_dir.exists(), "a MIG GPU gets no MPS daemon"
        assert node.nvml.nvmlDeviceGetComputeMode(FakeDeviceHandle(2)) == FakeNvml.NVML_COMPUTEMODE_DEFAULT
        assert node.manager.devices() == {}


async def test_a_config_is_applied_offered_to_the_kubelet_and_reported(broker: MemoryBroker) -> None:
    async with simulated_node(broker, [A100, H100]) as node, running_agent(node):
        await started(node)

        report = await node.apply("plan-1", {0: (10, 10, 20), 1: (40,)})

        assert slices(report) == {
            0: [("mps-g0-10gb-0", False), ("mps-g0-10gb-1", False), ("mps-g0-20gb-0", False)],
            1: [("mps-g1-40gb-0", False)],
        }
        await node.kubelet_sees({GB10: 2, GB20: 1, GB40: 1})
        assert node.kubelet_device_ids() == {
            GB10: {"mps-g0-10gb-0", "mps-g0-10gb-1"},
            GB20: {"mps-g0-20gb-0"},
            GB40: {"mps-g1-40gb-0"},
        }

        # A second plan keeps the surviving slices' IDs and only adds or removes the difference.
        report = await node.apply("plan-2", {0: (10, 10, 10), 1: (40, 20)})

        assert slices(report) == {
            0: [("mps-g0-10gb-0", False), ("mps-g0-10gb-1", False), ("mps-g0-10gb-2", False)],
            1: [("mps-g1-20gb-0", False), ("mps-g1-40gb-0", False)],
        }
        await node.kubelet_sees({GB10: 3, GB20: 1, GB40: 1})
        assert node.kubelet_device_ids()[GB20] == {"mps-g1-20gb-0"}


async def test_an_allocated_slice_is_reported_used_until_its_pod_is_gone(broker: MemoryBroker) -> None:
    async with simulated_node(broker, [A100]) as node, running_agent(node):
        await started(node)
        await node.apply("plan-1", {0: (10, 10)})
        await node.kubelet_sees({GB10: 2})

        mark = node.events.mark()
        allocated = await node.manager.allocate(_pod("a"), [("main", GB10)])

        assert allocated["main"].device_ids == ["mps-g0-10gb-0"]
        assert allocated["main"].envs["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=10240M"
        used = await node.events.report(
            lambda report: slices(report)[0] == [("mps-g0-10gb-0", True), ("mps-g0-10gb-1", False)],
            "the allocated slice reported used",
            mark,
        )
        assert used.applied_plan_id == "plan-1"

        mark = node.events.mark()
        node.manager.release("uid-a")

        await node.events.report(
            lambda report: slices(report)[0] == [("mps-g0-10gb-0", False), ("mps-g0-10gb-1", False)],
            "the released slice reported free",
            mark,
        )


async def test_a_config_that_overflows_a_gpu_is_refused_and_the_kubelet_keeps_its_devices(
    broker: MemoryBroker,
) -> None:
    async with simulated_node(broker, [A100, H100]) as node, running_agent(node):
        await started(node)
        await node.apply("plan-good", {0: (20, 20), 1: (10,)})
        await node.kubelet_sees({GB10: 1, GB20: 2})
        devices_before = node.manager.devices()

        mark = node.events.mark()
        await node.put_config("plan-bad", {0: (30, 20), 1: (10, 10)})

        assert await node.events.outcome("plan-bad", mark) == NodeConfigFailed(
            node=NODE,
            plan_id="plan-bad",
            reason="GPU 0: slices would add up to 50 GiB but the GPU has 40 GiB",
            gpus={0: (30, 20), 1: (10, 10)},
        )
        assert node.manager.devices() == devices_before
        assert node.capacity[-1] == {GB10: 1, GB20: 2}

        # The agent still works, and its reports still name the last applied plan.
        report = await node.apply("plan-next", {0: (20,), 1: (10, 10)})
        assert slices(report) == {
            0: [("mps-g0-20gb-0", False)],
            1: [("mps-g1-10gb-0", False), ("mps-g1-10gb-1", False)],
        }
        assert all(r.applied_plan_id != "plan-bad" for r in node.events.reports())


async def test_a_config_that_drops_an_in_use_slice_keeps_it(broker: MemoryBroker) -> None:
    async with simulated_node(broker, [A100]) as node, running_agent(node):
        await started(node)
        await node.apply("plan-1", {0: (10, 10)})
        await node.kubelet_sees({GB10: 2})
        mark = node.events.mark()
        await node.manager.allocate(_pod("a"), [("main", GB10)])
        await node.events.report(
            lambda report: ("mps-g0-10gb-0", True) in slices(report)[0], "the slice reported used", mark
        )

        report = await node.apply("plan-2", {0: (20,)})

        assert slices(report) == {0: [("mps-g0-10gb-0", True), ("mps-g0-20gb-0", False)]}
        await node.kubelet_sees({GB10: 1, GB20: 1})
        assert node.kubelet_device_ids() == {GB10: {"mps-g0-10gb-0"}, GB20: {"mps-g0-20gb-0"}}
        assert node.manager.assignments() == {"uid-a": {"main": ["mps-g0-10gb-0"]}}

        # Keeping it must still fit: 10 GiB held + 40 GiB wanted is more than the GPU has.
        mark = node.events.mark()
        await node.put_config("plan-3", {0: (40,)})
        assert await node.events.outcome("plan-3", mark) == NodeConfigFailed(
            node=NODE,
            plan_id="plan-3",
            reason="GPU 0: slices would add up to 50 GiB (10 GiB of them held by running containers) "
            "but the GPU has 40 GiB",
            gpus={0: (40,)},
        )


async def test_a_killed_daemon_is_started_again_by_the_daemon_check(broker: MemoryBroker) -> None:
    async with (
        simulated_node(broker, [A100, H100]) as node,
        running_agent(node, daemon_check_seconds=0.3, heartbeat_seconds=0.3),
    ):
        await started(node)
        daemon = node.daemon(1)
        killed = _daemon_pid(daemon)
        untouched = _daemon_pid(node.daemon(0))

        os.kill(killed, signal.SIGKILL)
        wait_until_gone(killed)

        await eventually(lambda: _pid_in(daemon) not in (None, killed), "a new daemon for GPU 1")
        assert await node.control.is_alive(daemon)
        assert _is_running(_daemon_pid(daemon))
        assert _daemon_pid(node.daemon(0)) == untouched, "the healthy GPU's daemon is left alone"
        mark = node.events.mark()
        report = await node.events.report(
            lambda r: all(gpu.daemon_healthy for gpu in r.gpus), "a report with both daemons answering", mark
        )
        assert [gpu.fault for gpu in report.gpus] == [None, None]


async def test_each_daemon_caps_future_clients_at_its_largest_slice_also_after_a_restart(
    broker: MemoryBroker,
) -> None:
    async with simulated_node(broker, [A100, H100]) as node, running_agent(node, daemon_check_seconds=0.3):
        await started(node)
        await node.apply("plan-1", {0: (10, 20), 1: (5,)})
        for index, limit in ((0, 20480), (1, 5120)):
            reply = await node.control.send(node.daemon(index), "get_default_device_pinned_mem_limit 0")
            assert parse_mem_limit(reply) == limit

        # A server already running under the 20 GiB cap is raised with the GPU's new largest slice.
        await node.control.send(node.daemon(0), "start_server -uid 1000")
        [server] = parse_server_list(await node.control.send(node.daemon(0), "get_server_list"))
        await node.apply("plan-2", {0: (10, 30), 1: (5,)})
        reply = await node.control.send(node.daemon(0), f"get_device_pinned_mem_limit {server} 0")
        assert parse_mem_limit(reply) == 30720

        killed = _daemon_pid(node.daemon(0))
        os.kill(killed, signal.SIGKILL)
        wait_until_gone(killed)
        await eventually(lambda: _pid_in(node.daemon(0)) not in (None, killed), "a new daemon for GPU 0")

        async def limit_restored() -> bool:
            try:
                reply = await node.control.send(node.daemon(0), "get_default_device_pinned_mem_limit 0")
            except MpsCommandError:
                return False
            return parse_mem_limit(reply) == 30720

        await eventually(limit_restored, "the restarted daemon to get GPU 0's limit back")


async def test_an_unreadable_config_is_skipped_and_the_agent_keeps_working(broker: MemoryBroker) -> None:
    async with simulated_node(broker, [A100]) as node, running_agent(node):
        await started(node)
        key = subjects.node_config_key(NODE)
        mark = node.events.mark()

        await node.configs.put(key, b"{not json")
        await node.configs.put(key, b'{"node": "x", "plan_id": "p", "plan_sequence": -1, "gpus": {}}')
        await node.configs.put(key, b"\xff\xfe")
        await node.configs.delete(key)
        report = await node.apply("plan-1", {0: (10,)})

        assert slices(report) == {0: [("mps-g0-10gb-0", False)]}
        assert node.events.outcomes(mark) == [NodeConfigApplied(node=NODE, plan_id="plan-1", gpus={0: (10,)})]
        await node.kubelet_sees({GB10: 1})


async def test_a_config_already_in_the_bucket_is_applied_on_start(broker: MemoryBroker) -> None:
    async with simulated_node(broker, [A100]) as node:
        await node.put_config("plan-early", {0: (20,)})

        async with running_agent(node):
            assert await node.events.outcome("plan-early") == NodeConfigApplied(
                node=NODE, plan_id="plan-early", gpus={0: (20,)}
            )
            await node.kubelet_sees({GB20: 1})


async def test_a_restarted_agent_says_again_that_it_applied_the_config(broker: MemoryBroker) -> None:
    async with simulated_node(broker, [A100]) as node:
        async with running_agent(node):
            await node.apply("plan-1", {0: (20,)})
        mark = node.events.mark()
        async with running_agent(node):
            assert await node.events.outcome("plan-1", mark) == NodeConfigApplied(
                node=NODE, plan_id="plan-1", gpus={0: (20,)}
            )


async def test_a_slice_allocated_since_the_last_usage_poll_is_kept(broker: MemoryBroker) -> None:
    # A long poll interval makes the window between two polls deterministic; it exists at any interval.
    async with simulated_node(broker, [A100]) as node, running_agent(node, usage_poll_seconds=60):
        await started(node)
        await node.apply("plan-1", {0: (10, 10)})
        await node.kubelet_sees({GB10: 2})
        await node.manager.allocate(_pod("a"), [("main", GB10)])

        report = await node.apply("plan-2", {0: (20,)})

        assert slices(report) == {0: [("mps-g0-10gb-0", True), ("mps-g0-20gb-0", False)]}


async def test_a_restarted_agent_keeps_the_slice_a_container_holds(broker: MemoryBroker) -> None:
    async with simulated_node(broker, [A100]) as node:
        async with running_agent(node):
            await started(node)
            await node.apply("plan-1", {0: (10, 10)})
            await node.kubelet_sees({GB10: 2})
            await node.manager.allocate(_pod("a"), [("main", GB10)])  # mps-g0-10gb-0
            await node.manager.allocate(_pod("b"), [("main", GB10)])  # mps-g0-10gb-1
            node.manager.release("uid-a")
            mark = node.events.mark()
            await node.events.report(
                lambda report: slices(report)[0] == [("mps-g0-10gb-0", False), ("mps-g0-10gb-1", True)],
                "only pod b's slice in use",
                mark,
            )
            report = await node.apply("plan-2", {0: (10,)})
            assert slices(report) == {0: [("mps-g0-10gb-1", True)]}

        mark = node.events.mark()
        async with running_agent(node):  # same KV, same kubelet, same daemons
            # (Its first report names no plan yet; it names plan-2 once the agent applied it again.)
            report = await node.events.report(
                lambda report: report.applied_plan_id == "plan-2", "the restarted agent's plan-2", mark
            )
            assert [slice_id for slice_id, _ in slices(report)[0]] == ["mps-g0-10gb-1"]
            await node.events.report(
                lambda report: slices(report)[0] == [("mps-g0-10gb-1", True)],
                "pod b's slice, still in use, after the restart",
                mark,
            )
            await node.kubelet_sees({GB10: 1})
            assert node.kubelet_device_ids() == {GB10: {"mps-g0-10gb-1"}}


async def test_a_stopping_agent_withdraws_its_slices_and_a_restarted_one_offers_held_ones_first(
    broker: MemoryBroker,
) -> None:
    async with simulated_node(broker, [A100]) as node:
        async with running_agent(node):
            await started(node)
            await node.apply("plan-1", {0: (10, 20)})
            await node.kubelet_sees({GB10: 1, GB20: 1})
            await node.manager.allocate(_pod("a"), [("main", GB10)])
            mark = node.events.mark()
            await node.events.report(lambda r: r.gpus[0].slices[0].holder == "team-a/a", "a named", mark)
        last = node.events.reports()[-1]
        assert [(s.id, s.listed_by_kubelet) for s in last.gpus[0].slices] == [
            ("mps-g0-10gb-0", False),
            ("mps-g0-20gb-0", False),
        ]
        # Started again, the agent's first report already shows the slice pod a holds, used.
        mark = node.events.mark()
        async with running_agent(node):
            first = await node.events.report(lambda r: True, "the first report", mark)
        assert [(s.id, s.used, s.holder) for s in first.gpus[0].slices][:1] == [
            ("mps-g0-10gb-0", True, "team-a/a")
        ]


async def test_with_an_external_daemon_keeper_restarting_the_agent_stops_no_daemon(
    broker: MemoryBroker,
) -> None:
    """The arrangement of `k8s/`: `mpsflow run mps-daemons` owns the daemons, the agent only talks to
    them. Agents come and go; the daemons, and with them the running pods' MPS servers, stay; a
    daemon the keeper restarts gets the GPU's defaults from the agent again."""
    async with simulated_node(broker, [A100, H100]) as node:
        keeper = DaemonKeeper(node.inventory, node.control, node.mps_root)
        async with anyio.create_task_group() as group:
            group.start_soon(keeper.run, 0.1)
            async with running_agent(node, own_daemons=False, daemon_check_seconds=0.2):
                first = await started(node)
                assert all(gpu.daemon_healthy for gpu in first.gpus)
                pids = [_daemon_pid(node.daemon(index)) for index in range(len(first.gpus))]
            # The agent is gone (as its container would be); no daemon went with it.
            assert all(_is_running(pid) for pid in pids)
            mark = node.events.mark()
            async with running_agent(node, own_daemons=False, daemon_check_seconds=0.2) as agent:
                again = await node.events.report(lambda _: True, "the new agent's first report", since=mark)
                assert all(gpu.daemon_healthy for gpu in again.gpus)
                assert [_daemon_pid(node.daemon(index)) for index in range(len(again.gpus))] == pids
                # A daemon that dies is the keeper's to start again, and the agent notices the new one.
                os.kill(pids[0], signal.SIGKILL)
                await eventually(
                    lambda: _pid_in(node.daemon(0)) not in (None, pids[0]), "the keeper's new daemon"
                )
                await eventually(lambda: agent.daemon_health.get(0) is True, "the agent seeing it answer")
            group.cancel_scope.cancel()


async def test_the_agent_touches_its_alive_file_after_every_heartbeat(broker: MemoryBroker) -> None:
    async with simulated_node(broker, [A100]) as node:
        alive = node.mps_root.parent / "alive"
        async with running_agent(node, heartbeat_seconds=0.1, alive_file=alive):
            await eventually(alive.exists, "the first touch")
            first = alive.stat().st_mtime_ns
            await eventually(lambda: alive.stat().st_mtime_ns > first, "a later heartbeat's touch")


async def test_a_critical_xid_takes_its_gpu_out_and_its_slices_turn_unhealthy_as_containers_end(
    broker: MemoryBroker,
) -> None:
    """Nothing is marked while held or free (the planner withdraws free slices where no pod may be
    given them); a slice whose container ends on the failed GPU turns Unhealthy and stays so."""
    async with simulated_node(broker, [A100, A100]) as node, running_agent(node):
        await started(node)
        await node.apply("plan-1", {0: (10, 10), 1: (10,)})
        await node.manager.allocate(_pod("a"), [("main", GB10)])  # mps-g0-10gb-0
        mark = node.events.mark()

        node.nvml.raise_xid(1, 31)  # an application's page fault: the GPU is fine
        node.nvml.raise_xid(0, 79)
        report = await node.events.report(lambda r: r.gpus[0].fault is not None, "GPU 0's fault", mark)

        assert report.gpus[0].fault == "Xid 79 (the GPU has fallen off the bus) reported by the driver"
        assert report.gpus[1].fault is None and report.gpus[0].daemon_healthy
        assert set(node.manager.devices()[GB10].values()) == {"Healthy"}

        node.manager.release("uid-a")
        await eventually(
            lambda: (
                node.manager.devices()[GB10]
                == {"mps-g0-10gb-0": "Unhealthy", "mps-g0-10gb-1": "Healthy", "mps-g1-10gb-0": "Healthy"}
            ),
            "the kubelet seeing the freed slice of GPU 0 Unhealthy",
        )


async def test_a_gpu_whose_daemon_stops_answering_is_out_until_it_answers_again(broker: MemoryBroker) -> None:
    async with simulated_node(broker, [A100, A100]) as node:
        keeper = DaemonKeeper(node.inventory, node.control, node.mps_root)
        await keeper.keep_all(await node.inventory.read())
        async with running_agent(node, own_daemons=False, daemon_check_seconds=0.1):
            await started(node)
            await node.apply("plan-1", {0: (10, 10), 1: (10,)})
            await node.manager.allocate(_pod("a"), [("main", GB10)])  # mps-g0-10gb-0
            killed = _daemon_pid(node.daemon(0))
            mark = node.events.mark()

            os.kill(killed, signal.SIGKILL)
            wait_until_gone(killed)
            down = await node.events.report(lambda r: not r.gpus[0].daemon_healthy, "GPU 0 down", mark)
            assert down.gpus[1].daemon_healthy and down.gpus[0].fault is None
            node.manager.release("uid-a")
            await eventually(
                lambda: node.manager.devices()[GB10]["mps-g0-10gb-0"] == "Unhealthy",
                "the freed slice Unhealthy",
            )
            assert node.manager.devices()[GB10]["mps-g0-10gb-1"] == "Healthy"

            mark = node.events.mark()
            await keeper.keep_all(await node.inventory.read())  # the keeper starts it again
            await node.events.report(lambda r: r.gpus[0].daemon_healthy, "GPU 0 answering again", mark)
            await eventually(
                lambda: set(node.manager.devices()[GB10].values()) == {"Healthy"}, "every slice Healthy again"
            )
        _kill_fake_daemons(node.mps_root)


async def test_a_container_using_more_memory_than_its_slice_is_told_once_per_set_of_processes(
    broker: MemoryBroker,
) -> None:
    async with simulated_node(broker, [A100]) as node:
        proc = node.root / "proc"

        def container_process(pid: int, mib: int, environment: dict[str, str]) -> None:
            (proc / str(pid)).mkdir(parents=True)
            (proc / str(pid) / "environ").write_bytes(
                b"".join(f"{name}={value}".encode() + b"\0" for name, value in environment.items())
            )
            node.nvml.start_process(0, pid, mib, mps_client=True)

        async with running_agent(node, heartbeat_seconds=0.1, processes=ProcEnvironment(proc)):
            await started(node)
            await node.apply("plan-1", {0: (10, 20)})
            given = (await node.manager.allocate(_pod("a"), [("main", GB10)]))["main"].envs
            assert given[SLICE_ENV] == "mps-g0-10gb-0"
            mark = node.events.mark()
            container_process(5001, 6000, given)  # within the slice alone,
            container_process(5002, 6000, given)  # over it together
            overuse = await node.events._first(lambda: node.events.overuses(mark), "an overuse")
            assert overuse == SliceOverused(
                node=NODE,
                namespace="team-a",
                name="a",
                slice_id="mps-g0-10gb-0",
                gpu_index=0,
                size_gb=10,
                used_mib=12000,
                pids=(5001, 5002),
            )
            report = await node.events.report(lambda r: bool(r.gpus[0].processes), "the processes", mark)
            assert {p.pid: p.slice_id for p in report.gpus[0].processes} == {
                5001: "mps-g0-10gb-0",
                5002: "mps-g0-10gb-0",
            }
            # Heartbeats later, the same processes over the same slice are not told again.
            seen = node.events.mark()
            await node.events.report(lambda _: True, "a later heartbeat", seen)
            await node.events.report(lambda _: True, "one more", node.events.mark())
            assert node.events.overuses(mark) == [overuse]


async def test_with_the_keeper_serving_the_slices_a_stopped_agent_leaves_them_and_the_next_takes_them_up(
    broker: MemoryBroker,
) -> None:
    """The arrangement of `k8s/`: the mps-daemons keeper serves the slices and the agent asks it over
    the link. An agent that stops withdraws nothing (the kubelet keeps every device, so no pod in
    flight loses its slice), and the next one starts from the keeper's list: free slices keep their
    device IDs too, and applying the same config again changes nothing."""
    async with simulated_node(broker, [A100]) as node:
        keeper_plugin = SliceDevicePlugin(plugin_dir=node.plugin_dir, pipe_root=node.mps_root)
        link = LinkServer(keeper_plugin, node.root / "link.sock", node.root / "served-slices.json")
        async with anyio.create_task_group() as keeper:
            keeper.start_soon(keeper_plugin.run)
            keeper.start_soon(link.run)
            await eventually((node.root / "link.sock").exists, "the link socket")
            remote = RemotePlugin(node.root / "link.sock")
            async with running_agent(node, slice_server=remote):
                await started(node)
                await node.apply("plan-1", {0: (10, 10)})
                await node.manager.allocate(_pod("a"), [("main", GB10)])  # mps-g0-10gb-0
            listed = node.kubelet_device_ids()
            assert listed == {GB10: {"mps-g0-10gb-0", "mps-g0-10gb-1"}}
            await anyio.sleep(0.3)
            assert node.kubelet_device_ids() == listed
            assert set(node.manager.devices()[GB10].values()) == {"Healthy"}  # nothing withdrawn

            mark = node.events.mark()
            async with running_agent(node, slice_server=remote):
                first = await node.events.report(lambda _: True, "the new agent's first report", mark)
                assert [(s.id, s.used) for s in first.gpus[0].slices] == [
                    ("mps-g0-10gb-0", True),
                    ("mps-g0-10gb-1", False),
                ]
                again = await node.events.report(
                    lambda r: r.applied_plan_id == "plan-1", "plan-1 again", mark
                )
                assert [s.id for s in again.gpus[0].slices] == ["mps-g0-10gb-0", "mps-g0-10gb-1"]
            keeper.cancel_scope.cancel()
        await keeper_plugin.close()
