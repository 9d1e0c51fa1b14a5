"""Device IDs, resource names and the per-container MPS settings of slices."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from events.vocabulary import MpsIpcMode, slice_resource, slice_size
from node_agent.slices import (
    CONTAINER_SHM_DIRECTORY,
    MAX_DEVICE_ID_LENGTH,
    DeviceListStrategy,
    MountSpec,
    SliceDevice,
    ThreadPolicy,
    container_allocation,
    mps_pipe_directory,
    mps_shm_directory,
    parse_slice_device_id,
    slice_device_id,
)

H100_MIB = 81559
GPU0_UUID = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
GPU1_UUID = "GPU-9f8e7d6c-6666-7777-8888-999900001111"


def _slice(
    gpu_index: int, size_gb: int, ordinal: int, gpu_uuid: str, memory_mib: int = H100_MIB
) -> SliceDevice:
    return SliceDevice(
        id=slice_device_id(gpu_index, size_gb, ordinal),
        gpu_index=gpu_index,
        gpu_uuid=gpu_uuid,
        size_gb=size_gb,
        gpu_memory_mib=memory_mib,
    )


@pytest.mark.parametrize(
    ("gpu_index", "size_gb", "ordinal", "expected"),
    [
        (0, 10, 0, "mps-g0-10gb-0"),
        (1, 10, 3, "mps-g1-10gb-3"),
        (7, 80, 12, "mps-g7-80gb-12"),
    ],
)
def test_slice_device_id(gpu_index: int, size_gb: int, ordinal: int, expected: str) -> None:
    assert slice_device_id(gpu_index, size_gb, ordinal) == expected
    assert parse_slice_device_id(expected) == (gpu_index, size_gb, ordinal)


@pytest.mark.parametrize(("gpu_index", "size_gb", "ordinal"), [(-1, 10, 0), (0, 0, 0), (0, 10, -1)])
def test_slice_device_id_rejects_out_of_range(gpu_index: int, size_gb: int, ordinal: int) -> None:
    with pytest.raises(ValueError, match="need gpu_index"):
        slice_device_id(gpu_index, size_gb, ordinal)


def test_slice_device_id_rejects_ids_over_63_characters() -> None:
    with pytest.raises(ValueError, match="longer than 63"):
        slice_device_id(10**60, 10, 0)


@pytest.mark.parametrize(
    "device_id",
    [
        "",
        "mps-g1-10gb",
        "mps-g01-10gb-3",
        "mps-g1-010gb-3",
        "mps-g1-0gb-3",
        "mps-g1-10gb-03",
        "mps-g1-10GB-3",
        "mps-g-1-10gb-3",
        "mps-g1-10gb-3\n",
        " mps-g1-10gb-3",
        "GPU-0a1b2c3d",
        "mps-g\u0661-10gb-3",  # Arabic-Indic digit one
    ],
)
def test_parse_slice_device_id_rejects_malformed(device_id: str) -> None:
    with pytest.raises(ValueError, match="not an mpsflow slice device ID"):
        parse_slice_device_id(device_id)


@given(
    gpu_index=st.integers(min_value=0, max_value=10**6),
    size_gb=st.integers(min_value=1, max_value=10**6),
    ordinal=st.integers(min_value=0, max_value=10**6),
)
def test_device_id_round_trip(gpu_index: int, size_gb: int, ordinal: int) -> None:
    device_id = slice_device_id(gpu_index, size_gb, ordinal)
    assert len(device_id) <= MAX_DEVICE_ID_LENGTH
    assert parse_slice_device_id(device_id) == (gpu_index, size_gb, ordinal)


@given(st.text(max_size=30))
def test_parse_slice_device_id_accepts_only_canonical_ids(text: str) -> None:
    try:
        parsed = parse_slice_device_id(text)
    except ValueError:
        return
    assert slice_device_id(*parsed) == text


@pytest.mark.parametrize(
    ("name", "size_gb"),
    [
        ("nvidia.com/gpu-10gb", 10),
        ("nvidia.com/gpu-1gb", 1),
        ("nvidia.com/gpu-80gb", 80),
        ("nvidia.com/gpu", None),
        ("nvidia.com/gpu-0gb", None),
        ("nvidia.com/gpu-010gb", None),
        ("nvidia.com/gpu-10GB", None),
        ("nvidia.com/gpu-10gb\n", None),
        ("xnvidia.com/gpu-10gb", None),
        ("nvidia.com/gpu-10gbx", None),
        ("nvidiaxcom/gpu-10gb", None),
        ("nvidia.com/mig-1g.10gb", None),
    ],
)
def test_parse_resource_name(name: str, size_gb: int | None) -> None:
    assert slice_size(name) == size_gb


@given(st.integers(min_value=1, max_value=10**9))
def test_resource_name_round_trip(size_gb: int) -> None:
    assert slice_size(slice_resource(size_gb)) == size_gb


def test_resource_name_rejects_sizes_below_one() -> None:
    with pytest.raises(ValueError, match="at least 1 GiB"):
        slice_resource(0)


def test_slice_device_resource_and_ordinal() -> None:
    device = _slice(1, 10, 3, GPU1_UUID)
    assert device.resource == "nvidia.com/gpu-10gb"
    assert device.ordinal == 3


@pytest.mark.parametrize(
    ("device_id", "gpu_index", "size_gb", "memory_mib", "message"),
    [
        ("mps-g1-10gb-0", 0, 10, H100_MIB, "names GPU 1 and 10 GiB"),
        ("mps-g0-20gb-0", 0, 10, H100_MIB, "names GPU 0 and 20 GiB"),
        ("slice-a", 0, 10, H100_MIB, "not an mpsflow slice device ID"),
        ("mps-g0-10gb-0", 0, 10, 0, "gpu_memory_mib must be positive"),
    ],
)
def test_slice_device_rejects_inconsistent_fields(
    device_id: str, gpu_index: int, size_gb: int, memory_mib: int, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        SliceDevice(
            id=device_id, gpu_index=gpu_index, gpu_uuid=GPU0_UUID, size_gb=size_gb, gpu_memory_mib=memory_mib
        )


@pytest.mark.parametrize(("gpu_index", "gpu_uuid"), [(0, GPU0_UUID), (1, GPU1_UUID)])
def test_container_allocation_limits_device_zero_of_the_slice_gpu(gpu_index: int, gpu_uuid: str) -> None:
    allocation = container_allocation(
        _slice(gpu_index, 10, 2, gpu_uuid),
        slices_on_gpu=8,
        pipe_root=Path("/run/mpsflow/mps"),
        thread_policy="proportional",
    )
    assert allocation.cdi_devices == [f"nvidia.com/gpu={gpu_uuid}"]  # cdi-cri, the default
    assert allocation.annotations == {}
    assert allocation.envs == {
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=10240M",
        "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "12",
        "CUDA_MPS_PIPE_DIRECTORY": "/run/mpsflow/mps",
        "MPSFLOW_SLICE": f"mps-g{gpu_index}-10gb-2",
    }
    assert allocation.mounts == [
        MountSpec(
            container_path="/run/mpsflow/mps", host_path=f"/run/mpsflow/mps/{gpu_uuid}/pipe", read_only=False
        )
    ]


@pytest.mark.parametrize(
    ("strategy", "envs", "annotations", "cdi_devices"),
    [
        ("envvar", {"NVIDIA_VISIBLE_DEVICES": GPU0_UUID}, {}, []),
        ("cdi-annotations", {}, {"cdi.k8s.io/mpsflow_mps-g0-10gb-2": f"example.com/gpu={GPU0_UUID}"}, []),
        ("cdi-cri", {}, {}, [f"example.com/gpu={GPU0_UUID}"]),
    ],
)
def test_device_list_strategies(
    strategy: DeviceListStrategy, envs: dict[str, str], annotations: dict[str, str], cdi_devices: list[str]
) -> None:
    allocation = container_allocation(
        _slice(0, 10, 2, GPU0_UUID),
        slices_on_gpu=1,
        pipe_root=Path("/run/mpsflow/mps"),
        thread_policy="off",
        strategy=strategy,
        cdi_kind="example.com/gpu",
    )
    assert allocation.envs == {
        **envs,
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": "0=10240M",
        "CUDA_MPS_PIPE_DIRECTORY": "/run/mpsflow/mps",
        "MPSFLOW_SLICE": "mps-g0-10gb-2",  # the agent tells its processes' slice by it
    }
    assert (allocation.annotations, allocation.cdi_devices) == (annotations, cdi_devices)


@pytest.mark.parametrize(
    ("policy", "size_gb", "memory_mib", "slices_on_gpu", "expected"),
    [
        ("proportional", 10, H100_MIB, 8, "12"),  # floor(100 * 10240 / 81559) = 12
        ("proportional", 40, 40960, 1, "100"),
        ("proportional", 80, H100_MIB, 1, "100"),  # 80 GiB is a little more than an H100 reports
        ("proportional", 1, 196608, 1, "1"),  # floor gives 0, raised to 1
        ("equal", 10, H100_MIB, 3, "33"),
        ("equal", 10, H100_MIB, 1, "100"),
        ("equal", 1, H100_MIB, 150, "1"),
        ("off", 10, H100_MIB, 8, None),
    ],
)
def test_thread_policies(
    policy: ThreadPolicy, size_gb: int, memory_mib: int, slices_on_gpu: int, expected: str | None
) -> None:
    allocation = container_allocation(
        _slice(0, size_gb, 0, GPU0_UUID, memory_mib),
        slices_on_gpu=slices_on_gpu,
        pipe_root=Path("/pipes"),
        thread_policy=policy,
    )
    assert allocation.envs.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE") == expected


def test_container_allocation_needs_at_least_one_slice_on_the_gpu() -> None:
    with pytest.raises(ValueError, match="slices_on_gpu"):
        container_allocation(
            _slice(0, 10, 0, GPU0_UUID), slices_on_gpu=0, pipe_root=Path("/p"), thread_policy="equal"
        )


# The IPC mode adds the GPU's shm directory as /dev/shm in `shm-directory` mode and nothing in `host`
# mode, whatever the GPU, the MPS root and the way the container gets its GPU.
IPC_MOUNTS: list[tuple[MpsIpcMode, str, str, list[tuple[str, str]]]] = [
    ("host", GPU0_UUID, "/run/mpsflow/mps", [("/run/mpsflow/mps", f"/run/mpsflow/mps/{GPU0_UUID}/pipe")]),
    (
        "shm-directory",
        GPU0_UUID,
        "/run/mpsflow/mps",
        [
            ("/run/mpsflow/mps", f"/run/mpsflow/mps/{GPU0_UUID}/pipe"),
            ("/dev/shm", f"/run/mpsflow/mps/{GPU0_UUID}/shm"),
        ],
    ),
    ("host", GPU1_UUID, "/var/mps", [("/run/mpsflow/mps", f"/var/mps/{GPU1_UUID}/pipe")]),
    (
        "shm-directory",
        GPU1_UUID,
        "/var/mps",
        [("/run/mpsflow/mps", f"/var/mps/{GPU1_UUID}/pipe"), ("/dev/shm", f"/var/mps/{GPU1_UUID}/shm")],
    ),
]


@pytest.mark.parametrize("strategy", ["envvar", "cdi-annotations", "cdi-cri"])
@pytest.mark.parametrize(
    ("ipc", "gpu_uuid", "root", "mounts"),
    IPC_MOUNTS,
    ids=[f"{ipc}-{uuid[:12]}-{root}" for ipc, uuid, root, _ in IPC_MOUNTS],
)
def test_the_ipc_mode_decides_the_dev_shm_mount(
    ipc: MpsIpcMode, gpu_uuid: str, root: str, mounts: list[tuple[str, str]], strategy: DeviceListStrategy
) -> None:
    device = _slice(1, 10, 0, gpu_uuid)
    allocation = container_allocation(
        device, slices_on_gpu=2, pipe_root=Path(root), thread_policy="equal", strategy=strategy, ipc=ipc
    )
    host_ipc = container_allocation(
        device, slices_on_gpu=2, pipe_root=Path(root), thread_policy="equal", strategy=strategy
    )

    assert [(m.container_path, m.host_path) for m in allocation.mounts] == mounts
    assert all(not mount.read_only for mount in allocation.mounts)  # clients write in both
    # Everything but the mounts is the same in both modes.
    assert (allocation.envs, allocation.annotations, allocation.cdi_devices) == (
        host_ipc.envs,
        host_ipc.annotations,
        host_ipc.cdi_devices,
    )


def test_the_shm_directory_sits_beside_the_pipe_directory_of_the_same_gpu() -> None:
    root = Path("/run/mpsflow/mps")

    assert mps_shm_directory(root, GPU0_UUID) == root / GPU0_UUID / "shm"
    assert mps_shm_directory(root, GPU0_UUID).parent == mps_pipe_directory(root, GPU0_UUID).parent
    assert mps_shm_directory(root, GPU0_UUID) != mps_shm_directory(root, GPU1_UUID)
    assert CONTAINER_SHM_DIRECTORY == "/dev/shm"
