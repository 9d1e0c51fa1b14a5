"""Pure translation of Kubernetes objects into mpsflow events, with every validation rule.

A pod that asks for no `nvidia.com/gpu-<N>gb` resource is none of our business (None). A pod
that asks for one slice correctly becomes `PodObserved`; one that breaks a rule becomes
`PodRejected` whose `reason` names the rule and whose message quotes the offending value. Nodes
become `NodeObserved` when they opt in by label. Input is the JSON form of the objects (camelCase
keys, as the API serves them). Nothing here performs I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from events.nodes import GfdFacts, NodeObserved
from events.pods import PodObserved, PodPhase, PodRejected

SLICE_PREFIX = "nvidia.com/gpu-"
SLICE_PATTERN = re.compile(r"^nvidia\.com/gpu-([1-9][0-9]*)gb$")
ZERO_SLICE_PATTERN = re.compile(r"^nvidia\.com/gpu-0+gb$")
WHOLE_GPU = "nvidia.com/gpu"
OPT_IN_LABEL_KEYS = ("nos.nebuly.com/gpu-partitioning", "nos.nebuly.ai/gpu-partitioning")
OPT_IN_VALUE = "mps"
GFD_PRODUCT = "nvidia.com/gpu.product"
GFD_COUNT = "nvidia.com/gpu.count"
GFD_MEMORY = "nvidia.com/gpu.memory"


class Rule:
    """Reasons of the Events that mpsflow puts on pods it rejects."""

    MALFORMED_RESOURCE = "MpsSliceResourceMalformed"
    ZERO_SIZE = "MpsSliceSizeZero"
    TOO_LARGE = "MpsSliceLargerThanAnyGpu"
    SEVERAL_IN_CONTAINER = "MpsSeveralSlicesInContainer"
    SEVERAL_IN_POD = "MpsSeveralSlicesInPod"
    QUANTITY_NOT_ONE = "MpsSliceQuantityNotOne"
    WITH_WHOLE_GPU = "MpsSliceWithWholeGpu"


def is_opted_in(labels: Mapping[str, str]) -> bool:
    return any(labels.get(key) == OPT_IN_VALUE for key in OPT_IN_LABEL_KEYS)


def translate_node(node: Mapping[str, Any]) -> NodeObserved | None:
    """NodeObserved for an opted-in node (with GFD facts or the reason they are missing), else None."""
    metadata = node.get("metadata", {})
    labels: Mapping[str, str] = metadata.get("labels") or {}
    if not is_opted_in(labels):
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
    )


def _quantity_is_one(value: object) -> bool:
    return str(value).strip() == "1"


def _container_requests(container: Mapping[str, Any]) -> dict[str, object]:
    resources = container.get("resources") or {}
    merged: dict[str, object] = dict(resources.get("requests") or {})
    merged.update(resources.get("limits") or {})
    return merged


def translate_pod(pod: Mapping[str, Any], largest_gpu_gb: int | None) -> PodObserved | PodRejected | None:
    """Validate a pod's slice request; `largest_gpu_gb` is None while no opted-in GPU is known."""
    metadata = pod.get("metadata", {})
    spec = pod.get("spec", {})
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    slices: list[tuple[str, int]] = []
    problems: list[tuple[str, str]] = []
    for container in containers:
        name = container.get("name", "?")
        requests = _container_requests(container)
        asked = [resource for resource in requests if resource.startswith(SLICE_PREFIX)]
        for resource in asked:
            match = SLICE_PATTERN.match(resource)
            if ZERO_SLICE_PATTERN.match(resource):
                problems.append(
                    (Rule.ZERO_SIZE, f"container {name!r} asks for {resource}: a slice is at least 1 GiB")
                )
            elif match is None:
                problems.append(
                    (
                        Rule.MALFORMED_RESOURCE,
                        f"container {name!r} asks for {resource!r}, which is "
                        "not nvidia.com/gpu-<N>gb with N a positive whole number of GiB",
                    )
                )
            elif not _quantity_is_one(requests[resource]):
                problems.append(
                    (
                        Rule.QUANTITY_NOT_ONE,
                        f"container {name!r} asks for {requests[resource]} of "
                        f"{resource}; ask for 1 slice of the size you need",
                    )
                )
            else:
                slices.append((name, int(match.group(1))))
        if len(asked) > 1:
            problems.append(
                (
                    Rule.SEVERAL_IN_CONTAINER,
                    f"container {name!r} asks for {', '.join(sorted(asked))}; one container gets one slice",
                )
            )
        if asked and WHOLE_GPU in requests:
            problems.append(
                (
                    Rule.WITH_WHOLE_GPU,
                    f"container {name!r} asks for {WHOLE_GPU} and "
                    f"{', '.join(sorted(asked))}; ask for one or the other",
                )
            )
    if not slices and not problems:
        return None
    if not problems and len(slices) > 1:
        problems.append(
            (
                Rule.SEVERAL_IN_POD,
                "containers "
                + ", ".join(repr(c) for c, _ in slices)
                + " each ask for a slice; mpsflow gives one slice per pod",
            )
        )
    if not problems and largest_gpu_gb is not None and slices[0][1] > largest_gpu_gb:
        problems.append(
            (
                Rule.TOO_LARGE,
                f"nvidia.com/gpu-{slices[0][1]}gb needs {slices[0][1]} GiB; "
                f"the largest opted-in GPU has {largest_gpu_gb} GiB",
            )
        )
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
    return PodObserved(
        size_gb=slices[0][1],
        priority=int(spec.get("priority") or 0),
        created=_parse_time(metadata.get("creationTimestamp")),
        phase=phase,
        node=spec.get("nodeName") or None,
        **common,
    )


def _parse_time(value: object) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return datetime.fromtimestamp(0, UTC)
