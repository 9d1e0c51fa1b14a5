"""The `mpsflow plan` contract: snapshot in, plan out (docs/formats.md §1).

Parsing refuses a malformed snapshot with one message naming the offending field, e.g.
`nodes[3].gpus[0].memory_mib: must be a positive integer`. Beyond the contract, a pending pod may
say `"gated": false`: it was created outside mpsflow's scheduling gate, so the scheduler may bind
it to a free slice of its size at any moment and no such slice is reclaimed (pods are gated by
default, as mpsflow's admission webhook makes them). Rendering is canonical (sorted keys, fixed
separators) so the same snapshot always gives byte-identical output. No I/O here: the CLI reads
and writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from events.vocabulary import is_opted_in
from services.planner.core.model import Gpu, Node, PendingPod, PlanResult, Slice, max_slices_for


class SnapshotError(ValueError):
    """A snapshot that does not follow the contract; the message starts with the field path."""


def _fail(path: str, message: str) -> SnapshotError:
    return SnapshotError(f"{path}: {message}")


def _object(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, "must be an object")
    return value


def _list(value: object, path: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise _fail(path, "must be a list")
    return value


def _field(container: Mapping[str, Any], name: str, path: str) -> Any:
    if name not in container:
        raise _fail(f"{path}.{name}" if path else name, "is required")
    return container[name]


def _string(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(path, "must be a non-empty string")
    return value


def _integer(value: object, path: str, *, minimum: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(path, f"must be {what}")
    return value


def _boolean(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, "must be true or false")
    return value


def _opted_in(labels: Mapping[str, Any]) -> bool:
    return is_opted_in(labels)


def parse_snapshot(text: str) -> tuple[list[Node], list[PendingPod]]:
    """The opted-in nodes and the pending pods of a snapshot, or SnapshotError naming the field."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise SnapshotError(
            f"snapshot: not JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    root = _object(document, "snapshot")
    nodes: list[Node] = []
    seen_nodes: set[str] = set()
    for n, raw_node in enumerate(_list(_field(root, "nodes", ""), "nodes")):
        path = f"nodes[{n}]"
        node = _object(raw_node, path)
        name = _string(_field(node, "name", path), f"{path}.name")
        if name in seen_nodes:
            raise _fail(f"{path}.name", f"node {name!r} appears twice")
        seen_nodes.add(name)
        labels = _object(node.get("labels", {}), f"{path}.labels")
        gpus = _parse_gpus(node, path)
        if _opted_in(labels):
            nodes.append(Node(name=name, gpus=tuple(gpus)))
    pods: list[PendingPod] = []
    seen_pods: set[str] = set()
    outside_gate: set[int] = set()
    for p, raw_pod in enumerate(_list(root.get("pending_pods", []), "pending_pods")):
        path = f"pending_pods[{p}]"
        pod = _object(raw_pod, path)
        parsed = PendingPod(
            namespace=_string(_field(pod, "namespace", path), f"{path}.namespace"),
            name=_string(_field(pod, "name", path), f"{path}.name"),
            size_gb=_integer(
                _field(pod, "size_gb", path),
                f"{path}.size_gb",
                minimum=0,
                what="a whole number of zero or more",
            ),
            priority=_integer(
                pod.get("priority", 0), f"{path}.priority", minimum=-(2**31), what="an integer"
            ),
            created=_parse_time(pod.get("created"), f"{path}.created"),
        )
        if parsed.key in seen_pods:
            raise _fail(path, f"pod {parsed.key} appears twice")
        seen_pods.add(parsed.key)
        pods.append(parsed)
        if not _boolean(pod.get("gated", True), f"{path}.gated"):
            outside_gate.add(parsed.size_gb)
    # A pod outside mpsflow's scheduling gate may be bound to any free slice of its size at any
    # moment: no such slice may be reclaimed.
    if outside_gate:
        nodes = [replace(node, protected=frozenset(outside_gate)) for node in nodes]
    return nodes, pods


def _parse_gpus(node: Mapping[str, Any], path: str) -> list[Gpu]:
    gpus: list[Gpu] = []
    seen: set[int] = set()
    for g, raw_gpu in enumerate(_list(_field(node, "gpus", path), f"{path}.gpus")):
        gpath = f"{path}.gpus[{g}]"
        gpu = _object(raw_gpu, gpath)
        index = _integer(
            _field(gpu, "index", gpath), f"{gpath}.index", minimum=0, what="an integer of 0 or more"
        )
        if index in seen:
            raise _fail(f"{gpath}.index", f"GPU index {index} appears twice in this node")
        seen.add(index)
        model = _string(_field(gpu, "model", gpath), f"{gpath}.model")
        memory = _integer(
            _field(gpu, "memory_mib", gpath), f"{gpath}.memory_mib", minimum=1, what="a positive integer"
        )
        slices: list[Slice] = []
        for s, raw_slice in enumerate(_list(gpu.get("slices", []), f"{gpath}.slices")):
            spath = f"{gpath}.slices[{s}]"
            item = _object(raw_slice, spath)
            slices.append(
                Slice(
                    size_gb=_integer(
                        _field(item, "size_gb", spath),
                        f"{spath}.size_gb",
                        minimum=1,
                        what="a positive integer",
                    ),
                    used=_boolean(_field(item, "used", spath), f"{spath}.used"),
                )
            )
        gpus.append(
            Gpu(
                index=index,
                model=model,
                memory_mib=memory,
                slices=tuple(slices),
                max_slices=max_slices_for(model),
            )
        )
    return gpus


def _parse_time(value: object, path: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _fail(path, "must be an RFC 3339 time such as 2026-11-22T10:00:00Z")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _fail(path, "must be an RFC 3339 time such as 2026-11-22T10:00:00Z") from None
    if parsed.tzinfo is None:
        raise _fail(path, "must carry a time zone (e.g. a trailing Z)")
    return parsed


def plan_document(result: PlanResult) -> dict[str, Any]:
    """The plan as the contract's JSON object."""
    document: dict[str, Any] = {
        "nodes": {
            node: {
                "gpus": {
                    str(index): [{"size_gb": s.size_gb, "used": s.used} for s in slices]
                    for index, slices in sorted(gpus.items())
                }
            }
            for node, gpus in sorted(result.layouts.items())
        },
        "placed": {
            key: {"node": p.node, "gpu": p.gpu, "size_gb": p.size_gb}
            for key, p in sorted(result.placed.items())
        },
        "unplaced": dict(sorted(result.unplaced.items())),
    }
    if result.excluded_nodes:
        document["excluded_nodes"] = dict(sorted(result.excluded_nodes.items()))
    return document


def render_plan(result: PlanResult, indent: int | None = None) -> str:
    """The plan as JSON text: compact by default (fast at cluster scale), indented on request."""
    separators = (",", ": ") if indent is not None else (",", ":")
    return json.dumps(plan_document(result), indent=indent, separators=separators) + "\n"
