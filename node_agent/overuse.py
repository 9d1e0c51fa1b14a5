"""Which slices' containers use more GPU memory than the slice holds.

Where it sits: the node agent's functional core. The shell reads the GPUs' processes (NVML, host
PIDs, memory each) and, through the `ProcessSlices` port, which slice each process was given (the
device plugin puts the slice's device ID in every slice container's environment); `overused`
sums the memory of each slice's processes and names the slices over their size. Nothing here reads
a process, a GPU or the clock, and nothing decides what to do about it: the agent publishes
`SliceOverused` and the pod watcher tells the pod.

Why it is needed: the pinned memory limit is per process and comes from the container's own
environment (docs/mps.md §7). A container that raises or unsets it, or that runs several processes
(each capped alone), can take memory its neighbours' slices count on, and MPS does not stop it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from events.vocabulary import MIB_PER_GIB
from node_agent.gpus import GpuReading
from node_agent.slices import SliceDevice


@dataclass(frozen=True)
class Overuse:
    """The processes of `device`'s container use `used_mib` MiB together, more than it holds."""

    device: SliceDevice
    used_mib: int
    pids: tuple[int, ...]

    @property
    def limit_mib(self) -> int:
        return self.device.size_gb * MIB_PER_GIB


def overused(
    gpus: Sequence[GpuReading], devices: Sequence[SliceDevice], slice_of: Mapping[int, str]
) -> list[Overuse]:
    """The slices whose processes (by `slice_of`: host PID -> slice device ID) use more memory on the
    slice's GPU than the slice holds, in device order. A process whose memory NVML cannot tell, or
    on another GPU than its slice, or naming a slice the node does not offer, counts for none."""
    by_id = {device.id: device for device in devices}
    used: dict[str, int] = defaultdict(int)
    pids: dict[str, list[int]] = defaultdict(list)
    for gpu in gpus:
        for process in gpu.processes:
            device = by_id.get(slice_of.get(process.pid, ""))
            if device is None or device.gpu_index != gpu.index or process.used_memory_mib is None:
                continue
            used[device.id] += process.used_memory_mib
            pids[device.id].append(process.pid)
    return [
        Overuse(device, used[device.id], tuple(sorted(pids[device.id])))
        for device in devices
        if used[device.id] > device.size_gb * MIB_PER_GIB
    ]
