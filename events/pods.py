"""Events about pods that ask for MPS slices, published by the pod watcher.

One pod's observations, rejection and deletion share one subject, so the last message of that
subject is the pod's current level. This module never performs I/O.
"""

from __future__ import annotations

from typing import Literal

from events.base import AwareDatetime, Model

PodPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Unknown"]


class PodObserved(Model):
    """A valid pod that asks for one slice of `size_gb` GiB, as the API server last showed it."""

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

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def holds_slice(self) -> bool:
        """Bound to a node and not finished: its slice is taken (or about to be)."""
        return self.node is not None and self.phase in ("Pending", "Running", "Unknown")

    @property
    def waits_for_slice(self) -> bool:
        return self.node is None and self.phase == "Pending"


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
    """A pod that asked for a slice is gone from the API server."""

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
