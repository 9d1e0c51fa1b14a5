"""The NVML inventory adapter over simulated GPUs (simulation.fake_nvml)."""

from __future__ import annotations

import ctypes
import json
from collections.abc import Callable
from pathlib import Path

import pydantic
import pytest

from node_agent.gpus import GpuProcess, GpuReading, XidError
from node_agent.nvml import NvmlInventory, NvmlUnavailable
from simulation.fake_nvml import FakeNvml, SimulatedGpu, simulated_gpu_uuid

A100_UUID = "GPU-0c8e7d3a-6f4b-4b59-a1f2-3d5e6f708192"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def a100(*, mig_enabled: bool = False) -> SimulatedGpu:
    return SimulatedGpu("NVIDIA A100-SXM4-40GB", 40960, uuid=A100_UUID, mig_enabled=mig_enabled)


def tesla_t4() -> SimulatedGpu:
    return SimulatedGpu("Tesla T4", 15360, compute_capability=(7, 5))


def tesla_p100() -> SimulatedGpu:
    return SimulatedGpu("Tesla P100-PCIE-16GB", 16384, compute_capability=(6, 0))


@pytest.mark.anyio
async def test_reads_every_gpu_in_index_order() -> None:
    nvml = FakeNvml([a100(), tesla_t4()], node_name="gpu-node-1")

    readings = await NvmlInventory(nvml).read()

    assert readings == [
        GpuReading(
            index=0,
            uuid=A100_UUID,
            model="NVIDIA-A100-SXM4-40GB",
            memory_total_mib=40960,
            memory_used_mib=0,
            compute_capability=(8, 0),
            mig_enabled=False,
            processes=(),
        ),
        GpuReading(
            index=1,
            uuid=simulated_gpu_uuid("gpu-node-1", 1),
            model="Tesla-T4",
            memory_total_mib=15360,
            memory_used_mib=0,
            compute_capability=(7, 5),
            mig_enabled=False,
            processes=(),
        ),
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("gpu", "expected"),
    [
        pytest.param(a100(mig_enabled=True), True, id="mig-on"),
        pytest.param(a100(), False, id="mig-capable-but-off"),
        pytest.param(tesla_t4(), False, id="not-mig-capable"),
    ],
)
async def test_reports_mig_mode(gpu: SimulatedGpu, expected: bool) -> None:
    [reading] = await NvmlInventory(FakeNvml([gpu])).read()

    assert reading.mig_enabled is expected


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("gpu", "clients"),
    [
        pytest.param(a100(), 48, id="ampere"),
        pytest.param(tesla_t4(), 48, id="turing"),
        pytest.param(tesla_p100(), 16, id="pascal"),
    ],
)
async def test_max_mps_clients_follows_the_architecture(gpu: SimulatedGpu, clients: int) -> None:
    [reading] = await NvmlInventory(FakeNvml([gpu])).read()

    assert reading.max_mps_clients == clients


@pytest.mark.anyio
async def test_reports_the_mps_server_and_its_clients() -> None:
    nvml = FakeNvml([a100()])
    nvml.start_process(0, pid=4100, used_memory_mib=512)
    nvml.start_process(0, pid=4200, used_memory_mib=10240, mps_client=True)
    nvml.start_process(0, pid=4300, used_memory_mib=None, mps_client=True)

    [reading] = await NvmlInventory(nvml).read()

    assert reading.processes == (
        GpuProcess(pid=4100, used_memory_mib=512),
        GpuProcess(pid=4200, used_memory_mib=10240),
        GpuProcess(pid=4300, used_memory_mib=None),
    )
    assert reading.memory_used_mib == 512 + 10240


@pytest.mark.anyio
async def test_a_stopped_process_is_no_longer_reported() -> None:
    nvml = FakeNvml([a100()])
    nvml.start_process(0, pid=4200, used_memory_mib=1024, mps_client=True)
    nvml.stop_process(0, pid=4200)

    [reading] = await NvmlInventory(nvml).read()

    assert reading.processes == ()
    assert reading.memory_used_mib == 0


def test_a_process_cannot_use_more_memory_than_the_gpu_has() -> None:
    nvml = FakeNvml([tesla_t4()])

    with pytest.raises(ValueError, match="does not fit"):
        nvml.start_process(0, pid=4200, used_memory_mib=15361)


@pytest.mark.anyio
async def test_a_node_without_the_driver_library_is_reported_as_unavailable() -> None:
    inventory = NvmlInventory(FakeNvml([a100()], library_present=False))

    with pytest.raises(NvmlUnavailable, match=r"libnvidia-ml\.so\.1 not found") as failure:
        await inventory.read()

    assert isinstance(failure.value.__cause__, FakeNvml.NVMLError_LibraryNotFound)
    assert failure.value.__cause__.value == 12


@pytest.mark.anyio
async def test_the_real_library_without_a_driver_is_unavailable() -> None:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        pass
    else:
        pytest.skip("this machine has the NVIDIA driver library")

    with pytest.raises(NvmlUnavailable):
        await NvmlInventory().read()


@pytest.mark.anyio
async def test_initializes_nvml_once() -> None:
    class CountingNvml(FakeNvml):
        inits = 0

        def nvmlInit(self) -> None:  # noqa: N802 - pynvml's name
            self.inits += 1
            super().nvmlInit()

    nvml = CountingNvml([a100()])
    inventory = NvmlInventory(nvml)

    await inventory.read()
    await inventory.set_exclusive_process(0)
    await inventory.read()

    assert nvml.inits == 1


@pytest.mark.anyio
async def test_set_exclusive_process_changes_only_that_gpu() -> None:
    nvml = FakeNvml([a100(), tesla_t4()])

    await NvmlInventory(nvml).set_exclusive_process(1)

    assert (
        nvml.nvmlDeviceGetComputeMode(nvml.nvmlDeviceGetHandleByIndex(0)) == FakeNvml.NVML_COMPUTEMODE_DEFAULT
    )
    assert (
        nvml.nvmlDeviceGetComputeMode(nvml.nvmlDeviceGetHandleByIndex(1))
        == FakeNvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS
    )


@pytest.mark.anyio
async def test_set_exclusive_process_on_a_missing_gpu_is_an_nvml_error() -> None:
    with pytest.raises(FakeNvml.NVMLError_InvalidArgument):
        await NvmlInventory(FakeNvml([a100()])).set_exclusive_process(1)


def test_the_fake_refuses_calls_before_init_like_nvml() -> None:
    with pytest.raises(FakeNvml.NVMLError_Uninitialized):
        FakeNvml([a100()]).nvmlDeviceGetCount()


def test_gpus_load_from_json_with_stable_uuids(tmp_path: Path) -> None:
    node_file = tmp_path / "node.json"
    node_file.write_text(
        json.dumps(
            {
                "gpus": [
                    {"model": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "compute_capability": [9, 0]},
                    {
                        "model": "NVIDIA A100-SXM4-40GB",
                        "memory_mib": 40960,
                        "uuid": A100_UUID,
                        "mig_enabled": True,
                    },
                ]
            }
        )
    )

    loaded = FakeNvml.from_json(node_file, node_name="gpu-node-1").gpus()

    assert loaded == [
        SimulatedGpu(
            "NVIDIA H100 80GB HBM3",
            81559,
            uuid=simulated_gpu_uuid("gpu-node-1", 0),
            compute_capability=(9, 0),
        ),
        SimulatedGpu("NVIDIA A100-SXM4-40GB", 40960, uuid=A100_UUID, mig_enabled=True),
    ]
    assert FakeNvml.from_json(node_file, node_name="gpu-node-1").gpus() == loaded
    assert FakeNvml.from_json(node_file, node_name="gpu-node-2").gpus()[0].uuid != loaded[0].uuid


def test_simulated_uuids_look_like_nvml_uuids() -> None:
    assert simulated_gpu_uuid("gpu-node-1", 0).startswith("GPU-")
    assert len(simulated_gpu_uuid("gpu-node-1", 0)) == len("GPU-") + 36


@pytest.mark.parametrize(
    "gpu",
    [
        pytest.param({"model": "Tesla T4"}, id="no-memory"),
        pytest.param({"model": "Tesla T4", "memory_mib": 15360, "memory_gb": 16}, id="unknown-field"),
    ],
)
def test_json_gpus_are_validated(tmp_path: Path, gpu: dict[str, object]) -> None:
    node_file = tmp_path / "node.json"
    node_file.write_text(json.dumps({"gpus": [gpu]}))

    with pytest.raises(pydantic.ValidationError):
        FakeNvml.from_json(node_file, node_name="gpu-node-1")


@pytest.mark.parametrize(
    ("gpu", "message"),
    [
        pytest.param(lambda: SimulatedGpu("Tesla T4", 0), "memory_mib must be positive", id="no-memory"),
        pytest.param(
            lambda: SimulatedGpu("Tesla T4", 15360, compute_capability=(7, 5), mig_enabled=True),
            "has no MIG",
            id="t4-mig",
        ),
        pytest.param(lambda: FakeNvml([a100(), a100()]), "must be unique", id="duplicate-uuid"),
    ],
)
def test_impossible_simulations_are_refused(gpu: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        gpu()


@pytest.mark.anyio
async def test_an_older_driver_without_mig_or_the_mps_process_list_is_read_all_the_same() -> None:
    nvml = FakeNvml(
        [a100()],
        node_name="old-driver",
        missing_functions=frozenset({"nvmlDeviceGetMigMode", "nvmlDeviceGetMPSComputeRunningProcesses"}),
    )
    nvml.start_process(0, pid=4242, used_memory_mib=512)
    nvml.start_process(0, pid=4343, used_memory_mib=256, mps_client=True)  # unseen without the MPS list

    [gpu] = await NvmlInventory(nvml).read()

    assert gpu.mig_enabled is False
    assert [p.pid for p in gpu.processes] == [4242]


@pytest.mark.anyio
async def test_a_gpu_with_mig_pending_is_left_alone_like_one_in_mig_mode() -> None:
    pending = SimulatedGpu("NVIDIA A100-SXM4-40GB", 40960, mig_enabled=False, mig_pending=True)
    leaving = SimulatedGpu("NVIDIA A100-SXM4-40GB", 40960, mig_enabled=True, mig_pending=False)
    plain = SimulatedGpu("NVIDIA A100-SXM4-40GB", 40960)

    gpus = await NvmlInventory(FakeNvml([pending, leaving, plain], node_name="mig")).read()

    assert [gpu.mig_enabled for gpu in gpus] == [True, True, False]


@pytest.mark.anyio
async def test_critical_xid_errors_are_reported_once_each_with_their_gpu() -> None:
    nvml = FakeNvml([a100(), tesla_t4()], node_name="gpu-node-1")
    inventory = NvmlInventory(nvml)
    assert await inventory.xid_errors(0.01) == []  # watching starts here: nothing reported yet
    nvml.raise_xid(1, 79)
    nvml.raise_xid(0, 31)
    t4 = simulated_gpu_uuid("gpu-node-1", 1)
    assert await inventory.xid_errors(0.01) == [XidError(gpu_uuid=t4, xid=79)]
    assert await inventory.xid_errors(0.01) == [XidError(gpu_uuid=A100_UUID, xid=31)]
    assert await inventory.xid_errors(0.01) == []


@pytest.mark.anyio
async def test_gpus_that_cannot_report_xid_errors_are_not_watched() -> None:
    nvml = FakeNvml([a100()], node_name="gpu-node-1", xid_events=False)
    inventory = NvmlInventory(nvml)
    nvml.raise_xid(0, 79)
    assert await inventory.xid_errors(0.01) == []


def test_the_fake_event_set_waits_like_nvml() -> None:
    nvml = FakeNvml([a100()], node_name="n")
    nvml.nvmlInit()
    event_set = nvml.nvmlEventSetCreate()
    nvml.raise_xid(0, 48)  # before the GPU is registered: not in the set
    nvml.nvmlDeviceRegisterEvents(
        nvml.nvmlDeviceGetHandleByIndex(0), nvml.nvmlEventTypeXidCriticalError, event_set
    )
    with pytest.raises(nvml.NVMLError_Timeout):
        nvml.nvmlEventSetWait_v2(event_set, 1)
    nvml.raise_xid(0, 48)
    event = nvml.nvmlEventSetWait_v2(event_set, 1)
    assert (event.eventType, event.eventData, nvml.nvmlDeviceGetUUID(event.device)) == (8, 48, A100_UUID)
