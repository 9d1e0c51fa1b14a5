"""GPU inventory port: what the node's GPUs are and what runs on them, read through NVML.

Where it sits: the node agent's input side. The agent calls ``GpuInventory.read`` to build the
``NodeGpusReported`` event, ``xid_errors`` to learn of GPUs that fail, and ``set_exclusive_process``
before it starts a GPU's MPS daemon (NVIDIA recommends EXCLUSIVE_PROCESS compute mode under MPS).
``NvmlInventory`` is the real adapter over nvidia-ml-py (module ``pynvml``); tests give it
``simulation.fake_nvml.FakeNvml`` instead, which exposes the same functions, constants and exception
classes.

NVML calls block in C, so every call runs in a worker thread, never on the event loop. This module
must never change anything on a GPU except its compute mode, and never decide anything: it reports.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

import anyio.to_thread
import pynvml

from node_agent.gpus import GpuProcess, GpuReading, XidError

log = logging.getLogger(__name__)

_BYTES_PER_MIB = 1024 * 1024


class GpuInventory(Protocol):
    """The node agent's view of the node's GPUs."""

    async def read(self) -> list[GpuReading]:
        """Every GPU of the node, in NVML index order.

        Raises:
            NvmlUnavailable: there is no NVIDIA driver library on this node.
        """
        ...

    async def set_exclusive_process(self, index: int) -> None:
        """Put GPU ``index`` in EXCLUSIVE_PROCESS compute mode (needs root on a real node)."""
        ...

    async def xid_errors(self, wait_s: float) -> list[XidError]:
        """The critical Xid errors reported within `wait_s` seconds (none: an empty list). Every
        GPU that can report them is watched from the first call on; one too old to is not."""
        ...


class NvmlUnavailable(Exception):  # noqa: N818 - names a state of the node, like NVML's own error names
    """NVML cannot be used on this node: the driver library is missing."""


class NvmlMemoryInfo(Protocol):
    """What ``nvmlDeviceGetMemoryInfo`` returns; sizes in bytes."""

    @property
    def total(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def free(self) -> int: ...


class NvmlProcessInfo(Protocol):
    """One entry of ``nvmlDeviceGet*ComputeRunningProcesses``; memory in bytes, None when unavailable."""

    @property
    def pid(self) -> int: ...
    @property
    def usedGpuMemory(self) -> int | None: ...  # noqa: N802 - pynvml's name


class NvmlEventData(Protocol):
    """What ``nvmlEventSetWait_v2`` returns."""

    @property
    def device(self) -> object: ...
    @property
    def eventType(self) -> int: ...  # noqa: N802 - pynvml's name
    @property
    def eventData(self) -> int: ...  # noqa: N802 - pynvml's name


class NvmlLibrary(Protocol):
    """The part of the ``pynvml`` module that ``NvmlInventory`` uses; the names are pynvml's."""

    @property
    def NVMLError_NotSupported(self) -> type[Exception]: ...  # noqa: N802
    @property
    def NVMLError_LibraryNotFound(self) -> type[Exception]: ...  # noqa: N802
    @property
    def NVMLError_FunctionNotFound(self) -> type[Exception]: ...  # noqa: N802
    @property
    def NVML_COMPUTEMODE_EXCLUSIVE_PROCESS(self) -> int: ...  # noqa: N802
    @property
    def NVML_DEVICE_MIG_ENABLE(self) -> int: ...  # noqa: N802
    @property
    def NVMLError_Timeout(self) -> type[Exception]: ...  # noqa: N802
    @property
    def nvmlEventTypeXidCriticalError(self) -> int: ...  # noqa: N802

    def nvmlInit(self) -> None: ...  # noqa: N802
    def nvmlDeviceGetCount(self) -> int: ...  # noqa: N802
    def nvmlDeviceGetHandleByIndex(self, index: int) -> object: ...  # noqa: N802
    def nvmlDeviceGetName(self, handle: object) -> str: ...  # noqa: N802
    def nvmlDeviceGetUUID(self, handle: object) -> str: ...  # noqa: N802
    def nvmlDeviceGetMemoryInfo(self, handle: object) -> NvmlMemoryInfo: ...  # noqa: N802
    def nvmlDeviceGetCudaComputeCapability(self, handle: object) -> tuple[int, int]: ...  # noqa: N802
    def nvmlDeviceGetMigMode(self, handle: object) -> Sequence[int]: ...  # noqa: N802
    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> Sequence[NvmlProcessInfo]: ...  # noqa: N802
    def nvmlDeviceGetMPSComputeRunningProcesses(self, handle: object) -> Sequence[NvmlProcessInfo]: ...  # noqa: N802
    def nvmlDeviceSetComputeMode(self, handle: object, mode: int) -> None: ...  # noqa: N802
    def nvmlEventSetCreate(self) -> object: ...  # noqa: N802
    def nvmlDeviceGetSupportedEventTypes(self, handle: object) -> int: ...  # noqa: N802
    def nvmlDeviceRegisterEvents(self, handle: object, event_types: int, event_set: object) -> None: ...  # noqa: N802
    def nvmlEventSetWait_v2(self, event_set: object, timeout_ms: int) -> NvmlEventData: ...  # noqa: N802


class NvmlInventory:
    """``GpuInventory`` over NVML. ``nvmlInit`` runs once, on first use."""

    def __init__(self, nvml: NvmlLibrary | None = None) -> None:
        self._nvml: NvmlLibrary = pynvml if nvml is None else nvml
        self._initialized = False
        self._init_lock = threading.Lock()
        self._events_lock = threading.Lock()
        self._event_set: object | None = None  # None: not set up yet
        self._watched = 0

    async def read(self) -> list[GpuReading]:
        return await anyio.to_thread.run_sync(self._read_all)

    async def set_exclusive_process(self, index: int) -> None:
        await anyio.to_thread.run_sync(self._set_exclusive_process, index)

    async def xid_errors(self, wait_s: float) -> list[XidError]:
        # The wait blocks in C for up to `wait_s`: a cancelled caller leaves it to finish alone.
        return await anyio.to_thread.run_sync(self._wait_for_xids, wait_s, abandon_on_cancel=True)

    def _ensure_initialized(self) -> None:
        with self._init_lock:
            if self._initialized:
                return
            try:
                self._nvml.nvmlInit()
            except self._nvml.NVMLError_LibraryNotFound as error:
                raise NvmlUnavailable(
                    "NVML library libnvidia-ml.so.1 not found: is the NVIDIA driver installed on this node "
                    "and its library visible to the node agent?"
                ) from error
            self._initialized = True

    def _read_all(self) -> list[GpuReading]:
        self._ensure_initialized()
        return [self._read_device(index) for index in range(self._nvml.nvmlDeviceGetCount())]

    def _read_device(self, index: int) -> GpuReading:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(handle)
        return GpuReading(
            index=index,
            uuid=nvml.nvmlDeviceGetUUID(handle),
            model=nvml.nvmlDeviceGetName(handle).replace(" ", "-"),
            memory_total_mib=memory.total // _BYTES_PER_MIB,
            memory_used_mib=memory.used // _BYTES_PER_MIB,
            compute_capability=(major, minor),
            mig_enabled=self._mig_enabled(handle),
            processes=self._processes(handle),
        )

    def _mig_enabled(self, handle: object) -> bool:
        try:
            current_mode, pending_mode = self._nvml.nvmlDeviceGetMigMode(handle)
        except (self._nvml.NVMLError_NotSupported, self._nvml.NVMLError_FunctionNotFound):
            return False  # a GPU without MIG, or a driver too old to know of it
        # MIG pending (enabled at the next GPU reset) counts too: slices carved now would vanish then.
        return self._nvml.NVML_DEVICE_MIG_ENABLE in (current_mode, pending_mode)

    def _processes(self, handle: object) -> tuple[GpuProcess, ...]:
        listed = list(self._nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        # A driver older than the MPS process list: its clients show among the compute processes.
        with contextlib.suppress(self._nvml.NVMLError_FunctionNotFound):
            listed.extend(self._nvml.nvmlDeviceGetMPSComputeRunningProcesses(handle))
        return tuple(
            GpuProcess(
                pid=process.pid,
                used_memory_mib=None
                if process.usedGpuMemory is None
                else process.usedGpuMemory // _BYTES_PER_MIB,
            )
            for process in listed
        )

    def _wait_for_xids(self, wait_s: float) -> list[XidError]:
        with self._events_lock:
            self._ensure_initialized()
            if self._event_set is None:
                self._event_set = self._watch_xids()
            if not self._watched:
                time.sleep(wait_s)
                return []
            nvml = self._nvml
            try:
                event = nvml.nvmlEventSetWait_v2(self._event_set, max(1, int(wait_s * 1000)))
            except nvml.NVMLError_Timeout:
                return []
            if event.eventType != nvml.nvmlEventTypeXidCriticalError:
                return []
            return [XidError(gpu_uuid=nvml.nvmlDeviceGetUUID(event.device), xid=int(event.eventData))]

    def _watch_xids(self) -> object:
        """An event set with every GPU that can report critical Xid errors registered in it."""
        nvml = self._nvml
        event_set = nvml.nvmlEventSetCreate()
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            try:
                supported = nvml.nvmlDeviceGetSupportedEventTypes(handle)
                if supported & nvml.nvmlEventTypeXidCriticalError:
                    nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, event_set)
                    self._watched += 1
                    continue
            except nvml.NVMLError_NotSupported:
                pass
            log.warning("GPU %d cannot report Xid errors: its health comes from its MPS daemon alone", index)
        return event_set

    def _set_exclusive_process(self, index: int) -> None:
        self._ensure_initialized()
        handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        self._nvml.nvmlDeviceSetComputeMode(handle, self._nvml.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS)
