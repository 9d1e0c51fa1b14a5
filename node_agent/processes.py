"""Which slice a process on a GPU was given, read from its environment under /proc.

Where it sits: an input port of the node agent, beside the NVML inventory. The device plugin puts
the slice's device ID in every slice container's environment (`SLICE_ENV`); a process that CUDA
started in that container inherits it, and `/proc/<pid>/environ` shows the environment it was
started with. NVML lists processes by host PID, so the agent runs in the host's PID namespace
(`hostPID: true`) and reads `/proc` of the host. `ProcEnvironment` is the adapter; tests point it at
a directory laid out like `/proc`.

It only reads, never signals or changes a process, and never decides anything. A process that is
gone, that the agent may not read, or that carries no slice gives None: it is simply not counted.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import anyio.to_thread

from node_agent.slices import SLICE_ENV


class ProcessSlices(Protocol):
    """The node agent's view of which slice each GPU process belongs to."""

    async def slices_of(self, pids: Iterable[int]) -> dict[int, str]:
        """Host PID -> the device ID of the slice its container was given, for those that have one."""
        ...


class ProcEnvironment:
    """`ProcessSlices` over `<proc_root>/<pid>/environ` (NUL-separated `NAME=value` pairs)."""

    def __init__(self, proc_root: Path = Path("/proc")) -> None:
        self._root = proc_root
        self._prefix = f"{SLICE_ENV}=".encode()

    async def slices_of(self, pids: Iterable[int]) -> dict[int, str]:
        wanted = sorted(set(pids))
        return await anyio.to_thread.run_sync(self._read_all, wanted)

    def _read_all(self, pids: list[int]) -> dict[int, str]:
        found = {}
        for pid in pids:
            slice_id = self._slice_of(pid)
            if slice_id is not None:
                found[pid] = slice_id
        return found

    def _slice_of(self, pid: int) -> str | None:
        try:
            environment = (self._root / str(pid) / "environ").read_bytes()
        except OSError:  # gone since NVML listed it, or not ours to read
            return None
        for entry in environment.split(b"\0"):
            if entry.startswith(self._prefix):
                return entry[len(self._prefix) :].decode(errors="replace") or None
        return None
