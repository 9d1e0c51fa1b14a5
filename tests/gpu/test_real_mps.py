"""On a real NVIDIA GPU: NVML readings, and pinned memory limits that hold for a client process.

(The MPS control daemon's own behaviour on a GPU is in tests/contract/test_mps_control_contract.py.)

Opt-in: these run only where NVML loads and `nvidia-cuda-mps-control` is on the PATH (a GPU
machine); everywhere else they are skipped. The memory check allocates with PyTorch in a client
process started with the environment the device plugin gives containers, and expects an
allocation below the slice to succeed and one above it to fail.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import pytest

from node_agent.gpus import GpuReading
from node_agent.mps import DaemonSpec, SubprocessMpsControl
from node_agent.nvml import NvmlInventory, NvmlUnavailable
from node_agent.slices import SliceDevice, container_allocation, slice_device_id


def _gpu_available() -> bool:
    if shutil.which("nvidia-cuda-mps-control") is None:
        return False
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.anyio,
    pytest.mark.skipif(
        not _gpu_available(), reason="needs an NVIDIA GPU with NVML and nvidia-cuda-mps-control"
    ),
]

ALLOCATE = """
import sys, torch
mib = int(sys.argv[1])
try:
    block = torch.empty(mib * 1024 * 1024, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    print("allocated", mib)
except RuntimeError as error:
    print("refused", mib, str(error).splitlines()[0])
    sys.exit(3)
"""


@pytest.fixture
def mps_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="mpsg-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def first_gpu() -> GpuReading:
    try:
        readings = await NvmlInventory().read()
    except NvmlUnavailable as error:
        pytest.skip(str(error))
    usable = [g for g in readings if not g.mig_enabled]
    if not usable:
        pytest.skip("every GPU is in MIG mode")
    return usable[0]


@pytest.fixture
async def daemon(first_gpu: GpuReading, mps_root: Path) -> AsyncIterator[DaemonSpec]:
    control = SubprocessMpsControl()
    spec = DaemonSpec.under(mps_root, first_gpu.index, first_gpu.uuid)
    await control.start_daemon(spec)
    try:
        yield spec
    finally:
        await control.send(spec, "quit")


async def test_nvml_reports_every_gpu_with_its_memory(first_gpu: GpuReading) -> None:
    assert first_gpu.uuid.startswith(("GPU-", "MIG-"))
    assert first_gpu.memory_total_mib > 1024
    assert first_gpu.compute_capability >= (3, 0)
    print(
        f"GPU {first_gpu.index}: {first_gpu.model}, {first_gpu.memory_total_mib} MiB, "
        f"cc {first_gpu.compute_capability}, {first_gpu.max_mps_clients} MPS clients"
    )


@pytest.mark.parametrize(("size_gb", "allocate_mib", "fits"), [(2, 1536, True), (2, 3072, False)])
async def test_a_slice_pins_the_client_memory_limit(
    daemon: DaemonSpec, first_gpu: GpuReading, mps_root: Path, size_gb: int, allocate_mib: int, fits: bool
) -> None:
    pytest.importorskip("torch")
    device = SliceDevice(
        id=slice_device_id(first_gpu.index, size_gb, 0),
        gpu_index=first_gpu.index,
        gpu_uuid=first_gpu.uuid,
        size_gb=size_gb,
        gpu_memory_mib=first_gpu.memory_total_mib,
    )
    allocation = container_allocation(
        device, slices_on_gpu=1, pipe_root=mps_root, thread_policy="proportional"
    )
    environment = {
        **os.environ,
        **allocation.envs,
        # outside a container: the host pipe directory instead of the mounted one
        "CUDA_MPS_PIPE_DIRECTORY": str(daemon.pipe_dir),
        "CUDA_VISIBLE_DEVICES": first_gpu.uuid,
    }
    with anyio.fail_after(120):
        finished = await anyio.run_process(
            [sys.executable, "-c", ALLOCATE, str(allocate_mib)], env=environment, check=False
        )
    stdout, stderr = finished.stdout.decode(), finished.stderr.decode()
    print(stdout, stderr[-500:])
    assert (finished.returncode == 0) is fits, stdout + stderr[-2000:]


async def test_mpsflow_doctor_passes_on_this_gpu() -> None:
    """The same checks `mpsflow doctor` runs, held to every one passing: NVML, the GPUs, the MPS
    control command, a daemon with a pinned limit read back, and a CUDA client allocating just under
    (allowed) and just over (refused) that limit."""
    from node_agent.doctor import DoctorSettings, examine, report

    checks = await examine(DoctorSettings())
    print(report(checks))
    assert [check.status for check in checks] == ["ok"] * len(checks), report(checks)
