"""The demo's scenario format (docs/formats.md §2): nodes with simulated GPUs, a workload, the
cluster's timing, node label changes, and faults for the API emulator to inject.

`load_scenario` refuses an invalid file with one message naming the offending field, e.g.
`nodes[0].gpus[1].memory_mib: Input should be greater than 0`. Nothing here starts anything.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from simulation.apiserver import Faults

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


class ApiFaults(_Strict):
    """Faults the API emulator injects into the requests of `identities` (shell-style patterns over
    the bearer token; every mpsflow service's is `mpsflow-<service>`) on `resources` (null: all).
    `simulation.apiserver.faults.Faults` says how each is applied; docs/formats.md §2.1 says it for
    people. Random choices come from generators seeded by `seed`, so runs are reproducible."""

    seed: int = 0
    identities: tuple[str, ...] = Field(default=("mpsflow-*",), min_length=1)
    resources: tuple[Literal["pods", "nodes", "configmaps", "events"], ...] | None = Field(
        default=None, min_length=1
    )
    error_rate: float = Field(default=0.0, ge=0, le=1)
    throttle_rate: float = Field(default=0.0, ge=0, le=1)
    retry_after_s: int = Field(default=1, ge=1)
    slow_rate: float = Field(default=0.0, ge=0, le=1)
    slow_s: float = Field(default=0.0, ge=0)
    gone_rate: float = Field(default=0.0, ge=0, lt=1)
    drop_watch_every_s: float | None = Field(default=None, gt=0)

    @field_validator("identities")
    @classmethod
    def _patterns_not_empty(cls, identities: tuple[str, ...]) -> tuple[str, ...]:
        if any(not pattern for pattern in identities):
            raise ValueError("an identity pattern must not be empty")
        return identities

    @model_validator(mode="after")
    def _some_requests_get_through(self) -> ApiFaults:
        if self.error_rate + self.throttle_rate >= 1:
            raise ValueError(
                "error_rate + throttle_rate must be below 1: otherwise no request ever gets through"
            )
        return self

    def emulator_faults(self) -> Faults:
        return Faults(**self.model_dump())


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
        spec = pod.get("spec")
        containers = spec.get("containers") if isinstance(spec, dict) else None
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


def _printable(text: str) -> str:
    """`text` for a one-line message: a character that does not print (a newline) as its escape."""
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def _refuse_duplicates(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{what} {_printable(name)} appears twice")
        seen.add(name)


class Scenario(_Strict):
    nodes: list[ScenarioNode] = Field(min_length=1)
    workload: list[WorkloadItem] = []
    node_changes: list[NodeChange] = []
    timing: Timing = Timing()
    api_faults: ApiFaults | None = None
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
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{_printable(str(part))}" if path else _printable(str(part))
    return path or "scenario"


def _non_text_key(value: object, where: tuple[int | str, ...]) -> tuple[tuple[int | str, ...], object] | None:
    """A mapping key in `value` that is not a string (YAML allows `60:` or `true:`, and a flow
    mapping's lone `60` is the key of a null), with where its mapping is; None when every key is a
    string."""
    pending: list[tuple[object, tuple[int | str, ...]]] = [(value, where)]
    while pending:
        current, path = pending.pop()
        if isinstance(current, dict):
            for key, item in current.items():
                if not isinstance(key, str):
                    return path, key
                pending.append((item, (*path, key)))
        elif isinstance(current, list):
            pending.extend((item, (*path, index)) for index, item in enumerate(current))
    return None


def parse_scenario(text: str, source: str = "scenario") -> Scenario:
    try:
        document = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError, OverflowError) as error:  # what int(), datetime() or chr() refuse
        raise ScenarioError(f"{source}: not valid YAML or JSON ({' '.join(str(error).split())})") from None
    except RecursionError:
        raise ScenarioError(f"{source}: not valid YAML or JSON (nested too deeply)") from None
    if not isinstance(document, dict):
        raise ScenarioError(f"{source}: must be a mapping with nodes, workload and timeout")
    odd_key = _non_text_key(document, ())
    if odd_key is not None:
        where, key = odd_key
        raise ScenarioError(f"{_field_path(where) if where else source}: the key {key!r} is not a string")
    try:
        return Scenario.model_validate(document)
    except ValidationError as error:
        first = error.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"] and first["type"] == "value_error":  # a rule over several fields names its field
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
    except UnicodeDecodeError as error:
        raise ScenarioError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    return parse_scenario(text, str(path))


def simulated_gpus_file(node: ScenarioNode) -> str:
    """The JSON the node agent's simulated NVML reads (simulation.fake_nvml)."""
    return json.dumps({"gpus": [gpu.model_dump(mode="json") for gpu in node.gpus]})
