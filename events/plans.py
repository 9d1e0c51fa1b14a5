"""The planner's output and the per-node config derived from it.

A plan names, for every opted-in node, the complete desired list of slices of every GPU
(used ones included), as in the `mpsflow plan` contract. This module never performs I/O.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from events.base import Model


class SliceSpec(Model):
    size_gb: int = Field(gt=0)
    used: bool = False


class NodeLayout(Model):
    """Desired slices per GPU index of one node."""

    gpus: dict[int, tuple[SliceSpec, ...]]

    def sizes(self) -> dict[int, tuple[int, ...]]:
        return {index: tuple(s.size_gb for s in slices) for index, slices in self.gpus.items()}


class Placement(Model):
    node: str
    gpu: int
    size_gb: int


class PlanComputed(Model):
    """A plan for the whole cluster; `plan_id` is derived from its content.

    The planner publishes each node's layout that changed as its own `NodePlanned`, then this
    event: whole for a small cluster, and only its id and excluded nodes for a large one (reasons
    go out per pod as `PodUnplaced`), so that no message grows with the cluster. It is for people
    and tools (`mpsflow record`, tracing); no service acts on it: a node's desired layout travels
    only as `NodePlanned`.
    """

    kind: Literal["PlanComputed"] = "PlanComputed"
    plan_id: str
    nodes: dict[str, NodeLayout]
    placed: dict[str, Placement] = {}
    unplaced: dict[str, str] = {}
    excluded_nodes: dict[str, str] = {}


class NodePlanned(Model):
    """One node's desired layout in plan `plan_id`, published when it differs from the last one."""

    kind: Literal["NodePlanned"] = "NodePlanned"
    node: str
    plan_id: str
    layout: NodeLayout


class NodeMpsConfig(Model):
    """The desired MPS config of one node: the value of its key in the node-config KV bucket.

    `gpus` maps a GPU index to the sizes (GiB) of every slice it must have. KV entries carry no
    headers, so the trace context travels in the value. `plan_sequence` is the stream sequence of
    the plan it came from: a config is never replaced by one from an older plan.
    """

    node: str
    plan_id: str
    plan_sequence: int = Field(ge=0)
    gpus: dict[int, tuple[int, ...]]
    traceparent: str | None = None

    def same_layout(self, other: NodeMpsConfig | None) -> bool:
        return other is not None and other.gpus == self.gpus


class NodeConfigPublished(Model):
    kind: Literal["NodeConfigPublished"] = "NodeConfigPublished"
    node: str
    plan_id: str
    revision: int


class NodeConfigApplied(Model):
    """A node agent made a config's slices real; `gpus` is the config's layout (sizes per GPU)."""

    kind: Literal["NodeConfigApplied"] = "NodeConfigApplied"
    node: str
    plan_id: str
    gpus: dict[int, tuple[int, ...]] = {}


class NodeConfigFailed(Model):
    """A node agent refused or could not apply a config (`gpus`, sizes per GPU); the node keeps its
    last good slices, and the planner never asks it for that layout again until its state changes."""

    kind: Literal["NodeConfigFailed"] = "NodeConfigFailed"
    node: str
    plan_id: str
    reason: str
    gpus: dict[int, tuple[int, ...]] = {}
