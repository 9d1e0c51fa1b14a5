"""The `mpsflow plan` contract: snapshot in, plan out (docs/formats.md §1).

Parsing validates the snapshot with pydantic against typed dicts of the contract: strictly (a value
of the wrong JSON type is refused, never converted: `"10"`, `10.0` and `true` are not integers), and
ignoring fields the contract does not name (formats may gain fields). A malformed snapshot is
refused with one message naming the offending field, e.g. `nodes[3].gpus[0].memory_mib: must be a
positive integer`: its first problem in document order, in the contract's words, not pydantic's.
Beyond the contract, a pending pod may say `"gated": false`: it was created outside mpsflow's
scheduling gate, so the scheduler may bind it to a free slice of its size at any moment and no such
slice is reclaimed (pods are gated by default, as mpsflow's admission webhook makes them). Rendering
is canonical (sorted keys, fixed separators) so the same snapshot always gives byte-identical
output. No I/O here: the CLI reads and writes.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from typing import Annotated, Any, cast

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    GetPydanticSchema,
    PlainValidator,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    with_config,
)
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict  # pydantic asks for it before Python 3.12

from events.vocabulary import is_opted_in
from services.planner.collector import collector_paused
from services.planner.core.model import (
    SHARED_SLICES,
    Gpu,
    Node,
    PendingPod,
    PlanResult,
    Slice,
    max_slices_for,
)


class SnapshotError(ValueError):
    """A snapshot that does not follow the contract; the message starts with the field path."""


# --- the snapshot as the contract describes it --------------------------------------------------
#
# Typed dicts, not BaseModels: a snapshot at cluster scale holds ~100,000 records, and as many
# model instances (each tracked by the garbage collector) made parsing it more than twice as slow.
_CONTRACT = ConfigDict(strict=True, extra="ignore")


class _Seen:
    """What one validation has met so far, passed as its pydantic context: node names, pod keys,
    and the GPU indexes of the node being validated. Each item checks itself against those before
    it, so a repeat is refused where it appears, in document order among the other problems."""

    def __init__(self) -> None:
        self.node_names: set[str] = set()
        self.gpu_indexes: set[int] = set()
        self.pod_keys: set[str] = set()


def _seen(info: ValidationInfo) -> _Seen:
    return cast(_Seen, info.context)  # parse_snapshot validates with context=_Seen()


def _node_name_once(name: str, info: ValidationInfo) -> str:
    seen = _seen(info)
    if name in seen.node_names:
        raise PydanticCustomError("duplicate", "node {name} appears twice", {"name": repr(name)})
    seen.node_names.add(name)
    return name


def _new_node(node: Any, info: ValidationInfo) -> Any:
    """GPU indexes are unique within a node: each node counts them afresh."""
    seen = _seen(info)
    seen.gpu_indexes = set()
    return node


def _gpu_index_once(index: int, info: ValidationInfo) -> int:
    seen = _seen(info)
    if index in seen.gpu_indexes:
        raise PydanticCustomError(
            "duplicate", "GPU index {index} appears twice in this node", {"index": index}
        )
    seen.gpu_indexes.add(index)
    return index


def _pod_once(pod: _Pod, info: ValidationInfo) -> _Pod:
    seen = _seen(info)
    key = f"{pod['namespace']}/{pod['name']}"
    if key in seen.pod_keys:
        # The message is one line of UTF-8: a newline or a lone surrogate (valid JSON: "\\ud800")
        # goes in as its escape.
        printable = "".join(char if char.isprintable() else ascii(char)[1:-1] for char in key)
        raise PydanticCustomError("duplicate", "pod {key} appears twice", {"key": printable})
    seen.pod_keys.add(key)
    return pod


_NOT_A_TIME = "must be an RFC 3339 time such as 2026-11-22T10:00:00Z"


def _time(value: object) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise PydanticCustomError("rfc3339_time", _NOT_A_TIME)
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise PydanticCustomError("rfc3339_time", _NOT_A_TIME) from None
    if parsed.tzinfo is None:
        raise PydanticCustomError("time_zone", "must carry a time zone (e.g. a trailing Z)")
    return parsed


def _non_empty(text: str) -> str:
    # Not Field(min_length=1): pydantic's length check refuses a lone surrogate escape ("\\ud800"),
    # which is valid JSON that the contract accepts.
    if not text:
        raise PydanticCustomError("empty", "must be a non-empty string")
    return text


_Text = Annotated[str, AfterValidator(_non_empty)]


@with_config(_CONTRACT)
class _Slice(TypedDict):
    size_gb: Annotated[int, Field(gt=0)]
    used: bool


@with_config(_CONTRACT)
class _Gpu(TypedDict):
    index: Annotated[int, Field(ge=0), AfterValidator(_gpu_index_once)]
    model: _Text
    memory_mib: Annotated[int, Field(gt=0)]
    slices: Annotated[list[_Slice], Field(default_factory=list)]


_max_slices = lru_cache(maxsize=256)(max_slices_for)  # a cluster has a handful of GPU models


def _planner_gpu(gpu: _Gpu) -> Gpu:
    return Gpu(
        index=gpu["index"],
        model=gpu["model"],
        memory_mib=gpu["memory_mib"],
        slices=tuple([SHARED_SLICES[s["size_gb"], s["used"]] for s in gpu["slices"]]),
        max_slices=_max_slices(gpu["model"]),
    )


# A GPU is validated as a _Gpu and becomes the planner's Gpu at once: ~16,000 fewer dicts that
# the garbage collector would otherwise go through again and again, while parsing and planning.
_GpuToPlan = Annotated[
    Gpu,
    GetPydanticSchema(
        lambda _, handler: handler.generate_schema(Annotated[_Gpu, AfterValidator(_planner_gpu)])
    ),
]


@with_config(_CONTRACT)
class _Node(TypedDict):
    name: Annotated[_Text, AfterValidator(_node_name_once)]
    labels: Annotated[dict[str, Any], Field(default_factory=dict)]
    gpus: list[_GpuToPlan]


@with_config(_CONTRACT)
class _Pod(TypedDict):
    namespace: _Text
    name: _Text
    size_gb: Annotated[int, Field(ge=0)]
    priority: Annotated[int, Field(default=0, ge=-(2**31))]
    created: Annotated[datetime | None, PlainValidator(_time), Field(default=None)]
    gated: Annotated[bool, Field(default=True)]


@with_config(_CONTRACT)
class _Snapshot(TypedDict):
    nodes: list[Annotated[_Node, BeforeValidator(_new_node)]]
    pending_pods: Annotated[list[Annotated[_Pod, AfterValidator(_pod_once)]], Field(default_factory=list)]


_SNAPSHOT = TypeAdapter(_Snapshot)


# --- pydantic's errors in the contract's words --------------------------------------------------

_PROBLEMS = {
    "missing": "is required",
    "dict_type": "must be an object",
    "list_type": "must be a list",
    "string_type": "must be a non-empty string",
    "bool_type": "must be true or false",
}
_INTEGER_PROBLEMS = frozenset({"int_type", "greater_than", "greater_than_equal"})
# What each integer field must be, by its path less list indexes (docs/formats.md §1.2).
_INTEGERS = {
    ("nodes", "gpus", "index"): "an integer of 0 or more",
    ("nodes", "gpus", "memory_mib"): "a positive integer",
    ("nodes", "gpus", "slices", "size_gb"): "a positive integer",
    ("pending_pods", "size_gb"): "a whole number of zero or more",
    ("pending_pods", "priority"): "an integer",
}


def _path(location: tuple[int | str, ...]) -> str:
    path = ""
    for part in location:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else part)
    return path or "snapshot"


def _snapshot_error(error: ValidationError) -> SnapshotError:
    """The first of pydantic's errors, which come in document order, as the contract words it."""
    first = error.errors(include_url=False)[0]
    location = tuple(first["loc"])
    if first["type"] in _INTEGER_PROBLEMS:
        field = tuple(part for part in location if isinstance(part, str))
        problem = f"must be {_INTEGERS.get(field, 'an integer')}"
    else:  # the validators above raise their errors in the contract's words
        problem = _PROBLEMS.get(first["type"], first["msg"])
    return SnapshotError(f"{_path(location)}: {problem}")


# --- parsing --------------------------------------------------------------------------------------


def parse_snapshot(text: str) -> tuple[list[Node], list[PendingPod]]:
    """The opted-in nodes and the pending pods of a snapshot, or SnapshotError naming the field.

    Python's cyclic garbage collector is paused meanwhile (`collector`): parsing builds hundreds of
    thousands of objects at cluster scale, none in a cycle, that it would go through again and again.
    """
    with collector_paused():
        return _parse_snapshot(text)


def _parse_snapshot(text: str) -> tuple[list[Node], list[PendingPod]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise SnapshotError(
            f"snapshot: not JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    except RecursionError:
        raise SnapshotError("snapshot: not JSON that can be read (nested too deeply)") from None
    except ValueError:  # json.loads converts numbers with int(), which refuses very long ones
        longest = sys.get_int_max_str_digits()
        raise SnapshotError(
            f"snapshot: not JSON that can be read (a number longer than {longest} digits)"
        ) from None
    try:
        snapshot = _SNAPSHOT.validate_python(document, context=_Seen())
    except ValidationError as error:
        raise _snapshot_error(error) from None
    del document  # fewer objects for the garbage collector to go through below
    # A pod outside mpsflow's scheduling gate may be bound to any free slice of its size at any
    # moment: no such slice may be reclaimed.
    protected = frozenset(pod["size_gb"] for pod in snapshot["pending_pods"] if not pod["gated"])
    nodes = [
        Node(name=node["name"], gpus=tuple(node["gpus"]), protected=protected)
        for node in snapshot["nodes"]
        if is_opted_in(node["labels"])
    ]
    pods = [
        PendingPod(
            namespace=pod["namespace"],
            name=pod["name"],
            size_gb=pod["size_gb"],
            priority=pod["priority"],
            created=pod["created"],
        )
        for pod in snapshot["pending_pods"]
    ]
    return nodes, pods


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
    if indent is None:
        with collector_paused():
            return _compact(result) + "\n"
    return json.dumps(plan_document(result), indent=indent, separators=(",", ": ")) + "\n"


_BOOLEAN = {False: "false", True: "true"}


def _compact(result: PlanResult) -> str:
    """`json.dumps(plan_document(result), separators=(",", ":"))`, the same text, written out
    directly: a plan at cluster scale has a hundred thousand slices, and building a dict for each
    to hand to `json` took as long as the rest of the rendering."""
    quoted = encode_basestring_ascii
    nodes = ",".join(
        f'{quoted(node)}:{{"gpus":{{{_gpus_text(gpus)}}}}}' for node, gpus in sorted(result.layouts.items())
    )
    placed = ",".join(
        f'{quoted(key)}:{{"node":{quoted(p.node)},"gpu":{int(p.gpu)},"size_gb":{int(p.size_gb)}}}'
        for key, p in sorted(result.placed.items())
    )
    unplaced = ",".join(f"{quoted(key)}:{quoted(reason)}" for key, reason in sorted(result.unplaced.items()))
    text = f'{{"nodes":{{{nodes}}},"placed":{{{placed}}},"unplaced":{{{unplaced}}}'
    if result.excluded_nodes:
        excluded = ",".join(
            f"{quoted(node)}:{quoted(reason)}" for node, reason in sorted(result.excluded_nodes.items())
        )
        text += f',"excluded_nodes":{{{excluded}}}'
    return text + "}"


def _gpus_text(gpus: dict[int, tuple[Slice, ...]]) -> str:
    return ",".join(
        f'"{int(index)}":[{",".join(map(_slice_text, slices))}]' for index, slices in sorted(gpus.items())
    )


def _slice_text(piece: Slice) -> str:
    return f'{{"size_gb":{int(piece.size_gb)},"used":{_BOOLEAN[piece.used]}}}'
