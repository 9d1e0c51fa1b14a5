"""Whether each GPU can serve slices, and what the kubelet is told of each slice's health.

Where it sits: the node agent's functional core, beside `reconcile`. The shell (`agent`) feeds it
what it observes, MPS daemons that answer or not and NVML's critical Xid events, and offers the
kubelet the slices with the health this module gives them. Pure values and functions only: this
module must never read a GPU, talk to an MPS daemon, or decide the slices of a GPU.

The rules, and why:

* A GPU is unhealthy while its MPS control daemon does not answer, or once NVML has reported a
  critical Xid error on it that is not one of the application errors (an Xid a CUDA program can
  cause on a sound GPU, which NVIDIA's device plugin skips too). A daemon that answers again makes
  its GPU healthy again; an Xid fault lasts until the agent restarts (after the GPU was reset, or
  the node rebooted), as in NVIDIA's device plugin.
* On an unhealthy GPU, a slice turns Unhealthy when its container ends, and stays so until the
  GPU is healthy again; no other slice is marked. This changes nothing a scheduler or a kubelet
  counts on: while a slice is held, the node's allocatable counts it and the holder's request
  uses it up, so marking it at the moment the holder goes leaves every other pod the room it had,
  and no pod in flight can have been promised it. Marking a held slice would shrink the room of
  a pod released to the node a moment before, and a free slice may be the one the kubelet gives
  a pod bound to the node right now; a free slice is therefore withdrawn by the planner, with a
  new layout, only where no pod may be given it (the same rule as any other removal:
  docs/architecture.md, "Coordination"), and the kubelet is asked to prefer the slices of healthy
  GPUs (`GetPreferredAllocation`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from node_agent.slices import SliceDevice

APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})
"""Xids a CUDA program can cause on a sound GPU (graphics engine exception, memory page fault, GPU
stopped processing, preemptive cleanup, video processor exception, context switch timeout): they
leave the GPU healthy. The same list NVIDIA's device plugin skips."""

_XID_MEANINGS = {
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping recorded",
    64: "ECC page retirement or row remapping failed",
    74: "NVLink error",
    79: "the GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


@dataclass(frozen=True)
class XidPolicy:
    """Which critical Xids make a GPU unhealthy: all but `ignored`; none when `ignore_all`."""

    ignored: frozenset[int] = APPLICATION_XIDS
    ignore_all: bool = False

    @classmethod
    def parse(cls, setting: str) -> XidPolicy:
        """From a flag's text: `all` ignores every Xid; otherwise a comma-separated list of Xids to
        ignore besides the application ones (empty: only those).

        Raises:
            ValueError: a part is neither `all` nor a non-negative integer, naming it.
        """
        parts = [part.strip() for part in setting.split(",") if part.strip()]
        if "all" in (part.lower() for part in parts):
            return cls(ignore_all=True)
        ignored = set(APPLICATION_XIDS)
        for part in parts:
            if not part.isdigit():
                raise ValueError(f"{part!r} is not an Xid: give numbers separated by commas, or 'all'")
            ignored.add(int(part))
        return cls(frozenset(ignored))

    def fault(self, xid: int) -> str | None:
        """What an Xid critical error means for its GPU, or None when it leaves the GPU healthy."""
        if self.ignore_all or xid in self.ignored:
            return None
        meaning = _XID_MEANINGS.get(xid)
        return f"Xid {xid}" + (f" ({meaning})" if meaning else "") + " reported by the driver"


APPLICATION_ERRORS_ONLY = XidPolicy()
"""The default: every critical Xid but the application errors takes its GPU out."""


@dataclass(frozen=True)
class GpuHealth:
    """Why a GPU cannot serve slices now; `healthy` when nothing stands in the way."""

    daemon_answers: bool
    fault: str | None = None

    @property
    def healthy(self) -> bool:
        return self.daemon_answers and self.fault is None

    @property
    def problem(self) -> str | None:
        """What is wrong, in words for a log line or an Event."""
        if self.fault is not None:
            return self.fault
        return None if self.daemon_answers else "its MPS control daemon does not answer"


def gpu_health(
    indexes: Iterable[int], daemon_answers: Mapping[int, bool], faults: Mapping[int, str]
) -> dict[int, GpuHealth]:
    """The health of each GPU of `indexes`; a GPU without a daemon reading counts as not answering."""
    return {index: GpuHealth(daemon_answers.get(index, False), faults.get(index)) for index in indexes}


def with_health(
    devices: Sequence[SliceDevice], freed: Collection[str], health: Mapping[int, GpuHealth]
) -> tuple[SliceDevice, ...]:
    """`devices` as the kubelet should see them, given the slices whose containers ended since the
    last look (`freed`): on an unhealthy GPU, those and the ones marked before are Unhealthy;
    everything else is Healthy (the module docstring says why)."""
    marked = []
    for device in devices:
        gpu = health.get(device.gpu_index)
        healthy = gpu is None or gpu.healthy or (device.healthy and device.id not in freed)
        marked.append(device if device.healthy == healthy else replace(device, healthy=healthy))
    return tuple(marked)
