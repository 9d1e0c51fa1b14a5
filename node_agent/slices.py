"""MPS slices as the kubelet sees them: device IDs, resource names and container settings.

Sits between the node agent's GPU partitioning (which decides how many slices of which size
live on each GPU) and the device plugin (which lists the slices to the kubelet and answers
Allocate with what :func:`container_allocation` computes). Pure functions and values only:
this module must never do I/O, talk to NVML or MPS, or keep state. It also names where each GPU's
MPS files live on the host (:func:`mps_pipe_directory`, :func:`mps_shm_directory`), so that the
Allocate answers and whoever starts the daemons (``node_agent.shm``) cannot disagree.

A slice is an extended resource ``nvidia.com/gpu-<N>gb``; one unit gives a container one MPS
client slot on one GPU with a pinned device-memory limit of N GiB. The device ID encodes GPU
index, slice size and an ordinal (``mps-g1-10gb-3``) so it stays stable across
reconfigurations that keep the slice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from events.vocabulary import DEFAULT_MPS_IPC, MIB_PER_GIB, MpsIpcMode, slice_resource

MAX_DEVICE_ID_LENGTH = 63
CONTAINER_PIPE_DIRECTORY = "/run/mpsflow/mps"
"""Where a slice container finds its GPU's MPS pipe. Not CUDA's default `/tmp/nvidia-mps`: the NVIDIA
container toolkit bind-mounts the host's `/tmp/nvidia-mps` there in every compute container (legacy
and CDI modes alike), over the mount the plugin asks for, and the client would see no daemon."""
SLICE_ENV = "MPSFLOW_SLICE"
"""Every slice container's environment names its slice's device ID here, so that the agent can tell
which slice a process on the GPU belongs to (`node_agent.processes`)."""
CONTAINER_SHM_DIRECTORY = "/dev/shm"
"""Where MPS clients and their server exchange small files (`cuda.shm.*`); libcuda has no setting
to move it. In the `shm-directory` IPC mode a slice container gets its GPU's shm directory here."""

_DEVICE_ID = re.compile(r"mps-g(0|[1-9][0-9]*)-([1-9][0-9]*)gb-(0|[1-9][0-9]*)")

ThreadPolicy = Literal["proportional", "equal", "off"]
DeviceListStrategy = Literal["envvar", "cdi-annotations", "cdi-cri"]
"""How a slice container is given its GPU, as NVIDIA's device plugin names the ways: `envvar` sets
`NVIDIA_VISIBLE_DEVICES` for the nvidia runtime in legacy mode; `cdi-annotations` puts a CDI device
in the container's annotations for a CDI-aware nvidia runtime; `cdi-cri` names it in the Allocate
answer's `cdi_devices`, which the kubelet passes to a CDI-enabled containerd or CRI-O (the GPU
Operator's default from v25.10). The CDI device is `<cdi_kind>=<GPU uuid>`: the node's CDI spec must
name GPUs by UUID."""
DEFAULT_CDI_KIND = "nvidia.com/gpu"
CDI_ANNOTATION_PREFIX = "cdi.k8s.io/"


def slice_device_id(gpu_index: int, size_gb: int, ordinal: int) -> str:
    """The stable device ID of slice ``ordinal`` of size ``size_gb`` on GPU ``gpu_index``."""
    if gpu_index < 0 or size_gb < 1 or ordinal < 0:
        raise ValueError(
            f"need gpu_index >= 0, size_gb >= 1, ordinal >= 0; got {gpu_index}, {size_gb}, {ordinal}"
        )
    device_id = f"mps-g{gpu_index}-{size_gb}gb-{ordinal}"
    if len(device_id) > MAX_DEVICE_ID_LENGTH:
        raise ValueError(f"device ID {device_id!r} is longer than {MAX_DEVICE_ID_LENGTH} characters")
    return device_id


def parse_slice_device_id(device_id: str) -> tuple[int, int, int]:
    """``(gpu_index, size_gb, ordinal)`` of a device ID; ValueError if it is not one of ours."""
    match = _DEVICE_ID.fullmatch(device_id)
    if match is None or len(device_id) > MAX_DEVICE_ID_LENGTH:
        raise ValueError(f"not an mpsflow slice device ID: {device_id!r}")
    gpu_index, size_gb, ordinal = (int(group) for group in match.groups())
    return gpu_index, size_gb, ordinal


@dataclass(frozen=True)
class SliceDevice:
    """One MPS slice offered to the kubelet."""

    id: str
    gpu_index: int
    gpu_uuid: str
    size_gb: int
    gpu_memory_mib: int
    healthy: bool = True

    def __post_init__(self) -> None:
        gpu_index, size_gb, _ = parse_slice_device_id(self.id)
        if (gpu_index, size_gb) != (self.gpu_index, self.size_gb):
            raise ValueError(
                f"device ID {self.id!r} names GPU {gpu_index} and {size_gb} GiB, "
                f"but the slice is on GPU {self.gpu_index} with {self.size_gb} GiB"
            )
        if self.gpu_memory_mib < 1:
            raise ValueError(f"gpu_memory_mib must be positive, got {self.gpu_memory_mib}")

    @property
    def resource(self) -> str:
        return slice_resource(self.size_gb)

    @property
    def ordinal(self) -> int:
        return parse_slice_device_id(self.id)[2]


@dataclass(frozen=True)
class MountSpec:
    container_path: str
    host_path: str
    read_only: bool


@dataclass(frozen=True)
class ContainerAllocation:
    """What the kubelet must add to a container that gets a slice."""

    envs: dict[str, str]
    mounts: list[MountSpec]
    annotations: dict[str, str]
    cdi_devices: list[str]


def mps_pipe_directory(pipe_root: Path, gpu_uuid: str) -> Path:
    """Host directory of the MPS control pipe for one GPU."""
    return pipe_root / gpu_uuid / "pipe"


def mps_shm_directory(pipe_root: Path, gpu_uuid: str) -> Path:
    """Host directory that is one GPU's `/dev/shm` in the `shm-directory` IPC mode: a tmpfs of its
    own, beside the GPU's pipe directory, shared by its daemon, its servers and its slice containers."""
    return mps_pipe_directory(pipe_root, gpu_uuid).with_name("shm")


def container_allocation(
    device: SliceDevice,
    *,
    slices_on_gpu: int,
    pipe_root: Path,
    thread_policy: ThreadPolicy,
    strategy: DeviceListStrategy = "cdi-cri",
    cdi_kind: str = DEFAULT_CDI_KIND,
    ipc: MpsIpcMode = DEFAULT_MPS_IPC,
) -> ContainerAllocation:
    """Environment and mounts that make a container an MPS client limited to ``device``.

    The container sees only the slice's GPU, so the memory limit is always for device index 0,
    whatever the GPU's index on the host. ``slices_on_gpu`` counts every slice on that GPU and
    matters only for the ``equal`` thread policy. With ``ipc="shm-directory"`` the container's
    ``/dev/shm`` is its GPU's shm directory, the one its MPS server has; with ``host`` it gets no
    ``/dev/shm`` mount and shares the server's through ``hostIPC: true``.
    """
    if slices_on_gpu < 1:
        raise ValueError(f"slices_on_gpu must be at least 1, got {slices_on_gpu}")
    envs = {
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={device.size_gb * MIB_PER_GIB}M",
        "CUDA_MPS_PIPE_DIRECTORY": CONTAINER_PIPE_DIRECTORY,
        SLICE_ENV: device.id,
    }
    gpu = f"{cdi_kind}={device.gpu_uuid}"
    annotations: dict[str, str] = {}
    cdi_devices: list[str] = []
    match strategy:
        case "envvar":
            envs["NVIDIA_VISIBLE_DEVICES"] = device.gpu_uuid
        case "cdi-annotations":  # one key per device: a container's annotations must not collide
            annotations[f"{CDI_ANNOTATION_PREFIX}mpsflow_{device.id}"] = gpu
        case "cdi-cri":
            cdi_devices.append(gpu)
    thread_percentage = _active_thread_percentage(device, slices_on_gpu, thread_policy)
    if thread_percentage is not None:
        envs["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(thread_percentage)
    # Writable: MPS clients connect to the control daemon's sockets and pipes in this directory.
    mounts = [
        MountSpec(
            container_path=CONTAINER_PIPE_DIRECTORY,
            host_path=str(mps_pipe_directory(pipe_root, device.gpu_uuid)),
            read_only=False,
        )
    ]
    if ipc == "shm-directory":
        # Writable: every client creates its own files there, which its server opens.
        mounts.append(
            MountSpec(
                container_path=CONTAINER_SHM_DIRECTORY,
                host_path=str(mps_shm_directory(pipe_root, device.gpu_uuid)),
                read_only=False,
            )
        )
    return ContainerAllocation(envs=envs, mounts=mounts, annotations=annotations, cdi_devices=cdi_devices)


def _active_thread_percentage(device: SliceDevice, slices_on_gpu: int, policy: ThreadPolicy) -> int | None:
    match policy:
        case "proportional":
            share = (100 * device.size_gb * MIB_PER_GIB) // device.gpu_memory_mib
            # A slice as large as the GPU's nominal size can exceed the reported MiB slightly.
            return min(100, max(1, share))
        case "equal":
            return max(1, 100 // slices_on_gpu)
        case "off":
            return None
