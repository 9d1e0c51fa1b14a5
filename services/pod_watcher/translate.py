"""Pure translation of Kubernetes objects into mpsflow events, with every validation rule.

Where it sits: the pure core of the pod watcher (`services/pod_watcher/service.py` feeds it what
the API serves). A pod that asks for no `nvidia.com/gpu-<N>gb` resource is none of our business
(None). A pod that asks for one slice correctly becomes `PodObserved`; one that breaks a rule
becomes `PodRejected` whose `reason` names the rule and whose message quotes the offending value.
Rules are checked in this order and the first problem found names the reason: the shape of the
slice resources (container by container, init containers first), one slice per pod, the size
against the largest opted-in GPU, then what the MPS client needs (`MpsClientRules`: hostIPC in
the host IPC mode, then the user). Nodes become `NodeObserved` when they carry the opt-in label
(`OptInLabel`). Input is the JSON form of the objects (camelCase keys, as the API serves them).
Nothing here performs I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args

from events.nodes import GfdFacts, NodeObserved, Taint
from events.pods import (
    NodeRules,
    NodeSelectorTerm,
    PodObserved,
    PodPhase,
    PodRejected,
    Requirement,
    Toleration,
)
from events.vocabulary import (
    DEFAULT_MPS_IPC,
    DEFAULT_OPT_IN,
    GFD_COUNT,
    GFD_MEMORY,
    GFD_PRODUCT,
    RELEASED_TO_ANNOTATION,
    SLICE_GATE,
    SLICE_RESOURCE_PREFIX,
    WHOLE_GPU_RESOURCE,
    MpsIpcMode,
    OptInLabel,
    RejectionRule,
    container_requests,
    is_opted_in,
    is_zero_slice,
    slice_size,
)


@dataclass(frozen=True)
class MpsClientRules:
    """What a pod needs to be an MPS client of the node agents and daemons as they are deployed.

    `ipc`: how MPS clients share /dev/shm with their server, which must be the node agents' and the
    daemon keepers' `--mps-ipc` (docs/mps.md, "The shm-directory IPC mode"). In `host` mode the pod
    must set `hostIPC: true`: clients share the server's /dev/shm through the host IPC namespace
    (nos requires it the same way). In `shm-directory` mode the device plugin mounts the GPU's shm
    directory as each slice container's /dev/shm, and hostIPC is not needed. A pod that sets it
    anyway is accepted without a word: the runtime puts the plugin's /dev/shm mount in place of the
    host's (containerd adds the host's only where no mount targets /dev/shm), so it still reaches
    its server; refusing it would make switching a cluster to `shm-directory` reject every pod
    written for `host` mode; and forbidding a privilege a pod does not need is what Pod Security
    admission ("baseline" refuses hostIPC) is for.
    `mps_user`: the UID the MPS servers run as, or None not to check. The MPS server of a GPU serves
    one UID at a time: a client of another UID waits until every client of the running server has
    exited, so a pod whose effective `runAsUser` (the container's securityContext, else the pod's)
    differs, or is left to the image, would hang."""

    ipc: MpsIpcMode = DEFAULT_MPS_IPC
    mps_user: int | None = None


DEFAULT_CLIENT_RULES = MpsClientRules()


def translate_node(node: Mapping[str, Any], opt_in: OptInLabel = DEFAULT_OPT_IN) -> NodeObserved | None:
    """NodeObserved for an opted-in node (with GFD facts or the reason they are missing), else None."""
    metadata = node.get("metadata", {})
    labels: Mapping[str, str] = metadata.get("labels") or {}
    if not is_opted_in(labels, opt_in):
        return None
    gfd: GfdFacts | None = None
    problem: str | None = None
    missing = [key for key in (GFD_PRODUCT, GFD_COUNT, GFD_MEMORY) if key not in labels]
    if missing:
        problem = f"GPU Feature Discovery label(s) missing: {', '.join(missing)}"
    else:
        try:
            gfd = GfdFacts(
                product=labels[GFD_PRODUCT], count=int(labels[GFD_COUNT]), memory_mib=int(labels[GFD_MEMORY])
            )
        except ValueError:
            problem = (
                f"GPU Feature Discovery labels unreadable: {GFD_COUNT}={labels[GFD_COUNT]!r}, "
                f"{GFD_MEMORY}={labels[GFD_MEMORY]!r}"
            )
    return NodeObserved(
        name=metadata["name"],
        unschedulable=bool(node.get("spec", {}).get("unschedulable")),
        gfd=gfd,
        gfd_problem=problem,
        allocatable=_slice_counts((node.get("status") or {}).get("allocatable") or {}),
        labels=dict(labels),
        taints=tuple(
            Taint(key=t.get("key", ""), value=t.get("value") or "", effect=t.get("effect", ""))
            for t in (node.get("spec") or {}).get("taints") or []
        ),
    )


def _slice_counts(resources: Mapping[str, object]) -> dict[int, int]:
    """Slices per size among a node's resources (`nvidia.com/gpu-<N>gb: count`); others are ignored."""
    counts: dict[int, int] = {}
    for name, quantity in resources.items():
        size, count = slice_size(name), _count(quantity)
        if size is not None and count is not None:
            counts[size] = count
    return dict(sorted(counts.items()))


def _count(quantity: object) -> int | None:
    """A whole count in ASCII digits, as the kubelet reports devices, or None for anything else
    (`²` is a digit to `str.isdigit` but not to `int`; thousands of digits are beyond `int` too)."""
    text = str(quantity)
    if not (text.isascii() and text.isdigit()):
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _quantity_is_one(value: object) -> bool:
    return str(value).strip() == "1"


class UnreadablePodError(ValueError):
    """A pod that is not the API's Pod schema where mpsflow reads it; the message names the field.

    The API server never serves one; a proxy, an emulator or a future API version might. The pod
    watcher logs it and goes on with the others."""


def _absent_as_empty(value: Any, kind: type[Any]) -> Any:
    """`value`, an empty `kind` when it is absent (null), or None when it is something else."""
    if value is None:
        return {} if kind is Mapping else kind()
    return value if isinstance(value, kind) else None


def _unreadable_field(pod: object) -> str | None:
    """The first field of `pod` whose type is not what the Pod schema says, where mpsflow reads it."""
    if not isinstance(pod, Mapping):
        return "the pod is not a JSON object"
    metadata = pod.get("metadata")
    if not isinstance(metadata, Mapping):
        return "metadata: not an object"
    for field in ("name", "uid"):
        if not isinstance(metadata.get(field), str):
            return f"metadata.{field}: missing or not a string"
    spec = _absent_as_empty(pod.get("spec"), Mapping)
    if spec is None:
        return "spec: not an object"
    for list_name in ("initContainers", "containers"):
        containers = _absent_as_empty(spec.get(list_name), list)
        if containers is None:
            return f"spec.{list_name}: not a list"
        for i, container in enumerate(containers):
            where = f"spec.{list_name}[{i}]"
            if not isinstance(container, Mapping):
                return f"{where}: not an object"
            resources = _absent_as_empty(container.get("resources"), Mapping)
            if resources is None:
                return f"{where}.resources: not an object"
            for part in ("requests", "limits"):
                if _absent_as_empty(resources.get(part), Mapping) is None:
                    return f"{where}.resources.{part}: not an object"
    return None


def translate_pod(
    pod: Mapping[str, Any], largest_gpu_gb: int | None, rules: MpsClientRules = DEFAULT_CLIENT_RULES
) -> PodObserved | PodRejected | None:
    """Validate a pod's slice request; `largest_gpu_gb` is None while no opted-in GPU is known.

    Raises `UnreadablePodError`, naming the field, for a pod outside the API's schema."""
    unreadable = _unreadable_field(pod)
    if unreadable is not None:
        raise UnreadablePodError(unreadable)
    metadata = pod["metadata"]
    spec = pod.get("spec") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    slices: list[tuple[Mapping[str, Any], int]] = []
    problems: list[tuple[str, str]] = []
    for container in containers:
        name = container.get("name", "?")
        requests = container_requests(container)
        asked = [resource for resource in requests if resource.startswith(SLICE_RESOURCE_PREFIX)]
        for resource in asked:
            size = slice_size(resource)
            if is_zero_slice(resource):
                problems.append(
                    (
                        RejectionRule.ZERO_SIZE,
                        f"container {name!r} asks for {resource}: a slice is at least 1 GiB",
                    )
                )
            elif size is None:
                problems.append(
                    (
                        RejectionRule.MALFORMED_RESOURCE,
                        f"container {name!r} asks for {resource!r}, which is "
                        "not nvidia.com/gpu-<N>gb with N a positive whole number of GiB",
                    )
                )
            elif not _quantity_is_one(requests[resource]):
                problems.append(
                    (
                        RejectionRule.QUANTITY_NOT_ONE,
                        f"container {name!r} asks for {requests[resource]} of "
                        f"{resource}; ask for 1 slice of the size you need",
                    )
                )
            else:
                slices.append((container, size))
        if len(asked) > 1:
            problems.append(
                (
                    RejectionRule.SEVERAL_IN_CONTAINER,
                    f"container {name!r} asks for {', '.join(sorted(asked))}; one container gets one slice",
                )
            )
        if asked and WHOLE_GPU_RESOURCE in requests:
            problems.append(
                (
                    RejectionRule.WITH_WHOLE_GPU,
                    f"container {name!r} asks for {WHOLE_GPU_RESOURCE} and "
                    f"{', '.join(sorted(asked))}; ask for one or the other",
                )
            )
    if not slices and not problems:
        return None
    if not problems and len(slices) > 1:
        problems.append(
            (
                RejectionRule.SEVERAL_IN_POD,
                "containers "
                + ", ".join(repr(c.get("name", "?")) for c, _ in slices)
                + " each ask for a slice; mpsflow gives one slice per pod",
            )
        )
    if not problems and largest_gpu_gb is not None and slices[0][1] > largest_gpu_gb:
        problems.append(
            (
                RejectionRule.TOO_LARGE,
                f"nvidia.com/gpu-{slices[0][1]}gb needs {slices[0][1]} GiB; "
                f"the largest opted-in GPU has {largest_gpu_gb} GiB",
            )
        )
    if not problems:
        problems.extend(_client_problems(spec, slices[0][0], rules))
    common = {
        "namespace": metadata.get("namespace", "default"),
        "name": metadata["name"],
        "uid": metadata["uid"],
        "resource_version": metadata.get("resourceVersion", ""),
    }
    if problems:
        reason, message = problems[0]
        return PodRejected(reason=reason, message=message, **common)
    status = pod.get("status") or {}
    phase: PodPhase = status.get("phase") or "Pending"
    if phase not in get_args(PodPhase):  # one this version does not know: it cannot reason about it
        phase = "Unknown"
    return PodObserved(
        size_gb=slices[0][1],
        priority=int(spec.get("priority") or 0),
        created=_parse_time(metadata.get("creationTimestamp")),
        phase=phase,
        node=spec.get("nodeName") or None,
        rules=_node_rules(spec),
        host_ipc=spec.get("hostIPC") is True,
        gated=is_gated(pod),
        # Only the release lifts the gate: an annotation on a gated pod (copied from another pod's
        # manifest, say) says nothing.
        released_to=None
        if is_gated(pod)
        else (metadata.get("annotations") or {}).get(RELEASED_TO_ANNOTATION),
        **common,
    )


def _node_rules(spec: Mapping[str, Any]) -> NodeRules:
    """The pod's nodeSelector, required node affinity terms and tolerations, as the API holds them
    (the API validated them; an entry this cannot read makes its term hold for no node)."""
    affinity = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = []
    for term in affinity.get("nodeSelectorTerms") or []:
        try:
            terms.append(
                NodeSelectorTerm(
                    expressions=tuple(_requirement(r) for r in term.get("matchExpressions") or []),
                    fields=tuple(_requirement(r) for r in term.get("matchFields") or []),
                )
            )
        except ValueError:
            terms.append(NodeSelectorTerm())  # holds for no node
    tolerations = []
    for toleration in spec.get("tolerations") or []:
        try:
            tolerations.append(
                Toleration(
                    key=toleration.get("key") or None,
                    operator=toleration.get("operator") or "Equal",
                    value=toleration.get("value") or "",
                    effect=toleration.get("effect") or None,
                )
            )
        except ValueError:
            continue  # tolerates nothing
    return NodeRules(
        node_selector={str(k): str(v) for k, v in (spec.get("nodeSelector") or {}).items()},
        required_terms=tuple(terms),
        tolerations=tuple(tolerations),
    )


def _requirement(requirement: Mapping[str, Any]) -> Requirement:
    return Requirement(
        key=requirement.get("key", ""),
        operator=requirement.get("operator", ""),
        values=tuple(str(v) for v in requirement.get("values") or []),
    )


def is_gated(pod: Mapping[str, Any]) -> bool:
    """The pod still carries mpsflow's scheduling gate."""
    gates = (pod.get("spec") or {}).get("schedulingGates") or []
    return any(gate.get("name") == SLICE_GATE for gate in gates)


def _client_problems(
    spec: Mapping[str, Any], container: Mapping[str, Any], rules: MpsClientRules
) -> list[tuple[str, str]]:
    """What keeps the pod from being an MPS client of the node agent's servers, if anything."""
    problems: list[tuple[str, str]] = []
    host_ipc = spec.get("hostIPC")
    if rules.ipc == "host" and host_ipc is not True:
        shown = "unset" if host_ipc is None else json.dumps(host_ipc)
        problems.append(
            (
                RejectionRule.HOST_IPC_REQUIRED,
                f"the pod has hostIPC {shown}; MPS clients share /dev/shm with the MPS server "
                "through the host IPC namespace (mpsflow runs in its host IPC mode here): "
                "set spec.hostIPC: true",
            )
        )
    if rules.mps_user is not None:
        name = container.get("name", "?")
        own = (container.get("securityContext") or {}).get("runAsUser")
        user = own if own is not None else (spec.get("securityContext") or {}).get("runAsUser")
        if user != rules.mps_user:
            where = "its" if own is not None else "the pod's"
            runs_as = (
                "leaves runAsUser unset (the image's user)"
                if user is None
                else f"runs as user {user} ({where} securityContext.runAsUser)"
            )
            problems.append(
                (
                    RejectionRule.USER_MISMATCH,
                    f"container {name!r} {runs_as}; the MPS server serves user {rules.mps_user} "
                    f"only: set runAsUser: {rules.mps_user}",
                )
            )
    return problems


def _parse_time(value: object) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return datetime.fromtimestamp(0, UTC)
