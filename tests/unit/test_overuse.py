"""`node_agent.overuse` (which slices' containers use more memory than the slice) and the /proc
adapter that says which slice a process belongs to (`node_agent.processes`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node_agent.gpus import GpuProcess, GpuReading
from node_agent.overuse import overused
from node_agent.processes import ProcEnvironment
from node_agent.slices import SLICE_ENV, SliceDevice, slice_device_id


def gpu(index: int, *processes: tuple[int, int | None]) -> GpuReading:
    return GpuReading(
        index=index,
        uuid=f"GPU-{index}",
        model="NVIDIA-A100-SXM4-40GB",
        memory_total_mib=40960,
        memory_used_mib=0,
        compute_capability=(8, 0),
        mig_enabled=False,
        processes=tuple(GpuProcess(pid, mib) for pid, mib in processes),
    )


def device(gpu_index: int, size_gb: int, ordinal: int = 0) -> SliceDevice:
    return SliceDevice(
        id=slice_device_id(gpu_index, size_gb, ordinal),
        gpu_index=gpu_index,
        gpu_uuid=f"GPU-{gpu_index}",
        size_gb=size_gb,
        gpu_memory_mib=40960,
    )


TEN, FIVE = device(0, 10), device(1, 5)


@pytest.mark.parametrize(
    ("gpus", "slice_of", "expected"),
    [
        # One process within its slice, one process of another slice over it.
        ([gpu(0, (1, 10240)), gpu(1, (2, 5121))], {1: TEN.id, 2: FIVE.id}, [(FIVE.id, 5121, (2,))]),
        # Two processes of one container, each within the slice, together over it.
        ([gpu(0, (1, 6000), (2, 6000))], {1: TEN.id, 2: TEN.id}, [(TEN.id, 12000, (1, 2))]),
        # Memory NVML cannot tell, a process of no slice, one naming a slice that is not offered, and
        # one on another GPU than its slice count for nothing.
        (
            [gpu(0, (1, None), (2, 99999), (3, 99999)), gpu(1, (4, 99999))],
            {1: TEN.id, 3: "mps-g0-40gb-0", 4: TEN.id},
            [],
        ),
    ],
    ids=["one over", "together over", "not counted"],
)
def test_a_slice_is_overused_when_its_processes_together_use_more_than_it_holds(
    gpus: list[GpuReading], slice_of: dict[int, str], expected: list[tuple[str, int, tuple[int, ...]]]
) -> None:
    found = overused(gpus, [TEN, FIVE], slice_of)
    assert [(o.device.id, o.used_mib, o.pids) for o in found] == expected


@given(st.lists(st.tuples(st.integers(1, 50), st.integers(0, 20000)), max_size=20, unique_by=lambda p: p[0]))
def test_overuse_is_exactly_the_slices_whose_sum_is_over_their_size(processes: list[tuple[int, int]]) -> None:
    slice_of = {pid: (TEN.id if pid % 2 else "mps-g0-5gb-0") for pid, _ in processes}
    five = device(0, 5)
    found = {o.device.id: o.used_mib for o in overused([gpu(0, *processes)], [TEN, five], slice_of)}
    for slice_device in (TEN, five):
        total = sum(mib for pid, mib in processes if slice_of[pid] == slice_device.id)
        assert (slice_device.id in found) == (total > slice_device.size_gb * 1024)
        if slice_device.id in found:
            assert found[slice_device.id] == total


@pytest.mark.anyio
async def test_the_slice_of_a_process_comes_from_its_environment(tmp_path: Path) -> None:
    def process(pid: int, *environment: str) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "environ").write_bytes(b"\0".join(e.encode() for e in environment) + b"\0")

    process(10, "PATH=/bin", f"{SLICE_ENV}=mps-g0-10gb-0", "HOME=/root")
    process(11, "PATH=/bin")  # not a slice container's
    process(12, f"{SLICE_ENV}=")  # an empty value names no slice
    (tmp_path / "13").mkdir()  # gone, or not ours to read: no environ
    found = await ProcEnvironment(tmp_path).slices_of([10, 11, 12, 13, 14])
    assert found == {10: "mps-g0-10gb-0"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
