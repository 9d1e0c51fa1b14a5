"""The domain's words, defined once: units, resource names, MPS client limits, labels and annotations.

Every package reads these facts from here (the services, the node agent, the simulated cluster and
the tests), so that a resource name, a label key or a limit cannot drift between the one who writes
it and the one who reads it. Pure values and functions: nothing here performs I/O or imports more
than the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, get_args

# --- units ------------------------------------------------------------------------------------------

MIB_PER_GIB = 1024
"""One "gb" of `nvidia.com/gpu-<N>gb` is one GiB, everywhere: requests, slices, capacity, limits."""

# --- slice resources ----------------------------------------------------------------------------------

SLICE_RESOURCE_PREFIX = "nvidia.com/gpu-"
"""Every resource that starts so is mpsflow's to validate, well formed or not."""
WHOLE_GPU_RESOURCE = "nvidia.com/gpu"
_SLICE_RESOURCE = re.compile(r"nvidia\.com/gpu-([1-9][0-9]*)gb")
_ZERO_SLICE_RESOURCE = re.compile(r"nvidia\.com/gpu-0+gb")


def slice_resource(size_gb: int) -> str:
    """The extended resource name for slices of `size_gb` GiB, e.g. `nvidia.com/gpu-10gb`."""
    if size_gb < 1:
        raise ValueError(f"slice size must be at least 1 GiB, got {size_gb}")
    return f"{SLICE_RESOURCE_PREFIX}{size_gb}gb"


def slice_size(resource: str) -> int | None:
    """The slice size in GiB of a well-formed slice resource name, or None for any other name."""
    match = _SLICE_RESOURCE.fullmatch(resource)
    return int(match.group(1)) if match else None


def is_zero_slice(resource: str) -> bool:
    """`nvidia.com/gpu-0gb` (or `-00gb`): shaped like a slice, but of no size."""
    return _ZERO_SLICE_RESOURCE.fullmatch(resource) is not None


def container_requests(container: Mapping[str, Any]) -> dict[str, object]:
    """A container's resource requests with its limits over them (JSON form, as the API serves it)."""
    resources = container.get("resources") or {}
    merged: dict[str, object] = dict(resources.get("requests") or {})
    merged.update(resources.get("limits") or {})
    return merged


def asks_for_a_slice(pod: Mapping[str, Any]) -> bool:
    """Any container asks for an `nvidia.com/gpu-...` resource: the pod is mpsflow's to hold and
    validate (a malformed request is rejected with its reason, never left to the scheduler)."""
    spec = pod.get("spec") or {}
    return any(
        resource.startswith(SLICE_RESOURCE_PREFIX)
        for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
        for resource in container_requests(container)
    )


# --- MPS ----------------------------------------------------------------------------------------------

MAX_CLIENTS_VOLTA_AND_NEWER = 48
"""MPS clients (CUDA contexts) one server accepts per GPU from Volta (compute capability 7.0) on."""
MAX_CLIENTS_BEFORE_VOLTA = 16
VOLTA = (7, 0)


def max_mps_clients(compute_capability: tuple[int, int]) -> int:
    """How many MPS clients one server accepts on a GPU of this compute capability."""
    return MAX_CLIENTS_VOLTA_AND_NEWER if compute_capability >= VOLTA else MAX_CLIENTS_BEFORE_VOLTA


MpsIpcMode = Literal["host", "shm-directory"]
"""How MPS clients share `/dev/shm` with their GPU's MPS server, one choice for the whole deployment
(pod watcher, node agents and MPS daemon keepers alike; docs/mps.md, "The shm-directory IPC mode"):
`host` through the host's IPC namespace, so every slice pod sets `hostIPC: true`; `shm-directory`
through a tmpfs of each GPU's own, `<MPS root>/<GPU uuid>/shm`, that is the `/dev/shm` of that GPU's
daemon, of its servers and of every container holding one of its slices, so that no pod needs
`hostIPC`."""
MPS_IPC_MODES: tuple[MpsIpcMode, ...] = get_args(MpsIpcMode)
DEFAULT_MPS_IPC: MpsIpcMode = "host"


# --- node labels: opt-in and GPU Feature Discovery ------------------------------------------------------

NOS_DOMAIN = "nos.nebuly.com/"
NOS_LEGACY_DOMAIN = "nos.nebuly.ai/"
GFD_PRODUCT = "nvidia.com/gpu.product"
GFD_COUNT = "nvidia.com/gpu.count"
GFD_MEMORY = "nvidia.com/gpu.memory"
"""GPU Feature Discovery's per-GPU memory, in MiB."""

_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class OptInLabel:
    """The node label `key=value` that opts a node in to MPS partitioning.

    A key in the nos.nebuly.com domain is also accepted with the same name in the older
    nos.nebuly.ai domain, with the same value: `nos.nebuly.com/gpu-partitioning=mps` also matches
    `nos.nebuly.ai/gpu-partitioning=mps`. Any other key matches only as given."""

    key: str = f"{NOS_DOMAIN}gpu-partitioning"
    value: str = "mps"

    @property
    def keys(self) -> tuple[str, ...]:
        if self.key.startswith(NOS_DOMAIN):
            return (self.key, NOS_LEGACY_DOMAIN + self.key.removeprefix(NOS_DOMAIN))
        return (self.key,)

    def __str__(self) -> str:
        return f"{self.key}={self.value}"

    @classmethod
    def parse(cls, text: str) -> OptInLabel:
        """`KEY=VALUE` with a Kubernetes label key and a non-empty label value; ValueError says why not."""
        key, equals, value = text.partition("=")
        if not equals:
            raise ValueError(f"{text!r} is not KEY=VALUE")
        prefix, slash, name = key.rpartition("/")
        if not _LABEL_NAME.match(name) or (slash and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix))):
            raise ValueError(f"{key!r} is not a label key ([DNS subdomain/]name of at most 63 characters)")
        if not _LABEL_NAME.match(value):
            raise ValueError(f"{value!r} is not a non-empty label value of at most 63 characters")
        return cls(key, value)


DEFAULT_OPT_IN = OptInLabel()


def is_opted_in(labels: Mapping[str, str], opt_in: OptInLabel = DEFAULT_OPT_IN) -> bool:
    return any(labels.get(key) == opt_in.value for key in opt_in.keys)


# --- what mpsflow puts on pods and nodes ----------------------------------------------------------------

SLICE_GATE = "mpsflow.dev/slice"
"""The scheduling gate mpsflow's admission webhook puts on every pod that asks for a slice."""
RELEASED_TO_ANNOTATION = "mpsflow.dev/released-to"
"""Set, with the node's name, in the patch that lifts the gate and pins the pod to that node."""
SHARING_STRATEGY_LABEL = "mpsflow.dev/gpu.sharing-strategy"
"""On each node the config publisher writes: `mps`, or `none` when the node has no slice. The fact GPU
Feature Discovery's `nvidia.com/gpu.sharing-strategy` states, under mpsflow's own key (GFD owns its)."""
REPLICAS_LABEL = "mpsflow.dev/gpu.replicas"
"""Beside it: the largest number of slices on one GPU of the node (`1` without slices), as GFD's
`nvidia.com/gpu.replicas` counts shares per GPU."""
WEBHOOK_PATH = "/mutate-pods"
"""Where the pod watcher's admission webhook takes AdmissionReviews (the manifests point there)."""
WEBHOOK_HEALTH_PATH = "/healthz"


class RejectionRule(StrEnum):
    """The rule a pod's slice request breaks: the reason of its `PodRejected` and of the Warning Event
    on the pod."""

    MALFORMED_RESOURCE = "MpsSliceResourceMalformed"
    ZERO_SIZE = "MpsSliceSizeZero"
    TOO_LARGE = "MpsSliceLargerThanAnyGpu"
    SEVERAL_IN_CONTAINER = "MpsSeveralSlicesInContainer"
    SEVERAL_IN_POD = "MpsSeveralSlicesInPod"
    QUANTITY_NOT_ONE = "MpsSliceQuantityNotOne"
    WITH_WHOLE_GPU = "MpsSliceWithWholeGpu"
    HOST_IPC_REQUIRED = "MpsHostIpcRequired"
    USER_MISMATCH = "MpsUserMismatch"


class PodEventReason(StrEnum):
    """The reasons of the Events that tell a valid pod where it stands."""

    NOT_PLACED = "MpsSliceNotPlaced"
    """Normal: why the pod waits (the planner's reason is the message)."""
    READY = "MpsSliceReady"
    """Normal: its slice is ready; the gate is lifted and the pod pinned to the node."""
    RELEASE_REFUSED = "MpsSliceReleaseRefused"
    """Warning: the API refused the release patch; the pod stays gated."""
    OVERUSED = "MpsSliceOverused"
    """Warning: its processes use more GPU memory than its slice (MPS did not stop them)."""


# What nebuly's device-plugin fork, nos and GFD read (when each is written: docs/nos-compatibility.md).
DEVICE_PLUGIN_CONFIG_LABEL = "nvidia.com/device-plugin.config"
NOS_DEVICE_PLUGIN_CONFIGMAP = ("nebuly-nvidia", "nos-device-plugin-configs")
"""(namespace, name) of the ConfigMap nebuly's device-plugin fork reads, as nos's Helm chart names it."""
GFD_SHARING_STRATEGY_LABEL = "nvidia.com/gpu.sharing-strategy"
GFD_REPLICAS_LABEL = "nvidia.com/gpu.replicas"
"""GPU Feature Discovery's own labels: the config publisher mirrors its sharing labels there only
with `--gfd-labels`, for nodes where GFD does not write them."""
STATUS_ANNOTATION_PREFIX = f"{NOS_DOMAIN}status-gpu"
