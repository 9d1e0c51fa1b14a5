"""Events about pods that ask for MPS slices, published by the pod watcher.

One pod's observations, rejection and deletion share one subject, so the last message of that
subject is the pod's current level. This module never performs I/O.
"""

from __future__ import annotations

from typing import Literal

from events.base import AwareDatetime, Model

PodPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"]


class Requirement(Model):
    """One requirement of a node selector term: `key` (a label, or a field such as metadata.name)
    with `operator` In, NotIn, Exists, DoesNotExist, Gt or Lt and its `values`."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: tuple[str, ...] = ()


class NodeSelectorTerm(Model):
    """Requirements that all hold: on the node's labels (`expressions`) and fields (`fields`)."""

    expressions: tuple[Requirement, ...] = ()
    fields: tuple[Requirement, ...] = ()


class Toleration(Model):
    """A pod's toleration; `key` None with Exists tolerates every taint, `effect` None every effect."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str = ""
    effect: str | None = None


class NodeRules(Model):
    """What a pod asks of the node it runs on: its `nodeSelector`, the terms of its required node
    affinity (any one of them must hold; none means any node), and its tolerations."""

    node_selector: dict[str, str] = {}
    required_terms: tuple[NodeSelectorTerm, ...] = ()
    tolerations: tuple[Toleration, ...] = ()


class PodObserved(Model):
    """A valid pod that asks for one slice of `size_gb` GiB, as the API server last showed it.

    `gated`: the pod still carries mpsflow's scheduling gate, so no scheduler will bind it until
    mpsflow releases it. `released_to`: mpsflow released it to that node (gate removed, pinned there
    by node affinity) and it is not bound yet. A pod that bypassed the gate has neither. `rules`: the
    nodes it may run on, which the planner keeps to. `host_ipc`: it shares the host's IPC namespace,
    so an MPS server in the `host` IPC mode can reach it; one that does not can run only where the
    node agents give each GPU a shared-memory directory (`shm-directory`).
    """

    kind: Literal["PodObserved"] = "PodObserved"
    namespace: str
    name: str
    uid: str
    resource_version: str
    size_gb: int
    priority: int = 0
    created: AwareDatetime
    phase: PodPhase
    node: str | None = None
    gated: bool = False
    released_to: str | None = None
    rules: NodeRules = NodeRules()
    host_ipc: bool = True

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def holds_slice(self) -> bool:
        """Bound to a node and not finished, or released to a node and not yet bound there: a slice
        of that node is taken (or about to be)."""
        return self.holder_node is not None

    @property
    def holder_node(self) -> str | None:
        """The node one of whose slices this pod holds or is about to hold, if any."""
        if self.node is not None:
            return self.node if self.phase in ("Pending", "Running", "Unknown") else None
        return self.released_to if self.phase == "Pending" else None

    @property
    def waits_for_slice(self) -> bool:
        """Pending, not bound and not released to a node: the planner has yet to provide for it."""
        return self.node is None and self.released_to is None and self.phase == "Pending"


class PodRejected(Model):
    """A pod whose slice request can never be served as written; `reason` names the rule."""

    kind: Literal["PodRejected"] = "PodRejected"
    namespace: str
    name: str
    uid: str
    resource_version: str
    reason: str
    message: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodDeleted(Model):
    """A pod that asked for a slice is gone from the API server, or finished (Succeeded or Failed):
    either way it holds no slice and never will again."""

    kind: Literal["PodDeleted"] = "PodDeleted"
    namespace: str
    name: str
    uid: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodUnplaced(Model):
    """The planner could not provide a slice for a pending pod, and says why."""

    kind: Literal["PodUnplaced"] = "PodUnplaced"
    namespace: str
    name: str
    uid: str
    reason: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PodReleased(Model):
    """The planner's word that a gated pod may go: a free slice of its size is ready on `node`.

    The pod watcher turns it into the Kubernetes change: the scheduling gate goes and the pod is
    pinned to `node` by a required node affinity, in one patch guarded by `uid`.
    """

    kind: Literal["PodReleased"] = "PodReleased"
    namespace: str
    name: str
    uid: str
    node: str
    size_gb: int
    plan_id: str

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"
