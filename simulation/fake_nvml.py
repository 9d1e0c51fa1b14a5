"""Simulated GPUs behind the pynvml functions the node agent calls.

Where it sits: in place of the ``pynvml`` module, handed to ``node_agent.nvml.NvmlInventory`` in tests
and in the simulated cluster. ``FakeNvml`` exposes exactly the functions, constants and exception
classes ``NvmlInventory`` uses (plus ``nvmlDeviceGetComputeMode`` so the compute mode can be read back),
with pynvml's names and return shapes. The GPUs come from a list of ``SimulatedGpu`` or a JSON file::

    {"gpus": [{"model": "NVIDIA A100-SXM4-40GB", "memory_mib": 40960,
               "compute_capability": [8, 0], "mig_enabled": false, "uuid": "GPU-..."}]}

where only ``model`` and ``memory_mib`` are required; a missing UUID is derived from the node name and
the index, so the same node always gets the same UUIDs. Processes are added and removed with
``start_process`` / ``stop_process``.

How it differs from the real library (documented, deliberate):

* No driver, no C library: ``library_present=False`` makes ``nvmlInit`` raise
  ``NVMLError_LibraryNotFound``, as pynvml does on a machine without the driver. ``nvmlInit`` is not
  reference-counted and there is no ``nvmlShutdown``.
* Handles are ``FakeDeviceHandle`` values rather than C pointers; a handle from elsewhere raises
  ``NVMLError_InvalidArgument``.
* Used memory is exactly the sum of the simulated processes' memory (unknown counts as 0); the real
  figure also includes driver-reserved memory and contexts.
* A GPU is MIG-capable when its compute capability is 8.0, 9.0 or 10.0 (A100/A30, H100/H200,
  B200); ``nvmlDeviceGetMigMode`` raises ``NVMLError_NotSupported`` on the others, as on real
  non-MIG GPUs. With MIG enabled, MIG devices themselves are not simulated.
* Setting a compute mode needs no privileges (real NVML needs root).
* ``NVMLError(value)`` does not map the value to a subclass; the fake raises the subclass directly.
* An older driver is ``missing_functions``: those functions raise ``NVMLError_FunctionNotFound``
  (only ``nvmlDeviceGetMigMode`` and ``nvmlDeviceGetMPSComputeRunningProcesses`` can be missing).
* Events: only critical Xid errors, raised with ``raise_xid``; every GPU supports them unless built
  with ``xid_events=False``. An event set keeps the events of the GPUs registered in it from the
  moment they are registered, as the real one does, and ``nvmlEventSetWait_v2`` hands them out one
  per call. There is no ``nvmlEventSetFree``.

This module must never load the real NVML library or touch a real GPU.
"""

# The names below are pynvml's and must stay as they are.
# ruff: noqa: N801, N802, N815, N818

from __future__ import annotations

import threading
import uuid as uuid_module
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13

_ERROR_STRINGS = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
}
_BYTES_PER_MIB = 1024 * 1024
_MIG_CAPABLE_COMPUTE_CAPABILITIES = frozenset({(8, 0), (9, 0), (10, 0)})
_SIMULATED_GPU_NAMESPACE = uuid_module.uuid5(
    uuid_module.NAMESPACE_URL, "https://mpsflow.invalid/simulated-gpu"
)


class NVMLError(Exception):
    """Like pynvml's: ``value`` is the NVML return code."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return _ERROR_STRINGS.get(self.value, f"NVML error {self.value}")


class NVMLError_Uninitialized(NVMLError):
    pass


class NVMLError_InvalidArgument(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_Timeout(NVMLError):
    pass


class NVMLError_FunctionNotFound(NVMLError):
    pass


@dataclass(frozen=True)
class SimulatedGpu:
    """One simulated GPU. ``model`` is the name NVML reports, e.g. ``"NVIDIA A100-SXM4-40GB"``."""

    model: str
    memory_mib: int
    uuid: str | None = None
    compute_capability: tuple[int, int] = (8, 0)
    mig_enabled: bool = False
    mig_pending: bool | None = None
    """The MIG mode that takes effect at the GPU's next reset; None: the same as now."""

    def __post_init__(self) -> None:
        if self.memory_mib <= 0:
            raise ValueError(f"{self.model}: memory_mib must be positive, got {self.memory_mib}")
        if (
            self.mig_enabled or self.mig_pending
        ) and self.compute_capability not in _MIG_CAPABLE_COMPUTE_CAPABILITIES:
            raise ValueError(f"{self.model}: compute capability {self.compute_capability} has no MIG")


@dataclass(frozen=True)
class FakeDeviceHandle:
    index: int


@dataclass(frozen=True)
class FakeMemoryInfo:
    """Like pynvml's ``c_nvmlMemory_t``: bytes."""

    total: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeProcessInfo:
    """Like pynvml's process info: ``usedGpuMemory`` in bytes, None when NVML cannot tell."""

    pid: int
    usedGpuMemory: int | None


@dataclass(frozen=True)
class FakeEventData:
    """Like pynvml's ``c_nvmlEventData_t``."""

    device: FakeDeviceHandle
    eventType: int
    eventData: int
    gpuInstanceId: int = 0xFFFFFFFF
    computeInstanceId: int = 0xFFFFFFFF


class FakeEventSet:
    """Events of the GPUs registered in it, waiting to be handed out (thread-safe)."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}  # GPU index -> event types
        self.queued: deque[FakeEventData] = deque()
        self.arrived = threading.Condition()


@dataclass
class _Device:
    gpu: SimulatedGpu
    uuid: str
    compute_mode: int
    compute_processes: dict[int, int | None] = field(default_factory=dict)
    mps_processes: dict[int, int | None] = field(default_factory=dict)

    def used_bytes(self) -> int:
        listed = [*self.compute_processes.values(), *self.mps_processes.values()]
        return sum(mib for mib in listed if mib is not None) * _BYTES_PER_MIB


class _GpuEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    memory_mib: int
    uuid: str | None = None
    compute_capability: tuple[int, int] = (8, 0)
    mig_enabled: bool = False


class _NodeFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    gpus: list[_GpuEntry]


class FakeNvml:
    """The pynvml surface of ``NvmlInventory`` over simulated GPUs; pass it where the module would go."""

    NVMLError = NVMLError
    NVMLError_Uninitialized = NVMLError_Uninitialized
    NVMLError_InvalidArgument = NVMLError_InvalidArgument
    NVMLError_NotSupported = NVMLError_NotSupported
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_FunctionNotFound = NVMLError_FunctionNotFound

    NVML_COMPUTEMODE_DEFAULT = 0
    NVML_COMPUTEMODE_EXCLUSIVE_THREAD = 1
    NVML_COMPUTEMODE_PROHIBITED = 2
    NVML_COMPUTEMODE_EXCLUSIVE_PROCESS = 3
    NVML_DEVICE_MIG_DISABLE = 0
    NVML_DEVICE_MIG_ENABLE = 1
    NVMLError_Timeout = NVMLError_Timeout
    nvmlEventTypeSingleBitEccError = 0x1
    nvmlEventTypeDoubleBitEccError = 0x2
    nvmlEventTypeXidCriticalError = 0x8

    def __init__(
        self,
        gpus: Sequence[SimulatedGpu],
        *,
        node_name: str = "simulated-node",
        library_present: bool = True,
        missing_functions: frozenset[str] = frozenset(),
        xid_events: bool = True,
    ) -> None:
        self._devices = [
            _Device(gpu, gpu.uuid or simulated_gpu_uuid(node_name, index), self.NVML_COMPUTEMODE_DEFAULT)
            for index, gpu in enumerate(gpus)
        ]
        uuids = [device.uuid for device in self._devices]
        if len(set(uuids)) != len(uuids):
            raise ValueError(f"simulated GPU UUIDs must be unique: {uuids}")
        self._library_present = library_present
        self._missing_functions = missing_functions
        self._xid_events = xid_events
        self._event_sets: list[FakeEventSet] = []
        self._initialized = False

    @classmethod
    def from_json(cls, path: Path, *, node_name: str) -> FakeNvml:
        """GPUs from a ``{"gpus": [...]}`` file; see the module docstring for the fields."""
        node = _NodeFile.model_validate_json(path.read_text())
        return cls([SimulatedGpu(**entry.model_dump()) for entry in node.gpus], node_name=node_name)

    # Simulation controls (not part of pynvml).

    def start_process(
        self, index: int, pid: int, used_memory_mib: int | None, *, mps_client: bool = False
    ) -> None:
        """A process opens a CUDA context on GPU ``index``: an MPS client, or a plain compute process."""
        device = self._devices[index]
        processes = device.mps_processes if mps_client else device.compute_processes
        processes[pid] = used_memory_mib
        if device.used_bytes() > device.gpu.memory_mib * _BYTES_PER_MIB:
            del processes[pid]
            raise ValueError(f"GPU {index} has {device.gpu.memory_mib} MiB; process {pid} does not fit")

    def stop_process(self, index: int, pid: int) -> None:
        device = self._devices[index]
        device.compute_processes.pop(pid, None)
        device.mps_processes.pop(pid, None)

    def raise_xid(self, index: int, xid: int) -> None:
        """The driver reports critical Xid error `xid` on GPU `index`."""
        event = FakeEventData(FakeDeviceHandle(index), self.nvmlEventTypeXidCriticalError, xid)
        for event_set in self._event_sets:
            with event_set.arrived:
                if event_set.registered.get(index, 0) & event.eventType:
                    event_set.queued.append(event)
                    event_set.arrived.notify_all()

    def gpus(self) -> list[SimulatedGpu]:
        """The simulated GPUs, with the UUIDs NVML reports for them."""
        return [replace(device.gpu, uuid=device.uuid) for device in self._devices]

    def _provided(self, function: str) -> None:
        """An older driver lacks some functions: pynvml then raises NVMLError_FunctionNotFound."""
        if function in self._missing_functions:
            raise NVMLError_FunctionNotFound(NVML_ERROR_FUNCTION_NOT_FOUND)

    # The pynvml surface.

    def nvmlInit(self) -> None:
        if not self._library_present:
            raise NVMLError_LibraryNotFound(NVML_ERROR_LIBRARY_NOT_FOUND)
        self._initialized = True

    def nvmlDeviceGetCount(self) -> int:
        self._require_initialized()
        return len(self._devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDeviceHandle:
        self._require_initialized()
        if not 0 <= index < len(self._devices):
            raise NVMLError_InvalidArgument(NVML_ERROR_INVALID_ARGUMENT)
        return FakeDeviceHandle(index)

    def nvmlDeviceGetName(self, handle: object) -> str:
        return self._device(handle).gpu.model

    def nvmlDeviceGetUUID(self, handle: object) -> str:
        return self._device(handle).uuid

    def nvmlDeviceGetMemoryInfo(self, handle: object) -> FakeMemoryInfo:
        device = self._device(handle)
        total = device.gpu.memory_mib * _BYTES_PER_MIB
        used = device.used_bytes()
        return FakeMemoryInfo(total=total, free=total - used, used=used)

    def nvmlDeviceGetCudaComputeCapability(self, handle: object) -> tuple[int, int]:
        return self._device(handle).gpu.compute_capability

    def nvmlDeviceGetMigMode(self, handle: object) -> list[int]:
        self._provided("nvmlDeviceGetMigMode")
        device = self._device(handle)
        if device.gpu.compute_capability not in _MIG_CAPABLE_COMPUTE_CAPABILITIES:
            raise NVMLError_NotSupported(NVML_ERROR_NOT_SUPPORTED)

        def mode(enabled: bool) -> int:
            return self.NVML_DEVICE_MIG_ENABLE if enabled else self.NVML_DEVICE_MIG_DISABLE

        pending = device.gpu.mig_enabled if device.gpu.mig_pending is None else device.gpu.mig_pending
        return [mode(device.gpu.mig_enabled), mode(pending)]

    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> list[FakeProcessInfo]:
        return _process_infos(self._device(handle).compute_processes)

    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle: object) -> list[FakeProcessInfo]:
        self._provided("nvmlDeviceGetMPSComputeRunningProcesses")
        return _process_infos(self._device(handle).mps_processes)

    def nvmlDeviceGetComputeMode(self, handle: object) -> int:
        return self._device(handle).compute_mode

    def nvmlDeviceSetComputeMode(self, handle: object, mode: int) -> None:
        device = self._device(handle)
        if mode not in (
            self.NVML_COMPUTEMODE_DEFAULT,
            self.NVML_COMPUTEMODE_EXCLUSIVE_THREAD,
            self.NVML_COMPUTEMODE_PROHIBITED,
            self.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS,
        ):
            raise NVMLError_InvalidArgument(NVML_ERROR_INVALID_ARGUMENT)
        device.compute_mode = mode

    def nvmlEventSetCreate(self) -> FakeEventSet:
        self._require_initialized()
        event_set = FakeEventSet()
        self._event_sets.append(event_set)
        return event_set

    def nvmlDeviceGetSupportedEventTypes(self, handle: object) -> int:
        self._device(handle)
        if not self._xid_events:
            raise NVMLError_NotSupported(NVML_ERROR_NOT_SUPPORTED)
        return (
            self.nvmlEventTypeSingleBitEccError
            | self.nvmlEventTypeDoubleBitEccError
            | self.nvmlEventTypeXidCriticalError
        )

    def nvmlDeviceRegisterEvents(self, handle: object, event_types: int, event_set: object) -> None:
        device_index = self._handle_index(handle)
        if not isinstance(event_set, FakeEventSet) or event_types & ~self.nvmlDeviceGetSupportedEventTypes(
            handle
        ):
            raise NVMLError_InvalidArgument(NVML_ERROR_INVALID_ARGUMENT)
        with event_set.arrived:
            event_set.registered[device_index] = event_set.registered.get(device_index, 0) | event_types

    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> FakeEventData:
        self._require_initialized()
        if not isinstance(event_set, FakeEventSet):
            raise NVMLError_InvalidArgument(NVML_ERROR_INVALID_ARGUMENT)
        with event_set.arrived:
            if not event_set.arrived.wait_for(lambda: bool(event_set.queued), timeout_ms / 1000):
                raise NVMLError_Timeout(NVML_ERROR_TIMEOUT)
            return event_set.queued.popleft()

    def _handle_index(self, handle: object) -> int:
        self._device(handle)
        assert isinstance(handle, FakeDeviceHandle)
        return handle.index

    def _require_initialized(self) -> None:
        if not self._initialized:
            raise NVMLError_Uninitialized(NVML_ERROR_UNINITIALIZED)

    def _device(self, handle: object) -> _Device:
        self._require_initialized()
        if not isinstance(handle, FakeDeviceHandle) or not 0 <= handle.index < len(self._devices):
            raise NVMLError_InvalidArgument(NVML_ERROR_INVALID_ARGUMENT)
        return self._devices[handle.index]


def simulated_gpu_uuid(node_name: str, index: int) -> str:
    """The UUID a simulated GPU gets when none is given: stable per node name and index."""
    return f"GPU-{uuid_module.uuid5(_SIMULATED_GPU_NAMESPACE, f'{node_name}/{index}')}"


def _process_infos(processes: dict[int, int | None]) -> list[FakeProcessInfo]:
    return [
        FakeProcessInfo(pid=pid, usedGpuMemory=None if mib is None else mib * _BYTES_PER_MIB)
        for pid, mib in processes.items()
    ]
