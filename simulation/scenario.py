"""The demo's scenario format (docs/formats.md §2): nodes with simulated GPUs, a workload, the
cluster's timing, and node label changes.

`load_scenario` refuses an invalid file with one message naming the offending field, e.g.
`nodes[0].gpus[1].memory_mib: Input should be greater than 0`. Nothing here starts anything.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

GFD_PRODUCT = "nvidia.com/gpu.product"
GFD_COUNT = "nvidia.com/gpu.count"
GFD_MEMORY = "nvidia.com/gpu.memory"


class ScenarioError(ValueError):
    """An invalid scenario; the message starts with the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScenarioGpu(_Strict):
    model: str = Field(min_length=1)
    memory_mib: int = Field(gt=0)
    compute_capability: tuple[int, int] = (8, 0)


class ScenarioNode(_Strict):
    name: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    labels: dict[str, str] = {}
    taints: list[dict[str, str]] = []  # as in a Node's spec.taints: key, value, effect
    gpus: list[ScenarioGpu] = []

    def all_labels(self) -> dict[str, str]:
        """The given labels plus what GPU Feature Discovery would set on this node."""
        labels = dict(self.labels)
        if self.gpus:
            labels.setdefault(GFD_PRODUCT, self.gpus[0].model)
            labels.setdefault(GFD_COUNT, str(len(self.gpus)))
            labels.setdefault(GFD_MEMORY, str(self.gpus[0].memory_mib))
        return labels


class Timing(_Strict):
    """How fast the simulated cluster moves, with a real cluster's defaults.

    `node_status_period_s`: the kubelet's node-status sync (its `nodeStatusUpdateFrequency`, 10 s
    by default): a change of the device plugins' lists reaches `node.status.allocatable` in the API,
    which is all the scheduler sees, only at the next tick. `watch_delay_s`: added to every watch
    event the API delivers, as a watch cache lagging behind etcd does (tens of milliseconds in a
    healthy cluster)."""

    node_status_period_s: float = Field(default=10.0, gt=0)
    watch_delay_s: float = Field(default=0.05, ge=0)


class NodeChange(_Strict):
    """At `at` seconds into the workload, set (a string) or remove (null) labels of `node`: how a
    scenario opts a node in or out while pods come and go."""

    at: float = Field(ge=0)
    node: str
    labels: dict[str, str | None] = Field(min_length=1)


class WorkloadItem(_Strict):
    at: float = Field(ge=0)
    runs_for: float | None = Field(default=None, gt=0)
    pod: dict[str, Any]

    @field_validator("pod")
    @classmethod
    def _is_a_pod(cls, pod: dict[str, Any]) -> dict[str, Any]:
        if pod.get("kind", "Pod") != "Pod":
            raise ValueError(f"must be a Pod manifest, got kind {pod.get('kind')!r}")
        metadata = pod.get("metadata")
        if (
            not isinstance(metadata, dict)
            or not isinstance(metadata.get("name"), str)
            or not metadata["name"]
        ):
            raise ValueError("metadata.name is required")
        containers = (pod.get("spec") or {}).get("containers")
        if not isinstance(containers, list) or not containers:
            raise ValueError("spec.containers must list at least one container")
        return pod

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"].get("namespace") or "default")

    @property
    def name(self) -> str:
        return str(self.pod["metadata"]["name"])

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def _refuse_duplicates(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {name} appears twice")
        seen.add(name)


class Scenario(_Strict):
    nodes: list[ScenarioNode] = Field(min_length=1)
    workload: list[WorkloadItem] = []
    node_changes: list[NodeChange] = []
    timing: Timing = Timing()
    timeout: float = Field(default=60, gt=0)

    @field_validator("nodes")
    @classmethod
    def _unique_nodes(cls, nodes: list[ScenarioNode]) -> list[ScenarioNode]:
        _refuse_duplicates("node", [repr(n.name) for n in nodes])
        return nodes

    @field_validator("workload")
    @classmethod
    def _unique_pods(cls, workload: list[WorkloadItem]) -> list[WorkloadItem]:
        _refuse_duplicates("pod", [item.key for item in workload])
        return workload

    @model_validator(mode="after")
    def _changes_name_known_nodes(self) -> Scenario:
        names = {node.name for node in self.nodes}
        for index, change in enumerate(self.node_changes):
            if change.node not in names:
                raise ValueError(f"node_changes[{index}].node: {change.node!r} is not one of the nodes")
        return self


def _field_path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "scenario"


def parse_scenario(text: str, source: str = "scenario") -> Scenario:
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ScenarioError(f"{source}: not valid YAML or JSON ({error})") from None
    if not isinstance(document, dict):
        raise ScenarioError(f"{source}: must be a mapping with nodes, workload and timeout")
    try:
        return Scenario.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:  # a rule over several fields names its field itself
            raise ScenarioError(message) from None
        raise ScenarioError(f"{_field_path(tuple(first['loc']))}: {message}") from None


def load_scenario(path: Path | None) -> Scenario:
    """The scenario in `path`, or the built-in one when `path` is None."""
    if path is None:
        text = resources.files("simulation").joinpath("scenarios/default.yaml").read_text()
        return parse_scenario(text, "built-in scenario")
    try:
        text = path.read_text()
    except OSError as error:
        raise ScenarioError(f"{path}: {error.strerror}") from None
    return parse_scenario(text, str(path))


def simulated_gpus_file(node: ScenarioNode) -> str:
    """The JSON the node agent's simulated NVML reads (simulation.fake_nvml)."""
    return json.dumps({"gpus": [gpu.model_dump(mode="json") for gpu in node.gpus]})
